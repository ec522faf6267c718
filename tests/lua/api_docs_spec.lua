-- api_docs_spec: every function a bound module or a toolkit module exposes, and every method of every object
-- type the host registers (found through the metatables in the Lua registry), is documented in docs/api/: a
-- heading or table cell naming `module.f(` or `:method(` in that module's page. A new function without
-- documentation fails here with its name and the page to add it to.
local h = require 'helper'
local read = require('files').read

local DOCS = h.source_dir .. '/docs/api/'

-- Bound modules and the toolkit modules of scripts/, each with its page.
local MODULES = {
  torch = 'torch.md', ['torch.nn.functional'] = 'torch.md', nn = 'nn.md', quant = 'quant.md', kd = 'kd.md',
  optim = 'optim.md', data = 'data.md', tokenizers = 'tokenizers.md', gguf = 'gguf.md', dist = 'dist.md',
  log = 'log.md', qatlab = 'qatlab.md',
  trainer = 'toolkit.md', schedule = 'toolkit.md', sweep = 'sweep.md', ema = 'toolkit.md', progress = 'toolkit.md',
  plot = 'toolkit.md', config = 'toolkit.md', opts = 'toolkit.md', util = 'toolkit.md', files = 'toolkit.md',
  json = 'toolkit.md', bench = 'toolkit.md', kd_lab = 'toolkit.md', pretrained = 'toolkit.md',
  layerwise = 'toolkit.md', sensitivity = 'toolkit.md', qat_options = 'toolkit.md',
}

-- The object types the host registers (metatable name -> page and the prefix its methods are written with).
local TYPES = {
  ['qatlab.Tensor'] = 'torch.md', ['qatlab.Model'] = 'nn.md', ['qatlab.Optimizer'] = 'optim.md',
  ['qatlab.KdCacheReader'] = 'kd.md', ['qatlab.Tokenizer'] = 'tokenizers.md', ['qatlab.DDP'] = 'dist.md',
  ['qatlab.HookHandle'] = 'nn.md', ['qatlab.IntNQat'] = 'quant.md', ['qatlab.IntNSchedule'] = 'quant.md',
  ['qatlab.autograd.Function'] = 'torch.md', ['qatlab.autograd.ctx'] = 'torch.md',
  ['qatlab.autograd.RemovableHandle'] = 'torch.md', ['qatlab.Size'] = 'torch.md',
}

-- The prefix a module's functions are written with in its page (default: the module name and a dot).
local PREFIX = {['torch.nn.functional'] = 'F.'}

