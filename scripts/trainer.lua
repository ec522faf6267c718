-- trainer: the training loop of experiments: accumulation, clipping, schedules, EMA, eval, the seed's
-- training_log.csv + metrics.jsonl, atomic resumable checkpoints (ckpt_<step>/, best/) and progress.
local torch = require 'torch'
local optim = require 'optim'
local json = require 'json'
local progress = require 'progress'
local ema_mod = require 'ema'
local log = require 'log'
local files = require 'files'
local opts = require 'opts'
local util = require 'util'

local M = {}

local Trainer = {}
Trainer.__index = Trainer

M.CSV_HEADER = 'step,train_loss,eval_loss,lr,elapsed_sec'

-- The options of trainer.new and their types (opts.check: a typo names the closest key).
local KNOWN = {
  model = 'any!', optimizer = 'any!', schedule = 'table|number', loss = 'callable!',
  data = 'function|table|userdata!', shard_data = 'boolean', eval = 'callable', steps = 'number',
  time_budget = 'number', grad_accum = 'integer', clip = 'number', eval_every = 'number', eval_at_start = 'boolean',
  log_every = 'number', save_every = 'number', keep_last = 'number', save_final = 'boolean', out = 'string',
  config = 'table', hooks = 'table', ema = 'number', seed = 'number', resume = 'boolean', progress = 'table|boolean',
  precision = 'string', sync_every = 'string|number',
}

local host = util.host

local q = util.q
local function sh(cmd, what) if os.execute(cmd) ~= 0 then error('trainer: cannot ' .. what, 0) end end
local function mkdir(d) sh('mkdir -p ' .. q(d), 'create ' .. d) end
local function rm_rf(d) sh('rm -rf ' .. q(d), 'remove ' .. d) end
local function exists(p) return os.rename(p, p) ~= nil end
local function finite(x) return x == x and x ~= math.huge and x ~= -math.huge end
local function num(v) return torch.is_tensor(v) and v:item() or v end

-- The `dist` module when dist.init() joined a world of more than one process, else nil.
local function dist_active()
  local ok, d = pcall(require, 'dist')
  if ok and d.is_initialized() and d.world_size() > 1 then return d end
end

local read_file = files.read
local function write_atomic(path, text) files.write_atomic(path, text, 'trainer') end

