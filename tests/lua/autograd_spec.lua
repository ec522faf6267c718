-- autograd: requires_grad, backward (scalar and with a gradient), accumulation and zeroing of
-- .grad, detach, no_grad/enable_grad (mode restored on errors), torch.autograd.grad with
-- create_graph, and gradients of composite functions against central finite differences.
local torch = require 'torch'
local h = require 'helper'

local function errmsg(f, ...)
  local ok, err = pcall(f, ...)
  assert.is_false(ok, 'expected an error')
  return tostring(err)
end

local function f64(t, rg) return torch.tensor(t, {dtype = 'float64', requires_grad = rg or false}) end

-- Central finite differences of the scalar function f(inputs...) w.r.t. inputs[k], in float64.
local function numeric_grad(f, inputs, k, eps)
  eps = eps or 1e-6
  local base = {}
  for i, x in ipairs(inputs) do base[i] = x:detach():clone() end
  local x = base[k]
  local flat = x:view(-1)
  local g = torch.zeros(x:numel(), {dtype = 'float64'})
  torch.no_grad(function()
    for i = 1, x:numel() do
      local v = flat[i]:item()
      flat[i] = v + eps
      local fp = f(unpack(base)):item()
      flat[i] = v - eps
      local fm = f(unpack(base)):item()
      flat[i] = v
      g[i] = (fp - fm) / (2 * eps)
    end
  end)
  return g:view(x:size())
end

