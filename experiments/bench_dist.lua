-- bench_dist: data parallel on this node: the seed's V2-KD step (bench_train's model and loss) at a fixed
-- global batch, one process with T threads against N ranks of T/N threads (c10d: Gloo on the CPU, NCCL on GPUs).
--
--   build/qatlab run experiments/bench_dist.lua [--out runs/bench_dist]                  (CPU, tiny, ~1 min)
--   build/qatlab run experiments/bench_dist.lua --device cuda --set nproc=8 --set full=true --set batches=64,512
--
-- Options (--set key=value):
--   nproc=2        ranks of the data-parallel run (qatlab run --nproc N)
--   threads=0      threads of the one-process run (0 = nproc on the CPU); each rank gets threads/nproc (>= 1)
--   batches='8,32' global batches (each a multiple of nproc: every rank takes batch/nproc rows)
--   full=false tiny=false layers hidden inter heads kv_heads head_dim vocab L=64 K=32 preset='q2a4' lr=5e-5
--   warmup=1 steps=3   untimed + timed optimizer steps (step time = median of the timed ones)
--   bucket_mb=25   DDP gradient bucket size
--
-- Both runs build the same weights (on one thread, so the SVD initialisation rounds alike) and read
-- the same global batch, so their losses agree; the table prints the first and last to 7 digits.
-- On a GPU, use one rank per device: the one-process run is then one GPU and the speed-up is the scaling.
local args = ...
local torch, kd, optim = require 'torch', require 'kd', require 'optim'
local config, bench, json, qatlab = require 'config', require 'bench', require 'json', require 'qatlab'

args = args or {}
if type(args.batches) == 'number' then args.batches = tostring(args.batches) end

local cfg = config.merge({
  child = '',   -- internal: child='worker' runs the steps and prints RESULT from rank 0
  nproc = 2, threads = 0, batches = '8,32', full = false, tiny = false, layers = 0, hidden = 0, inter = 0,
  heads = 0, kv_heads = 0, head_dim = 0, vocab = 0, L = 64, K = 32, preset = 'q2a4', lr = 5e-5,
  warmup = 1, steps = 3, bucket_mb = 25, seed = 0, batch = 0,
}, args)

local source = qatlab.scripts_dir .. '/..'
local lib = require 'bench_step'
local device = tostring(qatlab.device or 'cpu')
local cuda = device:match('^cuda') ~= nil

