-- sweep_workers: a sweep's trials in child processes, one per device at a time, and shared out over the tasks
-- of a Slurm job array. A worker is this same command line started again with its --device set and
-- QATLAB_SWEEP_WORKER=<index>:<run_id>:<slot>:<sweep name>; sweep.run in it runs that trial, records it, exits.
-- The host takes that variable out of the environment (require('qatlab').sweep_worker), so the qatlab
-- processes a trial starts are ordinary runs.
local store = require 'sweep_store'

local M = {}

M.ENV = 'QATLAB_SWEEP_WORKER'

local host_module = require('util').host

-- The trial this process was started for, {index=, id=, slot=, name=} (slot: which of the sweep's devices,
-- from 1; no two running workers share one), or nil in an ordinary run.
function M.this_worker()
  local v = host_module().sweep_worker
  if v == nil then v = os.getenv(M.ENV) end   -- a host that leaves the variable in the environment
  if not v or v == '' then return nil end
  local index, id, slot, name = v:match('^(%d+):(%x+):(%d+):(.+)$')
  if not index then
    error(('sweep: %s=%q is not <trial index>:<run_id>:<slot>:<sweep name>; unset it to run the whole sweep')
          :format(M.ENV, v), 0)
  end
  return { index = tonumber(index), id = id, slot = tonumber(slot), name = name }
end

local function whole(x) return type(x) == 'number' and x == math.floor(x) end

local function check_shard(s, where)
  if not (whole(s.index) and whole(s.count) and s.count >= 1 and s.index >= 0 and s.index < s.count) then
    error(('sweep: %s gives share index %s of count %s; expected a whole 0 <= index < count (from 0)')
          :format(where, tostring(s.index), tostring(s.count)), 0)
  end
  return s
end

-- This process's share of the trials, {index = i (from 0), count = n, from = where}: it runs trials
-- i+1, i+1+n, ... From o.shard, else QATLAB_SWEEP_SHARD='i/n', else a Slurm job array; nil: all of them.
function M.shard(o)
  if o.shard == false then return nil end
  if type(o.shard) == 'table' then
    return check_shard({ index = o.shard.index, count = o.shard.count, from = 'shard' }, 'shard')
  end
  local env = os.getenv('QATLAB_SWEEP_SHARD')
  if env and env ~= '' then
    local i, n = env:match('^%s*(%d+)%s*/%s*(%d+)%s*$')
    if not i then error(('sweep: QATLAB_SWEEP_SHARD=%q: expected i/n, e.g. 0/4'):format(env), 0) end
    return check_shard({ index = tonumber(i), count = tonumber(n), from = 'QATLAB_SWEEP_SHARD' },
                       'QATLAB_SWEEP_SHARD=' .. env)
  end
  local id = tonumber(os.getenv('SLURM_ARRAY_TASK_ID') or '')
  if not id then return nil end
  local function num(k) return tonumber(os.getenv(k) or '') end
  local min, step = num('SLURM_ARRAY_TASK_MIN') or 0, num('SLURM_ARRAY_TASK_STEP') or 1
  local count, max = num('SLURM_ARRAY_TASK_COUNT'), num('SLURM_ARRAY_TASK_MAX')
  count = count or (max and math.floor((max - min) / step) + 1)
  if not count then
    error('sweep: SLURM_ARRAY_TASK_ID is set without SLURM_ARRAY_TASK_COUNT or SLURM_ARRAY_TASK_MAX; '
          .. 'submit with sbatch --array=0-N, or pass shard = {index=, count=} (shard = false ignores Slurm)', 0)
  end
  return check_shard({ index = (id - min) / step, count = count, from = 'SLURM_ARRAY_TASK_ID=' .. id },
                     ('SLURM_ARRAY_TASK_ID=%d (min %d, step %d, count %d; submit a range such as --array=0-N)')
                       :format(id, min, step, count))
end

local function valid_device(d)
  return type(d) == 'string' and (d == 'cpu' or d == 'cuda' or d:match('^cuda:%d+$') ~= nil)
end