-- Checks autograd's gradient of f against finite differences for every input.
local function gradcheck(f, inputs, tol)
  tol = tol or 1e-6
  local leaves = {}
  for i, x in ipairs(inputs) do leaves[i] = x:detach():clone():requires_grad_() end
  local y = f(unpack(leaves))
  assert.are.equal(1, y:numel())
  local grads = torch.autograd.grad(y, leaves)
  assert.are.equal(#inputs, #grads)
  for k = 1, #inputs do
    h.close(grads[k], numeric_grad(f, inputs, k), tol, tol)
  end
  return grads
end

describe('requires_grad and backward', function()
  it('tracks operations and fills .grad of leaves on backward', function()
    local x = f64({1, 2, 3}, true)
    assert.is_true(x.requires_grad)
    assert.is_true(x.is_leaf)
    assert.is_nil(x.grad_fn)
    assert.is_nil(x.grad)
    local y = (x * x):sum()
    assert.is_true(y.requires_grad)
    assert.is_false(y.is_leaf)
    assert.are.equal('SumBackward0', y.grad_fn)
    y:backward()
    assert.are.same({2, 4, 6}, x.grad:totable())
  end)

  it('requires_grad_ and the requires_grad property switch tracking', function()
    local x = torch.ones(2)
    assert.is_false(x.requires_grad)
    assert.is_false((x * 2).requires_grad)
    assert.is_true(rawequal(x, x:requires_grad_()))
    assert.is_true(x.requires_grad)
    x:requires_grad_(false)
    assert.is_false(x.requires_grad)
    x.requires_grad = true
    assert.is_true((x * 2).requires_grad)
  end)

  it('backward with an explicit gradient for a non-scalar output', function()
    local x = f64({1, 2, 3}, true)
    local z = x * x
    z:backward(f64{1, 0, 0.5})
    assert.are.same({2, 0, 3}, x.grad:totable())
    local w = f64({{1, 2}, {3, 4}}, true)
    w:matmul(f64{1, -1}):backward(f64{1, 2})
    -- d/dw of sum_i g_i * (w v)_i = g v^T
    assert.are.same({{1, -1}, {2, -2}}, w.grad:totable())
  end)

  it('needs a gradient for non-scalar outputs, and something to differentiate', function()
    local x = f64({1, 2}, true)
    assert.matches('Tensor.backward: a gradient is needed for a non-scalar output of 2 elements',
                   errmsg(function() (x * 2):backward() end), 1, true)
    assert.matches('Tensor.backward: this tensor does not require grad',
                   errmsg(function() torch.ones(2):sum():backward() end), 1, true)
  end)

  it('accumulates .grad across backward calls; zeroing by nil or zero_', function()
    local x = f64({1, 2, 3}, true)
    ;(x * x):sum():backward()
    ;(x * x):sum():backward()
    assert.are.same({4, 8, 12}, x.grad:totable())
    ;(x * 10):sum():backward()
    assert.are.same({14, 18, 22}, x.grad:totable())
    x.grad = nil
    assert.is_nil(x.grad)
    ;(x * 3):sum():backward()
    assert.are.same({3, 3, 3}, x.grad:totable())
    x.grad:zero_()
    assert.are.same({0, 0, 0}, x.grad:totable())
    ;(x * 2):sum():backward()
    assert.are.same({2, 2, 2}, x.grad:totable())
    x.grad = f64{100, 100, 100}
    ;(x * 1):sum():backward()
    assert.are.same({101, 101, 101}, x.grad:totable())
  end)

  it('retain_graph allows a second backward through the same graph', function()
    local x = f64({2}, true)
    local y = (x * x * x):sum()
    y:backward(nil, true)
    assert.are.same({12}, x.grad:totable())
    y:backward()
    assert.are.same({24}, x.grad:totable())
    local y2 = (x:exp()):sum()
    y2:backward()
    assert.is_false(pcall(y2.backward, y2))  -- buffers freed after the first backward
  end)

  it('retain_grad keeps gradients of intermediate tensors', function()
    local w = f64({1, 2}, true)
    local o = w * 3
    o:retain_grad()
    ;(o * o):sum():backward()
    assert.are.same({6, 12}, o.grad:totable())
    assert.are.same({18, 36}, w.grad:totable())
  end)

  it('detach cuts the graph and shares storage', function()
    local x = f64({1, 2}, true)
    local d = x:detach()
    assert.is_false(d.requires_grad)
    assert.is_nil(d.grad_fn)
    d[1] = 5
    assert.are.equal(5, x[1]:item())
    local y = (x * x:detach()):sum()  -- the detached factor is a constant
    y:backward()
    assert.are.same({5, 2}, x.grad:totable())
    local z = (x * 2):detach_()
    assert.is_false(z.requires_grad)
    assert.is_false(x.data.requires_grad)
  end)
end)

describe('grad modes', function()
  it('no_grad runs fn without recording and passes its results through', function()
    local x = f64({1, 2}, true)
    local r, n, s = torch.no_grad(function(a, b) return x * a, b, 'ok' end, 2, 7)
    assert.is_nil(r.grad_fn)
    assert.is_false(r.requires_grad)
    assert.are.same({2, 4}, r:totable())
    assert.are.equal(7, n)
    assert.are.equal('ok', s)
    assert.are.equal(3, select('#', torch.no_grad(function() return 1, nil, 3 end)))
    assert.is_true(torch.is_grad_enabled())
  end)

  it('restores grad mode even when fn errors', function()
    assert.is_true(torch.is_grad_enabled())
    local ok, err = pcall(torch.no_grad, function()
      assert(not torch.is_grad_enabled())
      error('boom')
    end)
    assert.is_false(ok)
    assert.matches('boom', err)
    assert.is_true(torch.is_grad_enabled())
    -- an error raised by a bound function inside
    ok = pcall(torch.no_grad, function() return torch.zeros(2):matmul(torch.zeros(3)) end)
    assert.is_false(ok)
    assert.is_true(torch.is_grad_enabled())
    -- a non-string error object passes through unchanged
    local obj = {}
    local ok2, e2 = pcall(torch.no_grad, function() error(obj) end)
    assert.is_false(ok2)
    assert.is_true(rawequal(obj, e2))
    assert.is_true(torch.is_grad_enabled())
    assert.matches('torch.no_grad', errmsg(torch.no_grad, 42), 1, true)
  end)

  it('enable_grad inside no_grad, nesting and set_grad_enabled', function()
    local x = f64({1}, true)
    assert.is_true(torch.no_grad(function()
      return torch.enable_grad(function() return (x * 2).requires_grad end)
    end))
    assert.is_false(torch.enable_grad(function()
      return torch.no_grad(function() return torch.is_grad_enabled() end)
    end))
    torch.set_grad_enabled(false)
    local off = (x * 2).requires_grad
    torch.set_grad_enabled(true)
    assert.is_false(off)
    assert.is_true((x * 2).requires_grad)
  end)
end)

describe('torch.autograd.grad', function()
  it('returns gradients without touching .grad', function()
    local x = f64({1, 2, 3}, true)
    local g = torch.autograd.grad((x * x):sum(), {x})
    assert.are.same({2, 4, 6}, g[1]:totable())
    assert.is_nil(x.grad)
    local a, b = f64({1, 2}, true), f64({3, 4}, true)
    local gs = torch.autograd.grad({(a * b):sum()}, {a, b})
    assert.are.same({3, 4}, gs[1]:totable())
    assert.are.same({1, 2}, gs[2]:totable())
    -- a single tensor for inputs, and grad_outputs for a non-scalar output
    local gv = torch.autograd.grad(a * b, a, {grad_outputs = {f64{1, -1}}})
    assert.are.same({3, -4}, gv[1]:totable())
  end)

  it('create_graph gives differentiable gradients (second derivatives)', function()
    local x = f64({1, 2, -3}, true)
    local g = torch.autograd.grad((x ^ 3):sum(), {x}, {create_graph = true})[1]
    assert.are.same({3, 12, 27}, g:totable())
    assert.is_true(g.requires_grad)
    local g2 = torch.autograd.grad(g:sum(), {x})[1]
    assert.are.same({6, 12, -18}, g2:totable())
    -- d2/dx2 sin(x) = -sin(x); and a mixed second derivative
    local s = torch.autograd.grad(x:sin():sum(), {x}, {create_graph = true})[1]
    h.close(torch.autograd.grad(s:sum(), {x})[1], x:detach():sin():neg(), 1e-15)
    local y = f64({0.5, -1.5}, true)
    local gy = torch.autograd.grad((x[{{1, 2}}] * y * y):sum(), {y}, {create_graph = true})[1]  -- 2 x y
    local gxy = torch.autograd.grad(gy:sum(), {x}, {allow_unused = true})[1]  -- 2 y, 0 for x3
    assert.are.same({1, -3, 0}, gxy:totable())
  end)

  it('the second derivative agrees with finite differences of the first', function()
    local x0 = f64{0.3, -0.7, 1.1}
    local function first(x)
      local xx = x:detach():clone():requires_grad_()
      return torch.autograd.grad((xx:tanh() * xx:exp()):sum(), {xx})[1]
    end
    local x = x0:clone():requires_grad_()
    local g = torch.autograd.grad((x:tanh() * x:exp()):sum(), {x}, {create_graph = true})[1]
    local hess_diag = torch.autograd.grad(g:sum(), {x})[1]
    -- the function is separable, so the Hessian is diagonal: compare with d/dx of the gradient
    local eps = 1e-6
    local num = (first(x0 + eps) - first(x0 - eps)) / (2 * eps)
    h.close(hess_diag, num, 1e-6, 1e-6)
  end)

  it('reports outputs without grad, unused inputs and bad arguments', function()
    local x = f64({1}, true)
    local u = f64({1}, true)
    assert.matches('torch.autograd.grad: output 1 does not require grad',
                   errmsg(torch.autograd.grad, torch.ones(1), {x}), 1, true)
    assert.matches('torch.autograd.grad', errmsg(torch.autograd.grad, (x * 2):sum(), {u}), 1, true)
    local r = torch.autograd.grad((x * 2):sum(), {x, u}, {allow_unused = true})
    assert.are.same({2}, r[1]:totable())
    assert.is_nil(r[2])
    assert.matches('expected (outputs, inputs', errmsg(torch.autograd.grad, (x * 2):sum()), 1, true)
    assert.matches("unknown option 'create_grph'", errmsg(torch.autograd.grad, (x * 2):sum(), {x}, {create_grph = true}), 1, true)
  end)
end)

describe('gradients match central finite differences (float64)', function()
  torch.manual_seed(11)
  local X = torch.randn(3, 4, {dtype = 'float64'})
  local W = torch.randn(4, 5, {dtype = 'float64'}) * 0.5
  local Y = torch.randn(3, 5, {dtype = 'float64'})

  it('sum(tanh(x @ W) * y)', function()
    gradcheck(function(x, w, y) return (x:matmul(w):tanh() * y):sum() end, {X, W, Y})
  end)

  it('cross-entropy: -mean(gather(log_softmax(logits), target))', function()
    local logits = torch.randn(4, 6, {dtype = 'float64'}) * 2
    local target = torch.tensor({{5}, {0}, {2}, {2}}, {dtype = 'int64'})
    local function ce(l) return -l:log_softmax(2):gather(2, target):mean() end
    local g = gradcheck(ce, {logits})
    -- closed form: (softmax - onehot) / N
    local onehot = torch.zeros(4, 6, {dtype = 'float64'}):scatter(2, target, 1)
    h.close(g[1], (logits:softmax(2) - onehot) / 4, 1e-12)
  end)

  it('norms', function()
    gradcheck(function(x) return x:norm(3, 2):sum() end, {X})
    gradcheck(function(x) return torch.linalg.norm(x, 'fro') * 2 end, {X})
    -- closed form: d|x|/dx = x/|x|
    local g = gradcheck(function(x) return x:norm() end, {X})
    h.close(g[1], X / X:norm(), 1e-15)
  end)

  it('softmax, log_softmax and logsumexp', function()
    local C = torch.randn(3, 4, {dtype = 'float64'})
    gradcheck(function(x) return (x:softmax(2) * C):sum() end, {X})
    gradcheck(function(x) return (x:softmax(1) * C):sum() end, {X})
    gradcheck(function(x) return (x:log_softmax(-1) * C):sum() end, {X})
    gradcheck(function(x) return x:logsumexp(2):sum() end, {X})
  end)

  it('sigmoid * exp, division, pow and sqrt', function()
    gradcheck(function(x) return (x:sigmoid() * x:exp()):sum() end, {X})
    gradcheck(function(x, y) return (x / (y * y + 1)):sum() end, {X, Y:narrow(2, 1, 4)})
    gradcheck(function(x) return (1 / (x:abs() + 0.5)):sum() end, {X})
    gradcheck(function(x) return ((x * x + 1) ^ 1.5):sum() end, {X})
    gradcheck(function(x) return (2 ^ x):sum() end, {X})
    gradcheck(function(x) return (x * x + 0.1):sqrt():mean() end, {X})
  end)

  it('mean/var/std, gelu/silu, cumsum, prod, where, index_select and bmm', function()
    gradcheck(function(x) return x:var(2):sum() + x:std() end, {X})
    gradcheck(function(x) return (x:gelu() + x:silu() * 0.5):sum() end, {X})
    gradcheck(function(x) return (x:cumsum(2) * x):sum() end, {X})
    gradcheck(function(x) return (x * 0.5 + 1.5):prod(2):sum() end, {X})
    gradcheck(function(x) return torch.where(x:gt(0), x * x, -x * 3):sum() end, {X})
    gradcheck(function(x) return (x:index_select(1, torch.tensor({2, 0, 2}, {dtype = 'int64'})) ^ 2):sum() end, {X})
    local B1 = torch.randn(2, 3, 4, {dtype = 'float64'})
    local B2 = torch.randn(2, 4, 2, {dtype = 'float64'})
    gradcheck(function(a, b) return a:bmm(b):tanh():sum() end, {B1, B2})
    gradcheck(function(a, b) return torch.einsum('bij,bjk->bik', a, b):pow(2):sum() end, {B1, B2})
  end)

  it('slicing, views and scatter_add route gradients to the right elements', function()
    gradcheck(function(x) return (x[{{2, 3}, {1, -1, 2}}] ^ 2):sum() + x:t()[4][1] * 3 end, {X})
    gradcheck(function(x) return (x:view(2, 6):permute(2, 1):reshape(12) * torch.arange(12, {dtype = 'float64'})):sum() end, {X})
    local idx = torch.tensor({{0, 0}, {1, 3}, {2, 2}}, {dtype = 'int64'})
    gradcheck(function(x, s) return (x:scatter_add(2, idx, s) ^ 2):sum() end, {X, Y:narrow(2, 1, 2)})
    gradcheck(function(x) return torch.cat({x, x * 2}, 2):exp():mean() + torch.stack({x, x}, 1):sin():sum() end, {X})
  end)
end)
