-- bench_spec: find_max_batch finds the exact OOM threshold (binary and nanochat with the safety
-- fraction), rethrows other errors, applies a CPU memory budget with a real model, prints the
-- seed's table; and the SR-003 experiment runs as a subprocess. Also bench.device_name.
local torch = require 'torch'
local bench = require 'bench'
local h = require 'helper'

local HEADER = '| Batch | Step(s) | Memory | t/s | Loss | Status |'

local function fake(threshold)
  local calls = {}
  return function(batch)
    calls[#calls + 1] = batch
    if batch > threshold then error('CUDA out of memory. Tried to allocate 2.00 GiB', 0) end
    return 1 / batch
  end, calls
end

describe('bench.device_name', function()
  it('names the CPU model and the count of logical CPUs, as /proc/cpuinfo and nproc say', function()
    local _, model = h.sh("grep -m1 '^model name' /proc/cpuinfo | sed 's/^[^:]*: *//'")
    model = model:gsub('%s+$', '')
    local _, n = h.sh('nproc --all')
    n = tonumber(n)
    if model == '' then
      assert.are.equal('cpu', bench.device_name('cpu'))
    else
      assert.are.equal(('%s, %d logical CPUs'):format(model, n), bench.device_name('cpu'))
    end
  end)
end)

describe('bench.find_max_batch', function()
  it('binary search finds exactly the threshold', function()
    for _, t in ipairs({ 1, 7, 37, 64, 100 }) do
      local step = fake(t)
      local r = bench.find_max_batch{ make_step = step, seq = 8, min = 1, max = 100, mode = 'binary',
        warmup = 0, steps = 1, print = false }
      assert.equal(t, r.best)
      assert.equal(t, r.max_ok)
      local statuses = {}
      for _, row in ipairs(r.rows) do
        statuses[row.batch] = row.status
        if row.status == 'OK' then assert.near(1 / row.batch, row.loss, 1e-12); assert.truthy(row.step_s) end
      end
      assert.equal('OK', statuses[t])
      if t < 100 then assert.equal('OOM', statuses[t + 1]) end
      assert.truthy(r.table:find(HEADER, 1, true))
      assert.truthy(r.table:find('**MAX**', 1, true))
    end
  end)

  it('nanochat mode doubles, bisects, then applies the safety fraction', function()
    local step, calls = fake(37)
    local r = bench.find_max_batch{ make_step = step, seq = 8, min = 1, max = 1000, mode = 'nanochat',
      safety = 0.85, warmup = 0, steps = 1, print = false }
    assert.equal(37, r.max_ok)
    assert.equal(math.floor(37 * 0.85), r.best)
    assert.same({ 1, 2, 4, 8, 16, 32, 64 }, { unpack(calls, 1, 7) })
    -- multiples of 8, as in the seed's table (144 max, 152 OOM)
    step = fake(150)
    r = bench.find_max_batch{ make_step = step, seq = 64, min = 8, max = 512, mode = 'nanochat', multiple = 8,
      safety = 0.9, warmup = 0, steps = 1, print = false }
    assert.equal(144, r.max_ok)
    assert.equal(128, r.best)
    -- every batch failing
    r = bench.find_max_batch{ make_step = fake(0), min = 1, max = 8, warmup = 0, steps = 1, print = false }
    assert.is_nil(r.best)
  end)

  it('rethrows errors that are not out-of-memory', function()
    local ok, err = pcall(bench.find_max_batch, { make_step = function() error('shape mismatch', 0) end,
      min = 1, max = 4, print = false })
    assert.is_false(ok)
    assert.equal('shape mismatch', err)
  end)

  it('treats a CPU peak RSS above the memory budget as a failure (real tensors)', function()
    -- each step holds batch x 8 MiB of float32 for its backward
    local function step(batch)
      local x = torch.randn(batch, 1024, 2048, { requires_grad = true })
      local loss = (x * x):mean()
      loss:backward()
      local v = loss:item()
      x:free(); loss:free()
      return v
    end
    torch.collect()
    bench.reset_peak_rss()
    local base = bench.status_kb('VmRSS') * 1024
    local budget = base + 200 * 2 ^ 20       -- about 200 MiB above the current RSS
    local r = bench.find_max_batch{ make_step = step, seq = 1024, min = 1, max = 64, memory_budget = budget,
      device = 'cpu', warmup = 0, steps = 1, print = false }
    assert.truthy(r.best and r.best >= 2 and r.best < 16, 'best ' .. tostring(r.best))
    local over = 0
    for _, row in ipairs(r.rows) do
      if row.status == 'OVER BUDGET' then over = over + 1; assert.truthy(row.mem_bytes > budget) end
      if row.status == 'OK' then assert.truthy(row.mem_bytes <= budget) end
    end
    assert.truthy(over >= 1)
  end)
end)

describe('experiments/sr003_find_max_batch.lua', function()
  it('runs at a tiny size and prints both tables', function()
    local script = h.source_dir .. '/experiments/sr003_find_max_batch.lua'
    local rc, out, err = h.host('run --device cpu ' .. h.q(script) .. ' --set layers=1 --set hidden=32 ' ..
      '--set inter=64 --set head_dim=8 --set vocab=64 --set seq=16 --set max=8 --set steps=1')
    assert.equal(0, rc, err)
    local _, n = out:gsub(HEADER:gsub('%p', '%%%0'), '')
    assert.equal(2, n, out)
    assert.truthy(out:find('checkpointing on', 1, true) and out:find('checkpointing off', 1, true))
  end)
end)
