-- sr002_mlp_only: the seed's SR-002 (train only the MLP quant layers of a Q2 student) at CPU scale, against
-- training every quant layer. Teacher and KD caches as in sr001_convert_q4_q2.lua: a small qwen3-style model
-- trained briefly from scratch on the King James Bible (SentencePiece BPE), its top-k logits cached. Each
-- variant starts from the same Q2 init (the teacher's copy through quant.replace preset q2a4: LUT4 + rank 32
-- on the MLP, LUT16 + rank 8 on attention), is trained by KD for the same steps and LR, and reports the
-- held-out KD loss (kd.evaluate) before and after, the trainable tensor count and the time per step.
--
--   qatlab run experiments/sr002_mlp_only.lua [--set tiny=true] [--set steps=400] [--out runs/sr002]
local torch = require 'torch'
local nn = require 'nn'
local data = require 'data'
local kd = require 'kd'
local quant = require 'quant'
local optim = require 'optim'
local tokenizers = require 'tokenizers'
local trainer = require 'trainer'
local config = require 'config'
local log = require 'log'
local qatlab = require 'qatlab'
local args = ...

local cfg = config.merge({
  text = '',            -- a text file to use instead of the King James Bible (data.kjv_text)
  tiny = false,          -- ~15 s smoke run: fewer steps and rows
  text_bytes = 400000,   -- KJV prefix used for the tokenizer and the data
  vocab = 512,
  L = 32,                -- block length
  rows = 1024,           -- packed blocks used (train + held out)
  hidden = 128, layers = 2,
  teacher_steps = 500, teacher_lr = 3e-3, batch = 16,
  K = 16,                -- teacher top-k cached
  steps = 400, lr = 1e-3,
  -- hard-label weights of the KD training loss: the seed uses 0.2 / 0.00005, but next to a teacher this weak
  -- they pull the student off the teacher (held-out KL rises), so the default is pure KL
  hard_top1 = 0, hard_full = 0,
  eval_batches = 8,
  seed = 0,
}, args)
if cfg.tiny then
  cfg.rows, cfg.teacher_steps, cfg.steps, cfg.eval_batches = 192, 60, 30, 4
end
torch.manual_seed(cfg.seed)
log.info('sr002_mlp_only on ' .. qatlab.device .. ': ' .. config.format(cfg))

local function sh(cmd) assert(os.execute(cmd) == 0, 'failed: ' .. cmd) end
local work = qatlab.out or os.tmpname()
if not qatlab.out then os.remove(work) end
sh("mkdir -p '" .. work .. "'")

-- data: KJV prefix -> SentencePiece BPE -> packed (N, L) blocks -> train / held out ---------------------
local text = (cfg.text ~= '' and table.concat(data.read_text(cfg.text), '\n') or data.kjv_text()):sub(1, cfg.text_bytes)
local tf = assert(io.open(work .. '/kjv_prefix.txt', 'wb'))
tf:write(text)
tf:close()
local tk = tokenizers.sentencepiece(tokenizers.train_sentencepiece{
  input = work .. '/kjv_prefix.txt', model_prefix = work .. '/sp', vocab_size = cfg.vocab, model_type = 'bpe'})
