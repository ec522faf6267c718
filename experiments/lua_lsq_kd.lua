-- lua_lsq_kd: a quantizer qatlab has no C++ for, written in Lua: LSQ (learned step size, Esser et al.
-- 2020: per-output-channel step s, W_q = s · round(clamp(W / s, -Qn, Qp)) with straight-through
-- rounding) on every projection of SmolLM2-135M, trained by KD from the float teacher; with the
-- seed's layer-wise local MLP reconstruction loss computed from forward hooks as an option.
--
--   qatlab run experiments/lua_lsq_kd.lua [--set bits=4] [--set steps=30] [--set local_w=0.5]
--   (defaults: 30 steps of 2x128 KJV tokens per arm, both arms: KD only, then KD + local loss)
local torch = require 'torch'
local nn = require 'nn'
local data = require 'data'
local optim = require 'optim'
local qatlab = require 'qatlab'
local pretrained = require 'pretrained'
local config = require 'config'
local log = require 'log'
local args = ...

local cfg = config.merge({
  gguf = pretrained.SMOLLM2,
  bits = 4,             -- signed integer grid [-2^(b-1), 2^(b-1) - 1] per output channel
  steps = 30, batch = 2, L = 128, lr = 1e-4, lr_step = 1e-3,
  eval_blocks = 24,     -- held-out KJV blocks (never trained on)
  local_w = 0.5,        -- the second arm's weight on the local MLP loss (the first arm uses 0)
  threads = 2, seed = 0,
}, args)
torch.set_num_threads(cfg.threads)

-- LSQ layer ------------------------------------------------------------------------------------
local LSQ = nn.Module:extend('LSQLinear')

