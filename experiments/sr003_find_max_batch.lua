-- SR-003 (the seed's performance benchmark): the largest training batch that fits, with and
-- without activation checkpointing, and the throughput at each tried batch, in the seed's table
-- (| Batch | Step(s) | Memory | t/s | Loss | Status |). A Qwen3-shaped model with V2 LUT layers
-- (quant.replace) trains on random tokens; on the CPU a memory budget (peak RSS) plays the GPU.
-- loss=ce: next-token cross-entropy. loss=kd: the seed's train_e2e loss (docs/formulas.md §6: KD at T=2 on a teacher's
-- top-K cache plus the full-vocabulary CE at weight hard_full), the cache written by the float model before
-- quantization (the seed's student starts as a quantized copy of its teacher), or read from --set cache=DIR.
--
--   build/qatlab run experiments/sr003_find_max_batch.lua [--set loss=kd]
--   build/qatlab run experiments/sr003_find_max_batch.lua --set mode=nanochat --set budget_gib=4
--   build/qatlab run experiments/sr003_find_max_batch.lua --device cuda --set hidden=1024 \
--     --set layers=28 --set heads=16 --set kv_heads=8 --set inter=3072 --set vocab=151936 \
--     --set seq=64 --set max=512 --set multiple=8 --set dtype=bfloat16
local args = ...
local torch, nn, quant, optim, kd = require 'torch', require 'nn', require 'quant', require 'optim', require 'kd'
local config, bench, qatlab = require 'config', require 'bench', require 'qatlab'

local cfg = config.merge({
  vocab = 4096, hidden = 256, inter = 768, layers = 4, heads = 4, kv_heads = 2, head_dim = 64,
  seq = 64, preset = 'q4a4', dtype = 'float32',
  min = 1, max = 256, mode = 'binary', safety = 0.9, multiple = 1,
  budget_gib = 2, warmup = 1, steps = 3, checkpointing = 'both', lr = 1e-5,
  loss = 'ce',          -- 'ce' or 'kd'
  K = 32, T = 2, hard_top1 = 0, hard_full = 0.0005,   -- loss=kd: the seed's benchmark (train_e2e defaults)
  cache = '',           -- loss=kd: an existing KD cache (ours or the seed's shard_*.pt); '' = build one
}, args)
if cfg.loss ~= 'ce' and cfg.loss ~= 'kd' then
  error(("--set loss: expected 'ce' or 'kd', got %q"):format(tostring(cfg.loss)), 0)
end

local device = qatlab.device or 'cpu'
local cuda = tostring(device):match('^cuda') ~= nil

local model = nn.from_config({
  model_type = 'qwen3', vocab_size = cfg.vocab, hidden_size = cfg.hidden, intermediate_size = cfg.inter,
  num_hidden_layers = cfg.layers, num_attention_heads = cfg.heads, num_key_value_heads = cfg.kv_heads,
  head_dim = cfg.head_dim, max_position_embeddings = math.max(cfg.seq, 64), tie_word_embeddings = true,
})

-- loss=kd: a pool of cached batches (input_ids, attention_mask, top-K ids and logits); a try of batch b takes
-- rows 1..b of it (cycled when b exceeds the pool).
local pool
if cfg.loss == 'kd' then
  local dir, tmp = cfg.cache, nil
  if dir == '' then
    tmp = os.tmpname()
    os.remove(tmp)
    dir = tmp
    model:to{device = device}   -- the fp32 teacher runs on the GPU (under bf16 autocast there)
    torch.manual_seed(0)
    local ids = torch.randint(0, cfg.vocab, {cfg.max, cfg.seq}, {dtype = 'int64'})
    local t0 = qatlab.time()
    kd.build_cache{teacher = model, data = ids, K = cfg.K, out = dir, batch_size = 8, overwrite = true}
    print(('KD cache: %d sequences x %d tokens, top-%d of the float teacher, built in %.2f s'):format(cfg.max,
      cfg.seq, cfg.K, qatlab.time() - t0))
  end
  local r = kd.open_cache(dir, {batch_size = math.max(cfg.max, 1), shuffle = false, with_rand = false})
  pool = r:next() or error('KD cache ' .. dir .. ' holds no sequences', 0)
  r:close()
  if tmp then os.execute("rm -rf '" .. tmp .. "'") end
  cfg.seq = pool.input_ids:size(2)   -- the cache's L sets the tokens per sequence
  for k, v in pairs(pool) do pool[k] = v:to{device = device} end
end

quant.replace(model, {preset = cfg.preset})
quant.set_trainable(model, 'all')
model:to{device = device, dtype = cfg.dtype}
model:train()
local opt = optim.AdamW(model, {lr = cfg.lr, weight_decay = 0})

-- One training step on `batch` cached sequences: the KD loss, backward, AdamW.
local function kd_step(batch)
  local rows = torch.arange(batch, {dtype = 'int64', device = device}) % pool.input_ids:size(1)
  local b = {}
  for k, v in pairs(pool) do b[k] = v:index_select(1, rows) end
  local loss = kd.loss_model(model, b, {T = cfg.T, hard_top1 = cfg.hard_top1, hard_full = cfg.hard_full})
  loss:backward()
  opt:step()
  opt:zero_grad()
  local v = loss:item()
  loss:free()
  for _, t in pairs(b) do t:free() end
  return v
end

-- One training step on random tokens: next-token cross-entropy, backward, AdamW.
local function ce_step(batch)
  local ids = torch.randint(0, cfg.vocab, {batch, cfg.seq + 1}, {dtype = 'int64', device = device})
  local loss = model:loss(ids)   -- chunked over the vocabulary: no (B, T, V) logits live whole
  loss:backward()
  opt:step()
  opt:zero_grad()
  local v = loss:item()
  loss:free()
  return v
end
local make_step = cfg.loss == 'kd' and kd_step or ce_step

print(('SR-003: qwen3 %d layers, hidden %d, vocab %d, %s, seq %d, %s loss, device %s, %s'):format(cfg.layers,
  cfg.hidden, cfg.vocab, cfg.preset, cfg.seq,
  cfg.loss == 'kd' and ('KD (T=%g, top-%d, hard_full %g)'):format(cfg.T, pool.topk_idx:size(3), cfg.hard_full)
    or 'CE', device,
  cuda and 'CUDA OOM' or ('CPU budget %g GiB (peak RSS)'):format(cfg.budget_gib)))
local results = {}
local variants = cfg.checkpointing == 'both' and {true, false}
  or {cfg.checkpointing == true or cfg.checkpointing == 'on'}
for _, ckpt in ipairs(variants) do
  model:gradient_checkpointing(ckpt)
  local r = bench.find_max_batch{
    make_step = make_step, seq = cfg.seq, min = cfg.min, max = cfg.max, mode = cfg.mode, safety = cfg.safety,
    multiple = cfg.multiple, warmup = cfg.warmup, steps = cfg.steps, device = device,
    memory_budget = (not cuda) and cfg.budget_gib * 2 ^ 30 or nil,
    title = ('\n### gradient checkpointing %s'):format(ckpt and 'on' or 'off'),
  }
  results[#results + 1] = {ckpt = ckpt, r = r}
end
print()
for _, e in ipairs(results) do
  local best_tps = 0
  for _, row in ipairs(e.r.rows) do if row.tokens_s and row.tokens_s > best_tps then best_tps = row.tokens_s end end
  print(('checkpointing %-3s: max batch %s, best %s, best throughput %s t/s'):format(e.ckpt and 'on' or 'off',
    tostring(e.r.max_ok), tostring(e.r.best), bench.commas(best_tps)))
end
