-- schedule: composable LR / momentum schedules; s:at(step, ctx) is a multiplier, s:lr(step, ctx) the LR.
-- Steps count optimizer steps from 0 (the seed's LambdaLR); ctx = {elapsed=, budget=} in seconds drives
-- the time-based warm-down. No optimizer coupling: the caller sets the LR it gets.
local opts = require 'opts'

local M = {}

local Schedule = {}
Schedule.__index = Schedule

local function new(at, base_lr)
  return setmetatable({ at_fn = at, base_lr = base_lr or 1 }, Schedule)
end

-- The multiplier (or momentum value) at `step`; ctx is only read by time-based schedules.
function Schedule:at(step, ctx) return self.at_fn(step, ctx) end

-- base_lr * multiplier.
function Schedule:lr(step, ctx) return self.base_lr * self.at_fn(step, ctx) end

-- A copy of this schedule with another base LR.
function Schedule:scale(base_lr) return new(self.at_fn, base_lr) end

Schedule.__call = function(self, step, ctx) return self:lr(step, ctx) end

local function as_schedule(s)
  if type(s) == 'number' then return M.constant{ value = s } end
  assert(getmetatable(s) == Schedule, 'schedule: expected a schedule or a number')
  return s
end

-- The options of each constructor ('!' = required); opts.check names the closest key on a typo.
local function check(o, known, who) return opts.check(o, known, who, 4) end

-- constant{value=1}
function M.constant(o)
  o = check(o, {value = 'number', lr = 'number'}, 'schedule.constant')
  local v = o.value or 1
  return new(function() return v end, o.lr)
end

-- Any function(step, ctx) -> number as a schedule.
function M.fn(f, o)
  opts.check_value(f, 'callable', 'schedule.fn', 'argument #1', 3)
  o = check(o, {lr = 'number'}, 'schedule.fn')
  return new(f, o.lr)
end

-- warmup{steps=N}: step/N below N, then 1, so step 0 runs at 0 (the seed's convention).
function M.warmup(o)
  o = check(o, {steps = 'number!', lr = 'number'}, 'schedule.warmup')
  local n = o.steps
  return new(function(step) return (n > 0 and step < n) and step / n or 1 end, o.lr)
end

-- cosine{total=, warmup=0, min_ratio=0}: the seed's formula, linear warm-up then
-- m + (1-m)*0.5*(1+cos(pi*(s-w)/(total-w))); held at m past `total`.
function M.cosine(o)
  o = check(o, {total = 'number!', warmup = 'number', min_ratio = 'number', lr = 'number'}, 'schedule.cosine')
  local total, w, m = o.total, o.warmup or 0, o.min_ratio or 0
  assert(total > w, 'schedule.cosine: total must exceed warmup')
  return new(function(step)
    if step < w then return step / w end
    local p = math.min((step - w) / (total - w), 1)
    return m + (1 - m) * 0.5 * (1 + math.cos(math.pi * p))
  end, o.lr)
end

-- linear{steps=N, from=1, to=0, start=0}: from -> to over steps [start, start+N], clamped outside.
function M.linear(o)
  o = check(o, {steps = 'number!', from = 'number', to = 'number', start = 'number', lr = 'number'}, 'schedule.linear')
  local n, a, b, s0 = o.steps, o.from or 1, o.to or 0, o.start or 0
  return new(function(step)
    local p = n > 0 and math.min(math.max((step - s0) / n, 0), 1) or (step >= s0 and 1 or 0)
    return a + (b - a) * p
  end, o.lr)
end

-- warmdown{frac=0.15, min=0, budget=}: 1 until the elapsed fraction of the time budget reaches
-- 1-frac, then max((1-f)/frac, min) (parameter-golf's wallclock-fraction form, keyed to time not
-- to steps). ctx.elapsed is required; ctx.budget overrides o.budget.
function M.warmdown(o)
  o = check(o, {frac = 'number', min = 'number', budget = 'number', lr = 'number'}, 'schedule.warmdown')
  local frac, floor = o.frac or 0.15, o.min or 0
  assert(frac > 0 and frac <= 1, 'schedule.warmdown: frac must be in (0, 1]')
  return new(function(_, ctx)
    local budget = ctx and ctx.budget or o.budget
    if not (ctx and ctx.elapsed and budget) then
      error('schedule.warmdown: needs ctx = {elapsed=, budget=} (seconds)', 3)
    end
    local f = ctx.elapsed / budget
    if f < 1 - frac then return 1 end
    return math.max((1 - f) / frac, floor)
  end, o.lr)
end

-- momentum{from=0.85, to=0.95, steps=500}: linear from -> to over N steps, then `to`.
function M.momentum(o)
  o = check(o, {steps = 'number!', from = 'number!', to = 'number!'}, 'schedule.momentum')
  return M.linear{ steps = o.steps, from = o.from, to = o.to }
end

-- chain{a, b, c, at={m1, m2}}: a before step m1, b from m1 (seeing step - m1), c from m2 (step - m2),
-- like PyTorch's SequentialLR milestones. ctx passes through unchanged.
function M.chain(o)
  opts.check_value(o, 'table', 'schedule.chain', 'argument #1', 3)
  local named = {}
  for k, v in pairs(o) do if type(k) ~= 'number' then named[k] = v end end
  check(named, {at = 'table', lr = 'number'}, 'schedule.chain')
  local parts, at = {}, o.at or {}
  for i, s in ipairs(o) do parts[i] = as_schedule(s) end
  assert(#at == #parts - 1, 'schedule.chain: needs one milestone in `at` between each pair of schedules')
  for i = 2, #at do assert(at[i] > at[i - 1], 'schedule.chain: milestones must increase') end
  return new(function(step, ctx)
    local i, offset = 1, 0
    while i <= #at and step >= at[i] do offset = at[i]; i = i + 1 end
    return parts[i]:at(step - offset, ctx)
  end, o.lr)
end

-- product(a, b, ...): the pointwise product, e.g. warmup (steps) times warmdown (time).
function M.product(...)
  local parts = {}
  for i, s in ipairs({ ... }) do parts[i] = as_schedule(s) end
  return new(function(step, ctx)
    local v = 1
    for _, s in ipairs(parts) do v = v * s:at(step, ctx) end
    return v
  end)
end

-- True if x is a schedule object.
function M.is_schedule(x) return getmetatable(x) == Schedule end

return M
