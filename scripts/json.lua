-- json: a small canonical JSON encoder (sorted keys, shortest round-trip numbers) and a strict
-- decoder, for configs, run ledgers and metrics.jsonl. Strings are passed through as bytes (no UTF-8 check).
local M = {}

-- json.null stands for JSON null inside arrays and objects (a Lua nil cannot be stored in a table).
M.null = setmetatable({}, { __tostring = function() return 'null' end })

local escapes = { ['"'] = '\\"', ['\\'] = '\\\\', ['\b'] = '\\b', ['\f'] = '\\f',
                  ['\n'] = '\\n', ['\r'] = '\\r', ['\t'] = '\\t' }

local function encode_string(s)
  return '"' .. s:gsub('[%c"\\]', function(c)
    return escapes[c] or (c:byte() < 32 and ('\\u%04x'):format(c:byte())) or c
  end) .. '"'
end

-- Numbers: integers (|x| < 2^53) without exponent or fraction; others the shortest of
-- %.15g/%.16g/%.17g that reads back to the same double, so the text is canonical.
function M.number(x)
  if x ~= x or x == math.huge or x == -math.huge then
    error(('json: cannot encode %s (NaN/Inf is not JSON)'):format(tostring(x)), 0)
  end
  if x == math.floor(x) and math.abs(x) < 2 ^ 53 then return ('%d'):format(x) end
  for _, p in ipairs({ '%.15g', '%.16g' }) do
    local s = p:format(x)
    if tonumber(s) == x then return s end
  end
  return ('%.17g'):format(x)
end

-- An array is a table whose keys are exactly 1..n (n > 0); an empty table is an object {}.
local function is_array(t)
  local n = 0
  for _ in pairs(t) do n = n + 1 end
  if n == 0 then return false end
  for i = 1, n do if t[i] == nil then return false end end
  return true, n
end

