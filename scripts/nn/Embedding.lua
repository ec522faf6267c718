-- nn.Embedding: a table of num_embeddings vectors looked up by 0-based ids (data stays 0-based),
-- with PyTorch's N(0, 1) initialisation and padding_idx (a zero row that gets no gradient).
local torch = require 'torch'
local F = require 'torch.nn.functional'
local Module = require 'nn.Module'

local Embedding = Module:extend('nn.Embedding')

-- Embedding(num_embeddings, embedding_dim, {padding_idx = nil, dtype =, device =})
function Embedding:__init(num, dim, opts)
  opts = require('opts').check(opts, {padding_idx = 'integer', dtype = 'string', device = 'string'}, 'nn.Embedding', 4)
  for i, v in ipairs({num, dim}) do
    if type(v) ~= 'number' or v < 1 or v % 1 ~= 0 then
      error(('nn.Embedding: argument #%d: expected a positive integer, got %s'):format(i, tostring(v)), 3)
    end
  end
  self.num_embeddings, self.embedding_dim, self.padding_idx = num, dim, opts.padding_idx
  local w = (opts.dtype or opts.device) and torch.randn(num, dim, {dtype = opts.dtype, device = opts.device})
    or torch.randn(num, dim)
  if self.padding_idx ~= nil then
    if type(self.padding_idx) ~= 'number' or self.padding_idx < 0 or self.padding_idx >= num then
      error(('nn.Embedding: option padding_idx: expected an id in [0, %d), got %s'):format(num,
        tostring(self.padding_idx)), 3)
    end
    w[self.padding_idx + 1] = 0
  end
  self:register_parameter('weight', w)
end

function Embedding:forward(ids)
  if self.padding_idx == nil then return F.embedding(ids, self.weight) end   -- (...) -> (..., dim)
  return F.embedding(ids, self.weight, {padding_idx = self.padding_idx})
end

function Embedding:extra_repr()
  return ('%d, %d'):format(self.num_embeddings, self.embedding_dim)
end

return Embedding
