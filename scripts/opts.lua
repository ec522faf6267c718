-- opts: the one options rule of the Lua toolkit: every constructor checks its table with opts.check, so an
-- unknown key names the closest known one and a value of the wrong type names the key, the expected and the found type.
--
--   opts.check(o, {total = 'number', warmup = 'number?', lr = 'number?'}, 'schedule.cosine')
--
-- A type spec is a Lua type name ('number', 'string', 'boolean', 'table', 'function', 'userdata'), 'integer',
-- 'tensor' (torch.is_tensor), 'callable' (a function or a table/userdata with __call) or 'any'; several joined by
-- '|' ('table|function'); a trailing '?' is accepted for readability (every option may be absent: the caller
-- supplies its default); a trailing '!' makes the key required. `false` is accepted for any option (Lua's "off":
-- the caller reads it as absent), except a required one.
local M = {}

-- Levenshtein distance between two strings (the "did you mean" suggestion).
function M.distance(a, b)
  local prev = {}
  for j = 0, #b do prev[j] = j end
  for i = 1, #a do
    local cur = {[0] = i}
    for j = 1, #b do
      local c = a:sub(i, i) == b:sub(j, j) and 0 or 1
      cur[j] = math.min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + c)
    end
    prev = cur
  end
  return prev[#b]
end

-- The known name closest to `name` (ties: the alphabetically first), or nil when `names` is empty.
function M.closest(name, names)
  local best, bd = nil, math.huge
  for _, n in ipairs(names) do
    local d = M.distance(tostring(name), n)
    if d < bd or (d == bd and n < best) then best, bd = n, d end
  end
  return best, bd
end

local function sorted_names(known)
  local names = {}
  for k in pairs(known) do names[#names + 1] = tostring(k) end
  table.sort(names)
  return names
end

local function is_tensor(v)
  local ok, torch = pcall(require, 'torch')
  return ok and type(torch) == 'table' and torch.is_tensor and torch.is_tensor(v) or false
end

local function matches(t, v)
  if t == 'any' or t == type(v) then return true end
  if t == 'integer' then return type(v) == 'number' and v % 1 == 0 end
  if t == 'tensor' then return is_tensor(v) end
  if t == 'callable' then
    if type(v) == 'function' then return true end
    local mt = (type(v) == 'table' or type(v) == 'userdata') and getmetatable(v)
    return type(mt) == 'table' and mt.__call ~= nil
  end
  return false
end

-- The found type as a user reads it: 'tensor' for a tensor, else Lua's type name.
local function found_type(v)
  if is_tensor(v) then return 'tensor' end
  return type(v)
end

-- Parses a spec into its alternatives and whether it is required.
local function parse(spec)
  if type(spec) ~= 'string' and type(spec) ~= 'table' then return {'any'}, false end   -- {key = true}: any value
  local s = type(spec) == 'table' and table.concat(spec, '|') or tostring(spec)
  local required = s:sub(-1) == '!'
  s = s:gsub('[!?]$', '')
  local alts = {}
  for t in s:gmatch('[^|%s]+') do alts[#alts + 1] = t end
  return alts, required
end

local function article(t) return (t:match('^[aeiou]') and 'an ' or 'a ') .. t end

-- Checks the options table `o` of `who` against `known` {key = spec}; returns o ({} for nil). Errors are raised
-- at the caller of `who` (level 3 from here) and read
--   schedule.cosine: unknown option "totl" (did you mean "total"?)
--   schedule.cosine: option "total" must be a number, got string
--   schedule.cosine: option "total" is required (a number)
function M.check(o, known, who, level)
  level = level or 3
  if o == nil then o = {} end
  if type(o) ~= 'table' then error(('%s: expected an options table, got %s'):format(who, type(o)), level) end
  local names
  for k, v in pairs(o) do
    local spec = known[k]
    if spec == nil then
      names = names or sorted_names(known)
      local best = M.closest(k, names)
      if type(k) ~= 'string' then
        error(('%s: unexpected positional value #%s in the options table (options are named: %s)')
          :format(who, tostring(k), table.concat(names, ', ')), level)
      end
      error(('%s: unknown option %q%s'):format(who, k, best and (' (did you mean %q?)'):format(best) or ''), level)
    end
    local alts, required = parse(spec)
    local ok = v == false and not required
    for _, t in ipairs(alts) do if matches(t, v) then ok = true; break end end
    if not ok then
      local want = {}
      for i, t in ipairs(alts) do want[i] = article(t) end
      error(('%s: option %q must be %s, got %s'):format(who, k, table.concat(want, ' or '), found_type(v)), level)
    end
  end
  for k, spec in pairs(known) do
    local alts, required = parse(spec)
    local v = o[k]
    local missing = v == nil
    if v == false then
      missing = true
      for _, t in ipairs(alts) do if matches(t, false) then missing = false end end
    end
    if required and missing then
      local want = {}
      for i, t in ipairs(alts) do want[i] = article(t) end
      error(('%s: option %q is required (%s)'):format(who, tostring(k), table.concat(want, ' or ')), level)
    end
  end
  return o
end

-- One value against one spec, outside an options table (positional arguments): `what` names it.
function M.check_value(v, spec, who, what, level)
  local alts = parse(spec)
  for _, t in ipairs(alts) do if matches(t, v) then return v end end
  local want = {}
  for i, t in ipairs(alts) do want[i] = article(t) end
  error(('%s: %s must be %s, got %s'):format(who, what, table.concat(want, ' or '), found_type(v)), level or 3)
end

return M
