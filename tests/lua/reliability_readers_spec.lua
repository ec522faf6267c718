-- reliability_readers: hostile files given to the readers end in an error naming the file (and
-- key), never a crash or an unbounded allocation. Every file is generated here; each risky call
-- runs in a subprocess (QATLAB_BIN) under a memory limit, so a crash fails the spec, not the runner.
local tokenizers = require 'tokenizers'
local h = require 'helper'
local bit = require 'bit'
local json = require 'json'

local dir = h.tmpdir()

local function write(path, bytes)
  local f = assert(io.open(path, 'wb'))
  f:write(bytes)
  f:close()
  return path
end

local function read(path)
  local f = assert(io.open(path, 'rb'))
  local s = f:read('*a')
  f:close()
  return s
end

-- Runs Lua code in a fresh host limited to `kib` KiB of address space; returns rc, stdout, stderr.
local function host_limited(code, kib)
  local script = write(os.tmpname(), code)
  local rc, out, err = h.sh(('ulimit -v %d; %s run --device cpu --threads 1 %s'):format(kib or 1500000, h.q(h.bin),
    h.q(script)))
  os.remove(script)
  return rc, out, err
end

-- Asserts an ordinary error exit (1, not a signal) whose message holds every string in `want`.
local function assert_error(rc, err, want)
  assert.are.equal(1, rc, 'expected an error exit, got ' .. tostring(rc) .. ': ' .. err)
  for _, w in ipairs(want) do assert.is_truthy(err:find(w, 1, true), ('%q not in: %s'):format(w, err)) end
  assert.is_falsy(err:find('%./src/'), 'library internals in: ' .. err)
end

-- -- SentencePiece ----------------------------------------------------------------------------

-- Protobuf varint at byte i (1-based): value, next index.
local function varint(s, i)
  local r, m = 0, 1
  while true do
    local c = s:byte(i)
    i = i + 1
    r = r + (c % 128) * m
    m = m * 128
    if c < 128 then return r, i end
  end
end

-- Index of the first byte and length of ModelProto.normalizer_spec (3).precompiled_charsmap (2).
local function charsmap_span(s)
  local i = 1
  while i <= #s do
    local key
    key, i = varint(s, i)
    local f, t = math.floor(key / 8), key % 8
    if t == 0 then
      i = select(2, varint(s, i))
    elseif t == 1 then
      i = i + 8
    elseif t == 5 then
      i = i + 4
    else
      assert(t == 2, 'unexpected wire type')
      local n
      n, i = varint(s, i)
      if f == 3 then
        local j, e = i, i + n
        while j < e do
          local k2
          k2, j = varint(s, j)
          local f2, t2 = math.floor(k2 / 8), k2 % 8
          if t2 == 2 then
            local n2
            n2, j = varint(s, j)
            if f2 == 2 then return j, n2 end
            j = j + n2
          elseif t2 == 0 then
            j = select(2, varint(s, j))
          else
            j = j + (t2 == 5 and 4 or 8)
          end
        end
      end
      i = i + n
    end
  end
end

local function byte_set(s, i, b) return s:sub(1, i - 1) .. string.char(b) .. s:sub(i + 1) end
local function byte_xor(s, i, x) return byte_set(s, i, bit.bxor(s:byte(i), x)) end

local spm = h.sh('command -v spm_encode') == 0
local sample = 'a Ab 1 \xef\xac\x81 \xef\xbc\xa1 \xc3\xa9 x\n'

-- Debian's own spm_encode on the model: true when it dies of a signal.
local function spm_crashes(model)
  -- An inner shell reports the signal, to /dev/null; its status is the pipeline's (128 + signal).
  local cmd = ('printf %%s %s | spm_encode --model=%s >/dev/null'):format(h.q(sample), h.q(model))
  local rc = h.sh('sh -c ' .. h.q(cmd) .. ' 2>/dev/null')
  return rc >= 128
end

-- Loads each model and encodes the sample in one subprocess; returns rc, stdout (one line per
-- model: "ok <n ids>" or "err <message>"), stderr.
local function sp_try(models)
  local lines = {"local tokenizers = require 'tokenizers'"}
  for _, m in ipairs(models) do
    lines[#lines + 1] = ([[do
  local ok, e = pcall(function() return tokenizers.sentencepiece(%q):encode(%q) end)
  print(ok and ('ok ' .. #e) or ('err ' .. tostring(e):gsub('\n', ' ')))
end]]):format(m, sample)
  end
  return host_limited(table.concat(lines, '\n'))
end

