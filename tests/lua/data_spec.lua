-- data: the Lua API over lib/data: readers, alpaca thinking modes, packing with a real tokenizer,
-- seeded shuffles and splits, golf token shards (round trip, errors), the KJV corpus.
local torch = require 'torch'
local data = require 'data'
local tokenizers = require 'tokenizers'
local h = require 'helper'

local function eq(a, b) return a:equal(b) end
local function shape(t)
  local s, r = t:size(), {}
  for i = 1, #s do r[i] = s[i] end
  return r
end
local function dtype(t) return (tostring(t.dtype):gsub('^torch%.', '')) end

local shared = h.test_data   -- tools/fetch_test_data.sh

local function errmsg(f, ...)
  local ok, err = pcall(f, ...)
  assert.is_false(ok, 'expected an error')
  return tostring(err)
end

local function tmpdir()
  local d = os.tmpname()
  os.remove(d)
  assert(os.execute('mkdir -p ' .. h.q(d)) == 0 or true)
  return d
end

local function write(path, text)
  local f = assert(io.open(path, 'wb'))
  f:write(text)
  f:close()
end

describe('data readers', function()
  it('reads files and folders (recursive, sorted) and JSONL fields', function()
    local d = tmpdir()
    os.execute('mkdir -p ' .. h.q(d .. '/sub'))
    write(d .. '/b.txt', 'second')
    write(d .. '/a.txt', 'first')
    write(d .. '/sub/c.txt', 'third')
    assert.are.same({'first', 'second', 'third'}, data.read_text(d))
    assert.are.same({'first'}, data.read_text(d .. '/a.txt'))
    write(d .. '/t.jsonl', '{"text": " hi "}\n{"text": "there", "body": "b"}\n')
    assert.are.same({'hi', 'there'}, data.read_jsonl(d .. '/t.jsonl'))
    local e = errmsg(data.read_jsonl, d .. '/t.jsonl', {field = 'body'})
    assert.is_truthy(e:find('t.jsonl:1', 1, true), e)
    assert.is_truthy(e:find('data.read_jsonl', 1, true), e)
    assert.is_truthy(errmsg(data.read_text, d .. '/missing'):find('missing', 1, true))
    os.execute('rm -rf ' .. h.q(d))
  end)

  it('renders alpaca data in every thinking mode', function()
    local d = tmpdir()
    write(d .. '/a.json', '[{"instruction": "Name a colour.", "input": "One word.", "output": " Blue "}]')
    local f = '<|im_start|>user\nName a colour.\n\nOne word.<|im_end|>\n<|im_start|>assistant\nBlue<|im_end|>\n'
    local t = '<|im_start|>user\nName a colour.\n\nOne word.<|im_end|>\n' ..
              '<|im_start|>assistant\n<think>\n\n</think>\n\nBlue<|im_end|>\n'
    local raw = 'Name a colour.\n\nOne word.\n\nBlue'
    assert.are.same({f}, data.read_alpaca(d .. '/a.json'))
    assert.are.same({f}, data.read_alpaca(d .. '/a.json', {thinking = 'false'}))
    assert.are.same({t}, data.read_alpaca(d .. '/a.json', {thinking = 'true'}))
    assert.are.same({f, t}, data.read_alpaca(d .. '/a.json', {thinking = 'both'}))
    assert.are.same({raw}, data.read_alpaca(d .. '/a.json', {thinking = 'none'}))
    assert.are.same({t, f, raw}, data.read_alpaca(d .. '/a.json', {thinking = 'all'}))
    assert.are.same({f}, data.alpaca_render({instruction = 'Name a colour.', input = 'One word.', output = 'Blue'}))
    assert.is_truthy(errmsg(data.read_alpaca, d .. '/a.json', {thinking = 'maybe'}):find('maybe', 1, true))
    os.execute('rm -rf ' .. h.q(d))
  end)
end)

