-- bench_tokenizer: encoding speed of the Qwen3 tokenizer (tokens/s, MB/s, one thread) on a few
-- MB of real English text, against Hugging Face's `tokenizers` when QATLAB_PYTHON has it.
--
--   qatlab run experiments/bench_tokenizer.lua [--set mb=4] [--set repeats=3] [--set corpus=FILE]
-- The corpus is /usr/share/dictd/gcide.dict.dz when dict-gcide is installed, else the licence
-- texts and package copyright files under /usr/share, repeated up to `mb` MB.
local tokenizers = require 'tokenizers'
local qatlab = require 'qatlab'
local config = require 'config'
local args = ...
local bench = require 'bench'
local sh = bench.sh

local cfg = config.merge({
  mb = 4, repeats = 3, corpus = '',
  tokenizer = qatlab.scripts_dir .. '/../.cache/data/qwen3-tokenizer',   -- tools/fetch_test_data.sh
  python = os.getenv('QATLAB_PYTHON') or 'python3',
}, args)

local q = require('util').q

-- Corpus ------------------------------------------------------------------------------------
local want = math.floor(cfg.mb * 1e6)
local text, source
if cfg.corpus ~= '' then
  local f = assert(io.open(cfg.corpus, 'rb'))
  text, source = f:read('*a'), cfg.corpus
  f:close()
elseif io.open('/usr/share/dictd/gcide.dict.dz') then
  text, source = sh('zcat /usr/share/dictd/gcide.dict.dz | head -c ' .. want), 'gcide.dict.dz'
else
  text = sh('cat /usr/share/common-licenses/* $(ls /usr/share/doc/*/copyright 2>/dev/null) 2>/dev/null')
  source = '/usr/share/common-licenses + /usr/share/doc/*/copyright'
end
assert(#text > 0, 'empty corpus')
local unique = #text
if #text < want then text = text:rep(math.ceil(want / #text)) end
text = text:sub(1, want)
-- Cut at a line end so the text stays valid UTF-8.
text = text:sub(1, (text:find('\n[^\n]*$') or #text))

-- qatlab --------------------------------------------------------------------------------------
local t0 = qatlab.time()
local tk = tokenizers.from_file(cfg.tokenizer)
local load_s = qatlab.time() - t0

local n_tokens
local times = {}
for r = 1, cfg.repeats do
  local t = qatlab.time()
  local ids = tk:encode(text, {return_tensor = true})
  times[r] = qatlab.time() - t
  n_tokens = ids:numel()
end
local cold = times[1]
table.sort(times)
local best = times[1]

-- By line: many short calls, as a data loader makes them.
local lines = {}
for line in text:gmatch('[^\n]+') do lines[#lines + 1] = line end
local t = qatlab.time()
for i = 1, #lines do tk:encode(lines[i]) end
local by_line = qatlab.time() - t

-- Hugging Face tokenizers, one thread ----------------------------------------------------------
local py_script = os.tmpname()
local text_file = os.tmpname()
local fh = assert(io.open(text_file, 'wb'))
fh:write(text)
fh:close()
fh = assert(io.open(py_script, 'w'))
fh:write(([[
import os, sys, time
os.environ['RAYON_NUM_THREADS'] = '1'
try:
    from tokenizers import Tokenizer
except ImportError:
    sys.exit(0)
tk = Tokenizer.from_file(%q + '/tokenizer.json')
lines = open(%q, encoding='utf-8').read().split('\n')
lines = [l for l in lines if l]
best = 1e9
for _ in range(%d):
    t = time.perf_counter()
    n = sum(len(e.ids) for e in tk.encode_batch(lines, add_special_tokens=False))
    best = min(best, time.perf_counter() - t)
print(n, best)
]]):format(cfg.tokenizer, text_file, cfg.repeats))
fh:close()
local py = sh('RAYON_NUM_THREADS=1 ' .. q(cfg.python) .. ' ' .. q(py_script) .. ' 2>/dev/null')
os.remove(py_script)
os.remove(text_file)
local py_tokens, py_s = py:match('(%d+) (%S+)')

-- Report ---------------------------------------------------------------------------------------
local mb = #text / 1e6
print(('corpus: %s, %.2f MB (%.2f MB unique), %d lines'):format(source, mb, unique / 1e6, #lines))
print(('load: %.2f s (%s)'):format(load_s, cfg.tokenizer))
print('| encoder (1 thread) | tokens | MB/s | tokens/s |')
print('|---|---:|---:|---:|')
local row = '| %s | %s | %.1f | %.2fM |'
print(row:format('qatlab, one call, first (cold cache)', n_tokens, mb / cold, n_tokens / cold / 1e6))
print(row:format('qatlab, one call, best of ' .. cfg.repeats, n_tokens, mb / best, n_tokens / best / 1e6))
print(row:format('qatlab, line by line from Lua', '', mb / by_line, n_tokens / by_line / 1e6))
if py_tokens then
  py_s = tonumber(py_s)
  print(row:format('HF tokenizers, encode_batch by line, RAYON_NUM_THREADS=1, best of ' .. cfg.repeats,
    py_tokens, mb / py_s, tonumber(py_tokens) / py_s / 1e6))
end
print(('\nREADME: Qwen3 tokenizer, 1 thread: %.1f MB/s, %.2fM tokens/s (%.2f MB of %s)')
  :format(mb / best, n_tokens / best / 1e6, mb, source))
