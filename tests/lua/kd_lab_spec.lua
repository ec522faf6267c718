-- kd_lab_spec: the stages of scripts/kd_lab.lua on a small generated text: the corpus cut and split, the tokenizer
-- reused while its source matches, KD evaluation over every example of the eval batches (not #batches examples),
-- and the options rule of its constructors.
local h = require 'helper'
local torch = require 'torch'
local kd = require 'kd'
local kd_lab = require 'kd_lab'
local files = require 'files'

-- A small text with blank lines: 400 numbered sentences.
local function text_file(dir)
  local lines = {}
  for i = 1, 400 do
    lines[#lines + 1] = ('Line %d says that the number %d follows %d and comes before %d.'):format(i, i, i - 1, i + 1)
    if i % 50 == 0 then lines[#lines + 1] = '   ' end
  end
  local path = dir .. '/text.txt'
  files.write_atomic(path, table.concat(lines, '\n') .. '\n')
  return path
end

local function mtime(path)
  local p = io.popen('stat -c %Y ' .. h.q(path))
  local s = p:read('*a')
  p:close()
  return tonumber(s)
end

describe('kd_lab', function()
  local dir = h.tmpdir()
  local path = text_file(dir)

  it('cuts the corpus, trains the tokenizer once per corpus, packs and splits the blocks', function()
    local c = kd_lab.corpus{work = dir .. '/w', text = path, max_lines = 300, vocab = 200, L = 16, heldout = 0.25,
                            seed = 3}
    assert.equal(300, #c.lines)                              -- the blank line is not a line of text
    assert.equal('Line 1 says that the number 1 follows 0 and comes before 2.', c.lines[1])
    assert.equal(c.blocks:size(1), c.train_ids:size(1) + c.held_ids:size(1))
    assert.equal(math.floor(0.25 * c.blocks:size(1) + 0.5), c.held_ids:size(1))
    assert.same({16}, {c.blocks:size(2)})
    local corpus = files.read(dir .. '/w/corpus.txt')
    assert.equal(table.concat(c.lines, '\n') .. '\n', corpus)   -- the tokenizer saw exactly the lines kept
    local t0 = mtime(dir .. '/w/sp.model')
    os.execute('sleep 1')
    local c2 = kd_lab.corpus{work = dir .. '/w', text = path, max_lines = 300, vocab = 200, L = 16, heldout = 0.25,
                             seed = 3}
    assert.equal(t0, mtime(dir .. '/w/sp.model'))            -- same corpus and settings: the model is reused
    assert.is_true(c2.blocks:equal(c.blocks))
    kd_lab.corpus{work = dir .. '/w', text = path, max_lines = 200, vocab = 200, L = 16, seed = 3}
    assert.is_true(mtime(dir .. '/w/sp.model') > t0)         -- another cut: trained again
  end)

  it('scores every example of the eval batches', function()
    torch.manual_seed(0)
    local cfg = kd_lab.model_config{vocab = 64, hidden = 16, layers = 1, heads = 2, L = 8}
    assert.equal(1, cfg.num_key_value_heads)
    assert.equal(48, cfg.intermediate_size)
    local teacher, student = kd_lab.new_model(cfg, 'cpu'), kd_lab.new_model(cfg, 'cpu')
    local ids = torch.randint(0, 64, {12, 8})
    kd.build_cache{teacher = teacher, data = ids, K = 4, out = dir .. '/cache', overwrite = true}
    local batches = kd_lab.eval_batches(dir .. '/cache', 4, 3)
    assert.equal(3, #batches)
    local all = kd_lab.kd_evaluate(student, batches)
    -- the mean over the 12 examples: the mean of the per-batch means (equal batch sizes)
    local sum = 0
    for _, b in ipairs(batches) do sum = sum + (kd.evaluate(student, {b}, {examples = 4})) end
    assert.is_true(math.abs(all - sum / 3) < 1e-6, ('%g vs %g'):format(all, sum / 3))
    local first3 = kd.evaluate(student, batches, {examples = 3})   -- what `n = #batches` scored
    assert.is_true(math.abs(all - first3) > 1e-6)
  end)

  it('checks the options of its stages by name', function()
    local ok, err = pcall(kd_lab.corpus, {work = dir, vocab = 10, L = 8, max_line = 3})
    assert.is_false(ok)
    assert.truthy(tostring(err):find('kd_lab.corpus: unknown option "max_line" (did you mean "max_lines"?)', 1, true), err)
    err = select(2, pcall(kd_lab.model_config, {vocab = 10, hidden = 16, layers = 1, L = '8'}))
    assert.truthy(tostring(err):find('option "L" must be an integer, got string', 1, true), err)
    err = select(2, pcall(kd_lab.setup, {}, dir, {keep_teacher = 1}))
    assert.truthy(tostring(err):find('option "keep_teacher" must be a boolean, got number', 1, true), err)
  end)
end)
