-- recovery_lora_smollm2: the seed's recovery LoRA on SmolLM2-135M-Instruct quantized to Q2-MLP/Q4-attn
-- (weighted init), trained by KD from the float teacher, then merged by resnap_with_lora: perplexity per stage.
--
--   qatlab run --threads 1 experiments/recovery_lora_smollm2.lua [--set steps=30] [--set rank=8]
--          [--set lr=1e-3] [--set batch=2] [--set held=16] [--set refine=2] [--set dir=HF_DIR]
local torch = require 'torch'
local optim = require 'optim'
local quant = require 'quant'
local log = require 'log'
local json = require 'json'
local config = require 'config'
local qatlab = require 'qatlab'
local qo = require 'qat_options'
local pretrained = require 'pretrained'
local args = ...

local cfg = config.merge({
  gguf = pretrained.SMOLLM2,
  dir = '',              -- a Hugging Face directory instead of the GGUF
  text_bytes = 400000,   -- the KJV prefix cut into blocks
  L = 128,               -- tokens per block
  held = 16,             -- held-out blocks (perplexity)
  calib = 16,            -- calibration blocks
  preset = 'q2a4',
  refine = 2,
  rank = 8,              -- LoRA rank (alpha = rank: scaling 1, the seed's default)
  mlp_only = false,
  steps = 30,            -- KD steps on the LoRA
  batch = 2,
  lr = 1e-3,
  T = 1,                 -- KD temperature
  seed = 0,
}, args)

-- model and blocks: held-out, calibration, training (disjoint) ------------------------------------
local src = pretrained.load{gguf = cfg.gguf, dir = cfg.dir}
local fresh = src.fresh
local cut = pretrained.blocks(src.tokenizer, {bytes = cfg.text_bytes, L = cfg.L, seed = cfg.seed, held = cfg.held,
                                              calib = cfg.calib, batch = cfg.batch})
local held, calib, train = cut.held, cut.calib, cut.train
local n_train = train:size(1)
assert(n_train >= cfg.batch, ('%d blocks of %d tokens: raise text_bytes'):format(cut.all:size(1), cfg.L))
log.info(('%d blocks of %d tokens: %d held out, %d calibration, %d training'):format(
  cut.all:size(1), cfg.L, cfg.held, cfg.calib, n_train))

local function perplexity(m) return pretrained.perplexity(m, held, cfg.batch) end

-- stages ---------------------------------------------------------------------------------------
local rows = {}
local function row(stage, m, extra)
  local t0 = qatlab.time()
  local ppl = perplexity(m)
  local r = {stage = stage, ppl = ppl, ratio = rows[1] and ppl / rows[1].ppl or 1, bpw = 16, bpw_model = 16}
  if stage ~= 'teacher (float)' then
    local b = quant.bits_per_weight(m)
    r.bpw, r.bpw_model = b.quantized, b.model
  end
  for k, v in pairs(extra or {}) do r[k] = v end
  if r.lora_params then   -- the adapters at 16 bits (bits_per_weight counts V2 layers' LUT, indices, scales)
    local b = quant.bits_per_weight(m)
    r.bpw = r.bpw + 16 * r.lora_params / b.quantized_weights
    r.bpw_model = (b.bits + 16 * r.lora_params) / b.model_weights
  end
  rows[#rows + 1] = r
  log.info(('%-34s ppl %10.2f  x teacher %.3f  bpw %.3f (model %.3f)  eval %.1f s'):format(
    stage, ppl, r.ratio, r.bpw, r.bpw_model, qatlab.time() - t0))
end

local teacher = fresh()
row('teacher (float)', teacher)

local t0 = qatlab.time()
local stats = quant.calibrate(teacher, calib)
local student = fresh()
quant.replace(student, {preset = cfg.preset, init = 'weighted', imatrix = stats, refine = cfg.refine})
log.info(('calibration + weighted init: %.1f s'):format(qatlab.time() - t0))
row(('%s, weighted init'):format(cfg.preset), student)

-- recovery LoRA: adapters on every V2 layer but k_proj, only they train, KD from the online teacher
torch.manual_seed(cfg.seed)
local _, info = quant.enable_recovery_lora_all(student, {rank = cfg.rank, mlp_only = cfg.mlp_only})
quant.freeze_for_recovery_training(student)
log.info(('recovery LoRA rank %d on %d layers: %d parameters'):format(cfg.rank, info.layers, info.params))
local params = {}
for _, p in ipairs(student:named_parameters()) do if p[2].requires_grad then params[#params + 1] = p[2] end end
local opt = optim.AdamW(params, {lr = cfg.lr, weight_decay = 0})
student:train()
t0 = qatlab.time()
local first, last
for s = 1, cfg.steps do
  local start = ((s - 1) * cfg.batch) % (n_train - cfg.batch + 1)
  local ids = train:narrow(1, start + 1, cfg.batch)
  local tl = torch.no_grad(function() return teacher(ids) end)
  opt:zero_grad()
  local loss = qo.kl(tl, student(ids), cfg.T)
  loss:backward()
  opt:step()
  last = loss:item()
  first = first or last
  if s == 1 or s % 10 == 0 or s == cfg.steps then
    log.info(('step %3d/%d  KL %.4f  %.1f s/step'):format(s, cfg.steps, last, (qatlab.time() - t0) / s))
  end
end
local train_s = qatlab.time() - t0
student:eval()
row(('+ recovery LoRA r%d, %d KD steps'):format(cfg.rank, cfg.steps), student,
    {kl_first = first, kl_last = last, train_seconds = train_s, lora_params = info.params})

local st = quant.resnap_with_lora(student)
log.info(('resnap: %d layers, %d of %d indices changed (%.2f%%), mean relative error %.4f'):format(
  st.layers, st.changed, st.weights, 100 * st.changed / st.weights, st.rel_error))
row('after resnap_with_lora (no LoRA)', student, {changed = st.changed, weights = st.weights})

-- table ----------------------------------------------------------------------------------------
print(('\nSmolLM2-135M-Instruct, %s weighted init (refine %d), %d held-out KJV blocks of %d tokens;' ..
  ' LoRA rank %d, %d KD steps of %d blocks, lr %g\n'):format(cfg.preset, cfg.refine, cfg.held, cfg.L, cfg.rank,
  cfg.steps, cfg.batch, cfg.lr))
print('| stage | perplexity | x teacher | bits/weight (quantized layers) | bits/weight (model) |')
print('|---|---:|---:|---:|---:|')
for _, r in ipairs(rows) do
  print(('| %s | %.2f | %.3f | %.3f | %.3f |'):format(r.stage, r.ppl, r.ratio, r.bpw, r.bpw_model))
end
print(('\nKD KL %.4f -> %.4f over %d steps (%.1f s); resnap changed %.2f%% of the indices'):format(
  first or 0, last or 0, cfg.steps, train_s, 100 * st.changed / math.max(st.weights, 1)))
if qatlab.out then
  local path = qatlab.out .. '/results.json'
  local f = assert(io.open(path .. '.tmp', 'w'))
  f:write(json.encode({config = cfg, results = rows}), '\n')
  f:close()
  assert(os.rename(path .. '.tmp', path))
  log.info('wrote ' .. path)
end
