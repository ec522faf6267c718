-- progress_spec: line mode (timestamped complete lines: first, every interval or 10%, last; no \r)
-- and bar mode (\r redraws at most 10 Hz) with an injected clock, writer and environment.
local progress = require 'progress'

local function fake(env)
  local t = { now = 0, out = {} }
  t.opts = function(o)
    o.clock = function() return t.now end
    o.writer = function(s) t.out[#t.out + 1] = s end
    o.stamp = function() return ('T%03d'):format(math.floor(t.now)) end
    o.getenv = function(k) return (env or {})[k] end
    return o
  end
  return t
end

describe('progress, line mode', function()
  it('writes the first line, every 10%, every interval, and the last', function()
    local f = fake()
    local p = progress.new(f.opts{ total = 100, desc = 'train', is_tty = false, interval = 30 })
    assert.equal('lines', p.mode)
    for i = 1, 100 do
      f.now = i * 0.5                          -- 2 it/s
      p:update(1, { loss = 2.5 / i, lr = 3e-4 })
    end
    -- first (1), then 10%, 20%, ... 90% and the last line; the 30 s interval never fires first.
    assert.equal(11, #f.out)
    assert.equal('T000 train 1/100 1% 2.0 it/s elapsed 0.5s eta 50s loss=2.5 lr=0.0003\n', f.out[1])
    assert.equal('T005 train 10/100 10% 2.0 it/s elapsed 5.0s eta 45s loss=0.25 lr=0.0003\n', f.out[2])
    assert.equal('T050 train 100/100 100% 2.0 it/s elapsed 50s eta 0.0s loss=0.025 lr=0.0003\n', f.out[11])
    for _, line in ipairs(f.out) do
      assert.is_nil(line:find('\r', 1, true))
      assert.is_nil(line:find('\27', 1, true))
    end
    p:close()
    assert.equal(11, #f.out)                   -- closing twice writes nothing more
  end)

  it('fires on the time interval between the 10% marks, with a prefix', function()
    local f = fake({ QATLAB_PROGRESS_INTERVAL = '10' })
    local p = progress.new(f.opts{ total = 1000, desc = 'eval', prefix = '[run 2/4 lr=0.001]', is_tty = false })
    assert.equal(10, p.interval)
    for i = 1, 50 do f.now = i; p:update() end  -- 1 it/s: lines at 1, 11, 21, 31, 41
    assert.equal(5, #f.out)
    assert.equal('T011 [run 2/4 lr=0.001] eval 11/1000 1% 1.0 it/s elapsed 11s eta 16m29s\n', f.out[2])
    f.now = 100
    p:set(100)                                 -- 10% beats the interval
    assert.equal(6, #f.out)
    p:close({ acc = 0.5 })
    assert.equal('T100 [run 2/4 lr=0.001] eval 100/1000 10% 1.0 it/s elapsed 1m40s eta 15m00s acc=0.5\n', f.out[7])
  end)

  it('counts without a total and formats slow rates', function()
    local f = fake()
    local p = progress.new(f.opts{ is_tty = false })
    f.now = 4
    p:update()
    p:close()
    assert.same({ 'T004 1 4.00 s/it elapsed 4.0s\n' }, f.out)  -- close repeats no unchanged line
    f.now = 5
    p = progress.new(f.opts{ is_tty = false })
    p:close()
    assert.equal('T005 0 ? it/s elapsed 0.0s\n', f.out[2])
  end)

  it('picks the mode from QATLAB_PROGRESS and TERM', function()
    local function mode(env, o)
      o = o or {}
      if o.isatty == nil then o.isatty = function() return true end end  -- stderr as a terminal
      return progress.new(fake(env).opts(o)).mode
    end
    assert.equal('lines', mode({}))
    assert.equal('lines', mode({ TERM = 'dumb' }))
    assert.equal('bar', mode({ TERM = 'xterm-256color' }))
    assert.equal('lines', mode({ TERM = 'xterm', QATLAB_PROGRESS = 'lines' }))
    assert.equal('bar', mode({ QATLAB_PROGRESS = 'bar' }, { is_tty = false }))
    assert.equal('lines', mode({ TERM = 'xterm' }, { is_tty = false }))
    assert.equal('off', mode({ QATLAB_PROGRESS = 'off' }))
    assert.equal('lines', mode({ TERM = 'xterm' }, { isatty = function() return false end }))  -- redirected
    assert.has_error(function() mode({ QATLAB_PROGRESS = 'fancy' }) end)
    local f = fake({ QATLAB_PROGRESS = 'off' })
    local p = progress.new(f.opts{ total = 3 })
    p:update(); p:update(); p:update()
    assert.same({}, f.out)
  end)

  it('formats durations', function()
    assert.equal('0.4s', progress.duration(0.4))
    assert.equal('59s', progress.duration(59.4))
    assert.equal('1m00s', progress.duration(59.6))
    assert.equal('1h02m03s', progress.duration(3723))
    assert.equal('?', progress.duration(nil))
  end)
end)

describe('progress, bar mode', function()
  it('redraws one line with \\r at most every 0.1 s and ends it with a newline', function()
    local f = fake({ NO_COLOR = '' })
    local p = progress.new(f.opts{ total = 10, desc = 'kd', is_tty = true, width = 80 })
    for i = 1, 10 do
      f.now = i * 0.04
      p:update(1, { loss = 1 })
    end
    -- draws at t = 0.04 (first), 0.16, 0.28 (>= 0.1 s apart) and the final one at 0.40
    assert.equal(4, #f.out)
    for i, s in ipairs(f.out) do
      assert.equal('\r', s:sub(1, 1))
      assert.is_nil(s:find('\27', 1, true))   -- NO_COLOR
      assert.equal(i == 4, s:sub(-1) == '\n')
    end
    assert.matches('^\rkd |#+%.+| 1/10 10%% 25%.0 it/s elapsed 0%.0s eta 0%.4s loss=1$', f.out[1])
    assert.matches('^\rkd |#+| 10/10 100%% 25%.0 it/s elapsed 0%.4s eta 0%.0s loss=1\n$', f.out[4])
    assert.equal(#f.out[1] + 1, #f.out[4])    -- the same width on screen
  end)

  it('colours the bar unless NO_COLOR is set', function()
    local f = fake()
    local p = progress.new(f.opts{ total = 2, is_tty = true })
    p:update()
    assert.truthy(f.out[1]:find('\27[32m', 1, true))
  end)
end)

describe('progress, counts and options', function()
  it('holds a count past the total at 100% (never 125% or a negative eta) and rejects bad steps', function()
    local f = fake()
    local p = progress.new(f.opts{ total = 4, desc = 'x', is_tty = false })
    f.now = 1
    p:update(5)
    assert.equal('T001 x 4/4 100% 4.0 it/s elapsed 1.0s eta 0.0s\n', f.out[#f.out])
    assert.equal(4, p.n)
    local q = progress.new(f.opts{ total = 4, is_tty = false })
    local ok, err = pcall(q.update, q, -1)
    assert.is_false(ok)
    assert.truthy(tostring(err):find('must be a number >= 0, got -1', 1, true), err)
    err = select(2, pcall(progress.new, { totl = 3 }))
    assert.truthy(tostring(err):find('progress.new: unknown option "totl" (did you mean "total"?)', 1, true), err)
  end)
end)