local lines = {}
for line in text:gmatch('[^\n]+') do lines[#lines + 1] = line end
local ids = data.pack(tk, lines, {L = cfg.L, eos = tk.eos_token_id})
ids = data.shuffle(ids, {seed = cfg.seed}):narrow(1, 1, math.min(cfg.rows, ids:size(1)))
local train_ids, held_ids = data.split(ids, {fraction = 0.125, seed = cfg.seed})
local V = tk:vocab_size()
log.info(('%d blocks of %d tokens (%d train / %d held out), vocabulary %d'):format(
  ids:size(1), cfg.L, train_ids:size(1), held_ids:size(1), V))

local model_cfg = {model_type = 'qwen3', vocab_size = V, hidden_size = cfg.hidden, intermediate_size = 3 * cfg.hidden,
                   num_hidden_layers = cfg.layers, num_attention_heads = 4, num_key_value_heads = 2,
                   head_dim = math.floor(cfg.hidden / 4), max_position_embeddings = 2 * cfg.L,
                   tie_word_embeddings = true}

local function ce_loss(m, x)                                       -- next-token CE over a (B, L) block
  local logits = m:forward(x):narrow(2, 1, cfg.L - 1)
  local y = x:narrow(2, 2, cfg.L - 1)
  return -logits:log_softmax(3):gather(3, y:unsqueeze(3)):mean()
end
local function rows_batch(src)
  return function() return src:index_select(1, torch.randint(0, src:size(1), {cfg.batch})) end
end
local function sub_out(name) return qatlab.out and (qatlab.out .. '/' .. name) or nil end
local function quiet(o)
  o.progress, o.log_every, o.save_final, o.eval_at_start = false, 0, false, false
  o.out = sub_out(o.name)
  o.name = nil
  return o
end

-- teacher: trained from scratch with next-token CE ------------------------------------------------------
local teacher = nn.from_config(model_cfg)
local t_run = trainer.new(quiet{
  name = 'teacher', model = teacher, optimizer = optim.AdamW(teacher, {lr = cfg.teacher_lr, weight_decay = 0.01}),
  loss = ce_loss, data = rows_batch(train_ids), steps = cfg.teacher_steps,
  eval = function(m) return {eval_loss = ce_loss(m, held_ids)} end,
})
local t_sum = t_run:run()
t_run:close()
log.info(('teacher: %d steps, held-out CE %.4f (uniform %.4f)'):format(t_sum.steps, t_sum.eval_loss, math.log(V)))
teacher:eval()

-- KD caches of the teacher's top-k -------------------------------------------------------------------------
local t0 = qatlab.time()
kd.build_cache{teacher = teacher, data = train_ids, K = cfg.K, out = work .. '/kd_train', overwrite = true, seed = 1}
kd.build_cache{teacher = teacher, data = held_ids, K = cfg.K, out = work .. '/kd_held', overwrite = true, seed = 2}
log.info(('KD caches built in %.1f s'):format(qatlab.time() - t0))
local held = {}
local er = kd.open_cache(work .. '/kd_held', {batch_size = cfg.batch, shuffle = false})
for _ = 1, cfg.eval_batches do
  local b = er:next()
  if not b then break end
  held[#held + 1] = b
end
er:close()
local function kd_eval(m) return (kd.evaluate(m, held, {n = #held})) end

local kd_opts = {T = 2, hard_top1 = cfg.hard_top1, hard_full = cfg.hard_full}
local reader = kd.open_cache(work .. '/kd_train', {batch_size = cfg.batch, shuffle = true, seed = cfg.seed})
local function kd_train(m, name, steps, lr)
  local r = trainer.new(quiet{
    name = name, model = m, optimizer = optim.AdamW(m, {lr = lr, weight_decay = 0}),
    loss = function(mm, b) return kd.loss_model(mm, b, kd_opts) end, data = reader, steps = steps,
    eval = function(mm) return {eval_loss = kd_eval(mm)} end,
  })
  local t = qatlab.time()
  local s = r:run()
  r:close()
  return s, (qatlab.time() - t) / math.max(s.steps, 1)
end

-- variants: the same Q2 init, MLP-only vs all quant layers trainable ---------------------------------------
local rows = {}
for _, mode in ipairs({'mlp', 'all'}) do
  local student = nn.from_config(model_cfg)
  student:load_state_dict(teacher:state_dict())
  quant.replace(student, {preset = 'q2a4'})
  student:train()
  local before = kd_eval(student)
  local n = quant.set_trainable(student, mode)
  local _, per_step = kd_train(student, 'q2_' .. mode, cfg.steps, cfg.lr)
  local after = kd_eval(student)
  rows[#rows + 1] = {mode, n, before, after, per_step}
  log.info(('%-4s %3d trainable  KD loss %.4f -> %.4f  %.1f ms/step'):format(mode, n, before, after, per_step * 1e3))
end
reader:close()

print('\n| trainable | tensors | KD loss at Q2 init | KD loss after | ms/step |')
print('|---|---:|---:|---:|---:|')
for _, r in ipairs(rows) do print(('| %s | %d | %.4f | %.4f | %.1f |'):format(r[1], r[2], r[3], r[4], r[5] * 1e3)) end
if not qatlab.out then sh("rm -rf '" .. work .. "'") end
