-- safetensors: torch.save / torch.load against themselves and against the real `safetensors`
-- Python package (files written by one are read by the other, bit for bit), clear errors for
-- damaged files, and atomic saves.
local torch = require 'torch'
local h = require 'helper'
local hr = require 'hostrun'

local dir = h.tmpdir()
local lua_file = dir .. '/from_lua.safetensors'
local py_file = dir .. '/from_python.safetensors'

-- Every dtype, odd shapes (0-dim, empty, non-contiguous) and edge values.
local function sample()
  return {
    ['w.f32'] = torch.tensor({{1.5, -2.25, 3e38}, {1e-3, -0.0, 1 / 0}}),
    ['w.f16'] = torch.tensor({0.1, 65504, -1, 6e-8}, {dtype = 'float16'}),
    ['w.bf16'] = torch.tensor({0.1, 3e38, -1, 1e-30}, {dtype = 'bfloat16'}),
    ['w.f64'] = torch.tensor({math.pi, -1e300, 5e-324}, {dtype = 'float64'}),
    ['ids'] = torch.tensor({0, -1, 151643, 2 ^ 62, -2 ^ 62}, {dtype = 'int64'}),
    ['i32'] = torch.tensor({2 ^ 31 - 1, -2 ^ 31, 7}, {dtype = 'int32'}),
    ['i16'] = torch.tensor({32767, -32768}, {dtype = 'int16'}),
    ['i8'] = torch.tensor({-128, 127, 0}, {dtype = 'int8'}),
    ['u8'] = torch.tensor({0, 200, 255}, {dtype = 'uint8'}),
    ['mask'] = torch.tensor({true, false, true}),
    ['scalar'] = torch.tensor(3.5),
    ['empty'] = torch.zeros(0, 3),
    ['transposed'] = torch.tensor({{1, 2, 3}, {4, 5, 6}}):t(),
  }
end
local META = {format = 'pt', note = 'written by qatlab', unicode = 'größe ✓'}

-- name|dtype|shape|values, values as exact decimal doubles: the same on both sides.
local function describe_tensor(name, t)
  local shape = {}
  for i = 1, t:dim() do shape[i] = tostring(t:size(i)) end
  return {name = name, dtype = t.dtype, shape = table.concat(shape, ','), values = t:double():reshape(-1):tolist()}
end
local function parse_number(s)
  if s == 'inf' then return 1 / 0 elseif s == '-inf' then return -1 / 0 elseif s == 'nan' then return 0 / 0 end
  return assert(tonumber(s), s)
end
local function same_number(a, b)
  if a ~= a then return b ~= b end
  return a == b and (a ~= 0 or 1 / a == 1 / b)   -- -0.0 stays -0.0
