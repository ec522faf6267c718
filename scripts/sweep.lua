-- sweep: grid / random / ablation / list spaces and a resumable sweep runner: trials in this process, in worker
-- processes one per GPU, or shared over a Slurm job array; records per trial, median pruning, ranked summary.
--
--   local sweep = require 'sweep'
--   local res = sweep.run{name = 'lr', space = sweep.grid{lr = {1e-3, 3e-4}}, seeds = {1, 2},
--                         metric = {name = 'loss', goal = 'minimize'},
--                         fn = function(run, cfg) ... run:log{step=, loss=}; return {loss = ...} end}
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

local M = {}

local Space = {}
Space.__index = Space

local function space(items) return setmetatable({ items = items }, Space) end

-- A new space: this one's runs followed by other's.
function Space:concat(other)
  local items = {}
  for _, it in ipairs(self.items) do items[#items + 1] = it end
  for _, it in ipairs(other.items) do items[#items + 1] = it end
  return space(items)
end

-- The number of configs (LuaJIT's # does not call __len on tables).
function Space:size() return #self.items end

local function is_list(t)
  if type(t) ~= 'table' then return false end
  local n = 0
  for _ in pairs(t) do n = n + 1 end
  return n > 0 and t[n] ~= nil and #t == n
end

local function sorted_keys(t)
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = k end
  table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
  return keys
end

-- Flattens nested tables to dotted keys; `leaf(v)` says where to stop descending.
local function flatten(t, leaf, prefix, out)
  out = out or {}
  for _, k in ipairs(sorted_keys(t)) do
    local v, key = t[k], (prefix or '') .. tostring(k)
    if type(v) == 'table' and not leaf(v) then flatten(v, leaf, key .. '.', out) else out[key] = v end
  end
  return out
end
M.flatten = function(t) return flatten(t, function(v) return is_list(v) end) end

-- Sets t['a.b'] = v as t.a.b = v.
local function set_path(t, key, v)
  local node, last = t, nil
  for part in key:gmatch('[^.]+') do
    if last then
      node[last] = node[last] or {}
      node = node[last]
    end
    last = part
  end
  node[last] = v
end

local function deep_copy(t)
  if type(t) ~= 'table' then return t end
  local c = {}
  for k, v in pairs(t) do c[k] = deep_copy(v) end
  return c
end

local function deep_merge(into, over)
  for k, v in pairs(over) do
    if type(v) == 'table' and type(into[k]) == 'table' and not is_list(v) then deep_merge(into[k], v)
    else into[k] = deep_copy(v) end
  end
  return into
end

-- grid{lr={1e-3, 3e-4}, kd={T={2, 4}}}: the cartesian product over sorted dotted keys, the first
-- key varying slowest. A non-list value is a constant.
function M.grid(params)
  local flat = flatten(params, is_list)
  local keys, items = sorted_keys(flat), {}
  local function rec(i, cur)
    if i > #keys then
      local ov = {}
      for k, v in pairs(cur) do set_path(ov, k, v) end
      items[#items + 1] = { overrides = ov }
      return
    end
    local vals = flat[keys[i]]
    if not is_list(vals) then vals = { vals } end
    for _, v in ipairs(vals) do
      cur[keys[i]] = v
      rec(i + 1, cur)
    end
    cur[keys[i]] = nil
  end
  rec(1, {})
  return space(items)
end

-- list{cfg1, cfg2, ...}: explicit override tables.
function M.list(cfgs)
  local items = {}
  for i, c in ipairs(cfgs) do items[i] = { overrides = deep_copy(c) } end
  return space(items)
end

-- ablate(base, {name = overrides, ...}): base, then one variant per name (sorted), each named.
function M.ablate(base, variants)
  local items = { { overrides = deep_copy(base), name = 'base' } }
  for _, name in ipairs(sorted_keys(variants)) do
    items[#items + 1] = { overrides = deep_merge(deep_copy(base), variants[name]), name = name }
  end
  return space(items)
end

-- A Park-Miller generator: the same draws on every platform, and math.random is left alone.
local function rng(seed)
  local x = math.floor(seed or 1) % 2147483646 + 1
  return function()
    x = (16807 * x) % 2147483647
    return (x - 1) / 2147483646
  end
end

local draws = {
  choice = function(u, s) return s[2][math.min(math.floor(u() * #s[2]) + 1, #s[2])] end,
  uniform = function(u, s) return s[2] + (s[3] - s[2]) * u() end,
  loguniform = function(u, s) return math.exp(math.log(s[2]) + (math.log(s[3]) - math.log(s[2])) * u()) end,
  int_uniform = function(u, s) return math.min(s[2] + math.floor(u() * (s[3] - s[2] + 1)), s[3]) end,
  quniform = function(u, s) return math.floor((s[2] + (s[3] - s[2]) * u()) / s[4] + 0.5) * s[4] end,
}

-- random{n=, seed=, params={x={'loguniform', 1e-4, 1e-2}, y={'choice', {...}}, z=constant}}
function M.random(o)
  local flat = flatten(o.params, function(v) return type(v[1]) == 'string' end)
  local keys, u, items = sorted_keys(flat), rng(o.seed or 0), {}
  for i = 1, o.n do
    local ov = {}
    for _, k in ipairs(keys) do
      local s = flat[k]
      local v = s
      if type(s) == 'table' then
        local f = draws[s[1]] or error(('sweep.random: unknown distribution %q for %s'):format(s[1], k), 2)
        v = f(u, s)
      end
      set_path(ov, k, v)
    end
    items[i] = { overrides = ov }
  end
  return space(items)
end

-- Run identity ----------------------------------------------------------------------------

local bit = require 'bit'

-- FNV-1a, 32 bits: h * 16777619 = h * 2^24 + h * 403, kept exact in doubles.
function M.fnv1a32(s, h)
  h = h or 2166136261
  for i = 1, #s do
    h = bit.bxor(h, s:byte(i)) % 2 ^ 32
    h = ((h % 256) * 2 ^ 24 + h * 403) % 2 ^ 32
  end
  return h
end

local function mul32(a, b) return (a % 65536 * b + math.floor(a / 65536) * b % 65536 * 65536) % 2 ^ 32 end

-- murmur3's finalizer, so that inputs differing in their last bytes differ in every digit.
local function fmix32(h)
  h = mul32(bit.bxor(h, bit.rshift(h, 16)) % 2 ^ 32, 0x85ebca6b)
  h = mul32(bit.bxor(h, bit.rshift(h, 13)) % 2 ^ 32, 0xc2b2ae35)
  return bit.bxor(h, bit.rshift(h, 16)) % 2 ^ 32
end

-- A 16-hex-digit id from the canonical JSON: FNV-1a of the text and of its reverse, each finalized.
function M.hash(v)
  local s = json.encode(v)
  return ('%08x%08x'):format(fmix32(M.fnv1a32(s)), fmix32(M.fnv1a32(s:reverse(), 3735928559)))
end

local function value_text(v)
  if v == nil then return '' end
  if type(v) == 'number' then return json.number(v) end
  if type(v) == 'table' then return json.encode(v) end
  return tostring(v)
end

-- The override_dirname: 'lr=0.001,rank=8' (sorted dotted keys), 'base' when empty.
function M.run_name(overrides)
  local flat, parts = M.flatten(overrides), {}
  for _, k in ipairs(sorted_keys(flat)) do parts[#parts + 1] = k .. '=' .. value_text(flat[k]) end
  return #parts > 0 and table.concat(parts, ',') or 'base'
end

-- Runner ----------------------------------------------------------------------------------

local store = require 'sweep_store'
local workers = require 'sweep_workers'

-- error(sweep.PRUNED) inside a trial ends it as pruned (Optuna's TrialPruned).
M.PRUNED = setmetatable({}, { __tostring = function() return 'trial pruned' end })

-- {index=, id=, slot=, name=} in a worker process started by a parallel sweep, else nil.
M.worker = workers.this_worker

-- sweep.shard(o): this process's share {index=, count=, from=} (see the shard option), or nil: all trials.
M.shard = workers.shard

local function utc() return os.date('!%Y-%m-%dT%H:%M:%SZ') end
local host = (function()
  local ok, qt = pcall(require, 'qatlab')
  return ok and type(qt) == 'table' and qt or {}
end)()
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

local function median(xs)
  table.sort(xs)
  local n = #xs
  return n % 2 == 1 and xs[(n + 1) / 2] or (xs[n / 2] + xs[n / 2 + 1]) / 2
end

-- The median rule (Optuna's MedianPruner): after startup_trials completed trials and from
-- warmup_steps on, prune when this trial's best value so far is worse than the median of the
-- completed trials' values reported at the same step. In a worker, the completed trials are those
-- recorded when it started.
function Run:should_prune()
  local p, last = self.sweep.prune, self.reports[#self.reports]
  if not p or not last or self.pruned then return self.pruned end
  assert(p.rule == 'median', 'sweep: the only prune rule is median')
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
  local m = median(vals)
  self.pruned = best ~= best or (minimize and best > m) or (not minimize and best < m)
  return self.pruned
end

-- A progress reporter whose lines are prefixed with [run k/N name].
function Run:progress(o)
  o = o or {}
  o.prefix = o.prefix or self.prefix
  return require('progress').new(o)
end

local function new_record(t, status)
  return { run_id = t.id, index = t.index, name = t.name, dir = t.dir, seed = t.seed, config = t.config,
           overrides = t.overrides, status = status, started_at = utc() }
end

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
  rec.status = not ok and 'failed' or run.pruned and 'pruned' or 'completed'
  rec.summary = plain(ok and res or {})
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

local function fmt(x) return x and ('%.6g'):format(x) or '-' end

local function csv_field(v)
  v = v == nil and '' or tostring(v)
  if v:find('[,"\n]') then v = '"' .. v:gsub('"', '""') .. '"' end
  return v
end

local summarize_dir

-- Groups the trials by name (seeds together), ranked by the mean metric; Markdown and CSV text.
-- sweep.summarize(dir): the same from the files of <out>/<name>, written there again (any process).
function M.summarize(results, metric, goal)
  if type(results) == 'string' then return summarize_dir(results) end
  local groups, by_name = {}, {}
  for _, r in ipairs(results) do
    local g = by_name[r.name]
    if not g then
      g = { name = r.name, vals = {}, status = {}, first = r.index }
      by_name[r.name] = g
      groups[#groups + 1] = g
    end
    local v = r.summary and r.summary[metric]
    if r.status == 'completed' and type(v) == 'number' then g.vals[#g.vals + 1] = v end
    g.status[r.status] = (g.status[r.status] or 0) + 1
  end
  for _, g in ipairs(groups) do
    local n, s, ss = #g.vals, 0, 0
    for _, v in ipairs(g.vals) do s = s + v end
    g.mean = n > 0 and s / n or nil
    for _, v in ipairs(g.vals) do ss = ss + (v - g.mean) ^ 2 end
    g.std = n > 1 and math.sqrt(ss / (n - 1)) or (n == 1 and 0 or nil)
  end
  table.sort(groups, function(a, b)
    if (a.mean == nil) ~= (b.mean == nil) then return a.mean ~= nil end
    if a.mean and a.mean ~= b.mean then
      if goal == 'maximize' then return a.mean > b.mean end
      return a.mean < b.mean
    end
    return a.first < b.first
  end)
  local lines = { ('| rank | run | %s (mean ± std) | n | status |'):format(metric), '|---:|---|---|---:|---|' }
  for i, g in ipairs(groups) do
    local st = {}
    for _, k in ipairs(sorted_keys(g.status)) do st[#st + 1] = k .. ' ' .. g.status[k] end
    lines[#lines + 1] = ('| %d | %s | %s ± %s | %d | %s |'):format(i, g.name, fmt(g.mean), fmt(g.std), #g.vals,
                                                                 table.concat(st, ', '))
  end
  local ckeys, skeys, cset, sset = {}, {}, {}, {}
  local flats = {}
  for i, r in ipairs(results) do
    flats[i] = M.flatten(r.config or {})
    for k in pairs(flats[i]) do if not cset[k] then cset[k] = true; ckeys[#ckeys + 1] = k end end
    for k in pairs(r.summary or {}) do if not sset[k] then sset[k] = true; skeys[#skeys + 1] = k end end
  end
  table.sort(ckeys)
  table.sort(skeys)
  local head = { 'index', 'run_id', 'name', 'seed', 'status', 'duration_s' }
  for _, k in ipairs(ckeys) do head[#head + 1] = k end
  for _, k in ipairs(skeys) do head[#head + 1] = k end
  local rows = { table.concat(head, ',') }
  for i, r in ipairs(results) do
    local row = { r.index, r.run_id, csv_field(r.name), r.seed, r.status,
                  r.duration_s and ('%.3f'):format(r.duration_s) }
    for _, k in ipairs(ckeys) do row[#row + 1] = csv_field(value_text(flats[i][k])) end
    for _, k in ipairs(skeys) do row[#row + 1] = csv_field((r.summary or {})[k]) end
    for j = 1, #head do row[j] = row[j] == nil and '' or tostring(row[j]) end
    rows[#rows + 1] = table.concat(row, ',')
  end
  return groups, table.concat(lines, '\n') .. '\n', table.concat(rows, '\n') .. '\n'
end

-- Every trial's record from disk (status 'pending' where none), the ledger rebuilt, the summary written.
local function collect(root, trials, metric, goal, write)
  local recs, results, failed = store.load(root), {}, 0
  for k, t in ipairs(trials) do
    local rec = recs[t.id]
    if rec then
      rec.index = k
    else
      rec = new_record(t, 'pending')
      rec.started_at = nil
    end
    if rec.status == 'failed' then failed = failed + 1 end
    results[k] = rec
  end
  local groups, md, csv = M.summarize(results, metric, goal)
  if write then
    store.rebuild_ledger(root, recs)
    store.write_atomic(root .. '/results.csv', csv)
    store.write_atomic(root .. '/summary.md', md)
  end
  return { results = results, groups = groups, markdown = md, csv = csv, failed = failed, dir = root }
end

summarize_dir = function(root)
  root = root:gsub('/+$', '')
  local meta = store.read_meta(root)
  local trials = {}
  for k, t in ipairs(meta.trials or {}) do
    trials[k] = { id = t.run_id, index = k, name = t.name, seed = t.seed, dir = t.dir, config = t.config,
                  overrides = t.overrides }
  end
  return collect(root, trials, meta.metric, meta.goal, true)
end

-- sweep.run{name=, out=, space=, fn=function(run, cfg) ... return {metric=...} end, base=, seeds={1},
--           metric={name=, goal='minimize'}, prune={rule='median', warmup_steps=0, startup_trials=5},
--           force=false, fail_fast=false, print=print, workers=, devices=, shard=}
-- Completed and pruned trials recorded in <out>/<name> are skipped; failed, running and new ones run.
-- Returns {results=, groups=, markdown=, csv=, failed=, dir=} over every trial of the space (those left
-- to other shards show as 'pending'); failed counts the whole sweep's failed trials.
function M.run(o)
  assert(type(o.name) == 'string' and o.name ~= '', 'sweep.run: needs a name')
  assert(getmetatable(o.space) == Space, 'sweep.run: space must come from sweep.grid/random/ablate/list')
  assert(type(o.fn) == 'function', 'sweep.run: needs fn(run, cfg)')
  local root, say, seeds = (o.out or host.out or 'runs') .. '/' .. o.name, o.print or print, o.seeds or { 1 }
  local metric = o.metric or {}
  local me = workers.this_worker()
  local sw = { fn = o.fn, prune = o.prune, metric = metric.name or 'metric', goal = metric.goal or 'minimize',
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
  if me and me.name ~= o.name then return collect(root, trials, sw.metric, sw.goal, false) end
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
  local res = collect(root, trials, sw.metric, sw.goal, true)
  say(res.markdown)
  return res
end

return M
