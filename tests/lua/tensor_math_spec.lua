-- tensor_math: operators with numbers on either side, type promotion, elementwise math,
-- comparisons, reductions, sorting, indexing ops, products, linalg and in-place twins; most
-- results are cross-checked against Python torch (one batched call for the whole file).
local torch = require 'torch'
local h = require 'helper'

local function errmsg(f, ...)
  local ok, err = pcall(f, ...)
  assert.is_false(ok, 'expected an error')
  return tostring(err)
end

local function i64(t) return torch.tensor(t, {dtype = 'int64'}) end
local function f64(t) return torch.tensor(t, {dtype = 'float64'}) end

-- Inputs, defined identically in Lua and in the Python prelude below.
local X = f64{{0.5, -1.25, 2.0, 0.0}, {3.5, -0.75, 0.1, -2.5}, {1.5, 2.25, -3.0, 0.7}}
local P = X:abs() + 0.1
local B = f64{{{1, 2}, {3, 4}}, {{0.5, -1}, {2, 0.25}}}
local GI = i64{{0, 2}, {1, 0}, {3, 1}}        -- gather/scatter indices along dim 2 (0-based data)
local GD = i64{{0, 0}, {1, 1}, {3, 3}}        -- with duplicates, for scatter_add
local SRC = f64{{10, 20}, {30, 40}, {50, 60}}

local PRELUDE = [==[
import torch
d = torch.float64
X = torch.tensor([[0.5, -1.25, 2.0, 0.0], [3.5, -0.75, 0.1, -2.5], [1.5, 2.25, -3.0, 0.7]], dtype=d)
P = X.abs() + 0.1
B = torch.tensor([[[1, 2], [3, 4]], [[0.5, -1], [2, 0.25]]], dtype=d)
GI = torch.tensor([[0, 2], [1, 0], [3, 1]])
GD = torch.tensor([[0, 0], [1, 1], [3, 3]])
SRC = torch.tensor([[10, 20], [30, 40], [50, 60]], dtype=d)
inf = float('inf')
]==]

