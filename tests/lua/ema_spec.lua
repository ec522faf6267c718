-- ema_spec: EMA and SWA of parameter tensors against hand-computed values; shadows are
-- independent of the params, copy_to writes them back, state/load_state round-trip.
local torch = require 'torch'
local h = require 'helper'
local ema = require 'ema'

local function params(a, b)
  return { torch.tensor(a, { dtype = 'float64' }), torch.tensor(b, { dtype = 'float64' }) }
end

local function set(ps, a, b)
  torch.no_grad(function()
    ps[1]:copy_(torch.tensor(a, { dtype = 'float64' }))
    ps[2]:copy_(torch.tensor(b, { dtype = 'float64' }))
  end)
end

describe('ema', function()
  it('updates shadow <- d shadow + (1-d) param', function()
    local ps = params({ 1, 2 }, { { 0 } })
    local e = ema.new(ps, { decay = 0.9 })
    set(ps, { 11, 12 }, { { 10 } })
    e:update(ps)                               -- 0.9*1 + 0.1*11 = 2; 0.9*2 + 0.1*12 = 3; 1
    h.close(e.shadow[1], { 2, 3 }, 1e-12)
    h.close(e.shadow[2], { { 1 } }, 1e-12)
    set(ps, { 2, 3 }, { { 1 } })
    e:update(ps)                               -- 0.9*2 + 0.1*2 = 2; 3; 0.9 + 0.1 = 1
    h.close(e.shadow[1], { 2, 3 }, 1e-12)
    set(ps, { 12, -7 }, { { 11 } })
    e:update(ps)                               -- 1.8 + 1.2 = 3; 2.7 - 0.7 = 2; 0.9 + 1.1 = 2
    h.close(e.shadow[1], { 3, 2 }, 1e-12)
    h.close(e.shadow[2], { { 2 } }, 1e-12)
    h.close(ps[1], { 12, -7 }, 0)              -- params untouched
    assert.equal(3, e:state().num_updates)
  end)

  it('copies the averages into params that require grad', function()
    local ps = params({ 4, 4 }, { { 4 } })
    local e = ema.new(ps, { decay = 0.5 })
    for _, p in ipairs(ps) do p:requires_grad_(true) end
    set(ps, { 0, 8 }, { { 2 } })
    e:update(ps)
    e:copy_to(ps)
    h.close(ps[1], { 2, 6 }, 1e-12)
    h.close(ps[2], { { 3 } }, 1e-12)
    assert.is_true(ps[1].requires_grad)
    assert.has_error(function() e:update({ ps[1] }) end)
  end)

  it('warms the decay up as min(d, (1+n)/(10+n))', function()
    local ps = params({ 0 }, { 0 })
    local e = ema.new(ps, { decay = 0.999, warmup = true })
    assert.equal(0.1, e:current_decay())
    set(ps, { 10 }, { 0 })
    e:update(ps)                               -- 0.1*0 + 0.9*10 = 9
    h.close(e.shadow[1], { 9 }, 1e-12)
    assert.near(2 / 11, e:current_decay(), 1e-15)
  end)

  it('keeps fp32 shadows for bf16 params and round-trips its state', function()
    local p = { torch.tensor({ 1, 2 }, { dtype = 'bfloat16' }) }
    local e = ema.new(p, { decay = 0.5 })
    assert.equal('float32', e.shadow[1].dtype)
    e:update({ torch.tensor({ 3, 4 }, { dtype = 'bfloat16' }) })
    h.close(e.shadow[1], { 2, 3 })
    local e2 = ema.new(p, { decay = 0.1 })
    e2:load_state(e:state())
    h.close(e2.shadow[1], { 2, 3 })
    assert.equal(0.5, e2.decay)
    assert.equal(1, e2.num_updates)
  end)
end)

describe('swa', function()
  it('averages the params of qualifying steps from start, every k steps', function()
    local ps = params({ 0, 0 }, { 0 })
    local s = ema.swa(ps, { start = 2, every = 2 })
    assert.has_error(function() s:copy_to(ps) end)
    local seen = {}
    for step = 0, 6 do
      set(ps, { step, 10 * step }, { step * step })
      seen[#seen + 1] = s:update(ps, step) and step or nil
    end
    assert.same({ 2, 4, 6 }, seen)             -- mean of steps 2, 4, 6
    h.close(s.shadow[1], { 4, 40 }, 1e-12)
    h.close(s.shadow[2], { (4 + 16 + 36) / 3 }, 1e-12)
    assert.equal(3, s:state().count)
    s:copy_to(ps)
    h.close(ps[1], { 4, 40 }, 1e-12)
  end)

  it('starts at a fraction of the time budget', function()
    local ps = params({ 0 }, { 0 })
    local s = ema.swa(ps, { start_frac = 0.5, every = 2 })
    local vals = { [0] = 100, 100, 1, 3, 5, 7 }
    for step = 0, 5 do
      set(ps, { vals[step] }, { 0 })
      s:update(ps, step, { elapsed = step * 25, budget = 100 })  -- f >= 0.5 from step 2
    end
    h.close(s.shadow[1], { (1 + 5) / 2 }, 1e-12)  -- steps 2 and 4
  end)
end)
