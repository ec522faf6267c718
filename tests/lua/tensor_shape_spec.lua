-- tensor_shape: views and shape ops, slicing reads and writes, storage sharing, 1-based and
-- negative dims, and the errors for dim 0 and out-of-range positions.
local torch = require 'torch'
local h = require 'helper'

local function shape(t)
  local s, r = t:size(), {}
  for i = 1, #s do r[i] = s[i] end
  return r
end

local function errmsg(f, ...)
  local ok, err = pcall(f, ...)
  assert.is_false(ok, 'expected an error')
  return tostring(err)
end

-- a 2x3x4 tensor holding 0..23
local function a234() return torch.arange(24):view(2, 3, 4) end

-- Python torch results for chains of shape ops, computed once (translated positions by hand).
local ref
local function pyref()
  if ref then return ref end
  local out = h.py([==[
import torch
def lua(v):
    if isinstance(v, dict): return '{' + ','.join('[%r]=%s' % (k, lua(x)) for k, x in v.items()) + '}'
    if isinstance(v, (list, tuple)): return '{' + ','.join(lua(x) for x in v) + '}'
    if isinstance(v, torch.Tensor): return lua(v.tolist())
    return repr(v)
a = torch.arange(24).view(2, 3, 4)
R = {}
R['chain'] = a.permute(2, 0, 1).reshape(4, 6).narrow(1, 1, 4).t().contiguous()
R['slice'] = a[:, 1:3, ::2]
R['adv'] = a[torch.tensor([1, 0, 1])]
R['mask'] = a[a % 5 == 0]
R['flip_roll'] = a.flip(2).roll(-1, 1)
R['tril'] = torch.arange(16).view(4, 4).tril(-1)
R['triu'] = torch.arange(16).view(4, 4).triu(1)
b = a.clone().float(); b[0, :, 1:3] = 7; b[1, 2] = -1; b[b > 20] = 0
R['writes'] = b
R['stack'] = torch.stack([a[0], a[1]], 2)
R['cat'] = torch.cat([a, a * 10], -1)[1, 2]
print('return ' + lua(R))
]==])
  ref = assert(loadstring(out))()
  return ref
end

