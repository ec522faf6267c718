-- kd_lab: the small-scale distillation pipeline the quickstart, the SR experiments and the sweep share, as stages:
-- corpus → SentencePiece BPE → packed blocks, a Qwen3-style config, a trainer stage, KD caches, KD evaluation.
local torch = require 'torch'
local nn = require 'nn'
local data = require 'data'
local kd = require 'kd'
local optim = require 'optim'
local tokenizers = require 'tokenizers'
local trainer = require 'trainer'
local schedule = require 'schedule'
local log = require 'log'
local qatlab = require 'qatlab'
local files = require 'files'
local opts = require 'opts'
local key = require 'sweep_key'   -- key.hash: the corpus fingerprint in sp.source

local M = {}

local read = files.read

-- Writes text to path unless it already holds exactly that (returns whether it wrote), atomically:
-- processes sharing `work` (sweep workers, job-array tasks) never see half a file.
local function write_once(path, text)
  if read(path) == text then return false end
  files.write_atomic(path, text, 'kd_lab')
  return true
end

-- Settings every kd_lab.setup experiment takes (merge them into the experiment's own defaults).
M.defaults = {
  text = '',            -- a text file to use instead of the King James Bible (data.kjv_text)
  text_bytes = 400000,  -- prefix of the text used for the tokenizer and the data
  vocab = 512,
  L = 32,               -- block length
  rows = 1024,          -- packed blocks used (train + held out)
  hidden = 128, layers = 2,
  teacher_steps = 500, teacher_lr = 3e-3, batch = 16,
  K = 16,               -- teacher top-k cached
  -- hard-label weights of the KD training loss: the seed uses 0.2 / 0.00005, but next to a teacher
  -- this weak they pull the student off the teacher (held-out KL rises), so the default is pure KL
  hard_top1 = 0, hard_full = 0,
  eval_batches = 8,
  seed = 0,
}

-- stage 1: corpus and tokenizer ------------------------------------------------------------------

-- corpus{work=, text='', text_bytes=0, max_lines=0, vocab=, L=, rows=0, heldout=0.125, seed=0, device=} ->
-- {tk, V, lines, text_path, blocks, train_ids, held_ids}. The non-blank lines of `text` (a file; '' = the King
-- James Bible), cut at text_bytes bytes and max_lines lines (0: no cut); a SentencePiece BPE of `vocab` trained
-- on them (work/sp.model, reused while work/sp.source names the same corpus and settings); blocks of L tokens
-- (data.pack), shuffled and cut to `rows` when rows > 0, split into train and held-out (data.split).
function M.corpus(o)
  opts.check(o, {work = 'string!', text = 'string', text_bytes = 'integer', max_lines = 'integer', vocab = 'integer!',
                 L = 'integer!', rows = 'integer', heldout = 'number', seed = 'integer', device = 'string'},
             'kd_lab.corpus')
  local work, seed = o.work, o.seed or 0
  files.mkdir(work, 'kd_lab')
  local text_path = (o.text or '') ~= '' and o.text or data.kjv_path()
  local whole = read(text_path) or error(('kd_lab: cannot read the text %s'):format(text_path), 0)
  local cut = (o.text_bytes or 0) > 0 and whole:sub(1, o.text_bytes) or whole
  local lines, max_lines = {}, o.max_lines or 0
  for line in cut:gmatch('[^\n]*') do
    if line:find('%S') then lines[#lines + 1] = line end
    if max_lines > 0 and #lines >= max_lines then break end
  end
  -- The tokenizer trains on the file itself when nothing was cut, else on the lines kept (work/corpus.txt).
  local corpus = text_path
  if #cut < #whole or max_lines > 0 then
    corpus = work .. '/corpus.txt'
    write_once(corpus, table.concat(lines, '\n') .. '\n')
  end
  -- sp.source names what sp.model was trained from (written after it), so a process that finds it matching
  -- loads the model instead of training its own (train_sentencepiece renames sp.vocab, then sp.model, into place).
  local sp_train = {input = corpus, model_prefix = work .. '/sp', vocab_size = o.vocab, model_type = 'bpe'}
  local source = ('vocab_size=%d model_type=%s corpus_bytes=%d corpus_hash=%s\n'):format(
    o.vocab, sp_train.model_type, #(read(corpus) or ''), key.hash(read(corpus) or ''))
  local model = work .. '/sp.model'
  if read(work .. '/sp.source') ~= source or not read(model) then
    os.remove(work .. '/sp.source')   -- names the old model no more, should this process stop mid-way
    model = tokenizers.train_sentencepiece(sp_train)
    write_once(work .. '/sp.source', source)
  end
  local c = {text_path = text_path, lines = lines}
  c.tk = tokenizers.sentencepiece(model)
  c.V = c.tk:vocab_size()
  local ids = data.pack(c.tk, lines, {L = o.L, eos = c.tk.eos_token_id})                  -- (N, L) int64
  if (o.rows or 0) > 0 then ids = data.shuffle(ids, {seed = seed}):narrow(1, 1, math.min(o.rows, ids:size(1))) end
  c.blocks = ids
  c.train_ids, c.held_ids = data.split(ids, {fraction = o.heldout or 0.125, seed = seed})
  if o.device and o.device ~= 'cpu' then
    c.train_ids, c.held_ids = c.train_ids:to{device = o.device}, c.held_ids:to{device = o.device}
  end
  return c
end

-- stage 2: the model -------------------------------------------------------------------------------

-- model_config{vocab=, hidden=, layers=, heads=4, L=} -> a Qwen3-style config.json table: intermediate 3·hidden,
-- KV heads heads/2, head_dim hidden/heads, max_position_embeddings L, tied embeddings.
function M.model_config(o)
  opts.check(o, {vocab = 'integer!', hidden = 'integer!', layers = 'integer!', heads = 'integer', L = 'integer!'},
             'kd_lab.model_config')
  local heads = o.heads or 4
  return {model_type = 'qwen3', vocab_size = o.vocab, hidden_size = o.hidden, intermediate_size = 3 * o.hidden,
          num_hidden_layers = o.layers, num_attention_heads = heads,
          num_key_value_heads = math.max(1, math.floor(heads / 2)), head_dim = math.floor(o.hidden / heads),
          max_position_embeddings = o.L, tie_word_embeddings = true, initializer_range = 0.02}
end

-- A fresh model of `cfg` on `device` (default the host's).
function M.new_model(cfg, device)
  local m = nn.from_config(cfg)
  device = device or qatlab.device
  if device ~= 'cpu' then m:to{device = device} end
  return m
end

-- Mean next-token cross-entropy over rows (B, L), and the token count for tokens/s.
function M.lm_loss(model, ids)
  return model:loss(ids), {tokens = ids:size(1) * (ids:size(2) - 1)}
end

-- The mean next-token CE of `model` over the rows of ids (B, L), `batch` rows at a time, in eval mode, without
-- autograd (exp of it is the held-out perplexity); the model's training flag is restored.
function M.heldout_ce(model, ids, batch)
  batch = batch or 32
  local was = model.training
  model:eval()
  local total, n = 0, 0
  torch.no_grad(function()
    local N = ids:size(1)
    for i = 1, N, batch do
      local b = ids:narrow(1, i, math.min(batch, N - i + 1))
      total = total + model:loss(b):item() * b:size(1)
      n = n + b:size(1)
    end
  end)
  if was then model:train() end
  return total / n
end

-- stage 3: a training stage ----------------------------------------------------------------------------

-- stage{name=, model=, optimizer=, loss=, data=, steps=, warmup=, min_ratio=0.1, clip=, eval=, eval_every=, out=,
--       seed=, config=, quiet=false} -> the trainer's summary, the stage's training_log.csv (nil without out).
-- With warmup given, the LR follows a linear warm-up then a cosine to min_ratio (schedule.cosine). A quiet stage
-- (or one without out) shows no progress bar, logs no rows and evaluates once at the end; out still gets its files.
function M.stage(o)
  opts.check(o, {name = 'string!', model = 'any!', optimizer = 'any!', loss = 'callable!', data = 'any!',
                 steps = 'integer!', warmup = 'integer', min_ratio = 'number', clip = 'number', eval = 'callable',
                 eval_every = 'integer', out = 'string', seed = 'integer', config = 'table', quiet = 'boolean'},
             'kd_lab.stage')
  local t = {model = o.model, optimizer = o.optimizer, loss = o.loss, data = o.data, steps = o.steps, clip = o.clip,
             eval = o.eval, seed = o.seed, config = o.config, save_final = false}
  if o.warmup then
    t.schedule = schedule.cosine{total = o.steps, warmup = math.min(o.warmup, o.steps - 1),
                                 min_ratio = o.min_ratio or 0.1}
  end
  if o.out then os.execute('rm -rf ' .. require('util').q(o.out)) end
  t.out = o.out
  if o.out and not o.quiet then
    t.log_every, t.eval_every = 10, o.eval_every
    t.hooks = {on_eval = function(self, m)
      log.info(('%s step %d/%d: train %s  eval %.4f  lr %.2e'):format(o.name, self.global_step, o.steps,
        self.last_train_loss and ('%.4f'):format(self.last_train_loss) or '-', m.eval_loss, self.lr))
    end}
  else
    t.progress, t.log_every, t.eval_at_start = false, 0, false
  end
  local tr = trainer.new(t)
  local sum = tr:run()
  tr:close()
  return sum, o.out and (o.out .. '/training_log.csv') or nil
end

-- stage 4: KD caches and KD evaluation --------------------------------------------------------------

-- The first `n` batches of `batch` rows of the KD cache in dir, in order (an eval set).
function M.eval_batches(dir, batch, n)
  local er, out = kd.open_cache(dir, {batch_size = batch, shuffle = false}), {}
  for _ = 1, n do
    local b = er:next()
    if not b then break end
    out[#out + 1] = b
  end
  er:close()
  return out
end

-- The KD loss over every example of `batches` (kd.evaluate counts examples: the whole eval set, named so).
function M.kd_evaluate(m, batches, T)
  local rows = 0
  for _, b in ipairs(batches) do rows = rows + b.input_ids:size(1) end
  return (kd.evaluate(m, batches, {examples = rows, T = T or 2}))
end

-- The KD training loss of kd.loss_model with the tokens counted for tokens/s.
function M.kd_loss(kd_opts)
  return function(m, b)
    local loss, parts = kd.loss_model(m, b, kd_opts)
    parts.tokens = b.input_ids:numel()
    return loss, parts
  end
end

-- setup: the whole set-up of the SR experiments and the sweep -------------------------------------------

-- Builds everything in `work` (created) from cfg (M.defaults merged with the experiment's settings).
-- o.sub_out(name) → a stage's out dir (nil: no files); o.keep_teacher: save the teacher as
-- work/teacher.safetensors and reuse it. Returns {tk, V, model_cfg, teacher, train_ids, held_ids, held (eval
-- batches), reader, kd_eval(model), kd_train(model, name, steps, lr) → summary, seconds per step}.
function M.setup(cfg, work, o)
  o = opts.check(o, {keep_teacher = 'boolean', sub_out = 'function'}, 'kd_lab.setup')
  for k, v in pairs(M.defaults) do
    if type(cfg[k]) ~= type(v) then
      error(('kd_lab.setup: setting %q must be a %s, got %s (merge kd_lab.defaults into the settings)'):format(
        k, type(v), type(cfg[k])), 2)
    end
  end
  local lab = M.corpus{work = work, text = cfg.text, text_bytes = cfg.text_bytes, vocab = cfg.vocab, L = cfg.L,
                       rows = cfg.rows, heldout = 0.125, seed = cfg.seed}
  log.info(('%d blocks of %d tokens (%d train / %d held out), vocabulary %d'):format(
    lab.blocks:size(1), cfg.L, lab.train_ids:size(1), lab.held_ids:size(1), lab.V))
  lab.model_cfg = M.model_config{vocab = lab.V, hidden = cfg.hidden, layers = cfg.layers, heads = 4, L = 2 * cfg.L}

  -- teacher: trained from scratch with next-token CE (or reused)
  lab.teacher = nn.from_config(lab.model_cfg)
  local teacher_path = work .. '/teacher.safetensors'
  if o.keep_teacher and read(teacher_path) then
    lab.teacher:load_state_dict((torch.load(teacher_path)))
    log.info('teacher: loaded ' .. teacher_path)
  else
    local train_ids = lab.train_ids
    local sum = M.stage{
      name = 'teacher', model = lab.teacher, loss = M.lm_loss, steps = cfg.teacher_steps,
      optimizer = optim.AdamW(lab.teacher, {lr = cfg.teacher_lr, weight_decay = 0.01}),
      data = function() return train_ids:index_select(1, torch.randint(0, train_ids:size(1), {cfg.batch})) end,
      eval = function(m) return {eval_loss = M.heldout_ce(m, lab.held_ids)} end,
      out = o.sub_out and o.sub_out('teacher') or nil, quiet = true,
    }
    log.info(('teacher: %d steps, held-out CE %.4f (uniform %.4f)'):format(sum.steps, sum.eval_loss, math.log(lab.V)))
    if o.keep_teacher then torch.save(teacher_path, lab.teacher:state_dict()) end
  end
  lab.teacher:eval()

  -- KD caches of the teacher's top-k, eval batches, the KD trainer
  local t0 = qatlab.time()
  local keep = o.keep_teacher and true or nil
  kd.build_cache{teacher = lab.teacher, data = lab.train_ids, K = cfg.K, out = work .. '/kd_train',
                 overwrite = not keep, seed = 1}
  kd.build_cache{teacher = lab.teacher, data = lab.held_ids, K = cfg.K, out = work .. '/kd_held',
                 overwrite = not keep, seed = 2}
  log.info(('KD caches built in %.1f s'):format(qatlab.time() - t0))
  lab.held = M.eval_batches(work .. '/kd_held', cfg.batch, cfg.eval_batches)
  function lab.kd_eval(m) return M.kd_evaluate(m, lab.held) end

  local kd_loss = M.kd_loss{T = 2, hard_top1 = cfg.hard_top1, hard_full = cfg.hard_full}
  lab.reader = kd.open_cache(work .. '/kd_train', {batch_size = cfg.batch, shuffle = true, seed = cfg.seed})
  function lab.kd_train(m, name, steps, lr)
    local t = qatlab.time()
    local s = M.stage{name = name, model = m, optimizer = optim.AdamW(m, {lr = lr, weight_decay = 0}),
                      loss = kd_loss, data = lab.reader, steps = steps,
                      eval = function(mm) return {eval_loss = lab.kd_eval(mm)} end,
                      out = o.sub_out and o.sub_out(name) or nil, quiet = true}
    return s, (qatlab.time() - t) / math.max(s.steps, 1)
  end
  return lab
end

return M