local function round_ste(x) return x + (x:round() - x):detach() end
-- Gradient scaled by g, value unchanged (LSQ's step-size gradient scale).
local function grad_scale(x, g) return (x - x * g):detach() + x * g end

function LSQ:__init(weight, bits)
  self.out_features, self.in_features = weight:size(1), weight:size(2)
  self.Qn, self.Qp = 2 ^ (bits - 1), 2 ^ (bits - 1) - 1
  self.bits = bits
  self:register_parameter('weight', weight:clone())                                  -- (out, in)
  -- LSQ's init: s = 2 mean|W| / sqrt(Qp), per output channel
  local s0 = weight:abs():mean(2, {keepdim = true}) * (2 / math.sqrt(self.Qp))
  self:register_parameter('step', s0:clone())                                        -- (out, 1)
  self.gscale = 1 / math.sqrt(self.in_features * self.Qp)
end

function LSQ:dense_weight()
  local s = grad_scale(self.step, self.gscale)
  return round_ste((self.weight / s):clamp(-self.Qn, self.Qp)) * s                  -- (out, in)
end

function LSQ:forward(x) return x:matmul(self:dense_weight():to(x.dtype):t()) end

-- the model -------------------------------------------------------------------------------------
local src = pretrained.load{gguf = cfg.gguf}
local load, tk, hf = src.fresh, src.tokenizer, src.config
local teacher = load()
teacher:eval()
teacher:requires_grad_(false)

-- KJV blocks: held-out evaluation blocks first, training blocks after them.
local lines = {}
for line in io.lines(data.kjv_path()) do
  if line:find('%S') then lines[#lines + 1] = line end
  if #lines >= 6000 then break end
end
local blocks = data.pack(tk, lines, {L = cfg.L})                                       -- (N, L)
local n_train = cfg.steps * cfg.batch
assert(blocks:size(1) >= cfg.eval_blocks + n_train, 'not enough KJV text for the requested steps')
local eval_ids = blocks:narrow(1, 1, cfg.eval_blocks)
local train_ids = blocks:narrow(1, cfg.eval_blocks + 1, n_train)

local function perplexity(m) return pretrained.perplexity(m, eval_ids, 4) end

-- KL(teacher ‖ student) over the full vocabulary, mean over positions.
local function kd_loss(student, ids)
  local t = torch.no_grad(function() return teacher:forward(ids):float():log_softmax(3) end)
  local s = student:forward(ids):float():log_softmax(3)
  return (t:exp() * (t - s)):sum(3):mean()
end

-- The seed's local MLP loss on captured (x, y_q): y_fp from the teacher's float MLP weights.
local function rms(z) return z * (z:square():mean(-1, {keepdim = true}) + 1e-6):rsqrt() end
local function local_mlp_loss(i, x, yq)
  local p = 'model.layers.' .. i .. '.mlp.'
  local Wg, Wu, Wd = teacher:get_linear(p .. 'gate_proj'), teacher:get_linear(p .. 'up_proj'),
                     teacher:get_linear(p .. 'down_proj')
  local yfp = torch.no_grad(function()
    local xf = x:detach():float()
    return (xf:matmul(Wg:t()):silu() * xf:matmul(Wu:t())):matmul(Wd:t())
  end)
  yq = yq:float()
  local l = (rms(yq) - rms(yfp)):square():mean() * 0.8 + (yq - yfp):square():mean() / yfp:square():mean() * 0.2
  return l:clamp{max = 10}
end

local function arm(local_w)
  torch.manual_seed(cfg.seed)
  local student = load()
  student:requires_grad_(false)
  local layers = {}
  for _, name in ipairs(student:linear_names()) do
    if name ~= 'lm_head' then
      local l = LSQ(student:get_linear(name), cfg.bits)
      student:set_linear(name, l)
      layers[#layers + 1] = l
    end
  end
  local ppl0 = perplexity(student)
  -- hooks capture each layer's MLP input and output while the local loss is on
  local captured, handles = {}, {}
  if local_w > 0 then
    for i = 0, hf.num_hidden_layers - 1 do
      handles[#handles + 1] = student:register_forward_hook('model.layers.' .. i .. '.mlp',
        function(_, x, y) captured[i] = {x, y} end)
    end
  end
  local weights, steps = {}, {}
  for _, l in ipairs(layers) do weights[#weights + 1] = l.weight; steps[#steps + 1] = l.step end
  local opt = optim.AdamW({{params = weights, lr = cfg.lr}, {params = steps, lr = cfg.lr_step}}, {weight_decay = 0})
  local t0, first, last = qatlab.time()
  for step = 1, cfg.steps do
    local ids = train_ids:narrow(1, (step - 1) * cfg.batch + 1, cfg.batch)
    opt:zero_grad()
    local kd = kd_loss(student, ids)
    local loss = kd
    if local_w > 0 then
      local lsum = 0
      for i = 0, hf.num_hidden_layers - 1 do lsum = lsum + local_mlp_loss(i, captured[i][1], captured[i][2]) end
      loss = kd * (1 - local_w) + lsum / hf.num_hidden_layers * local_w
      captured = {}
    end
    loss:backward()
    opt:step()
    first = first or kd:item()
    last = kd:item()
    if step % 10 == 0 then log.info(('local_w=%g step %d: KD %.4f'):format(local_w, step, last)) end
  end
  for _, hd in ipairs(handles) do hd:remove() end
  return {ppl0 = ppl0, ppl = perplexity(student), kd0 = first, kd = last, seconds = qatlab.time() - t0}
end

local t_ppl = perplexity(teacher)
log.info(('teacher perplexity %.2f on %d held-out KJV blocks of %d tokens'):format(t_ppl, cfg.eval_blocks, cfg.L))
local a = arm(0)
local b = arm(cfg.local_w)
-- bits per weight of the projections: b-bit codes + one 16-bit step per output row
local bpw = cfg.bits + 16 / hf.hidden_size
print()
print(('## LSQ int%d in Lua on SmolLM2-135M, KD from the float teacher (%d steps x %d x %d tokens)'):format(
  cfg.bits, cfg.steps, cfg.batch, cfg.L))
print()
print('| model | bits/weight (projections) | perplexity | × teacher | KD loss first → last | train s |')
print('|---|---:|---:|---:|---|---:|')
print(('| teacher (float32) | 32 | %.2f | 1.00 | | |'):format(t_ppl))
print(('| LSQ init (steps 2·mean(abs W)/√Qp) | %.2f | %.2f | %.2f | | |'):format(bpw, a.ppl0, a.ppl0 / t_ppl))
print(('| LSQ + KD | %.2f | %.2f | %.2f | %.4f → %.4f | %.0f |'):format(
  bpw, a.ppl, a.ppl / t_ppl, a.kd0, a.kd, a.seconds))
print(('| LSQ + KD + local MLP loss (w=%g, hooks) | %.2f | %.2f | %.2f | %.4f → %.4f | %.0f |'):format(
  cfg.local_w, bpw, b.ppl, b.ppl / t_ppl, b.kd0, b.kd, b.seconds))
return {teacher = t_ppl, kd_only = a, with_local = b}
