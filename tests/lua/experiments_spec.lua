-- experiments: the SR-001 / SR-002 / golf ablation / LR x rank sweep experiments run end to end at tiny size as
-- subprocesses (--set tiny=true, one thread); their Markdown tables are read back from stdout.
local h = require 'helper'

local function finite(x) return type(x) == 'number' and x == x and x ~= math.huge and x ~= -math.huge end

-- The cells of the Markdown table rows that follow `header` in text: {{cell, ...}, ...}.
local function table_after(text, header)
  local at = text:find(header, 1, true)
  assert.truthy(at, 'no table header "' .. header .. '" in:\n' .. text)
  local rows = {}
  for line in text:sub(at):gmatch('[^\n]+') do
    if not line:match('^|') then break end
    if not line:match('^|[-:|]+$') then
      local cells = {}
      for c in line:gmatch('|%s*([^|]-)%s*%f[|]') do cells[#cells + 1] = c end
      rows[#rows + 1] = cells
    end
  end
  table.remove(rows, 1)   -- the header
  return rows
end

local function run(name, dir)
  local extra = ''
  if os.execute('command -v bible >/dev/null 2>&1') ~= 0 then   -- no bible-kjv: any real English text
    extra = ' --set text=/usr/share/common-licenses/GPL-3'
  end
  local script = h.source_dir .. '/experiments/' .. name .. '.lua'
  local rc, out, err = h.sh(('cd %s && %s run --device cpu --threads 1 %s --set tiny=true --out %s%s'):format(
    h.q(h.source_dir), h.q(h.bin), h.q(script), h.q(dir), extra))
  assert.are.equal(0, rc, name .. ' failed:\n' .. out .. '\n' .. err)
  return out
end

describe('experiments at tiny size', function()
  local dir = h.tmpdir()

  it('sr001_convert_q4_q2: Q4 KD, q4_to_q2, MLP-only KD recovers the conversion loss', function()
    local rows = table_after(run('sr001_convert_q4_q2', dir .. '/sr001'), '| stage | held-out KD loss |')
    assert.are.equal(5, #rows)
    local kd = {}
    for i, r in ipairs(rows) do
      kd[i] = tonumber(r[2])
      assert.is_true(finite(kd[i]) and kd[i] >= 0, r[1] .. ': ' .. tostring(r[2]))
    end
    assert.is_true(kd[1] < 1e-3, 'the float copy of the teacher should match it: ' .. kd[1])
    assert.is_true(rows[4][1]:find('q4_to_q2', 1, true) ~= nil)
    assert.is_true(kd[5] < kd[4], ('MLP-only KD did not improve on the conversion: %g -> %g'):format(kd[4], kd[5]))
  end)

  it('sr002_mlp_only: both variants improve on the Q2 init', function()
    local rows = table_after(run('sr002_mlp_only', dir .. '/sr002'),
                             '| trainable | tensors | KD loss at Q2 init | KD loss after | ms/step |')
    assert.are.equal(2, #rows)
    local n = {}
    for _, r in ipairs(rows) do
      local before, after = tonumber(r[3]), tonumber(r[4])
      n[r[1]] = tonumber(r[2])
      assert.is_true(finite(before) and finite(after) and finite(tonumber(r[5])), table.concat(r, ' | '))
      assert.is_true(after < before, ('%s: KD loss %g -> %g'):format(r[1], before, after))
    end
    assert.is_true(n.mlp > 0 and n.mlp < n.all, 'trainable counts ' .. tostring(n.mlp) .. ' / ' .. tostring(n.all))
  end)

  it('golf_ablation: four variants with finite bits per byte and smaller mixed int5/int6 artifacts', function()
    local rows = table_after(run('golf_ablation', dir .. '/golf'),
                             '| variant | steps | held-out bpb (int-N round trip) | artifact bytes |')
    assert.are.equal(4, #rows)
    local bytes = {}
    for _, r in ipairs(rows) do
      local bpb = tonumber(r[3])
      bytes[r[1]] = tonumber(r[4])
      assert.is_true(tonumber(r[2]) > 0, r[1] .. ': no steps')
      assert.is_true(finite(bpb) and bpb > 0 and bpb < 8, r[1] .. ': bpb ' .. tostring(r[3]))
      assert.is_true(bytes[r[1]] > 0, r[1] .. ': artifact ' .. tostring(r[4]))
    end
    assert.is_true(bytes['mixed int5 MLP / int6 attn'] < bytes['int6 QAT (baseline)'])
  end)

  it('sweep_lr: the summary ranks every trial, and a re-run resumes them all', function()
    local out = run('sweep_lr', dir .. '/sweep')
    local rows = table_after(out, '| rank | run | kd_loss (mean ± std) | n | status |')
    assert.are.equal(4, #rows)
    local seen = {}
    for _, r in ipairs(rows) do
      seen[r[2]] = true
      assert.are.equal('completed 1', r[5])
      assert.is_true(finite(tonumber(r[3]:match('^(%S+)'))), r[2] .. ': ' .. r[3])
    end
    for _, name in ipairs({'lr=0.001,rank=4', 'lr=0.001,rank=32', 'lr=0.003,rank=4', 'lr=0.003,rank=32'}) do
      assert.truthy(seen[name], 'no trial ' .. name)
    end
    local again = run('sweep_lr', dir .. '/sweep')
    local skipped = select(2, again:gsub('completed earlier, skipped', ''))
    assert.are.equal(4, skipped)
  end)

  teardown(function() os.execute('rm -rf ' .. h.q(dir)) end)
end)
