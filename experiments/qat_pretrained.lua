-- qat_pretrained: the whole recipe on a real pretrained model, stage by stage with resume: data-aware
-- Q4 init, Q4 trained by KD, Q2 (MLP) / Q4 (attention) init, Q2 trained, fp16-snapped, recovery LoRA.
--
--   qatlab run experiments/qat_pretrained.lua [--out runs/qat_smollm2] [--set q4_steps=300 --set q2_steps=600]
--   qatlab run experiments/qat_pretrained.lua --device cuda --set dir=Qwen3-0.6B --set batch=16 \
--          --set q4_steps=2000 --set q2_steps=4000 --set train_blocks=20000      (a GPU)
--
-- Teacher: SmolLM2-135M-Instruct (the GGUF set-up fetches) or any Hugging Face Qwen3/Llama directory.
-- Data: the King James Bible (or --set text=FILE) cut in blocks of L tokens; a KD cache of the
-- teacher's top-K logits over the training blocks. Evaluation on text that training never saw:
-- the seed's sliding-window perplexity on the held-out tail of the corpus, its ratio to the
-- teacher's, the KD loss on held-out blocks, bits per weight, and a sample answer. Each stage writes
-- stages/<name>/record.json and a checkpoint: a rerun skips finished stages (a stage interrupted
-- mid-training resumes from its trainer checkpoint). results.md and loss plots at the end.
local torch = require 'torch'
local quant = require 'quant'
local kd = require 'kd'
local optim = require 'optim'
local trainer = require 'trainer'
local schedule = require 'schedule'
local plot = require 'plot'
local files = require 'files'
local json = require 'json'
local log = require 'log'
local config = require 'config'
local qatlab = require 'qatlab'
local pretrained = require 'pretrained'
local args = ...

local cfg = config.merge({
  gguf = pretrained.SMOLLM2,
  dir = '',                -- a Hugging Face directory instead of the GGUF
  text = '',               -- a UTF-8 text file instead of the King James Bible
  text_bytes = 800000,     -- training/calibration part of the corpus (its head)
  held_bytes = 60000,      -- held-out text right after it (sliding-window perplexity)
  L = 128, train_blocks = 1024, calib = 32, held_blocks = 16,
  K = 32,                  -- teacher top-K in the KD cache
  batch = 4, T = 2.0,
  q4 = 'q4a4', q2 = 'q2a4', refine = 2, lut = 'uniform',
  q4_steps = 100, q2_steps = 180, lr_q4 = 2e-4, lr_q2 = 5e-4, warmup = 10,
  lora_rank = 8, lora_steps = 50, lr_lora = 1e-3,
  window = 512, stride = 256,
  prompt = 'What is the capital of France? Answer in one sentence.', sample_tokens = 24,
  stages = 'init,q4,q2init,q2,snap,lora',
  precision = 'auto',
}, args)
local out = qatlab.out or 'runs/qat_pretrained'
files.mkdir(out .. '/stages', 'qat_pretrained')

-- teacher, tokenizer, data ---------------------------------------------------------------------
local src = pretrained.load{gguf = cfg.gguf, dir = cfg.dir}
local float_model, tk = src.fresh, src.tokenizer
local teacher = float_model()
teacher:requires_grad_(false)

