-- bench_quant_forms: training-step time (forward + backward) and peak step memory of the V2
-- layer's three forward forms (materialized W_eff = Q ⊙ S + one GEMM, the seed's per-rank loop,
-- the seed's batched einsum) on Qwen3-0.6B-shaped decoder layers (hidden 1024, intermediate
-- 3072, q 2048x1024, k/v 1024x1024, o 1024x2048), Q2A4, on the CPU. A benchmark, not a test.
--
--   qatlab run experiments/bench_quant_forms.lua [--set layers=1] [--set tokens=128] [--set iters=3]
--   (a smoke-test size: --set hidden=64 --set inter=128 --set heads=4 --set kv_heads=2 --set head_dim=16)
--
-- Each form runs in two child processes: one timed with the normal allocator, one measuring
-- memory with MALLOC_MMAP_THRESHOLD_=65536 (freed blocks go back to the OS, so the RSS follows
-- the live bytes): memory = peak RSS during a step (VmHWM after clear_refs) minus the RSS before
-- it, i.e. activations, autograd buffers, gradients and temporaries. Prints a Markdown table.
local torch = require 'torch'
local nn = require 'nn'
local quant = require 'quant'
local qatlab = require 'qatlab'
local config = require 'config'
local args = ...
local bench = require 'bench'
local median, sh, status_kb, reset_hwm = bench.median, bench.sh, bench.status_kb, bench.reset_peak_rss

local cfg = config.merge({
  child = '',           -- '' = driver (runs every form in children); else the child's form
  measure = 'time',     -- child: 'time' or 'mem' (the driver sets the allocator for 'mem')
  layers = 1, batch = 1, tokens = 128, iters = 3, warmup = 1, threads = 2,
  preset = 'q2a4', ste_fp16 = false, vocab = 1024,
  hidden = 1024, inter = 3072, heads = 16, kv_heads = 8, head_dim = 128,   -- Qwen3-0.6B's decoder layer
}, args)

if cfg.child ~= '' then
  -- child: one form ------------------------------------------------------------------------
  torch.set_num_threads(cfg.threads)
  torch.manual_seed(0)
  local m = nn.from_config({
    model_type = 'qwen3', vocab_size = cfg.vocab, hidden_size = cfg.hidden, intermediate_size = cfg.inter,
    num_hidden_layers = cfg.layers, num_attention_heads = cfg.heads, num_key_value_heads = cfg.kv_heads,
    head_dim = cfg.head_dim,
    max_position_embeddings = 4096, tie_word_embeddings = true, initializer_range = 0.02,
  })
  quant.replace(m, {preset = cfg.preset, forward = cfg.child, ste_fp16 = cfg.ste_fp16})
  quant.set_trainable(m, 'all')
  m:train()
  local ids = torch.randint(0, cfg.vocab, {cfg.batch, cfg.tokens})
  local params = {}
  for _, p in ipairs(m:parameters()) do if p.requires_grad then params[#params + 1] = p end end
  local function step()
    for _, p in ipairs(params) do p.grad = nil end
    local h = m:forward(ids, {output = 'hidden'})
    h:pow(2):mean():backward()
  end
  for _ = 1, cfg.warmup do step() end
  collectgarbage(); collectgarbage()
  local times, peaks = {}, {}
  for i = 1, cfg.iters do
    for _, p in ipairs(params) do p.grad = nil end
    collectgarbage(); collectgarbage()
    local rss0 = status_kb('VmRSS')
    reset_hwm()
    local t0 = qatlab.time()
    step()
    times[i] = qatlab.time() - t0
    peaks[i] = (status_kb('VmHWM') - rss0) * 1024
  end
  print(('RESULT %s %.6f %.0f'):format(cfg.child, median(times), median(peaks)))
  return
end

-- driver --------------------------------------------------------------------------------------
local qbin = bench.qatlab_bin()
if not qbin:match('qatlab$') then qbin = qatlab.scripts_dir .. '/../build/qatlab' end
local script = qatlab.script
local forms = {'materialized', 'loop', 'batched'}
local res = {}
local function child(f, measure)
  local cmd = ('%s%s run --device cpu %s --set child=%s --set measure=%s --set layers=%d --set batch=%d '
               .. '--set tokens=%d --set iters=%d --set warmup=%d --set threads=%d --set preset=%s '
               .. '--set ste_fp16=%s --set vocab=%d --set hidden=%d --set inter=%d --set heads=%d '
               .. '--set kv_heads=%d --set head_dim=%d'):format(
    measure == 'mem' and 'MALLOC_MMAP_THRESHOLD_=65536 ' or '', qbin, script, f, measure, cfg.layers, cfg.batch,
    cfg.tokens, cfg.iters, cfg.warmup, cfg.threads, cfg.preset, tostring(cfg.ste_fp16), cfg.vocab, cfg.hidden,
    cfg.inter, cfg.heads, cfg.kv_heads, cfg.head_dim)
  io.stderr:write(('[bench_quant_forms] %s (%s) ...\n'):format(f, measure))
  local out = sh(cmd .. ' 2>&1')
  local t, mem = out:match('RESULT %S+ (%S+) (%S+)')
  if not t then error('child for form ' .. f .. ' failed:\n' .. out, 0) end
  return tonumber(t), tonumber(mem)
end
for _, f in ipairs(forms) do
  local t = child(f, 'time')
  local _, mem = child(f, 'mem')
  res[f] = {time = t, mem = mem}
end

print(('\nV2 training step (forward + backward), hidden %d, intermediate %d%s, %d decoder layer(s) x 7 projections, '
       .. '%s, %d x %d tokens, CPU, %d threads, STE-FP16 %s\n'):format(cfg.hidden, cfg.inter,
       (cfg.hidden == 1024 and cfg.inter == 3072) and ' (Qwen3-0.6B)' or '', cfg.layers, cfg.preset, cfg.batch,
       cfg.tokens, cfg.threads, tostring(cfg.ste_fp16)))
print('| form | step time (s) | time / materialized | peak step memory (MB) | memory / materialized |')
print('|---|---|---|---|---|')
local base = res.materialized
for _, f in ipairs(forms) do
  local r = res[f]
  print(('| %s | %.3f | %.2fx | %.1f | %.2fx |'):format(f, r.time, r.time / base.time, r.mem / 2 ^ 20,
        r.mem / math.max(base.mem, 1)))
end