end
-- Python's description lines for one prefix → {name = {dtype=, shape=, values=}}
local function parse_python(out, prefix)
  local t = {}
  for line in out:gmatch('[^\n]+') do
    local p, name, dtype, shape, values = line:match('^([^|]*)|([^|]*)|([^|]*)|([^|]*)|(.*)$')
    if p == prefix then
      local vals = {}
      for v in values:gmatch('[^,]+') do vals[#vals + 1] = parse_number(v) end
      t[name] = {dtype = dtype, shape = shape, values = vals}
    end
  end
  return t
end
local function assert_same_tensor(name, want, got)
  assert.are.equal(want.dtype, got.dtype, name .. ': dtype')
  assert.are.equal(want.shape, got.shape, name .. ': shape')
  assert.are.equal(#want.values, #got.values, name .. ': element count')
  for i = 1, #want.values do
    assert(same_number(want.values[i], got.values[i]),
           ('%s[%d]: expected %.17g, got %.17g'):format(name, i, want.values[i], got.values[i]))
  end
end

-- One Python run: read qatlab's file, write its own, describe both.
local py
local function python()
  if py then return py end
  torch.save(lua_file, sample(), {metadata = META})
  local out = h.py(([[
import json, torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

def describe(prefix, d):
    for k in sorted(d):
        v = d[k]
        vals = v.flatten().double().tolist()
        print("|".join([prefix, k, str(v.dtype).replace("torch.", ""), ",".join(str(s) for s in v.shape),
                        ",".join(repr(float(x)) for x in vals)]))

describe("lua", load_file(%q))
with safe_open(%q, "pt") as f:
    print("meta|" + json.dumps(f.metadata(), sort_keys=True))

g = torch.Generator().manual_seed(0)
t = {
    "model.w.f32": torch.randn(3, 4, generator=g),
    "model.w.f16": torch.randn(5, generator=g).half(),
    "model.w.bf16": torch.randn(2, 2, generator=g).bfloat16(),
    "model.w.f64": torch.randn(3, generator=g).double(),
    "ids": torch.tensor([0, 151643, -1, 2**40, 2**62]),
    "i32": torch.tensor([1, -2, 2**31 - 1], dtype=torch.int32),
    "i16": torch.tensor([-32768, 5], dtype=torch.int16),
    "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
    "u8": torch.tensor([0, 200, 255], dtype=torch.uint8),
    "mask": torch.tensor([True, False, True, True]),
    "scalar": torch.tensor(-2.5),
    "empty": torch.zeros(0, 4),
    "special": torch.tensor([float("inf"), float("-inf"), -0.0, 1e-40, float("nan")]),
}
save_file(t, %q, metadata={"format": "pt", "origin": "python", "unicode": "größe ✓"})
describe("py", t)
]]):format(lua_file, lua_file, py_file))
  py = {lua = parse_python(out, 'lua'), py = parse_python(out, 'py'), meta = out:match('meta|([^\n]*)')}
  return py
end

describe('torch.save / torch.load', function()
  it('round-trips every dtype, shape and value, with metadata', function()
    local path = dir .. '/roundtrip.safetensors'
    local ts = sample()
    torch.save(path, ts, {metadata = META})
    local got, meta = torch.load(path), torch.load_metadata(path)
    assert.are.equal(1, select('#', torch.load(path)))   -- one result, metadata apart
    local n = 0
    for name, t in pairs(ts) do
      n = n + 1
      assert.truthy(got[name], 'missing ' .. name)
      assert_same_tensor(name, describe_tensor(name, t), describe_tensor(name, got[name]))
    end
    for name in pairs(got) do assert.truthy(ts[name], 'unexpected tensor ' .. name) end
    assert.are.equal(13, n)
    assert.are.same(META, meta)
  end)

  it('loads onto the device asked for and returns contiguous tensors', function()
    local path = dir .. '/device.safetensors'
    torch.save(path, sample())
    local got = torch.load(path, {device = 'cpu'})
    assert.are.equal('cpu', got['w.f32'].device)
    assert.is_true(got['transposed']:is_contiguous())
    h.close(got['transposed'], {{1, 4}, {2, 5}, {3, 6}})
  end)

  it('gives an empty metadata table when there is none, and the loaded tensors are independent of the file', function()
    local path = dir .. '/plain.safetensors'
    torch.save(path, {a = torch.ones(3)})
    local got, meta = torch.load(path), torch.load_metadata(path)
    assert.are.same({}, meta)
    os.remove(path)                       -- the data must not depend on the file any more
    torch.save(path, {a = torch.zeros(3)})
    h.close(got.a, {1, 1, 1})
    got.a:add_(1)                         -- and may be written to
    h.close(got.a, {2, 2, 2})
  end)
end)

describe('interoperability with the safetensors Python package', function()
  it('a file written by qatlab reads in Python with the same dtypes, shapes and values', function()
    local p = python()
    local n = 0
    for name, t in pairs(sample()) do
      n = n + 1
      assert.truthy(p.lua[name], 'Python did not see ' .. name)
      assert_same_tensor(name, describe_tensor(name, t), p.lua[name])
    end
    assert.are.equal(13, n)
  end)

  it('and its metadata too', function()
    assert.are.equal('{"format": "pt", "note": "written by qatlab", "unicode": "gr\\u00f6\\u00dfe \\u2713"}',
                     python().meta)
  end)

  it('a file written by Python reads with torch.load with the same dtypes, shapes and values', function()
    local p = python()
    local got, meta = torch.load(py_file), torch.load_metadata(py_file)
    local n = 0
    for name, want in pairs(p.py) do
      n = n + 1
      assert.truthy(got[name], 'torch.load did not return ' .. name)
      assert_same_tensor(name, want, describe_tensor(name, got[name]))
    end
    assert.are.equal(13, n)
    for name in pairs(got) do assert.truthy(p.py[name], 'unexpected tensor ' .. name) end
    assert.are.same({format = 'pt', origin = 'python', unicode = 'größe ✓'}, meta)
  end)
end)

describe('damaged files', function()
  local good
  local function bytes()
    if not good then
      local path = dir .. '/good.safetensors'
      torch.save(path, {a = torch.ones(4), b = torch.arange(0, 6):reshape(2, 3)}, {metadata = {k = 'v'}})
      good = hr.slurp(path)
    end
    return good
  end
  local function load_error(name, content)
    local path = dir .. '/' .. name
    hr.spit(path, content)
    local ok, e = pcall(torch.load, path)
    assert.is_false(ok, name .. ' loaded')
    assert.are.equal('string', type(e))
    hr.has(e, 'torch.load: ', 'message')
    hr.has(e, path, 'message')            -- names the file
    return e
  end

  it('a truncated file is a Lua error naming the file', function()
    local b = bytes()
    local e = load_error('truncated.safetensors', b:sub(1, #b - 5))
    assert.truthy(e:find('data', 1, true) or e:find('expected', 1, true), e)
    load_error('cut_in_header.safetensors', b:sub(1, 20))
    load_error('short.safetensors', 'abc')
    load_error('empty.safetensors', '')
  end)

  it('a corrupt header is a Lua error naming the file and the header', function()
    local b = bytes()
    local n = b:byte(1) + b:byte(2) * 256
    local e = load_error('garbage_header.safetensors', b:sub(1, 8) .. ('#'):rep(n) .. b:sub(9 + n))
    hr.has(e, 'header', 'message')
    -- a header length far beyond the file
    e = load_error('huge_length.safetensors', '\255\255\255\255\0\0\0\0' .. b:sub(9))
    hr.has(e, 'header', 'message')
    -- valid JSON, wrong content
    local hdr = '{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,999]}}'
    local len = string.char(#hdr % 256, math.floor(#hdr / 256), 0, 0, 0, 0, 0, 0)
    load_error('bad_offsets.safetensors', len .. hdr .. ('\0'):rep(16))
    hdr = '{"a":{"dtype":"F99","shape":[4],"data_offsets":[0,16]}}'
    len = string.char(#hdr % 256, math.floor(#hdr / 256), 0, 0, 0, 0, 0, 0)
    e = load_error('bad_dtype.safetensors', len .. hdr .. ('\0'):rep(16))
    hr.has(e, 'F99', 'message')
  end)

  it('a missing file is a Lua error naming it', function()
    local ok, e = pcall(torch.load, dir .. '/nope.safetensors')
    assert.is_false(ok)
    hr.has(e, dir .. '/nope.safetensors', 'message')
  end)
end)

describe('torch.save is atomic', function()
  local function listing(d)
    local p = io.popen('ls -A ' .. h.q(d))
    local names = {}
    for l in p:lines() do names[#names + 1] = l end
    p:close()
    table.sort(names)
    return names
  end

  it('leaves only the file behind, no temporary', function()
    local d = h.tmpdir()
    torch.save(d .. '/m.safetensors', sample())
    torch.save(d .. '/m.safetensors', {x = torch.ones(2)})   -- overwrite
    assert.are.same({'m.safetensors'}, listing(d))
    h.close(torch.load(d .. '/m.safetensors').x, {1, 1})
    hr.rmtree(d)
  end)

  it('errors when saving into a missing directory, creating nothing', function()
    local d = h.tmpdir()
    local ok, e = pcall(torch.save, d .. '/missing/m.safetensors', {x = torch.ones(2)})
    assert.is_false(ok)
    hr.has(e, d .. '/missing/m.safetensors', 'message')
    assert.are.same({}, listing(d))
    hr.rmtree(d)
  end)

  it('a failed save keeps the old file whole', function()
    local d = h.tmpdir()
    local path = d .. '/m.safetensors'
    torch.save(path, {x = torch.ones(3)})
    local freed = torch.ones(2)
    freed:free()
    for _, bad in ipairs{{x = 5}, {x = freed}, {[''] = torch.ones(1)}, {__metadata__ = torch.ones(1)}} do
      local ok, e = pcall(torch.save, path, bad)
      assert.is_false(ok, 'saved ' .. tostring(next(bad)))
      hr.has(e, path, 'message')
    end
    assert.are.same({'m.safetensors'}, listing(d))
    h.close(torch.load(path).x, {1, 1, 1})
    hr.rmtree(d)
  end)
end)

teardown(function() hr.rmtree(dir) end)
