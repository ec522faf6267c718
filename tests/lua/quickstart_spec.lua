-- quickstart_spec: experiments/quickstart.lua end to end at tiny size, as a subprocess (KJV or a fallback
-- text → SentencePiece → teacher → KD cache → Q4 → Q2 → FP16 snap): it exits 0, writes results.md with finite
-- numbers, and the Q2 student's KD loss and perplexity fall during KD training from their post-conversion values.
local h = require 'helper'

local read = require('files').read

-- The rows of the results table: label -> {kd = number, ppl = number}.
local function table_rows(md)
  local rows = {}
  for label, kdv, ppl in md:gmatch('\n| ([^|\n]-) | ([^|\n]-) | ([^|\n]-) |') do
    rows[label] = {kd = tonumber(kdv), ppl = tonumber(ppl)}
  end
  return rows
end

local function finite(x) return type(x) == 'number' and x == x and x ~= math.huge and x ~= -math.huge end

describe('experiments/quickstart.lua', function()
  it('runs the whole pipeline at tiny size; the Q2 student recovers under KD', function()
    local dir = h.tmpdir()
    local script = h.source_dir .. '/experiments/quickstart.lua'
    local extra = ''
    if os.execute('command -v bible >/dev/null 2>&1') ~= 0 then   -- no bible-kjv: any real English text
      extra = ' --set text=/usr/share/common-licenses/GPL-3'
    end
    local rc, out, err = h.host(('run --device cpu %s --set tiny=true --out %s%s'):format(h.q(script), h.q(dir), extra))
    assert.are.equal(0, rc, 'quickstart failed:\n' .. out .. '\n' .. err)
    local md = read(dir .. '/results.md')
    assert.truthy(md, 'no results.md')
    local rows = table_rows(md)
    for _, label in ipairs({'teacher', 'Q4 (after KD)', 'Q2 (after conversion)', 'Q2 (after KD)', 'Q2 snapped FP16'}) do
      local r = rows[label]
      assert.truthy(r, 'no row ' .. label .. ' in\n' .. md)
      assert.is_true(finite(r.kd) and finite(r.ppl), label .. ': non-finite numbers')
      assert.is_true(r.kd >= 0 and r.ppl > 1, label .. ': out of range')
    end
    assert.is_true(rows.teacher.kd < 1e-3, 'teacher KD loss ' .. rows.teacher.kd)
    local conv, trained = rows['Q2 (after conversion)'], rows['Q2 (after KD)']
    print(('\n  [quickstart_spec] Q2 KD loss %.4f -> %.4f, perplexity %.2f -> %.2f (teacher %.2f)'):format(
      conv.kd, trained.kd, conv.ppl, trained.ppl, rows.teacher.ppl))
    assert.is_true(trained.kd < conv.kd, ('Q2 KD loss %g -> %g'):format(conv.kd, trained.kd))
    assert.is_true(trained.ppl < conv.ppl, ('Q2 perplexity %g -> %g'):format(conv.ppl, trained.ppl))
    -- the per-stage logs
    for _, stage in ipairs({'teacher', 'q4', 'q2'}) do
      local csv = read(dir .. '/' .. stage .. '/training_log.csv')
      assert.truthy(csv and csv:find('^step,train_loss,eval_loss,lr,elapsed_sec\n'), stage .. '/training_log.csv')
    end
    os.execute('rm -rf ' .. h.q(dir))
  end)
end)
