-- bench: helpers shared by the benchmark experiments: medians, shell capture, peak RSS of this
-- process, the device in words, and the path of the running qatlab binary (for timing child runs).
local M = {}

-- The median of a list of numbers (sorts it in place; util.median).
M.median = require('util').median

-- stdout of a shell command.
function M.sh(cmd)
  local p = assert(io.popen(cmd))
  local out = p:read('*a')
  p:close()
  return out
end

-- A field of /proc/self/status in kB (VmRSS, VmHWM...).
function M.status_kb(key)
  local f = assert(io.open('/proc/self/status'))
  local text = f:read('*a')
  f:close()
  return tonumber(text:match(key .. ':%s*(%d+)')) or 0
end

-- Resets VmHWM to the current RSS ("5" to clear_refs), so a later VmHWM is the peak of what follows.
function M.reset_peak_rss()
  local f = io.open('/proc/self/clear_refs', 'w')
  if f then f:write('5'); f:close() end
end

-- The device in words, for benchmark tables: the GPU's name for 'cuda[:N]', else the CPU model
-- from /proc/cpuinfo with the count of logical CPUs ('cpu' where that file says nothing).
function M.device_name(device)
  device = tostring(device or 'cpu')
  if device:match('^cuda') then
    return require('torch').cuda.get_device_name(device)
  end
  local f = io.open('/proc/cpuinfo')
  if not f then return 'cpu' end
  local text = f:read('*a')
  f:close()
  local model = text:match('model name%s*:%s*([^\n]+)')
  local _, n = text:gsub('\nprocessor%s*:', '')
  if text:match('^processor%s*:') then n = n + 1 end
  if not model then return 'cpu' end
  return ('%s, %d logical CPUs'):format(model:gsub('%s+$', ''), n)
end

-- The qatlab executable running this script.
function M.qatlab_bin()
  return require('qatlab').executable
end