-- The worker slots: o.devices (a list or 'cuda:0,cuda:1'), else o.workers slots over the visible GPUs
-- (or the host device), else every GPU when the host runs on cuda:0 (and is not one rank of a data-parallel
-- run: WORLD_SIZE > 1), else the host device alone.
function M.devices(o)
  local host = host_module().device or 'cpu'
  local list = o.devices
  if type(list) == 'string' then
    local t = {}
    for d in list:gmatch('[^,%s]+') do t[#t + 1] = d end
    list = t
  end
  if list then
    if type(list) ~= 'table' or #list == 0 then
      error('sweep: devices must be a list such as {"cuda:0", "cuda:1"}', 0)
    end
    for _, d in ipairs(list) do
      if not valid_device(d) then error(('sweep: device %q: expected cpu, cuda or cuda:N'):format(tostring(d)), 0) end
    end
    if o.workers and o.workers ~= 0 and o.workers ~= #list then
      error(('sweep: workers = %s but %d devices are given; give one of the two'):format(tostring(o.workers), #list), 0)
    end
    return list
  end
  local base = { host }
  local ranks = tonumber(os.getenv('WORLD_SIZE') or '') or 1   -- data-parallel ranks share the GPUs already
  if (host == 'cuda' or host == 'cuda:0') and ranks <= 1 then
    local n = require('torch').cuda.device_count()
    if n > 1 then
      base = {}
      for i = 0, n - 1 do base[#base + 1] = 'cuda:' .. i end
    end
  end
  local n = o.workers
  if n == nil or n == 0 then return base end
  if not (whole(n) and n >= 1) then
    error(('sweep: workers = %s: expected a whole number >= 1 (0: automatic)'):format(tostring(n)), 0)
  end
  local slots = {}
  for i = 1, n do slots[i] = base[(i - 1) % #base + 1] end  -- more workers than GPUs share them in turn
  return slots
end

-- Whether trials must run in worker processes (not in this one).
function M.parallel(devices)
  return #devices > 1 or devices[1] ~= (host_module().device or 'cpu')
end

-- This process's command line as given: the host's qatlab.argv, else (an older host) /proc/self/cmdline.
local function own_argv()
  local given = host_module().argv
  if type(given) == 'table' and #given > 0 then return given end
  local text = store.read('/proc/self/cmdline')
  if not text then
    error('sweep: worker processes restart this command line, which this host does not give (qatlab.argv) '
          .. 'and this system lacks /proc/self/cmdline; run with workers = 1, or one process per share with '
          .. 'QATLAB_SWEEP_SHARD=i/n', 0)
  end
  local argv = {}
  for a in text:gmatch('([^%z]*)%z') do argv[#argv + 1] = a end
  return argv
end

-- This process's command line, restarted for a worker on `device` (--threads: for CPU workers).
local function child_argv(device, threads)
  local argv = own_argv()
  if argv[2] == 'repl' then
    error('sweep: worker processes rerun the command line, and a REPL cannot be rerun; '
          .. 'put the sweep in a script (qatlab run SWEEP.lua) or use workers = 1', 0)
  end
  local out, i, has_threads = { host_module().executable or argv[1] }, 2, false
  local valued = { ['--set'] = true, ['--seed'] = true, ['--out'] = true, ['--log-level'] = true, ['-e'] = true }
  while i <= #argv do
    local a = argv[i]
    if a == '--' then break end
    if a == '--device' then
      i = i + 2
    elseif a:match('^%-%-device=') then
      i = i + 1
    else
      if a == '--threads' or a:match('^%-%-threads=') then has_threads = true end
      local n = (valued[a] or a == '--threads') and 2 or 1
      for j = i, math.min(i + n - 1, #argv) do out[#out + 1] = argv[j] end
      i = i + n
    end
  end
  out[#out + 1] = '--device'
  out[#out + 1] = device
  if threads and not has_threads then
    out[#out + 1] = '--threads'
    out[#out + 1] = tostring(threads)
  end
  for j = i, #argv do out[#out + 1] = argv[j] end
  return out
end

-- The last n lines of a file.
function M.tail(path, n)
  local lines = {}
  for line in ((store.read(path) or '') .. '\n'):gmatch('([^\n]*)\n') do lines[#lines + 1] = line end
  while #lines > 0 and lines[#lines] == '' do lines[#lines] = nil end
  return table.concat(lines, '\n', math.max(1, #lines - n + 1))
end

local function clock() return (host_module().time or os.clock)() end

local function sleep(s) os.execute(('sleep %.2f'):format(s)) end

-- Runs `trials` in worker processes, at most one per slot of `devices` at a time. sw: {name=, root=};
-- on_done(t, rc, device, log, seconds) is called as each worker exits and returns the trial's record; a
-- failed one with stop_on_failure ends the launching (running workers still finish).
function M.dispatch(sw, trials, devices, on_done, stop_on_failure)
  local cpu = 0
  for _, d in ipairs(devices) do if d == 'cpu' then cpu = cpu + 1 end end
  local threads = cpu > 0 and math.max(1, math.floor(require('torch').get_num_threads() / cpu)) or nil
  local free, running, next_i, stop, wait = {}, {}, 1, false, 0.05
  for s = 1, #devices do free[s] = s end
  while true do
    while not stop and next_i <= #trials and #free > 0 do
      local slot, t = table.remove(free, 1), trials[next_i]
      next_i = next_i + 1
      store.mkdir(t.dir)
      local log, rc = t.dir .. '/worker.log', t.dir .. '/worker.rc'
      os.remove(rc)
      local argv = child_argv(devices[slot], devices[slot] == 'cpu' and threads or nil)
      for j, a in ipairs(argv) do argv[j] = store.q(a) end
      local cmd = ('%s=%s %s'):format(M.ENV, store.q(('%d:%s:%d:%s'):format(t.index, t.id, slot, sw.name)),
                                       table.concat(argv, ' '))
      -- The status lands under a temporary name first, so that a partly written one is never read.
      os.execute(('( %s </dev/null >%s 2>&1; echo $? >%s; mv %s %s ) </dev/null >/dev/null 2>&1 &'):format(
        cmd, store.q(log), store.q(rc .. '.tmp'), store.q(rc .. '.tmp'), store.q(rc)))
      running[slot] = { t = t, rc = rc, log = log, started = clock() }
    end
    if next(running) == nil then break end
    local done = false
    for slot, job in pairs(running) do
      local code = tonumber(store.read(job.rc) or '')
      if code then
        running[slot], done = nil, true
        free[#free + 1] = slot
        local rec = on_done(job.t, code, devices[slot], job.log, clock() - job.started)
        if rec.status == 'failed' and stop_on_failure then stop = true end
      end
    end
    table.sort(free)
    if done then wait = 0.05 else
      sleep(wait)
      wait = math.min(wait * 1.5, 0.5)
    end
  end
  return stop
end

return M
