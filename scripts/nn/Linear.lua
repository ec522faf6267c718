-- nn.Linear: y = x W^T + b as a Lua module, with PyTorch's initialisation (uniform in
-- ±1/sqrt(in_features)); usable as a projection of a model through model:set_linear.
local torch = require 'torch'
local F = require 'torch.nn.functional'
local Module = require 'nn.Module'

local Linear = Module:extend('nn.Linear')

-- Linear(in_features, out_features, {bias = true, dtype = default, device = default})
function Linear:__init(in_features, out_features, opts)
  opts = require('opts').check(opts, {bias = 'boolean', dtype = 'string', device = 'string'}, 'nn.Linear', 4)
  for i, v in ipairs({in_features, out_features}) do
    if type(v) ~= 'number' or v < 1 or v % 1 ~= 0 then
      error(('nn.Linear: argument #%d (%s): expected a positive integer, got %s'):format(i,
        i == 1 and 'in_features' or 'out_features', tostring(v)), 3)
    end
  end
  self.in_features, self.out_features = in_features, out_features
  local place = (opts.dtype or opts.device) and {dtype = opts.dtype, device = opts.device} or nil
  local function empty(sizes) return place and torch.empty(sizes, place) or torch.empty(sizes) end
  local bound = 1 / math.sqrt(in_features)
  self:register_parameter('weight', empty({out_features, in_features}):uniform_(-bound, bound))
  if opts.bias ~= false then
    self:register_parameter('bias', empty({out_features}):uniform_(-bound, bound))
  end
end

-- A Linear holding the given weight (out, in) and bias (out) or nil: the tensors themselves,
-- detached and made trainable (a copy of a model's projection: pass w:clone()).
function Linear.from_weight(weight, bias)
  if not torch.is_tensor(weight) or weight:dim() ~= 2 then
    error('nn.Linear.from_weight: argument #1 (weight): expected an (out, in) Tensor', 2)
  end
  local l = Linear(weight:size(2), weight:size(1), {bias = false})
  l:register_parameter('weight', weight:detach())
  if bias ~= nil then l:register_parameter('bias', bias:detach()) end
  return l
end

function Linear:forward(x)
  return F.linear(x, self.weight, self.bias)   -- (..., in) -> (..., out)
end

function Linear:extra_repr()
  return ('in_features=%d, out_features=%d, bias=%s'):format(self.in_features, self.out_features,
    tostring(self.bias ~= nil))
end

return Linear