-- The Lua classes of the nn toolkit (scripts/nn/*.lua): their own methods are documented in nn.md.
local NN_CLASSES = {'Module', 'Linear', 'Embedding', 'RMSNorm', 'LoRA', 'Sequential'}

local pages = {}
local function page(name)
  if pages[name] == nil then pages[name] = read(DOCS .. name) or false end
  return pages[name]
end

local function plain(s) return (s:gsub('[%^%$%(%)%%%.%[%]%*%+%-%?]', '%%%0')) end

-- Whether `text` documents `name` as `<prefix><name>(` in a heading or a table row.
local function documented(text, prefix, name)
  local pat = plain(prefix .. name) .. '%f[^%w_]'
  for line in text:gmatch('[^\n]+') do
    if (line:match('^#+ ') or line:match('^|')) and line:find('`' .. '[^`]-' .. pat) then return true end
  end
  return false
end

-- Functions in a table, by name (private names starting with _ and metamethods left out).
local function functions_of(t, out)
  out = out or {}
  for k, v in pairs(t) do
    if type(k) == 'string' and type(v) == 'function' and not k:match('^_') then out[k] = true end
  end
  return out
end

-- The methods of a metatable: its __index table, or the tables an __index function reaches by upvalue.
local function methods_of(mt)
  local out, idx = {}, rawget(mt, '__index')
  if type(idx) == 'table' then functions_of(idx, out) end
  if type(rawget(mt, '__methods')) == 'table' then functions_of(rawget(mt, '__methods'), out) end
  if type(idx) == 'function' then
    for i = 1, 20 do
      local name, v = debug.getupvalue(idx, i)
      if name == nil then break end
      if type(v) == 'table' then functions_of(v, out) end
      if type(v) == 'function' then
        for j = 1, 20 do
          local n2, v2 = debug.getupvalue(v, j)
          if n2 == nil then break end
          if type(v2) == 'table' then functions_of(v2, out) end
        end
      end
    end
  end
  for k, v in pairs(mt) do
    if type(k) == 'string' and type(v) == 'function' and not k:match('^__') then out[k] = true end
  end
  return out
end

local function sorted(set)
  local list = {}
  for k in pairs(set) do list[#list + 1] = k end
  table.sort(list)
  return list
end

describe('docs/api', function()
  it('documents every function of every module', function()
    local missing = {}
    for _, mod in ipairs(sorted(MODULES)) do
      local file = MODULES[mod]
      local text = page(file)
      assert.truthy(text, 'no docs/api/' .. file)
      local m = require(mod)
      local names = type(m) == 'table' and functions_of(m) or {}
      local prefix = PREFIX[mod] or (mod .. '.')
      for _, f in ipairs(sorted(names)) do
        if not documented(text, prefix, f) then missing[#missing + 1] = ('%s%s (docs/api/%s)'):format(prefix, f, file) end
      end
      -- tables of functions inside a module (torch.cuda, torch.linalg, torch.backends.cpu...), two levels deep
      local function walk(t, pre, depth)
        for k, v in pairs(t) do
          if type(v) == 'table' and k ~= 'Tensor' and type(k) == 'string' and not k:match('^_') then
            for _, f in ipairs(sorted(functions_of(v))) do
              if not documented(text, pre .. k .. '.', f) then
                missing[#missing + 1] = ('%s%s.%s (docs/api/%s)'):format(pre, k, f, file)
              end
            end
            if depth < 2 then walk(v, pre .. k .. '.', depth + 1) end
          end
        end
      end
      if type(m) == 'table' then walk(m, mod .. '.', 1) end
    end
    assert.are.same({}, missing, 'undocumented functions:\n' .. table.concat(missing, '\n'))
  end)

  it('documents the methods of the nn toolkit classes', function()
    local nn, text, missing = require('nn'), page('nn.md'), {}
    for _, cls in ipairs(NN_CLASSES) do
      assert.is_table(nn[cls], 'nn.' .. cls)
      for _, f in ipairs(sorted(functions_of(nn[cls]))) do
        if not documented(text, ':', f) and not documented(text, 'nn.' .. cls .. '.', f) then
          missing[#missing + 1] = ('nn.%s:%s (docs/api/nn.md)'):format(cls, f)
        end
      end
    end
    assert.are.same({}, missing, 'undocumented methods:\n' .. table.concat(missing, '\n'))
  end)

  it('documents every method of every object type the host registers', function()
    -- objects of every type exist once a few modules are loaded
    for _, mod in ipairs({'torch', 'nn', 'quant', 'kd', 'optim', 'tokenizers', 'dist'}) do require(mod) end
    local reg, missing, seen = debug.getregistry(), {}, {}
    for name, mt in pairs(reg) do
      if type(name) == 'string' and name:match('^qatlab%.') and type(mt) == 'table' then
        seen[name] = true
        local file = TYPES[name]
        if not file then
          missing[#missing + 1] = ('type %s: add it to TYPES in this spec and document its methods'):format(name)
        else
          local text = page(file)
          assert.truthy(text, 'no docs/api/' .. file)
          for _, f in ipairs(sorted(methods_of(mt))) do
            if not documented(text, ':', f) then
              missing[#missing + 1] = ('%s:%s (docs/api/%s)'):format(name, f, file)
            end
          end
        end
      end
    end
    assert.is_true(seen['qatlab.Tensor'] and seen['qatlab.Model'], 'the registry holds no qatlab metatables')
    table.sort(missing)
    assert.are.same({}, missing, 'undocumented methods:\n' .. table.concat(missing, '\n'))
  end)

  it('fails on an undocumented name (the check itself can fail)', function()
    assert.is_false(documented('| `torch.add(a, b)` | sum |', 'torch.', 'ad'))
    assert.is_true(documented('| `torch.add(a, b)` | sum |', 'torch.', 'add'))
    assert.is_true(documented('### `t:add_(b)`', ':', 'add_'))
    assert.is_false(documented('torch.add is mentioned in prose only', 'torch.', 'add'))
  end)
end)
