-- smoke: the host runs busted and the torch module loads; a first end-to-end check.
local torch = require 'torch'
local h = require 'helper'

describe('torch module', function()
  it('adds tensors', function()
    h.close(torch.tensor{1, 2} + torch.tensor{3, 4}, {4, 6})
  end)
  it('adds no globals', function()
    assert.is_nil(rawget(_G, 'torch'))
  end)
end)
