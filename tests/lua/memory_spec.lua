-- memory: Lua's GC cannot see tensor memory, so the host counts the bytes held by tensor
-- userdata and collects past a threshold. A loop of throw-away tensors must run in bounded
-- memory; t:free() releases at once; views share their storage's count.
local torch = require 'torch'
local h = require 'helper'
local hr = require 'hostrun'

local MiB = 2 ^ 20
local T4 = 1024 * 1024           -- float32 elements in a 4 MiB tensor

-- Subprocesses: a fresh process per measurement, so that VmHWM (peak RSS) means one thing.
local report = [[
local function hwm()
  for l in io.lines('/proc/self/status') do
    local kb = l:match('^VmHWM:%s*(%d+)')
    if kb then return tonumber(kb) * 1024 end
  end
end
local function report(torch)
  local s = torch.memory_stats()
  print('peak=' .. s.cpu_peak_bytes)
  print('live=' .. s.cpu_live_bytes)
  print('collections=' .. s.collections)
  print('hwm=' .. hwm())
end
]]
local dir = hr.files{
  ['baseline.lua'] = report .. [[
local torch = require 'torch'
local t = torch.ones(4):fill_(1)
report(torch)
]],
  ['loop.lua'] = report .. [[
local torch = require 'torch'
local args = ...
for i = 1, args.n do
  local t = torch.empty(1024 * 1024)   -- 4 MiB, dropped at once
  t:fill_(i)
end
report(torch)
]],
  ['floor.lua'] = report .. [[
local torch = require 'torch'
local args = ...
torch.set_gc_floor(2 ^ 50)             -- no collection from tensor bytes
collectgarbage('stop')                 -- nor from Lua's own allocation debt
for i = 1, args.n do
  local t = torch.empty(1024 * 1024)
  t:fill_(i)
end
report(torch)
]],
}
local B = hr.batch()
B.host('baseline', 'run ' .. h.q(dir .. '/baseline.lua'))
B.host('loop', 'run --threads 1 ' .. h.q(dir .. '/loop.lua') .. ' --set n=1000')
B.host('floor', 'run --threads 1 ' .. h.q(dir .. '/floor.lua') .. ' --set n=60')

local function stats(name)
  local r = B.get(name)
  assert(r.rc == 0, name .. ' failed (' .. tostring(r.rc) .. '): ' .. r.err)
  local v = hr.kv(r.out)
  for k, x in pairs(v) do v[k] = assert(tonumber(x), k) end
  return v
end

describe('a loop of 1000 throw-away 4 MiB tensors', function()
  it('never holds more than ~40 of them (160 MiB) live', function()
    local s = stats('loop')
    assert(s.peak >= 4 * MiB, 'the tensors were not counted at all: peak ' .. s.peak)
    assert(s.peak < 160 * MiB, ('peak live tensor bytes %.1f MiB'):format(s.peak / MiB))
  end)

  it('collects as it goes', function()
    local s = stats('loop')
    assert(s.collections > 0, 'no collection ran')
    -- 4000 MiB allocated under a 64 MiB threshold: one collection per ~16 tensors at least
    assert(s.collections >= 1000 * 4 / 160, 'only ' .. s.collections .. ' collections')
  end)

  it('keeps the peak RSS near that of an empty script', function()
    local base, s = stats('baseline'), stats('loop')
    local extra = s.hwm - base.hwm
    assert(extra < 320 * MiB, ('VmHWM %.0f MiB, %.0f MiB above an empty script (%.0f MiB)'):format(
      s.hwm / MiB, extra / MiB, base.hwm / MiB))
    assert(s.hwm < 600 * MiB, ('VmHWM %.0f MiB'):format(s.hwm / MiB))
  end)

  it('is what bounds memory: with the collection threshold out of reach every tensor stays live', function()
    local s = stats('floor')
    assert.are.equal(60 * 4 * MiB, s.peak)    -- all 60 counted at once
    assert.are.equal(0, s.collections)
    assert(s.hwm > stats('baseline').hwm + 200 * MiB, 'the control did not grow: the measurement is blind')
  end)
end)

describe('accounting in this process', function()
  local function live() return torch.memory_stats().cpu_live_bytes end
  before_each(function()
    collectgarbage(); collectgarbage(); torch.collect()
  end)

  it('counts a new tensor\'s bytes and t:free() drops them immediately', function()
    local before = live()
    local t = torch.empty(T4)
    assert.are.equal(before + 4 * MiB, live())
    t:free()
    assert.are.equal(before, live())
    assert.is_true(t:is_freed())
  end)

  it('t.data = x moves the accounting to x\'s storage', function()
    local before = live()
    local t = torch.empty(T4)                        -- 4 MiB
    local held = { x = torch.empty(2 * MiB / 4) }    -- 2 MiB
    assert.are.equal(before + 6 * MiB, live())
    t.data = held.x                                  -- t now shares x's storage; its 4 MiB are gone
    assert.are.equal(before + 2 * MiB, live())
    held.x = nil                                     -- x's userdata dies; t keeps the storage
    collectgarbage(); collectgarbage()
    assert.are.equal(before + 2 * MiB, live())       -- t still holds the 2 MiB
    t:free()
    assert.are.equal(before, live())
  end)

  it('a freed tensor errors on use, with a message that says so', function()
    local t = torch.ones(8)
    t:free()
    for _, f in ipairs{function() return t:sum() end, function() return t + 1 end,
                       function() return t[1] end, function() return torch.matmul(t, t) end,
                       function() return t:size() end, function() return t:item() end} do
      local ok, e = pcall(f)
      assert.is_false(ok)
      assert.truthy(tostring(e):find('freed', 1, true), tostring(e))
    end
    t:free()  -- freeing twice is harmless
    assert.is_true(t:is_freed())
  end)

  it('views add no bytes: a storage is counted once however many tensors share it', function()
    local before = live()
    local t = torch.empty(T4)
    local m = t:view(1024, 1024)           -- every view a named tensor: no temporaries left to the GC
    local views = {m, t:narrow(1, 1, 10), m:t(), m[3], t:reshape(2, -1), t:detach()}
    assert.are.equal(before + 4 * MiB, live())
    -- freeing the base keeps the storage (the views still hold it) ...
    t:free()
    assert.are.equal(before + 4 * MiB, live())
    for i = 1, #views - 1 do views[i]:free() end
    assert.are.equal(before + 4 * MiB, live())
    -- ... and the last one releases it
    views[#views]:free()
    assert.are.equal(before, live())
  end)

  it('a copy is counted on its own', function()
    local before = live()
    local t = torch.empty(T4)
    local c = t:clone()
    assert.are.equal(before + 8 * MiB, live())
    c:free(); t:free()
    assert.are.equal(before, live())
  end)

  it('dropped references are released by the next collection', function()
    local before = live()
    for _ = 1, 4 do torch.empty(T4) end            -- results dropped at once
    assert.are.equal(before + 16 * MiB, live())  -- nothing collected them yet (below the threshold)
    local n = torch.memory_stats().collections
    torch.collect()
    assert.are.equal(before, live())
    assert.are.equal(n + 1, torch.memory_stats().collections)
  end)

  it('reset_peak_memory_stats brings the peak down to the live bytes', function()
    local t = torch.empty(2 * T4)
    t:free()
    assert(torch.memory_stats().cpu_peak_bytes >= live() + 8 * MiB)
    torch.reset_peak_memory_stats()
    assert.are.equal(live(), torch.memory_stats().cpu_peak_bytes)
  end)
end)

teardown(function() hr.rmtree(dir) end)
