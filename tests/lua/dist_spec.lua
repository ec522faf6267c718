-- dist_spec: data-parallel training on c10d/Gloo over loopback: 2 ranks (qatlab run --nproc 2) match one
-- process step by step, resume across world sizes, torchrun- and Slurm-style environments, bad environments.
local torch = require 'torch'
local h = require 'helper'

local ok_dist, dist_err = pcall(require, 'dist')
if not ok_dist then
  describe('dist', function()
    it('is built in (needs libgloo-dev at configure time)', function() pending(tostring(dist_err)) end)
  end)
  return
end

local dir = h.tmpdir()
local function write(path, text)
  local f = assert(io.open(path, 'w'))
  f:write(text)
  f:close()
end

-- A tiny MLP trained by the trainer on a fixed regression set; every global batch has 8 rows.
local WORKER = dir .. '/worker.lua'
write(WORKER, [[
local torch = require 'torch'
local optim = require 'optim'
local trainer = require 'trainer'
local dist = require 'dist'
local args = ...
dist.init{ backend = 'gloo', timeout = 60 }
torch.manual_seed(11)
local X = torch.randn(64, 4)
local Y = torch.sin(X:matmul(torch.randn(4, 2)))
torch.manual_seed(5)
local m = { W1 = (torch.randn(4, 16) * 0.5):requires_grad_(), b1 = torch.zeros(16):requires_grad_(),
            W2 = (torch.randn(16, 2) * 0.3):requires_grad_(), b2 = torch.zeros(2):requires_grad_() }
local names = { 'W1', 'b1', 'W2', 'b2' }
-- Ranks > 0 start from other values: dist.ddp must give every rank rank 0's.
if dist.rank() > 0 then torch.no_grad(function() m.W1:add_(1) end) end
function m.params() local p = {}; for i, k in ipairs(names) do p[i] = m[k] end; return p end
function m.state_dict() local sd = {}; for _, k in ipairs(names) do sd[k] = m[k]:detach() end; return sd end
function m.load_state_dict(_, sd) torch.no_grad(function() for _, k in ipairs(names) do m[k]:copy_(sd[k]) end end) end
local function loss(mm, b)
  local hid = torch.tanh(b.x:matmul(mm.W1) + mm.b1)
  return ((hid:matmul(mm.W2) + mm.b2 - b.y) ^ 2):mean()
end
local function data(s, micro)
  local start = ((s * 2 + micro - 1) * 8) % 64 + 1
  return { x = X:narrow(1, start, 8), y = Y:narrow(1, start, 8) }
end
local t = trainer.new{ model = m, optimizer = optim.AdamW(m.params(), { lr = 0.05, weight_decay = 0.01 }),
  loss = loss, data = data, steps = args.steps, grad_accum = args.accum or 1, log_every = 1, out = args.out,
  save_every = args.save_every, resume = args.resume == true, progress = false }
t:run()
t:close()
torch.save(args.out .. '/final_rank' .. dist.rank() .. '.safetensors', m.state_dict())
]])

local function run(nproc, out, sets)
  local cmd = ('run --threads 1 %s %s --set out=%s %s'):format(nproc > 1 and ('--nproc ' .. nproc) or '',
    h.q(WORKER), h.q(out), sets)
  local rc, so, se = h.host(cmd)
  assert(rc == 0, ('qatlab %s failed (%s):\n%s\n%s'):format(cmd, tostring(rc), so, se))
  return so, se
end

