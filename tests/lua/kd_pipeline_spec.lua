-- kd_pipeline: real text → SentencePiece → packing → tiny teacher → KD cache → reader → loss,
-- and the same cache rewritten by real PyTorch in the seed's shard_*.pt layout gives the same loss.
local torch = require 'torch'
local nn = require 'nn'
local data = require 'data'
local kd = require 'kd'
local tokenizers = require 'tokenizers'
local h = require 'helper'

local function rm(d) os.execute('rm -rf ' .. h.q(d)) end

describe('KD pipeline on real text', function()
  local dir = h.tmpdir()
  local text_path = '/usr/share/common-licenses/GPL-3'
  local model = tokenizers.train_sentencepiece{input = text_path, model_prefix = dir .. '/sp', vocab_size = 300,
                                               model_type = 'bpe'}
  local tk = tokenizers.sentencepiece(model)
  local f = assert(io.open(text_path))
  local paragraphs = {}
  for p in f:read('*a'):gmatch('[^\n][^\n]+') do paragraphs[#paragraphs + 1] = p end
  f:close()
  local L = 24
  local ids = data.pack(tk, paragraphs, {L = L, eos = tk.eos_token_id})            -- (N, L)
  local V = tk:vocab_size()
  local function tiny(seed)
    torch.manual_seed(seed)
    return nn.from_config({model_type = 'qwen3', vocab_size = V, hidden_size = 32, intermediate_size = 64,
                           num_hidden_layers = 1, num_attention_heads = 4, num_key_value_heads = 2, head_dim = 8,
                           max_position_embeddings = 64, tie_word_embeddings = true})
  end
  local teacher, student = tiny(1), tiny(2)
  teacher:eval()
  local rows = ids:narrow(1, 1, 12)
  local K = 8
  local cache = dir .. '/cache'
  kd.build_cache{teacher = teacher, data = rows, K = K, shard_size = 6, out = cache, seed = 3}

  it('packs real text into full blocks of token ids', function()
    assert.is_true(ids:size(1) > 100)
    assert.are.equal(L, ids:size(2))
    assert.is_true(ids:min():item() >= 0 and ids:max():item() < V)
    -- the blocks hold the text's tokens in order, EOS after each paragraph
    local first = tk:encode(paragraphs[1])
    for i = 1, math.min(#first, L) do assert.are.equal(first[i], ids[1][i]:item()) end
  end)

  it('caches the teacher top-k of each predicted position, read back as a stream', function()
    local r = kd.open_cache(cache, {batch_size = 12, shuffle = false})
    local b = r:next()
    assert.is_true(b.input_ids:long():equal(rows))
    local logits = torch.no_grad(function() return teacher:forward(rows) end):narrow(2, 1, L - 1)
    local vals, idx = logits:topk(K)
    assert.is_true(b.topk_idx:long():equal(idx))
    assert.is_true(b.topk_logits:equal(vals:half()))
    r:close()
  end)

  local function loss_of(dir_)
    local r = kd.open_cache(dir_, {batch_size = 12, shuffle = false})
    local b = r:next()
    r:close()
    local loss, parts = kd.loss_model(student, b, {T = 2})
    return loss, parts
  end

  it('gives a finite KD loss whose gradient reaches the student', function()
    local loss, parts = loss_of(cache)
    assert.is_true(loss:item() > 0 and loss:item() < 100)
    assert.is_true(parts.kl > 0)
    loss:backward()
    local g = student:named_parameters()[1][2].grad
    assert.is_true(g ~= nil and g:abs():sum():item() > 0)
  end)

  it('evaluates from a cache reader as from a list of its batches', function()
    local r = kd.open_cache(cache, {batch_size = 4, shuffle = false})
    local batches = {}
    while true do
      local b = r:next()
      if not b then break end
      batches[#batches + 1] = b
    end
    local from_list = kd.evaluate(student, batches, {examples = 12})
    r:reset(0)
    local from_reader, n = kd.evaluate(student, r, {examples = 12})
    assert.are.equal(12, n)
    assert.is_true(math.abs(from_list - from_reader) < 1e-12)
    r:close()
  end)

  it('reads the seed .pt layout written by PyTorch with the same loss', function()
    local seed_dir = dir .. '/seed_cache'
    h.py(table.concat({
      'import json, os, glob, torch',
      'from safetensors.torch import load_file',
      ('src, dst = %q, %q'):format(cache, seed_dir),
      'os.makedirs(dst, exist_ok=True)',
      'meta = json.load(open(os.path.join(src, "meta.json")))',
      'json.dump(meta, open(os.path.join(dst, "meta.json"), "w"))',
      'for i, p in enumerate(sorted(glob.glob(os.path.join(src, "shard_*.safetensors")))):',
      '    t = load_file(p)',
      '    torch.save({k: t[k] for k in ("input_ids", "attention_mask", "topk_idx", "topk_logits")},',
      '               os.path.join(dst, "shard_%05d.pt" % i))',
    }, '\n'))
    local a = loss_of(cache):item()
    local b = loss_of(seed_dir):item()
    assert.are.equal(a, b)
    rm(seed_dir)
  end)

  teardown(function() rm(dir) end)
end)
