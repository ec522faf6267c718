-- full_disk_spec: writes that fail (ENOSPC past a byte budget, EIO from fsync, a failing rename) through
-- the LD_PRELOAD shim tests/shim/failwrite.c, in qatlab subprocesses: trainer checkpoints, KD cache shards,
-- sweep records and exports stop with an error naming the file, leave the previous state whole, and a
-- run after the fault is lifted ends where an undisturbed run ends.
local torch = require 'torch'
local kd = require 'kd'
local h = require 'helper'

local function read(path) return require('files').read(path) end

-- The shim: built by the test build (QATLAB_FAILWRITE), else compiled here with cc.
local shim = os.getenv('QATLAB_FAILWRITE')
if not (shim and read(shim)) then
  shim = h.tmpdir() .. '/failwrite.so'
  local rc, _, err = h.sh('cc -O1 -shared -fPIC -o ' .. h.q(shim) .. ' ' ..
                          h.q(h.source_dir .. '/tests/shim/failwrite.c') .. ' -ldl')
  assert(rc == 0, 'full_disk_spec: cannot build tests/shim/failwrite.c (set QATLAB_FAILWRITE or install cc): ' .. err)
end

local function script(text)
  local path = h.tmpdir() .. '/script.lua'
  local f = assert(io.open(path, 'w'))
  f:write(text)
  f:close()
  return path
end

-- Runs `qatlab run script --out out <sets>` with the fault `fault` = {path=, op=, after=, errno=} (or none).
local function run(path, out, sets, fault)
  local env = ''
  if fault then
    env = ('LD_PRELOAD=%s QATLAB_FAIL_PATH=%s QATLAB_FAIL_OP=%s QATLAB_FAIL_AFTER=%d QATLAB_FAIL_ERRNO=%s ')
          :format(h.q(shim), h.q(fault.path), fault.op or 'write', fault.after or 0, fault.errno or 'ENOSPC')
  end
  return h.sh(env .. h.q(h.bin) .. ' run --device cpu --threads 1 ' .. h.q(path) .. ' --out ' .. h.q(out) ..
              ' ' .. (sets or ''))
end

local function has(text, needle) assert.is_truthy(text:find(needle, 1, true), ('%q not in:\n%s'):format(needle, text)) end

local function same_tensors(a, b)
  local n = 0
  for k, v in pairs(a) do
    assert.is_truthy(b[k], k)
    assert.is_true(v:equal(b[k]), k)
    n = n + 1
  end
  for k in pairs(b) do assert.is_truthy(a[k], k) end
  assert.is_true(n > 0)
end

describe('failwrite shim', function()
  it('turns writes past the budget into ENOSPC; a buffered short text fails at close', function()
    local d = h.tmpdir()
    local s = script(([[
local f = assert(io.open(%q, 'w'))
print('w1', f:write(('x'):rep(3)) ~= nil)
print('w2', f:write(('y'):rep(100000)) ~= nil)
print('c1', f:close() ~= nil)
f = assert(io.open(%q, 'w'))
print('w3', f:write('z') ~= nil)
print('c2', (select(2, f:close())))
print('other', assert(io.open(%q, 'w')):write('ok') ~= nil)
]]):format(d .. '/hit_a', d .. '/hit_b', d .. '/miss'))
    local rc, out, err = run(s, d, '', { path = '*/hit_*', after = 5 })
    assert.equal(0, rc, err)
    -- w2 is larger than stdio's buffer: it fails itself and leaves nothing for close to flush; the
    -- one byte of w3 sits in the buffer and fails only when close flushes it, as on a real full disk.
    has(out, 'w1\ttrue\nw2\tfalse\nc1\ttrue\nw3\ttrue\nc2\tNo space left on device\nother\ttrue')
    assert.equal('xxxyy', read(d .. '/hit_a'))   -- the budget's 5 bytes reached the file
    has(err, 'failwrite: write ' .. d .. '/hit_a: No space left on device')
  end)
end)

-- A tiny LM trained 10 steps with a checkpoint every 3 (the trainer_spec SIGKILL recipe).
local TRAIN = [[
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
local t = trainer.new{ model = m, optimizer = optim.AdamW(m, { lr = 3e-2 }), loss = loss, steps = 10,
  data = function() return (torch.randint(0, 17, { 4, 1 }) + torch.arange(8)) % 17 end, seed = 1,
  schedule = schedule.cosine{ total = 10, warmup = 2 }, save_every = 3, log_every = 1, resume = args.resume,
  progress = { mode = 'off' } }
t:run()
torch.save(require('qatlab').out .. '/final.safetensors', m:state_dict())
]]

