-- layerwise_smollm2: layer-by-layer QAT (scripts/layerwise.lua) of SmolLM2-135M-Instruct quantized with
-- the weighted init; per-layer local/KD loss before and after, held-out KJV perplexity against the teacher.
--
--   qatlab run --threads 1 experiments/layerwise_smollm2.lua [--set layers=0,1,2,3] [--set steps=8]
--          [--set preset=q2a4] [--set local_w=0.5] [--set schedule=grow] [--set passes=2]
local quant = require 'quant'
local pretrained = require 'pretrained'
local log = require 'log'
local config = require 'config'
local qatlab = require 'qatlab'
local layerwise = require 'layerwise'
local args = ...

local cfg = config.merge({
  gguf = pretrained.SMOLLM2,
  text_bytes = 400000, L = 128,
  held = 16,            -- held-out blocks (final perplexity)
  metric_blocks = 4,    -- held-out blocks of the per-layer perplexity column
  calib = 8,            -- calibration blocks for the imatrix
  train = 32,           -- training blocks (cycled)
  batch = 2, preset = 'q4a4', refine = 2,
  layers = '0,1,2,3',   -- 0-based decoder layers, in training order ('all': every layer)
  steps = 8, lr = 1e-4, local_w = 0.5, global_w = 0.5, tokens = 128, mlp_only = false, grad_accum = 1,
  K = 32, hard_top1 = 0.0, hard_full = 0.0, schedule = 'constant', passes = 1, order = 'forward',
  seed = 0,
}, args)

local src = pretrained.load{gguf = cfg.gguf}
local fresh, tk = src.fresh, src.tokenizer

-- blocks: held-out first, then calibration, then training (disjoint)
local cut = pretrained.blocks(tk, {bytes = cfg.text_bytes, L = cfg.L, seed = cfg.seed, held = cfg.held,
                                   calib = cfg.calib, train = cfg.train, batch = cfg.batch})
local held, calib = cut.held, cut.calib
local train = {}
for s = 1, cfg.train, cfg.batch do
  train[#train + 1] = cut.train:narrow(1, s, math.min(cfg.batch, cfg.train - s + 1))
end

local function perplexity(m, n) return pretrained.perplexity(m, held, cfg.batch, n) end

local teacher = fresh()
teacher:requires_grad_(false)
local t_ppl = perplexity(teacher)
log.info(('teacher perplexity %.2f on %d held-out blocks of %d tokens'):format(t_ppl, cfg.held, cfg.L))

local student = fresh()
local stats = quant.calibrate(teacher, calib)
local _, info = quant.replace(student, {preset = cfg.preset, init = 'weighted', imatrix = stats, refine = cfg.refine})
local bpw = quant.bits_per_weight(student)
local init_ppl = perplexity(student)
log.info(('%s weighted init in %.1f s: perplexity %.2f (%.2fx), %.3f bits/weight (projections)'):format(
  cfg.preset, info.seconds, init_ppl, init_ppl / t_ppl, bpw.quantized))

local layers = {}
if cfg.layers == 'all' then
  for i = 0, teacher.config.num_hidden_layers - 1 do layers[#layers + 1] = i end
else
  for i in cfg.layers:gmatch('[^,]+') do layers[#layers + 1] = tonumber(i) end
end
local t0 = qatlab.time()
local rows = layerwise.train_all(student, {
  teacher = teacher, data = train, layers = layers, steps = cfg.steps, lr = cfg.lr, local_w = cfg.local_w,
  global_w = cfg.global_w, tokens = cfg.tokens, mlp_only = cfg.mlp_only, grad_accum = cfg.grad_accum, K = cfg.K,
  kd = {T = 2, hard_top1 = cfg.hard_top1, hard_full = cfg.hard_full}, schedule = cfg.schedule,
  passes = cfg.passes, order = cfg.order, eval_data = {held:narrow(1, 1, cfg.batch)}, seed = cfg.seed,
  eval = function(m) return perplexity(m, cfg.metric_blocks) end, print = false,
})
local train_s = qatlab.time() - t0
local after_ppl = perplexity(student)

print()
print(('## Layer-wise QAT of SmolLM2-135M (%s, weighted init), layers %s, %d steps x %d x %d tokens per layer')
  :format(cfg.preset, cfg.layers, cfg.steps, cfg.batch, cfg.L))
print()
print('Per layer: local = L_local and KD = top-32 KL (T = 2) on one held-out batch (all tokens); metric = '
  .. ('perplexity on %d held-out blocks.'):format(cfg.metric_blocks))
print()
print(layerwise.format(rows))
print()
print('| model | bits/weight (projections) | perplexity | x teacher |')
print('|---|---:|---:|---:|')
print(('| teacher (float32) | 32 | %.2f | 1.00 |'):format(t_ppl))
print(('| %s weighted init | %.3f | %.2f | %.2f |'):format(cfg.preset, bpw.quantized, init_ppl, init_ppl / t_ppl))
print(('| + layer-wise QAT (%.0f s) | %.3f | %.2f | %.2f |'):format(train_s, bpw.quantized, after_ppl,
  after_ppl / t_ppl))
return {teacher = t_ppl, init = init_ppl, after = after_ppl, rows = rows}