describe('views and reshapes', function()
  it('view and reshape, with -1 inferred', function()
    local t = torch.arange(6)
    assert.are.same({{0, 1, 2}, {3, 4, 5}}, t:view(2, 3):totable())
    assert.are.same({3, 2}, shape(t:view({3, -1})))
    assert.are.same({{0, 1}, {2, 3}, {4, 5}}, t:reshape(-1, 2):totable())
    -- reshape copies when a view is impossible; view errors
    local nt = t:view(2, 3):t()
    assert.are.same({0, 3, 1, 4, 2, 5}, nt:reshape(6):totable())
    assert.matches('Tensor.view: view size is not compatible', errmsg(nt.view, nt, 6), 1, true)
    assert.matches("shape '[4]' is invalid for input of size 6", errmsg(t.view, t, 4), 1, true)
  end)

  it('permute and transpose take 1-based and negative dims', function()
    local a = a234()
    assert.are.same({4, 2, 3}, shape(a:permute(3, 1, 2)))
    assert.are.same({4, 2, 3}, shape(a:permute{3, 1, 2}))
    assert.are.same({4, 2, 3}, shape(a:permute(-1, -3, -2)))
    local p = a:permute(3, 1, 2)
    -- p[k][i][j] == a[i][j][k]
    assert.are.equal(a[2][3][4]:item(), p[4][2][3]:item())
    assert.are.equal(a[1][2][3]:item(), p[3][1][2]:item())
    assert.are.same({4, 3, 2}, shape(a:transpose(1, 3)))
    assert.are.same({2, 4, 3}, shape(a:transpose(-1, -2)))
    assert.are.equal(a[2][1][3]:item(), a:transpose(1, 3)[3][1][2]:item())
    assert.are.same({{1, 3}, {2, 4}}, torch.tensor{{1, 2}, {3, 4}}:t():totable())
    assert.are.same({3, 2}, shape(torch.zeros(2, 3).T))
    assert.are.same({2, 4, 3}, shape(torch.zeros(2, 3, 4).mT))
    assert.matches('expected 3 dims', errmsg(a.permute, a, 1, 2))
  end)

  it('squeeze and unsqueeze', function()
    local z = torch.zeros(1, 3, 1)
    assert.are.same({3}, shape(z:squeeze()))
    assert.are.same({3, 1}, shape(z:squeeze(1)))
    assert.are.same({1, 3}, shape(z:squeeze(-1)))
    assert.are.same({3}, shape(z:squeeze{1, 3}))
    assert.are.same({1, 3, 1}, shape(z:squeeze(2)))  -- not size 1: unchanged, as PyTorch
    local m = torch.zeros(2, 3)
    assert.are.same({1, 2, 3}, shape(m:unsqueeze(1)))
    assert.are.same({2, 1, 3}, shape(m:unsqueeze(2)))
    assert.are.same({2, 3, 1}, shape(m:unsqueeze(3)))
    assert.are.same({2, 3, 1}, shape(m:unsqueeze(-1)))
    assert.are.same({1, 2, 3}, shape(m:unsqueeze(-3)))
    assert.are.same({1}, shape(torch.tensor(5):unsqueeze(1)))
  end)

  it('flatten and unflatten', function()
    local a = a234()
    assert.are.same({24}, shape(a:flatten()))
    assert.are.same({2, 12}, shape(a:flatten(2)))
    assert.are.same({6, 4}, shape(a:flatten(1, 2)))
    assert.are.same({2, 12}, shape(a:flatten(-2, -1)))
    assert.are.same({1}, shape(torch.tensor(3):flatten()))
    assert.are.same({2, 3, 2, 2}, shape(a:unflatten(3, {2, 2})))
    assert.are.same({2, 3, 2, 2}, shape(a:unflatten(-1, {2, -1})))
  end)

  it('expand broadcasts size-1 dims without copying', function()
    local c = torch.tensor{1, 2, 3}:view(3, 1)
    local e = c:expand(3, 4)
    assert.are.same({{1, 1, 1, 1}, {2, 2, 2, 2}, {3, 3, 3, 3}}, e:totable())
    assert.are.equal(0, e:stride(2))
    assert.are.same({{1, 2, 3}, {1, 2, 3}}, torch.tensor{1, 2, 3}:expand(2, -1):totable())
    assert.are.same({2, 3}, shape(torch.tensor{1, 2, 3}:expand_as(torch.zeros(2, 3))))
    c[2][1] = 20  -- writes show through the expanded view
    assert.are.same({20, 20, 20, 20}, e[2]:totable())
    assert.matches('Tensor.expand:', errmsg(c.expand, torch.zeros(2, 3), 3, 3), 1, true)
  end)

  it('repeat tiles (called with brackets: repeat is a Lua keyword)', function()
    local t = torch.tensor{{1, 2}}
    assert.are.same({{1, 2, 1, 2}, {1, 2, 1, 2}}, t['repeat'](t, 2, 2):totable())
    assert.are.same({3, 2}, shape(torch['repeat'](t, {3, 1})))
  end)

  it('contiguous copies a strided view into row-major order', function()
    local t = torch.arange(6):view(2, 3):t()
    assert.is_false(t:is_contiguous())
    local c = t:contiguous()
    assert.is_true(c:is_contiguous())
    assert.are.same({{0, 3}, {1, 4}, {2, 5}}, c:totable())
    assert.are.same({2, 1}, {c:stride(1), c:stride(2)})
    local already = torch.zeros(3)
    assert.are.equal(already:contiguous():storage_offset(), 0)
  end)

  it('matches Python for a chain of shape ops and slices', function()
    local r = pyref()
    local a = a234()
    -- a.permute(2,0,1).reshape(4,6).narrow(1,1,4).t().contiguous()
    assert.are.same(r.chain, a:permute(3, 1, 2):reshape(4, 6):narrow(2, 2, 4):t():contiguous():totable())
    -- a[:, 1:3, ::2]
    assert.are.same(r.slice, a[{':', {2, 3}, {1, -1, 2}}]:totable())
    assert.are.same(r.flip_roll, a:flip(3):roll(-1, 2):totable())
    local s = torch.arange(16):view(4, 4)
    assert.are.same(r.tril, s:tril(-1):totable())
    assert.are.same(r.triu, s:triu(1):totable())
    assert.are.same(r.stack, torch.stack({a[1], a[2]}, 3):totable())
    assert.are.same(r.cat, torch.cat({a, a * 10}, -1)[2][3]:totable())
  end)
end)

