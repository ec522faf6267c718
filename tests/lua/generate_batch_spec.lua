-- generate_batch: prompts of different lengths run as one left-padded batch (attention_mask, or
-- an array of id arrays padded by generate); each row equals generating its prompt alone.
local torch = require 'torch'
local nn = require 'nn'
local gguf = require 'gguf'
local tokenizers = require 'tokenizers'
local h = require 'helper'

local function tiny(model_type)
  torch.manual_seed(0)
  return nn.from_config{model_type = model_type, vocab_size = 97, hidden_size = 64, intermediate_size = 96,
                        num_hidden_layers = 2, num_attention_heads = 4, num_key_value_heads = 2,
                        max_position_embeddings = 64, tie_word_embeddings = true, initializer_range = 0.1}
end

local function errmsg(f, ...)
  local ok, err = pcall(f, ...)
  assert.is_false(ok, 'expected an error')
  return tostring(err)
end

local function alone(m, prompts, opts)
  local out = {}
  for i, p in ipairs(prompts) do
    local o = {input_ids = torch.tensor({p}, {dtype = 'int64'})}
    for k, v in pairs(opts) do o[k] = v end
    out[i] = m:generate(o)[1]
  end
  return out
end

local prompts = {{5, 9, 13}, {1, 2, 3, 4, 5, 6, 7}, {42}, {88, 7, 7, 30, 2}}

describe('model:generate on a padded batch', function()
  it('gives each row what its prompt alone gives (greedy, llama and qwen3)', function()
    for _, mt in ipairs{'llama', 'qwen3'} do
      local m = tiny(mt)
      m:eval()
      local want = alone(m, prompts, {max_new_tokens = 8})
      local got = m:generate{input_ids = prompts, max_new_tokens = 8}
      assert.are.equal(#prompts, #got)
      for i = 1, #prompts do assert.are.same(want[i], got[i], mt .. ' row ' .. i) end
      assert.are.equal(8 * #prompts, got.new_tokens)
      for _, k in ipairs{'tokens_per_second', 'prefill_seconds', 'decode_seconds'} do
        assert.is_true(type(got[k]) == 'number' and got[k] >= 0, k)
      end
    end
  end)

  it('takes a left-padded tensor with an attention_mask (pad values are never read)', function()
    local m = tiny('llama')
    m:eval()
    local want = alone(m, prompts, {max_new_tokens = 6, repetition_penalty = 1.5})
    local P = 7
    local ids, mask = torch.zeros({#prompts, P}, {dtype = 'int64'}), torch.zeros({#prompts, P}, {dtype = 'int64'})
    for i, p in ipairs(prompts) do
      for j = 1, P do
        local k = j - (P - #p)
        ids[i][j] = k >= 1 and p[k] or 96   -- a real token id as padding: the penalty must not see it
        mask[i][j] = k >= 1 and 1 or 0
      end
    end
    local got = m:generate{input_ids = ids, attention_mask = mask, max_new_tokens = 6, repetition_penalty = 1.5}
    for i = 1, #prompts do assert.are.same(want[i], got[i], 'row ' .. i) end
    -- a mask of ones is the plain path
    local full = m:generate{input_ids = torch.tensor({prompts[2]}, {dtype = 'int64'}), attention_mask = torch.ones({1, 7}), max_new_tokens = 6,
                            repetition_penalty = 1.5}
    assert.are.same(want[2], full[1])
  end)

  it('stops rows independently and samples per prompt', function()
    local m = tiny('qwen3')
    m:eval()
    local want = alone(m, prompts, {max_new_tokens = 6})
    local stop = want[2][3]
    local got = m:generate{input_ids = prompts, max_new_tokens = 6, stop = {stop}}
    for i = 1, #prompts do
      local w = {}
      for _, t in ipairs(want[i]) do
        w[#w + 1] = t
        if t == stop then break end
      end
      assert.are.same(w, got[i], 'row ' .. i)
    end
    local s = m:generate{input_ids = prompts, max_new_tokens = 4, num_samples = 2, temperature = 1, seed = 3}
    assert.are.equal(2 * #prompts, #s)
  end)

  it('reports bad masks', function()
    local m = tiny('llama')
    local ids = torch.tensor({{1, 2, 3}, {4, 5, 6}}, {dtype = 'int64'})
    local e = errmsg(m.generate, m, {input_ids = ids, attention_mask = torch.tensor({{1, 1, 0}, {1, 1, 1}})})
    assert.is_truthy(e:find('row 1 is not left-padded', 1, true), e)
    e = errmsg(m.generate, m, {input_ids = ids, attention_mask = torch.tensor({{0, 0, 0}, {1, 1, 1}})})
    assert.is_truthy(e:find('row 1 has no real token', 1, true), e)
    e = errmsg(m.generate, m, {input_ids = ids, attention_mask = torch.ones({2, 4})})
    assert.is_truthy(e:find('attention_mask: expected shape (2, 3)', 1, true), e)
    e = errmsg(m.generate, m, {input_ids = {{1}, {}}})
    assert.is_truthy(e:find('input_ids[2]: empty prompt', 1, true), e)
    e = errmsg(m.generate, m, {input_ids = {{1}, {2, 3}}, attention_mask = torch.ones({2, 2})})
    assert.is_truthy(e:find("'attention_mask': not allowed", 1, true), e)
  end)
end)

local gguf_path = h.source_dir .. '/.cache/models/smollm2-135m-instruct-q4_1.gguf'
local present = io.open(gguf_path, 'rb')
if present then present:close() end

describe('SmolLM2 batched chat prompts', function()
  if not present then
    pending('model not fetched: run tools/fetch_smollm2.sh')
    return
  end
  it('answers each prompt in a batch as it does alone', function()
    local tk = tokenizers.from_gguf(gguf_path)
    local tensors, config = gguf.load(gguf_path)
    local m = nn.from_config(config)
    m:load_state_dict(tensors)
    m:eval()
    local qs = {'What is the capital of France?', 'Name a colour.', 'Write one short sentence about the sea and the sky.'}
    local ps = {}
    for i, q in ipairs(qs) do
      ps[i] = tk:apply_chat_template({{role = 'user', content = q}}, {add_generation_prompt = true, tokenize = true})
    end
    local stop = {tk:token_to_id('<|im_end|>')}
    local want = alone(m, ps, {max_new_tokens = 10, stop = stop})
    local got = m:generate{input_ids = ps, max_new_tokens = 10, stop = stop, pad_token_id = tk.pad_token_id}
    for i = 1, #ps do assert.are.same(want[i], got[i], 'prompt ' .. i .. ': ' .. tk:decode(got[i])) end
    assert.is_truthy(tk:decode(got[1]):find('Paris', 1, true), tk:decode(got[1]))
  end)
end)
