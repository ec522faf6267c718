-- tokenizers: the Lua API over lib/tokenizer: Qwen3 golden ids, GPT-2, tensors in and out,
-- special ids, SentencePiece training and loading, the Qwen3 chat format, errors.
local torch = require 'torch'
local tokenizers = require 'tokenizers'
local h = require 'helper'

local data = h.test_data   -- tools/fetch_test_data.sh
local qwen_dir = data .. '/qwen3-tokenizer'

local qwen
local function q()
  qwen = qwen or tokenizers.from_file(qwen_dir)
  return qwen
end

local function errmsg(f, ...)
  local ok, err = pcall(f, ...)
  assert.is_false(ok, 'expected an error')
  return tostring(err)
end

describe('tokenizers.from_file (Qwen3)', function()
  it('reproduces the golden sample ids', function()
    local f = assert(io.open(qwen_dir .. '/golden_sample.json'))
    local text = f:read('*a')
    f:close()
    -- The one golden entry checked here, the rest in the C++ suite; the ids are 0-based data.
    assert.is_truthy(text:find('"Hello, my dog is cute"', 1, true))
    assert.are.same({9707, 11, 847, 5562, 374, 18838}, q():encode('Hello, my dog is cute'))
    assert.are.same({151644, 872, 198, 13048, 1052, 151645},
                    q():encode('<|im_start|>user\nHi there<|im_end|>'))
  end)

  it('accepts the tokenizer.json path as well as its directory', function()
    local tk = tokenizers.from_file(qwen_dir .. '/tokenizer.json')
    assert.are.same(q():encode('same ids'), tk:encode('same ids'))
  end)

  it('exposes vocabulary size, special ids and token lookups', function()
    local tk = q()
    assert.are.equal(151669, tk:vocab_size())
    assert.are.equal(151645, tk.eos_token_id)
    assert.are.equal(151643, tk.pad_token_id)
    assert.is_nil(tk.bos_token_id)
    assert.are.equal('bpe', tk.kind)
    assert.are.equal(9707, tk:token_to_id('Hello'))
    assert.is_nil(tk:token_to_id('not a token at all'))
    assert.are.equal('Ġworld', tk:id_to_token(1879))
    assert.are.equal(' world', tk:token_bytes(1879))
    assert.is_true(tk:is_special(151645))
    assert.is_false(tk:is_special(151667))
    assert.is_truthy(tostring(tk):find('Tokenizer%(bpe, vocab 151669%)'))
  end)

  it('round-trips mixed text (NFD input comes back NFC)', function()
    local tk = q()
    for _, s in ipairs{'plain English, with punctuation!', '中文测试 日本語 한국어', 'emoji 😀🚀 ok',
                       'code:\n\tif x:\n\t\treturn  y\n\n', '<|im_start|>user\nhi<|im_end|>\n', ''} do
      assert.are.equal(s, tk:decode(tk:encode(s)))
    end
    assert.are.equal('café', tk:decode(tk:encode('cafe\204\129')))
  end)

  it('returns and decodes int64 tensors', function()
    local tk = q()
    local t = tk:encode('Hello, my dog is cute', {return_tensor = true})
    assert.are.equal('int64', t.dtype)
    assert.are.same({9707, 11, 847, 5562, 374, 18838}, t:totable())
    assert.are.equal('Hello, my dog is cute', tk:decode(t))
    assert.are.equal('Hello', tk:decode(torch.tensor({9707}, {dtype = 'int32'})))
  end)

  it('skips special tokens on request and encodes batches', function()
    local tk = q()
    local ids = tk:encode('<|im_start|>user\nHi<|im_end|>')
    assert.are.equal('user\nHi', tk:decode(ids, {skip_special_tokens = true}))
    assert.are.equal('<|im_start|>user\nHi<|im_end|>', tk:decode(ids))
    assert.are.same({tk:encode('a b'), tk:encode('c')}, tk:encode({'a b', 'c'}))
    assert.are.same(tk:encode('x'), tk:encode('x', {add_special_tokens = true}))
  end)
end)

