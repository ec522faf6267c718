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

local function read(path)
  local f = assert(io.open(path))
  local s = f:read('*a')
  f:close()
  return s
end

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
    assert.equal(24, #ledger)                  -- running + completed per trial
    assert.equal('running', ledger[1].status)
    assert.equal('completed', ledger[2].status)
    assert.same({ x = 1, y = 0 }, ledger[2].config)
    assert.equal(1.1, ledger[2].summary.loss)
    assert.equal('001_x=1,y=0,seed=1', ledger[2].dir:match('[^/]+$'))
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
    assert.equal(24, #lines(root .. '/runs.jsonl'))
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
                         fn = function(_, cfg) return { metric = cfg.a } end }
    assert.equal('index,run_id,name,seed,status,duration_s,a,b,metric', r.csv:match('^[^\n]+'))
    assert.matches('\n1,%x+,a=1,1,completed,[%d.]+,1,,1\n2,%x+,"b=x,y",1,completed,[%d.]+,,"x,y",\n$', r.csv)
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