describe('trainer checkpoints on a failing disk', function()
  local train, ref
  setup(function()
    train = script(TRAIN)
    ref = h.tmpdir()
    local rc, _, err = run(train, ref)
    assert(rc == 0, err)
  end)

  -- The fault hits ckpt_6; ckpt_3 must stay whole and a resume must end as the undisturbed run.
  local function check(fault, needles)
    local out = h.tmpdir()
    local rc, _, err = run(train, out, '', fault)
    assert.are_not.equal(0, rc)
    for _, n in ipairs(needles) do has(err, n) end
    has(err, 'failwrite: ')                                  -- the shim did inject the fault
    assert.is_nil(read(out .. '/final.safetensors'))
    assert.is_nil(read(out .. '/ckpt_6/trainer.json'))
    local st = require('json').decode(assert(read(out .. '/ckpt_3/trainer.json')))
    assert.equal(3, st.step)
    for _, f in ipairs({ 'model', 'optim' }) do torch.load(out .. '/ckpt_3/' .. f .. '.safetensors') end
    rc, _, err = run(train, out, '--set resume=true')
    assert.equal(0, rc, err)
    has(err, 'resumed from ' .. out .. '/ckpt_3')
    same_tensors(torch.load(ref .. '/final.safetensors'), torch.load(out .. '/final.safetensors'))
    assert.equal(read(ref .. '/training_log.csv'):gsub(',[%d.]+\n', '\n'),
                 read(out .. '/training_log.csv'):gsub(',[%d.]+\n', '\n'))   -- same rows but elapsed_sec
  end

  it('ENOSPC inside model.safetensors', function()
    check({ path = '*/ckpt_6.tmp/model.safetensors*', after = 200 },
          { 'ckpt_6.tmp/model.safetensors', 'No space left on device' })
  end)

  it('ENOSPC on trainer.json (a short text that fails only at close)', function()
    check({ path = '*/ckpt_6.tmp/trainer.json*' }, { 'ckpt_6.tmp/trainer.json', 'No space left on device' })
  end)

  it('EIO from fsync of optim.safetensors', function()
    check({ path = '*/ckpt_6.tmp/optim.safetensors*', op = 'fsync', errno = 'EIO' },
          { 'ckpt_6.tmp/optim.safetensors', 'Input/output error' })
  end)

  it('a failing rename of the checkpoint folder into place', function()
    check({ path = '*/ckpt_6', op = 'rename', errno = 'EIO' }, { 'ckpt_6', 'Input/output error' })
  end)
end)

describe('KD cache shards on a failing disk', function()
  local BUILD = [[
local torch, nn, kd = require 'torch', require 'nn', require 'kd'
torch.manual_seed(3)
local teacher = nn.from_config{ model_type = 'qwen3', vocab_size = 29, hidden_size = 16, intermediate_size = 24,
  num_hidden_layers = 1, num_attention_heads = 2, num_key_value_heads = 1, max_position_embeddings = 16 }
local ids = torch.randint(0, 29, { 12, 6 })
kd.build_cache{ teacher = teacher, data = ids, K = 4, R = 2, shard_size = 4, out = require('qatlab').out .. '/cache' }
]]
  local build, ref
  setup(function()
    build = script(BUILD)
    ref = h.tmpdir()
    local rc, _, err = run(build, ref)
    assert(rc == 0, err)
  end)

  local function shard(dir, i) return torch.load(('%s/cache/shard_%05d.safetensors'):format(dir, i)) end

  for _, case in ipairs({
    { 'ENOSPC inside the second shard', { path = '*/shard_00001.safetensors*', after = 100 },
      'shard_00001.safetensors', 'No space left on device' },
    { 'ENOSPC on progress.json after the second shard', { path = '*/progress.json*', after = 120 },
      'progress.json', 'No space left on device' },
  }) do
    it(case[1] .. ': an error naming the file, the shards before it readable, resume completes', function()
      local out = h.tmpdir()
      local rc, _, err = run(build, out, '', case[2])
      assert.are_not.equal(0, rc)
      has(err, case[3])
      has(err, case[4])
      has(err, 'failwrite: ')
      -- What was written before the fault is a valid cache (each shard is renamed into place whole, even
      -- one that progress.json does not count yet): its shards equal the undisturbed build's.
      local r = kd.open_cache(out .. '/cache', { shuffle = false, batch_size = 4, device = 'cpu' })
      local rows = r:meta().total_rows
      assert.is_true(rows >= 4 and rows <= 12 and rows % 4 == 0, tostring(rows))
      local b = r:next()
      assert.is_true(b.topk_idx:equal(shard(ref, 0).topk_idx))
      r:close()
      rc, _, err = run(build, out)
      assert.equal(0, rc, err)
      for i = 0, 2 do same_tensors(shard(ref, i), shard(out, i)) end
      local done = require('json').decode(read(out .. '/cache/progress.json'))
      assert.is_true(done.done)
      assert.equal(12, done.n_written)
    end)
  end
end)

