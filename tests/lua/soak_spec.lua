-- soak_spec: experiments/bench_soak.lua at smoke size: KD training from a cache reader with evaluation and
-- checkpoints in a child process, a second run SIGKILLed mid-way and resumed; the resumed run must end with
-- the uninterrupted run's losses and weights, bit for bit (the full soak is 10,000 steps: see the README).
local json = require 'json'
local h = require 'helper'

describe('bench_soak (smoke size)', function()
  it('a run killed at step 37 and resumed from ckpt_20 ends exactly as the uninterrupted run', function()
    local out = h.tmpdir()
    local rc, stdout, err = h.host('run --device cpu --threads 1 ' .. h.q(h.source_dir .. '/experiments/bench_soak.lua') ..
      ' --out ' .. h.q(out) .. ' --set steps=60 --set eval_every=20 --set save_every=20 --set kill_at=37' ..
      ' --set cache_rows=64 --set L=16 --set eval_rows=16 --set log_every=10')
    assert.equal(0, rc, err)
    assert.is_truthy(stdout:find('SIGKILL at step 37, resumed from ckpt_20', 1, true), stdout)
    local res = json.decode(assert(require('files').read(out .. '/soak.json')))
    assert.equal(60, res.steps)
    assert.equal(37, res.kill_at)
    assert.equal(20, res.resumed_from)
    assert.is_true(res.same_weights)
    assert.equal(res.train_loss, res.resumed_train_loss)
    assert.equal(res.eval_loss, res.resumed_eval_loss)
    -- The killed run's log rows after its checkpoint were dropped on resume: both logs hold the same rows.
    local files = require 'files'
    local a = files.read(out .. '/a/training_log.csv'):gsub(',[%d.]+\n', '\n')
    local b = files.read(out .. '/b/training_log.csv'):gsub(',[%d.]+\n', '\n')
    assert.equal(a, b)
    assert.is_truthy(a:find('\n60,', 1, true), a)
    assert.is_true(res.rss_end_mb > 0 and res.rss_first_mb > 0)
  end)
end)