-- The steps of the ckpt_<step> directories in dir, ascending.
local function list_ckpts(dir)
  local steps, p = {}, io.popen('ls -1 ' .. q(dir) .. ' 2>/dev/null')
  for name in p:lines() do
    local s = name:match('^ckpt_(%d+)$')
    if s then steps[#steps + 1] = tonumber(s) end
  end
  p:close()
  table.sort(steps)
  return steps
end

-- Keeps the lines of a file for which keep(line) is true (log trimming on resume).
local function filter_lines(path, keep)
  local text, out = read_file(path), {}
  if not text then return end
  for line in text:gmatch('[^\n]+') do if keep(line) then out[#out + 1] = line .. '\n' end end
  write_atomic(path, table.concat(out))
end

-- precision 'auto' | 'fp32' | 'bf16' -> the resolved name, the autocast device type (nil: plain fp32) and why
-- (scripts/precision.lua): 'auto' is bf16 on CUDA and on CPUs with AMX-BF16 or AVX512-BF16, fp32 elsewhere.
local function resolve_precision(p, params, h)
  local dev = params[1] and params[1].device or h.device or 'cpu'
  return require('precision').resolve(p, tostring(dev):match('^cuda') and 'cuda' or 'cpu', nil, 4)
end

-- sync_every 'auto' | N -> N: the loss is read on the host (a device sync) every N steps and at log steps.
-- 'auto' is 1 on the CPU (reading is free there) and log_every on CUDA, where a per-step read would stall
-- the queue of kernels the host has launched ahead.
local function resolve_sync(n, params, h, log_every)
  if n == nil or n == 'auto' then
    local dev = params[1] and params[1].device or h.device or 'cpu'
    return tostring(dev):match('^cuda') and math.max(log_every, 1) or 1
  end
  if type(n) ~= 'number' or n < 1 or n % 1 ~= 0 then
    error(("trainer.new: sync_every must be 'auto' or a positive integer, got %s"):format(tostring(n)), 3)
  end
  return n
end

-- trainer.new{model=, optimizer=, loss=fn(model, batch) -> loss, parts, data=fn(step, micro, t) | iterator,
--   schedule=, eval=fn(model) -> {eval_loss=, ...}, steps=, time_budget= (s), grad_accum=1, clip=, eval_every=,
--   eval_at_start=true, log_every=10, save_every=, keep_last=2, save_final=true, out= (qatlab.out), config=,
--   hooks={on_step=, on_eval=, on_save=}, ema= (decay), seed= (qatlab.seed or 0), resume=false, progress=,
--   precision='auto'|'fp32'|'bf16', sync_every='auto'|N}
-- precision 'bf16' runs loss (forward + loss) and eval under bf16 autocast (torch.autocast); parameters, grads and
-- the optimizer stay as they are (fp32 masters), backward runs outside autocast. When given, the resolved choice
-- goes into config.json. sync_every N > 1: steps between reads keep the loss on the device; t:step() then
-- returns a 0-dim tensor on those steps (a number on read steps), and a non-finite loss is caught at the next
-- read (the log row's window mean, or the read step's own loss) instead of at once.
-- Steps count from 0 like the schedules: step index s (0-based) gives the row/checkpoint `s + 1`. The
-- schedule's multiplier scales each group's initial LR (PyTorch's LambdaLR); a schedule built with `lr=`
-- (other than 1) sets that LR on every group. An iterator (`:next()` -> batch or nil, `:reset()`) restarts
-- at the end of an epoch; parts.tokens (a number) gives tokens/s. Randomness: every step starts with
-- torch.manual_seed(seed + s) and math.randomseed(seed + s), so a resumed run draws the same random numbers
-- (dropout, a data function's randint) as an uninterrupted one. Resume restores model, optimizer, EMA, step,
-- elapsed, best eval and the data position (`data:state()`/`:set_state()` when offered, else an iterator is
-- fast-forwarded by epochs and batches); log rows after the checkpoint's step are dropped.
-- Data parallel (dist.init() with a world > 1): the parameters are wrapped by dist.ddp (gradients averaged over
-- ranks during backward; earlier micro-batches of grad_accum only accumulate); rank r keeps rows
-- r*B/W+1 .. (r+1)*B/W of every tensor in each global batch of B rows (batch = a tensor or a table of them), unless
-- shard_data=true says the data function returns this rank's rows already (it reads t.shard = {rank=, world=}) or
-- the iterator has :shard(rank, world), which is called once. Only rank 0 writes logs, checkpoints and the
-- progress bar (hooks and eval run on every rank: test dist.is_main() there before writing); the logged
-- train_loss is the mean over ranks; the saved data position counts global batches, so a run resumes with any
-- number of ranks. With time_budget, rank 0's clock decides for all.
function M.new(o)
  if type(o) ~= 'table' then error('trainer.new: expected an options table, got ' .. type(o), 2) end
  opts.check(o, KNOWN, 'trainer.new')
  assert(type(o.data) == 'function' or (o.data and o.data.next),
         'trainer.new: data must be a function or an object with :next()')
  assert(o.steps or o.time_budget, 'trainer.new: give steps, time_budget or both')
  local h = host()
  local self = setmetatable({
    model = o.model, optimizer = o.optimizer, schedule = o.schedule, loss_fn = o.loss, data = o.data,
    eval_fn = o.eval, steps = o.steps or nil, time_budget = o.time_budget, grad_accum = o.grad_accum or 1,
    clip = o.clip, eval_every = o.eval_every, eval_at_start = o.eval_at_start ~= false,
    log_every = o.log_every or 10, save_every = o.save_every, keep_last = o.keep_last or 2,
    save_final = o.save_final ~= false, out = o.out or h.out, hooks = o.hooks or {},
    seed = o.seed or h.seed or 0, progress_opts = o.progress, clock = h.time or os.clock,
    global_step = 0, elapsed0 = 0, data_pos = { epoch = 0, batch = 0 }, base_lrs = {}, params = {},
  }, Trainer)
  assert(self.grad_accum >= 1, 'trainer.new: grad_accum must be >= 1')
  self.iter = type(self.data) ~= 'function'
  self.dist = dist_active()
  self.writes = self.dist == nil or self.dist.is_main()   -- only rank 0 writes logs and checkpoints
  if self.dist then
    self.shard = { rank = self.dist.rank(), world = self.dist.world_size() }
    self.shard_data = o.shard_data == true
    if self.iter and self.data.shard then self.data:shard(self.shard.rank, self.shard.world); self.shard_data = true end
  end
  for i, g in ipairs(self.optimizer:param_groups()) do
    self.base_lrs[i] = g.lr
    for _, p in ipairs(g.params) do self.params[#self.params + 1] = p end
  end
  self.lr = self.base_lrs[1]
  self.precision, self.autocast, self.precision_why = resolve_precision(o.precision, self.params, h)
  if self.writes ~= false then log.info('trainer: ' .. self.precision_why) end
  self.sync_every = resolve_sync(o.sync_every, self.params, h, self.log_every)
  self.absolute_lr = self.schedule ~= nil and self.schedule.base_lr ~= nil and self.schedule.base_lr ~= 1
  if o.ema then self.ema = ema_mod.new(self.params, { decay = o.ema }) end
  self:reset_window()
  if self.out and self.writes then
    mkdir(self.out)
    local conf = o.config
    if conf == nil or type(conf) == 'table' then   -- the precision that ran is part of the resolved config
      conf = {}   -- a copy: the user's table stays as given
      for k, v in pairs(o.config or {}) do conf[k] = v end
      conf.precision = self.precision   -- resolved ('auto' -> what ran)
    end
    if conf ~= nil then write_atomic(self.out .. '/config.json', json.encode(conf) .. '\n') end
  end
  local resumed = false
  if o.resume then
    assert(self.out, 'trainer.new: resume=true needs out (or qatlab --out)')
    resumed = self:restore()
  end
  if self.out and self.writes and not resumed and #list_ckpts(self.out) > 0 then
    log.warn(('trainer: %s holds checkpoints of an earlier run (a fresh run does not resume them)'):format(self.out))
  end
  -- After restore: the reducer hooks the tensors training will update; rank 0's values win.
  if self.dist then self.ddp = self.dist.ddp(self.params) end
  if self.out and self.writes then self:open_logs(resumed) end
  self.t0 = self.clock()
  return self
end

-- Seconds of training so far, across resumes.
function Trainer:elapsed()
  if self.elapsed_sync then return self.elapsed_sync end
  return self.elapsed0 + (self.clock() - (self.t0 or self.clock()))
end

function Trainer:reset_window()
  self.window = { loss = 0, n = 0, tokens = 0, parts = {}, t0 = self.clock() }
end

function Trainer:open_logs(resumed)
  local csv, jsonl = self.out .. '/training_log.csv', self.out .. '/metrics.jsonl'
  if resumed then
    local k = self.global_step
    filter_lines(csv, function(l) return l == M.CSV_HEADER or (tonumber(l:match('^(%d+),')) or math.huge) <= k end)
    filter_lines(jsonl, function(l)
      local ok, v = pcall(json.decode, l)
      return ok and type(v) == 'table' and type(v.step) == 'number' and v.step <= k
    end)
  end
  local fresh = not (resumed and exists(csv))
  self.csv = assert(io.open(csv, fresh and 'w' or 'a'))
  if fresh then self.csv:write(M.CSV_HEADER, '\n') end
  self.jsonl = assert(io.open(jsonl, (resumed and exists(jsonl)) and 'a' or 'w'))
end

-- The next batch: data(step, micro, trainer) for a function; an iterator restarts at the epoch's end.
function Trainer:next_batch(s, micro)
  local d = self.data
  if type(d) == 'function' then return self:shard_batch(d(s, micro, self)) end
  local b = d:next()
  if b == nil then
    d:reset()
    self.data_pos.epoch, self.data_pos.batch = self.data_pos.epoch + 1, 0
    b = d:next()
    if b == nil then error('trainer: the data source gave no batch right after :reset()', 0) end
  end
  self.data_pos.batch = self.data_pos.batch + 1
  return self:shard_batch(b)
end

-- This rank's rows of a global batch: every tensor of >= 1 dim (the batch, or the fields of a batch table)
-- is cut along dim 1 into world equal parts. As is without dist or when the source shards itself.
function Trainer:shard_batch(b)
  if not self.shard or self.shard_data then return b end
  local r, w = self.shard.rank, self.shard.world
  local function cut(t, key)
    if not torch.is_tensor(t) or t:dim() == 0 then return t end
    local n = t:size(1)
    if n % w ~= 0 then
      error(('trainer: batch%s has %d rows, which do not split evenly over %d ranks'):format(
        key and ('.' .. tostring(key)) or '', n, w), 0)
    end
    local rows = math.floor(n / w)
    return t:narrow(1, r * rows + 1, rows)
  end
  if type(b) ~= 'table' or getmetatable(b) ~= nil then return cut(b) end
  local out = {}
  for k, v in pairs(b) do out[k] = cut(v, k) end
  return out
end

-- Sets the scheduled LR for step index s (0-based); returns the LR of group 1.
function Trainer:apply_schedule(s)
  if not self.schedule then return self.lr end
  local ctx = { elapsed = self:elapsed(), budget = self.time_budget }
  if self.absolute_lr then
    local lr = self.schedule:lr(s, ctx)
    self.optimizer:set_lr(lr)
    return lr
  end
  local m = self.schedule:at(s, ctx)
  for i, base in ipairs(self.base_lrs) do self.optimizer:set_lr(base * m, i) end
  return self.base_lrs[1] * m
end

-- fn(...) under the trainer's precision: bf16 autocast for 'bf16', as is for 'fp32'.
function Trainer:with_precision(fn, ...)
  if not self.autocast then return fn(...) end
  return torch.autocast(self.autocast, { dtype = 'bfloat16' }, fn, ...)
end

-- One optimizer step over grad_accum micro-batches; returns the mean loss (a number).
function Trainer:step()
  local s, accum = self.global_step, self.grad_accum
  local read = self:reads_at(s + 1)
  torch.manual_seed(self.seed + s)
  math.randomseed(self.seed + s)
  self.lr = self:apply_schedule(s)
  self.optimizer:zero_grad()
  local total, tokens, parts_sum = 0, 0, {}
  for micro = 1, accum do
    local batch = self:next_batch(s, micro)
    local sync = self.ddp ~= nil and micro == accum   -- earlier micro-batches only accumulate (no_sync)
    if sync then self.ddp:prepare_forward() end
    local loss, parts = self:with_precision(self.loss_fn, self.model, batch)
    if not torch.is_tensor(loss) then
      error(('trainer: at step %d the loss function returned %s (expected a scalar tensor)'):format(s + 1,
        loss == nil and 'nil' or type(loss)), 0)
    end
    local v = read and num(loss) or (torch.is_tensor(loss) and loss:detach():double() or loss)   -- sums as numbers do
    if read and (type(v) ~= 'number' or not finite(v)) then
      local detail = parts and (' (' .. progress.postfix(parts) .. ')') or ''
      error(('non-finite loss at step %d: %s%s'):format(s + 1, tostring(v), detail), 0)
    end
    if accum > 1 then loss = loss / accum end
    if sync then self.ddp:backward(loss) else loss:backward() end
    total = total + v
    for k, pv in pairs(parts or {}) do
      pv = (read or k == 'tokens') and num(pv) or (torch.is_tensor(pv) and pv:detach():double() or pv)
      if type(pv) == 'number' or torch.is_tensor(pv) then
        if k == 'tokens' then tokens = tokens + pv else parts_sum[k] = (parts_sum[k] or 0) + pv / accum end
      end
    end
  end
  if self.clip then self.grad_norm = optim.clip_grad_norm(self.params, self.clip) end
  self.optimizer:step()
  if self.ema then self.ema:update(self.params) end
  self.global_step = s + 1
  self.last_parts, self.last_tokens = parts_sum, tokens
  return total / accum
end

-- Whether step number n (1-based) reads its loss on the host: every sync_every steps, at log steps, the last.
function Trainer:reads_at(n)
  return self.sync_every <= 1 or n % self.sync_every == 0 or (self.log_every > 0 and n % self.log_every == 0)
    or (self.steps ~= nil and n >= self.steps)
end

-- Runs eval (no grad, eval mode); updates best (and best/); returns the metrics table.
function Trainer:evaluate()
  local m = self.model
  if m.eval then m:eval() end
  local ok, res = pcall(torch.no_grad, self.with_precision, self, self.eval_fn, m)
  if m.train then m:train() end
  if not ok then error(res, 0) end
  assert(type(res) == 'table', 'trainer: eval must return a table {eval_loss=, ...}')
  local metrics = {}
  for k, v in pairs(res) do metrics[k] = num(v) end
  local e = metrics.eval_loss
  self.last_eval = e
  if type(e) == 'number' and finite(e) and (self.best_eval == nil or e < self.best_eval) then
    local initial = self.best_eval == nil and self.global_step == 0
    self.best_eval, self.best_step = e, self.global_step
    if self.out and not initial then self:write_best() end
  end
  if self.hooks.on_eval then self.hooks.on_eval(self, metrics) end
  return metrics
end

function Trainer:state()
  return {
    step = self.global_step, elapsed = self:elapsed(), best_eval = self.best_eval, best_step = self.best_step,
    seed = self.seed, schedule_step = self.global_step, lr = self.lr, base_lrs = self.base_lrs,
    data = self.iter and self.data.state and not self.dist and { state = self.data:state() } or self.data_pos,
    ema_updates = self.ema and self.ema.num_updates or nil, time = os.date('!%Y-%m-%dT%H:%M:%SZ'),
  }
end

-- Writes model.safetensors (+ optim.safetensors, ema.safetensors unless light) and trainer.json in dir.
function Trainer:write_state(dir, light)
  torch.save(dir .. '/model.safetensors', self.model:state_dict())
  if not light then
    local sd = self.optimizer:state_dict()
    torch.save(dir .. '/optim.safetensors', sd.tensors, { metadata = { meta = json.encode(sd.meta) } })
    if self.ema then
      local t = {}
      for i, sh_t in ipairs(self.ema.shadow) do t['shadow.' .. i] = sh_t end
      torch.save(dir .. '/ema.safetensors', t, { metadata = { decay = tostring(self.ema.decay) } })
    end
  end
  write_atomic(dir .. '/trainer.json', json.encode(self:state()) .. '\n')
end

-- Writes dir/<name> as <name>.tmp first, then renames it into place.
function Trainer:write_dir(name, light)
  if not self.writes then return nil end
  local final = self.out .. '/' .. name
  local tmp = final .. '.tmp'
  rm_rf(tmp)
  mkdir(tmp)
  self:write_state(tmp, light)
  if exists(final) then rm_rf(final .. '.old'); assert(os.rename(final, final .. '.old')) end
  assert(os.rename(tmp, final))
  rm_rf(final .. '.old')
  return final
end

function Trainer:write_best() return self:write_dir('best', true) end

-- A checkpoint ckpt_<step>/ in out; keeps the newest keep_last (<= 0 keeps all). Returns its path.
function Trainer:save()
  assert(self.out, 'trainer: save needs out')
  if not self.writes then return nil end
  local dir = self:write_dir('ckpt_' .. self.global_step)
  self.saved_step = self.global_step
  if self.keep_last > 0 then   -- stale checkpoints of a later step (an older run) are left alone
    local older = {}
    for _, k in ipairs(list_ckpts(self.out)) do if k <= self.global_step then older[#older + 1] = k end end
    for i = 1, #older - self.keep_last do rm_rf(self.out .. '/ckpt_' .. older[i]) end
  end
  if self.hooks.on_save then self.hooks.on_save(self, dir) end
  return dir
end

-- Loads the newest checkpoint in out; false when there is none.
function Trainer:restore()
  if self.writes then os.execute('rm -rf ' .. q(self.out) .. '/ckpt_*.tmp ' .. q(self.out) .. '/best.tmp') end
  local steps = list_ckpts(self.out)
  local k = steps[#steps]
  if not k then return false end
  local dir = self.out .. '/ckpt_' .. k
  local text = read_file(dir .. '/trainer.json')
  local st = json.decode(text or error(('trainer: %s/trainer.json is missing'):format(dir), 0))
  self.model:load_state_dict(torch.load(dir .. '/model.safetensors'))
  local ot, meta = torch.load(dir .. '/optim.safetensors'), torch.load_metadata(dir .. '/optim.safetensors')
  self.optimizer:load_state_dict{ tensors = ot, meta = json.decode(meta.meta) }
  if self.ema then
    local et = torch.load(dir .. '/ema.safetensors')
    local shadow = {}
    for i = 1, #self.ema.shadow do shadow[i] = assert(et['shadow.' .. i], 'ema.safetensors: missing shadow.' .. i) end
    self.ema:load_state{ decay = self.ema.decay, num_updates = st.ema_updates or 0, shadow = shadow }
  end
  self.global_step, self.elapsed0, self.saved_step = st.step, st.elapsed or 0, st.step
  self.seed = st.seed or self.seed
  if type(st.best_eval) == 'number' then self.best_eval, self.best_step = st.best_eval, st.best_step end
  local d = st.data or {}
  if d.state ~= nil and self.iter and self.data.set_state then
    self.data:set_state(d.state)
  elseif self.iter and d.epoch then
    for _ = 1, d.epoch do self.data:reset() end
    for _ = 1, d.batch or 0 do self.data:next() end
    self.data_pos = { epoch = d.epoch, batch = d.batch or 0 }
  end
  self.lr, self.resumed_from = self.optimizer:param_groups()[1].lr, k
  log.info(('trainer: resumed from %s (step %d)'):format(dir, k))
  return true
end

local function fmt(v, f) return v == nil and '' or f:format(v) end

-- One CSV row and one metrics.jsonl record at the current step; resets the loss window.
function Trainer:log_row(ev)
  local w, now = self.window, self.clock()
  local rec = { step = self.global_step, lr = self.lr, elapsed_sec = self:elapsed() }
  if w.n > 0 then
    rec.train_loss = self:rank_mean(num(w.loss) / w.n)
    if not finite(rec.train_loss) then   -- a lazy (sync_every > 1) step went non-finite since the last row
      error(('non-finite loss between steps %d and %d: %s'):format(self.global_step - w.n + 1, self.global_step,
        tostring(rec.train_loss)), 0)
    end
    for k, v in pairs(w.parts) do rec[k] = num(v) / w.n end
    if w.tokens > 0 and now > w.t0 then
      rec.tokens_per_sec = w.tokens / (now - w.t0)
      self.tok_rate = rec.tokens_per_sec
    end
  end
  for k, v in pairs(ev or {}) do rec[k] = v end
  if self.csv then
    self.csv:write(('%d,%s,%s,%s,%.1f\n'):format(rec.step, fmt(rec.train_loss, '%.6f'),
      fmt(ev and ev.eval_loss, '%.6f'), fmt(rec.lr, '%.2e'), rec.elapsed_sec))
    self.csv:flush()
    local ok, line = pcall(json.encode, rec)
    self.jsonl:write(ok and line or json.encode{ step = rec.step, error = tostring(line) }, '\n')
    self.jsonl:flush()
  end
  self.last_train_loss = rec.train_loss or self.last_train_loss
  self:reset_window()
  return rec
end

-- The mean of x over the ranks (one all-reduce, at log steps only); x itself without dist.
function Trainer:rank_mean(x)
  if not self.dist then return x end
  return self.dist.all_reduce(torch.tensor({ x }, { dtype = 'float64' }), 'mean'):item()
end

-- Rank 0's elapsed time for every rank this step: the budget stop and time-based schedules must agree.
function Trainer:sync_elapsed()
  self.elapsed_sync = nil
  local t = torch.tensor({ self:elapsed() }, { dtype = 'float64' })
  self.elapsed_sync = self.dist.broadcast(t, 0):item()
end

-- Logging, eval, hooks and saving after step `global_step`.
function Trainer:after_step(loss)
  local s, w = self.global_step, self.window
  w.loss, w.n, w.tokens = w.loss + loss, w.n + 1, w.tokens + (self.last_tokens or 0)
  for k, v in pairs(self.last_parts or {}) do w.parts[k] = (w.parts[k] or 0) + v end
  local last = self.steps ~= nil and s >= self.steps
  local ev
  if self.eval_fn and (last or (self.eval_every and self.eval_every > 0 and s % self.eval_every == 0)) then
    ev = self:evaluate()
  end
  if ev or last or (self.log_every > 0 and s % self.log_every == 0) then self:log_row(ev) end
  if self.hooks.on_step then
    self.hooks.on_step(self, { step = s, loss = loss, lr = self.lr, parts = self.last_parts, elapsed = self:elapsed() })
  end
  if self.out and self.save_every and self.save_every > 0 and s % self.save_every == 0 then self:save() end
  return ev
end

-- Trains until `steps` or `time_budget`; returns a summary table.
function Trainer:run()
  local start = self.global_step
  if self.eval_fn and self.eval_at_start and start == 0 then
    self.lr = self:apply_schedule(0)
    local ev = self:evaluate()
    self.initial_eval = ev.eval_loss
    self:log_row(ev)
  end
  local bar
  if self.progress_opts ~= false and self.writes then
    local po = { desc = 'train', total = self.steps and math.max(self.steps - start, 0) }
    for k, v in pairs(type(self.progress_opts) == 'table' and self.progress_opts or {}) do po[k] = v end
    bar = progress.new(po)
  end
  local stopped, ev = 'steps', nil
  self:reset_window()
  while true do
    if self.steps and self.global_step >= self.steps then break end
    if self.dist and self.time_budget then self:sync_elapsed() end
    if self.time_budget and self:elapsed() >= self.time_budget then stopped = 'time_budget'; break end
    local loss = self:step()
    if type(loss) == 'number' then self.last_read = loss end   -- a lazy step's tensor is not read for the bar
    ev = self:after_step(loss)
    if bar then
      bar:set(self.global_step - start, { step = self.global_step, loss = self.last_read, lr = self.lr,
                                          ['tok/s'] = self.tok_rate })
    end
  end
  local final, final_ev = self.global_step, nil
  if self.eval_fn and final > start and not ev then final_ev = self:evaluate() end
  if final_ev or self.window.n > 0 then self:log_row(final_ev) end
  if self.out and self.save_final and self.saved_step ~= final and final > 0 then self:save() end
  if bar then bar:close() end
  return {
    steps = final, start_step = start, elapsed = self:elapsed(), stopped = stopped, train_loss = self.last_train_loss,
    eval_loss = self.last_eval, initial_eval = self.initial_eval, best_eval = self.best_eval,
    best_step = self.best_step, out = self.out,
  }
end

-- Closes the log files (they are flushed after every row; the GC closes them too).
function Trainer:close()
  if self.csv then self.csv:close(); self.csv = nil end
  if self.jsonl then self.jsonl:close(); self.jsonl = nil end
end

return M
