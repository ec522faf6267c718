-- sweep_lr: a learning-rate x rank grid of V2 Q4 KD training through scripts/sweep.lua (ledger, resume by
-- config hash, ranked summary). Teacher and KD caches as in sr001_convert_q4_q2.lua (a small qwen3-style model
-- trained briefly from scratch on the King James Bible, its top-k logits cached), kept in the output folder
-- (runs/sweep_lr without --out) with the ledger, so a re-run skips the teacher and every completed trial.
-- Rank goes through the quant preset (quant.replace has no rank option): rank 4 = q4a4 (LUT16, rank 4
-- everywhere), rank 32 = q4a4_r32.
-- Each trial: teacher copy -> quant.replace -> KD on all scales -> held-out KD loss (kd.evaluate).
-- Trials run one per GPU at a time on a multi-GPU node (worker processes: see scripts/sweep.lua), in worker
-- processes on the CPU with --set workers=N, or spread over a Slurm job array (each task runs its share).
--
--   qatlab run experiments/sweep_lr.lua [--set tiny=true] [--set steps=200] [--out runs/sweep_lr]
--   qatlab run experiments/sweep_lr.lua --set workers=2 [--set devices=cuda:0,cuda:1]
--   run='qatlab run experiments/sweep_lr.lua --out runs/lr'
--   job=$(sbatch --parsable --gres=gpu:1 --wrap "$run --set prepare=true")
--   sbatch --dependency=afterok:$job --array=0-5 --gres=gpu:1 --wrap "$run"
--     (then: qatlab -e "print(require('sweep').summarize('runs/lr/lr_rank').markdown)")
local torch = require 'torch'
local nn = require 'nn'
local quant = require 'quant'
local kd = require 'kd'
local kd_lab = require 'kd_lab'
local sweep = require 'sweep'
local config = require 'config'
local log = require 'log'
local qatlab = require 'qatlab'
local args = ...

local defaults = {
  tiny = false,          -- ~15 s smoke run: fewer steps and rows
  steps = 150,           -- KD steps per trial
  lrs = {3e-4, 1e-3, 3e-3}, ranks = {4, 32},
  workers = 0,           -- trials at once in worker processes (0: one per GPU on a multi-GPU node, else 1)
  devices = '',          -- the workers' devices instead, e.g. 'cuda:0,cuda:1' or 'cpu,cpu'
  prepare = false,       -- only build the teacher and KD caches (the step before a job array)
}
for k, v in pairs(kd_lab.defaults) do
  if defaults[k] == nil then defaults[k] = v end
end
local cfg = config.merge(defaults, args)
if cfg.tiny then
  cfg.rows, cfg.teacher_steps, cfg.steps, cfg.eval_batches, cfg.lrs = 192, 60, 15, 4, {1e-3, 3e-3}
end
torch.manual_seed(cfg.seed)
log.info('sweep_lr on ' .. qatlab.device .. ': ' .. config.format(cfg))

local work = qatlab.out or 'runs/sweep_lr'
-- Processes that run at once (sweep workers, job-array tasks) share this folder: they load the teacher and KD
-- caches of the first process (or of a --set prepare=true run before a job array) instead of building them
-- together, and kd_lab's other files are written atomically, only when they differ.
local me, share = sweep.worker(), sweep.shard{}
if me or share then
  local ready = io.open(work .. '/prepared')
  if not ready then
    error(('sweep_lr: no teacher and KD caches in %s yet; before a job array, build them once with '
           .. 'qatlab run experiments/sweep_lr.lua --out %s --set prepare=true'):format(work, work), 0)
  end
  ready:close()
end
local lab = kd_lab.setup(cfg, work, {keep_teacher = true, sub_out = function(n) return work .. '/' .. n end})
if not (me or share) then
  local f = assert(io.open(work .. '/prepared', 'w'))
  f:write('teacher.safetensors, kd_train and kd_held are complete\n')
  f:close()
end
if cfg.prepare then
  lab.reader:close()
  log.info('sweep_lr: teacher and KD caches ready in ' .. work)
  return
end
local model_cfg, teacher = lab.model_cfg, lab.teacher
local kd_eval, kd_train = lab.kd_eval, lab.kd_train


-- the sweep ------------------------------------------------------------------------------------------------
local presets = {[4] = 'q4a4', [32] = 'q4a4_r32'}
-- base: every setting a trial reads (the kd_lab set-up included), so that a trial's key (the hash of its whole
-- configuration) changes with any of them and a changed setting never reuses a stale result; the runner's own
-- settings (workers, devices, prepare) and the grid's lists stay out.
local base = {lr = cfg.lrs[1], rank = cfg.ranks[1]}
for k, v in pairs(cfg) do
  if not ({workers = true, devices = true, prepare = true, lrs = true, ranks = true})[k] then base[k] = v end
end
local res = sweep.run{
  name = 'lr_rank', out = work, space = sweep.grid{lr = cfg.lrs, rank = cfg.ranks}, base = base,
  workers = cfg.workers, devices = cfg.devices ~= '' and cfg.devices or nil,
  metric = {name = 'kd_loss', goal = 'minimize'},
  fn = function(run, t)
    local preset = assert(presets[t.rank], 'rank must be 4 or 32 (the q4a4 / q4a4_r32 presets)')
    torch.manual_seed(t.seed)
    local student = nn.from_config(model_cfg)
    student:load_state_dict(teacher:state_dict())
    quant.replace(student, {preset = preset})
    student:train()
    quant.set_trainable(student, 'all')
    local init = kd_eval(student)
    -- every trial reads the KD cache from its start: the same batches in any order, process or resume
    lab.reader:close()
    lab.reader = kd.open_cache(work .. '/kd_train', {batch_size = t.batch, shuffle = true, seed = t.seed})
    kd_train(student, 'trial_' .. preset .. '_lr' .. t.lr, t.steps, t.lr)
    local loss = kd_eval(student)
    run:report(t.steps, loss)
    return {kd_loss = loss, kd_loss_init = init}
  end,
}
lab.reader:close()
log.info(('%d trials, %d failed; ledger %s/runs.jsonl'):format(#res.results, res.failed, res.dir))