describe('sweep records on a failing disk', function()
  local SWEEP = [[
local sweep = require 'sweep'
local out = require('qatlab').out
sweep.run{ name = 's', out = out, space = sweep.grid{ x = { 1, 2, 3, 4 } }, metric = { name = 'loss', goal = 'minimize' },
  print = false, fn = function(_, cfg)
    local f = assert(io.open(out .. '/calls.txt', 'a')); f:write(cfg.x, '\n'); f:close()
    return { loss = (cfg.x - 2.5) ^ 2 }
  end }
]]
  local function calls(dir)
    local n = 0
    for _ in (read(dir .. '/calls.txt') or ''):gmatch('\n') do n = n + 1 end
    return n
  end
  local function done(dir)
    local ids = {}
    for line in (read(dir .. '/s/runs.jsonl') or ''):gmatch('[^\n]+') do
      local rec = require('json').decode(line)
      if rec.status == 'completed' then ids[#ids + 1] = rec.run_id .. '=' .. tostring(rec.metrics and rec.metrics.loss or rec.loss) end
    end
    table.sort(ids)
    return table.concat(ids, ' ')
  end

  it('a record that cannot be written stops the sweep naming it; a rerun finishes without redoing trials', function()
    local sw, ref, out = script(SWEEP), h.tmpdir(), h.tmpdir()
    local rc, _, err = run(sw, ref)
    assert.equal(0, rc, err)
    assert.equal(4, calls(ref))
    -- Records are a few hundred bytes: the budget lets the first trials through, then the disk is full.
    rc, _, err = run(sw, out, '', { path = '*/s/records/*', after = 1500 })
    assert.are_not.equal(0, rc)
    has(err, '/s/records/')
    has(err, 'No space left on device')
    has(err, 'failwrite: ')
    local before = calls(out)
    assert.is_true(before >= 1 and before < 4, tostring(before))
    rc, _, err = run(sw, out)
    assert.equal(0, rc, err)
    assert.equal(done(ref), done(out))
    assert.is_true(calls(out) <= 4 + 1)          -- at most the trial whose record failed runs again
  end)

  it('runs.jsonl that cannot be rebuilt stops the sweep naming it', function()
    local sw, out = script(SWEEP), h.tmpdir()
    local rc, _, err = run(sw, out, '', { path = '*/s/runs.jsonl*' })
    assert.are_not.equal(0, rc)
    has(err, '/s/runs.jsonl')
    has(err, 'No space left on device')
    rc, _, err = run(sw, out)
    assert.equal(0, rc, err)
    assert.equal(4, select(2, read(out .. '/s/runs.jsonl'):gsub('\n', '')))
  end)
end)

describe('exports on a failing disk', function()
  local EXPORT = [[
local torch, nn, quant = require 'torch', require 'nn', require 'quant'
local args = ...
torch.manual_seed(args.seed)
local m = nn.from_config{ model_type = 'qwen3', vocab_size = 17, hidden_size = 16, intermediate_size = 24,
  num_hidden_layers = 1, num_attention_heads = 2, num_key_value_heads = 1, max_position_embeddings = 16 }
local out = require('qatlab').out
if args.which == 'save_pretrained' then m:save_pretrained(out .. '/pre')
elseif args.which == 'export_hf' then quant.export_hf(m, out .. '/hf')
else quant.export_compact(m, out .. '/compact.safetensors') end
torch.save(out .. '/' .. args.which .. '_' .. args.seed .. '.safetensors', m:state_dict())
]]
  local exp = script(EXPORT)
  local function load(out, which)
    if which == 'save_pretrained' then return torch.load(out .. '/pre/model.safetensors') end
    if which == 'export_hf' then return torch.load(out .. '/hf/model.safetensors') end
    return torch.load(out .. '/compact.safetensors')
  end

  for _, case in ipairs({
    { 'save_pretrained', { path = '*/pre/model.safetensors*', after = 300 }, 'pre/model.safetensors' },
    -- config.json is written after the weights: the new weights must not stay beside the old config
    { 'save_pretrained', { path = '*/pre/config.json*', after = 10 }, 'pre/config.json' },
    { 'export_hf', { path = '*/hf.tmp*/model.safetensors*', after = 300 }, 'model.safetensors' },
    { 'export_hf', { path = '*/hf', op = 'rename', errno = 'EIO' }, '/hf' },
    { 'export_compact', { path = '*/compact.safetensors*', after = 300 }, 'compact.safetensors' },
    { 'export_compact', { path = '*/compact.safetensors*', op = 'fsync', errno = 'EIO' }, 'compact.safetensors' },
  }) do
    local which, fault = case[1], case[2]
    it(('%s: %s %s fails naming the file, the previous export stays whole'):format(which, fault.op or 'write', fault.path), function()
      local out = h.tmpdir()
      local rc, _, err = run(exp, out, '--set which=' .. which .. ' --set seed=1')
      assert.equal(0, rc, err)
      local first = load(out, which)
      rc, _, err = run(exp, out, '--set which=' .. which .. ' --set seed=2', fault)
      assert.are_not.equal(0, rc)
      has(err, case[3])
      has(err, 'failwrite: ')
      same_tensors(first, load(out, which))
      if which ~= 'export_compact' then
        assert.is_truthy(require('nn').from_pretrained(out .. (which == 'export_hf' and '/hf' or '/pre')))
      end
      rc, _, err = run(exp, out, '--set which=' .. which .. ' --set seed=2')
      assert.equal(0, rc, err)
      local now, changed = load(out, which), false   -- the new export replaced it (norm weights stay ones)
      for k, v in pairs(first) do changed = changed or not v:equal(now[k]) end
      assert.is_true(changed)
    end)
  end
end)
