-- sweep: grid / random / ablation / list spaces and a resumable sweep runner: trials in this process, in worker
-- processes one per GPU, or shared over a Slurm job array; records per trial, median pruning, ranked summary.
--
--   local sweep = require 'sweep'
--   local res = sweep.run{name = 'lr', space = sweep.grid{lr = {1e-3, 3e-4}}, seeds = {1, 2},
--                         metric = {name = 'loss', goal = 'minimize'},
--                         fn = function(run, cfg) ... run:log{step=, loss=}; return {loss = ...} end}
--
-- The files: sweep_space (grid/random/ablate/list), sweep_key (trial ids and names), sweep_report (ranked
-- summary, results.csv), sweep_store (records on disk), sweep_workers (processes, job arrays); this one runs trials.
--
-- A trial's key (its run_id, which resume looks up) is the hash of the whole configuration the trial function
-- is given, `base` merged with the trial's overrides, and its seed. Give every setting the trial reads through
-- `base` (and read it from cfg, not from an upvalue): a changed setting then changes the key and the trial
-- runs again instead of reusing a stale result. metric.goal is exactly 'minimize' or 'maximize' (no other
-- spelling: it decides both the ranking and which side the pruner cuts). A trial must return a table holding
-- the metric; one that returns without it is recorded failed, with the keys it did return.
--
-- Options of sweep.run (besides name, space, fn, metric, seeds, base, out, prune, force, fail_fast, print):
--   workers = N           trials at once, each in its own `qatlab` process (N > 1), spread over the GPUs in
--                         turn (or on the host device). Default: one per GPU when the host runs on cuda:0 and
--                         sees several (restrict with CUDA_VISIBLE_DEVICES) outside a data-parallel run
--                         (WORLD_SIZE > 1), else 1: in this process.
--   devices = {...}       the worker slots instead: {'cuda:0', 'cuda:1'}, 'cuda:2,cuda:3', {'cpu', 'cpu'}.
--   shard = {index=, count=}  run only trials index+1, index+1+count, ... (index from 0); shard = false ignores
--                         the environment. Default: QATLAB_SWEEP_SHARD='i/n', else a Slurm job array
--                         (SLURM_ARRAY_TASK_ID, _MIN, _STEP, _COUNT or _MAX): task i of n runs its share.
-- A worker reruns this process's command line (qatlab.argv) with --device set and the environment
-- variable QATLAB_SWEEP_WORKER=<index>:<run_id>:<slot>:<name>, which the host takes out of the environment
-- (processes the trial starts do not inherit it): the script runs up to sweep.run again (keep
-- that part cheap or cached on disk), runs that one trial, writes its record and exits. Its output goes to
-- <trial dir>/worker.log; a worker that dies before recording is recorded failed with the log's tail.
-- sweep.worker() returns {index=, id=, slot=, name=} in a worker, sweep.shard{} this process's share of an
-- array ({index=, count=, from=}); both nil elsewhere. Every process writes records/<run_id>.json
-- (atomically) and rebuilds runs.jsonl from them; completed and pruned trials are skipped in any later run,
-- whichever mode ran them. sweep.summarize(dir) rebuilds summary.md and results.csv of a sweep folder
-- <out>/<name> from any process, e.g. once a job array is done.
--
--   multi-GPU node:  qatlab run my_sweep.lua --out runs          (one trial per GPU at a time)
--   on the CPU:      qatlab run my_sweep.lua --out runs  with workers = 2 or devices = {'cpu', 'cpu'}
--   Slurm array:     sbatch --array=0-7 --gres=gpu:1 --wrap 'qatlab run my_sweep.lua --out runs'
--                    then: qatlab -e "print(require('sweep').summarize('runs/<name>').markdown)"
-- Array tasks start the script at once: set-up that writes shared files before sweep.run must be done once
-- first (experiments/sweep_lr.lua: --set prepare=true, then the array).
local json = require 'json'
local config = require 'config'
local opts = require 'opts'
local util = require 'util'
local space = require 'sweep_space'
local key = require 'sweep_key'
local report = require 'sweep_report'
local store = require 'sweep_store'
local workers = require 'sweep_workers'

local M = {}

-- The spaces, the identity and the report, under the names sweep has always had.
M.grid, M.list, M.ablate, M.random, M.flatten = space.grid, space.list, space.ablate, space.random, space.flatten
M.fnv1a32, M.hash, M.run_name = key.fnv1a32, key.hash, key.run_name
M.summarize = report.summarize
local Space, deep_copy = space.Space, space.deep_copy


