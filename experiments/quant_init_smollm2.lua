-- quant_init_smollm2: perplexity of SmolLM2-135M-Instruct quantized by initialisation alone (no
-- training): the seed's SVD init against the activation-weighted init, for Q4 and Q2-MLP/Q4-attn.
--
--   qatlab run --threads 1 experiments/quant_init_smollm2.lua [--set refine=4] [--set held=48]
--          [--set calib=32] [--set rows=teacher,q4,q4w,q4k,q2,q2w,q2k] [--set dir=HF_DIR]
local quant = require 'quant'
local log = require 'log'
local json = require 'json'
local config = require 'config'
local qatlab = require 'qatlab'
local pretrained = require 'pretrained'
local args = ...

local cfg = config.merge({
  gguf = pretrained.SMOLLM2,
  dir = '',              -- a Hugging Face directory instead of the GGUF
  text = '',             -- a text file instead of the King James Bible
  text_bytes = 400000,   -- the corpus prefix cut into blocks
  L = 128,               -- tokens per block
  held = 48,             -- held-out blocks (perplexity)
  calib = 32,            -- calibration blocks (disjoint from the held-out ones)
  batch = 8,
  refine = 4,            -- alternating refinement rounds of the weighted init
  rows = 'teacher,q4,q4w,q4k,q2,q2w,q2k',
  seed = 0,
}, args)

-- model; blocks: held-out first, calibration after (never the same block) -----------------------
local src = pretrained.load{gguf = cfg.gguf, dir = cfg.dir}
local fresh = src.fresh
local cut = pretrained.blocks(src.tokenizer, {text = cfg.text, bytes = cfg.text_bytes, L = cfg.L, seed = cfg.seed,
                                              held = cfg.held, calib = cfg.calib, batch = cfg.batch})
local held, calib = cut.held, cut.calib
log.info(('%d blocks of %d tokens: %d held out, %d for calibration'):format(
  cut.all:size(1), cfg.L, cfg.held, cfg.calib))

local function perplexity(m) return pretrained.perplexity(m, held, cfg.batch) end   -- exp(mean next-token CE)

-- rows -----------------------------------------------------------------------------------------
local want = {}
for r in cfg.rows:gmatch('[^,]+') do want[#want + 1] = r end
local stats
local function imatrix()
  if not stats then
    local t0 = qatlab.time()
    local tokens
    stats, tokens = quant.calibrate(fresh(), calib)
    log.info(('calibration: %d tokens through %d projections in %.1f s'):format(
      tokens, (function() local k = 0 for _ in pairs(stats) do k = k + 1 end return k end)(), qatlab.time() - t0))
  end
  return stats
end
local ROWS = {
  teacher = {label = 'teacher (float)'},
  q4 = {label = 'Q4 (q4a4), seed init', opts = {preset = 'q4a4'}},
  q4x = {label = 'Q4 (q4a4), seed init, exact SVD', opts = {preset = 'q4a4', svd = 'exact'}},
  q4w = {label = 'Q4 (q4a4), weighted init', opts = {preset = 'q4a4', init = 'weighted'}, data = true},
  q4k = {label = 'Q4 (q4a4), weighted + k-means LUT', opts = {preset = 'q4a4', init = 'weighted', lut = 'kmeans'},
         data = true},
  q2 = {label = 'Q2 MLP / Q4 attn (q2a4), seed init', opts = {preset = 'q2a4'}},
  q2w = {label = 'Q2 MLP / Q4 attn (q2a4), weighted init', opts = {preset = 'q2a4', init = 'weighted'}, data = true},
  q2k = {label = 'Q2 MLP / Q4 attn (q2a4), weighted + k-means LUT',
         opts = {preset = 'q2a4', init = 'weighted', lut = 'kmeans'}, data = true},
}
local results, teacher_ppl = {}, nil
for _, key in ipairs(want) do
  local row = ROWS[key]
  if not row then error(("rows: unknown row '%s'"):format(key), 0) end
  local m = fresh()
  local init_s, bpw, bpw_model = 0, 16, 16
  if row.opts then
    local opts = {}
    for k, v in pairs(row.opts) do opts[k] = v end
    if row.data then
      opts.imatrix = imatrix()
      opts.refine = cfg.refine
    end
    local _, info = quant.replace(m, opts)
    init_s = info.seconds
    local b = quant.bits_per_weight(m)
    bpw, bpw_model = b.quantized, b.model
  end
  local t0 = qatlab.time()
  local ppl = perplexity(m)
  if key == 'teacher' then teacher_ppl = ppl end
  local r = {row = key, label = row.label, ppl = ppl, ratio = teacher_ppl and ppl / teacher_ppl or nil,
             bpw = bpw, bpw_model = bpw_model, init_seconds = init_s, refine = row.data and cfg.refine or 0}
  results[#results + 1] = r
  log.info(('%-48s ppl %10.2f  x teacher %s  bpw %.3f (model %.3f)  init %.1f s  eval %.1f s'):format(
    row.label, ppl, r.ratio and ('%.3f'):format(r.ratio) or '-', bpw, bpw_model, init_s, qatlab.time() - t0))
  m = nil   -- luacheck: ignore 311
  collectgarbage()
end

-- table ----------------------------------------------------------------------------------------
print(('\nSmolLM2-135M-Instruct, %d held-out blocks of %d tokens, calibration %d blocks, refine %d\n'):format(
  cfg.held, cfg.L, cfg.calib, cfg.refine))
print('| model | perplexity | x teacher | bits/weight (quantized layers) | bits/weight (model) | init s |')
print('|---|---:|---:|---:|---:|---:|')
for _, r in ipairs(results) do
  print(('| %s | %.2f | %s | %.3f | %.3f | %.1f |'):format(r.label, r.ppl, r.ratio and ('%.3f'):format(r.ratio) or '-',
    r.bpw, r.bpw_model, r.init_seconds))
end
if qatlab.out then
  local path = qatlab.out .. '/results.json'
  local f = assert(io.open(path .. '.tmp', 'w'))
  f:write(json.encode({config = cfg, results = results}), '\n')
  f:close()
  assert(os.rename(path .. '.tmp', path))
  log.info('wrote ' .. path)
end
