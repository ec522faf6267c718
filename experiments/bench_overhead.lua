-- bench_overhead: per-op overhead of small tensor ops called from Lua versus Python PyTorch
-- (same machine, same LibTorch), over the C++ floor; and start-up time of `qatlab run`.
--
--   qatlab run experiments/bench_overhead.lua [--set iters=20000] [--set repeats=5] [--set rounds=5]
-- Overhead = (frontend ns/op) - (C++ ns/op). Targets: Lua overhead <= 0.5 x Python's;
-- start-up of `qatlab run empty.lua` < 0.3 s. Prints a Markdown table for the README.
-- Note: `a * 2.0` on a float32 tensor wraps 2.0 directly as a float32 number (same result as
-- PyTorch's promotion), so qatlab skips the cast of a temporary that at::mul(a, 2.0) and Python
-- pay; its Lua time can be below the C++ floor (overhead then shows as 0).
local torch = require 'torch'
local qatlab = require 'qatlab'
local config = require 'config'
local args = ...
local bench = require 'bench'
local median, sh = bench.median, bench.sh

local cfg = config.merge({
  iters = 20000, repeats = 5, rounds = 5, startup_runs = 10,
  python = os.getenv('QATLAB_PYTHON') or 'python3',
  bench_ops = '',   -- path of qatlab_bench_ops; found next to the qatlab binary by default
  python_allocator = 'same',   -- 'same': Python runs on qatlab's allocator (LD_PRELOAD); 'system': as is
}, args)
torch.set_num_threads(1)

-- Lua ------------------------------------------------------------------------------------
local a, b, m = torch.ones(1), torch.ones(1), torch.ones(8, 8)
local ops = {
  {'add_', 'a.add_(b)', function(n) for _ = 1, n do a:add_(b) end end},
  {'add', 'a + b', function(n) for _ = 1, n do local _ = a + b end end},
  {'mul_scalar', 'a * 2.0', function(n) for _ = 1, n do local _ = a * 2.0 end end},
  {'sum', 'm.sum()', function(n) for _ = 1, n do local _ = m:sum() end end},
  {'narrow', 'm.narrow(0, 1, 2)', function(n) for _ = 1, n do local _ = m:narrow(1, 2, 2) end end},
  {'matmul_8x8', 'm @ m', function(n) for _ = 1, n do local _ = m:matmul(m) end end},
}
-- Lua, Python and the C++ floor are measured in alternating rounds of `repeats` runs of `iters`
-- calls each; the figures are the median and the minimum over all runs. On a shared VM the speed
-- drifts over tens of seconds: alternating keeps the three frontends in the same conditions, and
-- the minimum shows each one's cost when undisturbed.
local function lua_round(out)
  for _, op in ipairs(ops) do
    op[3](1000)  -- warm up (JIT traces, allocator)
    out[op[1]] = out[op[1]] or {}
    for _ = 1, cfg.repeats do
      local t0 = qatlab.time()
      op[3](cfg.iters)
      table.insert(out[op[1]], (qatlab.time() - t0) * 1e9 / cfg.iters)
    end
  end
end

local py_lines = {
  'import time, torch', 'torch.set_num_threads(1)',
  'a, b, m = torch.ones(1), torch.ones(1), torch.ones(8, 8)',
  ('N, R = %d, %d'):format(cfg.iters, cfg.repeats),
  'def bench(name, f):',
  '    f(1000); per = []',
  '    for _ in range(R):',
  '        t0 = time.perf_counter_ns(); f(N); per.append((time.perf_counter_ns() - t0) / N)',
  '    print(name, *per)',
}
for _, op in ipairs(ops) do
  py_lines[#py_lines + 1] = ('def f_%s(n):\n    for _ in range(n): %s'):format(op[1], op[2])
  py_lines[#py_lines + 1] = ('bench(%q, f_%s)'):format(op[1], op[1])
end
local py_script = os.tmpname()
local fh = assert(io.open(py_script, 'w'))
fh:write(table.concat(py_lines, '\n'), '\n')
fh:close()

local exe_dir = bench.qatlab_bin():match('^(.*)/[^/]*$') .. '/tests'
local bench_ops = cfg.bench_ops ~= '' and cfg.bench_ops or exe_dir .. '/qatlab_bench_ops'

local function cmd_round(cmd, out)
  for line in sh(cmd):gmatch('[^\n]+') do
    local name, rest = line:match('^(%S+)%s+(.*)$')
    if name then
      out[name] = out[name] or {}
      for v in rest:gmatch('%S+') do table.insert(out[name], tonumber(v)) end
    end
  end
end

-- qatlab links mimalloc when it was found at build time, and the C++ floor links the same one. Python
-- gets it through LD_PRELOAD, so all three frontends run one allocator and the overheads compare the
-- frontends alone; python_allocator='system' shows Python as usually run.
local function loaded_allocator()
  local f = io.open('/proc/self/maps')
  if not f then return nil end
  local maps = f:read('*a')
  f:close()
  return maps:match('(/%S*libmimalloc%S*)')
end
local allocator = loaded_allocator()
local py_cmd = cfg.python .. ' ' .. py_script
if allocator and cfg.python_allocator == 'same' then py_cmd = 'LD_PRELOAD=' .. allocator .. ' ' .. py_cmd end

local lua_r, py_r, cpp_r = {}, {}, {}
for _ = 1, cfg.rounds do
  lua_round(lua_r)
  cmd_round(py_cmd, py_r)
  cmd_round(('%s %d %d'):format(bench_ops, cfg.iters, cfg.repeats), cpp_r)
end
os.remove(py_script)
local function stats(r, fn)
  local out = {}
  for k, v in pairs(r) do out[k] = fn(v) end
  return out
end
local function minimum(v) return math.min(unpack(v)) end
local lua_ns, py_ns, cpp_ns = stats(lua_r, median), stats(py_r, median), stats(cpp_r, median)
local lua_min, py_min, cpp_min = stats(lua_r, minimum), stats(py_r, minimum), stats(cpp_r, minimum)

-- Start-up -------------------------------------------------------------------------------
local function time_cmd(cmd)
  local per = {}
  for r = 1, cfg.startup_runs do
    local t0 = qatlab.time()
    os.execute(cmd .. ' >/dev/null 2>&1')
    per[r] = qatlab.time() - t0
  end
  return median(per)
end
local empty = os.tmpname() .. '.lua'
io.open(empty, 'w'):close()
local qbin = bench.qatlab_bin()
local startup_q = time_cmd(qbin .. ' run --device cpu ' .. empty)
local startup_t = time_cmd(qbin .. ' -e "require(\'torch\')"')
local startup_p = time_cmd(cfg.python .. " -c 'import torch'")
os.remove(empty)

-- Report -------------------------------------------------------------------------------------
print(('\nper-op time, ns/op over %d alternating rounds of %d x %d calls; 1 thread, torch %s')
  :format(cfg.rounds, cfg.repeats, cfg.iters, torch.version))
print(('allocator: qatlab and the C++ floor %s; Python %s'):format(allocator and 'mimalloc' or 'glibc',
  (allocator and cfg.python_allocator == 'same') and 'mimalloc (LD_PRELOAD)' or 'glibc'))
print('| op | C++ | Lua (qatlab) | Python | Lua overhead | Python overhead | ratio (median) | ratio (min) |')
print('|---|---:|---:|---:|---:|---:|---:|---:|')
-- Overhead = frontend - C++ floor; a frontend that beats the floor (qatlab's `a * 2.0` wraps the
-- number in the tensor's dtype, which skips a cast that at::mul(a, 2.0) pays) shows as 0.
local function ratio(l, p, c) return math.max(l - c, 0) / math.max(p - c, 1), math.max(l - c, 0), math.max(p - c, 1) end
local worst, worst_min = 0, 0
for _, op in ipairs(ops) do
  local n = op[1]
  local c, l, p = cpp_ns[n], lua_ns[n], py_ns[n]
  if c and p then
    local r, lo, po = ratio(l, p, c)
    local rm = ratio(lua_min[n], py_min[n], cpp_min[n])
    worst, worst_min = math.max(worst, r), math.max(worst_min, rm)
    print(('| `%s` | %.0f | %.0f | %.0f | %.0f | %.0f | %.2f | %.2f |'):format(op[2], c, l, p, lo, po, r, rm))
  else
    print(('| `%s` | ? | %.0f | ? | | | | |'):format(op[2], l))
  end
end
print('(C++, Lua, Python and the overheads: medians in ns/op; the last column uses each frontend\'s minimum)')
print(('\nworst overhead ratio Lua/Python: %.2f on medians, %.2f on minima (target <= 0.5)'):format(worst, worst_min))
print(('start-up: qatlab run empty.lua %.3f s; with require torch %.3f s; '
  .. 'python3 -c "import torch" %.3f s (target < 0.3 s)')
  :format(startup_q, startup_t, startup_p))
