-- sweep_key: a trial's identity: a 16-hex-digit hash of canonical JSON (the resolved configuration and seed)
-- and the Hydra-style run name 'lr=0.001,rank=8' of its overrides.
local json = require 'json'
local bit = require 'bit'
local space = require 'sweep_space'

local M = {}
local sorted_keys = space.sorted_keys

-- FNV-1a, 32 bits: h * 16777619 = h * 2^24 + h * 403, kept exact in doubles.
function M.fnv1a32(s, h)
  h = h or 2166136261
  for i = 1, #s do
    h = bit.bxor(h, s:byte(i)) % 2 ^ 32
    h = ((h % 256) * 2 ^ 24 + h * 403) % 2 ^ 32
  end
  return h
end

local function mul32(a, b) return (a % 65536 * b + math.floor(a / 65536) * b % 65536 * 65536) % 2 ^ 32 end

-- murmur3's finalizer, so that inputs differing in their last bytes differ in every digit.
local function fmix32(h)
  h = mul32(bit.bxor(h, bit.rshift(h, 16)) % 2 ^ 32, 0x85ebca6b)
  h = mul32(bit.bxor(h, bit.rshift(h, 13)) % 2 ^ 32, 0xc2b2ae35)
  return bit.bxor(h, bit.rshift(h, 16)) % 2 ^ 32
end

-- A 16-hex-digit id from the canonical JSON: FNV-1a of the text and of its reverse, each finalized.
function M.hash(v)
  local s = json.encode(v)
  return ('%08x%08x'):format(fmix32(M.fnv1a32(s)), fmix32(M.fnv1a32(s:reverse(), 3735928559)))
end

function M.value_text(v)
  if v == nil then return '' end
  if type(v) == 'number' then return json.number(v) end
  if type(v) == 'table' then return json.encode(v) end
  return tostring(v)
end

-- The override_dirname: 'lr=0.001,rank=8' (sorted dotted keys), 'base' when empty.
function M.run_name(overrides)
  local flat, parts = space.flatten(overrides), {}
  for _, k in ipairs(sorted_keys(flat)) do parts[#parts + 1] = k .. '=' .. M.value_text(flat[k]) end
  return #parts > 0 and table.concat(parts, ',') or 'base'
end


return M
