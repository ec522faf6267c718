-- bit_budget_smollm2: per-layer sensitivity of SmolLM2-135M-Instruct (scripts/sensitivity.lua), a greedy
-- allocation at a bits-per-weight budget, and the uniform recipe against the allocated one at that size.
--
--   qatlab run --threads 1 experiments/bit_budget_smollm2.lua [--set layers='layers%.[0-9]%.mlp']
--          [--set uniform=2] [--set metric=ppl] [--set sens_blocks=4]
local quant = require 'quant'
local pretrained = require 'pretrained'
local log = require 'log'
local config = require 'config'
local qatlab = require 'qatlab'
local sensitivity = require 'sensitivity'
local args = ...

local cfg = config.merge({
  gguf = pretrained.SMOLLM2,
  text_bytes = 400000, L = 128,
  held = 16,                      -- held-out blocks (perplexity of the recipes)
  calib = 8,                      -- calibration blocks (imatrix)
  sens_blocks = 2,                -- blocks the sensitivity is measured on (disjoint from held-out)
  batch = 2, refine = 2,
  layers = 'layers%.[0-9]%.mlp',  -- the projections measured and quantized (Lua pattern)
  luts = '4,8,16', rank = 4,      -- the candidates: one per LUT size, at this rank
  uniform = 2,                    -- the uniform recipe is candidate #uniform; its size is the budget
  metric = 'kl', seed = 0,
}, args)

local src = pretrained.load{gguf = cfg.gguf}
local function fresh()
  local m = src.fresh()
  m:requires_grad_(false)
  return m
end

-- blocks: held-out, calibration, sensitivity (disjoint)
local cut = pretrained.blocks(src.tokenizer, {bytes = cfg.text_bytes, L = cfg.L, seed = cfg.seed, held = cfg.held,
                                              calib = cfg.calib, train = cfg.sens_blocks, batch = cfg.batch})
local held, calib = cut.held, cut.calib
local sens = {}
for s = 1, cfg.sens_blocks, cfg.batch do
  sens[#sens + 1] = cut.train:narrow(1, s, math.min(cfg.batch, cfg.sens_blocks - s + 1))
end
local function perplexity(m) return pretrained.perplexity(m, held, cfg.batch) end

local teacher = fresh()
local t_ppl = perplexity(teacher)
log.info(('teacher perplexity %.2f on %d held-out blocks of %d tokens'):format(t_ppl, cfg.held, cfg.L))
local stats = quant.calibrate(teacher, calib)
local replace = {init = 'weighted', imatrix = stats, refine = cfg.refine}

local cands = {}
for lut in cfg.luts:gmatch('[^,]+') do cands[#cands + 1] = {lut = tonumber(lut), rank = cfg.rank} end
assert(cands[cfg.uniform], 'uniform: no such candidate')
local t0 = qatlab.time()
local tbl = quant.sensitivity(teacher, sens, {candidates = cands, layers = cfg.layers, metric = cfg.metric,
                                                replace = replace, verbose = true})
log.info(('sensitivity: %d projections x %d candidates in %.0f s'):format(#tbl.layers, #cands, qatlab.time() - t0))

-- the uniform recipe over the same projections; its bits per weight are the budget
local uniform = {}
for k, r in ipairs(tbl.layers) do uniform[k] = {'^' .. r.name:gsub('%.', '%%.') .. '$', cands[cfg.uniform]} end
local function run(recipe)
  local m = fresh()
  local o = {recipe = recipe}
  for k, v in pairs(replace) do o[k] = v end
  quant.replace(m, o)
  return quant.bits_per_weight(m).quantized, perplexity(m)
end
local u_bits, u_ppl = run(uniform)
local recipe, pred = quant.allocate_bits(tbl, {budget = u_bits})
local a_bits, a_ppl = run(recipe)
assert(math.abs(a_bits - pred.bits_per_weight) < 1e-9, 'predicted bits per weight differ from quant.bits_per_weight')

local count = {}
for _, k in pairs(pred.choice) do count[k] = (count[k] or 0) + 1 end
local mix = {}
for k, c in ipairs(cands) do mix[#mix + 1] = ('%s x%d'):format(sensitivity.config_string(c), count[k] or 0) end

print()
print(('## Bit budget on SmolLM2-135M: %d projections (%s) quantized, the rest float; weighted init, no training')
  :format(#tbl.layers, cfg.layers))
print()
print(sensitivity.format(tbl))
print()
print(('Sensitivity metric: %s on %d blocks of %d tokens. Allocation: %s.'):format(cfg.metric, cfg.sens_blocks,
  cfg.L, table.concat(mix, ', ')))
print()
print('| recipe | bits/weight (quantized projections) | predicted sum of Δ | perplexity | x teacher |')
print('|---|---:|---:|---:|---:|')
local u_delta = 0
for _, r in ipairs(tbl.layers) do u_delta = u_delta + r.candidates[cfg.uniform].delta end
print(('| teacher (float32) | 32 | | %.2f | 1.00 |'):format(t_ppl))
print(('| uniform %s | %.4f | %.4f | %.2f | %.3f |'):format(sensitivity.config_string(cands[cfg.uniform]), u_bits,
  u_delta, u_ppl, u_ppl / t_ppl))
print(('| allocated (greedy, budget %.4f) | %.4f | %.4f | %.2f | %.3f |'):format(u_bits, a_bits, pred.delta, a_ppl,
  a_ppl / t_ppl))
return {teacher = t_ppl, uniform = u_ppl, allocated = a_ppl, bits = a_bits}
