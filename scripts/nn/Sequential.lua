-- nn.Sequential: modules applied one after the other, named "1", "2", ... as Torch7 numbered
-- them (PyTorch numbers from 0; Lua's arrays from 1).
local Module = require 'nn.Module'

local Sequential = Module:extend('nn.Sequential')

function Sequential:__init(...)
  for i, m in ipairs({...}) do self:add_module(tostring(i), m) end
end

-- add(m): appends a module; returns self for chaining.
function Sequential:add(m)
  self:add_module(tostring(#self._modules + 1), m)
  return self
end

function Sequential:forward(x)
  for _, n in ipairs(self._modules) do x = self[n]:forward(x) end
  return x
end

return Sequential
