-- kd_cache: kd.build_cache from a tiny random teacher equals the teacher's own top-k, resume, and
-- kd.open_cache batches (seeded shuffles, every row once per epoch, meta, errors).
local torch = require 'torch'
local nn = require 'nn'
local h = require 'helper'

local function eq(a, b) return a:equal(b) end
local function shape(t)
  local s, r = t:size(), {}
  for i = 1, #s do r[i] = s[i] end
  return r
end
local function dtype(t) return (tostring(t.dtype):gsub('^torch%.', '')) end

local has_kd, kd = pcall(require, 'kd')

local function tiny_teacher()
  torch.manual_seed(0)
  return nn.from_config({model_type = 'qwen3', vocab_size = 97, hidden_size = 32, intermediate_size = 48,
                         num_hidden_layers = 2, num_attention_heads = 4, num_key_value_heads = 2, head_dim = 16,
                         max_position_embeddings = 64, tie_word_embeddings = true, initializer_range = 0.5})
end

local function tmpdir()
  local d = os.tmpname()
  os.remove(d)
  return d
end

local function read_all(r)
  local out = {}
  while true do
    local b = r:next()
    if not b then return out end
    out[#out + 1] = b
  end
end

describe('kd cache', function()
  if not has_kd or not kd.build_cache then
    it('needs the kd module', function() pending('kd module not built yet') end)
    return
  end

  local teacher = tiny_teacher()
  torch.manual_seed(1)
  local ids = torch.randint(0, 97, {10, 9}, {dtype = 'int64'})

  it('builds shards with the teacher top-k and reads them back', function()
    local dir = tmpdir()
    local seen = {}
    local res = kd.build_cache{teacher = teacher, data = ids, K = 5, R = 3, shard_size = 4, out = dir, seed = 7,
                               on_progress = function(done, total, sps)
                                 seen[#seen + 1] = done
                                 assert.are.equal(10, total)
                                 assert.is_true(sps >= 0)
                               end}
    assert.is_true(res.done)
    assert.are.equal(10, res.n_written)
    assert.are.same({4, 8, 10}, seen)

    local r = kd.open_cache(dir, {batch_size = 10, shuffle = false, device = 'cpu'})
    local m = r:meta()
    assert.are.equal('qwen_kd_topk_cache_v1', m.format)
    assert.are.equal(9, m.max_length)
    assert.are.equal(5, m.top_k)
    assert.are.equal(3, m.rand_neg)
    assert.are.equal(10, m.total_rows)
    local b = r:next()
    assert.is_nil(r:next())
    assert.are.equal('int32', dtype(b.input_ids))
    assert.are.equal('uint8', dtype(b.attention_mask))
    assert.are.equal('float16', dtype(b.topk_logits))
    assert.are.same({10, 8, 3}, shape(b.rand_idx))
    assert.is_true(eq(b.input_ids:long(), ids))
    local logits = teacher:forward(ids):narrow(2, 1, 8)
    local vals, idx = logits:topk(5)
    assert.is_true(eq(b.topk_idx:long(), idx))
    assert.is_true(eq(b.topk_logits, vals:half()))
    assert.is_true(eq(b.rand_logits, logits:gather(3, b.rand_idx:long()):half()))
    r:close()
    os.execute('rm -rf ' .. h.q(dir))
  end)

  it('shuffles deterministically and covers every row once per epoch', function()
    local dir = tmpdir()
    kd.build_cache{teacher = teacher, data = ids, K = 4, shard_size = 3, out = dir}
    local function epoch_rows(r)
      local rows = {}
      for _, b in ipairs(read_all(r)) do rows[#rows + 1] = b.input_ids end
      return torch.cat(rows, 1):long()
    end
    local a = epoch_rows(kd.open_cache(dir, {batch_size = 4, seed = 3, prefetch = 3}))
    local b = epoch_rows(kd.open_cache(dir, {batch_size = 4, seed = 3}))
    local c = epoch_rows(kd.open_cache(dir, {batch_size = 4, seed = 4}))
    assert.is_true(eq(a, b))
    assert.is_false(eq(a, c))
    assert.is_false(eq(a, ids))
    -- The same multiset of rows as the data.
    local key = function(t) return (t * torch.arange(1, 10):view(1, 9)):sum(2):reshape(-1):sort() end
    assert.is_true(eq(key(a), key(ids)))
    local r = kd.open_cache(dir, {batch_size = 4, seed = 3})
    read_all(r)
    r:reset()
    local e1 = epoch_rows(r)
    assert.is_false(eq(e1, a))
    assert.is_true(eq(key(e1), key(ids)))
    r:reset(0)
    assert.is_true(eq(epoch_rows(r), a))
    os.execute('rm -rf ' .. h.q(dir))
  end)

  it('records the teacher and tokenizer, and refuses a model or tokenizer that differs', function()
    local tokenizers = require 'tokenizers'
    local json = require 'json'
    local qwen = h.test_data .. '/qwen3-tokenizer'
    local present = io.open(qwen .. '/tokenizer.json')
    local tk = present and tokenizers.from_file(qwen)
    if present then present:close() end
    local dir = tmpdir()
    kd.build_cache{teacher = teacher, data = ids, K = 4, shard_size = 5, out = dir, tokenizer = tk or nil}
    local meta = kd.open_cache(dir, {model = teacher, device = 'cpu'}):meta()
    assert.are.equal('qwen3 (2 layers, hidden 32, vocab 97)', meta.teacher_model)
    assert.is_truthy(meta.teacher_fingerprint:find('^qwen3 L2 H32 V97 fnv1a:%x+$'), meta.teacher_fingerprint)
    if tk then
      assert.are.equal(qwen, meta.tokenizer)
      assert.are.equal(151669, meta.tokenizer_vocab_size)
      assert.is_truthy(meta.tokenizer_fingerprint:find('^V151669 fnv1a:%x+$'))
      kd.open_cache(dir, {tokenizer = tk, device = 'cpu'}):close()
      local gpt2 = h.test_data .. '/gpt2-bpe'
      local other = tokenizers.gpt2(gpt2 .. '/encoder.json', gpt2 .. '/vocab.bpe')
      local ok, err = pcall(kd.open_cache, dir, {tokenizer = other})
      assert.is_false(ok)
      assert.is_truthy(tostring(err):find('of 151669 tokens, option \'tokenizer\' has 50257', 1, true), tostring(err))
    end
    -- a student with another vocabulary: both sizes named, on open and on reader:check
    torch.manual_seed(0)
    local other = nn.from_config({model_type = 'qwen3', vocab_size = 101, hidden_size = 32, intermediate_size = 48,
                                  num_hidden_layers = 1, num_attention_heads = 4, num_key_value_heads = 2, head_dim = 16})
    local ok, err = pcall(kd.open_cache, dir, {model = other})
    assert.is_false(ok)
    assert.is_truthy(tostring(err):find(dir .. '/meta.json: vocab_size: the cache\'s teacher (qwen3 (2 layers, hidden 32, vocab 97)) has 97 tokens, option \'model\' has 101', 1, true), tostring(err))
    local r = kd.open_cache(dir, {device = 'cpu'})
    r:check{model = teacher}
    ok, err = pcall(r.check, r, {model = other})
    assert.is_false(ok)
    assert.is_truthy(tostring(err):find('has 97 tokens', 1, true), tostring(err))
    r:close()
    -- resume with another teacher of the same shape is refused by its fingerprint
    torch.manual_seed(5)
    local t2 = nn.from_config({model_type = 'qwen3', vocab_size = 97, hidden_size = 32, intermediate_size = 48,
                               num_hidden_layers = 2, num_attention_heads = 4, num_key_value_heads = 2, head_dim = 16,
                               tie_word_embeddings = true, initializer_range = 0.5})
    ok, err = pcall(kd.build_cache, {teacher = t2, data = ids, K = 4, shard_size = 5, out = dir})
    assert.is_false(ok)
    assert.is_truthy(tostring(err):find('teacher_fingerprint', 1, true), tostring(err))
    -- an older cache without the fields still loads, and the checks it cannot make pass
    local f = assert(io.open(dir .. '/meta.json'))
    local m = json.decode(f:read('*a'))
    f:close()
    for _, k in ipairs{'teacher_fingerprint', 'tokenizer_vocab_size', 'tokenizer_fingerprint'} do m[k] = nil end
    m.teacher_model, m.tokenizer = '', ''
    f = assert(io.open(dir .. '/meta.json', 'w'))
    f:write(json.encode(m))
    f:close()
    r = kd.open_cache(dir, {model = teacher, device = 'cpu'})
    assert.is_truthy(r:next())
    r:close()
    if tk then   -- without the tokenizer's record, a tokenizer larger than the teacher's vocabulary is refused
      ok, err = pcall(kd.open_cache, dir, {tokenizer = tk})
      assert.is_false(ok)
      assert.is_truthy(tostring(err):find("teacher has 97 tokens, option 'tokenizer' has 151669", 1, true), tostring(err))
    end
    os.execute('rm -rf ' .. h.q(dir))
  end)

  it('names the file on errors', function()
    local ok, err = pcall(kd.open_cache, tmpdir())
    assert.is_false(ok)
    assert.is_truthy(tostring(err):find('meta.json', 1, true), tostring(err))
    ok, err = pcall(kd.build_cache, {teacher = teacher, data = ids, K = 500, out = tmpdir()})
    assert.is_false(ok)
    assert.is_truthy(tostring(err):find('K', 1, true), tostring(err))
  end)
end)