-- {name, Lua function (may return several results), Python expression}
local cases = {
  -- unary
  {'neg', function() return X:neg() end, 'X.neg()'},
  {'abs', function() return X:abs() end, 'X.abs()'},
  {'exp', function() return X:exp() end, 'X.exp()'},
  {'log', function() return P:log() end, 'P.log()'},
  {'log2', function() return P:log2() end, 'P.log2()'},
  {'log1p', function() return P:log1p() end, 'P.log1p()'},
  {'expm1', function() return X:expm1() end, 'X.expm1()'},
  {'exp2', function() return X:exp2() end, 'X.exp2()'},
  {'sqrt', function() return P:sqrt() end, 'P.sqrt()'},
  {'rsqrt', function() return P:rsqrt() end, 'P.rsqrt()'},
  {'reciprocal', function() return P:reciprocal() end, 'P.reciprocal()'},
  {'square', function() return X:square() end, 'X.square()'},
  {'sin', function() return X:sin() end, 'X.sin()'},
  {'cos', function() return X:cos() end, 'X.cos()'},
  {'tan', function() return (X * 0.3):tan() end, '(X * 0.3).tan()'},
  {'atan', function() return X:atan() end, 'X.atan()'},
  {'tanh', function() return X:tanh() end, 'X.tanh()'},
  {'sigmoid', function() return X:sigmoid() end, 'X.sigmoid()'},
  {'relu', function() return X:relu() end, 'X.relu()'},
  {'silu', function() return X:silu() end, 'torch.nn.functional.silu(X)'},
  {'gelu', function() return X:gelu() end, 'torch.nn.functional.gelu(X)'},
  {'gelu_tanh', function() return X:gelu{approximate = 'tanh'} end, "torch.nn.functional.gelu(X, approximate='tanh')"},
  {'erf', function() return X:erf() end, 'X.erf()'},
  {'sign', function() return X:sign() end, 'X.sign()'},
  {'floor', function() return X:floor() end, 'X.floor()'},
  {'ceil', function() return X:ceil() end, 'X.ceil()'},
  {'trunc', function() return X:trunc() end, 'X.trunc()'},
  {'frac', function() return X:frac() end, 'X.frac()'},
  {'round', function() return X:round() end, 'X.round()'},
  {'round2', function() return (X * 1.2345):round(2) end, '(X * 1.2345).round(decimals=2)'},
  {'nan_to_num', function() return (X / 0):nan_to_num(0, 100, -100) end, '(X / 0).nan_to_num(0.0, 100.0, -100.0)'},
  {'div_zero', function() return X / 0 end, 'X / 0'},
  -- binary, numbers on either side
  {'add', function() return X + P end, 'X + P'},
  {'add_alpha', function() return X:add(P, {alpha = 2}) end, 'X.add(P, alpha=2)'},
  {'sub_alpha', function() return torch.sub(X, P, 0.5) end, 'torch.sub(X, P, alpha=0.5)'},
  {'rsub', function() return 2.5 - X end, '2.5 - X'},
  {'mul', function() return X * P end, 'X * P'},
  {'rdiv', function() return 3 / P end, '3 / P'},
  {'div', function() return X / P end, 'X / P'},
  {'div_floor', function() return X:div(0.7, {rounding_mode = 'floor'}) end, "X.div(0.7, rounding_mode='floor')"},
  {'div_trunc', function() return X:div(0.7, {rounding_mode = 'trunc'}) end, "X.div(0.7, rounding_mode='trunc')"},
  {'pow', function() return X ^ 3 end, 'X ** 3'},
  {'rpow', function() return 2 ^ X end, '2 ** X'},
  {'powt', function() return P ^ X end, 'P ** X'},
  {'mod', function() return X % 1.5 end, 'X % 1.5'},
  {'rmod', function() return 7 % P end, '7 % P'},
  {'negmod', function() return -X % 0.8 end, '-X % 0.8'},
  {'fmod', function() return X:fmod(0.8) end, 'X.fmod(0.8)'},
  {'atan2', function() return X:atan2(P) end, 'X.atan2(P)'},
  {'maximum', function() return X:maximum(P * 0.5) end, 'torch.maximum(X, P * 0.5)'},
  {'minimum', function() return torch.minimum(X, 0) end, 'torch.minimum(X, torch.tensor(0.))'},
  {'max2', function() return torch.max(X, -X) end, 'torch.max(X, -X)'},
  {'lerp', function() return X:lerp(P, 0.3) end, 'X.lerp(P, 0.3)'},
  {'lerp_t', function() return X:lerp(P, P * 0.1) end, 'X.lerp(P, P * 0.1)'},
  {'clamp', function() return X:clamp(-1, 1) end, 'X.clamp(-1, 1)'},
  {'clamp_min', function() return X:clamp{min = 0.2} end, 'X.clamp(min=0.2)'},
  {'clamp_max', function() return X:clip{max = -0.5} end, 'X.clip(max=-0.5)'},
  {'bcast', function() return X + f64{1, 2, 3, 4} * f64{{1}, {10}, {100}} end,
    'X + torch.tensor([1., 2, 3, 4], dtype=d) * torch.tensor([[1.], [10], [100]], dtype=d)'},
  -- comparisons
  {'gt', function() return X:gt(0) end, 'X > 0'},
  {'le', function() return X:le(P - 1) end, 'X <= P - 1'},
  {'eq', function() return X:eq(0) end, 'X == 0'},
  {'ne', function() return X:ne(X:round()) end, 'X != X.round()'},
  {'lt', function() return torch.lt(X, -1) end, 'X < -1'},
  {'ge', function() return X:ge(P) end, 'X >= P'},
  {'land', function() return X:gt(0):logical_and(X:lt(2)) end, '(X > 0).logical_and(X < 2)'},
  {'lor', function() return X:gt(1):logical_or(X:lt(-1)) end, '(X > 1) | (X < -1)'},
  {'lxor', function() return X:gt(0):logical_xor(X:gt(1)) end, '(X > 0) ^ (X > 1)'},
  {'lnot', function() return X:gt(0):logical_not() end, '~(X > 0)'},
  {'any_all', function() return X:gt(3):any(), X:gt(-5):all(), X:gt(0):any(2), X:gt(-3):all(1) end,
    '(X > 3).any(), (X > -5).all(), (X > 0).any(1), (X > -3).all(0)'},
  -- reductions
  {'sum', function() return X:sum(), X:sum(1), X:sum(2, {keepdim = true}), X:sum{dim = {1, 2}} end,
    'X.sum(), X.sum(0), X.sum(1, keepdim=True), X.sum((0, 1))'},
  {'mean', function() return X:mean(), X:mean(1), X:mean(-1, {keepdim = true}) end, 'X.mean(), X.mean(0), X.mean(-1, keepdim=True)'},
  {'prod', function() return P:prod(), P:prod(2), P:prod(1, {keepdim = true}) end, 'P.prod(), P.prod(1), P.prod(0, keepdim=True)'},
  {'var', function() return X:var(), X:var(2), X:var(1, {unbiased = false}), X:var(2, true, {correction = 0}) end,
    'X.var(), X.var(1), X.var(0, unbiased=False), X.var(1, keepdim=True, correction=0)'},
  {'std', function() return X:std(), X:std(1), X:std(2, {keepdim = true, unbiased = false}) end,
    'X.std(), X.std(0), X.std(1, keepdim=True, unbiased=False)'},
  {'logsumexp', function() return X:logsumexp(), X:logsumexp(2), X:logsumexp(1, {keepdim = true}) end,
    'X.logsumexp((0, 1)), X.logsumexp(1), X.logsumexp(0, keepdim=True)'},
  {'amax', function() return X:amax(), X:amax(2), X:amin(1), X:amin{1, 2} end, 'X.amax(), X.amax(1), X.amin(0), X.amin((0, 1))'},
  {'norm', function() return X:norm(), X:norm(1), X:norm(3, 2), X:norm('inf'), X:norm(2, 1, {keepdim = true}), X:norm('fro') end,
    "X.norm(), X.norm(1), X.norm(3, 1), X.norm(inf), X.norm(2, 0, keepdim=True), X.norm('fro')"},
  {'max', function() return X:max(), X:min() end, 'X.max(), X.min()'},
  {'max_dim', function() return X:max(2) end, 'X.max(1)'},
  {'min_dim', function() return X:min(1, {keepdim = true}) end, 'X.min(0, keepdim=True)'},
  {'max_neg', function() return X:max(-2) end, 'X.max(-2)'},
  {'argmax', function() return X:argmax(), X:argmax(2), X:argmin(1), X:argmin(1, {keepdim = true}) end,
    'X.argmax(), X.argmax(1), X.argmin(0), X.argmin(0, keepdim=True)'},
  -- sorting and scans
  {'topk', function() return X:topk(2) end, 'X.topk(2)'},
  {'topk_dim', function() return X:topk(2, 1, false) end, 'X.topk(2, 0, largest=False)'},
  {'sort', function() return X:sort() end, 'X.sort()'},
  {'sort_desc', function() return X:sort(1, true) end, 'X.sort(0, descending=True)'},
  {'argsort', function() return X:argsort(2, true) end, 'X.argsort(1, descending=True)'},
  {'cumsum', function() return X:cumsum(2), X:cumsum(1) end, 'X.cumsum(1), X.cumsum(0)'},
  {'cumprod', function() return X:cumprod(2) end, 'X.cumprod(1)'},
  {'softmax', function() return X:softmax(2), X:softmax(1), X:softmax(-1) end, 'X.softmax(1), X.softmax(0), X.softmax(-1)'},
  {'log_softmax', function() return X:log_softmax(2), torch.log_softmax(X, 1) end, 'X.log_softmax(1), X.log_softmax(0)'},
  -- indexing
  {'where', function() return torch.where(X:gt(0), X, P), torch.where(X:gt(0), X, 0), X:where(X:lt(1), -1) end,
    'torch.where(X > 0, X, P), torch.where(X > 0, X, 0.), X.where(X < 1, -1.)'},
  {'masked_fill', function() return X:masked_fill(X:lt(0), -9) end, 'X.masked_fill(X < 0, -9)'},
  {'masked_select', function() return X:masked_select(X:gt(0.6)) end, 'X.masked_select(X > 0.6)'},
  {'index_select', function() return X:index_select(1, i64{2, 0, 2}), X:index_select(2, i64{3, 1}) end,
    'X.index_select(0, torch.tensor([2, 0, 2])), X.index_select(1, torch.tensor([3, 1]))'},
  {'gather', function() return X:gather(2, GI) end, 'X.gather(1, GI)'},
  {'gather1', function() return X:gather(1, i64{{2, 0, 1, 1}}) end, 'X.gather(0, torch.tensor([[2, 0, 1, 1]]))'},
  {'scatter', function() return torch.zeros(3, 4, {dtype = 'float64'}):scatter(2, GI, SRC) end,
    'torch.zeros(3, 4, dtype=d).scatter(1, GI, SRC)'},
  {'scatter_value', function() return X:scatter(2, GI, 7.5) end, 'X.scatter(1, GI, 7.5)'},
  {'scatter_add', function() return X:scatter_add(2, GD, SRC) end, 'X.scatter_add(1, GD, SRC)'},
  {'scatter_reduce', function() return X:scatter(2, GD, SRC, {reduce = 'add'}) end, "X.scatter(1, GD, SRC, reduce='add')"},
  {'nonzero', function() return X:nonzero() end, 'X.nonzero()'},
  {'nonzero_tuple', function() return unpack(X:nonzero{as_tuple = true}) end, 'X.nonzero(as_tuple=True)'},
  -- products
  {'matmul', function() return X:matmul(P:t()) end, 'X @ P.t()'},
  {'matvec', function() return X:matmul(f64{1, -1, 2, 0.5}) end, 'X @ torch.tensor([1, -1, 2, 0.5], dtype=d)'},
  {'bmatmul', function() return B:matmul(B) end, 'B @ B'},
  {'bmm', function() return B:bmm(B:transpose(2, 3)) end, 'B.bmm(B.transpose(1, 2))'},
  {'mm', function() return torch.mm(X:t(), P) end, 'X.t().mm(P)'},
  {'einsum', function() return torch.einsum('ij,kj->ik', X, P), torch.einsum('bij,bjk->bik', {B, B}), torch.einsum('ii', B[1]) end,
    "torch.einsum('ij,kj->ik', X, P), torch.einsum('bij,bjk->bik', B, B), torch.einsum('ii', B[0])"},
  {'outer', function() return torch.outer(X[1], P[2]) end, 'torch.outer(X[0], P[1])'},
  {'dot', function() return X[1]:dot(P[3]) end, 'X[0].dot(P[2])'},
  -- linalg
  {'svdvals', function() local _, S = torch.linalg.svd(X); return S end, 'torch.linalg.svd(X)[1]'},
  {'lnorm', function()
    return torch.linalg.norm(X), torch.linalg.norm(X, 'fro'), torch.linalg.norm(X, 'nuc'), torch.linalg.norm(X, 1),
      torch.linalg.norm(X, 'inf'), torch.linalg.norm(X[2], 3), torch.linalg.norm(X, nil, 2), torch.linalg.norm(X, 2, 1, true)
  end, "torch.linalg.norm(X), torch.linalg.norm(X, 'fro'), torch.linalg.norm(X, 'nuc'), torch.linalg.norm(X, 1), " ..
       "torch.linalg.norm(X, inf), torch.linalg.norm(X[1], 3), torch.linalg.norm(X, dim=1), torch.linalg.norm(X, 2, 0, True)"},
}

