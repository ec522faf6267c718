-- chat_template: the model's own chat template (GGUF tokenizer.chat_template, tokenizer_config.json)
-- rendered in C++ by family, string-equal to transformers' rendering of the same template text.
local tokenizers = require 'tokenizers'
local json = require 'json'
local h = require 'helper'

local gguf_path = h.source_dir .. '/.cache/models/smollm2-135m-instruct-q4_1.gguf'
local qwen_dir = h.test_data .. '/qwen3-tokenizer'   -- tools/fetch_test_data.sh

local function exists(p)
  local f = io.open(p, 'rb')
  if f then f:close() end
  return f ~= nil
end

local function errmsg(f, ...)
  local ok, err = pcall(f, ...)
  assert.is_false(ok, 'expected an error')
  return tostring(err)
end

local function write(path, text)
  local f = assert(io.open(path, 'wb'))
  f:write(text)
  f:close()
end

-- Conversations covering: no system, system, multi-turn, surrounding whitespace, unicode,
-- an assistant turn with a <think> block, a final assistant turn.
local convs = {
  {{role = 'user', content = 'What is the capital of France?'}},
  {{role = 'system', content = 'Be brief.'}, {role = 'user', content = 'Hi'}},
  {{role = 'user', content = 'Q1'}, {role = 'assistant', content = 'A1'}, {role = 'user', content = 'Q2'}},
  {{role = 'system', content = ' Sys \n'}, {role = 'user', content = '\n café 北京 🙂\t'},
   {role = 'assistant', content = 'Oui.\u{3000}'}},
  {{role = 'user', content = 'Q'}, {role = 'assistant', content = '<think>\nhmm\n</think>\n\nA'}},
}

-- transformers' own renderer over every (conversation, generation prompt, thinking) case.
local function hf_render(template, bos)
  local dir = h.tmpdir()
  write(dir .. '/in.json', json.encode{template = template, convs = convs, bos = bos})
  write(dir .. '/run.py', [[
import json, sys
try:
    from transformers.utils.chat_template_utils import render_jinja_template
except ImportError:
    sys.exit(3)
a = json.load(open(sys.argv[1], encoding='utf-8'))
out = []
for msgs in a['convs']:
    row = []
    for gen in (False, True):
        for think in (False, True):
            r, _ = render_jinja_template(conversations=[msgs], chat_template=a['template'],
                                         add_generation_prompt=gen, enable_thinking=think, bos_token=a['bos'])
            row.append(r[0])
    out.append(row)
json.dump(out, open(sys.argv[2], 'w', encoding='utf-8'))
]])
  local rc, _, err = h.sh(('%s %s %s %s'):format(h.q(h.python), h.q(dir .. '/run.py'), h.q(dir .. '/in.json'),
                                                 h.q(dir .. '/out.json')))
  if rc == 3 then
    os.execute('rm -rf ' .. h.q(dir))
    return nil
  end
  assert.are.equal(0, rc, err)
  local f = assert(io.open(dir .. '/out.json', 'rb'))
  local out = json.decode(f:read('*a'))
  f:close()
  os.execute('rm -rf ' .. h.q(dir))
  return out
end

local function check_against_hf(tk, family)
  local want = hf_render(tk.chat_template, tk.bos_token_id and tk:id_to_token(tk.bos_token_id) or '')
  if not want then
    pending(h.python .. ' has no transformers')
    return
  end
  assert.are.equal(family, tokenizers.chat_family(tk.chat_template))
  for i, msgs in ipairs(convs) do
    local k = 0
    for _, gen in ipairs{false, true} do
      for _, think in ipairs{false, true} do
        k = k + 1
        local got = tk:apply_chat_template(msgs, {add_generation_prompt = gen, enable_thinking = think,
                                                  strip_think = false})
        assert.are.equal(want[i][k], got, ('conversation %d, generation prompt %s, thinking %s'):format(
          i, tostring(gen), tostring(think)))
      end
    end
  end
end

describe('SmolLM2 (ChatML, from the GGUF)', function()
  if not exists(gguf_path) then
    pending('model not fetched: run tools/fetch_smollm2.sh')
    return
  end
  local tk = tokenizers.from_gguf(gguf_path)

  it('keeps the template it ships and names where it came from', function()
    assert.is_truthy(tk.chat_template:find('<|im_start|>', 1, true))
    assert.are.equal(gguf_path .. ': tokenizer.chat_template', tk.chat_template_source)
    assert.are.equal(gguf_path, tk.source)
  end)

  it('renders as transformers does (default system prompt, no thinking block)', function()
    check_against_hf(tk, 'chatml')
    local s = tk:apply_chat_template(convs[1], {add_generation_prompt = true})
    assert.is_nil(s:find('<think>', 1, true))
    assert.is_truthy(s:find('^<|im_start|>system\n'))
    assert.is_truthy(s:find('<|im_start|>assistant\n$'))
  end)

  it('tokenizes the rendering when asked', function()
    local ids = tk:apply_chat_template(convs[2], {add_generation_prompt = true, tokenize = true})
    assert.are.same(tk:encode(tk:apply_chat_template(convs[2], {add_generation_prompt = true})), ids)
    assert.are.equal(tk:token_to_id('<|im_start|>'), ids[1])
  end)
end)

