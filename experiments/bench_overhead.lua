-- bench_overhead: per-op overhead of small tensor ops called from Lua versus Python PyTorch
-- (same machine, same LibTorch), over the C++ floor; and start-up time of `qatlab run`.
--
--   qatlab run experiments/bench_overhead.lua [--set iters=20000] [--set repeats=15]
-- Overhead = (frontend ns/op) - (C++ ns/op). Targets: Lua overhead <= 0.5 x Python's;
-- start-up of `qatlab run empty.lua` < 0.3 s. Prints a Markdown table for the README.
local torch = require 'torch'
local qatlab = require 'qatlab'
local config = require 'config'
local args = ...
local bench = require 'bench'
local median, sh = bench.median, bench.sh

local cfg = config.merge({
  iters = 20000, repeats = 15, startup_runs = 10,
  python = os.getenv('QATLAB_PYTHON') or 'python3',
  bench_ops = '',   -- path of qatlab_bench_ops; found next to the qatlab binary by default
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
local lua_ns = {}
for _, op in ipairs(ops) do
  op[3](1000)  -- warm up (JIT traces, allocator)
  local per = {}
  for r = 1, cfg.repeats do
    local t0 = qatlab.time()
    op[3](cfg.iters)
    per[r] = (qatlab.time() - t0) * 1e9 / cfg.iters
  end
  lua_ns[op[1]] = median(per)
end

-- Python ------------------------------------------------------------------------------------
local py_lines = {
  'import time, torch', 'torch.set_num_threads(1)',
  'a, b, m = torch.ones(1), torch.ones(1), torch.ones(8, 8)',
  ('N, R = %d, %d'):format(cfg.iters, cfg.repeats),
  'def bench(name, f):',
  '    f(1000); per = []',
  '    for _ in range(R):',
  '        t0 = time.perf_counter_ns(); f(N); per.append((time.perf_counter_ns() - t0) / N)',
  '    per.sort(); print(name, per[len(per) // 2])',
}
for _, op in ipairs(ops) do
  py_lines[#py_lines + 1] = ('def f_%s(n):\n    for _ in range(n): %s'):format(op[1], op[2])
  py_lines[#py_lines + 1] = ('bench(%q, f_%s)'):format(op[1], op[1])
end
local py_script = os.tmpname()
local fh = assert(io.open(py_script, 'w'))
fh:write(table.concat(py_lines, '\n'), '\n')
fh:close()
local py_ns = {}
for name, v in sh(cfg.python .. ' ' .. py_script):gmatch('(%S+) (%S+)') do py_ns[name] = tonumber(v) end
os.remove(py_script)

-- C++ floor --------------------------------------------------------------------------------
local exe_dir = bench.qatlab_bin():match('^(.*)/[^/]*$') .. '/tests'
local bench_ops = cfg.bench_ops ~= '' and cfg.bench_ops or exe_dir .. '/qatlab_bench_ops'
local cpp_ns = {}
for name, v in sh(('%s %d %d'):format(bench_ops, cfg.iters, cfg.repeats)):gmatch('(%S+) (%S+)') do
  cpp_ns[name] = tonumber(v)
end

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
print(('\nper-op time, median ns/op over %d x %d calls, 1 thread, torch %s')
  :format(cfg.repeats, cfg.iters, torch.version))
print('| op | C++ | Lua (qatlab) | Python | Lua overhead | Python overhead | ratio |')
print('|---|---:|---:|---:|---:|---:|---:|')
local worst = 0
for _, op in ipairs(ops) do
  local n = op[1]
  local c, l, p = cpp_ns[n], lua_ns[n], py_ns[n]
  if c and p then
    local lo, po = math.max(l - c, 0), math.max(p - c, 1)
    worst = math.max(worst, lo / po)
    print(('| `%s` | %.0f | %.0f | %.0f | %.0f | %.0f | %.2f |'):format(op[2], c, l, p, lo, po, lo / po))
  else
    print(('| `%s` | ? | %.0f | ? | | | |'):format(op[2], l))
  end
end
print(('\nworst overhead ratio Lua/Python: %.2f (target <= 0.5)'):format(worst))
print(('start-up: qatlab run empty.lua %.3f s; with require torch %.3f s; '
  .. 'python3 -c "import torch" %.3f s (target < 0.3 s)')
  :format(startup_q, startup_t, startup_p))
