-- sweep_lr: a learning-rate x rank grid of V2 Q4 KD training through scripts/sweep.lua (ledger, resume by
-- config hash, ranked summary). Teacher and KD caches as in sr001_convert_q4_q2.lua (a small qwen3-style model
-- trained briefly from scratch on the King James Bible, its top-k logits cached), kept in the output folder
-- (runs/sweep_lr without --out) with the ledger, so a re-run skips the teacher and every completed trial.
-- Rank goes through the quant preset (quant.replace has no rank option): rank 4 = q4a4 (LUT16, rank 4
-- everywhere), rank 32 = q4a4_r32.
-- Each trial: teacher copy -> quant.replace -> KD on all scales -> held-out KD loss (kd.evaluate).
--
--   qatlab run experiments/sweep_lr.lua [--set tiny=true] [--set steps=200] [--out runs/sweep_lr]
local torch = require 'torch'
local nn = require 'nn'
local quant = require 'quant'
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
local lab = kd_lab.setup(cfg, work, {keep_teacher = true,
  sub_out = function(n) return (qatlab.out or 'runs/sweep_lr') .. '/' .. n end})
local model_cfg, teacher, reader = lab.model_cfg, lab.teacher, lab.reader
local kd_eval, kd_train = lab.kd_eval, lab.kd_train


-- the sweep ------------------------------------------------------------------------------------------------
local presets = {[4] = 'q4a4', [32] = 'q4a4_r32'}
local res = sweep.run{
  name = 'lr_rank', out = work, space = sweep.grid{lr = cfg.lrs, rank = cfg.ranks},
  metric = {name = 'kd_loss', goal = 'minimize'},
  fn = function(run, t)
    local preset = assert(presets[t.rank], 'rank must be 4 or 32 (the q4a4 / q4a4_r32 presets)')
    torch.manual_seed(cfg.seed)
    local student = nn.from_config(model_cfg)
    student:load_state_dict(teacher:state_dict())
    quant.replace(student, {preset = preset})
    student:train()
    quant.set_trainable(student, 'all')
    local init = kd_eval(student)
    kd_train(student, 'trial_' .. preset .. '_lr' .. t.lr, cfg.steps, t.lr)
    local loss = kd_eval(student)
    run:report(cfg.steps, loss)
    return {kd_loss = loss, kd_loss_init = init}
  end,
}
reader:close()
log.info(('%d trials, %d failed; ledger %s/runs.jsonl'):format(#res.results, res.failed, res.dir))
