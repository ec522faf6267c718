-- sr002_mlp_only: the seed's SR-002 (train only the MLP quant layers of a Q2 student) at CPU scale, against
-- training every quant layer. Teacher and KD caches as in sr001_convert_q4_q2.lua: a small qwen3-style model
-- trained briefly from scratch on the King James Bible (SentencePiece BPE), its top-k logits cached. Each
-- variant starts from the same Q2 init (the teacher's copy through quant.replace preset q2a4: LUT4 + rank 32
-- on the MLP, LUT16 + rank 8 on attention), is trained by KD for the same steps and LR, and reports the
-- held-out KD loss (kd.evaluate) before and after, the trainable tensor count and the time per step.
--
--   qatlab run experiments/sr002_mlp_only.lua [--set tiny=true] [--set steps=400] [--out runs/sr002]
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
  steps = 400, lr = 1e-3,
}
for k, v in pairs(kd_lab.defaults) do
  if defaults[k] == nil then defaults[k] = v end
end
local cfg = config.merge(defaults, args)
if cfg.tiny then
  cfg.rows, cfg.teacher_steps, cfg.steps, cfg.eval_batches = 192, 60, 30, 4
end
torch.manual_seed(cfg.seed)
log.info('sr002_mlp_only on ' .. qatlab.device .. ': ' .. config.format(cfg))

local work = qatlab.out or os.tmpname()
if not qatlab.out then os.remove(work) end   -- tmpname made a file: kd_lab makes the folder
local lab = kd_lab.setup(cfg, work, {keep_teacher = false,
  sub_out = function(n) return qatlab.out and (qatlab.out .. '/' .. n) end})
local model_cfg, teacher, reader = lab.model_cfg, lab.teacher, lab.reader
local kd_eval, kd_train = lab.kd_eval, lab.kd_train

-- variants: the same Q2 init, MLP-only vs all quant layers trainable ---------------------------------------
local rows = {}
for _, mode in ipairs({'mlp', 'all'}) do
  local student = nn.from_config(model_cfg)
  student:load_state_dict(teacher:state_dict())
  quant.replace(student, {preset = 'q2a4'})
  student:train()
  local before = kd_eval(student)
  local n = quant.set_trainable(student, mode)
  local _, per_step = kd_train(student, 'q2_' .. mode, cfg.steps, cfg.lr)
  local after = kd_eval(student)
  rows[#rows + 1] = {mode, n, before, after, per_step}
  log.info(('%-4s %3d trainable  KD loss %.4f -> %.4f  %.1f ms/step'):format(mode, n, before, after, per_step * 1e3))
end
reader:close()

print('\n| trainable | tensors | KD loss at Q2 init | KD loss after | ms/step |')
print('|---|---:|---:|---:|---:|')
for _, r in ipairs(rows) do print(('| %s | %d | %.4f | %.4f | %.1f |'):format(r[1], r[2], r[3], r[4], r[5] * 1e3)) end
if not qatlab.out then os.execute("rm -rf '" .. work .. "'") end
