-- trainer_spec: the training loop on a tiny regression and a tiny LM: loss decreases, the seed's CSV and
-- metrics.jsonl, accumulation == one big batch, schedules in the CSV, checkpoints, resume (also after SIGKILL).
local torch = require 'torch'
local nn = require 'nn'
local optim = require 'optim'
local json = require 'json'
local schedule = require 'schedule'
local trainer = require 'trainer'
local h = require 'helper'

local quiet = { mode = 'off' }

local function read(path) return assert(require('files').read(path), 'cannot read ' .. path) end

local function csv_rows(path)
  local rows, header = {}, nil
  for line in io.lines(path) do
    if not header then
      header = line
    else
      local f = {}
      for field in (line .. ','):gmatch('([^,]*),') do f[#f + 1] = field end
      rows[#rows + 1] = { step = tonumber(f[1]), train_loss = tonumber(f[2]), eval_loss = f[3], lr = f[4],
                          elapsed = tonumber(f[5]) }
    end
  end
  return header, rows
end

local function ls(dir)
  local names, p = {}, io.popen('ls -1 ' .. h.q(dir))
  for n in p:lines() do names[#names + 1] = n end
  p:close()
  table.sort(names)
  return names
end

-- y = X W* + 0.5 + noise: a Lua-table model with the methods the trainer uses.
torch.manual_seed(11)
local X = torch.randn(64, 4)
local Y = X:matmul(torch.randn(4, 2)) + 0.5

local function linreg()
  local m = { W = torch.zeros(4, 2):requires_grad_(), b = torch.zeros(2):requires_grad_() }
  function m.params() return { m.W, m.b } end
  function m.state_dict() return { W = m.W:detach(), b = m.b:detach() } end
  function m.load_state_dict(_, sd)
    torch.no_grad(function() m.W:copy_(sd.W); m.b:copy_(sd.b) end)
  end
  return m
end

local function mse(m, batch) return ((batch.x:matmul(m.W) + m.b - batch.y) ^ 2):mean(), { n = batch.x:size(1) } end

-- Rows of step s (0-based), split into micro-batches of `per` rows.
local function rows_of(s, micro, per)
  local start = (s * 8 + (micro - 1) * per) % 64
  return { x = X:narrow(1, start + 1, per), y = Y:narrow(1, start + 1, per) }
end

local function reg_trainer(o)
  local m = linreg()
  local base = {
    model = m, optimizer = optim.SGD(m.params(), { lr = 0.05 }), loss = mse, steps = 20, progress = quiet,
    data = function(s, micro) return rows_of(s, micro, 8) end,
    eval = function(model) return { eval_loss = mse(model, { x = X, y = Y }):item() } end,
  }
  for k, v in pairs(o or {}) do base[k] = v end
  return trainer.new(base), m
end

-- A tiny qwen3 LM on a counting language, next-token CE with log_softmax/gather.
local cfg = { model_type = 'qwen3', vocab_size = 17, hidden_size = 16, intermediate_size = 24, num_hidden_layers = 1,
              num_attention_heads = 2, num_key_value_heads = 1, max_position_embeddings = 16 }

local function tiny_lm()
  torch.manual_seed(5)
  local m = nn.from_config(cfg)
  m:requires_grad_(true)
  return m
end

local function lm_loss(model, ids)
  local B, S = ids:size(1), ids:size(2)
  local lp = model:forward(ids:narrow(2, 1, S - 1)):log_softmax(3)
  local nll = -lp:gather(3, ids:narrow(2, 2, S - 1):unsqueeze(3)):mean()
  return nll, { tokens = B * (S - 1) }
end

-- Random starts drawn from torch's RNG: the trainer's per-step seeding makes them reproducible.
local function lm_data() return (torch.randint(0, 17, { 4, 1 }) + torch.arange(8)) % 17 end

local function lm_trainer(out, o)
  local m = tiny_lm()
  local base = {
    model = m, optimizer = optim.AdamW(m, { lr = 3e-2, weight_decay = 0.01 }), loss = lm_loss, data = lm_data,
    steps = 12, grad_accum = 2, clip = 1.0, ema = 0.9, out = out, save_every = 4, log_every = 2, progress = quiet,
    schedule = schedule.cosine{ total = 12, warmup = 2, min_ratio = 0.1 }, seed = 3,
    -- an eval that draws random numbers must not disturb the training stream
    eval = function(model) torch.randn(3); return { eval_loss = lm_loss(model, lm_data()):item() } end,
    eval_every = 6,
  }
  for k, v in pairs(o or {}) do base[k] = v end
  return trainer.new(base), m
end

local function same_params(m1, m2)
  local a, b = m1:state_dict(), m2:state_dict()
  local n = 0
  for k, v in pairs(a) do
    assert(b[k], 'missing ' .. k)
    assert(v:equal(b[k]), 'parameter ' .. k .. ' differs')
    n = n + 1
  end
  return n
end

describe('trainer', function()
  it('trains a tiny regression: the loss decreases, CSV header and rows, metrics.jsonl, config.json', function()
    local out = h.tmpdir()
    local t = reg_trainer{ out = out, steps = 40, log_every = 5, eval_every = 20, config = { lr = 0.05, name = 'reg' } }
    local first = t:step()
    local sum = t:run()
    assert.equal(40, sum.steps)
    assert.equal('steps', sum.stopped)
    assert.is_true(sum.train_loss < 0.1 * first, ('%g -> %g'):format(first, sum.train_loss))
    assert.is_true(sum.best_eval <= sum.eval_loss)
    local header, rows = csv_rows(out .. '/training_log.csv')
    assert.equal('step,train_loss,eval_loss,lr,elapsed_sec', header)
    -- no initial eval (one step was taken by hand); rows at 5, 10, ..., 40; eval at 20 and 40
    assert.equal(8, #rows)
    for i, r in ipairs(rows) do
      assert.equal(5 * i, r.step)
      assert.equal('5.00e-02', r.lr)
      assert.is_true(r.train_loss ~= nil and r.elapsed >= 0)
      assert.equal(r.step % 20 == 0, r.eval_loss ~= '')
    end
    assert.is_true(tonumber(rows[8].eval_loss) < tonumber(rows[4].eval_loss))
    local recs = {}
    for line in io.lines(out .. '/metrics.jsonl') do recs[#recs + 1] = json.decode(line) end
    assert.equal(8, #recs)
    assert.equal(40, recs[8].step)
    assert.equal(8, recs[8].n)                               -- parts are averaged into the record
    assert.is_true(math.abs(recs[8].train_loss - rows[8].train_loss) < 1e-6)
    assert.same({ lr = 0.05, name = 'reg', precision = 'fp32' }, json.decode(read(out .. '/config.json')))
    assert.same({ 'best', 'ckpt_40', 'config.json', 'metrics.jsonl', 'training_log.csv' }, ls(out))
    assert.same({ 'model.safetensors', 'trainer.json' }, ls(out .. '/best'))
    assert.equal(40, json.decode(read(out .. '/best/trainer.json')).step)
  end)

  it('a tiny LM trains with AdamW, clipping, EMA and a token count; an initial eval row at step 0', function()
    local out = h.tmpdir()
    local t = lm_trainer(out, { steps = 30, save_every = 0, schedule = schedule.constant{ value = 1 } })
    local sum = t:run()
    assert.is_true(sum.train_loss < 0.6 * sum.initial_eval, ('%g -> %g'):format(sum.initial_eval, sum.train_loss))
    local _, rows = csv_rows(out .. '/training_log.csv')
    assert.equal(0, rows[1].step)
    assert.is_nil(rows[1].train_loss)
    assert.is_true(tonumber(rows[1].eval_loss) > 2)
    local last
    for line in io.lines(out .. '/metrics.jsonl') do last = json.decode(line) end
    assert.is_true(last.tokens_per_sec > 0)
    assert.is_nil(last.tokens)
    assert.equal(30, t.ema.num_updates)
    assert.is_true(t.grad_norm:item() > 0)   -- a 0-dim tensor: read only when wanted
  end)

  it('grad_accum = 4 with batch 2 equals one SGD step with batch 8', function()
    local t1, m1 = reg_trainer{ steps = 3, grad_accum = 4, data = function(s, micro) return rows_of(s, micro, 2) end }
    local t2, m2 = reg_trainer{ steps = 3 }
    for _ = 1, 3 do
      local l1, l2 = t1:step(), t2:step()
      assert.is_true(math.abs(l1 - l2) < 1e-6, ('%g vs %g'):format(l1, l2))
    end
    h.close(m1.W, m2.W, 1e-6, 1e-5)
    h.close(m1.b, m2.b, 1e-6, 1e-5)
    assert.is_false(m1.W:equal(torch.zeros(4, 2)))
  end)

  it("writes the schedule's LR in the CSV: a multiplier of the group LR, or an absolute LR", function()
    local out = h.tmpdir()
    local s = schedule.cosine{ total = 10, warmup = 3, min_ratio = 0.1 }
    reg_trainer{ out = out, steps = 10, log_every = 1, schedule = s, eval = false }:run()
    local _, rows = csv_rows(out .. '/training_log.csv')
    assert.equal(10, #rows)
    for _, step in ipairs({ 1, 2, 4, 7, 10 }) do   -- row `step` used schedule step `step - 1`
      assert.equal(('%.2e'):format(0.05 * s:at(step - 1)), rows[step].lr)
    end
    assert.equal('0.00e+00', rows[1].lr)
    local out2 = h.tmpdir()
    local abs = schedule.linear{ steps = 4, from = 1, to = 0.5, lr = 0.2 }
    local t = reg_trainer{ out = out2, steps = 6, log_every = 3, schedule = abs, eval = false }
    t:run()
    _, rows = csv_rows(out2 .. '/training_log.csv')
    assert.same({ '1.50e-01', '1.00e-01' }, { rows[1].lr, rows[2].lr })
    assert.equal(0.1, t.optimizer:param_groups()[1].lr)
  end)

  it('keeps the last N checkpoints, written whole, and best/ when eval improves', function()
    local out = h.tmpdir()
    local saved, evals, stepped = {}, {}, {}
    local t = reg_trainer{ out = out, steps = 10, save_every = 2, keep_last = 3, eval_every = 5,
                           hooks = { on_save = function(_, dir) saved[#saved + 1] = dir end,
                                     on_eval = function(tr, m) evals[#evals + 1] = { tr.global_step, m.eval_loss } end,
                                     on_step = function(_, info) stepped[#stepped + 1] = info.step end } }
    t:run()
    assert.same({ 0, 5, 10 }, { evals[1][1], evals[2][1], evals[3][1] })
    assert.is_true(evals[3][2] < evals[2][2] and evals[2][2] < evals[1][2])
    assert.same({ 1, 2, 3, 4, 5, 6, 7, 8, 9, 10 }, stepped)
    assert.equal(5, #saved)
    assert.equal(out .. '/ckpt_10', saved[5])
    assert.same({ 'best', 'ckpt_10', 'ckpt_6', 'ckpt_8', 'config.json', 'metrics.jsonl', 'training_log.csv' }, ls(out))
    assert.same({ 'model.safetensors', 'optim.safetensors', 'trainer.json' }, ls(out .. '/ckpt_8'))
    local st = json.decode(read(out .. '/ckpt_8/trainer.json'))
    assert.equal(8, st.step)
    assert.equal(8, st.schedule_step)
    assert.equal(t.seed, st.seed)
    assert.equal(5, st.best_step)
    local tensors = torch.load(out .. '/ckpt_8/model.safetensors')
    assert.same({ 2, 4 }, { tensors.b:size(1), tensors.W:size(1) })
    local meta = torch.load_metadata(out .. '/ckpt_8/optim.safetensors')
    assert.equal('SGD', json.decode(meta.meta).kind)
    assert.equal(10, json.decode(read(out .. '/best/trainer.json')).step)
  end)

  it('resume after k steps reaches the same parameters as an uninterrupted run (tiny LM, AdamW, EMA)', function()
    local full_out = h.tmpdir()
    local tf, mf = lm_trainer(full_out)
    local full = tf:run()
    -- interrupted: a first trainer stops at step 4 (its checkpoint), a new one resumes to 12
    local out = h.tmpdir()
    local t1 = lm_trainer(out, { steps = 4 })
    t1:run()
    local t2, m2 = lm_trainer(out, { resume = true })
    assert.equal(4, t2.global_step)
    assert.equal(4, t2.resumed_from)
    local sum = t2:run()
    assert.equal(12, sum.steps)
    assert.equal(4, sum.start_step)
    assert.is_true(same_params(mf, m2) > 3)
    assert.equal(full.train_loss, sum.train_loss)
    assert.equal(full.eval_loss, sum.eval_loss)
    for i, s in ipairs(tf.ema.shadow) do assert.is_true(s:equal(t2.ema.shadow[i])) end
    -- both logs hold the same steps, once each
    local _, a = csv_rows(full_out .. '/training_log.csv')
    local _, b = csv_rows(out .. '/training_log.csv')
    local sa, sb = {}, {}
    for i, r in ipairs(a) do sa[i] = r.step end
    for i, r in ipairs(b) do sb[i] = r.step end
    assert.same({ 0, 2, 4, 6, 8, 10, 12 }, sa)
    assert.same(sa, sb)
    assert.equal(a[7].train_loss, b[7].train_loss)
  end)

  it('resume restores an iterator mid-epoch by fast-forwarding it (SGD with momentum)', function()
    local function iter()
      local it = { i = 0 }
      function it.next() it.i = it.i + 1; if it.i <= 5 then return rows_of(it.i, 1, 8) end end
      function it.reset() it.i = 0 end
      return it
    end
    local function run(out, steps, resume)
      local m = linreg()
      local t = trainer.new{ model = m, optimizer = optim.SGD(m.params(), { lr = 0.05, momentum = 0.9 }), loss = mse,
                             data = iter(), steps = steps, out = out, resume = resume, progress = quiet }
      return t, t:run(), m
    end
    local _, _, mf = run(h.tmpdir(), 13)
    local out = h.tmpdir()
    run(out, 7)
    local t2, _, m2 = run(out, 13, true)
    assert.same({ epoch = 2, batch = 3 }, t2.data_pos)   -- 13 batches of 5 per epoch
    h.close(m2.W, mf.W, 0, 0)
    h.close(m2.b, mf.b, 0, 0)
    -- data:state()/set_state() are used when offered
    local it = iter()
    function it.state() return { i = it.i } end
    function it.set_state(_, st) it.i = st.i end
    local m = linreg()
    trainer.new{ model = m, optimizer = optim.SGD(m.params(), { lr = 0.05 }), loss = mse, data = it, steps = 3,
                 out = out .. '/s', progress = quiet }:run()
    assert.same({ state = { i = 3 } }, json.decode(read(out .. '/s/ckpt_3/trainer.json')).data)
    local it2 = iter()
    function it2.state() return { i = it2.i } end
    function it2.set_state(_, st) it2.i = st.i end
    trainer.new{ model = m, optimizer = optim.SGD(m.params(), { lr = 0.05 }), loss = mse, data = it2, steps = 3,
                 out = out .. '/s', progress = quiet, resume = true }
    assert.equal(3, it2.i)
  end)

  it('trains on a KD cache reader with kd.loss_model; resume fast-forwards the reader across epochs', function()
    local kd = require 'kd'
    local function student(seed)
      torch.manual_seed(seed)
      local m = nn.from_config{ model_type = 'qwen3', vocab_size = 23, hidden_size = 16, intermediate_size = 24,
        num_hidden_layers = 1, num_attention_heads = 2, num_key_value_heads = 1, max_position_embeddings = 16,
        tie_word_embeddings = true, initializer_range = 0.5 }
      m:requires_grad_(true)
      return m
    end
    local cache = h.tmpdir() .. '/cache'
    torch.manual_seed(1)
    kd.build_cache{ teacher = student(0), data = torch.randint(0, 23, { 10, 9 }, { dtype = 'int64' }), K = 4, R = 2,
                    shard_size = 4, out = cache, seed = 7 }
    local function run(out, steps, resume)
      local m = student(9)
      local t = trainer.new{ model = m, optimizer = optim.AdamW(m, { lr = 1e-2 }), steps = steps, out = out,
        data = kd.open_cache(cache, { batch_size = 3, seed = 2, device = 'cpu' }), resume = resume, progress = quiet,
        loss = function(model, b) return kd.loss_model(model, b) end, log_every = 1 }
      return t, t:run(), m
    end
    local _, full, mf = run(h.tmpdir(), 10)
    local out = h.tmpdir()
    run(out, 6)
    local t2, sum, m2 = run(out, 10, true)
    assert.same({ epoch = 2, batch = 2 }, t2.data_pos)   -- 4 batches (3+3+3+1) per epoch
    assert.is_true(same_params(mf, m2) > 3)
    assert.equal(full.train_loss, sum.train_loss)
    local _, rows = csv_rows(out .. '/training_log.csv')
    assert.is_true(rows[10].train_loss < rows[1].train_loss)
  end)

  it('resume survives a real SIGKILL of the host', function()
    local script = os.tmpname() .. '.lua'
    local f = assert(io.open(script, 'w'))
    f:write([[
local torch, nn, optim, trainer, schedule = require 'torch', require 'nn', require 'optim', require 'trainer',
  require 'schedule'
local args = ...
torch.manual_seed(5)
local m = nn.from_config{ model_type = 'qwen3', vocab_size = 17, hidden_size = 16, intermediate_size = 24,
  num_hidden_layers = 1, num_attention_heads = 2, num_key_value_heads = 1, max_position_embeddings = 16 }
m:requires_grad_(true)
local function loss(model, ids)
  local S = ids:size(2)
  local lp = model:forward(ids:narrow(2, 1, S - 1)):log_softmax(3)
  return -lp:gather(3, ids:narrow(2, 2, S - 1):unsqueeze(3)):mean()
end
local function on_step(t)
  if args.kill_at and t.global_step == args.kill_at then
    local pid = io.open('/proc/self/stat'):read('*l'):match('^(%d+)')
    os.execute('kill -9 ' .. pid)
    os.execute('sleep 5')
  end
end
local t = trainer.new{ model = m, optimizer = optim.AdamW(m, { lr = 3e-2 }), loss = loss, steps = 10,
  data = function() return (torch.randint(0, 17, { 4, 1 }) + torch.arange(8)) % 17 end, seed = 1,
  schedule = schedule.cosine{ total = 10, warmup = 2 }, save_every = 3, log_every = 1, resume = args.resume,
  hooks = { on_step = on_step }, progress = { mode = 'off' } }
t:run()
torch.save(require('qatlab').out .. '/final.safetensors', m:state_dict())
]])
    f:close()
    local a, b = h.tmpdir(), h.tmpdir()
    local run = function(out, extra)
      return h.host('run --device cpu --threads 1 ' .. h.q(script) .. ' --out ' .. h.q(out) .. ' ' .. extra)
    end
    local rc, _, err = run(a, '')
    assert.equal(0, rc, err)
    rc = run(b, '--set kill_at=5')
    assert.are_not.equal(0, rc)
    assert.is_nil(io.open(b .. '/final.safetensors'))
    local _, rows = csv_rows(b .. '/training_log.csv')
    assert.equal(5, rows[#rows].step)                  -- steps 4 and 5 were logged after the checkpoint at 3
    rc, _, err = run(b, '--set resume=true')
    assert.equal(0, rc, err)
    local wa, wb = torch.load(a .. '/final.safetensors'), torch.load(b .. '/final.safetensors')
    for k, v in pairs(wa) do assert.is_true(v:equal(wb[k]), k) end
    local _, ra = csv_rows(a .. '/training_log.csv')
    _, rows = csv_rows(b .. '/training_log.csv')
    assert.equal(10, #rows)
    for i, r in ipairs(rows) do
      assert.equal(i, r.step)
      assert.equal(ra[i].train_loss, r.train_loss)
    end
    os.remove(script)
  end)

  it('sync_every keeps the loss on the device between reads and changes nothing else', function()
    local o1, o4 = h.tmpdir(), h.tmpdir()
    local t1, m1 = lm_trainer(o1, { save_every = 0, log_every = 6 })
    local t4, m4 = lm_trainer(o4, { save_every = 0, log_every = 6, sync_every = 3 })
    assert.equal(1, t1.sync_every)                      -- 'auto' on the CPU: every step
    local kinds = {}
    for s = 1, 4 do
      local l1, l4 = t1:step(), t4:step()
      kinds[s] = torch.is_tensor(l4) and 'tensor' or type(l4)
      assert.is_true(math.abs((torch.is_tensor(l4) and l4:item() or l4) - l1) < 1e-6)
    end
    assert.same({ 'tensor', 'tensor', 'number', 'tensor' }, kinds)   -- read at steps 3 (sync_every)
    t1:run(); t4:run()
    same_params(m1, m4)
    assert.equal(read(o1 .. '/training_log.csv'):gsub(',[%d.]+\n', '\n'),
                 read(o4 .. '/training_log.csv'):gsub(',[%d.]+\n', '\n'))   -- same rows but elapsed_sec
    local ok, err = pcall(trainer.new, { model = m1, optimizer = t1.optimizer, loss = lm_loss, data = lm_data,
                                         steps = 1, sync_every = 0 })
    assert.is_false(ok)
    assert.truthy(tostring(err):find("sync_every must be 'auto' or a positive integer, got 0", 1, true), err)
  end)

  it('with sync_every a non-finite loss stops the run at the next read', function()
    local t
    t = reg_trainer{ sync_every = 4, log_every = 0, loss = function(m, batch)
      local l = mse(m, batch)
      if t and t.global_step == 1 then return l * (0 / 0), { n = 1 } end
      return l, { n = 1 }
    end }
    local ok, err = pcall(t.run, t)
    assert.is_false(ok)
    assert.truthy(tostring(err):find('non-finite loss at step 4: ', 1, true), err)   -- NaN weights since step 2
    assert.equal(3, t.global_step)
  end)

  it('aborts on a non-finite loss naming the step', function()
    local calls = 0
    local t = reg_trainer{ grad_accum = 2, loss = function(m, batch)
      calls = calls + 1
      local l = mse(m, batch)
      if calls == 6 then return l * (0 / 0), { kl = 0 / 0 } end
      return l, { kl = 1 }
    end }
    local before = t.model.W:detach():clone()
    local ok, err = pcall(t.run, t)
    assert.is_false(ok)
    assert.truthy(tostring(err):find('non-finite loss at step 3: ', 1, true), err)
    assert.truthy(tostring(err):find('nan', 1, true), err)
    assert.truthy(tostring(err):find('kl=', 1, true), err)
    assert.equal(2, t.global_step)
    assert.is_false(t.model.W:equal(before))
  end)

  it('stops on the time budget; rejects unknown options', function()
    local t = reg_trainer{ steps = false, time_budget = 0.3, log_every = 0, eval = false }
    local sum = t:run()
    assert.equal('time_budget', sum.stopped)
    assert.is_true(sum.steps > 0 and sum.elapsed >= 0.3)
    local ok, err = pcall(trainer.new, { model = {}, optimizer = {}, lr = 1 })
    assert.is_false(ok)
    assert.truthy(tostring(err):find('unknown option "lr"', 1, true))
    err = select(2, pcall(trainer.new, { model = {}, optimizer = {}, loss = mse, data = function() end, stesp = 3 }))
    assert.truthy(tostring(err):find('trainer.new: unknown option "stesp" (did you mean "steps"?)', 1, true), err)
    err = select(2, pcall(trainer.new, { model = {}, optimizer = {}, loss = mse, data = function() end, steps = '3' }))
    assert.truthy(tostring(err):find('trainer.new: option "steps" must be a number, got string', 1, true), err)
  end)

  it('says so when the loss function returns nil', function()
    local t = reg_trainer{ loss = function() end, eval = false }
    local ok, err = pcall(t.step, t)
    assert.is_false(ok)
    assert.truthy(tostring(err):find('the loss function returned nil (expected a scalar tensor)', 1, true), err)
  end)
end)
