-- schedule_spec: each schedule at chosen steps against hand-computed values (the seed's warm-up
-- and cosine, linear, wall-clock warm-down, momentum warm-up) and their composition.
local schedule = require 'schedule'

local function near(want, got, tol)
  assert(math.abs(want - got) <= (tol or 1e-12), ('want %.17g, got %.17g'):format(want, got))
end

describe('schedule', function()
  it('warms up linearly with the first step at LR 0 (the seed convention)', function()
    local s = schedule.warmup{ steps = 4 }
    near(0, s:at(0)); near(0.25, s:at(1)); near(0.75, s:at(3)); near(1, s:at(4)); near(1, s:at(100))
    near(1, schedule.warmup{ steps = 0 }:at(0))
  end)

  it('matches the seed cosine: warm-up then m + (1-m)/2 (1 + cos(pi p))', function()
    local s = schedule.cosine{ warmup = 10, total = 110, min_ratio = 0.1, lr = 2e-4 }
    near(0, s:at(0)); near(0.5, s:at(5))
    near(1, s:at(10))                         -- p = 0
    near(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)), s:at(35))  -- 0.86819805153394...
    near(0.8681980515339464, s:at(35))
    near(0.55, s:at(60))                      -- p = 1/2: m + (1-m)/2
    near(0.1, s:at(110)); near(0.1, s:at(500))  -- held at the floor after total
    near(1.1e-4, s:lr(60), 1e-18)
    near(1.1e-4, s(60), 1e-18)                -- calling the schedule gives the LR
    near(0.5, schedule.cosine{ total = 4 }:at(2))
  end)

  it('constant, linear decay and scaling the base LR', function()
    near(1, schedule.constant():at(7))
    near(0.3, schedule.constant{ value = 0.3 }:at(0))
    local s = schedule.linear{ steps = 100, from = 1, to = 0.2, start = 50 }
    near(1, s:at(0)); near(1, s:at(50)); near(0.6, s:at(100)); near(0.2, s:at(150)); near(0.2, s:at(1e6))
    near(6e-3, s:scale(0.01):lr(100))
    near(1, s:lr(0))
  end)

  it('warms down over the last fraction of the time budget, not of the steps', function()
    local s = schedule.warmdown{ frac = 0.25, min = 0.1, budget = 600 }
    near(1, s:at(0, { elapsed = 0 }))
    near(1, s:at(10, { elapsed = 449 }))
    near(1, s:at(1e9, { elapsed = 450 }))        -- f = 0.75: (1 - 0.75) / 0.25
    near(0.5, s:at(3, { elapsed = 525 }))        -- the step number plays no part
    near(0.2, s:at(3, { elapsed = 570 }))
    near(0.1, s:at(3, { elapsed = 590 }))        -- floor
    near(0.1, s:at(3, { elapsed = 700 }))
    near(0.5, s:at(3, { elapsed = 87.5, budget = 100 }))  -- ctx.budget wins
    assert.has_error(function() s:at(3) end)
  end)

  it('warms momentum up linearly from m0 to m1', function()
    local m = schedule.momentum{ from = 0.85, to = 0.95, steps = 500 }
    near(0.85, m:at(0)); near(0.9, m:at(250)); near(0.95, m:at(500)); near(0.95, m:at(9000))
  end)

  it('chains schedules at milestones, each seeing steps from its own start', function()
    local s = schedule.chain{ schedule.warmup{ steps = 10 }, 1, schedule.linear{ steps = 10, to = 0 },
                              at = { 10, 20 }, lr = 0.1 }
    near(0.5, s:at(5)); near(1, s:at(10)); near(1, s:at(19)); near(1, s:at(20))
    near(0.5, s:at(25)); near(0, s:at(30))
    near(0.05, s:lr(25))
    assert.has_error(function() schedule.chain{ 1, 2, at = {} } end)
  end)

  it('multiplies step- and time-based schedules', function()
    local s = schedule.product(schedule.warmup{ steps = 4 }, schedule.warmdown{ frac = 0.5 }):scale(0.02)
    local ctx = { elapsed = 75, budget = 100 }
    near(0.5 * 0.5, s:at(2, ctx))
    near(0.02 * 0.5, s:lr(10, ctx))
    near(0.25, schedule.product(0.5, 0.5):at(0))
    assert.is_true(schedule.is_schedule(s))
    assert.has_error(function() schedule.product('x') end)
  end)
end)

describe('schedule options', function()
  it('names the closest known option on a typo, and the expected and found type', function()
    local ok, err = pcall(schedule.cosine, { totl = 10 })
    assert.is_false(ok)
    assert.truthy(tostring(err):find('schedule.cosine: unknown option "totl" (did you mean "total"?)', 1, true), err)
    err = select(2, pcall(schedule.cosine, { total = '10' }))
    assert.truthy(tostring(err):find('schedule.cosine: option "total" must be a number, got string', 1, true), err)
    err = select(2, pcall(schedule.warmup, {}))
    assert.truthy(tostring(err):find('schedule.warmup: option "steps" is required (a number)', 1, true), err)
    err = select(2, pcall(schedule.chain, { 1, 2, at = { 5 }, milestones = { 5 } }))
    assert.truthy(tostring(err):find('unknown option "milestones"', 1, true), err)
  end)
end)
