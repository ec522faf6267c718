-- nn.LoRA: a low-rank adapter around a frozen base layer, y = base(x) + (alpha / r) · x Aᵀ Bᵀ,
-- with A ~ U(±1/sqrt(in)) and B = 0 so training starts from the base layer's output.
local torch = require 'torch'
local Module = require 'nn.Module'

local LoRA = Module:extend('nn.LoRA')

-- LoRA(base, {rank = 8, alpha = rank, dropout = 0, freeze_base = true}). base: any module with
-- forward(x), in_features and out_features (an nn.Linear, or a model projection wrapped in one).
function LoRA:__init(base, opts)
  opts = require('opts').check(opts, {rank = 'integer', alpha = 'number', dropout = 'number', freeze_base = 'boolean'},
                                'nn.LoRA', 4)
  if type(base) ~= 'table' or type(base.forward) ~= 'function' or not base.in_features or not base.out_features then
    error('nn.LoRA: argument #1 (base): expected a module with forward, in_features and out_features', 3)
  end
  local r = opts.rank or 8
  if type(r) ~= 'number' or r < 1 or r % 1 ~= 0 or r > math.min(base.in_features, base.out_features) then
    error(('nn.LoRA: option rank: expected an integer in [1, %d], got %s'):format(
      math.min(base.in_features, base.out_features), tostring(r)), 3)
  end
  local p = opts.dropout or 0
  if type(p) ~= 'number' or p < 0 or p >= 1 then
    error(('nn.LoRA: option dropout: expected a number in [0, 1), got %s'):format(tostring(p)), 3)
  end
  self.in_features, self.out_features = base.in_features, base.out_features
  self.rank, self.alpha, self.dropout = r, opts.alpha or r, p
  self.scaling = self.alpha / r
  self:add_module('base', base)
  if opts.freeze_base ~= false then
    for _, t in ipairs(base:parameters()) do t:requires_grad_(false) end
  end
  local w = base:parameters()[1]
  local place = w and {dtype = w.dtype, device = w.device} or {dtype = torch.get_default_dtype()}
  local bound = 1 / math.sqrt(self.in_features)
  self:register_parameter('lora_A', torch.empty(r, self.in_features, place):uniform_(-bound, bound))
  self:register_parameter('lora_B', torch.zeros(self.out_features, r, place))
end

function LoRA:forward(x)
  local h = x
  if self.dropout > 0 and self.training then
    h = x * torch.empty_like(x):bernoulli_(1 - self.dropout) / (1 - self.dropout)
  end
  -- (..., in) @ (in, r) @ (r, out)
  return self.base:forward(x) + h:matmul(self.lora_A:t()):matmul(self.lora_B:t()) * self.scaling
end

-- The dense weight this layer computes with: W + scaling · B A (needs a base with a weight).
function LoRA:weight()
  local w = type(self.base.weight) == 'function' and self.base:weight() or self.base.weight
  if not torch.is_tensor(w) then error('nn.LoRA:weight: the base layer has no weight', 2) end
  return w:detach() + self.lora_B:detach():matmul(self.lora_A:detach()) * self.scaling
end

-- Folds the adapter into a base with a dense weight and resets B to zero.
function LoRA:merge_()
  torch.no_grad(function()
    self.base.weight:copy_(self:weight())
    self.lora_B:zero_()
  end)
  return self
end

function LoRA:extra_repr()
  return ('rank=%d, alpha=%g, dropout=%g'):format(self.rank, self.alpha, self.dropout)
end

return LoRA
