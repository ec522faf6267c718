-- pretrained_chat_ppl: loads a real pretrained model (a Hugging Face directory, or the
-- SmolLM2-135M-Instruct GGUF fetched by tools/fetch_smollm2.sh), chats from a prompt in the
-- model's own chat template with the KV-cache generator (more prompts, given, run as one padded
-- batch), and measures perplexity and bits per byte on a text file; with --out, the answers and
-- the numbers also go to results.json.
--
--   qatlab run experiments/pretrained_chat_ppl.lua [--set prompt='...'] [--set dir=HF_DIR]
--          [--set more_prompts='Q1|Q2'] [--set template=chatml] [--set text=FILE]
--          [--set max_tokens=4096] [--device cuda --set dtype=bfloat16]
local torch = require 'torch'
local nn = require 'nn'
local gguf = require 'gguf'
local tokenizers = require 'tokenizers'
local log = require 'log'
local json = require 'json'
local config = require 'config'
local qatlab = require 'qatlab'
local args = ...

local cfg = config.merge({
  gguf = qatlab.scripts_dir .. '/../.cache/models/smollm2-135m-instruct-q4_1.gguf',
  dir = '',             -- a Hugging Face model directory; used instead of gguf when set
  prompt = 'What is the capital of France? Answer in one sentence.',
  system = '',          -- '': none given (a template may add its own default, as SmolLM2's does)
  more_prompts = '',    -- further prompts separated by '|', answered in the same padded batch
  template = '',        -- '': the model's own chat template; else qwen3, chatml or llama3
  enable_thinking = false,   -- Qwen3 templates: the thinking mode
  max_new_tokens = 64,
  temperature = 0.0,    -- 0: greedy
  top_p = 1.0,
  seed = 0,
  text = '/usr/share/common-licenses/GPL-3',
  max_tokens = 2048,    -- perplexity on the first max_tokens tokens of the text (0: all)
  max_length = 1024,    -- the seed's sliding-window protocol (docs/formulas.md §9)
  stride = 512,
  dtype = 'float32',
}, args)

-- model and tokenizer --------------------------------------------------------------------
local t0 = qatlab.time()
local model, tk
if cfg.dir ~= '' then
  model = nn.from_pretrained(cfg.dir, {dtype = cfg.dtype})
  tk = tokenizers.from_file(cfg.dir)
else
  local f = io.open(cfg.gguf, 'rb')
  if not f then
    error(('no model at %s: run tools/fetch_smollm2.sh, or pass --set dir=HF_DIR'):format(cfg.gguf), 0)
  end
  f:close()
  local tensors, hf_config = gguf.load(cfg.gguf)
  model = nn.from_config(hf_config, {dtype = cfg.dtype})
  model:load_state_dict(tensors)
  tk = tokenizers.from_gguf(cfg.gguf)
end
model:eval()
log.info(('loaded %s: %.1fM parameters, %s on %s in %.2f s'):format(
  cfg.dir ~= '' and cfg.dir or cfg.gguf, model:num_parameters() / 1e6, cfg.dtype, qatlab.device,
  qatlab.time() - t0))

-- chat in the model's own template --------------------------------------------------------
local function render(question)
  local msgs = {}
  if cfg.system ~= '' then msgs[1] = {role = 'system', content = cfg.system} end
  msgs[#msgs + 1] = {role = 'user', content = question}
  local o = {add_generation_prompt = true, enable_thinking = cfg.enable_thinking}
  if cfg.template ~= '' then
    o.template = cfg.template
    if tk.bos_token_id then o.bos_token = tk:id_to_token(tk.bos_token_id) end
    return tk:encode(tokenizers.chat_format(msgs, o))
  end
  return tk:apply_chat_template(msgs, {add_generation_prompt = true, enable_thinking = cfg.enable_thinking,
                                       tokenize = true})
end
log.info(('chat template: %s'):format(cfg.template ~= '' and cfg.template or
  (tk.chat_template and (tokenizers.chat_family(tk.chat_template) or '?') .. ' from ' .. tk.chat_template_source
   or 'none shipped (pass --set template=chatml|qwen3|llama3)')))
local questions = {cfg.prompt}
for q in cfg.more_prompts:gmatch('[^|]+') do questions[#questions + 1] = q end
local prompts = {}
for i, q in ipairs(questions) do prompts[i] = render(q) end
local stop = {tk.eos_token_id}
for _, s in ipairs({'<|im_end|>', '<|endoftext|>', '<|eot_id|>'}) do
  local id = tk:token_to_id(s)
  if id and id >= 0 then stop[#stop + 1] = id end
end
io.write('\n', cfg.prompt, '\n> ')
local out = model:generate{   -- one padded batch; row 1 streams
  input_ids = prompts, pad_token_id = tk.pad_token_id or tk.eos_token_id or 0, max_new_tokens = cfg.max_new_tokens,
  temperature = cfg.temperature, top_p = cfg.top_p, seed = cfg.seed, stop = stop,
  on_token = function(id, row)
    if row == 1 then
      io.write(tk:decode({id}, {skip_special_tokens = true}))
      io.flush()
    end
  end,
}
io.write('\n\n')
local answers = {}
for i, q in ipairs(questions) do
  answers[i] = tk:decode(out[i], {skip_special_tokens = true})
  if i > 1 then io.write(q, '\n> ', answers[i], '\n\n') end
end
io.flush()
log.info(('generated %d tokens for %d prompt(s), %.1f tokens/s (prefill %.3f s)'):format(
  out.new_tokens, #questions, out.tokens_per_second, out.prefill_seconds))

-- perplexity -----------------------------------------------------------------------------------
local f = assert(io.open(cfg.text, 'rb'))
local text = f:read('*a')
f:close()
local tokens = tk:encode(text)
local n = cfg.max_tokens > 0 and math.min(cfg.max_tokens, #tokens) or #tokens
local used = {}
for i = 1, n do used[i] = tokens[i] end
local bytes = #tk:decode(used)
t0 = qatlab.time()
local r = model:perplexity(torch.tensor(used, {dtype = 'int64'}),
  {max_length = cfg.max_length, stride = cfg.stride, bytes = bytes})
log.info(('perplexity %.3f, bits/byte %.4f on %d tokens (%d bytes) of %s, window %d stride %d, %.1f s'):format(
  r.ppl, r.bpb, r.tokens, bytes, cfg.text, cfg.max_length, cfg.stride, qatlab.time() - t0))
if qatlab.out then
  local res = {model = cfg.dir ~= '' and cfg.dir or cfg.gguf, prompt = cfg.prompt,
               answer = answers[1], prompts = questions, answers = answers, new_tokens = out.new_tokens,
               tokens_per_second = out.tokens_per_second, ppl = r.ppl, bpb = r.bpb, tokens = r.tokens,
               bytes = bytes, text = cfg.text, max_length = cfg.max_length, stride = cfg.stride}
  local path = qatlab.out .. '/results.json'
  local rf = assert(io.open(path .. '.tmp', 'w'))
  rf:write(json.encode(res), '\n')
  rf:close()
  assert(os.rename(path .. '.tmp', path))
  log.info('wrote ' .. path)
end
