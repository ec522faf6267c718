-- nn.Module: the base of Lua modules (Torch7's one-module-one-file protocol with PyTorch's names):
-- parameters, buffers and children by name, train/eval, state_dict, to(), and classes.
local torch = require 'torch'

local Module = {__name = 'nn.Module'}

local function is_float(t) return t.dtype:find('float', 1, true) ~= nil end
local function shape_str(t) return '(' .. table.concat(t.shape, ', ') .. ')' end
Module.__index = Module

-- A subclass: local Linear = Module:extend('nn.Linear'); Linear(...) calls Linear.__init(self, ...).
function Module:extend(name)
  assert(type(name) == 'string', 'Module:extend(name): expected a class name')
  local cls = {__name = name, super = self}
  cls.__index = cls
  cls.__tostring = self.__tostring
  cls.__call = self.__call
  return setmetatable(cls, {__index = self, __call = function(c, ...)
    local obj = setmetatable({}, c)
    Module.__init(obj)
    if c.__init ~= Module.__init then c.__init(obj, ...) end
    return obj
  end})
end

function Module:__init()
  rawset(self, '_parameters', {})
  rawset(self, '_buffers', {})
  rawset(self, '_modules', {})
  rawset(self, 'training', true)
end

local function check_name(self, what, name)
  if type(name) ~= 'string' or name == '' or name:find('.', 1, true) then
    error(('%s:%s: expected a name without dots, got %s'):format(self.__name, what, tostring(name)), 3)
  end
end

