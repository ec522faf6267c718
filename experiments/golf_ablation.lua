-- golf_ablation: the parameter-golf ablation of PR #488 (int6 QAT, mixed int5/int6, wall-clock warm-down
-- + SWA, warm-down + late EMA) on a small GPT (qatlab_gpt: ReLU^2 MLP, logit softcap, GQA, tied embeddings)
-- trained from scratch on King James Bible tokens (SentencePiece BPE) with next-token CE, Muon on the
-- block matrices and AdamW on the rest. Every variant gets the same wall-clock budget; int-N STE QAT switches
-- on for the last `qat_frac` of it. Each model goes through the int-N artifact round trip (quant.intn_export,
-- zstd; quant.intn_load back into the model) and is scored by held-out bits per byte (CE / ln 2 x tokens /
-- bytes); the artifact size is in bytes. Prints a Markdown table. Budgets are wall-clock, so steps depend on the
-- machine: on a shared CPU, --threads 1 avoids thread oversubscription stalls.
--
--   qatlab run experiments/golf_ablation.lua [--set tiny=true] [--set budget=60] [--out runs/golf]
local torch = require 'torch'
local F = require 'torch.nn.functional'
local nn = require 'nn'
local data = require 'data'
local quant = require 'quant'
local optim = require 'optim'
local tokenizers = require 'tokenizers'
local trainer = require 'trainer'
local schedule = require 'schedule'
local ema = require 'ema'
local config = require 'config'
local log = require 'log'
local qatlab = require 'qatlab'
local args = ...

local cfg = config.merge({
  text = '',            -- a text file to use instead of the King James Bible (data.kjv_text)
  tiny = false,          -- ~15 s smoke run
  text_bytes = 600000,   -- KJV prefix: tokenizer + training text
  held_bytes = 20000,    -- held-out text right after it
  vocab = 512,
  L = 64, batch = 16,
  hidden = 128, inter = 256, layers = 2,
  budget = 12,           -- seconds of training per variant
  matrix_lr = 0.02, adam_lr = 3e-3, warmup = 10,
  qat_frac = 0.15,       -- QAT on for the last 15% of the budget
  warmdown_frac = 0.3,
  ema_decay = 0.97,
  group_rows = 8,
  zstd_level = 22,
  seed = 0,
}, args)
if cfg.tiny then cfg.budget, cfg.held_bytes, cfg.text_bytes = 2, 6000, 300000 end
log.info('golf_ablation on ' .. qatlab.device .. ': ' .. config.format(cfg))

local function sh(cmd) assert(os.execute(cmd) == 0, 'failed: ' .. cmd) end
local work = qatlab.out or os.tmpname()
if not qatlab.out then os.remove(work) end
sh("mkdir -p '" .. work .. "'")

-- data ---------------------------------------------------------------------------------------------------
local kjv = cfg.text ~= '' and table.concat(data.read_text(cfg.text), '\n') or data.kjv_text()
local text = kjv:sub(1, cfg.text_bytes)
local held_text = kjv:sub(cfg.text_bytes + 1, cfg.text_bytes + cfg.held_bytes)
local tf = assert(io.open(work .. '/kjv_prefix.txt', 'wb'))
tf:write(text)
tf:close()
local tk = tokenizers.sentencepiece(tokenizers.train_sentencepiece{
  input = work .. '/kjv_prefix.txt', model_prefix = work .. '/sp', vocab_size = cfg.vocab, model_type = 'bpe'})
