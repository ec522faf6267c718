-- fuzz_regress_spec: the inputs tools/fuzz found, rebuilt here byte by byte, give errors naming the file
-- (the fuzz targets keep the same inputs as seeds in tools/fuzz/make_corpus.py, run under ASan/UBSan/LSan).
local nn = require 'nn'
local tokenizers = require 'tokenizers'
local h = require 'helper'

local function write(path, bytes)
  local f = assert(io.open(path, 'wb'))
  f:write(bytes)
  f:close()
  return path
end

local function err_of(fn, ...)
  local ok, err = pcall(fn, ...)
  assert.is_false(ok, 'expected an error')
  return tostring(err)
end

local function has(text, needle) assert.is_truthy(text:find(needle, 1, true), ('%q not in: %s'):format(needle, text)) end

describe('fuzz regressions', function()
  it('config.json: a whole number beyond int64 (parsed as a float) is an error, not an undefined cast', function()
    local dir = h.tmpdir()
    local big = '3' .. ('25'):rep(31)   -- 63 digits: 3.25e62
    write(dir .. '/config.json', '{"model_type": "qwen3", "vocab_size": 97, "hidden_size": ' .. big ..
          ', "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}')
    local err = err_of(nn.from_pretrained, dir)
    has(err, dir .. '/config.json')
    has(err, 'hidden_size')
    has(err, 'expected an integer below 2^63')
  end)

  it('SentencePiece: a piece spelled as one NUL byte is refused naming the file', function()
    -- ModelProto: pieces {piece "<unk>", score 0, type UNKNOWN} and {piece "\0"}.
    local unk = '\10\5<unk>' .. '\21\0\0\0\0' .. '\24\2'
    local path = write(h.tmpdir() .. '/nul.model', '\10' .. string.char(#unk) .. unk .. '\10\3\10\1\0')
    local err = err_of(tokenizers.sentencepiece, path)
    has(err, path)
  end)

  it('tokenizer.json: a post-processor special token id that is in no table is refused at load', function()
    local dir = h.tmpdir()
    local vocab = {}
    for i, c in ipairs({ 'a', 'b', 'c', 'ab' }) do vocab[#vocab + 1] = ('"%s": %d'):format(c, i - 1) end
    write(dir .. '/tokenizer.json', [[{"version": "1.0", "added_tokens": [
      {"id": 4, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
      "normalizer": null, "decoder": null,
      "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
      "post_processor": {"type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 0}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [11], "tokens": ["<s>"]}}},
      "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
        "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
        "vocab": {]] .. table.concat(vocab, ', ') .. [[}, "merges": ["a b"]}}]])
    local err = err_of(tokenizers.from_file, dir .. '/tokenizer.json')
    has(err, dir .. '/tokenizer.json')
    has(err, 'special token id 11')
  end)
end)