-- blocks of the corpus head: held-out, calibration, training (disjoint); the held-out text is the
-- tail right after that head, never cut into training blocks
local corpus = pretrained.text(cfg.text)
assert(#corpus >= cfg.text_bytes + cfg.held_bytes, ('the corpus has %d bytes, %d needed'):format(
  #corpus, cfg.text_bytes + cfg.held_bytes))
local cut = pretrained.blocks(tk, {text = cfg.text, bytes = cfg.text_bytes, L = cfg.L, held = cfg.held_blocks,
                                   calib = cfg.calib, train = cfg.train_blocks, batch = cfg.batch})
local held_blocks, calib, train_ids = cut.held, cut.calib, cut.train
local held_text = corpus:sub(cfg.text_bytes + 1, cfg.text_bytes + cfg.held_bytes)
local held_ids = torch.tensor(tk:encode(held_text), {dtype = 'int64'})

-- KD caches (resumable, keyed by the teacher): training blocks and held-out blocks
local function cache(name, ids)
  local dir = out .. '/' .. name
  kd.build_cache{teacher = teacher, data = ids, K = cfg.K, out = dir, batch_size = 8, tokenizer = tk}
  return dir
end
local t0 = qatlab.time()
local train_cache, held_cache = cache('kd_train', train_ids), cache('kd_held', held_blocks)
log.info(('KD caches: %d training and %d held-out blocks of %d tokens, top-%d (%.0f s)'):format(
  cfg.train_blocks, cfg.held_blocks, cfg.L, cfg.K, qatlab.time() - t0))

-- evaluation ------------------------------------------------------------------------------------
local function sample(m)
  local ids = tk:apply_chat_template({{role = 'user', content = cfg.prompt}},
                                     {add_generation_prompt = true, tokenize = true})
  local r = m:generate{input_ids = ids, max_new_tokens = cfg.sample_tokens, stop = {tk.eos_token_id}}
  return (tk:decode(r[1]):gsub('%s+', ' '))
end

local function evaluate(m)
  m:eval()
  local ppl = torch.no_grad(function()
    return m:perplexity(held_ids, {max_length = cfg.window, stride = cfg.stride})
  end)
  local reader = kd.open_cache(held_cache, {batch_size = 1, shuffle = false, device = qatlab.device})
  local kl = kd.evaluate(m, reader, {examples = cfg.held_blocks, T = cfg.T})
  reader:close()
  local bpw = quant.bits_per_weight(m)
  if #quant.layers(m) == 0 then bpw = {quantized = 16, model = 16} end   -- a float model, counted as fp16
  return {ppl = ppl.ppl, tokens = ppl.tokens, kd_loss = kl, bits_quantized = bpw.quantized, bits_model = bpw.model,
          sample = sample(m)}
end

-- stages ----------------------------------------------------------------------------------------
local records = {}
local function stage_dir(name) return out .. '/stages/' .. name end
local function load_record(name)
  local text = files.read(stage_dir(name) .. '/record.json')
  return text and json.decode(text) or nil
end
local function save_record(name, rec)
  files.mkdir(stage_dir(name), 'qat_pretrained')
  files.write_atomic(stage_dir(name) .. '/record.json', json.encode(rec) .. '\n', 'qat_pretrained')
end
-- A model restored from a stage's checkpoint: the teacher's float weights with the stage's V2 layers.
local function restore(name)
  local m = float_model()
  quant.load_checkpoint(m, stage_dir(name) .. '/checkpoint')
  return m
end
local function finish(name, label, m, extra)
  local rec = evaluate(m)
  rec.stage, rec.label = name, label
  for k, v in pairs(extra or {}) do rec[k] = v end
  if m ~= teacher then
    quant.save_checkpoint(m, stage_dir(name) .. '/checkpoint')   -- compact: indices, scales, no float copy
    local f = assert(io.open(stage_dir(name) .. '/checkpoint/model.safetensors', 'rb'))
    rec.checkpoint_bytes = f:seek('end')
    f:close()
    rec.compact_bytes = quant.export_compact(m, stage_dir(name) .. '/model_compact.safetensors')
  end
  save_record(name, rec)
  log.info(('%s: perplexity %.2f, KD loss %.4f, %.2f bits/weight (quantized layers) — %s'):format(
    label, rec.ppl, rec.kd_loss, rec.bits_quantized, rec.sample))
  return rec
end

-- KD training of a quantized model (all scales), resumable inside the stage through the trainer.
local function train(name, m, steps, lr, trainable)
  m:train()
  trainable(m)
  local t = trainer.new{
    model = m, optimizer = optim.AdamW(m, {lr = lr, weight_decay = 0}), steps = steps,
    schedule = schedule.cosine{total = steps, warmup = math.min(cfg.warmup, math.floor(steps / 2)), min_ratio = 0.1},
    data = kd.open_cache(train_cache, {batch_size = cfg.batch, seed = 1, device = qatlab.device}),
    loss = function(model, b) return kd.loss_model(model, b, {T = cfg.T}) end,
    out = stage_dir(name) .. '/train', resume = true, save_every = math.max(25, math.floor(steps / 4)),
    log_every = 5, eval_at_start = false, precision = cfg.precision, seed = 1,
  }
  local s = t:run()
  plot.loss_curves{csv = stage_dir(name) .. '/train/training_log.csv', out = stage_dir(name) .. '/loss.svg',
                   title = name .. ': KD loss'}
  return s
end

local want = {}
for s in cfg.stages:gmatch('[^,]+') do want[s] = true end
local stats
local function imatrix()
  if not stats then stats = quant.calibrate(teacher, calib) end
  return stats
end

records.teacher = load_record('teacher') or finish('teacher', 'teacher (float)', teacher)

local function run_stage(name, label, from, body)
  if not want[name] then return end
  local rec = load_record(name)
  if rec then
    log.info(('%s: done earlier (%s), skipped'):format(name, stage_dir(name)))
    records[name] = rec
    return
  end
  local t = qatlab.time()
  local m, extra = body(from and restore(from) or nil)
  extra = extra or {}
  extra.seconds = qatlab.time() - t
  records[name] = finish(name, label, m, extra)
end

local function init_from_teacher(preset)
  local m = float_model()
  local _, info = quant.replace(m, {preset = preset, init = 'weighted', imatrix = imatrix(), refine = cfg.refine,
                                    lut = cfg.lut})
  return m, {init_seconds = info.seconds}
end

run_stage('init', ('%s, weighted init'):format(cfg.q4), nil, function() return init_from_teacher(cfg.q4) end)
run_stage('q4', ('%s, KD-trained %d steps'):format(cfg.q4, cfg.q4_steps), 'init', function(m)
  local s = train('q4', m, cfg.q4_steps, cfg.lr_q4, function(x) quant.set_trainable(x, 'all') end)
  return m, {train_loss = s.train_loss}
end)
run_stage('q2init', ('%s, weighted init'):format(cfg.q2), nil, function() return init_from_teacher(cfg.q2) end)
run_stage('q2', ('%s, KD-trained %d steps'):format(cfg.q2, cfg.q2_steps), 'q2init', function(m)
  local s = train('q2', m, cfg.q2_steps, cfg.lr_q2, function(x) quant.set_trainable(x, 'all') end)
  return m, {train_loss = s.train_loss}
end)
run_stage('snap', ('%s, fp16-snapped for the ANE'):format(cfg.q2), 'q2', function(m)
  quant.snap_for_ane(m)
  return m
end)
if want.lora and not quant.enable_recovery_lora_all then
  log.warn('lora: this build has no quant.enable_recovery_lora_all; stage skipped')
else
  local label = ('%s, recovery LoRA r=%d, %d steps, resnapped'):format(cfg.q2, cfg.lora_rank, cfg.lora_steps)
  run_stage('lora', label, 'snap', function(m)
      quant.enable_recovery_lora_all(m, {rank = cfg.lora_rank})
      local s = train('lora', m, cfg.lora_steps, cfg.lr_lora, function(x) quant.freeze_for_recovery_training(x) end)
      quant.resnap_with_lora(m)
      return m, {train_loss = s.train_loss}
    end)
end

-- results ---------------------------------------------------------------------------------------
local order = {'teacher', 'init', 'q4', 'q2init', 'q2', 'snap', 'lora'}
local tp = records.teacher.ppl
local md = {
  ('# qat_pretrained: %s'):format(cfg.dir ~= '' and cfg.dir or cfg.gguf:match('[^/]+$')),
  '',
  ('Held-out: %d tokens of text never trained on (sliding window %d, stride %d); KD loss (T=%g) on %d '
    .. 'held-out blocks of %d;'):format(records.teacher.tokens, cfg.window, cfg.stride, cfg.T, cfg.held_blocks, cfg.L),
  ('training: %d blocks of %d tokens, batch %d, top-%d KD cache; device %s.'):format(cfg.train_blocks, cfg.L, cfg.batch,
    cfg.K, qatlab.device),
  '',
  '| stage | perplexity | × teacher | KD loss | bits/weight (quantized layers) | bits/weight (model) | compact MB '
    .. '| checkpoint MB | s | sample answer |',
  '|---|---:|---:|---:|---:|---:|---:|---:|---:|---|',
}
for _, name in ipairs(order) do
  local r = records[name]
  if r then
    local function mb(b) return b and ('%.1f'):format(b / 2 ^ 20) or '' end
    md[#md + 1] = ('| %s | %.2f | %.3f | %.4f | %.3f | %.3f | %s | %s | %s | %s |'):format(r.label, r.ppl, r.ppl / tp,
      r.kd_loss, r.bits_quantized, r.bits_model, mb(r.compact_bytes), mb(r.checkpoint_bytes),
      r.seconds and ('%.0f'):format(r.seconds) or '', (r.sample or ''):gsub('|', '/'):sub(1, 80))
  end
end
files.write_atomic(out .. '/results.md', table.concat(md, '\n') .. '\n', 'qat_pretrained')
print(table.concat(md, '\n'))
return records
