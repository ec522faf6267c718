-- sweep_spec: spaces (grid order, random draws, ablations), run identity, and the runner on a toy
-- function: per-trial dirs, runs.jsonl ledger, resume, failure isolation, median pruning, summary.
local h = require 'helper'
local json = require 'json'
local sweep = require 'sweep'

local function overrides(space)
  local t = {}
  for i, it in ipairs(space.items) do t[i] = it.overrides end
  return t
end

local function read(path) return assert(require('files').read(path), 'cannot read ' .. path) end

local function lines(path)
  local t = {}
  for line in io.lines(path) do t[#t + 1] = json.decode(line) end
  return t
end

local quiet = function() end

describe('sweep spaces', function()
  it('grid: cartesian product over sorted dotted keys, first key slowest', function()
    local s = sweep.grid{ rank = { 4, 8 }, lr = { 1e-3, 3e-4 }, kd = { T = { 2 } }, steps = 10 }
    assert.equal(4, s:size())
    assert.same({
      { kd = { T = 2 }, lr = 1e-3, rank = 4, steps = 10 }, { kd = { T = 2 }, lr = 1e-3, rank = 8, steps = 10 },
      { kd = { T = 2 }, lr = 3e-4, rank = 4, steps = 10 }, { kd = { T = 2 }, lr = 3e-4, rank = 8, steps = 10 },
    }, overrides(s))
    assert.equal('kd.T=2,lr=0.001,rank=4,steps=10', sweep.run_name(s.items[1].overrides))
  end)

  it('random: deterministic draws within range from the seed', function()
    local spec = { n = 20, seed = 7, params = { lr = { 'loguniform', 1e-4, 1e-2 }, opt = { 'choice', { 'adam', 'sgd' } },
                                                 rank = { 'int_uniform', 1, 3 }, wd = { 'quniform', 0, 1, 0.25 },
                                                 m = { 'uniform', 0.8, 0.9 }, fixed = 5 } }
    local a, b = overrides(sweep.random(spec)), overrides(sweep.random(spec))
    assert.same(a, b)
    local seen = {}
    for _, c in ipairs(a) do
      assert.is_true(c.lr >= 1e-4 and c.lr <= 1e-2)
      assert.is_true(c.m >= 0.8 and c.m <= 0.9)
      assert.is_true(c.opt == 'adam' or c.opt == 'sgd')
      assert.equal(math.floor(c.rank), c.rank)
      assert.is_true(c.rank >= 1 and c.rank <= 3)
      assert.equal(0, c.wd % 0.25)
      assert.equal(5, c.fixed)
      seen[c.rank] = true
    end
    assert.same({ true, true, true }, seen)
    spec.seed = 8
    assert.are_not.same(a, overrides(sweep.random(spec)))
    assert.has_error(function() sweep.random{ n = 1, params = { x = { 'gauss', 0, 1 } } } end)
  end)

  it('ablate: the base plus one named variant per entry; list and concat', function()
    local s = sweep.ablate({ lr = 3e-4, kd = { T = 4 } }, { no_kd = { kd = false }, hot = { kd = { T = 8 } } })
    assert.same({ { lr = 3e-4, kd = { T = 4 } }, { lr = 3e-4, kd = { T = 8 } }, { lr = 3e-4, kd = false } },
                overrides(s))
    assert.same({ 'base', 'hot', 'no_kd' }, { s.items[1].name, s.items[2].name, s.items[3].name })
    local both = sweep.list{ { lr = 1 }, { lr = 2 } }:concat(s)
    assert.equal(5, both:size())
    assert.same({ lr = 2 }, both.items[2].overrides)
  end)

  it('hashes canonical JSON: key order does not matter, values and seeds do', function()
    local a, b = { x = 1, y = { 2, 3 } }, { y = { 2, 3 }, x = 1 }
    assert.equal(sweep.hash(a), sweep.hash(b))
    assert.matches('^%x+$', sweep.hash(a))
    assert.equal(16, #sweep.hash(a))
    assert.equal(0xe40c292c, sweep.fnv1a32('a'))          -- FNV-1a 32 reference vectors
    assert.equal(0xbf9cf968, sweep.fnv1a32('foobar'))
    assert.equal(0x811c9dc5, sweep.fnv1a32(''))
    assert.are_not.equal(sweep.hash{ config = a, seed = 1 }, sweep.hash{ config = a, seed = 2 })
    assert.are_not.equal(sweep.hash{ x = 1 }, sweep.hash{ x = 1.0000001 })
  end)
end)

describe('sweep.run', function()
  it('runs a grid, writes the ledger and dirs, ranks the summary, and resumes', function()
    local out, calls = h.tmpdir(), 0
    local function toy(run, cfg)
      calls = calls + 1
      local loss = (cfg.x - 2) ^ 2 + cfg.y + 0.1 * run.seed
      for step = 1, 3 do run:log{ step = step, loss = loss + 1 / step } end
      return { loss = loss, note = 'ok' }
    end
    local opts = { name = 'toy', out = out, space = sweep.grid{ x = { 1, 2, 3 }, y = { 0, 1 } }, seeds = { 1, 2 },
                   metric = { name = 'loss', goal = 'minimize' }, fn = toy, print = quiet }
    local r = sweep.run(opts)
    assert.equal(12, calls)
    assert.equal(0, r.failed)
    local root = out .. '/toy'
    local ledger = lines(root .. '/runs.jsonl')
    assert.equal(12, #ledger)                  -- the merged ledger: each trial's last record, by index
    assert.equal('completed', ledger[1].status)
    assert.same({ x = 1, y = 0 }, ledger[1].config)
    assert.equal(1.1, ledger[1].summary.loss)
    assert.equal('001_x=1,y=0,seed=1', ledger[1].dir:match('[^/]+$'))
    assert.same(ledger[1], json.decode(read(root .. '/records/' .. ledger[1].run_id .. '.json')))
    local d = root .. '/001_x=1,y=0,seed=1'
    assert.same({ x = 1, y = 0 }, json.decode(read(d .. '/config.json')))
    assert.equal('completed', json.decode(read(d .. '/status.json')).status)
    local m = lines(d .. '/metrics.jsonl')
    assert.equal(3, #m)
    assert.same({ step = 2, loss = 1.6 }, m[2])
    -- summary: x=2,y=0 best with mean of 0.1 and 0.2 over the two seeds
    assert.equal('x=2,y=0', r.groups[1].name)
    assert.near(0.15, r.groups[1].mean, 1e-12)
    assert.near(math.sqrt(0.005), r.groups[1].std, 1e-12)
    assert.equal('x=3,y=1', r.groups[6].name)
    assert.matches('| 1 | x=2,y=0 | 0.15 ± 0.0707107 | 2 | completed 2 |', r.markdown, 1, true)
    local csv = read(root .. '/results.csv')
    assert.matches('^index,run_id,name,seed,status,duration_s,x,y,loss,note\n', csv)
    assert.matches('\n1,%x+,"x=1,y=0",1,completed,[%d.]+,1,0,1.1,ok\n', csv)
    -- the second run resumes: nothing is recomputed, the summary is the same
    local r2 = sweep.run(opts)
    assert.equal(12, calls)
    assert.equal(12, #lines(root .. '/runs.jsonl'))
    assert.equal(r.markdown, r2.markdown)
    -- a grown space only runs its new trials
    opts.space = sweep.grid{ x = { 1, 2, 3, 4 }, y = { 0, 1 } }
    sweep.run(opts)
    assert.equal(16, calls)
  end)

  it('isolates failures, records the traceback and reruns failed trials on resume', function()
    local out, calls, fail = h.tmpdir(), {}, true
    local opts = { name = 'f', out = out, space = sweep.list{ { a = 1 }, { a = 2 }, { a = 3 } }, print = quiet,
                   metric = { name = 'acc', goal = 'maximize' },
                   fn = function(_, cfg)
                     calls[#calls + 1] = cfg.a
                     if cfg.a == 2 and fail then error('boom at a=2') end
                     return { acc = cfg.a }
                   end }
    local r = sweep.run(opts)
    assert.same({ 1, 2, 3 }, calls)
    assert.equal(1, r.failed)
    local failed = r.results[2]
    assert.equal('failed', failed.status)
    assert.matches('boom at a=2', failed.error)
    assert.matches('stack traceback', failed.traceback)
    assert.equal('a=3', r.groups[1].name)      -- maximize
    assert.equal('a=2', r.groups[3].name)      -- no value: last
    assert.matches('| 3 | a=2 | - ± - | 0 | failed 1 |', r.markdown, 1, true)
    fail = false
    r = sweep.run(opts)
    assert.same({ 1, 2, 3, 2 }, calls)
    assert.equal(0, r.failed)
    assert.equal('completed', r.results[2].status)
    opts.fail_fast, fail = true, true
    opts.force = true
    assert.has_error(function() sweep.run(opts) end)
  end)

  it('records diverged (NaN/Inf) runs instead of failing to write them', function()
    local out = h.tmpdir()
    local r = sweep.run{ name = 'nan', out = out, space = sweep.grid{ d = { 0, 1 } }, print = quiet,
                         metric = { name = 'loss' },
                         fn = function(run, cfg)
                           local v = cfg.d == 1 and 0 / 0 or 1.5
                           run:log{ step = 1, loss = v, gnorm = math.huge }
                           run:report(1, v)
                           return { loss = v }
                         end }
    assert.equal('completed', r.results[2].status)
    assert.equal('nan', r.results[2].summary.loss)
    assert.same({ { 1, 'nan' } }, r.results[2].reports)
    assert.same({ step = 1, loss = 'nan', gnorm = 'inf' }, lines(r.results[2].dir .. '/metrics.jsonl')[1])
    assert.equal('d=0', r.groups[1].name)
    assert.is_nil(r.groups[2].mean)
  end)

  it('merges overrides into base defaults and refuses unknown keys before running anything', function()
    local out, seen = h.tmpdir(), {}
    local base = { lr = 1e-3, model = { width = 64, depth = 2 } }
    sweep.run{ name = 'b', out = out, base = base, space = sweep.grid{ model = { width = { 32, 128 } } },
               print = quiet, fn = function(_, cfg) seen[#seen + 1] = cfg; return { metric = 1 } end }
    assert.same({ { lr = 1e-3, model = { width = 32, depth = 2 } }, { lr = 1e-3, model = { width = 128, depth = 2 } } },
                seen)
    local calls = 0
    local ok, err = pcall(sweep.run, { name = 'b2', out = out, base = base, print = quiet,
                                       space = sweep.list{ { lr = 1 }, { lr = 2, widht = 3 } },
                                       fn = function() calls = calls + 1 end })
    assert.is_false(ok)
    assert.matches('unknown setting "widht"', err)
    assert.equal(0, calls)
  end)

  it('leaves CSV cells empty for keys a run does not have', function()
    local r = sweep.run{ name = 'c', out = h.tmpdir(), space = sweep.list{ { a = 1 }, { b = 'x,y' } }, print = quiet,
                         fn = function(_, cfg) return { metric = cfg.a or 0 } end }
    assert.equal('index,run_id,name,seed,status,duration_s,a,b,metric', r.csv:match('^[^\n]+'))
    assert.matches('\n1,%x+,a=1,1,completed,[%d.]+,1,,1\n2,%x+,"b=x,y",1,completed,[%d.]+,,"x,y",0\n$', r.csv)
  end)

  it('accepts exactly minimize or maximize as the goal and checks its options by name', function()
    local base = { name = 'g', out = h.tmpdir(), space = sweep.grid{ a = { 1 } }, print = quiet,
                   fn = function() return { loss = 1 } end }
    local function err_of(extra)
      local o = {}
      for k, v in pairs(base) do o[k] = v end
      for k, v in pairs(extra) do o[k] = v end
      local ok, e = pcall(sweep.run, o)
      assert.is_false(ok)
      return tostring(e)
    end
    assert.truthy(err_of{ metric = { name = 'loss', goal = 'minimise' } }
      :find('metric.goal must be exactly "minimize" or "maximize", got "minimise"', 1, true))
    assert.truthy(err_of{ metric = { name = 'loss', gaol = 'minimize' } }
      :find('sweep.run: metric: unknown option "gaol" (did you mean "goal"?)', 1, true))
    assert.truthy(err_of{ seed = { 1 } }:find('sweep.run: unknown option "seed" (did you mean "seeds"?)', 1, true))
    assert.truthy(err_of{ fail_fast = 'yes' }
      :find('sweep.run: option "fail_fast" must be a boolean, got string', 1, true))
    assert.truthy(err_of{ prune = { rule = 'hyperband' } }:find('prune.rule must be "median"', 1, true))
  end)

  it('records a trial whose result lacks the metric as failed, naming the keys it returned', function()
    local r = sweep.run{ name = 'm', out = h.tmpdir(), space = sweep.grid{ a = { 1, 2 } }, print = quiet,
                         metric = { name = 'loss' },
                         fn = function(_, cfg) if cfg.a == 1 then return { loss = 0.5 } end; return { los = 0.25 } end }
    assert.equal('completed', r.results[1].status)
    assert.equal('failed', r.results[2].status)
    assert.equal(1, r.failed)
    assert.truthy(r.results[2].error:find('without the metric "loss" (keys: los)', 1, true), r.results[2].error)
    assert.equal(0.25, r.results[2].summary.los)
    -- a failed trial runs again next time; a fixed function then completes it
    local calls = 0
    local r2 = sweep.run{ name = 'm', out = r.dir:match('^(.*)/m$'), space = sweep.grid{ a = { 1, 2 } }, print = quiet,
                          metric = { name = 'loss' }, fn = function() calls = calls + 1; return { loss = 0.125 } end }
    assert.equal(1, calls)
    assert.equal('completed', r2.results[2].status)
  end)

  it('keys a trial by its whole configuration: a changed base setting runs it again', function()
    local out, calls = h.tmpdir(), 0
    local function go(steps)
      return sweep.run{ name = 'k', out = out, space = sweep.grid{ lr = { 1, 2 } }, print = quiet,
                        base = { lr = 0, steps = steps }, metric = { name = 'loss' },
                        fn = function(_, cfg) calls = calls + 1; return { loss = cfg.lr * cfg.steps } end }
    end
    local a = go(10)
    assert.equal(2, calls)
    go(10)
    assert.equal(2, calls)                           -- same configuration: resumed, nothing runs
    local b = go(20)
    assert.equal(4, calls)                           -- steps changed outside the grid: both trials run again
    assert.are_not.equal(a.results[1].run_id, b.results[1].run_id)
    assert.equal(40, b.results[2].summary.loss)
    assert.same({ lr = 2, steps = 20 }, b.results[2].config)
  end)

  it('prunes with the median rule after startup trials and warm-up steps', function()
    local out = h.tmpdir()
    local stopped_at = {}
    local curves = { 1, 2, 3, 10, 0.5, 2.5 }  -- the value at step s is c * 10 / s
    local r = sweep.run{
      name = 'p', out = out, space = sweep.grid{ c = curves }, print = quiet,
      metric = { name = 'loss' }, prune = { rule = 'median', warmup_steps = 2, startup_trials = 3 },
      fn = function(run, cfg)
        local v
        for step = 1, 5 do
          v = cfg.c * 10 / step
          run:report(step, v)
          if run:should_prune() then stopped_at[cfg.c] = step; return end
        end
        return { loss = v }
      end }
    -- c = 1, 2, 3 complete (startup); at step 2 they reported 5, 10, 15 (median 10), so c = 10
    -- (50 at step 2; step 1 is warm-up) is pruned and c = 0.5 (2.5) completes. Then the median of
    -- 2.5, 5, 10, 15 is 7.5 and c = 2.5 (12.5 at step 2) is pruned.
    assert.same({ [10] = 2, [2.5] = 2 }, stopped_at)
    local status = {}
    for _, rec in ipairs(r.results) do status[rec.name] = rec.status end
    assert.same({ ['c=1'] = 'completed', ['c=2'] = 'completed', ['c=3'] = 'completed',
                  ['c=10'] = 'pruned', ['c=0.5'] = 'completed', ['c=2.5'] = 'pruned' }, status)
    assert.equal(50, r.results[4].summary.loss)   -- a pruned run keeps its last reported value
    assert.equal(12.5, r.results[6].summary.loss)
    assert.equal('c=0.5', r.groups[1].name)
    assert.equal('c=10', r.groups[5].name)        -- pruned runs rank after completed ones
    assert.same({ 2, 10 }, r.results[2].reports[2])
    -- without enough completed trials nothing is pruned
    stopped_at = {}
    sweep.run{ name = 'p2', out = out, space = sweep.grid{ c = { 1, 10 } }, print = quiet,
               metric = { name = 'loss' }, prune = { rule = 'median' },
               fn = function(run, cfg)
                 run:report(1, cfg.c)
                 if run:should_prune() then stopped_at[cfg.c] = 1 end
                 return { loss = cfg.c }
               end }
    assert.same({}, stopped_at)
  end)
end)

describe('sweep.run on a legacy ledger', function()
  it('skips trials an older runs.jsonl (no records/) holds as completed', function()
    local out, calls = h.tmpdir(), {}
    local opts = { name = 'old', out = out, space = sweep.list{ { a = 1 }, { a = 2 } }, print = quiet,
                   fn = function(_, cfg) calls[#calls + 1] = cfg.a; return { metric = cfg.a } end }
    os.execute('mkdir -p ' .. h.q(out .. '/old'))
    local f = assert(io.open(out .. '/old/runs.jsonl', 'w'))
    local id = sweep.hash{ config = { a = 2 }, seed = 1 }
    f:write(json.encode{ run_id = id, index = 2, name = 'a=2', status = 'running' }, '\n')
    f:write(json.encode{ run_id = id, index = 2, name = 'a=2', status = 'completed', summary = { metric = 7 } }, '\n')
    f:write('{"run_id": "torn', '\n')
    f:close()
    local r = sweep.run(opts)
    assert.same({ 1 }, calls)
    assert.equal(7, r.results[2].summary.metric)
    assert.equal(2, #lines(out .. '/old/runs.jsonl'))   -- rebuilt: the old trial kept, the torn line gone
  end)
end)

describe('sweep worker options', function()
  local workers = require 'sweep_workers'

  it('resolves devices and workers, and shares', function()
    assert.same({ 'cpu', 'cpu' }, workers.devices{ devices = 'cpu,cpu' })
    assert.same({ 'cuda:0', 'cuda:1' }, workers.devices{ devices = { 'cuda:0', 'cuda:1' } })
    assert.same({ 'cpu', 'cpu', 'cpu' }, workers.devices{ workers = 3 })   -- the specs run on the CPU
    assert.same({ 'cpu' }, workers.devices{})
    assert.is_false(workers.parallel{ 'cpu' })
    assert.is_true(workers.parallel{ 'cpu', 'cpu' })
    assert.has_error(function() workers.devices{ devices = { 'gpu0' } } end, 'sweep: device "gpu0": expected cpu, cuda or cuda:N')
    assert.has_error(function() workers.devices{ workers = 1.5 } end)
    assert.has_error(function() workers.devices{ workers = 3, devices = 'cpu,cpu' } end)
    assert.same({ index = 1, count = 3, from = 'shard' }, workers.shard{ shard = { index = 1, count = 3 } })
    assert.is_nil(workers.shard{ shard = false })
    assert.has_error(function() workers.shard{ shard = { index = 3, count = 3 } } end)
    assert.is_nil(sweep.worker())
  end)
end)

-- The toy sweep the process tests run: 4 trials (x = 1, 2; seeds 1, 2) whose loss comes from torch's
-- seeded generator. Each execution of a trial appends its index to <out>/calls.txt.
local toy = [[
local sweep = require 'sweep'
local torch = require 'torch'
local qatlab = require 'qatlab'
local args = ...
local function exists(p) local f = io.open(p); if f then f:close() end; return f ~= nil end
local function append(p, s) local f = assert(io.open(p, 'a')); f:write(s, '\n'); f:close() end
local function pid() local f = io.open('/proc/self/stat'); local p = f:read('*n'); f:close(); return p end
local res = sweep.run{
  name = 'toy', space = sweep.grid{ x = { 1, 2 } }, seeds = { 1, 2 }, metric = { name = 'loss' },
  workers = args.workers,
  fn = function(run, cfg)
    append(qatlab.out .. '/calls.txt', run.index)
    local together
    if args.barrier and run.index <= 2 then   -- trials 1 and 2 wait for each other: they must run at once
      append(qatlab.out .. '/started_' .. run.index, 'x')
      local t0 = qatlab.time()
      while not exists(qatlab.out .. '/started_' .. (3 - run.index)) and qatlab.time() - t0 < 20 do
        os.execute('sleep 0.05')
      end
      together = exists(qatlab.out .. '/started_' .. (3 - run.index))
    end
    if args.fail == run.index then error('boom in trial ' .. run.index) end
    if args.crash == run.index then io.stderr:write('worker dies\n'); os.exit(3) end
    local sh = io.popen('echo "[${QATLAB_SWEEP_WORKER-unset}]"')   -- what a process the trial starts sees
    local child_env = sh:read('*a'):match('%[(.-)%]')
    sh:close()
    return { loss = torch.randn(3):sum():item() + cfg.x, pid = pid(), device = qatlab.device, together = together,
             worker = sweep.worker() and sweep.worker().index or 0, child_env = child_env }
  end }
print(('failed=%d'):format(res.failed))
]]

describe('sweep.run in worker processes and job arrays', function()
  local hr = require 'hostrun'
  local dir = hr.files{ ['toy.lua'] = toy }
  local clean = 'env -u SLURM_ARRAY_TASK_ID -u QATLAB_SWEEP_SHARD -u QATLAB_SWEEP_WORKER '
  local function cmd(out, extra, env)
    return clean .. (env or '') .. ' ' .. hr.cmd(('run %s --device cpu --threads 1 --out %s %s'):format(
      h.q(dir .. '/toy.lua'), h.q(dir .. '/' .. out), extra or ''))
  end
  local function records(out)
    local by_index = {}
    for _, rec in ipairs(lines(dir .. '/' .. out .. '/toy/runs.jsonl')) do by_index[rec.index] = rec end
    return by_index
  end
  local function calls(out)
    local n = {}
    for line in (hr.slurp(dir .. '/' .. out .. '/calls.txt') or ''):gmatch('%d+') do
      n[tonumber(line)] = (n[tonumber(line)] or 0) + 1
    end
    return n
  end
  local slurm = 'SLURM_ARRAY_TASK_COUNT=2 SLURM_ARRAY_TASK_ID='
  -- All at once: in this process, two CPU workers, a simulated 2-task job array, workers that fail.
  local runs
  setup(function()
    runs = hr.many({ cmd('inproc'), cmd('par', '--set workers=2 --set barrier=true'),
                     cmd('array', '', slurm .. '0'), cmd('array', '', slurm .. '1'),
                     cmd('fail', '--set workers=2 --set fail=2 --set crash=3') }, 5)
    for i, r in ipairs(runs) do assert(r.rc == 0, ('run %d failed:\n%s\n%s'):format(i, r.out, r.err)) end
  end)

  it('runs trials in two worker processes at once, with the in-process results', function()
    local a, b = records('inproc'), records('par')
    hr.has(runs[2].out, 'sweep toy: 4 trials in worker processes on cpu, cpu')
    local pids = {}
    for k = 1, 4 do
      assert.equal('completed', b[k].status)
      assert.equal(a[k].summary.loss, b[k].summary.loss)           -- same seeds, same values
      assert.equal(a[1].summary.pid, a[k].summary.pid)             -- one process in-process ...
      assert.is_nil(pids[b[k].summary.pid])                        -- ... one per trial with workers
      pids[b[k].summary.pid] = true
      assert.equal(0, a[k].summary.worker)
      assert.equal(k, b[k].summary.worker)                         -- a worker knows its trial ...
      assert.equal('unset', b[k].summary.child_env)                -- ... and its children are not workers
      hr.has(hr.slurp(b[k].dir .. '/worker.log'), ('[run %d/4 '):format(k))
    end
    assert.is_nil(pids[a[1].summary.pid])
    assert.is_true(b[1].summary.together and b[2].summary.together)
    assert.same({ 1, 1, 1, 1 }, calls('par'))
    assert.equal(hr.slurp(dir .. '/inproc/toy/summary.md'), hr.slurp(dir .. '/par/toy/summary.md'))
  end)

  it('spreads a job array over its tasks, each trial once, and summarizes from the files', function()
    assert.same({ 1, 1, 1, 1 }, calls('array'))
    hr.has(runs[3].out, 'share 1/2 (SLURM_ARRAY_TASK_ID=0): 2 trials to run')
    assert.truthy(runs[3].out:find('[run 1/4 ', 1, true) and runs[3].out:find('[run 3/4 ', 1, true))
    assert.truthy(runs[4].out:find('[run 2/4 ', 1, true) and runs[4].out:find('[run 4/4 ', 1, true))
    local r = sweep.summarize(dir .. '/array/toy')
    assert.equal(4, #r.results)
    for k = 1, 4 do assert.equal('completed', r.results[k].status) end
    assert.equal(hr.slurp(dir .. '/inproc/toy/summary.md'), r.markdown)
    assert.equal(r.markdown, hr.slurp(dir .. '/array/toy/summary.md'))
    assert.equal(4, #lines(dir .. '/array/toy/runs.jsonl'))
    local pending = sweep.run{ name = 'toy', out = dir .. '/pending', space = sweep.grid{ x = { 1, 2 } },
                               shard = { index = 0, count = 2 }, print = quiet, fn = function() return {} end }
    assert.equal('pending', pending.results[2].status)
  end)

  it('records a failing or dying worker as failed and finishes the others', function()
    local r = records('fail')
    hr.has(runs[5].out, 'failed=2')
    assert.equal('completed', r[1].status)
    assert.equal('completed', r[4].status)
    assert.equal('failed', r[2].status)
    hr.has(r[2].error, 'boom in trial 2')
    hr.has(r[2].traceback, 'stack traceback')
    assert.equal('failed', r[3].status)
    assert.equal(3, r[3].exit_code)
    hr.has(r[3].error, 'exited with status 3 during the trial')
    hr.has(r[3].error, 'worker dies')
    hr.has(hr.slurp(r[3].dir .. '/worker.log'), 'worker dies')
    hr.has(hr.slurp(r[3].dir .. '/status.json'), '"status":"failed"')
  end)

  it('resumes across modes: finished trials are skipped whichever mode ran them', function()
    -- the failed run again in this process: only trials 2 and 3 run
    local res = hr.many({ cmd('fail'), cmd('array', '--set workers=2'), cmd('par', '', slurm .. '1') }, 3)
    for i, x in ipairs(res) do assert(x.rc == 0, ('run %d failed:\n%s\n%s'):format(i, x.out, x.err)) end
    assert.same({ 1, 2, 2, 1 }, calls('fail'))
    assert.equal(2, select(2, res[1].out:gsub('completed earlier, skipped', '')))
    hr.has(res[1].out, 'failed=0')
    assert.equal('completed', records('fail')[3].status)
    -- the array's trials under workers, the workers' trials under an array task: nothing runs
    assert.same({ 1, 1, 1, 1 }, calls('array'))
    assert.equal(4, select(2, res[2].out:gsub('completed earlier, skipped', '')))
    assert.same({ 1, 1, 1, 1 }, calls('par'))
    hr.has(res[3].out, '0 trials to run')
  end)

  teardown(function() hr.rmtree(dir) end)
end)