-- error(sweep.PRUNED) inside a trial ends it as pruned (Optuna's TrialPruned).
M.PRUNED = setmetatable({}, { __tostring = function() return 'trial pruned' end })

-- {index=, id=, slot=, name=} in a worker process started by a parallel sweep, else nil.
M.worker = workers.this_worker

-- sweep.shard(o): this process's share {index=, count=, from=} (see the shard option), or nil: all trials.
M.shard = workers.shard

local utc = store.utc
local host = util.host()
local clock = host.time or os.clock

M.read_ledger = store.read_ledger

-- Finite numbers, strings and booleans pass; NaN/Inf become 'nan'/'inf'/'-inf' (JSON has none,
-- and a diverged run must still be recorded); anything else (a tensor) is shown with tostring.
local function scalar(v)
  local tv = type(v)
  if tv == 'number' and (v ~= v or v == math.huge or v == -math.huge) then
    return v ~= v and 'nan' or v > 0 and 'inf' or '-inf'
  end
  return (tv == 'number' or tv == 'string' or tv == 'boolean') and v or tostring(v)
end

local function plain(t)
  local c = {}
  for k, v in pairs(type(t) == 'table' and t or {}) do c[k] = scalar(v) end
  return c
end

local Run = {}
Run.__index = Run

-- Appends {step=, ...} to metrics.jsonl (flushed).
function Run:log(rec)
  if not self.metrics then self.metrics = assert(io.open(self.dir .. '/metrics.jsonl', 'a')) end
  self.metrics:write(json.encode(plain(rec)), '\n')
  self.metrics:flush()
end

-- An intermediate value of the sweep metric, for pruning.
function Run:report(step, value)
  self.reports[#self.reports + 1] = { step, value }
end

-- The median rule (Optuna's MedianPruner): after startup_trials completed trials and from
-- warmup_steps on, prune when this trial's best value so far is worse than the median of the
-- completed trials' values reported at the same step. In a worker, the completed trials are those
-- recorded when it started.
function Run:should_prune()
  local p, last = self.sweep.prune, self.reports[#self.reports]
  if not p or not last or self.pruned then return self.pruned end
  local step, minimize = last[1], self.sweep.goal == 'minimize'
  if step < (p.warmup_steps or 0) or #self.sweep.history < (p.startup_trials or 5) then return false end
  local vals = {}
  for _, reports in ipairs(self.sweep.history) do
    for _, r in ipairs(reports) do if r[1] == step then vals[#vals + 1] = r[2]; break end end
  end
  if #vals == 0 then return false end
  local best = last[2]
  for _, r in ipairs(self.reports) do
    if r[2] == r[2] then best = minimize and math.min(best, r[2]) or math.max(best, r[2]) end
  end
  local m = util.median(vals)
  self.pruned = best ~= best or (minimize and best > m) or (not minimize and best < m)
  return self.pruned
end

-- A progress reporter whose lines are prefixed with [run k/N name].
function Run:progress(o)
  o = o or {}
  o.prefix = o.prefix or self.prefix
  return require('progress').new(o)
end

local new_record = store.new_record

-- Records a trial's state: its record file and, when final, status.json and the merged ledger.
local function save(sw, rec)
  store.write_record(sw.root, rec)
  if rec.status == 'running' then return end
  store.write_atomic(rec.dir .. '/status.json', json.encode(rec) .. '\n')
  if sw.rebuild then store.rebuild_ledger(sw.root) end
end

local function prepare(t)
  store.mkdir(t.dir)
  store.write_atomic(t.dir .. '/config.json', json.encode(t.config) .. '\n')
  store.write_atomic(t.dir .. '/overrides.json', json.encode(t.overrides) .. '\n')
end

local function run_trial(sw, t)
  prepare(t)
  local rec = new_record(t, 'running')
  rec.device = host.device
  save(sw, rec)
  local run = setmetatable({ id = t.id, index = t.index, name = t.name, seed = t.seed, dir = t.dir,
                             config = t.config, reports = {}, pruned = false, sweep = sw,
                             prefix = ('[run %d/%d %s]'):format(t.index, sw.total, t.name) }, Run)
  math.randomseed(t.seed)
  local has_torch, torch = pcall(require, 'torch')
  if has_torch and type(torch) == 'table' and torch.manual_seed then torch.manual_seed(t.seed) end
  local t0 = clock()
  local ok, res = xpcall(function() return sw.fn(run, deep_copy(t.config)) end, function(e)
    if e == M.PRUNED then return e end
    return { message = tostring(e), traceback = debug.traceback(tostring(e), 2) }
  end)
  if run.metrics then run.metrics:close() end
  if not ok and res == M.PRUNED then ok, res, run.pruned = true, nil, true end
  local returned
  if ok and not run.pruned and (type(res) ~= 'table' or res[sw.metric] == nil) then
    -- a result without the metric cannot be ranked or resumed from: the trial failed (a typo in the key)
    local keys = {}
    for k in pairs(type(res) == 'table' and res or {}) do keys[#keys + 1] = tostring(k) end
    table.sort(keys)
    local msg = ('the trial returned %s without the metric %q (%s)'):format(type(res) == 'table' and 'a table'
      or tostring(res), sw.metric, #keys > 0 and ('keys: ' .. table.concat(keys, ', ')) or 'no keys')
    returned = type(res) == 'table' and res or nil   -- kept in the record's summary, for the user to see
    ok, res = false, { message = msg, traceback = msg }
  end
  rec.status = not ok and 'failed' or run.pruned and 'pruned' or 'completed'
  rec.summary = plain(ok and res or returned or {})
  local last = run.reports[#run.reports]
  if rec.status == 'pruned' and rec.summary[sw.metric] == nil and last then rec.summary[sw.metric] = last[2] end
  if not ok then rec.error, rec.traceback = res.message, res.traceback end
  if #run.reports > 0 then
    rec.reports = {}
    for i, r in ipairs(run.reports) do rec.reports[i] = { r[1], scalar(r[2]) } end
  end
  rec.ended_at, rec.duration_s = utc(), clock() - t0
  save(sw, rec)
  if rec.status == 'completed' then sw.history[#sw.history + 1] = run.reports end
  collectgarbage()
  return rec
end

-- The record of a worker process that exited: its own, or a failed one when it died before writing it.
local function worker_record(sw, t, rc, device, log, seconds)
  local old = store.read_record(sw.root, t.id)
  if old and old.status ~= 'running' then return old end
  local began, rec = old ~= nil, new_record(t, 'failed')
  rec.started_at = began and old.started_at or rec.started_at
  rec.device, rec.exit_code, rec.duration_s, rec.ended_at = device, rc, seconds, utc()
  rec.log_tail = workers.tail(log, 20)
  rec.error = ('worker process exited with status %d %s; the end of %s:\n%s'):format(rc, began
    and 'during the trial (a crash, a kill or os.exit)'
    or ('before starting the trial (does the script reach sweep.run{name = %q} the same way in a worker?)')
      :format(sw.name), log, rec.log_tail)
  rec.summary = {}
  save(sw, rec)
  return rec
end

-- sweep.run{name=, out=, space=, fn=function(run, cfg) ... return {metric=...} end, base=, seeds={1},
--           metric={name=, goal='minimize'}, prune={rule='median', warmup_steps=0, startup_trials=5},
--           force=false, fail_fast=false, print=print, workers=, devices=, shard=}
-- Completed and pruned trials recorded in <out>/<name> are skipped; failed, running and new ones run.
-- Returns {results=, groups=, markdown=, csv=, failed=, dir=} over every trial of the space (those left
-- to other shards show as 'pending'); failed counts the whole sweep's failed trials.
local RUN_OPTS = {
  name = 'string!', space = 'table!', fn = 'callable!', out = 'string', base = 'table', seeds = 'table',
  metric = 'table', prune = 'table', force = 'boolean', fail_fast = 'boolean', print = 'callable',
  workers = 'number', devices = 'table|string', shard = 'table|boolean',
}

function M.run(o)
  opts.check(o, RUN_OPTS, 'sweep.run')
  if o.name == '' then error('sweep.run: option "name" must not be empty', 2) end
  if getmetatable(o.space) ~= Space then
    error('sweep.run: option "space" must come from sweep.grid, sweep.random, sweep.ablate or sweep.list', 2)
  end
  opts.check(o.metric, {name = 'string', goal = 'string'}, 'sweep.run: metric')
  local goal = (o.metric or {}).goal or 'minimize'
  if goal ~= 'minimize' and goal ~= 'maximize' then
    error(('sweep.run: metric.goal must be exactly "minimize" or "maximize", got %q'):format(tostring(goal)), 2)
  end
  if o.prune then
    opts.check(o.prune, {rule = 'string', warmup_steps = 'number', startup_trials = 'number'}, 'sweep.run: prune')
    if (o.prune.rule or 'median') ~= 'median' then
      error(('sweep.run: prune.rule must be "median" (the only rule), got %q'):format(tostring(o.prune.rule)), 2)
    end
  end
  local root, say, seeds = (o.out or host.out or 'runs') .. '/' .. o.name, o.print or print, o.seeds or { 1 }
  local metric = o.metric or {}
  local me = workers.this_worker()
  local sw = { fn = o.fn, prune = o.prune, metric = metric.name or 'metric', goal = goal,
               root = root, name = o.name, history = {}, total = #o.space.items * #seeds, rebuild = not me }
  -- Resolve every trial first, so a bad override stops the sweep before anything runs.
  local trials = {}
  for _, item in ipairs(o.space.items) do
    local cfg = o.base and config.merge(o.base, item.overrides) or deep_copy(item.overrides)
    local name = item.name or M.run_name(item.overrides)
    for _, seed in ipairs(seeds) do
      local k = #trials + 1
      local dir_name = ('%03d_%s'):format(k, name):gsub('[/%s]', '_'):sub(1, 120)
      if #seeds > 1 then dir_name = dir_name .. ',seed=' .. seed end
      trials[k] = { id = M.hash{ config = cfg, seed = seed }, index = k, name = name, seed = seed, config = cfg,
                    overrides = item.overrides, dir = root .. '/' .. dir_name }
    end
  end
  -- A worker for another sweep of the same script: this one is read, not run.
  if me and me.name ~= o.name then return report.collect(root, trials, sw.metric, sw.goal, false) end
  local share, devices = workers.shard(o), not me and workers.devices(o)
  store.mkdir(root)
  local prev = store.load(root)
  -- Earlier completed trials inform the pruner, unless force reruns them.
  local rerun = {}
  for _, t in ipairs(trials) do rerun[t.id] = o.force end
  for id, rec in pairs(prev) do
    if rec.status == 'completed' and not rerun[id] then sw.history[#sw.history + 1] = rec.reports or {} end
  end
  local function line(t, rec, where)
    return ('[run %d/%d %s] %s %s=%s (%.1fs%s)%s'):format(t.index, sw.total, t.name, rec.status, sw.metric,
      tostring((rec.summary or {})[sw.metric]), rec.duration_s or 0, where or '', rec.error and ': ' .. rec.error or '')
  end
  if me then   -- a worker: run the one trial it was started for, record it, exit
    local t = trials[me.index]
    if not t or t.id ~= me.id then
      error(('sweep %s: worker trial %d resolves to another config here than in the process that started it; '
             .. 'build the space the same way in every process (fixed seeds, no clock or randomness)')
            :format(o.name, me.index), 0)
    end
    local rec = run_trial(sw, t)
    say(line(t, rec))
    io.stdout:flush()
    os.exit(rec.status == 'failed' and 1 or 0, true)
  end
  local metas = {}
  for k, t in ipairs(trials) do
    metas[k] = { run_id = t.id, name = t.name, seed = t.seed, dir = t.dir, config = t.config, overrides = t.overrides }
  end
  store.write_meta(root, { name = o.name, metric = sw.metric, goal = sw.goal, trials = metas })
  local todo = {}
  for k, t in ipairs(trials) do
    if not share or (k - 1) % share.count == share.index then
      local old = prev[t.id]
      if old and (old.status == 'completed' or old.status == 'pruned') and not o.force then
        say(('[run %d/%d %s] %s earlier, skipped'):format(k, sw.total, t.name, old.status))
      else
        todo[#todo + 1] = t
      end
    end
  end
  if share then
    say(('sweep %s: share %d/%d (%s): %d trials to run'):format(o.name, share.index + 1, share.count, share.from,
                                                                #todo))
  end
  local failures = 0
  local function done(t, rec, where)
    say(line(t, rec, where))
    if rec.status == 'failed' then
      failures = failures + 1
      if o.fail_fast and not where then
        error(('sweep: run %s failed (fail_fast)\n%s'):format(t.name, rec.traceback or rec.error), 0)
      end
    end
    return rec
  end
  if #todo > 0 and workers.parallel(devices) then
    say(('sweep %s: %d trials in worker processes on %s'):format(o.name, #todo, table.concat(devices, ', ')))
    workers.dispatch(sw, todo, devices, function(t, rc, device, log, seconds)
      local rec = worker_record(sw, t, rc, device, log, seconds)
      store.rebuild_ledger(root)
      return done(t, rec, ', ' .. device)
    end, o.fail_fast)
    if o.fail_fast and failures > 0 then
      error(('sweep: %d run(s) failed (fail_fast); see their records in %s/records'):format(failures, root), 0)
    end
  else
    for _, t in ipairs(todo) do done(t, run_trial(sw, t)) end
  end
  local res = report.collect(root, trials, sw.metric, sw.goal, true)
  say(res.markdown)
  return res
end

return M
