-- bench_kd_cache: KD cache throughput: build (sequences/s through a tiny random teacher, real KJV text
-- packed with the Qwen3 tokenizer) and read (sequences/s and MB/s of the prefetching reader).
--
--   qatlab run experiments/bench_kd_cache.lua [--set n=512] [--set L=64] [--set K=32] [--set R=0] [--set text=FILE]
local torch = require 'torch'
local nn = require 'nn'
local kd = require 'kd'
local data = require 'data'
local tokenizers = require 'tokenizers'
local qatlab = require 'qatlab'
local config = require 'config'
local args = ...

local cfg = config.merge({
  n = 512, L = 64, K = 32, R = 0, shard_size = 128, batch_size = 16, read_batch = 32, epochs = 3,
  hidden = 64, layers = 2, out = '', device = '',
  text = '',   -- a text file instead of the KJV (data.kjv_text needs Debian's bible-kjv)
  tokenizer = qatlab.scripts_dir .. '/../.cache/data/qwen3-tokenizer',   -- tools/fetch_test_data.sh
}, args)

-- Data: the KJV (or --set text=) packed with the real Qwen3 tokenizer; ids folded into the tiny teacher's vocab.
local vocab = 4096
local tk = tokenizers.from_file(cfg.tokenizer)
local text = cfg.text ~= '' and table.concat(data.read_text(cfg.text), '\n') or data.kjv_text()
local lines, bytes = {}, 0
for line in text:gmatch('[^\n]+') do
  lines[#lines + 1] = line
  bytes = bytes + #line + 1
  if bytes >= cfg.n * cfg.L * 6 then break end   -- ~4.5 bytes a token: enough for n blocks
end
local ids = data.pack(tk, lines, {L = cfg.L})
assert(ids:size()[1] >= cfg.n, ('not enough text for n=%d sequences of L=%d tokens'):format(cfg.n, cfg.L))
ids = ids:narrow(1, 1, cfg.n):remainder(vocab)

torch.manual_seed(0)
local dev = cfg.device ~= '' and cfg.device or nil
local tcfg = {model_type = 'qwen3', vocab_size = vocab, hidden_size = cfg.hidden,
              intermediate_size = cfg.hidden * 3, num_hidden_layers = cfg.layers,
                                num_attention_heads = 4, num_key_value_heads = 2, head_dim = cfg.hidden / 4,
              max_position_embeddings = cfg.L, tie_word_embeddings = true}
local teacher = dev and nn.from_config(tcfg, {device = dev}) or nn.from_config(tcfg)

local out = cfg.out ~= '' and cfg.out or os.tmpname()
os.remove(out)
local res = kd.build_cache{teacher = teacher, data = ids, K = cfg.K, R = cfg.R, shard_size = cfg.shard_size,
                           batch_size = cfg.batch_size, out = out, overwrite = true,
                           on_progress = function(done, total, sps)
                             io.stderr:write(('\rbuild %d/%d  %.0f seq/s'):format(done, total, sps))
                           end}
io.stderr:write('\n')

-- Read: whole epochs, shuffled, batches on the teacher's device.
local r = kd.open_cache(out, {batch_size = cfg.read_batch, shuffle = true, seed = 1, device = dev or nil})
local bytes_per_seq = cfg.L * (4 + 1) + (cfg.L - 1) * (cfg.K + cfg.R) * (4 + 2)
local t0 = qatlab.time()
local seqs = 0
for e = 1, cfg.epochs do
  if e > 1 then r:reset() end
  while true do
    local b = r:next()
    if not b then break end
    seqs = seqs + b.input_ids:size()[1]
  end
end
local read_s = qatlab.time() - t0
r:close()
os.execute("rm -rf '" .. out .. "'")

local fmt = 'kd_cache: L=%d K=%d R=%d n=%d teacher %dx%d vocab %d on %s | build %.0f seq/s | read %.0f seq/s, %.1f MB/s'
print(fmt:format(
  cfg.L, cfg.K, cfg.R, cfg.n, cfg.layers, cfg.hidden, vocab, dev or 'default device', res.seq_per_s,
  seqs / read_s, seqs * bytes_per_seq / read_s / 1e6))