local function encode(v, seen, out)
  local tv = type(v)
  if v == nil or v == M.null then out[#out + 1] = 'null'
  elseif tv == 'boolean' then out[#out + 1] = tostring(v)
  elseif tv == 'number' then out[#out + 1] = M.number(v)
  elseif tv == 'string' then out[#out + 1] = encode_string(v)
  elseif tv == 'table' then
    if seen[v] then error('json: cannot encode a table that contains itself (cycle)', 0) end
    seen[v] = true
    local arr, n = is_array(v)
    if arr then
      out[#out + 1] = '['
      for i = 1, n do
        if i > 1 then out[#out + 1] = ',' end
        encode(v[i], seen, out)
      end
      out[#out + 1] = ']'
    else
      local keys, by_name = {}, {}
      for k in pairs(v) do
        local tk = type(k)
        if tk ~= 'string' and tk ~= 'number' then
          error(('json: object keys must be strings or numbers, got a %s'):format(tk), 0)
        end
        local name = tk == 'number' and M.number(k) or k
        if by_name[name] ~= nil then error(('json: duplicate object key %q'):format(name), 0) end
        by_name[name] = k
        keys[#keys + 1] = name
      end
      table.sort(keys)
      out[#out + 1] = '{'
      for i, name in ipairs(keys) do
        if i > 1 then out[#out + 1] = ',' end
        out[#out + 1] = encode_string(name)
        out[#out + 1] = ':'
        encode(v[by_name[name]], seen, out)
      end
      out[#out + 1] = '}'
    end
    seen[v] = nil
  else
    error(('json: cannot encode a %s'):format(tv), 0)
  end
end

-- Encodes v as one line of canonical JSON.
function M.encode(v)
  local out = {}
  encode(v, {}, out)
  return table.concat(out)
end

-- Decoder ---------------------------------------------------------------------------------

local function fail(s, i, what)
  error(('json: %s at position %d near %q'):format(what, i, s:sub(i, i + 10)), 0)
end

local function skip(s, i) return s:find('[^ \t\r\n]', i) or #s + 1 end

local function utf8(cp)
  if cp < 0x80 then return string.char(cp) end
  if cp < 0x800 then return string.char(0xC0 + math.floor(cp / 64), 0x80 + cp % 64) end
  if cp < 0x10000 then
    return string.char(0xE0 + math.floor(cp / 4096), 0x80 + math.floor(cp / 64) % 64, 0x80 + cp % 64)
  end
  return string.char(0xF0 + math.floor(cp / 262144), 0x80 + math.floor(cp / 4096) % 64,
                     0x80 + math.floor(cp / 64) % 64, 0x80 + cp % 64)
end

local unescape = { ['"'] = '"', ['\\'] = '\\', ['/'] = '/', b = '\b', f = '\f', n = '\n', r = '\r', t = '\t' }

local function decode_string(s, i)
  local parts, j = {}, i + 1
  while true do
    local k = s:find('["\\%c]', j)
    if not k then fail(s, i, 'unterminated string') end
    parts[#parts + 1] = s:sub(j, k - 1)
    local c = s:sub(k, k)
    if c == '"' then return table.concat(parts), k + 1 end
    if c ~= '\\' then fail(s, k, 'control character in string') end
    local e = s:sub(k + 1, k + 1)
    if e == 'u' then
      local hex = s:match('^%x%x%x%x', k + 2)
      if not hex then fail(s, k, 'bad \\u escape') end
      local cp, nxt = tonumber(hex, 16), k + 6
      if cp >= 0xD800 and cp <= 0xDBFF then
        local lo = s:match('^\\u(%x%x%x%x)', nxt)
        lo = lo and tonumber(lo, 16)
        if not lo or lo < 0xDC00 or lo > 0xDFFF then fail(s, k, 'unpaired surrogate') end
        cp, nxt = 0x10000 + (cp - 0xD800) * 1024 + (lo - 0xDC00), nxt + 6
      end
      parts[#parts + 1] = utf8(cp)
      j = nxt
    elseif unescape[e] then
      parts[#parts + 1] = unescape[e]
      j = k + 2
    else
      fail(s, k, 'bad escape')
    end
  end
end

local decode_value

local function decode_container(s, i, close)
  local t, n = {}, 0
  i = skip(s, i + 1)
  if s:sub(i, i) == close then return t, i + 1 end
  while true do
    if close == '}' then
      if s:sub(i, i) ~= '"' then fail(s, i, 'expected a string key') end
      local k
      k, i = decode_string(s, i)
      i = skip(s, i)
      if s:sub(i, i) ~= ':' then fail(s, i, "expected ':'") end
      t[k], i = decode_value(s, skip(s, i + 1))
    else
      n = n + 1
      t[n], i = decode_value(s, i)
    end
    i = skip(s, i)
    local c = s:sub(i, i)
    if c == close then return t, i + 1 end
    if c ~= ',' then fail(s, i, "expected ',' or '" .. close .. "'") end
    i = skip(s, i + 1)
  end
end

local literals = { ['true'] = true, ['false'] = false }

decode_value = function(s, i)
  local c = s:sub(i, i)
  if c == '{' then return decode_container(s, i, '}') end
  if c == '[' then return decode_container(s, i, ']') end
  if c == '"' then return decode_string(s, i) end
  local int = s:match('^-?%d+', i)
  if int then
    if int:match('^-?0%d') then fail(s, i, 'leading zero in number') end
    local j = i + #int
    local frac = s:match('^%.%d+', j) or ''
    if frac == '' and s:sub(j, j) == '.' then fail(s, i, 'bad number') end
    j = j + #frac
    local exp = s:match('^[eE][-+]?%d+', j) or ''
    if exp == '' and s:match('^[eE]', j) then fail(s, i, 'bad number') end
    j = j + #exp
    return tonumber(s:sub(i, j - 1)), j
  end
  for word, v in pairs(literals) do
    if s:sub(i, i + #word - 1) == word then return v, i + #word end
  end
  if s:sub(i, i + 3) == 'null' then return M.null, i + 4 end
  fail(s, i, 'unexpected character')
end

-- Decodes one JSON text; null becomes json.null. Errors name the position.
function M.decode(s)
  local v, i = decode_value(s, skip(s, 1))
  i = skip(s, i)
  if i <= #s then fail(s, i, 'trailing characters') end
  return v
end

return M
