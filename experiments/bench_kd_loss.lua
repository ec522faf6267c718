-- bench_kd_loss: peak memory and time of the KD loss (docs/formulas.md §6, defaults T=2, hard 0.2 + 0.00005)
-- forward + backward w.r.t. h, fused and chunked (kd.loss) vs unfused (kd.loss_reference), at a
-- Qwen3-like vocabulary (V 151936, H 1024, K 32) on the CPU. A benchmark, not a test.
--
--   qatlab run experiments/bench_kd_loss.lua [--set n=384 (default: 256 and 512)] [--set chunk=128] [--set iters=2]
--
-- Each (variant, N) runs in child processes (--set child=fused|unfused): `reps` timed with the normal allocator,
-- alternating with the other variant's, and one measuring
-- memory with MALLOC_MMAP_THRESHOLD_=65536 (freed blocks go back to the OS, so the RSS follows the
-- live bytes): memory = peak RSS during a step (VmHWM after clear_refs) minus the RSS before it,
-- i.e. logits, autograd buffers and temporaries (W and h exist before). Prints a Markdown table.
local torch = require 'torch'
local kd = require 'kd'
local qatlab = require 'qatlab'
local config = require 'config'
local args = ...
local bench = require 'bench'
local median, sh, status_kb, reset_hwm = bench.median, bench.sh, bench.status_kb, bench.reset_peak_rss

local cfg = config.merge({
  child = '',           -- '' = driver; else the child's variant, 'fused' or 'unfused'
  measure = 'time',     -- child: 'time' or 'mem'
  n = 0,                -- N = B·S positions; 0 = the driver runs 256 and 512
  vocab = 151936, hidden = 1024, k = 32, seq = 64, chunk = 128,
  iters = 2, warmup = 1, threads = 1, dtype = 'float32',
  reps = 3,             -- timed children per variant, alternating unfused / fused (the median is shown)
}, args)

if cfg.child ~= '' then
  -- child: one variant at one N -------------------------------------------------------------
  torch.set_num_threads(cfg.threads)
  torch.manual_seed(0)
  local S = math.min(cfg.seq, cfg.n)
  local B = math.floor(cfg.n / S)
  local W = torch.randn(cfg.vocab, cfg.hidden, {dtype = cfg.dtype}) * 0.02
  local h0 = torch.randn(B, S, cfg.hidden, {dtype = cfg.dtype})
  local tl, ti = (torch.randn(B, S, cfg.vocab) * 3):topk(cfg.k)   -- a teacher's sorted top-k
  local batch = {topk_idx = ti:int(), topk_logits = tl:half()}
  local f = cfg.child == 'fused' and kd.loss or kd.loss_reference
  local last
  local function step()
    local h = h0:clone():requires_grad_()
    local loss = f(h, W, batch, {chunk = cfg.chunk})
    loss:backward()
    last = loss:item()
  end
  for _ = 1, cfg.warmup do step() end
  collectgarbage(); collectgarbage()
  local times, peaks = {}, {}
  for i = 1, cfg.iters do
    collectgarbage(); collectgarbage()
    local rss0 = status_kb('VmRSS')
    reset_hwm()
    local t0 = qatlab.time()
    step()
    times[i] = qatlab.time() - t0
    peaks[i] = (status_kb('VmHWM') - rss0) * 1024
  end
  print(('RESULT %s %.6f %.0f %.9g'):format(cfg.child, median(times), median(peaks), last))
  return
end

-- driver --------------------------------------------------------------------------------------
local qbin = bench.qatlab_bin()
if not qbin:match('qatlab$') then qbin = qatlab.scripts_dir .. '/../build/qatlab' end
local function child(variant, measure, n)
  local cmd = ('%s%s run --device cpu %s --set child=%s --set measure=%s --set n=%d --set vocab=%d '
               .. '--set hidden=%d --set k=%d --set seq=%d --set chunk=%d --set iters=%d --set warmup=%d '
               .. '--set threads=%d --set dtype=%s'):format(
    measure == 'mem' and 'MALLOC_MMAP_THRESHOLD_=65536 ' or '', qbin, qatlab.script, variant, measure, n,
    cfg.vocab, cfg.hidden, cfg.k, cfg.seq, cfg.chunk, cfg.iters, cfg.warmup, cfg.threads, cfg.dtype)
  io.stderr:write(('[bench_kd_loss] %s N=%d (%s) ...\n'):format(variant, n, measure))
  local out = sh(cmd .. ' 2>&1')
  local t, mem, loss = out:match('RESULT %S+ (%S+) (%S+) (%S+)')
  if not t then error(('child %s N=%d failed:\n%s'):format(variant, n, out), 0) end
  io.stderr:write(('[bench_kd_loss]   %s N=%d (%s): %s s, %s bytes\n'):format(variant, n, measure, t, mem))
  return tonumber(t), tonumber(mem), tonumber(loss)
end

local function loadavg()
  local f = io.open('/proc/loadavg')
  local s = f and f:read('*l') or ''
  if f then f:close() end
  return s:match('^(%S+ %S+ %S+)') or 'n/a'
end
print(('\nKD loss forward + backward (dL/dh), V %d, H %d, K %d, chunk %d, %s, CPU, %d threads, load average %s; '
  .. 'time = median of %d alternating children\n'):format(cfg.vocab, cfg.hidden, cfg.k, cfg.chunk, cfg.dtype,
  cfg.threads, loadavg(), cfg.reps))
print('| N = B·S | unfused time (s) | fused time (s) | unfused peak (MB) | fused peak (MB) | memory ratio '
      .. '| loss rel. diff | fused / unfused time | fused / unfused memory |')
print('|---|---|---|---|---|---|---|---|---|')
for _, n in ipairs(cfg.n > 0 and {cfg.n} or {256, 512}) do
  -- timed children alternate (unfused, fused, unfused, ...): on a shared machine the load drifts, and
  -- back-to-back pairs see the same conditions
  local r = {unfused = {times = {}}, fused = {times = {}}}
  for _ = 1, cfg.reps do
    for _, v in ipairs({'unfused', 'fused'}) do
      local t, _, loss = child(v, 'time', n)
      r[v].times[#r[v].times + 1], r[v].loss = t, loss
    end
  end
  for _, v in ipairs({'unfused', 'fused'}) do
    r[v].time = median(r[v].times)
    r[v].mem = select(2, child(v, 'mem', n))
  end
  local u, f = r.unfused, r.fused
  print(('| %d | %.2f | %.2f | %.0f | %.0f | %.1fx | %.1e | %.2f | %.3f |'):format(n, u.time, f.time, u.mem / 2 ^ 20,
        f.mem / 2 ^ 20, u.mem / math.max(f.mem, 1), math.abs(u.loss - f.loss) / math.abs(u.loss), f.time / u.time,
        f.mem / math.max(u.mem, 1)))
  print(('times (s): unfused %s; fused %s; load average %s'):format(table.concat(u.times, ' '),
        table.concat(f.times, ' '), loadavg()))
end
