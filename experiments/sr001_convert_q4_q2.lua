-- sr001_convert_q4_q2: the seed's SR-001 (Q4 -> Q2 conversion, then MLP-only KD) at CPU scale.
-- A small qwen3-style teacher is trained briefly from scratch on the King James Bible (SentencePiece BPE,
-- packed blocks), since KD from a random teacher has no structure worth distilling; its top-k logits go to
-- a KD cache (train and held-out). The student starts as a copy of the teacher, becomes a V2 Q4 model
-- (preset q4a4: LUT16, rank 4) trained by KD on every scale, is converted by quant.q4_to_q2 (k-means
-- LUT16 -> LUT4 on the MLP, ranks 4 -> 32 / 8) and fine-tuned by KD on the MLP layers only (workflow C).
-- The held-out KD loss (kd.evaluate) is printed after each stage.
--
--   qatlab run experiments/sr001_convert_q4_q2.lua [--set tiny=true] [--set q4_steps=300] [--out runs/sr001]
local torch = require 'torch'
local nn = require 'nn'
local quant = require 'quant'
local kd_lab = require 'kd_lab'
local config = require 'config'
local log = require 'log'
local qatlab = require 'qatlab'
local args = ...

local defaults = {
  tiny = false,          -- ~15 s smoke run: fewer steps and rows
  q4_steps = 300, q4_lr = 5e-4,
  q2_steps = 300, q2_lr = 1e-3,
}
for k, v in pairs(kd_lab.defaults) do
  if defaults[k] == nil then defaults[k] = v end
end
local cfg = config.merge(defaults, args)
if cfg.tiny then
  cfg.rows, cfg.teacher_steps, cfg.q4_steps, cfg.q2_steps, cfg.eval_batches = 192, 60, 30, 30, 4
end
torch.manual_seed(cfg.seed)
log.info('sr001_convert_q4_q2 on ' .. qatlab.device .. ': ' .. config.format(cfg))

local work = qatlab.out or os.tmpname()
if not qatlab.out then os.remove(work) end   -- tmpname made a file: kd_lab makes the folder
local lab = kd_lab.setup(cfg, work, {keep_teacher = false,
  sub_out = function(n) return qatlab.out and (qatlab.out .. '/' .. n) end})
local model_cfg, teacher, reader = lab.model_cfg, lab.teacher, lab.reader
local kd_eval, kd_train = lab.kd_eval, lab.kd_train

-- student: teacher copy -> V2 Q4 -> KD on all scales -------------------------------------------------------
local student = nn.from_config(model_cfg)
student:load_state_dict(teacher:state_dict())
local rows = {}
local function row(stage, loss)
  rows[#rows + 1] = {stage, loss}
  log.info(('%-34s KD loss %.4f'):format(stage, loss))
end
row('teacher copy (float)', kd_eval(student))
quant.replace(student, {preset = 'q4a4'})
student:train()
row('Q4 init (q4a4)', kd_eval(student))
quant.set_trainable(student, 'all')
kd_train(student, 'q4', cfg.q4_steps, cfg.q4_lr)
row(('Q4 after KD (%d steps, all)'):format(cfg.q4_steps), kd_eval(student))

-- Q4 -> Q2 conversion, then MLP-only KD fine-tune -----------------------------------------------------------
local t0 = qatlab.time()
local n = quant.q4_to_q2(student)
row(('Q2 after q4_to_q2 (%d layers)'):format(n), kd_eval(student))
log.info(('conversion took %.1f s'):format(qatlab.time() - t0))
quant.set_trainable(student, 'mlp')
kd_train(student, 'q2_mlp', cfg.q2_steps, cfg.q2_lr)
row(('Q2 after MLP-only KD (%d steps)'):format(cfg.q2_steps), kd_eval(student))
reader:close()

print('\n| stage | held-out KD loss |')
print('|---|---:|')
for _, r in ipairs(rows) do print(('| %s | %.4f |'):format(r[1], r[2])) end
if not qatlab.out then os.execute("rm -rf '" .. work .. "'") end