describe('tokenizers.gpt2', function()
  it('gives the known GPT-2 ids', function()
    local tk = tokenizers.gpt2(data .. '/gpt2-bpe/encoder.json', data .. '/gpt2-bpe/vocab.bpe')
    assert.are.same({15496, 995}, tk:encode('Hello world'))
    assert.are.same({18435}, tk:encode(' Hello'))
    assert.are.equal(50256, tk.eos_token_id)
    assert.are.equal(50257, tk:vocab_size())
    assert.are.equal('Hello world', tk:decode({15496, 995}))
  end)
end)

describe('tokenizers.train_sentencepiece', function()
  it('trains, loads and round-trips a small BPE model', function()
    local dir = h.tmpdir()
    local model = tokenizers.train_sentencepiece{
      input = '/usr/share/common-licenses/GPL-3', model_prefix = dir .. '/gpl', vocab_size = 400,
      model_type = 'bpe', character_coverage = 1.0,
    }
    assert.are.equal(dir .. '/gpl.model', model)
    local tk = tokenizers.sentencepiece(model)
    assert.are.equal('sentencepiece', tk.kind)
    assert.are.equal(400, tk:vocab_size())
    assert.are.equal(2, tk.eos_token_id)
    local s = 'This program is free software.'
    local ids = tk:encode(s)
    assert.are.equal(s, tk:decode(ids))
    assert.are.equal(1, tk:encode(s, {add_special_tokens = true})[1])
    -- the same ids as the spm_encode CLI
    local rc, out = h.sh('echo ' .. h.q(s) .. ' | spm_encode --model=' .. h.q(model) .. ' --output_format=id')
    assert.are.equal(0, rc)
    local want = {}
    for x in out:gmatch('%d+') do want[#want + 1] = tonumber(x) end
    assert.are.same(want, ids)
    -- from_file recognises a .model
    assert.are.same(ids, tokenizers.from_file(model):encode(s))
    os.execute('rm -rf ' .. h.q(dir))
  end)

  it('applies the parameter-golf preset', function()
    local dir = h.tmpdir()
    local model = tokenizers.train_sentencepiece{
      input = '/usr/share/common-licenses/Apache-2.0', model_prefix = dir .. '/golf', vocab_size = 400, preset = 'golf',
    }
    local tk = tokenizers.sentencepiece(model)
    assert.are.equal(0, tk.pad_token_id)
    assert.are.equal(1, tk.bos_token_id)
    assert.are.equal(3, tk.unk_token_id)
    local s = 'byte fallback: 中文 😀'
    assert.are.equal(s, tk:decode(tk:encode(s)))
    os.execute('rm -rf ' .. h.q(dir))
  end)

  it('reports bad options', function()
    local dir = h.tmpdir()
    local e = errmsg(tokenizers.train_sentencepiece, {input = dir .. '/none.txt', model_prefix = dir .. '/m', vocab_size = 100})
    assert.is_truthy(e:find('tokenizers.train_sentencepiece: ', 1, true))
    assert.is_truthy(e:find('no such file', 1, true))
    e = errmsg(tokenizers.train_sentencepiece, {input = '/usr/share/common-licenses/GPL-3', model_prefix = dir .. '/m'})
    assert.is_truthy(e:find("'vocab_size' is required", 1, true))
    e = errmsg(tokenizers.train_sentencepiece, {input = '/usr/share/common-licenses/GPL-3', model_prefix = dir .. '/m',
                                                vocab_size = 100, not_a_flag = 1})
    assert.is_truthy(e:find('not_a_flag', 1, true))
    os.execute('rm -rf ' .. h.q(dir))
  end)
end)

describe('tokenizers.chat_format', function()
  local conv = {{role = 'user', content = 'Hi there'}, {role = 'assistant', content = 'Hello!'}}

  it('renders thinking off as the seed does (no think block)', function()
    assert.are.equal('<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n',
                     tokenizers.chat_format(conv))
  end)

  it('renders thinking on with the empty think block', function()
    local s = tokenizers.chat_format(conv, {enable_thinking = true})
    assert.are.equal('<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nHello!<|im_end|>\n', s)
    -- the golden chat ids are this text without its final newline
    assert.are.same({151644, 872, 198, 13048, 1052, 151645, 198, 151644, 77091, 198, 151667, 271, 151668, 271, 9707, 0, 151645},
                    q():encode(s:sub(1, -2)))
  end)

  it('adds a generation prompt', function()
    local m = {{role = 'user', content = 'What is 2+2?'}}
    assert.are.equal('<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n',
                     tokenizers.chat_format(m, {add_generation_prompt = true, enable_thinking = false}))
    assert.are.equal('<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n',
                     tokenizers.chat_format(m, {add_generation_prompt = true, enable_thinking = true}))
  end)

  it('reports bad messages and options', function()
    assert.is_truthy(errmsg(tokenizers.chat_format, {{role = 'user'}}):find('messages[1].content', 1, true))
    assert.is_truthy(errmsg(tokenizers.chat_format, {{role = 'narrator', content = 'x'}}):find("found 'narrator'", 1, true))
    assert.is_truthy(errmsg(tokenizers.chat_format, conv, {thinking = true}):find("unknown option 'thinking'", 1, true))
    assert.is_truthy(errmsg(tokenizers.chat_format, conv, {template = 'mistral'}):find('known families', 1, true))
  end)

  it('renders other families by name (chat_template_spec checks them against transformers)', function()
    assert.are.equal('<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n',
                     tokenizers.chat_format(conv, {template = 'chatml', enable_thinking = true}))
    assert.is_truthy(tokenizers.chat_format(conv, {template = 'llama3'}):find('^<|begin_of_text|><|start_header_id|>user'))
  end)

  it('keeps the template a tokenizer ships', function()
    assert.are.equal('qwen3', tokenizers.chat_family(q().chat_template))
    assert.are.equal(qwen_dir, q().source)
    assert.are.equal(tokenizers.chat_format(conv, {enable_thinking = true}),
                     q():apply_chat_template(conv, {enable_thinking = true}))
  end)
end)

describe('tokenizers errors', function()
  it('names the file and the function', function()
    local e = errmsg(tokenizers.from_file, '/nonexistent/tokenizer.json')
    assert.is_truthy(e:find('tokenizers.from_file: /nonexistent/tokenizer.json: cannot open', 1, true))
    e = errmsg(tokenizers.sentencepiece, '/nonexistent.model')
    assert.is_truthy(e:find('/nonexistent.model', 1, true))
    e = errmsg(function() return q():decode({151669}) end)
    assert.is_truthy(e:find('Tokenizer.decode: id 151669', 1, true))
    e = errmsg(function() return q():decode({1.5}) end)
    assert.is_truthy(e:find('ids[1]: expected an integer id', 1, true))
    e = errmsg(function() return q():encode(42) end)
    assert.is_truthy(e:find('expected a string', 1, true))
    e = errmsg(function() return q().encode('x') end)
    assert.is_truthy(e:find('expected a Tokenizer', 1, true))
    e = errmsg(function() return q():decode(torch.tensor{1.0}) end)
    assert.is_truthy(e:find('expected an integer tensor', 1, true))
  end)
end)

describe('SentencePiece beside torch', function()
  -- libsentencepiece and libc10 both export FLAGS_minloglevel; loaded into c10's scope,
  -- SentencePiece turned on c10's use_fatal_for_enforce and this allocation aborted the host.
  it('leaves a failed allocation a catchable error', function()
    local dir = h.tmpdir()
    local tk = tokenizers.sentencepiece(tokenizers.train_sentencepiece{
      input = '/usr/share/common-licenses/Apache-2.0', model_prefix = dir .. '/m', vocab_size = 300,
    })
    assert.is_true(#tk:encode('License') > 0)
    local ok, e = pcall(torch.zeros, 2^50)
    assert.is_false(ok)
    assert.is_truthy(tostring(e):find("can't allocate memory", 1, true))
    os.execute('rm -rf ' .. h.q(dir))
  end)

  -- Under RTLD_DEEPBIND SentencePiece's std::cerr is libstdc++'s, not the host's copy of it.
  it('survives SentencePiece logging to std::cerr', function()
    local dir = h.tmpdir()
    local code = ("require('tokenizers').train_sentencepiece{input = '/usr/share/common-licenses/Apache-2.0', " ..
                  "model_prefix = %q, vocab_size = 300, minloglevel = 0}; print('done')"):format(dir .. '/m')
    local rc, out, err = h.host('-e ' .. h.q(code) .. ' --device cpu')
    assert.are.equal(0, rc, err)
    assert.is_truthy(err:find('LOG(INFO)', 1, true), err)
    assert.is_truthy(out:find('done', 1, true), out)
    os.execute('rm -rf ' .. h.q(dir))
  end)
end)