local function add_name(list, name)
  for _, n in ipairs(list) do if n == name then return end end
  list[#list + 1] = name
end

-- register_parameter(name, t): t trains (requires_grad) and is listed by parameters().
function Module:register_parameter(name, t)
  check_name(self, 'register_parameter', name)
  if t ~= nil and not torch.is_tensor(t) then
    error(('%s:register_parameter(%q): expected a Tensor, got %s'):format(self.__name, name, type(t)), 2)
  end
  if t ~= nil and is_float(t) and not t.requires_grad then t:requires_grad_(true) end
  add_name(self._parameters, name)
  self[name] = t
  return t
end

-- register_buffer(name, t): state that is saved and moved but not trained (indices, LUTs, stats).
function Module:register_buffer(name, t)
  check_name(self, 'register_buffer', name)
  if t ~= nil and not torch.is_tensor(t) then
    error(('%s:register_buffer(%q): expected a Tensor, got %s'):format(self.__name, name, type(t)), 2)
  end
  add_name(self._buffers, name)
  self[name] = t
  return t
end

function Module:add_module(name, m)
  check_name(self, 'add_module', name)
  if type(m) ~= 'table' or type(m.forward) ~= 'function' then
    error(('%s:add_module(%q): expected a module with forward(), got %s'):format(self.__name, name, type(m)), 2)
  end
  add_name(self._modules, name)
  self[name] = m
  return m
end

-- {name, tensor} pairs, children's under "child.name", in registration order.
local function named(self, kinds, prefix, out)
  for _, kind in ipairs(kinds) do
    for _, n in ipairs(self[kind]) do
      local t = self[n]
      if t ~= nil then out[#out + 1] = {prefix .. n, t} end
    end
  end
  for _, n in ipairs(self._modules) do named(self[n], kinds, prefix .. n .. '.', out) end
  return out
end

function Module:named_parameters() return named(self, {'_parameters'}, '', {}) end
function Module:named_buffers() return named(self, {'_buffers'}, '', {}) end
-- Parameters and buffers: what state_dict() holds (and what a model holding this layer saves).
function Module:named_tensors() return named(self, {'_parameters', '_buffers'}, '', {}) end

function Module:parameters()
  local out = {}
  for i, p in ipairs(self:named_parameters()) do out[i] = p[2] end
  return out
end

function Module:children()
  local out = {}
  for i, n in ipairs(self._modules) do out[i] = self[n] end
  return out
end

function Module:named_modules(prefix, out)
  prefix, out = prefix or '', out or {}
  out[#out + 1] = {prefix, self}
  for _, n in ipairs(self._modules) do
    self[n]:named_modules(prefix == '' and n or prefix .. '.' .. n, out)
  end
  return out
end

function Module:train(on)
  if on == nil then on = true end
  self.training = on and true or false
  for _, c in ipairs(self:children()) do c:train(on) end
  return self
end

function Module:eval() return self:train(false) end

function Module:zero_grad()
  for _, p in ipairs(self:parameters()) do p.grad = nil end
  return self
end

function Module:state_dict()
  local sd = {}
  for _, p in ipairs(self:named_tensors()) do sd[p[1]] = p[2]:detach() end
  return sd
end

-- load_state_dict(sd, {strict = true}): copies values into the existing tensors.
function Module:load_state_dict(sd, opts)
  opts = require('opts').check(opts, {strict = 'boolean'}, self.__name .. ':load_state_dict')
  local strict = opts.strict ~= false
  local own, missing, unexpected = {}, {}, {}
  for _, p in ipairs(self:named_tensors()) do
    own[p[1]] = p[2]
    local v = sd[p[1]]
    if v == nil then
      missing[#missing + 1] = p[1]
    elseif not torch.is_tensor(v) then
      error(('%s:load_state_dict: %s: expected a Tensor, got %s'):format(self.__name, p[1], type(v)), 2)
    elseif shape_str(v) ~= shape_str(p[2]) then
      error(('%s:load_state_dict: %s: shape %s, expected %s'):format(self.__name, p[1],
        shape_str(v), shape_str(p[2])), 2)
    end
  end
  for k in pairs(sd) do if own[k] == nil then unexpected[#unexpected + 1] = k end end
  table.sort(unexpected)
  if strict and (#missing > 0 or #unexpected > 0) then
    error(('%s:load_state_dict: missing keys: %s; unexpected keys: %s'):format(self.__name,
      table.concat(missing, ', '), table.concat(unexpected, ', ')), 2)
  end
  torch.no_grad(function()
    for k, t in pairs(own) do
      if sd[k] ~= nil then t:copy_(sd[k]) end
    end
  end)
  return missing, unexpected
end

-- to(device | dtype | {device=, dtype=}): new tensors in place of the old (gradients reset);
-- a dtype applies to floating tensors only, as PyTorch's Module.to.
function Module:to(...)
  local args = {...}
  local function move(m)
    for _, kind in ipairs({'_parameters', '_buffers'}) do
      for _, n in ipairs(m[kind]) do
        local t = m[n]
        if t ~= nil then
          local rg = t.requires_grad
          local a = {}
          for _, v in ipairs(args) do
            local is_dtype = type(v) == 'string' and not v:match('^cpu') and not v:match('^cuda')
            if not (is_dtype and not is_float(t)) then a[#a + 1] = v end
          end
          local nt = #a > 0 and t:detach():to(unpack(a)) or t
          if rg and not nt.requires_grad then nt:requires_grad_(true) end
          m[n] = nt
        end
      end
    end
    for _, c in ipairs(m:children()) do move(c) end
  end
  move(self)
  return self
end

function Module:forward()
  error(self.__name .. ':forward is not defined (a module defines forward(self, x))', 2)
end

function Module:__call(...) return self:forward(...) end

function Module.extra_repr() return '' end

function Module:__tostring()
  local lines = {self.__name .. '(' .. self:extra_repr() .. (#self._modules > 0 and '' or ')')}
  if #self._modules > 0 then
    for _, n in ipairs(self._modules) do
      lines[#lines + 1] = '  (' .. n .. '): ' .. tostring(self[n]):gsub('\n', '\n  ')
    end
    lines[#lines + 1] = ')'
  end
  return table.concat(lines, '\n')
end

return Module