local ref
local function pyref()
  ref = ref or h.pycases(PRELUDE, cases)
  return ref
end
local agree, to_lua = h.agree, h.to_lua

describe('results agree with Python torch (float64)', function()
  it('for every case of the table', function()
    local r = pyref()
    local checked = 0
    for _, c in ipairs(cases) do
      local res = {c[2]()}
      local got = #res == 1 and to_lua(res[1]) or to_lua(res)
      local want = r[c[1]]
      assert(want ~= nil, 'no Python result for ' .. c[1])
      agree(got, want, c[1], 1e-12)
      checked = checked + 1
    end
    assert.are.equal(#cases, checked)
  end)

  it('returns indices as 0-based int64 data', function()
    local v, i = X:max(2)
    assert.are.equal('int64', i.dtype)
    assert.are.same({2, 0, 1}, i:totable())
    assert.are.same({2.0, 3.5, 2.25}, v:totable())
    local tv, ti = torch.tensor{10, 30, 20}:topk(1)
    assert.are.same({30}, tv:totable())
    assert.are.same({1}, ti:totable())
    local _, si = torch.tensor{3, 1, 2}:sort()
    assert.are.same({1, 2, 0}, si:totable())
    assert.are.equal(1, torch.tensor{3, 9, 2}:argmax():item())
    -- the indices feed back into gather/index_select unchanged
    assert.are.same({30}, torch.tensor{10, 30, 20}:index_select(1, ti):totable())
    local m = torch.tensor{{1, 5, 3}, {4, 2, 6}}
    local mv, mi = m:max(2, {keepdim = true})
    assert.are.same({{5}, {6}}, mv:totable())
    assert.are.same(mv:totable(), m:gather(2, mi):totable())
  end)
end)

describe('operators', function()
  it('+ - * / ^ % and unary minus with a number on either side', function()
    local a = torch.tensor{1, 2, 4}
    assert.are.same({3, 4, 6}, (a + 2):totable())
    assert.are.same({3, 4, 6}, (2 + a):totable())
    assert.are.same({-1, 0, 2}, (a - 2):totable())
    assert.are.same({1, 0, -2}, (2 - a):totable())
    assert.are.same({3, 6, 12}, (a * 3):totable())
    assert.are.same({3, 6, 12}, (3 * a):totable())
    assert.are.same({0.5, 1, 2}, (a / 2):totable())
    assert.are.same({4, 2, 1}, (4 / a):totable())
    assert.are.same({1, 4, 16}, (a ^ 2):totable())
    assert.are.same({2, 4, 16}, (2 ^ a):totable())
    assert.are.same({1, 0, 0}, (a % 2):totable())
    assert.are.same({0, 1, 3}, (7 % a):totable())
    assert.are.same({-1, -2, -4}, (-a):totable())
    assert.are.same({2, 4, 8}, (a + a):totable())
    assert.are.same({1, 1, 1}, (a / a):totable())
    -- % is Python's remainder (sign of the divisor), not C's fmod
    assert.are.same({2}, (torch.tensor{-7} % 3):totable())
    assert.are.same({-2}, (torch.tensor{7} % -3):totable())
    assert.are.same({-1}, torch.tensor{-7}:fmod(3):totable())
    -- broadcasting
    assert.are.same({{11, 12}, {21, 22}}, (torch.tensor{{10}, {20}} + torch.tensor{1, 2}):totable())
  end)

  it('follows PyTorch type promotion', function()
    local i = i64{1, 2}
    assert.are.equal('float32', (i + 2.5).dtype)
    assert.are.same({3.5, 4.5}, (i + 2.5):totable())
    assert.are.equal('int64', (i + 2).dtype)
    assert.are.equal('int64', (2 * i).dtype)
    assert.are.equal('float32', (i / 2).dtype)     -- true division
    assert.are.same({0, 1}, i:div(2, {rounding_mode = 'floor'}):totable())
    assert.are.equal('int64', i:div(2, {rounding_mode = 'floor'}).dtype)
    assert.are.same({-4}, i64{-7}:div(2, {rounding_mode = 'floor'}):totable())
    assert.are.same({-3}, i64{-7}:div(2, {rounding_mode = 'trunc'}):totable())
    assert.are.equal('int64', (i ^ 2).dtype)
    assert.are.equal('float32', (i ^ 0.5).dtype)
    local hf = torch.ones(2):half()
    assert.are.equal('float16', (hf * 2).dtype)
    assert.are.equal('float16', (hf * 2.5).dtype)
    assert.are.equal('float16', (2.5 - hf).dtype)
    assert.are.equal('bfloat16', (torch.ones(2):bfloat16() + 1).dtype)
    assert.are.equal('float32', (i + torch.ones(2)).dtype)
    assert.are.equal('float64', (hf + f64{1, 1}).dtype)
    assert.are.equal('float32', (hf + torch.ones(2)).dtype)
    -- a 0-dim tensor does not promote a dimensioned tensor of the same category
    assert.are.equal('float16', (hf + torch.tensor(2.5, {dtype = 'float64'})).dtype)
    assert.are.equal('float64', (i + torch.tensor(2.5, {dtype = 'float64'})).dtype)
    assert.are.equal('int64', (torch.ones(2, {dtype = 'int32'}) + i).dtype)
    assert.are.equal('int32', (torch.ones(2, {dtype = 'int32'}) + 5).dtype)
    assert.are.equal('int64', (torch.tensor{true, false} + 1).dtype)
    assert.are.equal('float32', (torch.tensor{true} * 1.5).dtype)
    assert.are.equal('uint8', (torch.ones(2, {dtype = 'uint8'}) * 3).dtype)
    assert.are.equal('float32', torch.where(torch.tensor{true, false}, 1.5, 0).dtype)
    assert.are.equal('int64', torch.where(torch.tensor{true, false}, 1, 0).dtype)
  end)

  it('comparisons give bool tensors', function()
    local a = torch.tensor{1, 2, 3}
    local g = a:gt(2)
    assert.are.equal('bool', g.dtype)
    assert.are.same({false, false, true}, g:totable())
    assert.are.same({true, false, true}, a:eq(torch.tensor{1, 0, 3}):totable())
    assert.are.same({true, true, false}, a:le(2):totable())
    assert.are.same({true, false, false}, torch.lt(a, 2):totable())
    assert.are.same({false, true, true}, a:ge(i64{2, 2, 2}):totable())
    assert.are.same({true, false, true}, a:ne(2):totable())
    -- == on tensors is identity (Lua's __eq must return a boolean)
    assert.is_true(a == a)
    assert.is_false(a == torch.tensor{1, 2, 3})
    assert.is_true(a:equal(torch.tensor{1, 2, 3}))
    assert.is_false(a:equal(torch.tensor{1, 2, 4}))
    assert.is_true(a:allclose(a + 1e-9))
    assert.are.same({true, false}, torch.tensor{1, 2}:isclose(torch.tensor{1, 2.1}):totable())
  end)

  it('a number operand computes as a 0-dim tensor of the same dtype would, and autograd keeps each one', function()
    local a = torch.tensor({0.1, 1e-3, -7, 3.4e38})
    for _, v in ipairs({0.1, 2, -3.5, 1e-310, 16777217}) do
      local t = torch.tensor(v)                      -- float32, like a
      assert.is_true((a * v):equal(a * t), 'mul ' .. v)
      assert.is_true((a + v):equal(a + t), 'add ' .. v)
      assert.is_true((a - v):equal(a - t), 'sub ' .. v)
      assert.is_true((v / a):equal(t / a), 'div ' .. v)
    end
    -- -0.0 is a float, as in Python: a * -0.0 keeps the sign of zero (1 / -0 = -inf)
    assert.same({-math.huge, math.huge}, (1 / (torch.tensor({1, -1}) * -0.0)):totable())
    assert.same({-math.huge}, (1 / (torch.tensor({1}, {dtype = 'float64'}) * -0.0)):totable())
    assert.equal('float32', (a * 2.0).dtype)
    assert.equal('float64', (a:double() * 0.1).dtype)
    -- the reused wrapped scalar must not leak between saved operands: d/dx of 3x + 5x + x/7
    local x = torch.tensor({1.5, -2, 3}, {requires_grad = true})
    local y = ((x * 3 + x * 5 + x / 7) * x):sum()   -- dy/dx = 2 x (8 + 1/7)
    y:backward()
    local want = 2 * (8 + 1 / 7)
    for i, g in ipairs(x.grad:totable()) do
      local xi = ({1.5, -2, 3})[i]
      assert.is_true(math.abs(g - want * xi) < 1e-4, ('grad %d: %g vs %g'):format(i, g, want * xi))
    end
  end)
end)

describe('reductions', function()
  local m = torch.tensor{{1, 5, 3}, {4, 2, 6}}
  it('sum/mean/prod with dims, keepdim and dtype', function()
    assert.are.equal(21, m:sum():item())
    assert.are.same({5, 7, 9}, m:sum(1):totable())
    assert.are.same({{9}, {12}}, m:sum(2, {keepdim = true}):totable())
    assert.are.same({{9}, {12}}, m:sum{dim = -1, keepdim = true}:totable())
    assert.are.same({9, 12}, torch.sum(m, 2):totable())
    assert.are.equal(21, m:sum{dim = {1, 2}}:item())
    assert.are.equal('float64', m:sum(1, {dtype = 'float64'}).dtype)
    assert.are.equal('int64', i64{1, 2}:sum().dtype)    -- integer sums widen to int64
    assert.are.equal(3, i64{1, 2}:sum():item())
    assert.are.same({3, 4}, m:mean(2):totable())
    assert.are.equal(3.5, m:mean():item())
    assert.are.same({15, 48}, m:prod(2):totable())
    assert.are.equal(720, m:prod():item())
    assert.matches('Tensor.mean: mean needs a floating-point tensor', errmsg(i64{1, 2}.mean, i64{1, 2}), 1, true)
    assert.are.equal(1.5, i64{1, 2}:mean{dtype = 'float64'}:item())
  end)

  it('max/min/argmax/argmin, with and without a dim', function()
    assert.are.equal(6, m:max():item())
    assert.are.equal(1, m:min():item())
    local v, i = m:max(2)
    assert.are.same({5, 6}, v:totable())
    assert.are.same({1, 2}, i:totable())
    local v1, i1 = m:min(1)
    assert.are.same({1, 2, 3}, v1:totable())
    assert.are.same({0, 1, 0}, i1:totable())
    assert.are.equal(5, m:argmax():item())       -- into the flattened tensor
    assert.are.same({1, 2}, m:argmax(2):totable())
    assert.are.same({{0, 1, 0}}, m:argmin(1, {keepdim = true}):totable())
    assert.are.same({{4, 5, 4}, {4, 4, 6}}, torch.max(m, torch.tensor{4, 4, 4}):totable())
  end)

  it('var/std use Bessel\'s correction by default', function()
    local t = f64{1, 2, 3, 4}
    assert.are.equal(5 / 3, t:var():item())
    assert.are.equal(1.25, t:var{unbiased = false}:item())
    assert.are.equal(1.25, t:var{correction = 0}:item())
    assert.is_true(math.abs(t:std():item() - math.sqrt(5 / 3)) < 1e-15)
    h.close(m:var(2), {4, 4})
  end)

  it('norm and logsumexp', function()
    local v = f64{3, -4}
    assert.are.equal(5, v:norm():item())
    assert.are.equal(7, v:norm(1):item())
    assert.are.equal(4, v:norm('inf'):item())
    assert.are.equal(5, torch.linalg.norm(v):item())
    assert.is_true(math.abs(f64{0, 0}:logsumexp(1):item() - math.log(2)) < 1e-15)
    -- stable for large inputs
    assert.is_true(math.abs(f64{1000, 1000}:logsumexp(1):item() - (1000 + math.log(2))) < 1e-12)
  end)

  it('cumsum, softmax and log_softmax', function()
    assert.are.same({{1, 6, 9}, {4, 6, 12}}, m:cumsum(2):totable())
    assert.are.same({{1, 5, 3}, {5, 7, 9}}, m:cumsum(1):totable())
    local s = m:softmax(2)
    h.close(s:sum(2), {1, 1})
    local e = math.exp
    local z = e(1) + e(5) + e(3)
    h.close(s[1], {e(1) / z, e(5) / z, e(3) / z}, 1e-7)
    h.close(m:log_softmax(2), s:log(), 1e-6)
    assert.matches('argument #2 (dim) is required', errmsg(m.softmax, m), 1, true)
    assert.are.equal('float64', m:softmax(2, {dtype = 'float64'}).dtype)
  end)

  it('topk and sort return 0-based indices', function()
    local t = torch.tensor{3, 1, 4, 1, 5, 9, 2, 6}
    local v, i = t:topk(3)
    assert.are.same({9, 6, 5}, v:totable())
    assert.are.same({5, 7, 4}, i:totable())
    local sv, si = t:topk(2, 1, false)
    assert.are.same({1, 1}, sv:totable())
    assert.are.same({1, 3}, si:sort():totable())
    local s, idx = t:sort{stable = true}
    assert.are.same({1, 1, 2, 3, 4, 5, 6, 9}, s:totable())
    assert.are.same({1, 3, 6, 0, 2, 4, 7, 5}, idx:totable())
    local d = t:sort(1, true)
    assert.are.same({9, 6, 5, 4, 3, 2, 1, 1}, d:totable())
    assert.are.same({5, 7, 4, 2, 0, 6, 1, 3}, t:argsort{descending = true, dim = 1}:totable())
    assert.matches('Tensor.topk: k = 9 is out of range for a dimension of size 8', errmsg(t.topk, t, 9), 1, true)
  end)
end)

describe('elementwise helpers', function()
  it('clamp, where, masked_fill', function()
    local t = torch.tensor{-2, -0.5, 0.5, 2}
    assert.are.same({-1, -0.5, 0.5, 1}, t:clamp(-1, 1):totable())
    assert.are.same({0, 0, 0.5, 2}, t:clamp{min = 0}:totable())
    assert.are.same({-2, -0.5, 0, 0}, t:clamp{max = 0}:totable())
    assert.matches('at least one of min or max', errmsg(t.clamp, t))
    assert.are.same({-2, -0.5, 10, 10}, torch.where(t:gt(0), 10, t):totable())
    assert.are.same({-2, -0.5, 0, 0}, t:where(t:lt(0), 0):totable())
    assert.are.same({9, 9, 0.5, 2}, t:masked_fill(t:lt(0), 9):totable())
    assert.are.same({-2, -0.5, 0.5, 2}, t:totable())  -- not in place
    assert.matches('mask must be a bool tensor', errmsg(t.masked_fill, t, t, 1), 1, true)
    assert.matches('condition must be a bool tensor', errmsg(torch.where, t, t, t), 1, true)
  end)

  it('index_select, gather, scatter, scatter_add, nonzero by hand', function()
    local m = torch.tensor{{1, 2, 3}, {4, 5, 6}}
    assert.are.same({{4, 5, 6}, {1, 2, 3}}, m:index_select(1, i64{1, 0}):totable())
    assert.are.same({{3, 1}, {6, 4}}, m:index_select(2, i64{2, 0}):totable())
    assert.are.same({{3, 1}, {5, 5}}, m:gather(2, i64{{2, 0}, {1, 1}}):totable())
    local z = torch.zeros(2, 3)
    assert.are.same({{0, 7, 0}, {8, 0, 0}}, z:scatter(2, i64{{1}, {0}}, torch.tensor{{7}, {8}}):totable())
    assert.are.same({{0, 0, 0}, {0, 0, 0}}, z:totable())  -- scatter is out of place
    assert.are.same({{0, 5, 0}, {5, 0, 0}}, z:scatter(2, i64{{1}, {0}}, 5):totable())
    assert.are.same({{0, 3, 0}, {0, 0, 4}}, z:scatter_add(2, i64{{1, 1}, {2, 2}}, torch.tensor{{1, 2}, {1, 3}}):totable())
    z:scatter_add_(2, i64{{0}, {0}}, torch.tensor{{1}, {2}})
    assert.are.same({{1, 0, 0}, {2, 0, 0}}, z:totable())
    z:scatter_(2, i64{{2}, {2}}, torch.tensor{{3}, {4}})
    assert.are.same({{1, 0, 3}, {2, 0, 4}}, z:totable())
    assert.are.same({{0, 0}, {0, 2}, {1, 0}, {1, 2}}, z:nonzero():totable())
    assert.are.equal('int64', z:nonzero().dtype)
    local rows, cols = unpack(torch.where(z:gt(0)))
    assert.are.same({0, 0, 1, 1}, rows:totable())
    assert.are.same({0, 2, 0, 2}, cols:totable())
    assert.is_false(pcall(m.gather, m, 2, i64{{3}}))  -- index 3 out of bounds for size 3
    assert.is_false(pcall(m.index_select, m, 1, i64{2}))
  end)
end)

describe('products and linalg', function()
  it('matmul/mm/bmm/einsum/outer/dot by hand', function()
    local a = torch.tensor{{1, 2}, {3, 4}}
    local b = torch.tensor{{5, 6}, {7, 8}}
    assert.are.same({{19, 22}, {43, 50}}, a:matmul(b):totable())
    assert.are.same({{19, 22}, {43, 50}}, torch.mm(a, b):totable())
    assert.are.same({17, 39}, a:matmul(torch.tensor{5, 6}):totable())
    assert.are.equal(11, torch.tensor{1, 2}:matmul(torch.tensor{3, 4}):item())
    local ba = torch.stack{a, b}
    local r = ba:bmm(ba)
    assert.are.same({{7, 10}, {15, 22}}, r[1]:totable())
    assert.are.same({{67, 78}, {91, 106}}, r[2]:totable())
    assert.are.same(r:totable(), ba:matmul(ba):totable())
    assert.are.same({{19, 22}, {43, 50}}, torch.einsum('ij,jk->ik', a, b):totable())
    assert.are.equal(5, torch.einsum('ii', a):item())
    assert.are.same({{3, 4, 5}, {6, 8, 10}}, torch.outer(torch.tensor{1, 2}, torch.tensor{3, 4, 5}):totable())
    assert.are.equal(11, torch.dot(torch.tensor{1, 2}, torch.tensor{3, 4}):item())
  end)

  it('linalg.svd reconstructs A = U diag(S) Vh', function()
    torch.manual_seed(3)
    local A = torch.randn(5, 3, {dtype = 'float64'})
    local U, S, Vh = torch.linalg.svd(A, false)
    assert.are.same({5, 3}, {U:size(1), U:size(2)})
    assert.are.same({3, 3}, {Vh:size(1), Vh:size(2)})
    -- eye(3) * S broadcasts S along the rows: diag(S)
    h.close(U:matmul(torch.eye(3, {dtype = 'float64'}) * S):matmul(Vh), A, 1e-12)
    h.close(U:t():matmul(U), torch.eye(3, {dtype = 'float64'}), 1e-12)
    -- singular values are sorted descending and positive
    assert.is_true(S[1]:item() >= S[2]:item() and S[2]:item() >= S[3]:item() and S[3]:item() > 0)
    local Uf, Sf, Vhf = torch.linalg.svd(A)
    assert.are.same({5, 5}, {Uf:size(1), Uf:size(2)})
    assert.are.same({3, 3}, {Vhf:size(1), Vhf:size(2)})
    h.close(Sf, S, 1e-12)
    h.close(Uf:narrow(2, 1, 3):matmul(torch.eye(3, {dtype = 'float64'}) * Sf):matmul(Vhf), A, 1e-12)
    -- Frobenius norm = sqrt(sum S^2), nuclear = sum S, spectral = S[1]
    h.close(torch.linalg.norm(A), (S ^ 2):sum():sqrt(), 1e-12)
    h.close(torch.linalg.norm(A, 'nuc'), S:sum(), 1e-12)
    h.close(torch.linalg.norm(A, 2), S[1], 1e-12)
  end)

  it('matmul errors name the shapes', function()
    assert.matches('torch.matmul: shapes (3, 4) and (5, 6) cannot be multiplied (4 != 5)',
                   errmsg(torch.matmul, torch.zeros(3, 4), torch.zeros(5, 6)), 1, true)
    assert.matches('dtypes differ', errmsg(torch.matmul, torch.zeros(2, 2), f64{{1, 2}, {3, 4}}), 1, true)
    assert.matches('Tensor.bmm', errmsg(torch.zeros(2, 2).bmm, torch.zeros(2, 2), torch.zeros(2, 2)), 1, true)
  end)
end)

describe('in-place twins', function()
  it('modify self and return it', function()
    local t = torch.tensor{1, 2, 3}
    local base = t
    assert.is_true(rawequal(t, t:add_(1)))
    assert.are.same({2, 3, 4}, base:totable())
    t:add_(torch.tensor{1, 1, 1}, {alpha = 10})
    assert.are.same({12, 13, 14}, t:totable())
    t:sub_(2)
    t:mul_(0.5)
    assert.are.same({5, 5.5, 6}, t:totable())
    t:div_(2)
    assert.are.same({2.5, 2.75, 3}, t:totable())
    assert.is_true(rawequal(t, t:clamp_(2.6, 2.9)))
    h.close(t, {2.6, 2.75, 2.9})
    t:fill_(7)
    assert.are.same({7, 7, 7}, t:totable())
    t:zero_()
    assert.are.same({0, 0, 0}, t:totable())
    t:copy_(torch.tensor({4, 5, 6}, {dtype = 'int64'}))  -- copy_ converts the dtype
    assert.are.same({4, 5, 6}, t:totable())
    assert.are.equal('float32', t.dtype)
    t:copy_(torch.tensor{1})  -- broadcasts
    assert.are.same({1, 1, 1}, t:totable())
    t:exp_():log_()
    h.close(t, {1, 1, 1})
    t:round_():neg_():abs_():sqrt_()
    assert.are.same({1, 1, 1}, t:totable())
    t:pow_(2):mul_(torch.tensor{1, 2, 3})
    assert.are.same({1, 2, 3}, t:totable())
    t:masked_fill_(t:gt(1), 0)
    assert.are.same({1, 0, 0}, t:totable())
  end)

  it('in-place on a view writes into the base', function()
    local m = torch.zeros(2, 3)
    m[2]:fill_(1):mul_(4)
    m:select(2, 1):add_(1)
    assert.are.same({{1, 0, 0}, {5, 4, 4}}, m:totable())
  end)

  it('normal_ and uniform_ fill with the requested distribution', function()
    torch.manual_seed(5)
    local t = torch.empty(20000, {dtype = 'float64'})
    assert.is_true(rawequal(t, t:uniform_(-2, 3)))
    assert.is_true(t:min():item() >= -2 and t:max():item() < 3)
    assert.is_true(math.abs(t:mean():item() - 0.5) < 0.05)
    t:normal_(10, 2)
    assert.is_true(math.abs(t:mean():item() - 10) < 0.06)
    assert.is_true(math.abs(t:std():item() - 2) < 0.06)
    t:normal_()
    assert.is_true(math.abs(t:mean():item()) < 0.03)
    t:uniform_()
    assert.is_true(t:min():item() >= 0 and t:max():item() < 1)
  end)

  it('rejects a result type that cannot be cast in place', function()
    local i = i64{1, 2}
    assert.matches('Tensor.add_', errmsg(i.add_, i, 2.5), 1, true)
    assert.are.same({1, 2}, i:totable())
    local leaf = torch.ones(2, {requires_grad = true})
    assert.matches('leaf', errmsg(leaf.add_, leaf, 1), 1, true)
  end)
end)