-- ---------------------------------------------------------------------------------------------
-- find_max_batch: the largest batch whose training step fits (the seed's SR-003 benchmark, and
-- nanochat's auto batch size). A try runs `warmup` steps then `steps` timed ones; a CUDA
-- "out of memory" error, a CPU allocation failure, or (on the CPU) a peak RSS above
-- memory_budget marks the batch as failed. Other errors propagate.

local function is_oom(msg)
  msg = tostring(msg):lower()
  return msg:find('out of memory', 1, true) or msg:find("can't allocate memory", 1, true)
    or msg:find('not enough memory', 1, true) or msg:find('bad_alloc', 1, true)
    or msg:find('failed to allocate', 1, true)
end
M.is_oom = is_oom

local OVER = 'qatlab.bench: over memory budget'

local function free_memory(torch)
  torch.collect()
  if torch.cuda.is_available() then torch.cuda.empty_cache() end
end

-- Thousands separators: 12479 -> "12,479".
function M.commas(n)
  local s = tostring(math.floor(n + 0.5))
  local sign, digits = s:match('^(-?)(%d+)$')
  if not digits then return s end
  digits = digits:reverse():gsub('(%d%d%d)', '%1,'):reverse():gsub('^,', '')
  return sign .. digits
end

-- Runs one batch size; returns a row {batch, step_s, tokens_s, mem_bytes, loss, status, err}.
function M.try_batch(make_step, batch, o)
  local torch = require 'torch'
  local clock = o.clock or require('qatlab').time
  local cuda = o.device ~= nil and tostring(o.device):match('^cuda') ~= nil
  local budget = o.memory_budget
  local row = { batch = batch, status = 'OK' }
  free_memory(torch)
  if not cuda then M.reset_peak_rss() end
  local peak = 0
  local function sample()
    if o.memory then
      peak = math.max(peak, o.memory())
    elseif cuda then
      local m = torch.cuda.memory()
      peak = math.max(peak, m.reserved_bytes or 0)
    else
      peak = math.max(peak, M.status_kb('VmHWM') * 1024)
    end
    if budget and peak > budget then error(OVER, 0) end
  end
  local times = {}
  local ok, err = pcall(function()
    for i = 1, (o.warmup or 1) + (o.steps or 3) do
      local t0 = clock()
      local loss = make_step(batch)
      if cuda then torch.cuda.synchronize() end
      local dt = clock() - t0
      if torch.is_tensor(loss) then loss = loss:item() end
      row.loss = loss
      sample()
      if i > (o.warmup or 1) then times[#times + 1] = dt end
    end
  end)
  row.mem_bytes = peak
  if not ok then
    if err == OVER then
      row.status = 'OVER BUDGET'
    elseif is_oom(err) then
      row.status = 'OOM'
    else
      free_memory(torch)
      error(err, 0)
    end
    row.err = tostring(err)
    row.loss = nil
  else
    row.step_s = M.median(times)
    row.tokens_s = batch * (o.seq or 1) / row.step_s
  end
  free_memory(torch)
  return row
end

-- The seed's table: | Batch | Step(s) | Memory | t/s | Loss | Status |, sorted by batch, the
-- largest working batch marked MAX.
function M.batch_table(rows, max_ok)
  local sorted = {}
  for _, r in ipairs(rows) do sorted[#sorted + 1] = r end
  table.sort(sorted, function(a, b) return a.batch < b.batch end)
  local lines = { '| Batch | Step(s) | Memory | t/s | Loss | Status |',
    '|-------|---------|--------|-----|------|--------|' }
  for _, r in ipairs(sorted) do
    local mem = r.mem_bytes and r.mem_bytes > 0 and (M.commas(r.mem_bytes / 2 ^ 20) .. 'M') or '-'
    if r.status == 'OK' then
      local bold = r.batch == max_ok
      local function b(s) return bold and ('**' .. s .. '**') or s end
      lines[#lines + 1] = ('| %s | %s | %s | %s | %s | %s |'):format(b(tostring(r.batch)),
        b(('%.3f'):format(r.step_s)), b(mem), b(M.commas(r.tokens_s)),
        r.loss and ('%.2f'):format(r.loss) or '-', bold and '**MAX**' or 'OK')
    else
      lines[#lines + 1] = ('| %d | - | %s | - | - | %s |'):format(r.batch,
        r.status == 'OVER BUDGET' and mem or '-', r.status)
    end
  end
  return table.concat(lines, '\n')
end

-- bench.find_max_batch{make_step = function(batch) ... return loss end, seq=, min=1, max=,
-- mode='binary'|'nanochat', safety=0.9, memory_budget=bytes, device=, warmup=1, steps=3,
-- multiple=1, print=true, title=} -> {best=, max_ok=, rows=, table=}.
-- binary: bisection of [min, max] for the largest batch that works (best = it).
-- nanochat: min, 2 min, 4 min, ... until a failure (or max), bisection between the last success
-- and the first failure, then best = floor(max_ok * safety) (rounded down to `multiple`).
local FIND_OPTS = {
  make_step = 'callable!', seq = 'number', min = 'integer', max = 'integer!', mode = 'string', safety = 'number',
  memory_budget = 'number', device = 'string', warmup = 'integer', steps = 'integer', multiple = 'integer',
  print = 'boolean|callable', title = 'string', on_row = 'callable', clock = 'callable', memory = 'callable',
}

function M.find_max_batch(o)
  require('opts').check(o, FIND_OPTS, 'bench.find_max_batch')
  local mult = o.multiple or 1
  local min = o.min or mult
  local max = assert(o.max, 'bench.find_max_batch: max is required')
  local mode = o.mode or 'binary'
  assert(mode == 'binary' or mode == 'nanochat', 'bench.find_max_batch: mode must be binary or nanochat')
  assert(min >= 1 and max >= min, 'bench.find_max_batch: need 1 <= min <= max')
  local rows, tried = {}, {}
  local function try(b)
    if tried[b] == nil then
      local r = M.try_batch(o.make_step, b, o)
      rows[#rows + 1] = r
      tried[b] = r.status == 'OK'
      if o.on_row then o.on_row(r) end
    end
    return tried[b]
  end
  -- lo: largest known good (0 = none), hi: smallest known bad (max + mult = none), both multiples
  -- of mult except the min.
  local lo, hi = 0, nil
  if mode == 'nanochat' then
    local b = min
    while true do
      if try(b) then lo = b else hi = b; break end
      if b >= max then break end
      b = math.min(b * 2, max)
    end
  else
    if try(min) then lo = min else hi = min end
  end
  if lo > 0 then
    hi = hi or (max + mult)
    if mode == 'binary' and hi > max then
      if try(max) then lo = max else hi = max end
    end
    while lo < max and hi - lo > mult do
      local mid = math.floor((lo + hi) / 2 / mult) * mult
      if mid <= lo then mid = lo + mult end
      if mid >= hi then break end
      if try(mid) then lo = mid else hi = mid end
    end
  end
  local max_ok = lo > 0 and lo or nil
  local best = max_ok
  if max_ok and mode == 'nanochat' then
    best = math.max(min, math.floor(max_ok * (o.safety or 0.9) / mult) * mult)
  end
  local tbl = M.batch_table(rows, max_ok)
  if o.print ~= false then
    if o.title then print(o.title) end
    print(tbl)
    print(('max batch %s%s'):format(tostring(max_ok),
      mode == 'nanochat' and (' -> %s with safety %g'):format(tostring(best), o.safety or 0.9) or ''))
  end
  return { best = best, max_ok = max_ok, rows = rows, table = tbl }
end

return M
