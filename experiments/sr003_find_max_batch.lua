-- SR-003 (the seed's performance benchmark): the largest training batch that fits, with and
-- without activation checkpointing, and the throughput at each tried batch, in the seed's table
-- (| Batch | Step(s) | Memory | t/s | Loss | Status |). A Qwen3-shaped model with V2 LUT layers
-- (quant.replace) trains on random tokens; on the CPU a memory budget (peak RSS) plays the GPU.
--
--   build/qatlab run experiments/sr003_find_max_batch.lua
--   build/qatlab run experiments/sr003_find_max_batch.lua --set mode=nanochat --set budget_gib=4
--   build/qatlab run experiments/sr003_find_max_batch.lua --device cuda --set hidden=1024 \
--     --set layers=28 --set heads=16 --set kv_heads=8 --set inter=3072 --set vocab=151936 \
--     --set seq=64 --set max=512 --set multiple=8 --set dtype=bfloat16
local args = ...
local torch, nn, quant, optim = require 'torch', require 'nn', require 'quant', require 'optim'
local config, bench, qatlab = require 'config', require 'bench', require 'qatlab'

local cfg = config.merge({
  vocab = 4096, hidden = 256, inter = 768, layers = 4, heads = 4, kv_heads = 2, head_dim = 64,
  seq = 64, preset = 'q4a4', dtype = 'float32',
  min = 1, max = 256, mode = 'binary', safety = 0.9, multiple = 1,
  budget_gib = 2, warmup = 1, steps = 3, checkpointing = 'both', lr = 1e-5,
}, args)

local device = qatlab.device or 'cpu'
local cuda = tostring(device):match('^cuda') ~= nil

local model = nn.from_config({
  model_type = 'qwen3', vocab_size = cfg.vocab, hidden_size = cfg.hidden, intermediate_size = cfg.inter,
  num_hidden_layers = cfg.layers, num_attention_heads = cfg.heads, num_key_value_heads = cfg.kv_heads,
  head_dim = cfg.head_dim, max_position_embeddings = math.max(cfg.seq, 64), tie_word_embeddings = true,
})
quant.replace(model, {preset = cfg.preset})
quant.set_trainable(model, 'all')
model:to{device = device, dtype = cfg.dtype}
model:train()
local opt = optim.AdamW(model, {lr = cfg.lr, weight_decay = 0})

-- One training step on random tokens: next-token cross-entropy, backward, AdamW.
local function make_step(batch)
  local ids = torch.randint(0, cfg.vocab, {batch, cfg.seq + 1}, {dtype = 'int64', device = device})
  local x, y = ids:narrow(2, 1, cfg.seq), ids:narrow(2, 2, cfg.seq)
  local logits = model(x):float()
  local logp = logits:log_softmax(-1)
  local loss = -logp:gather(3, y:unsqueeze(3)):mean()
  loss:backward()
  opt:step()
  opt:zero_grad()
  local v = loss:item()
  logits:free(); logp:free(); loss:free()
  return v
end

print(('SR-003: qwen3 %d layers, hidden %d, vocab %d, %s, seq %d, device %s, %s'):format(cfg.layers,
  cfg.hidden, cfg.vocab, cfg.preset, cfg.seq, device,
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