-- worker: one rank (or the single process) -------------------------------------------------------
if cfg.child == 'worker' then
  local dist = require 'dist'
  dist.init()
  local world, rank = dist.world_size(), dist.rank()
  local dev = cuda and ('cuda:%d'):format(dist.local_rank()) or 'cpu'
  local d = lib.dims(cfg)
  -- built on one thread: the SVD initialisation's rounding then does not depend on the thread count
  local nt = torch.get_num_threads()
  torch.set_num_threads(1)
  torch.manual_seed(cfg.seed)
  local m = lib.build_model(d, cfg.L, {preset = cfg.preset, device = dev, dtype = cuda and 'bfloat16' or nil})
  torch.set_num_threads(nt)
  torch.manual_seed(cfg.seed + 1)   -- the same global batch on every rank; each takes its rows
  local global = lib.synthetic_batch(d, cfg.batch, cfg.L, cfg.K, dev)
  local rows = math.floor(cfg.batch / world)
  local mine = {}
  for k, v in pairs(global) do mine[k] = v:narrow(1, rank * rows + 1, rows) end
  local ddp = world > 1 and dist.ddp(m, {bucket_mb = cfg.bucket_mb}) or nil
  local opt = optim.AdamW(m, {lr = cfg.lr, weight_decay = 0})
  local kopts = {T = 2, hard_top1 = 0.2, hard_full = 0.00005}
  local function step()
    if ddp then ddp:prepare_forward() end
    local loss = kd.loss_model(m, mine, kopts)
    if ddp then ddp:backward(loss) else loss:backward() end
    optim.clip_grad_norm(m:parameters(), 1.0)
    opt:step()
    opt:zero_grad()
    local l = loss:detach()
    if world > 1 then dist.all_reduce(l, 'mean') end   -- the global batch's loss
    return l:item()
  end
  local losses, times = {}, {}
  for _ = 1, cfg.warmup do losses[#losses + 1] = step() end
  for _ = 1, cfg.steps do
    if cuda then torch.cuda.synchronize() end
    if world > 1 then dist.barrier() end
    local t0 = qatlab.time()
    losses[#losses + 1] = step()
    if cuda then torch.cuda.synchronize() end
    times[#times + 1] = qatlab.time() - t0
  end
  if dist.is_main() then
    print('RESULT ' .. json.encode({world = world, threads = torch.get_num_threads(), batch = cfg.batch,
      step_s = bench.median(times), losses = losses, buckets = ddp and ddp:num_buckets() or 0}))
  end
  dist.destroy()
  return
end

-- driver ---------------------------------------------------------------------------------------------
local function q(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end
local batches = {}
for x in tostring(cfg.batches):gmatch('[^,%s]+') do
  local b = tonumber(x)
  if not (b and b >= 1 and b == math.floor(b) and b % cfg.nproc == 0) then
    error(('bench_dist: batches: expected positive multiples of nproc (%d), got %q'):format(cfg.nproc, x), 0)
  end
  batches[#batches + 1] = b
end
if not (cfg.nproc >= 2 and cfg.nproc == math.floor(cfg.nproc)) then
  error(('bench_dist: nproc: expected an integer >= 2, got %g'):format(cfg.nproc), 0)
end
local threads = cfg.threads > 0 and cfg.threads or (cuda and 1 or cfg.nproc)
local rank_threads = math.max(1, math.floor(threads / cfg.nproc))
local out = qatlab.out or 'runs/bench_dist'
assert(os.execute("mkdir -p '" .. out .. "'") == 0, 'bench_dist: cannot create ' .. out)
local qbin = bench.qatlab_bin()
if not (qbin or ''):match('qatlab$') then qbin = source .. '/build/qatlab' end

local passthrough = {}
for _, k in ipairs({'full', 'tiny', 'layers', 'hidden', 'inter', 'heads', 'kv_heads', 'head_dim', 'vocab', 'L',
                    'K', 'preset', 'lr', 'warmup', 'steps', 'bucket_mb', 'seed'}) do
  local v = cfg[k]
  passthrough[#passthrough + 1] = ('--set %s=%s'):format(k, type(v) == 'string' and q('"' .. v .. '"') or tostring(v))
end

local function run(nproc, nthreads, batch)
  local cmd = ('%s run %s--device %s --threads %d %s --set child=worker --set batch=%d %s 2>&1; echo "__rc=$?"')
    :format(q(qbin), nproc > 1 and ('--nproc %d '):format(nproc) or '', device, nthreads, q(qatlab.script), batch,
            table.concat(passthrough, ' '))
  io.stderr:write(('[bench_dist] %d process(es) x %d thread(s), global batch %d ...\n'):format(nproc, nthreads, batch))
  local text = bench.sh(cmd)
  local r = text:match('RESULT (%b{})')
  if not r then error(('bench_dist: the run failed:\n%s'):format(text:sub(-3000)), 0) end
  return json.decode(r)
end

local d = lib.dims(cfg)
print(('bench_dist: qwen3 %d layers, hidden %d, vocab %d, %s, L %d, K %d, device %s (%s); one process x %d threads '
  .. 'against %d ranks x %d thread(s)'):format(d.layers, d.hidden, d.vocab, cfg.preset, cfg.L, cfg.K, device,
  bench.device_name(device), threads, cfg.nproc, rank_threads))
print('')
print(('| global batch | 1 process step | %d ranks step | speed-up | tokens/s (ranks) | buckets | first loss 1 / %d '
  .. '| last loss 1 / %d |'):format(cfg.nproc, cfg.nproc, cfg.nproc))
print('|---:|---:|---:|---:|---:|---:|---|---|')
local rows = {}
for _, b in ipairs(batches) do
  local one = run(1, threads, b)
  local many = run(cfg.nproc, rank_threads, b)
  local l1, ln = one.losses[#one.losses], many.losses[#many.losses]
  rows[#rows + 1] = {batch = b, one = one, ranks = many}
  print(('| %d | %.4f s | %.4f s | %.2fx | %s | %d | %.7g / %.7g | %.7g / %.7g |'):format(b, one.step_s,
    many.step_s, one.step_s / many.step_s, bench.commas(b * cfg.L / many.step_s), many.buckets, one.losses[1],
    many.losses[1], l1, ln))
end
local f = assert(io.open(out .. '/results.json.tmp', 'wb'))
f:write(json.encode({config = cfg, dims = d, device = device, device_name = bench.device_name(device),
  threads = threads, rank_threads = rank_threads, rows = rows}) .. '\n')
f:close()
assert(os.rename(out .. '/results.json.tmp', out .. '/results.json'))
print(('\nresults: %s/results.json'):format(out))
