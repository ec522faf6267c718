-- kd_lab: the small-scale distillation set-up the SR experiments and the sweep share: a corpus
-- prefix → SentencePiece BPE → packed blocks, a teacher trained from scratch, KD caches, a KD trainer.
local torch = require 'torch'
local nn = require 'nn'
local data = require 'data'
local kd = require 'kd'
local optim = require 'optim'
local tokenizers = require 'tokenizers'
local trainer = require 'trainer'
local log = require 'log'
local qatlab = require 'qatlab'
local sweep = require 'sweep'   -- sweep.hash: the corpus fingerprint in sp.source
local files = require 'files'

local M = {}

local read = files.read

-- Writes text to path unless it already holds exactly that (returns whether it wrote), atomically:
-- processes sharing `work` (sweep workers, job-array tasks) never see half a file.
local function write_once(path, text)
  if read(path) == text then return false end
  files.write_atomic(path, text, 'kd_lab')
  return true
end

-- Settings every kd_lab experiment takes (merge them into the experiment's own defaults).
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

-- Builds everything in `work` (created). opts.sub_out(name) → the trainer's out dir for a stage
-- (nil: no files); opts.keep_teacher: save the teacher as work/teacher.safetensors and reuse it.
-- Returns {tk, V, model_cfg, teacher, train_ids, held_ids, held (eval batches), reader,
-- kd_eval(model), kd_train(model, name, steps, lr) → summary, seconds per step}.
function M.setup(cfg, work, opts)
  opts = opts or {}
  assert(os.execute("mkdir -p '" .. work .. "'") == 0, 'kd_lab: cannot create ' .. work)
  local lab = {}

  -- data ---------------------------------------------------------------------------------------
  local text = (cfg.text ~= '' and table.concat(data.read_text(cfg.text), '\n') or data.kjv_text())
    :sub(1, cfg.text_bytes)
  write_once(work .. '/corpus_prefix.txt', text)
  -- The tokenizer is trained once per corpus and settings: sp.source names what sp.model was trained from
  -- (written after it), so a process that finds it matching loads the model instead of training its own.
  -- (train_sentencepiece itself renames sp.vocab, then sp.model, into place.)
  local sp_train = {input = work .. '/corpus_prefix.txt', model_prefix = work .. '/sp', vocab_size = cfg.vocab,
                    model_type = 'bpe'}
  local source = ('vocab_size=%d model_type=%s text_bytes=%d text_hash=%s\n'):format(
    cfg.vocab, sp_train.model_type, #text, sweep.hash(text))
  local model, model_file = work .. '/sp.model', io.open(work .. '/sp.model', 'rb')
  if model_file then model_file:close() end
  if read(work .. '/sp.source') ~= source or not model_file then
    os.remove(work .. '/sp.source')   -- names the old model no more, should this process stop mid-way
    model = tokenizers.train_sentencepiece(sp_train)
    write_once(work .. '/sp.source', source)
  end
  lab.tk = tokenizers.sentencepiece(model)
  local lines = {}
  for line in text:gmatch('[^\n]+') do lines[#lines + 1] = line end
  local ids = data.pack(lab.tk, lines, {L = cfg.L, eos = lab.tk.eos_token_id})
  ids = data.shuffle(ids, {seed = cfg.seed}):narrow(1, 1, math.min(cfg.rows, ids:size(1)))
  lab.train_ids, lab.held_ids = data.split(ids, {fraction = 0.125, seed = cfg.seed})
  lab.V = lab.tk:vocab_size()
  log.info(('%d blocks of %d tokens (%d train / %d held out), vocabulary %d'):format(
    ids:size(1), cfg.L, lab.train_ids:size(1), lab.held_ids:size(1), lab.V))
  lab.model_cfg = {model_type = 'qwen3', vocab_size = lab.V, hidden_size = cfg.hidden,
                   intermediate_size = 3 * cfg.hidden, num_hidden_layers = cfg.layers, num_attention_heads = 4,
                   num_key_value_heads = 2, head_dim = math.floor(cfg.hidden / 4),
                   max_position_embeddings = 2 * cfg.L, tie_word_embeddings = true}

  local function ce_loss(m, x) return m:loss(x) end               -- next-token CE over a (B, L) block
  local function quiet(o, name)
    o.progress, o.log_every, o.save_final, o.eval_at_start = false, 0, false, false
    o.out = opts.sub_out and opts.sub_out(name) or nil
    return o
  end

  -- teacher: trained from scratch with next-token CE (or reused) -------------------------------
  lab.teacher = nn.from_config(lab.model_cfg)
  local teacher_path = work .. '/teacher.safetensors'
  local saved = opts.keep_teacher and io.open(teacher_path, 'rb')
  if saved then
    saved:close()
    lab.teacher:load_state_dict((torch.load(teacher_path)))
    log.info('teacher: loaded ' .. teacher_path)
  else
    local train_ids = lab.train_ids
    local run = trainer.new(quiet({
      model = lab.teacher, optimizer = optim.AdamW(lab.teacher, {lr = cfg.teacher_lr, weight_decay = 0.01}),
      loss = ce_loss, steps = cfg.teacher_steps,
      data = function() return train_ids:index_select(1, torch.randint(0, train_ids:size(1), {cfg.batch})) end,
      eval = function(m) return {eval_loss = ce_loss(m, lab.held_ids)} end,
    }, 'teacher'))
    local sum = run:run()
    run:close()
    log.info(('teacher: %d steps, held-out CE %.4f (uniform %.4f)'):format(sum.steps, sum.eval_loss, math.log(lab.V)))
    if opts.keep_teacher then torch.save(teacher_path, lab.teacher:state_dict()) end
  end
  lab.teacher:eval()

  -- KD caches of the teacher's top-k, eval batches, the KD trainer -------------------------------
  local t0 = qatlab.time()
  local keep = opts.keep_teacher and true or nil
  kd.build_cache{teacher = lab.teacher, data = lab.train_ids, K = cfg.K, out = work .. '/kd_train',
                 overwrite = not keep, seed = 1}
  kd.build_cache{teacher = lab.teacher, data = lab.held_ids, K = cfg.K, out = work .. '/kd_held',
                 overwrite = not keep, seed = 2}
  log.info(('KD caches built in %.1f s'):format(qatlab.time() - t0))
  lab.held = {}
  local er = kd.open_cache(work .. '/kd_held', {batch_size = cfg.batch, shuffle = false})
  for _ = 1, cfg.eval_batches do
    local b = er:next()
    if not b then break end
    lab.held[#lab.held + 1] = b
  end
  er:close()
  function lab.kd_eval(m) return (kd.evaluate(m, lab.held, {n = #lab.held})) end

  local kd_opts = {T = 2, hard_top1 = cfg.hard_top1, hard_full = cfg.hard_full}
  lab.reader = kd.open_cache(work .. '/kd_train', {batch_size = cfg.batch, shuffle = true, seed = cfg.seed})
  function lab.kd_train(m, name, steps, lr)
    local r = trainer.new(quiet({
      model = m, optimizer = optim.AdamW(m, {lr = lr, weight_decay = 0}),
      loss = function(mm, b) return kd.loss_model(mm, b, kd_opts) end, data = lab.reader, steps = steps,
      eval = function(mm) return {eval_loss = lab.kd_eval(mm)} end,
    }, name))
    local t = qatlab.time()
    local s = r:run()
    r:close()
    return s, (qatlab.time() - t) / math.max(s.steps, 1)
  end
  return lab
end

return M