local function losses(out)
  local rows = {}
  for line in io.lines(out .. '/training_log.csv') do
    local step, loss = line:match('^(%d+),([^,]*),')
    if step and loss ~= '' then rows[#rows + 1] = { tonumber(step), tonumber(loss) } end
  end
  return rows
end

local function same_losses(a, b)
  assert.are.equal(#b, #a)
  for i = 1, #a do
    assert.are.equal(b[i][1], a[i][1])
    assert(math.abs(a[i][2] - b[i][2]) <= 1e-6 + 1e-5 * math.abs(b[i][2]),
      ('step %d: loss %.6f vs %.6f'):format(a[i][1], a[i][2], b[i][2]))
  end
end

local function same_params(a, b)
  for _, k in ipairs({ 'W1', 'b1', 'W2', 'b2' }) do h.close(a[k], b[k], 1e-6, 1e-5) end
end

local function final(out, rank) return (torch.load(out .. '/final_rank' .. (rank or 0) .. '.safetensors')) end

describe('dist: two Gloo ranks against one process', function()
  local one, two = dir .. '/one', dir .. '/two'

  it('give the same per-step losses and final parameters (global batch 8)', function()
    run(1, one, '--set steps=6')
    run(2, two, '--set steps=6')
    local l1, l2 = losses(one), losses(two)
    assert.are.equal(6, #l1)
    same_losses(l2, l1)
    same_params(final(two, 0), final(one))
    same_params(final(two, 1), final(two, 0))   -- ranks agree (rank 1 started elsewhere)
  end)

  it('match with gradient accumulation (only the last micro-batch all-reduces)', function()
    run(1, one .. '_acc', '--set steps=3 --set accum=2')
    run(2, two .. '_acc', '--set steps=3 --set accum=2')
    same_losses(losses(two .. '_acc'), losses(one .. '_acc'))
    same_params(final(two .. '_acc', 0), final(one .. '_acc'))
  end)

  it('resume with another world size (2 -> 1 and 1 -> 2)', function()
    local a, b = dir .. '/r21', dir .. '/r12'
    run(2, a, '--set steps=3')
    run(1, a, '--set steps=6 --set resume=true')
    same_params(final(a, 0), final(one))
    same_losses(losses(a), losses(one))
    run(1, b, '--set steps=3')
    run(2, b, '--set steps=6 --set resume=true')
    same_params(final(b, 0), final(one))
    same_params(final(b, 1), final(one))
  end)
end)

describe('dist.ddp', function()
  it('averages gradients over ranks bucket by bucket, every step', function()
    local script = dir .. '/buckets.lua'
    write(script, [[
local torch = require 'torch'
local d = require 'dist'
d.init{ timeout = 30 }
local r = d.rank()
torch.manual_seed(1)
local ps = { torch.randn(64, 32):requires_grad_(), torch.randn(32):requires_grad_(), torch.randn(32, 8):requires_grad_() }
local ddp = d.ddp(ps, { bucket_mb = 0.004 })   -- 4 KiB buckets
local function loss_at(params, x) return (x:matmul(params[1]) + params[2]):matmul(params[3]):sum() end
local worst = 0
for step = 1, 3 do
  for _, p in ipairs(ps) do if p.grad then p.grad:zero_() end end
  ddp:prepare_forward()
  ddp:backward(loss_at(ps, torch.ones(8, 64) * (r + 1) * step))
  -- The loss is linear in x: the mean over ranks 1 and 2 of the gradients is the gradient at x = 1.5.
  local ref = {}
  for i, p in ipairs(ps) do ref[i] = p:detach():clone():requires_grad_() end
  loss_at(ref, torch.ones(8, 64) * 1.5 * step):backward()
  for i = 1, #ps do worst = math.max(worst, ((ps[i].grad - ref[i].grad):abs():max() / ref[i].grad:abs():max()):item()) end
end
print(('buckets %d worst %.3g'):format(ddp:num_buckets(), worst))
]])
    local rc, so, se = h.host('run --threads 1 --nproc 2 ' .. h.q(script))
    assert.are.equal(0, rc, se)
    local n, worst = ('\n' .. so):match('\nbuckets (%d+) worst (%S+)')   -- rank 0's line
    assert.are.equal(2, tonumber(n), so)   -- 8 KiB alone; 128 B + 1 KiB together
    assert(tonumber(worst) < 1e-6, so)
    assert.truthy(so:find('[rank 1] buckets 2 worst', 1, true), so)
  end)

  it('is a no-op wrapper in a world of one', function()
    local rc, so, se = h.host([[-e "local torch = require 'torch'; local d = require 'dist'; d.init()
local p = torch.ones(3):requires_grad_(); local ddp = d.ddp({ p })
ddp:prepare_forward(); ddp:backward((p * 2):sum()); print(p.grad:sum():item(), tostring(ddp))"]])
    assert.are.equal(0, rc, se)
    assert.are.equal('6\tDDP(world=1, buckets=0)\n', so)
    local rc2, _, se2 = h.host([[-e "local d = require 'dist'; d.ddp({})"]])
    assert.are.equal(1, rc2)
    assert.truthy(se2:find('dist.ddp: call dist.init() before dist.ddp', 1, true), se2)
  end)
end)

describe('dist: launch environments', function()
  local probe = [[local d = require 'dist'; local r, w = d.init{ timeout = 30 }
local t = require('torch').tensor({ r + 1, 10 * (r + 1) })
d.all_reduce(t); local mx = d.all_reduce(require('torch').tensor({ r }), 'max')
local i = d.info()
print(('%d %d %d %s %s %g %g %g'):format(r, w, d.local_rank(), tostring(d.is_main()), i.source, t[1]:item(), t[2]:item(), mx[1]:item()))]]

  it('joins a torchrun-style world from RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT', function()
    math.randomseed(os.time() + math.floor(os.clock() * 1e6))
    local f0, f1 = dir .. '/env0.txt', dir .. '/env1.txt'
    local o0, o1
    -- A random port below Linux's ephemeral range (32768+, where client sockets of other tests may
    -- sit); another try on the rare collision with a listener.
    for _ = 1, 3 do
      local port = 20000 + math.random(0, 9999)
      local base = ('WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=%d'):format(port)
      local cmd = ('%s RANK=1 LOCAL_RANK=1 %s -e %s > %s 2>&1 & %s RANK=0 LOCAL_RANK=0 %s -e %s > %s 2>&1; wait')
        :format(base, h.q(h.bin), h.q(probe), h.q(f1), base, h.q(h.bin), h.q(probe), h.q(f0))
      h.sh(cmd)
      o0, o1 = io.open(f0):read('*a'), io.open(f1):read('*a')
      if not (o0 .. o1):find('EADDRINUSE', 1, true) then break end
    end
    assert.are.equal('0 2 0 true env 3 30 1\n', o0)
    assert.are.equal('1 2 1 false env 3 30 1\n', o1)
  end)

  it('is a world of one without a launcher, and reads Slurm variables', function()
    local rc, so = h.host('-e ' .. h.q(probe))
    assert.are.equal(0, rc)
    assert.are.equal('0 1 0 true none 1 10 0\n', so)
    local slurm = 'env -u RANK -u WORLD_SIZE SLURM_PROCID=0 SLURM_NTASKS=1 SLURM_LOCALID=0 ' ..
                  "SLURM_JOB_NODELIST='gpu[03-05,9],cpu1' SLURM_JOB_ID=123456 "
    local code = [[local d = require 'dist'; d.init(); local i = d.info()
print(i.source, i.world_size, i.master_addr, i.master_port)]]
    rc, so = h.sh(slurm .. h.q(h.bin) .. ' -e ' .. h.q(code))
    assert.are.equal(0, rc)
    assert.are.equal('slurm\t1\tgpu03\t23456\n', so)
  end)

  it('names the variable when the environment is wrong', function()
    local function fails(envs, pattern)
      local rc, _, se = h.sh('env ' .. envs .. ' ' .. h.q(h.bin) .. " -e \"require('dist').init()\"")
      assert.are.equal(1, rc)
      assert.truthy(se:find(pattern, 1, true), se)
    end
    fails('RANK=2 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29999',
          'dist.init: RANK=2 with WORLD_SIZE=2: expected 0 <= rank < world size')
    fails('RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1', 'MASTER_PORT is unset')
    fails('RANK=x WORLD_SIZE=2', "RANK='x': expected an integer")
    fails('RANK=0', 'RANK and WORLD_SIZE must be set together')
    local rc, _, se = h.host("-e \"require('dist').init{ backend = 'mpi' }\"")
    assert.are.equal(1, rc)
    assert.truthy(se:find("backend 'mpi': expected auto, gloo or nccl", 1, true), se)
  end)
end)

describe('dist: qatlab run --nproc', function()
  it('exits with the status of the rank that failed first and stops the others', function()
    local script = dir .. '/fail.lua'
    write(script, [[local d = require 'dist'; d.init{ timeout = 30 }
if d.rank() == 1 then os.exit(3) end
d.barrier()]])
    local rc, _, se = h.host('run --nproc 2 ' .. h.q(script))
    assert.are.equal(3, rc)
    assert.truthy(se:find('rank 1 failed first (status 3)', 1, true), se)
    write(script, [[local d = require 'dist'; d.init{ timeout = 30 }
if d.rank() == 1 then error('broken rank') end
d.barrier()]])
    rc, _, se = h.host('run --nproc 2 ' .. h.q(script))
    assert.are.equal(1, rc)
    assert.truthy(se:find('[rank 1] qatlab: ', 1, true), se)
    assert.truthy(se:find('rank 1 failed first (status 1)', 1, true), se)
  end)

  it('prefixes the output of ranks > 0 and rejects a bad count', function()
    local script = dir .. '/hello.lua'
    write(script, "local d = require 'dist'; d.init(); print('hello ' .. d.rank())")
    local rc, so = h.host('run --nproc 2 ' .. h.q(script))
    assert.are.equal(0, rc)
    assert.truthy(so:find('^hello 0\n') or so:find('\nhello 0\n'), so)
    assert.truthy(so:find('[rank 1] hello 1', 1, true), so)
    local rc2, _, se = h.host('run --nproc 0 ' .. h.q(script))
    assert.are.equal(2, rc2)
    assert.truthy(se:find("--nproc '0': expected a number from 1 to 1024", 1, true), se)
  end)
end)