describe('narrow, select, chunk, split, unbind', function()
  it('narrow takes a 1-based (or negative) start', function()
    local a = a234()
    assert.are.same({{1, 2}, {5, 6}, {9, 10}}, a:narrow(3, 2, 2)[1]:totable())
    assert.are.same({2, 1, 4}, shape(a:narrow(2, -1, 1)))
    assert.are.same({20, 21, 22, 23}, a:narrow(2, -1, 1)[2][1]:totable())
    assert.are.same({2, 3, 0}, shape(a:narrow(3, 5, 0)))
    assert.matches('Tensor.narrow: start 2 + length 2 exceeds dim 1 of size 2',
                   errmsg(a.narrow, a, 1, 2, 2), 1, true)
    assert.matches('Tensor.narrow: start 0 is out of range', errmsg(a.narrow, a, 1, 0, 1), 1, true)
  end)

  it('select removes a dim; 1-based and negative indices', function()
    local a = a234()
    assert.are.same({3, 4}, shape(a:select(1, 2)))
    assert.are.same({12, 13, 14, 15}, a:select(1, 2)[1]:totable())
    assert.are.same({3, 7, 11}, a:select(-1, -1)[1]:totable())
    assert.are.same({0, 4, 8}, a:select(3, 1)[1]:totable())
    assert.matches('Tensor.select: index 3 is out of range for dim 1 of size 2 (1-based)',
                   errmsg(a.select, a, 1, 3), 1, true)
    assert.matches('Tensor.select: index 0 is out of range', errmsg(a.select, a, 1, 0), 1, true)
  end)

  it('chunk and split', function()
    local function sizes(list)
      local r = {}
      for i, c in ipairs(list) do r[i] = c:numel() end
      return r
    end
    local t = torch.arange(7)
    assert.are.same({3, 3, 1}, sizes(t:chunk(3)))
    assert.are.same({3, 3, 1}, sizes(t:split(3)))
    assert.are.same({2, 5}, sizes(t:split({2, 5})))
    assert.are.same({2, 3, 4, 5, 6}, t:split({2, 5})[2]:totable())
    local m = torch.arange(12):view(3, 4)
    local cs = m:chunk(2, 2)
    assert.are.equal(2, #cs)
    assert.are.same({{0, 1}, {4, 5}, {8, 9}}, cs[1]:totable())
    assert.are.same({{2, 3}, {6, 7}, {10, 11}}, cs[2]:totable())
    local ss = m:split(1, -2)
    assert.are.equal(3, #ss)
    assert.are.same({{8, 9, 10, 11}}, ss[3]:totable())
    -- chunks are views
    cs[1][1][1] = 100
    assert.are.equal(100, m[1][1]:item())
    assert.matches('chunks must be at least 1', errmsg(t.chunk, t, 0))
    assert.matches('split_size must be at least 1', errmsg(t.split, t, 0))
    assert.is_false(pcall(t.split, t, {2, 2}))  -- sizes must add up to 7
  end)

  it('unbind returns the slices along a dim', function()
    local m = torch.arange(6):view(2, 3)
    local u = m:unbind(2)
    assert.are.equal(3, #u)
    assert.are.same({2, 5}, u[3]:totable())
    assert.are.same({3, 4, 5}, m:unbind()[2]:totable())
  end)
end)

describe('cat and stack', function()
  it('cat joins along an existing dim', function()
    local a, b = torch.ones(2, 2), torch.zeros(2, 1)
    assert.are.same({{1, 1, 0}, {1, 1, 0}}, torch.cat({a, b}, 2):totable())
    assert.are.same({{1, 1, 0}, {1, 1, 0}}, torch.cat({a, b}, -1):totable())
    assert.are.same({4, 2}, shape(torch.cat{a, a}))
    assert.are.same({0, 1, 2, 0, 1}, torch.cat{torch.arange(3), torch.arange(2)}:totable())
    assert.matches('torch.cat: Sizes of tensors must match', errmsg(torch.cat, {torch.zeros(2, 3), torch.zeros(3, 2)}), 1, true)
    assert.matches('non-empty', errmsg(torch.cat, {}), 1, true)
    assert.matches('torch.cat: tensors: entry 2 is number, expected a Tensor', errmsg(torch.cat, {a, 3}), 1, true)
  end)

  it('stack adds a new dim', function()
    local a, b = torch.tensor{1, 2}, torch.tensor{3, 4}
    assert.are.same({{1, 2}, {3, 4}}, torch.stack{a, b}:totable())
    assert.are.same({{1, 3}, {2, 4}}, torch.stack({a, b}, 2):totable())
    assert.are.same({{1, 3}, {2, 4}}, torch.stack({a, b}, -1):totable())
    assert.matches('torch.stack: stack expects each tensor to be equal size',
                   errmsg(torch.stack, {torch.zeros(2, 3), torch.zeros(3, 2)}), 1, true)
    assert.is_false(pcall(torch.stack, {a, b}, 4))
  end)
end)

describe('slicing', function()
  it('t[i] selects along dim 1, negative from the end', function()
    local a = a234()
    assert.are.same({3, 4}, shape(a[2]))
    assert.are.equal(23, a[2][3][4]:item())
    assert.are.equal(23, a[-1][-1][-1]:item())
    assert.are.equal(0, a[-2][-3][-4]:item())
    assert.are.equal(5, torch.arange(6)[-1]:item())
    assert.are.equal(0, torch.arange(6)[1]:dim())
  end)

  it('t[{...}] takes numbers, inclusive ranges, steps and ":"', function()
    local a = a234()
    assert.are.equal(6, a[{1, 2, 3}]:item())
    assert.are.same({{13, 14}, {17, 18}, {21, 22}}, a[{2, ':', {2, 3}}]:totable())
    assert.are.same({2, 4}, shape(a[{{1, 2}, 2}]))
    assert.are.same({2, 3, 2}, shape(a[{':', ':', {1, -1, 2}}]))
    assert.are.same({1, 3, 5}, torch.arange(6)[{{2, 6, 2}}]:totable())
    assert.are.same({4, 5}, torch.arange(6)[{{-2, -1}}]:totable())
    assert.are.same({{2, 5}}, torch.arange(6):view(2, 3)[{{1, -1}, -1}]:view(1, 2):totable())
    assert.are.same({0, 4}, shape(a[1][{{3, 2}}]))  -- an empty range
    assert.are.same(shape(a), shape(a[{}]))
    assert.are.same(shape(a), shape(a[{{}, {}}]))
  end)

  it('t[mask] and t[index_tensor] are PyTorch advanced indexing (index data 0-based)', function()
    local r = pyref()
    local a = a234()
    assert.are.same(r.adv, a[torch.tensor({1, 0, 1}, {dtype = 'int64'})]:totable())
    assert.are.same(r.mask, a[(a % 5):eq(0)]:totable())
    assert.are.same({5, 7}, torch.tensor{5, 6, 7}[torch.tensor{true, false, true}]:totable())
  end)

  it('writes through t[i], t[{...}], t[mask] and t[idx]', function()
    local r = pyref()
    local b = a234():float()
    b[{1, ':', {2, 3}}] = 7
    b[{2, 3}] = -1
    b[b:gt(20)] = 0
    assert.are.same(r.writes, b:totable())
    local t = torch.zeros(3, 4)
    t[2] = 5
    t[{3, {3, 4}}] = torch.tensor{7, 8}
    t[{':', 1}] = torch.tensor{1, 2, 3}
    assert.are.same({{1, 0, 0, 0}, {2, 5, 5, 5}, {3, 0, 7, 8}}, t:totable())
    t[torch.tensor({0, 2}, {dtype = 'int64'})] = 9
    assert.are.same({{9, 9, 9, 9}, {2, 5, 5, 5}, {9, 9, 9, 9}}, t:totable())
    t[torch.tensor({1}, {dtype = 'int64'})] = torch.tensor{{1, 2, 3, 4}}
    assert.are.same({1, 2, 3, 4}, t[2]:totable())
    local i = torch.zeros(3, {dtype = 'int64'})
    i[2] = 4
    assert.are.same({0, 4, 0}, i:totable())
    local bt = torch.zeros(3, {dtype = 'bool'})
    bt[3] = true
    assert.are.same({false, false, true}, bt:totable())
  end)

  it('rejects bad slices with clear errors', function()
    local a = a234()
    assert.matches('Tensor.__index: index 3 is out of range for dim 1 of size 2 (indices are 1-based)',
                   errmsg(function() return a[3] end), 1, true)
    assert.matches('index 0 is out of range', errmsg(function() return a[0] end), 1, true)
    assert.matches('too many indices (4) for a tensor of 3 dims', errmsg(function() return a[{1, 1, 1, 1}] end), 1, true)
    assert.matches('out of bounds', errmsg(function() return a[{{1, 5}}] end), 1, true)
    assert.matches('step must be positive', errmsg(function() return a[{{1, 2, 0}}] end), 1, true)
    assert.matches('expected an integer', errmsg(function() return a[1.5] end), 1, true)
    assert.matches('expected an integer', errmsg(function() return a[{{1, 'x'}}] end), 1, true)
    assert.matches('cannot index a 0-dim tensor', errmsg(function() return torch.tensor(1)[1] end), 1, true)
    assert.matches('Tensor.__newindex', errmsg(function() a[{1, 1, 9}] = 0 end), 1, true)
    assert.matches('expected a number or boolean, got nil', errmsg(function() a[1] = nil end), 1, true)
    assert.matches("cannot set field 'foo'", errmsg(function() a.foo = 1 end), 1, true)
  end)
end)

describe('views share storage', function()
  it('writing through a view changes the base, and the base changes the view', function()
    local base = torch.zeros(3, 4)
    local v = base:view(12)
    v[1] = 100
    assert.are.equal(100, base[1][1]:item())
    local row = base[2]
    row:fill_(3)
    assert.are.same({3, 3, 3, 3}, base[2]:totable())
    local col = base[{':', 4}]
    col:add_(1)
    assert.are.same({1, 4, 1}, base[{':', 4}]:totable())
    base:narrow(2, 2, 2):zero_()
    base[{{1, 1}, {2, 3}}]:fill_(-5)
    assert.are.same({100, -5, -5, 1}, base[1]:totable())
    local tr = base:t()
    tr[4][3] = 42
    assert.are.equal(42, base[3][4]:item())
    local sq = base:unsqueeze(1):permute(2, 3, 1):select(3, 1)
    sq[2][1] = -7
    assert.are.equal(-7, base[2][1]:item())
    local e = base:select(2, 1):expand(2, 3)
    assert.are.equal(-7, e[2][2]:item())
    base[2][1] = 8
    assert.are.equal(8, v[5]:item())
    assert.are.equal(8, e[1][2]:item())
  end)

  it('reshape of a contiguous tensor is a view; clone and contiguous of a view are copies', function()
    local base = torch.zeros(2, 3)
    base:reshape(6)[6] = 1
    assert.are.equal(1, base[2][3]:item())
    local c = base:clone()
    c[1][1] = 9
    assert.are.equal(0, base[1][1]:item())
    local tc = base:t():contiguous()
    tc[1][1] = 9
    assert.are.equal(0, base[1][1]:item())
    local data = base.data
    data[1][2] = 4
    assert.are.equal(4, base[1][2]:item())
  end)
end)

describe('dims are 1-based', function()
  it('dim 0 is an error that explains the convention', function()
    local a = a234()
    for _, call in ipairs{
      function() return a:sum(0) end, function() return a:transpose(0, 1) end,
      function() return a:narrow(0, 1, 1) end, function() return a:select(0, 1) end,
      function() return a:squeeze(0) end,
      function() return a:flatten(0) end, function() return a:permute(0, 1, 2) end,
      function() return torch.cat({a, a}, 0) end, function() return a:softmax(0) end,
      function() return a:size(0) end, function() return a:chunk(2, 0) end,
    } do
      assert.matches('dim 0 is invalid: dims are 1-based in qatlab (1..3, or -1 for the last)',
                     errmsg(call), 1, true)
    end
    -- unsqueeze inserts a dim, so a 3-dim tensor takes 1..4
    assert.matches('Tensor.unsqueeze: dim 0 is invalid: dims are 1-based in qatlab (1..4, or -1 for the last)',
                   errmsg(a.unsqueeze, a, 0), 1, true)
  end)

  it('out-of-range dims name the valid range', function()
    local a = a234()
    assert.matches("bad argument #2 to 'Tensor.sum' (dim: dim 4 out of range for a tensor of 3 dims (expected 1..3 or -3..-1)",
                   errmsg(a.sum, a, 4), 1, true)
    assert.matches('dim -4 out of range', errmsg(a.transpose, a, 1, -4), 1, true)
    assert.matches("bad argument #2 to 'Tensor.squeeze' (dim: dim 3 out of range for a tensor of 2 dims",   -- a tail call: self counted
                   errmsg(function() return torch.zeros(2, 3):squeeze(3) end), 1, true)
    assert.matches('Tensor.unsqueeze: dim 4 out of range to unsqueeze a tensor of 2 dims (expected 1..3 or -3..-1)',
                   errmsg(function() return torch.zeros(2, 3):unsqueeze(4) end), 1, true)
    assert.matches('torch.stack', errmsg(torch.stack, {a, a}, 5), 1, true)
  end)

  it('negative dims count from the end', function()
    local a = a234()
    h.close(a:sum(-1), a:sum(3))
    h.close(a:sum(-3), a:sum(1))
    assert.are.same(shape(a:transpose(-3, -1)), shape(a:transpose(1, 3)))
  end)
end)
