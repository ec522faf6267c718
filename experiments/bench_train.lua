-- bench_train: the seed's V2-KD training step (Q2A4 student, KD on teacher top-k, AdamW, clip 1.0) timed
-- side by side in qatlab and three PyTorch programs (experiments/seed_ref): "strong", the same step as a
-- strong PyTorch engineer writes it (W_eff materialized in an autograd.Function, fused chunked KD loss,
-- fused AdamW), eager and "strong-compiled" (torch.compile per decoder layer), and "seed-ref", the
-- seed's own step (rank-by-rank V2 forward, unfused KD loss). The step itself lives in scripts/bench_step.lua.
--
--   build/qatlab run experiments/bench_train.lua [--out runs/bench_train]              (CPU, tiny, ~2 min)
--   build/qatlab run experiments/bench_train.lua --set shape=smollm2 --set impls=qatlab,strong   (SmolLM2-135M)
--   build/qatlab run experiments/bench_train.lua --device cuda --set shape=qwen3 [--out DIR]
--       [--set L=64,128] [--set batches=8,64,256,504] [--set peak_tflops=989]
--
-- Options (--set key=value):
--   shape='tiny'   tiny (2 layers, hidden 128, vocab 4096), smoke (1 layer, hidden 64, vocab 512, L 16,
--                  1 step), smollm2 (SmolLM2-135M: 30 layers, hidden 576, inter 1536, 9/3 heads x 64,
--                  vocab 49152) or qwen3 (Qwen3-0.6B: 28 layers, hidden 1024, inter 3072, 16/8 heads x 128,
--                  vocab 151936); full=true is qwen3, tiny=true is smoke
--   layers hidden inter heads kv_heads head_dim vocab   override single dims
--   L=''  batches=''  (per shape: tiny 64 / 2,8; smoke 16 / 2,8; smollm2 128 / 4; qwen3 64,128 / 8,64,256)
--   K=32  preset='q2a4'  T=2  hard_top1=0.2  hard_full=0.00005  lr=5e-5  chunk=128 (KD loss rows per chunk)
--   warmup=1  steps=2       untimed + timed steps per row (step time = median of the timed ones)
--   ckpt=true      per-decoder-layer activation checkpointing in all impls (the seed's benchmark has it on)
--   ckpt_layers=-1 with ckpt on, qatlab checkpoints only the first N layers (less recomputation, more
--                  memory; -1 = all); the references have only all or none: all of them when N > 0
--   ste=false      STE-FP16 in the V2 forward (qatlab and seed-ref; the strong rows are skipped)
--   impls='qatlab,strong,strong-compiled,seed-ref'
--   init='auto'    file: every impl loads one init and batch file the driver writes, so the step-1 losses
--                  agree (printed); random: each impl its own random weights; auto: file at tiny/smoke
--   dtype='auto'   qatlab: bfloat16 on CUDA, float32 on the CPU; 'autocast' = fp32 params + bf16 autocast
--   amp='auto'     references: autocast on CUDA, none on the CPU ('autocast' forces it)
--   peak_tflops=0  MFU denominator; 0 = 989 (H100/H200 dense bf16) on CUDA, measured fp32 GEMM on the CPU
--   help=true      print this usage
--   threads=0      threads of each row's process (0 = 1 on the CPU, this process's count on CUDA)
--
-- Max-batch mode (issue 7: "a maximum batch at least 4x the seed's at equal memory"):
--   build/qatlab run experiments/bench_train.lua --set max_batch_mb=800 [--set L=64] [--set max_batch_cap=4096]
--   max_batch_mb=0     a memory budget in MiB (the peak below: RSS on the CPU, CUDA max allocated); > 0 turns
--                      the mode on: per impl and L, the largest batch whose row fits it
--   max_batch_oom=false  CUDA only: search up to the first out-of-memory (no budget needed; with one, both)
--   max_batch_start=1  max_batch_cap=4096   the search: doubling from start until a miss or the cap, then
--                      bisection between the last fit and the first miss (to 1 sample)
--   Each try is a row process of 1 warm-up + 1 timed step; a miss is a peak over the budget, an OOM or a
--   killed process (any other failure stops that impl's search). `batches`, `warmup`, `steps` do not apply.
--   Prints | impl | L | budget | max batch | tokens/s at max | peak at max | and the ratio qatlab/seed-ref of
--   the max batches (a bound when one side hit the cap); results.json has every try, results.csv the table.
--
-- Every row runs in its own process (a qatlab child: --set child=qatlab, or Python), so peak memory is that
-- row's alone:
-- CUDA max allocated over the process, or on the CPU the peak RSS (VmHWM after clear_refs) during
-- the timed steps; "+step" is that peak minus the RSS / allocated bytes before them.
-- Model FLOPs per step (both impls, recomputation not counted), B batch, L length, S = L-1:
--   F = B·L·(6·N_mm + 12·n_layer·L·n_head·head_dim)      dense GEMMs fwd+bwd (grad-x and grad-W, since
--                                                        dS = dW ⊙ Q) + attention (PaLM's count)
--     + B·S·4·H·(V + K)                                  full-vocab CE + top-K logits, fwd + grad-h
--     + 6·Σ_proj out·in·r                                S = (A g) B per projection, fwd + dA, dB
--   N_mm = n_layer·(H·q + 2·H·kv + q·H + 3·H·I), q = n_head·head_dim, kv = n_kv·head_dim.
--   MFU = F / step time / peak. Results: results.json and results.csv in the out dir.
local args = ...
local torch = require 'torch'
local config, bench, json, qatlab = require 'config', require 'bench', require 'json', require 'qatlab'

args = args or {}
for _, k in ipairs({'L', 'batches', 'impls'}) do   -- a single number arrives as a number
  if type(args[k]) == 'number' then args[k] = tostring(args[k]) end
end

local cfg = config.merge({
  child = '', job = '',  -- internal: child='qatlab' runs one row from its job file (the driver/child switch)
  help = false,          -- print this header and exit
  shape = '', full = false, tiny = false,
  layers = 0, hidden = 0, inter = 0, heads = 0, kv_heads = 0, head_dim = 0, vocab = 0,
  L = '', batches = '', K = 32, preset = 'q2a4', T = 2, hard_top1 = 0.2, hard_full = 0.00005, lr = 5e-5,
  clip = 1.0, warmup = 1, steps = 2, ckpt = true, ckpt_layers = -1, ste = false,
  impls = 'qatlab,strong,strong-compiled,seed-ref', init = 'auto', chunk = 128,
  dtype = 'auto', amp = 'auto', peak_tflops = 0, threads = 0, seed = 0,
  max_batch_mb = 0, max_batch_oom = false, max_batch_start = 1, max_batch_cap = 4096,
}, args)

local M = require 'bench_step'

if cfg.help then   -- the header comment is the usage
  local f = assert(io.open(require('qatlab').script or arg[0]))
  for line in f:lines() do
    if not line:match('^%-%-') then break end
    print((line:gsub('^%-%- ?', '')))
  end
  f:close()
  return
end

local device = tostring(qatlab.device or 'cpu')
local cuda = device:match('^cuda') ~= nil

-- qatlab child: one row, printed as "RESULT {json}" ---------------------------------------------
if cfg.child == 'qatlab' then
  local f = assert(io.open(cfg.job, 'rb'), 'bench_train: cannot read job ' .. cfg.job)
  local job = json.decode(f:read('*a'))
  f:close()
  torch.manual_seed(job.seed)
  local d = job.dims
  local dtype = job.dtype
  local m = M.build_model(d, job.L, {preset = job.preset, ste = job.ste, dtype = dtype, device = device,
                                     ckpt = job.ckpt})
  if job.init then m:load_state_dict((torch.load(job.init))) end   -- the driver's weights, shared by every impl
  local batch
  if job.batch_file then
    batch = {}
    for k, v in pairs((torch.load(job.batch_file))) do batch[k] = v:to{device = device} end
  else
    batch = M.synthetic_batch(d, job.batch, job.L, job.K, device)
  end
  local step = M.make_step(m, batch, {lr = job.lr, T = job.T, hard_top1 = job.hard_top1, hard_full = job.hard_full,
    clip = job.clip, chunk = job.chunk, autocast = dtype == 'autocast' and device:match('^%a+')})
  local losses, times = {}, {}
  for _ = 1, job.warmup do losses[#losses + 1] = step() end
  collectgarbage(); collectgarbage()
  local base
  if cuda then
    torch.cuda.synchronize()
    base = torch.cuda.memory().allocated_bytes or 0
  else
    base = bench.status_kb('VmRSS') * 1024
    bench.reset_peak_rss()
  end
  for _ = 1, job.steps do
    local t0 = qatlab.time()
    losses[#losses + 1] = step()
    if cuda then torch.cuda.synchronize() end
    times[#times + 1] = qatlab.time() - t0
  end
  local peak = cuda and (torch.cuda.memory().peak_allocated_bytes or 0) or bench.status_kb('VmHWM') * 1024
  local step_s = bench.median(times)
  print('RESULT ' .. json.encode({impl = 'qatlab', L = job.L, batch = job.batch, step_s = step_s,
    tokens_s = job.batch * job.L / step_s, peak_bytes = peak, base_bytes = base, losses = losses,
    loss = losses[#losses], device = device, threads = torch.get_num_threads(), dtype = dtype}))
  return
end

-- driver -------------------------------------------------------------------------------------------
local function list(s, what)
  local out = {}
  for x in tostring(s):gmatch('[^,%s]+') do
    local n = tonumber(x)
    if what ~= 'string' and not (n and n >= 1 and n == math.floor(n)) then
      error(('bench_train: %s: expected positive integers separated by commas, got %q'):format(what, s), 0)
    end
    out[#out + 1] = what == 'string' and x or n
  end
  return out
end

local d = M.dims(cfg)
if not (cfg.ckpt_layers >= -1 and cfg.ckpt_layers == math.floor(cfg.ckpt_layers)) then
  error(('bench_train: ckpt_layers: expected a layer count >= 0 (or -1 = all), got %g'):format(cfg.ckpt_layers), 0)
end
local ckpt_any = cfg.ckpt and cfg.ckpt_layers ~= 0
local qckpt = cfg.ckpt and (cfg.ckpt_layers >= 0 and cfg.ckpt_layers or true)   -- what qatlab's rows get
local ckpt_text = (cfg.ckpt and cfg.ckpt_layers >= 0) and ('first %d of %d layers (seed-ref: %s)'):format(
  math.min(cfg.ckpt_layers, d.layers), d.layers, ckpt_any and 'all' or 'none') or (cfg.ckpt and 'on' or 'off')
local shape = M.shape_name(cfg)
if shape == 'smoke' then cfg.warmup, cfg.steps, cfg.K = 0, 1, 8 end
local max_mode = cfg.max_batch_mb ~= 0 or cfg.max_batch_oom
if max_mode then
  local function int(k) return cfg[k] >= 1 and cfg[k] == math.floor(cfg[k]) end
  if cfg.max_batch_mb < 0 then
    error(('bench_train: max_batch_mb: expected a budget in MiB > 0, got %g'):format(cfg.max_batch_mb), 0)
  end
  if cfg.max_batch_oom and not cuda then
    error('bench_train: max_batch_oom needs --device cuda (on the CPU give a budget: max_batch_mb=N)', 0)
  end
  if not (int('max_batch_start') and int('max_batch_cap') and cfg.max_batch_cap >= cfg.max_batch_start) then
    error(('bench_train: need integers 1 <= max_batch_start (%g) <= max_batch_cap (%g)'):format(
      cfg.max_batch_start, cfg.max_batch_cap), 0)
  end
  for _, k in ipairs({'batches', 'warmup', 'steps'}) do   -- refused rather than silently ignored
    if args[k] ~= nil then
      error(('bench_train: %s does not apply with max_batch_mb / max_batch_oom (the search picks the batches; '
        .. 'each try is 1 warm-up + 1 timed step)'):format(k), 0)
    end
  end
  cfg.warmup, cfg.steps = 1, 1   -- one timed step per try: the peak, not the timing, decides
end
local DEF_L = {smoke = '16', tiny = '64', smollm2 = '128', qwen3 = '64,128'}
local DEF_B = {smoke = '2,8', tiny = '2,8', smollm2 = '4', qwen3 = '8,64,256'}
local Ls = list(cfg.L ~= '' and cfg.L or DEF_L[shape], 'L')
local batches = list(cfg.batches ~= '' and cfg.batches or DEF_B[shape], 'batches')
local IMPLS = {'qatlab', 'strong', 'strong-compiled', 'seed-ref'}   -- the table's order
local impls, py_impls = {}, {}
for _, x in ipairs(list(cfg.impls, 'string')) do
  if x ~= 'qatlab' and x ~= 'strong' and x ~= 'strong-compiled' and x ~= 'seed-ref' then
    error('bench_train: impls: expected some of qatlab, strong, strong-compiled, seed-ref; got ' .. x, 0)
  end
  impls[x] = true
  if x ~= 'qatlab' then py_impls[#py_impls + 1] = x end
end
if cfg.init ~= 'auto' and cfg.init ~= 'file' and cfg.init ~= 'random' then
  error(('bench_train: init: expected auto, file or random, got %q'):format(cfg.init), 0)
end
-- 'file': every impl starts from the same weights and batch (files the driver writes), so the step-1
-- losses must agree; 'random' (auto at the real shapes: a Qwen3-0.6B state dict is 2.4 GB) times each
-- impl from its own random weights.
local init_mode = cfg.init == 'auto' and ((shape == 'smoke' or shape == 'tiny') and 'file' or 'random') or cfg.init
-- 1 thread on the CPU by default: on a shared machine OpenMP threads that lose their core make
-- timings swing by 5x; each row still gets the same count
local threads = cfg.threads > 0 and cfg.threads or (cuda and torch.get_num_threads() or 1)
local qdtype = cfg.dtype == 'auto' and (cuda and 'bfloat16' or 'float32') or cfg.dtype
local source = qatlab.scripts_dir .. '/..'
local out = qatlab.out or 'runs/bench_train'
assert(os.execute("mkdir -p '" .. out .. "/jobs'") == 0, 'bench_train: cannot create ' .. out)
local qbin = bench.qatlab_bin()
if not (qbin or ''):match('qatlab$') then qbin = source .. '/build/qatlab' end
local function q(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

-- Python with torch for the reference, or why not.
local py, py_why = os.getenv('QATLAB_PYTHON'), nil
if not py or py == '' then
  local venv = source .. '/.venv/bin/python'
  py = io.open(venv) and venv or 'python3'
end
local strong_py = source .. '/experiments/seed_ref/strong_step.py'
local ref_script = {['seed-ref'] = source .. '/experiments/seed_ref/anemll_step.py', strong = strong_py,
  ['strong-compiled'] = strong_py}
local torch_version
if #py_impls > 0 then
  local probe = bench.sh(q(py) .. ' -c "import torch, safetensors; print(\'TORCH\', torch.__version__)" 2>&1')
  torch_version = probe:match('TORCH (%S+)')
  if not torch_version then
    py_why = ('%s cannot import torch (%s); set QATLAB_PYTHON to a Python with torch. Showing qatlab rows only.')
      :format(py, (probe:gsub('%s+$', ''):match('[^\n]*$')))
    for _, x in ipairs(py_impls) do impls[x] = nil end
  end
end
if cfg.ste and (impls.strong or impls['strong-compiled']) then
  py_why = (py_why and py_why .. ' ' or '') .. 'strong: STE-FP16 is not implemented there; its rows are skipped.'
  impls.strong, impls['strong-compiled'] = nil, nil
end

-- The shared weights and batches (init = 'file').
local init_file, batch_files = nil, {}
if init_mode == 'file' then
  init_file = out .. '/jobs/init.safetensors'
  torch.manual_seed(cfg.seed)
  local maxL = 0
  for _, L in ipairs(Ls) do maxL = math.max(maxL, L) end
  local m = M.build_model(d, maxL, {preset = cfg.preset, ste = cfg.ste, ckpt = false})
  torch.save(init_file, m:state_dict())
  m = nil   -- luacheck: ignore 311
  collectgarbage()
end
local function batch_file(L, B)
  if init_mode ~= 'file' then return nil end
  local key = L .. 'x' .. B
  if not batch_files[key] then
    torch.manual_seed(cfg.seed + 1)
    batch_files[key] = ('%s/jobs/batch_%s.safetensors'):format(out, key)
    torch.save(batch_files[key], M.synthetic_batch(d, B, L, cfg.K))
  end
  return batch_files[key]
end

-- MFU denominator.
local peak_flops, peak_note
if cfg.peak_tflops > 0 then
  peak_flops, peak_note = cfg.peak_tflops * 1e12, ('%g TFLOP/s (given)'):format(cfg.peak_tflops)
elseif cuda then
  peak_flops, peak_note = 989e12, '989 TFLOP/s (H100/H200 SXM dense bf16; --set peak_tflops= to change)'
else
  torch.set_num_threads(threads)   -- the rows' thread count
  local n = 1024
  local a, b = torch.randn(n, n), torch.randn(n, n)
  local best = math.huge
  for _ = 1, 5 do
    local t0 = qatlab.time()
    local c = a:matmul(b)
    c:free()
    best = math.min(best, qatlab.time() - t0)
  end
  peak_flops = 2 * n ^ 3 / best
  peak_note = ('%.1f GFLOP/s (measured fp32 %d^3 GEMM, %d threads, this machine)'):format(peak_flops / 1e9, n, threads)
end

local function run_qatlab(L, B, id)
  local job = out .. '/jobs/' .. id .. '.json'
  local f = assert(io.open(job, 'wb'))
  f:write(json.encode({dims = d, L = L, batch = B, K = cfg.K, preset = cfg.preset, ste = cfg.ste, ckpt = qckpt,
    dtype = qdtype, lr = cfg.lr, T = cfg.T, hard_top1 = cfg.hard_top1, hard_full = cfg.hard_full, clip = cfg.clip,
    warmup = cfg.warmup, steps = cfg.steps, seed = cfg.seed, chunk = cfg.chunk, init = init_file,
    batch_file = batch_file(L, B)}))
  f:close()
  return ('%s run --device %s --threads %d --seed %d %s --set child=qatlab --set job=%s'):format(
    q(qbin), device, threads, cfg.seed, q(qatlab.script), q(job))
end

local function run_ref(impl, L, B)
  local extra = ''
  if impl ~= 'seed-ref' then
    extra = (' --chunk %d --compile %d'):format(cfg.chunk, impl == 'strong-compiled' and 1 or 0)
  end
  if init_file then extra = extra .. (' --init %s --batch-file %s'):format(q(init_file), q(batch_file(L, B))) end
  -- the strong reference has only autocast (bf16 parameters are the seed's benchmark, not a strong choice)
  local amp = (impl ~= 'seed-ref' and cfg.amp == 'bf16') and 'autocast' or cfg.amp
  return ('%s %s --layers %d --hidden %d --inter %d --heads %d --kv-heads %d --head-dim %d --vocab %d '
    .. '--preset %s --L %d --batch %d --K %d --T %g --hard %.17g --lr %g --clip %g --ckpt %d --ste %d '
    .. '--amp %s --device %s --threads %d --seed %d --warmup %d --steps %d%s'):format(q(py), q(ref_script[impl]),
    d.layers, d.hidden, d.inter, d.heads, d.kv_heads, d.head_dim, d.vocab, cfg.preset, L, B, cfg.K, cfg.T,
    cfg.hard_top1 + cfg.hard_full, cfg.lr, cfg.clip, ckpt_any and 1 or 0, cfg.ste and 1 or 0, amp,
    device, threads, cfg.seed, cfg.warmup, cfg.steps, extra)
end

local function finite(x) return type(x) == 'number' and x == x and x ~= math.huge and x ~= -math.huge end

local device_name = bench.device_name(device)
print(('bench_train: qwen3 %d layers, hidden %d, inter %d, heads %d/%d x %d, vocab %d, %s, K %d, device %s (%s), '
  .. '%d threads, checkpointing %s, STE %s; qatlab %s, references amp %s%s; weights %s; load average %s'):format(
  d.layers, d.hidden, d.inter, d.heads, d.kv_heads, d.head_dim, d.vocab, cfg.preset, cfg.K, device, device_name,
  threads, ckpt_text, cfg.ste and 'on' or 'off', qdtype, cfg.amp,
  torch_version and (' (PyTorch ' .. torch_version .. ')') or '',
  init_mode == 'file' and 'shared (one init and batch file for every impl)' or 'random per impl', M.load_average()))
if py_why then print('seed-ref: ' .. py_why) end

-- One row in its own process: its result, or {status = 'OOM' | 'KILLED' | 'FAILED', error = output tail}.
local n = 0
local function run_row(impl, L, B)
  n = n + 1
  local cmd = impl == 'qatlab' and run_qatlab(L, B, ('row%03d'):format(n)) or run_ref(impl, L, B)
  io.stderr:write(('[bench_train] %s L=%d batch=%d ...\n'):format(impl, L, B))
  local text = bench.sh(cmd .. ' 2>&1; echo "__rc=$?"')
  local rc = tonumber(text:match('__rc=(%d+)%s*$'))
  text = (text:gsub('__rc=%d+%s*$', ''))
  local line = impl == 'qatlab' and text:match('RESULT (%b{})') or text:match('(%b{})%s*$')
  local ok, r = pcall(json.decode, line or '')
  if not (ok and type(r) == 'table' and finite(r.step_s)) then
    -- a signal (rc > 128: the kernel's OOM killer sends SIGKILL) is a memory limit too
    local status = bench.is_oom(text) and 'OOM' or ((rc or 0) > 128 and 'KILLED' or 'FAILED')
    local why = ok and type(r) == 'table' and r.compile_error and ('torch.compile failed: ' .. r.compile_error)
    r = {L = L, batch = B, status = status, rc = rc, error = why or (text:gsub('%s+$', '')):sub(-400)}
    if status == 'FAILED' then
      io.stderr:write(('[bench_train] %s L=%d batch=%d failed (exit %s):\n%s\n'):format(impl, L, B,
        tostring(rc), r.error))
    end
  else
    r.status = 'OK'
    r.flops = M.train_flops(d, B, L, cfg.K, cfg.preset)
    r.mfu = r.flops / r.step_s / peak_flops
    r.step_bytes = r.peak_bytes - r.base_bytes
  end
  r.impl = impl
  return r
end

local function mib(b) return b and ('%s'):format(bench.commas(b / 2 ^ 20)) or '-' end

-- results.json / results.csv (written to a temporary name, then renamed)
local function write(path, text)
  local f = assert(io.open(path .. '.tmp', 'wb'))
  f:write(text)
  f:close()
  assert(os.rename(path .. '.tmp', path))
end
local function f(v, fmt) return v == nil and '' or (fmt):format(v) end
local function write_json(extra)
  local t = {config = cfg, dims = d, device = device, device_name = device_name, threads = threads,
    qatlab_dtype = qdtype, shape = shape, init = init_mode, load_average = M.load_average(),
    flop_formula = M.FLOP_FORMULA, peak_flops = peak_flops, peak_note = peak_note,
    seed_ref = py_why and {skipped = py_why} or {python = py}}
  for k, v in pairs(extra) do t[k] = v end
  write(out .. '/results.json', json.encode(t) .. '\n')
end
local memory_note = cuda and 'CUDA max allocated over the row\'s process'
  or 'peak RSS (VmHWM) of the row\'s process during the timed steps'

if max_mode then
  -- max batch per impl and L --------------------------------------------------------------------
  local budget = cfg.max_batch_mb > 0 and cfg.max_batch_mb * 2 ^ 20 or nil
  local budget_s = (budget and (mib(budget) .. ' MiB') or '')
    .. (cfg.max_batch_oom and (budget and ' / OOM' or 'OOM') or '')
  local rows, results = {}, {}
  for _, L in ipairs(Ls) do
    for _, impl in ipairs(IMPLS) do
      if impls[impl] then
        local by_batch, failed = {}, nil
        local function fits(B)
          local r = run_row(impl, L, B)
          rows[#rows + 1] = r
          by_batch[B] = r
          if r.status == 'OK' then
            r.fits = budget == nil or r.peak_bytes <= budget
            r.miss = not r.fits and 'over budget' or nil
          elseif r.status == 'OOM' or r.status == 'KILLED' then
            r.fits, r.miss = false, r.status
          else
            failed = r
            error(r)   -- not a memory limit: this impl's search stops here
          end
          io.stderr:write(('[bench_train]   peak %s MiB: %s\n'):format(mib(r.peak_bytes),
            r.fits and 'fits' or r.miss))
          return r.fits
        end
        local ok, best, miss = pcall(M.search_max_batch, fits, cfg.max_batch_start, cfg.max_batch_cap)
        if not ok and not failed then error(best, 0) end
        local at, tries = ok and best and by_batch[best] or {}, 0
        for _ in pairs(by_batch) do tries = tries + 1 end
        results[#results + 1] = {impl = impl, L = L, budget_bytes = budget, oom_limit = cfg.max_batch_oom,
          status = failed and 'FAILED' or (best and 'OK' or 'NONE'), max_batch = ok and best or nil,
          tokens_s = at.tokens_s, step_s = at.step_s, peak_bytes = at.peak_bytes,
          first_miss = ok and miss or nil, first_miss_reason = ok and miss and by_batch[miss].miss or nil,
          first_miss_peak = ok and miss and by_batch[miss].peak_bytes or nil,
          hit_cap = ok and best == cfg.max_batch_cap or false, tries = tries, error = failed and failed.error or nil}
      end
    end
  end

  -- the ratio qatlab / seed-ref of max batches per L (a bound when a side stopped at the cap)
  local ratios = {}
  for _, qr in ipairs(results) do
    for _, s in ipairs(results) do
      if qr.impl == 'qatlab' and s.impl == 'seed-ref' and qr.L == s.L and qr.max_batch and s.max_batch then
        local bound = qr.hit_cap and not s.hit_cap and 'lower' or (s.hit_cap and not qr.hit_cap and 'upper')
          or (qr.hit_cap and 'unknown') or nil
        qr.ratio, qr.ratio_bound = qr.max_batch / s.max_batch, bound
        ratios[#ratios + 1] = {L = qr.L, ratio = qr.ratio, bound = bound, qatlab = qr.max_batch, seed_ref = s.max_batch}
      end
    end
  end

  print(('\n| impl | L | budget | max batch | tokens/s at max | peak at max | first miss | tries |'))
  print('|---|---:|---:|---:|---:|---:|---|---:|')
  for _, r in ipairs(results) do
    local miss = r.first_miss and ('%d (%s%s)'):format(r.first_miss, r.first_miss_reason,
      r.first_miss_peak and (', ' .. mib(r.first_miss_peak) .. ' MiB') or '') or (r.hit_cap and 'none: cap' or '-')
    print(('| %s | %d | %s | %s | %s | %s | %s | %d |'):format(r.impl, r.L, budget_s,
      r.max_batch and tostring(r.max_batch) or r.status, r.tokens_s and bench.commas(r.tokens_s) or '-',
      r.peak_bytes and (mib(r.peak_bytes) .. ' MiB') or '-', miss, r.tries))
  end
  print('')
  for _, x in ipairs(ratios) do
    print(('max batch qatlab/seed-ref at L=%d: %d / %d = %.2fx%s'):format(x.L, x.qatlab, x.seed_ref, x.ratio,
      x.bound == 'lower' and ' (qatlab hit max_batch_cap: a lower bound)'
        or x.bound == 'upper' and ' (seed-ref hit max_batch_cap: an upper bound)'
        or x.bound == 'unknown' and ' (both hit max_batch_cap: raise it)' or ''))
  end
  print(('search: doubling from %d, bisection to 1, cap %d; each try 1 warm-up + 1 timed step in its own process; '
    .. 'a miss = peak over the budget%s, OOM or killed'):format(cfg.max_batch_start, cfg.max_batch_cap,
    cfg.max_batch_oom and ' (if any)' or ''))
  print('memory: ' .. memory_note)

  write_json({rows = rows, max_batch = {budget_bytes = budget, oom_limit = cfg.max_batch_oom,
    start = cfg.max_batch_start, cap = cfg.max_batch_cap, results = results, ratios = ratios}})
  local csv = {'impl,L,budget_bytes,status,max_batch,tokens_s,step_s,peak_bytes,first_miss,first_miss_reason,'
    .. 'hit_cap,tries,ratio,ratio_bound'}
  for _, r in ipairs(results) do
    csv[#csv + 1] = table.concat({r.impl, r.L, f(r.budget_bytes, '%.0f'), r.status, f(r.max_batch, '%d'),
      f(r.tokens_s, '%.2f'), f(r.step_s, '%.6f'), f(r.peak_bytes, '%.0f'), f(r.first_miss, '%d'),
      r.first_miss_reason or '', tostring(r.hit_cap), r.tries, f(r.ratio, '%.4f'), r.ratio_bound or ''}, ',')
  end
  write(out .. '/results.csv', table.concat(csv, '\n') .. '\n')
  print(('results: %s/results.json, %s/results.csv'):format(out, out))
  return
end

local rows = {}
for _, L in ipairs(Ls) do
  for _, B in ipairs(batches) do
    for _, impl in ipairs(IMPLS) do
      if impls[impl] then rows[#rows + 1] = run_row(impl, L, B) end
    end
  end
end

-- qatlab against each reference, same L and batch: x = qatlab tokens/s / its tokens/s (> 1: qatlab faster),
-- mem = qatlab peak / its peak (< 1: qatlab smaller). The qatlab row keeps speedup / mem_ratio against
-- seed-ref, and speedup_strong(_compiled) against the strong reference.
local by = {}
for _, r in ipairs(rows) do by[r.impl .. ':' .. r.L .. ':' .. r.batch] = r end
for _, r in ipairs(rows) do
  local qr = by['qatlab:' .. r.L .. ':' .. r.batch]
  if r.impl ~= 'qatlab' and r.status == 'OK' and qr and qr.status == 'OK' then
    r.qatlab_x, r.qatlab_mem = qr.tokens_s / r.tokens_s, qr.peak_bytes / r.peak_bytes
    if r.impl == 'seed-ref' then qr.speedup, qr.mem_ratio = r.qatlab_x, r.qatlab_mem
    else qr['speedup_' .. r.impl:gsub('-', '_')] = r.qatlab_x end
  end
  if r.status == 'OK' and r.losses and r.losses[1] and qr and qr.status == 'OK' and qr.losses then
    r.loss1 = r.losses[1]
    r.loss1_rel = math.abs(r.losses[1] - qr.losses[1]) / math.abs(qr.losses[1])
  end
end

print('\n| impl | L | batch | step (s) | tokens/s | peak MiB | +step MiB | MFU | step-1 loss | qatlab x | qatlab mem |')
print('|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|')
for _, r in ipairs(rows) do
  if r.status == 'OK' then
    print(('| %s | %d | %d | %.4f | %s | %s | %s | %.2f%% | %s | %s | %s |'):format(r.impl, r.L, r.batch, r.step_s,
      bench.commas(r.tokens_s), mib(r.peak_bytes), mib(r.step_bytes), 100 * r.mfu,
      r.loss1 and ('%.6f'):format(r.loss1) or '-',
      r.qatlab_x and ('%.2fx'):format(r.qatlab_x) or '', r.qatlab_mem and ('%.2f'):format(r.qatlab_mem) or ''))
  else
    print(('| %s | %d | %d | - | - | - | - | - | - | %s | |'):format(r.impl, r.L, r.batch, r.status))
  end
end
for _, r in ipairs(rows) do
  if r.status ~= 'OK' then
    print(('%s L=%d batch=%d: %s'):format(r.impl, r.L, r.batch, ((r.error or ''):gsub('\n', ' '))))
  end
  if type(r.compile_s) == 'number' then
    print(('%s L=%d batch=%d: first step with compilation %.1f s'):format(r.impl, r.L, r.batch, r.compile_s))
  end
end
if init_mode == 'file' then
  local worst = 0
  for _, r in ipairs(rows) do if r.loss1_rel then worst = math.max(worst, r.loss1_rel) end end
  print(('step-1 losses (same weights and batch in every impl): largest relative difference to qatlab %.2e')
    :format(worst))
end
print(('\nFLOPs/step: %s  (N_mm = %s matmul params; tokens = B*L)'):format(M.FLOP_FORMULA,
  bench.commas(select(2, M.train_flops(d, 1, Ls[1], cfg.K, cfg.preset)).n_mm)))
print('MFU peak: ' .. peak_note .. (cuda and '' or '; on the CPU MFU is against that GEMM rate, not a datasheet'))
print(('memory: %s; +step = peak minus the %s before the timed steps'):format(memory_note,
  cuda and 'allocated bytes' or 'RSS'))
print(('qatlab x = qatlab tokens/s / the row\'s tokens/s; qatlab mem = qatlab peak / the row\'s peak; loss = the '
  .. 'seed\'s KD loss T^2*KL_K + %g*CE_full on synthetic teacher top-%d; strong = experiments/seed_ref/strong_step.py '
  .. '(W_eff autograd.Function, fused chunked KD, fused AdamW; -compiled: torch.compile per decoder layer); '
  .. 'seed-ref = experiments/seed_ref/anemll_step.py'):format(cfg.hard_top1 + cfg.hard_full, cfg.K))
print('load average after the rows: ' .. M.load_average())

write_json({rows = rows})
local csv = {'impl,L,batch,status,step_s,tokens_s,peak_bytes,step_bytes,flops,mfu,speedup,mem_ratio,loss,loss1,'
  .. 'qatlab_x,qatlab_mem'}
for _, r in ipairs(rows) do
  csv[#csv + 1] = table.concat({r.impl, r.L, r.batch, r.status, f(r.step_s, '%.6f'), f(r.tokens_s, '%.2f'),
    f(r.peak_bytes, '%.0f'), f(r.step_bytes, '%.0f'), f(r.flops, '%.6g'), f(r.mfu, '%.6g'), f(r.speedup, '%.4f'),
    f(r.mem_ratio, '%.4f'), f(r.loss, '%.6f'), f(r.loss1, '%.9g'), f(r.qatlab_x, '%.4f'), f(r.qatlab_mem, '%.4f')}, ',')
end
write(out .. '/results.csv', table.concat(csv, '\n') .. '\n')
print(('results: %s/results.json, %s/results.csv'):format(out, out))