describe('SentencePiece models', function()
  local models = {}
  for _, ty in ipairs{'unigram', 'bpe'} do
    models[ty] = tokenizers.train_sentencepiece{input = '/usr/share/common-licenses/GPL-3',
      model_prefix = dir .. '/' .. ty, vocab_size = 300, model_type = ty}
  end

  it('load and encode when intact (the baseline the corruptions depart from)', function()
    local rc, out, err = sp_try{models.unigram, models.bpe}
    assert.are.equal(0, rc, err)
    for line in out:gmatch('[^\n]+') do assert.is_truthy(line:match('^ok %d+$'), line) end
  end)

  for _, ty in ipairs{'unigram', 'bpe'} do
    it(ty .. ': a flipped byte in the charsmap that crashes libsentencepiece is an error naming the file', function()
      local s = read(models[ty])
      local at, n = charsmap_span(s)
      assert.is_truthy(at and n > 1000, 'no precompiled charsmap found')
      -- The root unit of the double array is bytes 4..7 of the blob; its top byte is its offset.
      local bad = write(dir .. '/' .. ty .. '_root.model', byte_xor(s, at + 7, 0x7f))
      if spm then assert.is_true(spm_crashes(bad), 'spm_encode survived: the mutation is not a reproducer') end
      local rc, out, err = sp_try{bad}
      assert.are.equal(0, rc, err)
      assert.is_truthy(out:find(bad .. ': not a SentencePiece model: ', 1, true), out)
      assert.is_truthy(out:find('precompiled charsmap is corrupt', 1, true), out)
    end)

    it(ty .. ': every one-byte corruption of the first trie units that crashes spm_encode is caught', function()
      if not spm then
        pending('spm_encode (Debian package sentencepiece) not installed')
        return
      end
      local s = read(models[ty])
      local at = charsmap_span(s)
      local crashers = {}
      -- The high byte of units 0..95 (offsets, flags), each flipped two ways.
      for u = 0, 95 do
        for _, x in ipairs{0x7f, 0x80} do
          local p = write(dir .. ('/%s_scan_%d_%d.model'):format(ty, u, x), byte_xor(s, at + 4 + 4 * u + 3, x))
          if spm_crashes(p) then crashers[#crashers + 1] = p else os.remove(p) end
        end
      end
      assert.is_true(#crashers >= 3, 'expected several crashing corruptions, found ' .. #crashers)
      local rc, out, err = sp_try(crashers)
      assert.are.equal(0, rc, 'the host crashed on a corrupt model: ' .. err)
      local k = 0
      for line in out:gmatch('[^\n]+') do
        k = k + 1
        assert.is_truthy(line:find('^err ') and line:find(crashers[k] .. ': not a SentencePiece model: ', 1, true), line)
      end
      assert.are.equal(#crashers, k)
    end)
  end

  it('a trie size past the blob is an error (the library checks only against the whole blob)', function()
    local s = read(models.unigram)
    local at, n = charsmap_span(s)
    local size = n - 1  -- the library accepts any size below the blob's, then reads past its end
    local bad = s
    for b = 0, 3 do bad = byte_set(bad, at + b, math.floor(size / 2 ^ (8 * b)) % 256) end
    bad = write(dir .. '/trie_size.model', bad)
    local _, out = sp_try{bad}
    assert.is_truthy(out:find(bad .. ': not a SentencePiece model: ', 1, true), out)
    assert.is_truthy(out:find('trie size ' .. size .. ' exceeds', 1, true), out)
  end)

  it('load errors are in plain words naming the file', function()
    local s = read(models.bpe)
    local cut = write(dir .. '/cut.model', s:sub(1, math.floor(#s / 2)))
    local junk = write(dir .. '/junk.model', ('\255'):rep(64))
    local empty = write(dir .. '/empty.model', '')
    -- Well-formed bytes the library itself refuses: a second piece named 'a' (field 1, appended).
    local dup = write(dir .. '/dup.model', s .. '\10\3\10\1a')
    local rc, out, err = sp_try{cut, junk, empty, dup}
    assert.are.equal(0, rc, err)
    assert.is_truthy(out:find('already defined', 1, true), out)
    local k, files = 0, {cut, junk, empty, dup}
    for line in out:gmatch('[^\n]+') do
      k = k + 1
      assert.is_truthy(line:find('^err ') and line:find(files[k] .. ': not a SentencePiece model: ', 1, true), line)
      assert.is_falsy(line:find('Internal', 1, true) or line:find('%.cc%('), line)
    end
    assert.are.equal(4, k)
  end)
end)

-- -- tokenizer.json ----------------------------------------------------------------------------

-- A byte-level BPE tokenizer.json: the 256 byte tokens (ids 0..255) plus `extra` entries.
local function tokenizer_json(extra, pre)
  local map, chars = {}, {}
  -- GPT-2's byte-to-unicode alphabet
  local n = 0
  for b = 0, 255 do
    local printable = (b >= 33 and b <= 126) or (b >= 161 and b <= 172) or (b >= 174)
    local cp = printable and b or (256 + n)
    if not printable then n = n + 1 end
    chars[b] = cp
  end
  local function utf8(cp)
    if cp < 128 then return string.char(cp) end
    return string.char(0xC0 + math.floor(cp / 64), 0x80 + cp % 64)
  end
  for b = 0, 255 do map[utf8(chars[b])] = b end
  for k, v in pairs(extra or {}) do map[k] = v end
  local text = json.encode({version = '1.0', normalizer = json.null,
    pre_tokenizer = pre or {type = 'ByteLevel', add_prefix_space = false, trim_offsets = true, use_regex = true},
    decoder = {type = 'ByteLevel'}, model = {type = 'BPE', vocab = map, merges = 'MERGES'}})
  return (text:gsub('"MERGES"', '[]'))
end

describe('tokenizer.json', function()
  it('a token id far beyond the declared vocabulary is an error, in bounded memory', function()
    for _, id in ipairs{2 ^ 24, 2 ^ 30, 2 ^ 30 - 1} do
      local p = write(dir .. '/tok_' .. id .. '.json', tokenizer_json({['far'] = id}))
      local rc, _, err = host_limited(("require('tokenizers').from_file(%q)"):format(p), 1000000)
      assert_error(rc, err, {p, 'vocab', "token 'far' has id " .. ('%d'):format(id)})
    end
  end)

  it('ids within the slack past the vocabulary still load (sparse files are not refused)', function()
    local p = write(dir .. '/tok_sparse.json', tokenizer_json({['far'] = 256 + 60000}))
    local rc, out, err = host_limited(("print(require('tokenizers').from_file(%q):vocab_size())"):format(p), 1500000)
    assert.are.equal(0, rc, err)
    assert.are.equal(256 + 60001, tonumber(out))
  end)

  it('a wrongly typed structure names the file and the key, not nlohmann internals', function()
    local cases = {
      {{type = 'Sequence', pretokenizers = 'x'}, 'pre_tokenizer.pretokenizers'},
      {{type = 'Split', pattern = 'x', behavior = 'Isolated'}, 'pre_tokenizer.pattern'},
    }
    for i, c in ipairs(cases) do
      local p = write(dir .. '/tok_type' .. i .. '.json', tokenizer_json(nil, c[1]))
      local rc, _, err = host_limited(("require('tokenizers').from_file(%q)"):format(p))
      assert_error(rc, err, {p, c[2]})
      assert.is_falsy(err:find('operator', 1, true), err)
    end
  end)
end)

-- -- weights and checkpoints -------------------------------------------------------------------

-- A safetensors file from its header's JSON text (integers written out, as 2^62 must be).
local function safetensors_bytes(hj, data)
  hj = hj .. (' '):rep((8 - #hj % 8) % 8)
  local n, len = #hj, {}
  for b = 0, 7 do len[b + 1] = string.char(math.floor(n / 2 ^ (8 * b)) % 256) end
  return table.concat(len) .. hj .. (data or '')
end

describe('weights', function()
  it('a safetensors shape whose strides overflow is an error naming the file and tensor', function()
    local p = write(dir .. '/stride.safetensors', safetensors_bytes(
      '{"w": {"dtype": "F32", "shape": [0, 4611686018427387904, 4611686018427387904], "data_offsets": [0, 0]}}'))
    local rc, _, err = host_limited(("require('torch').load(%q)"):format(p))
    assert_error(rc, err, {p, "tensor 'w'", 'shape'})
    assert.is_falsy(err:find('Stride calculation', 1, true), err)
  end)

  it('a seed checkpoint whose state dict is a string names the file, not a C++ function', function()
    local p = dir .. '/string_state.pt'
    h.py(('import torch; torch.save("hello", %q)'):format(p))
    local rc, _, err = host_limited(([[
local nn, quant = require 'nn', require 'quant'
local m = nn.from_config{model_type = 'llama', vocab_size = 32, hidden_size = 16, intermediate_size = 32,
  num_hidden_layers = 1, num_attention_heads = 2}
quant.load_checkpoint(m, %q)]]):format(p))
    assert_error(rc, err, {p, 'expected a dict of tensors, found a string'})
    assert.is_falsy(err:find('pt_state_dict', 1, true), err)
  end)
end)

describe('nn.from_pretrained', function()
  local base = dir .. '/hf_base'
  do
    local nn = require 'nn'
    require('torch').manual_seed(0)
    nn.from_config{model_type = 'llama', vocab_size = 97, hidden_size = 64, intermediate_size = 96,
      num_hidden_layers = 2, num_attention_heads = 4, num_key_value_heads = 2, max_position_embeddings = 64,
      initializer_range = 0.1}:save_pretrained(base)
  end

  -- A copy of the base directory with config.json keys overridden.
  local function variant(name, over)
    local d = dir .. '/' .. name
    assert(os.execute(('rm -rf %s && cp -r %s %s'):format(h.q(d), h.q(base), h.q(d))) == 0)
    local cfg = json.decode(read(d .. '/config.json'))
    for k, v in pairs(over) do cfg[k] = v end
    write(d .. '/config.json', json.encode(cfg))
    return d
  end

  it('checks the shapes a config implies against the weight headers before allocating', function()
    local d = variant('hf_inter', {intermediate_size = 2 ^ 40})
    local rc, _, err = host_limited(("require('nn').from_pretrained(%q)"):format(d), 1500000)
    assert_error(rc, err, {d .. '/model.safetensors', d .. '/config.json', 'mlp.', '1099511627776', '96'})
  end)

  it('a layer count beyond what the files hold is an error before any layer is built', function()
    local d = variant('hf_layers', {num_hidden_layers = 2 ^ 40})
    local rc, _, err = host_limited(("require('nn').from_pretrained(%q)"):format(d), 1500000)
    assert_error(rc, err, {d .. '/config.json', 'num_hidden_layers'})
  end)

  it('a huge max_position_embeddings costs nothing: logits equal the base model', function()
    local d = variant('hf_pos', {max_position_embeddings = 2 ^ 40})
    local rc, out, err = host_limited(([[
local torch, nn = require 'torch', require 'nn'
local ids = torch.tensor({{3, 17, 96, 0, 42, 7}}, {dtype = 'int64'})
local a = nn.from_pretrained(%q):forward(ids)
local b = nn.from_pretrained(%q):forward(ids)
print((a - b):abs():max():item(), a:abs():max():item())]]):format(base, d), 1500000)
    assert.are.equal(0, rc, err)
    local diff, mag = out:match('(%S+)%s+(%S+)')
    assert.are.equal(0, tonumber(diff))
    assert.is_true(tonumber(mag) > 0)
  end)

  it('a weight file with a hostile shape names the file and tensor', function()
    local d = variant('hf_stride', {})
    write(d .. '/model.safetensors', safetensors_bytes(
      '{"model.embed_tokens.weight": {"dtype": "F32", "shape": [0, 4611686018427387904, 4611686018427387904], ' ..
      '"data_offsets": [0, 0]}}'))
    local rc, _, err = host_limited(("require('nn').from_pretrained(%q)"):format(d), 1500000)
    assert_error(rc, err, {d .. '/model.safetensors', "tensor 'model.embed_tokens.weight'"})
  end)
end)

-- -- pre-tokenizer regex limits ----------------------------------------------------------------

describe('pre-tokenizer regex limits', function()
  -- Two tokenizer.json files trained by HF tokenizers: a heavy but valid Split pattern (a group
  -- repeated over the whole piece: PCRE2's JIT stack cannot hold a megabyte of it) and a
  -- catastrophic one; plus HF's ids for a 1 MB piece without a split point.
  local heavy, bad = dir .. '/re_heavy.json', dir .. '/re_bad.json'
  local text_path, hf_path = dir .. '/re_text.txt', dir .. '/re_hf.txt'
  local heavy_pat, bad_pat = [==[(?:\p{L}\p{M}*)+]==], [==[(a|a)+[^a]]==]
  h.py(([=[
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, Regex, trainers
def make(pat, path):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pat), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog " * 50, "élan naïve café " * 30], trainer=tr)
    tok.save(path)
    return tok
tok = make(%q, %q)
make(%q, %q)
s = ("thequickbrowncaféfox" * 60000)[:1000000]
open(%q, "w", encoding="utf-8").write(s)
open(%q, "w").write(" ".join(map(str, tok.encode(s).ids)))
]=]):format(heavy_pat, heavy, bad_pat, bad, text_path, hf_path))

  it('a heavy but valid pattern on a 1 MB piece without a split encodes as HF tokenizers does', function()
    local out_path = dir .. '/re_ours.txt'
    local rc, _, err = host_limited(([[
local tk = require('tokenizers').from_file(%q)
local f = io.open(%q, 'rb'); local s = f:read('*a'); f:close()
local ids = tk:encode(s)
local o = io.open(%q, 'w'); o:write(table.concat(ids, ' ')); o:close()]]):format(heavy, text_path, out_path), 3000000)
    assert.are.equal(0, rc, err)
    local ours, want = read(out_path), read(hf_path)
    assert.is_true(#want > 1000)
    assert.is_true(ours == want, ('ids differ from HF tokenizers (%d vs %d characters)'):format(#ours, #want))
  end)

  it('a catastrophic pattern is an error naming the file and the pattern, not a hang', function()
    local rc, _, err = host_limited(("require('tokenizers').from_file(%q):encode(('a'):rep(40))"):format(bad))
    assert_error(rc, err, {bad, 'pre_tokenizer.pretokenizers[0].pattern.Regex', bad_pat, 'catastroph'})
  end)
end)
