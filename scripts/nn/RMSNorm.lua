-- nn.RMSNorm: x / sqrt(mean(x^2) + eps) * weight over the last dim, normalized in float32 and
-- cast back as Hugging Face's Llama/Qwen RMSNorm does.
local torch = require 'torch'
local Module = require 'nn.Module'

local RMSNorm = Module:extend('nn.RMSNorm')

-- RMSNorm(dim, {eps = 1e-6, elementwise_affine = true, dtype =, device =})
function RMSNorm:__init(dim, opts)
  opts = require('opts').check(opts, {eps = 'number', elementwise_affine = 'boolean', dtype = 'string',
                                      device = 'string'}, 'nn.RMSNorm', 4)
  if type(dim) ~= 'number' or dim < 1 or dim % 1 ~= 0 then
    error(('nn.RMSNorm: argument #1 (dim): expected a positive integer, got %s'):format(tostring(dim)), 3)
  end
  self.dim, self.eps = dim, opts.eps or 1e-6
  if opts.elementwise_affine ~= false then
    self:register_parameter('weight', (opts.dtype or opts.device)
      and torch.ones(dim, {dtype = opts.dtype, device = opts.device}) or torch.ones(dim))
  end
end

function RMSNorm:forward(x)
  local xf = x:float()
  local y = (xf * (xf:square():mean(-1, {keepdim = true}) + self.eps):rsqrt()):to(x.dtype)
  if self.weight ~= nil then y = y * self.weight end
  return y
end

function RMSNorm:extra_repr() return ('%d, eps=%g'):format(self.dim, self.eps) end

return RMSNorm