describe('Qwen3 (tokenizer_config.json)', function()
  if not exists(qwen_dir .. '/tokenizer_config.json') then
    pending('no Qwen3 tokenizer in .cache/data (tools/fetch_test_data.sh)')
    return
  end
  local tk = tokenizers.from_file(qwen_dir)

  it('renders as transformers does, thinking on and off', function()
    assert.are.equal(qwen_dir .. '/tokenizer_config.json: chat_template', tk.chat_template_source)
    check_against_hf(tk, 'qwen3')
  end)

  it('keeps the seed rendering as the default (think blocks stripped when thinking is off)', function()
    for _, msgs in ipairs(convs) do
      for _, gen in ipairs{false, true} do
        assert.are.equal(tokenizers.chat_format(msgs, {add_generation_prompt = gen}),
                         tk:apply_chat_template(msgs, {add_generation_prompt = gen}))
      end
    end
  end)
end)

describe('tokenizers.chat_format{template=}', function()
  local conv = {{role = 'system', content = 'S'}, {role = 'user', content = '  Hi\n'},
                {role = 'assistant', content = 'Hello'}}

  it('renders Llama-3 (bos, headers, trimmed content, eot)', function()
    assert.are.equal('<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>'
                     .. '<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>'
                     .. '<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>'
                     .. '<|start_header_id|>assistant<|end_header_id|>\n\n',
                     tokenizers.chat_format(conv, {template = 'llama3', add_generation_prompt = true}))
    assert.are.equal('<s><|start_header_id|>user<|end_header_id|>\n\nx<|eot_id|>',
                     tokenizers.chat_format({{role = 'user', content = 'x'}}, {template = 'llama3', bos_token = '<s>'}))
  end)

  it('renders plain ChatML by name (no default system prompt)', function()
    assert.are.equal('<|im_start|>user\n  Hi\n<|im_end|>\n<|im_start|>assistant\n',
                     tokenizers.chat_format({conv[2]}, {template = 'chatml', add_generation_prompt = true}))
  end)

  it('keeps Qwen3 as the default', function()
    assert.are.equal(tokenizers.chat_format(conv), tokenizers.chat_format(conv, {template = 'qwen3'}))
  end)

  it('recognises families from markers and rejects the rest', function()
    local llama = "{{ bos_token }}{{ '<|start_header_id|>' + m.role + '<|end_header_id|>' + m.content + '<|eot_id|>' }}"
    assert.are.equal('llama3', tokenizers.chat_family(llama))
    assert.are.equal('<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nx<|eot_id|>',
                     tokenizers.chat_format({{role = 'user', content = 'x'}}, {template = llama}))
    local fam, why = tokenizers.chat_family(llama .. ' Cutting Knowledge Date')
    assert.is_nil(fam)
    assert.is_truthy(why:find('Llama-3.1', 1, true))
    fam, why = tokenizers.chat_family('{{ messages }}')
    assert.is_nil(fam)
    assert.is_truthy(why:find('known families: qwen3, chatml, llama3', 1, true))
    local e = errmsg(tokenizers.chat_format, conv, {template = '[INST] {{ m }} [/INST]'})
    assert.is_truthy(e:find('template text: chat template not recognised', 1, true), e)
  end)
end)

describe('templates found with a tokenizer', function()
  if not exists(qwen_dir .. '/tokenizer.json') then
    pending('no Qwen3 tokenizer in .cache/data (tools/fetch_test_data.sh)')
    return
  end

  local function dir_with(config, jinja)
    local d = h.tmpdir()
    assert(os.execute(('cp %s %s/'):format(h.q(qwen_dir .. '/tokenizer.json'), h.q(d))) == 0)
    if config then write(d .. '/tokenizer_config.json', json.encode(config)) end
    if jinja then write(d .. '/chat_template.jinja', jinja) end
    return d
  end

  it('names the source and the known families for an unknown template', function()
    local d = dir_with({chat_template = '{% for m in messages %}[{{ m.role }}] {{ m.content }}{% endfor %}'})
    local tk = tokenizers.from_file(d)
    local e = errmsg(function() return tk:apply_chat_template({{role = 'user', content = 'x'}}) end)
    assert.is_truthy(e:find(d .. '/tokenizer_config.json: chat_template: chat template not recognised', 1, true), e)
    assert.is_truthy(e:find('qwen3, chatml, llama3', 1, true), e)
    os.execute('rm -rf ' .. h.q(d))
  end)

  it('reads chat_template.jinja first, and the default of a named list', function()
    local d = dir_with({chat_template = {{name = 'tool_use', template = 'x'},
                                         {name = 'default', template = "{{ '<|im_start|>' }}<|im_end|>"}}})
    local tk = tokenizers.from_file(d .. '/tokenizer.json')
    assert.are.equal(d .. '/tokenizer_config.json: chat_template[default]', tk.chat_template_source)
    assert.are.equal('<|im_start|>user\nx<|im_end|>\n',
                     tk:apply_chat_template({{role = 'user', content = 'x'}}))
    write(d .. '/chat_template.jinja', '<|start_header_id|><|end_header_id|><|eot_id|>')
    tk = tokenizers.from_file(d)
    assert.are.equal(d .. '/chat_template.jinja', tk.chat_template_source)
    os.execute('rm -rf ' .. h.q(d))
  end)

  it('says when a tokenizer has no template', function()
    local d = dir_with(nil)
    local tk = tokenizers.from_file(d)
    assert.is_nil(tk.chat_template)
    local e = errmsg(function() return tk:apply_chat_template({{role = 'user', content = 'x'}}) end)
    assert.is_truthy(e:find('has no chat template', 1, true), e)
    os.execute('rm -rf ' .. h.q(d))
  end)
end)