describe('data.pack', function()
  it('packs like the seed: no specials, eos appended, remainder dropped', function()
    local tk = tokenizers.gpt2(shared .. '/gpt2-bpe/encoder.json', shared .. '/gpt2-bpe/vocab.bpe')
    local texts = {'Hello world, this is a test.', 'Second document', 'x'}
    local stream = {}
    for _, s in ipairs(texts) do
      for _, id in ipairs(tk:encode(s)) do stream[#stream + 1] = id end
      stream[#stream + 1] = 50256
    end
    local p = data.pack(tk, texts, {L = 4})
    assert.are.equal('int64', dtype(p))
    local n = math.floor(#stream / 4)
    assert.are.same({n, 4}, shape(p))
    local want = {}
    for i = 1, n * 4 do want[i] = stream[i] end
    assert.are.same(want, p:reshape(-1):totable())
    -- An explicit eos, a single string.
    local q = data.pack(tk, 'ab', {L = 1, eos = 7})
    assert.are.equal(7, q[{-1, 1}]:item())
  end)
end)

describe('data.shuffle / data.split', function()
  it('is deterministic per seed and keeps every row', function()
    local t = torch.arange(0, 20):reshape(10, 2)
    local a, b = data.shuffle(t, {seed = 3}), data.shuffle(t, {seed = 3})
    assert.is_true(eq(a, b))
    assert.is_false(eq(a, data.shuffle(t, {seed = 4})))
    assert.are.same(torch.arange(0, 20):totable(), a:reshape(-1):sort():totable())
    local train, held = data.split(t, {fraction = 0.2, seed = 1})
    assert.are.equal(8, train:size(1))
    assert.are.equal(2, held:size(1))
    local all = torch.cat({train, held}, 1):reshape(-1):sort()
    assert.are.same(torch.arange(0, 20):totable(), all:totable())
    local p = data.permutation(5, {seed = 9})
    assert.are.same({0, 1, 2, 3, 4}, p:sort():totable())
  end)
end)

describe('data shards', function()
  it('round-trips and reads a numpy-written file', function()
    local d = tmpdir()
    local ids = torch.tensor({0, 1, 65535, 42}, {dtype = 'int64'})
    data.write_shard(d .. '/s.bin', ids)
    assert.is_true(eq(ids, data.read_shard(d .. '/s.bin')))
    local py = ([[
import numpy as np
h = np.zeros(256, dtype='<i4'); h[0] = 20240520; h[1] = 1; h[2] = 3
open(%q, 'wb').write(h.tobytes() + np.array([5, 6, 60000], dtype='<u2').tobytes())
]]):format(d .. '/np.bin')
    write(d .. '/w.py', py)
    local rc = h.sh(h.q(h.python) .. ' ' .. h.q(d .. '/w.py'))
    assert.are.equal(0, rc)
    assert.are.same({5, 6, 60000}, data.read_shard(d .. '/np.bin'):totable())
    write(d .. '/bad.bin', string.rep('\0', 1030))
    local e = errmsg(data.read_shard, d .. '/bad.bin')
    assert.is_truthy(e:find('bad.bin', 1, true), e)
    assert.is_truthy(e:find('magic', 1, true), e)
    e = errmsg(data.write_shard, d .. '/big.bin', torch.tensor({70000}, {dtype = 'int64'}))
    assert.is_truthy(e:find('65535', 1, true), e)
    os.execute('rm -rf ' .. h.q(d))
  end)
end)

describe('data.kjv_text', function()
  it('reads the King James Bible from bible-kjv, cached', function()
    if os.execute('command -v bible >/dev/null 2>&1') ~= 0 then
      pending('bible-kjv not installed')
      return
    end
    local d = tmpdir()
    local text = data.kjv_text({cache_dir = d})
    assert.are.equal(1, text:find('In the beginning God created the heaven and the earth.\n', 1, true))
    assert.is_true(#text > 4000000)
    assert.are.equal(d .. '/kjv.txt', data.kjv_path({cache_dir = d}))
    assert.are.same({text}, data.read_text(d .. '/kjv.txt'))
    os.execute('rm -rf ' .. h.q(d))
  end)
end)