local train_ids = torch.tensor(tk:encode(text), {dtype = 'int64'})
local held_ids = torch.tensor(tk:encode(held_text), {dtype = 'int64'})
local V = tk:vocab_size()
log.info(('%d train tokens, %d held-out tokens (%.2f bytes/token), vocabulary %d'):format(
  train_ids:numel(), held_ids:numel(), #held_text / held_ids:numel(), V))

local offsets = torch.arange(cfg.L + 1)
local function batch()
  local ix = torch.randint(0, train_ids:numel() - cfg.L - 1, {cfg.batch})
  return train_ids:index_select(1, (ix:unsqueeze(2) + offsets):flatten()):view(cfg.batch, cfg.L + 1)
end
local function ce_loss(m, b)
  local x, y = b:narrow(2, 1, cfg.L), b:narrow(2, 2, cfg.L)
  return F.cross_entropy(m:forward(x):flatten(1, 2), y:flatten())          -- (B*L, V) logits, (B*L,) ids
end

-- held-out bits per byte: mean CE over blocks of L+1 tokens (nats/token) / ln 2 * tokens/bytes; one batched
-- forward (model:perplexity's sliding window gives the same up to the context at block starts, slower).
local n_blocks = math.floor(held_ids:numel() / (cfg.L + 1))
local held_blocks = held_ids:narrow(1, 1, n_blocks * (cfg.L + 1)):view(n_blocks, cfg.L + 1)
local function held_bpb(m)
  local ce = torch.no_grad(function() return ce_loss(m, held_blocks):item() end)
  return ce / math.log(2) * held_ids:numel() / #held_text
end

-- Muon on the block matrices, AdamW on embeddings and norms, behind one optimizer face for the trainer.
local function optimizer(m)
  local mats, rest = {}, {}
  for _, p in ipairs(m:named_parameters()) do
    if p[1]:find('_proj%.weight$') then mats[#mats + 1] = p else rest[#rest + 1] = p end
  end
  local parts = {optim.Muon(mats, {lr = cfg.matrix_lr}), optim.AdamW(rest, {lr = cfg.adam_lr, weight_decay = 0})}
  local o = {}
  function o.param_groups()
    local gs = {}
    for _, opt in ipairs(parts) do for _, g in ipairs(opt:param_groups()) do gs[#gs + 1] = g end end
    return gs
  end
  function o.set_lr(_, lr, i)
    if i then parts[i]:set_lr(lr) else for _, opt in ipairs(parts) do opt:set_lr(lr) end end
  end
  function o.step() for _, opt in ipairs(parts) do opt:step() end end
  function o.zero_grad() for _, opt in ipairs(parts) do opt:zero_grad() end end
  return o
end

local function new_model()
  return nn.from_config({model_type = 'qatlab_gpt', vocab_size = V, hidden_size = cfg.hidden,
                         intermediate_size = cfg.inter, num_hidden_layers = cfg.layers,
                         num_attention_heads = 4, num_key_value_heads = 2,
                         max_position_embeddings = cfg.L, tie_word_embeddings = true})
end

-- warm-up: the first QAT step pays one-time costs (seconds on a CPU) that would eat the first variant's budget
do
  local m = new_model()
  quant.intn_apply(m, {bits = 6, group_rows = cfg.group_rows, enabled = true})
  local o = optimizer(m)
  for _ = 1, 2 do ce_loss(m, batch()):backward(); o.step(); o.zero_grad() end
end

-- one variant ----------------------------------------------------------------------------------------------
local function run_variant(v)
  torch.manual_seed(cfg.seed)
  local model = new_model()
  local rules = {}
  local qat = {}
  if v.mixed then
    qat[1] = quant.intn_apply(model, {bits = 5, filter = 'mlp', group_rows = cfg.group_rows})
    qat[2] = quant.intn_apply(model, {bits = 6, filter = 'self_attn', group_rows = cfg.group_rows})
    rules = {{'mlp', bits = 5}}
  else
    qat[1] = quant.intn_apply(model, {bits = 6, group_rows = cfg.group_rows})
  end
  local switch = quant.intn_schedule{time_fraction = 1 - cfg.qat_frac}
  local sched = schedule.warmup{steps = cfg.warmup}
  if v.warmdown then sched = schedule.product(sched, schedule.warmdown{frac = cfg.warmdown_frac}) end
  local opt = optimizer(model)
  local params = {}
  for _, p in ipairs(model:named_parameters()) do params[#params + 1] = p[2] end
  local avg = v.swa and ema.swa(params, {start_frac = 1 - cfg.warmdown_frac})
  local late_ema -- EMA over the warm-down only ("late EMA")
  local qat_step
  local run = trainer.new{
    model = model, optimizer = opt, schedule = sched, loss = ce_loss, data = batch, time_budget = cfg.budget,
    progress = false, log_every = 0, save_final = false, eval_at_start = false,
    out = qatlab.out and (qatlab.out .. '/' .. v.name) or nil,
    hooks = {on_step = function(_, st)
      local ctx = {elapsed = st.elapsed, budget = cfg.budget}
      if switch:update(ctx) and not qat_step then
        for _, h in ipairs(qat) do h:enable(true) end
        qat_step = st.step
      end
      if avg then avg:update(params, st.step, ctx) end
      if v.ema and st.elapsed / cfg.budget >= 1 - cfg.warmdown_frac then
        late_ema = late_ema or ema.new(params, {decay = cfg.ema_decay})
        late_ema:update(params)
      end
    end},
  }
  local t_train = qatlab.time()
  local s = run:run()
  run:close()
  t_train = qatlab.time() - t_train
  if avg and avg.count > 0 then avg:copy_to(params) end
  if late_ema then late_ema:copy_to(params) end
  for _, h in ipairs(qat) do h:enable(false) end
  -- int-N artifact round trip: export, load, score the dequantized weights
  local path = work .. '/' .. v.name .. '.intn'
  local t_exp = qatlab.time()
  local bytes = quant.intn_export(model, path, {bits = 6, group_rows = cfg.group_rows, rules = rules,
                                                level = cfg.zstd_level})
  log.debug(('%s: train %.1f s, export %.1f s'):format(v.name, t_train, qatlab.time() - t_exp))
  local ts = quant.intn_load(path)
  model:load_state_dict(ts)
  model:eval()
  local ppl = {bpb = held_bpb(model)}
  log.info(('%-18s %5d steps  QAT from step %s  train CE %.4f  held-out %.4f bpb  artifact %d bytes'):format(
    v.name, s.steps, tostring(qat_step), s.train_loss or 0 / 0, ppl.bpb, bytes))
  return {name = v.label, steps = s.steps, bpb = ppl.bpb, bytes = bytes}
end

local variants = {
  {name = 'int6_qat', label = 'int6 QAT (baseline)'},
  {name = 'mixed_int5_int6', label = 'mixed int5 MLP / int6 attn', mixed = true},
  {name = 'warmdown_swa', label = '+ warm-down + SWA', warmdown = true, swa = true},
  {name = 'warmdown_ema', label = '+ warm-down + late EMA', warmdown = true, ema = true},
}
local rows = {}
for _, v in ipairs(variants) do rows[#rows + 1] = run_variant(v) end

print('\n| variant | steps | held-out bpb (int-N round trip) | artifact bytes |')
print('|---|---:|---:|---:|')
for _, r in ipairs(rows) do print(('| %s | %d | %.4f | %d |'):format(r.name, r.steps, r.bpb, r.bytes)) end
if not qatlab.out then sh("rm -rf '" .. work .. "'") end
