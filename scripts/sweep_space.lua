-- sweep_space: the search spaces of a sweep (grid, random, ablate, list) and the table helpers they share
-- (dotted-key flattening, deep copy and merge). Each space is a list of items {overrides=, name=}.
local opts = require 'opts'

local M = {}

local Space = {}
Space.__index = Space

local function space(items) return setmetatable({ items = items }, Space) end

-- A new space: this one's runs followed by other's.
function Space:concat(other)
  local items = {}
  for _, it in ipairs(self.items) do items[#items + 1] = it end
  for _, it in ipairs(other.items) do items[#items + 1] = it end
  return space(items)
end

-- The number of configs (LuaJIT's # does not call __len on tables).
function Space:size() return #self.items end

local function is_list(t)
  if type(t) ~= 'table' then return false end
  local n = 0
  for _ in pairs(t) do n = n + 1 end
  return n > 0 and t[n] ~= nil and #t == n
end

local function sorted_keys(t)
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = k end
  table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
  return keys
end

-- Flattens nested tables to dotted keys; `leaf(v)` says where to stop descending.
local function flatten(t, leaf, prefix, out)
  out = out or {}
  for _, k in ipairs(sorted_keys(t)) do
    local v, key = t[k], (prefix or '') .. tostring(k)
    if type(v) == 'table' and not leaf(v) then flatten(v, leaf, key .. '.', out) else out[key] = v end
  end
  return out
end
M.flatten = function(t) return flatten(t, function(v) return is_list(v) end) end

-- Sets t['a.b'] = v as t.a.b = v.
local function set_path(t, key, v)
  local node, last = t, nil
  for part in key:gmatch('[^.]+') do
    if last then
      node[last] = node[last] or {}
      node = node[last]
    end
    last = part
  end
  node[last] = v
end

local function deep_copy(t)
  if type(t) ~= 'table' then return t end
  local c = {}
  for k, v in pairs(t) do c[k] = deep_copy(v) end
  return c
end

local function deep_merge(into, over)
  for k, v in pairs(over) do
    if type(v) == 'table' and type(into[k]) == 'table' and not is_list(v) then deep_merge(into[k], v)
    else into[k] = deep_copy(v) end
  end
  return into
end

-- grid{lr={1e-3, 3e-4}, kd={T={2, 4}}}: the cartesian product over sorted dotted keys, the first
-- key varying slowest. A non-list value is a constant.
function M.grid(params)
  local flat = flatten(params, is_list)
  local keys, items = sorted_keys(flat), {}
  local function rec(i, cur)
    if i > #keys then
      local ov = {}
      for k, v in pairs(cur) do set_path(ov, k, v) end
      items[#items + 1] = { overrides = ov }
      return
    end
    local vals = flat[keys[i]]
    if not is_list(vals) then vals = { vals } end
    for _, v in ipairs(vals) do
      cur[keys[i]] = v
      rec(i + 1, cur)
    end
    cur[keys[i]] = nil
  end
  rec(1, {})
  return space(items)
end

-- list{cfg1, cfg2, ...}: explicit override tables.
function M.list(cfgs)
  local items = {}
  for i, c in ipairs(cfgs) do items[i] = { overrides = deep_copy(c) } end
  return space(items)
end

-- ablate(base, {name = overrides, ...}): base, then one variant per name (sorted), each named.
function M.ablate(base, variants)
  local items = { { overrides = deep_copy(base), name = 'base' } }
  for _, name in ipairs(sorted_keys(variants)) do
    items[#items + 1] = { overrides = deep_merge(deep_copy(base), variants[name]), name = name }
  end
  return space(items)
end

-- A Park-Miller generator: the same draws on every platform, and math.random is left alone.
local function rng(seed)
  local x = math.floor(seed or 1) % 2147483646 + 1
  return function()
    x = (16807 * x) % 2147483647
    return (x - 1) / 2147483646
  end
end

local draws = {
  choice = function(u, s) return s[2][math.min(math.floor(u() * #s[2]) + 1, #s[2])] end,
  uniform = function(u, s) return s[2] + (s[3] - s[2]) * u() end,
  loguniform = function(u, s) return math.exp(math.log(s[2]) + (math.log(s[3]) - math.log(s[2])) * u()) end,
  int_uniform = function(u, s) return math.min(s[2] + math.floor(u() * (s[3] - s[2] + 1)), s[3]) end,
  quniform = function(u, s) return math.floor((s[2] + (s[3] - s[2]) * u()) / s[4] + 0.5) * s[4] end,
}

-- random{n=, seed=, params={x={'loguniform', 1e-4, 1e-2}, y={'choice', {...}}, z=constant}}
function M.random(o)
  opts.check(o, {n = 'integer!', seed = 'number', params = 'table!'}, 'sweep.random')
  local flat = flatten(o.params, function(v) return type(v[1]) == 'string' end)
  local keys, u, items = sorted_keys(flat), rng(o.seed or 0), {}
  for i = 1, o.n do
    local ov = {}
    for _, k in ipairs(keys) do
      local s = flat[k]
      local v = s
      if type(s) == 'table' then
        local f = draws[s[1]] or error(('sweep.random: unknown distribution %q for %s'):format(s[1], k), 2)
        v = f(u, s)
      end
      set_path(ov, k, v)
    end
    items[i] = { overrides = ov }
  end
  return space(items)
end


M.Space = Space
M.is_list, M.sorted_keys, M.deep_copy, M.deep_merge, M.set_path = is_list, sorted_keys, deep_copy, deep_merge, set_path

return M
