-- config: merges a script's defaults with the --set values in `args`, refusing unknown keys
-- and wrong types, so a typo in a sweep is an error instead of a silently ignored setting.
local M = {}

local function merge(into, over, prefix)
  for k, v in pairs(over) do
    local key = prefix .. tostring(k)
    local cur = into[k]
    if cur == nil then
      local known = {}
      for name in pairs(into) do known[#known + 1] = prefix .. tostring(name) end
      table.sort(known)
      local near = require('opts').closest(key, known)
      error(('unknown setting %q (%sknown: %s)'):format(key, near and ('did you mean %q? '):format(near) or '',
        table.concat(known, ', ')), 0)
    elseif type(cur) == 'table' and type(v) == 'table' then
      merge(cur, v, key .. '.')
    elseif type(cur) ~= type(v) then
      error(('setting %q expects a %s, got %s %q'):format(key, type(cur), type(v), tostring(v)), 0)
    else
      into[k] = v
    end
  end
  return into
end

-- Returns a copy of defaults updated with overrides (args); nested tables merge by key.
function M.merge(defaults, overrides)
  local function copy(t)
    local c = {}
    for k, v in pairs(t) do c[k] = type(v) == 'table' and copy(v) or v end
    return c
  end
  return merge(copy(defaults), overrides or {}, '')
end

-- One line listing the settings, sorted, for logs.
function M.format(cfg)
  local keys = {}
  for k in pairs(cfg) do keys[#keys + 1] = k end
  table.sort(keys)
  local parts = {}
  for _, k in ipairs(keys) do
    local v = cfg[k]
    parts[#parts + 1] = k .. '=' .. (type(v) == 'table' and '{...}' or tostring(v))
  end
  return table.concat(parts, ' ')
end

return M
