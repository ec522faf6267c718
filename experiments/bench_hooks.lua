-- bench_hooks: what module hooks and Lua layers cost. A training step (forward + backward) of a
-- decoder with no hooks, with a no-op Lua forward hook on every module, and with every projection
-- an nn.Linear (Lua) instead of the C++ dense layer; same weights and batch, alternated rounds.
--
--   qatlab run experiments/bench_hooks.lua [--set layers=4] [--set hidden=256] [--set tokens=256]
local torch = require 'torch'
local nn = require 'nn'
local qatlab = require 'qatlab'
local config = require 'config'
local bench = require 'bench'
local args = ...

local cfg = config.merge({
  layers = 4, hidden = 256, heads = 8, kv_heads = 4, vocab = 2048, batch = 4, tokens = 128,
  iters = 7, warmup = 2, threads = 2,
}, args)
torch.set_num_threads(cfg.threads)

local shape = {
  model_type = 'qwen3', vocab_size = cfg.vocab, hidden_size = cfg.hidden, intermediate_size = 3 * cfg.hidden,
  num_hidden_layers = cfg.layers, num_attention_heads = cfg.heads, num_key_value_heads = cfg.kv_heads,
  max_position_embeddings = 4096, tie_word_embeddings = true, initializer_range = 0.02,
}
local function model()
  torch.manual_seed(0)
  return nn.from_config(shape)
end

local plain, hooked, lua = model(), model(), model()
local n_hooks = 0
for _, m in ipairs(hooked:named_modules()) do
  hooked:register_forward_hook(m[1], function() end)
  n_hooks = n_hooks + 1
end
for _, name in ipairs(lua:linear_names()) do
  lua:set_linear(name, nn.Linear.from_weight(lua:get_linear(name):clone()))
end
local ids = torch.randint(0, cfg.vocab, {cfg.batch, cfg.tokens})
local arms = {
  {'no hooks (C++ layers)', plain},
  {('a no-op Lua hook on each of %d modules'):format(n_hooks), hooked},
  {('every projection an nn.Linear in Lua (%d)'):format(#lua:linear_names()), lua},
}
local function step(m)
  for _, p in ipairs(m:parameters()) do p.grad = nil end
  m:loss(ids):backward()
end
for _ = 1, cfg.warmup do for _, a in ipairs(arms) do step(a[2]) end end
local times = {}
for _ = 1, cfg.iters do
  for i, a in ipairs(arms) do
    collectgarbage()
    local t0 = qatlab.time()
    step(a[2])
    times[i] = times[i] or {}
    times[i][#times[i] + 1] = qatlab.time() - t0
  end
end
print()
print(('## Hooks and Lua layers: training step, %d layers, hidden %d, %d tokens, %d threads (%s), median of %d'):format(
  cfg.layers, cfg.hidden, cfg.batch * cfg.tokens, cfg.threads, bench.device_name(), cfg.iters))
print()
print('| model | s/step | × no hooks |')
print('|---|---:|---:|')
local base = bench.median(times[1])
local out = {}
for i, a in ipairs(arms) do
  local t = bench.median(times[i])
  out[i] = t
  print(('| %s | %.4f | %.3f |'):format(a[1], t, t / base))
end
return out
