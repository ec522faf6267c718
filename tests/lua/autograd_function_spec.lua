-- autograd_function: custom Functions written in Lua (ctx, saved tensors, needs_input_grad,
-- non-differentiable outputs, errors), gradcheck, tensor hooks, an STE that trains, and leaks.
local torch = require 'torch'
local h = require 'helper'

local function errmsg(f, ...)
  local ok, err = pcall(f, ...)
  assert.is_false(ok, 'expected an error')
  return tostring(err)
end

local function f64(t, rg) return torch.tensor(t, {dtype = 'float64', requires_grad = rg or false}) end

-- x * w with a number scale passed through; saves both inputs.
local ScaledMul = torch.autograd.Function{
  name = 'ScaledMul',
  forward = function(ctx, x, w, scale)
    ctx:save_for_backward(x, w)
    ctx.scale = scale
    return x * w * scale
  end,
  backward = function(ctx, g)
    local x, w = unpack(ctx.saved_tensors)
    return g * w * ctx.scale, g * x * ctx.scale, nil
  end,
}

-- exp, saving its own output (a SavedVariable of an output: no reference cycle).
local Exp = torch.autograd.Function{
  name = 'Exp',
  forward = function(ctx, x)
    local y = x:exp()
    ctx:save_for_backward(y)
    return y
  end,
  backward = function(ctx, g) return g * ctx.saved_tensors[1] end,
}

-- round in forward, identity in backward.
local STE = torch.autograd.Function{
  name = 'STE',
  forward = function(_, w, step) return torch.round(w / step) * step end,
  backward = function(_, g) return g, nil end,
}

describe('torch.autograd.Function', function()
  it('gives the gradients of the same computation written in plain ops', function()
    local x, w = f64({{1, -2}, {3, 0.5}}, true), f64({{0.5, 4}, {-1, 2}}, true)
    local y = ScaledMul:apply(x, w, 3)
    assert.is_true(y.requires_grad)
    local loss = (y:sin() * y):sum()
    loss:backward()
    local x2, w2 = x:detach():clone():requires_grad_(), w:detach():clone():requires_grad_()
    local y2 = x2 * w2 * 3
    ;(y2:sin() * y2):sum():backward()
    h.close(y, y2, 0, 0)
    h.close(x.grad, x2.grad, 1e-12, 1e-12)
    h.close(w.grad, w2.grad, 1e-12, 1e-12)
  end)

  it('is callable directly, and works with torch.autograd.grad', function()
    local x, w = f64({1, 2, 3}, true), f64({4, 5, 6}, true)
    local y = ScaledMul(x, w, 0.5)
    local gx, gw = unpack(torch.autograd.grad(y:sum(), {x, w}))
    h.close(gx, {2, 2.5, 3}, 1e-12, 0)
    h.close(gw, {0.5, 1, 1.5}, 1e-12, 0)
    assert.matches("autograd.Function 'ScaledMul'", tostring(ScaledMul), 1, true)
  end)

  it('uses the same Function twice in one graph, and nests Functions inside forward', function()
    local x = f64({0.1, -0.3, 0.7}, true)
    local y = Exp(Exp(x)):sum()
    y:backward()
    h.close(x.grad, (x:detach():exp() + x:detach()):exp(), 1e-12, 1e-12)
    local Outer = torch.autograd.Function{
      name = 'Outer',
      forward = function(ctx, t)
        local inner = Exp(t)   -- grad mode is off in forward: no graph is recorded for it
        assert.is_false(torch.is_grad_enabled())
        assert.is_false(inner.requires_grad)
        ctx:save_for_backward(inner)
        return inner * 2
      end,
      backward = function(ctx, g) return g * 2 * ctx.saved_tensors[1] end,
    }
    local z = f64({0.5, 1}, true)
    Outer(z):sum():backward()
    h.close(z.grad, z:detach():exp() * 2, 1e-12, 1e-12)
  end)

  it('passes any Lua values through, fills needs_input_grad, and keeps ctx fields', function()
    local seen = {}
    local F = torch.autograd.Function{
      forward = function(ctx, a, opts, b, label)
        seen.fw = ctx.needs_input_grad
        seen.opts, seen.label = opts, label
        ctx.k = opts.k
        return a * b * opts.k, 'done', 42
      end,
      backward = function(ctx, g, gs, gn)
        seen.bw = ctx.needs_input_grad
        seen.gs, seen.gn = gs, gn
        return g * ctx.k, nil, nil, nil
      end,
    }
    local a, b = f64({1, 2}, true), f64({3, 4})
    local opts = {k = 5}
    local y, s, n = F:apply(a, opts, b, 'lbl')
    assert.are.equal('done', s)
    assert.are.equal(42, n)
    assert.are.equal(opts, seen.opts)
    assert.are.equal('lbl', seen.label)
    assert.are.same({true, false, false, false}, seen.fw)
    y:sum():backward()
    assert.are.same({true, false, false, false}, seen.bw)
    assert.is_nil(seen.gs)
    assert.is_nil(seen.gn)
    h.close(a.grad, {5, 5}, 0, 0)
    -- under no_grad nothing needs a gradient and the output is plain
    torch.no_grad(function()
      local y2 = F(a, opts, b, 'x')
      assert.is_false(y2.requires_grad)
    end)
    assert.are.same({false, false, false, false}, seen.fw)
    assert.are.equal('Function', F.name)
  end)

  it('gives one gradient per output; non-differentiable outputs get zeros and no grad', function()
    local gm
    local F = torch.autograd.Function{
      name = 'TwoOut',
      forward = function(ctx, x)
        local mask = x:gt(0):double()
        ctx:mark_non_differentiable(mask)
        return x * 2, mask, x * x
      end,
      backward = function(_, g1, gmask, g3)
        gm = gmask
        return g1 * 2 + g3   -- d(x*x)/dx is not given on purpose: the test checks the plumbing
      end,
    }
    local x = f64({-1, 2}, true)
    local a, mask, c = F(x)
    assert.is_true(a.requires_grad)
    assert.is_false(mask.requires_grad)
    assert.is_true(c.requires_grad)
    ;(a:sum() + c:sum() * 10):backward()
    h.close(x.grad, {12, 12}, 0, 0)
    h.close(gm, {0, 0}, 0, 0)
  end)

  it('reads saved tensors in backward only, and the ctx only while its Function runs', function()
    local kept
    local F = torch.autograd.Function{
      name = 'Peek',
      forward = function(ctx, x)
        ctx:save_for_backward(x)
        kept = ctx
        local ok, e = pcall(function() return ctx.saved_tensors end)
        assert.is_false(ok)
        assert.matches("Function 'Peek': saved tensors can be read in backward only", e, 1, true)
        return x * 3
      end,
      backward = function(ctx, g)
        local ok, e = pcall(ctx.save_for_backward, ctx, g)
        assert.is_false(ok)
        assert.matches('only valid in forward', e, 1, true)
        return g * 3
      end,
    }
    local x = f64({1, 2}, true)
    F(x):sum():backward()
    h.close(x.grad, {3, 3}, 0, 0)
    assert.matches('ctx:save_for_backward: only valid while the Function', errmsg(kept.save_for_backward, kept, x))
    -- a saved input changed in place since forward is caught, as PyTorch does
    local x2 = f64({1, 2}, true)
    local y = ScaledMul(x2 * 1, x2 * 1, 1)
    local ok = pcall(function()
      local v = x2 * 1
      local z = ScaledMul(v, v, 1)
      torch.no_grad(function() v:add_(1) end)
      z:sum():backward()
    end)
    assert.is_false(ok)
    y:sum():backward()
    h.close(x2.grad, {2, 4}, 0, 0)
  end)

  it('checks what backward returns: count, types and shapes, naming the Function and argument', function()
    local function F(name, back)
      return torch.autograd.Function{name = name, forward = function(_, x) return x * 1 end, backward = back}
    end
    local x = f64({1, 2, 3}, true)
    local e = errmsg(function() F('Few', function(_, g) return g end)(x, 1):sum():backward() end)
    assert.matches("Function 'Few': backward returned 1 value(s), expected 2", e, 1, true)
    e = errmsg(function() F('Many', function(_, g) return g, nil, g end)(x, 1):sum():backward() end)
    assert.matches("Function 'Many': backward returned 3 value(s), expected 2", e, 1, true)
    e = errmsg(function() F('Shape', function(_, g) return g:narrow(1, 1, 2), nil end)(x, 1):sum():backward() end)
    assert.matches("Function 'Shape': backward returned a gradient of shape [2] for argument #1, expected [3]", e, 1, true)
    e = errmsg(function() F('Type', function() return 'g', nil end)(x, 1):sum():backward() end)
    assert.matches("Function 'Type': backward returned a string for argument #1", e, 1, true)
    e = errmsg(function() F('NotT', function(_, g) return g, g end)(x, 1):sum():backward() end)
    assert.matches("Function 'NotT': backward returned a tensor for argument #2, which is not a tensor", e, 1, true)
    -- trailing nils beyond the arguments are fine; a broadcast gradient is summed back, as PyTorch
    F('Trail', function(_, g) return g, nil, nil, nil end)(x, 1):sum():backward()
    h.close(x.grad, {1, 1, 1}, 0, 0)
    local b = f64({{1, 2, 3}}, true)
    F('Bcast', function(_, g) return g:expand(4, 3), nil end)(b, 1):sum():backward()
    h.close(b.grad, {{4, 4, 4}}, 0, 0)
    assert.matches("field 'backward': expected a function, got nil",
      errmsg(torch.autograd.Function, {forward = function() end}), 1, true)
    assert.matches("unknown option 'setup_context'", errmsg(torch.autograd.Function,
      {forward = function() end, backward = function() end, setup_context = function() end}), 1, true)
  end)

  it('turns errors in forward and backward into catchable errors naming the Function, with a traceback', function()
    local Boom = torch.autograd.Function{
      name = 'Boom',
      forward = function(_, x, where)
        if where == 'forward' then error('forward went wrong') end
        return x * 2
      end,
      backward = function(_, g)
        error('backward went wrong')
        return g
      end,
    }
    local x = f64({1, 2}, true)
    local e = errmsg(Boom.apply, Boom, x, 'forward')
    assert.matches("Function 'Boom': forward: ", e, 1, true)
    assert.matches('autograd_function_spec%.lua:%d+: forward went wrong', e)
    -- the traceback starts at the failing callback's frame
    assert.matches('stack traceback:\n\t[^\n]*autograd_function_spec%.lua:%d+: in function', e)
    e = errmsg(function() Boom(x, 'no'):sum():backward() end)
    assert.matches("^Tensor%.backward: Function 'Boom': backward: .*autograd_function_spec%.lua:%d+: backward went wrong", e)
    assert.matches('stack traceback:\n\t[^\n]*autograd_function_spec%.lua:%d+: in function', e)
    e = errmsg(function() torch.autograd.grad(Boom(x, 'no'):sum(), {x}) end)
    assert.matches("^torch%.autograd%.grad: Function 'Boom': backward", e)
    -- the process is still usable, grad mode is back on
    assert.is_true(torch.is_grad_enabled())
    Exp(x):sum():backward()
    h.close(x.grad, x:detach():exp(), 1e-12, 0)
  end)
end)

describe('torch.autograd.gradcheck', function()
  it('passes on correct Functions and on plain tensor code', function()
    local x, w = f64({{0.3, -1.2}, {2.0, 0.7}}, true), f64({{1.5, 0.2}, {-0.4, 1.1}}, true)
    assert.is_true(torch.autograd.gradcheck(function(a, b) return ScaledMul(a, b, 2) end, {x, w}))
    assert.is_true(torch.autograd.gradcheck(Exp, {x}))
    assert.is_true(torch.autograd.gradcheck(function(a, b) return (a:matmul(b)):tanh(), a:sum() end, {x, w}))
    -- a non-tensor input and an input without grad are passed through, not checked
    assert.is_true(torch.autograd.gradcheck(ScaledMul, {x, w:detach(), 3}, {eps = 1e-6, atol = 1e-5, rtol = 1e-3}))
  end)

  it('fails on a wrong backward, naming the input and the worst element', function()
    local Bad = torch.autograd.Function{
      name = 'Bad',
      forward = function(_, a, b) return a * b end,
      backward = function(_, g) return g * 1, g * 1 end,  -- right only where the other factor is 1
    }
    local a, b = f64({1, 2, 3}, true), f64({1, 5, 1}, true)
    local e = errmsg(torch.autograd.gradcheck, Bad, {a, b})
    assert.matches('^torch%.autograd%.gradcheck: Jacobian mismatch for output 1 with respect to input 1', e)
    assert.matches('output element [2], input element [2]: analytical 1 vs numerical 5', e, 1, true)
    local ok, msg = torch.autograd.gradcheck(Bad, {a:detach():requires_grad_(false), b}, {raise_exception = false})
    assert.is_false(ok)
    assert.matches('with respect to input 2', msg, 1, true)
    assert.matches('need float64', errmsg(torch.autograd.gradcheck, Exp, {torch.ones(2):requires_grad_()}), 1, true)
    assert.matches('no input requires grad', errmsg(torch.autograd.gradcheck, Exp, {f64({1})}), 1, true)
    assert.matches("unknown option 'tol'", errmsg(torch.autograd.gradcheck, Exp, {a}, {tol = 1}), 1, true)
  end)
end)

describe('tensor hooks', function()
  it('replace the gradient of a leaf, observe a non-leaf, and can be removed', function()
    local x = f64({1, 2, 3}, true)
    local hd = x:register_hook(function(g) return g * 2 end)
    ;(x * 3):sum():backward()
    h.close(x.grad, {6, 6, 6}, 0, 0)
    hd:remove()
    hd:remove()   -- twice is harmless
    x.grad = nil
    ;(x * 3):sum():backward()
    h.close(x.grad, {3, 3, 3}, 0, 0)

    local seen
    local y = x * x
    local hy = y:register_hook(function(g) seen = g:clone() end)
    ;(y * f64({1, 10, 100})):sum():backward()
    h.close(seen, {1, 10, 100}, 0, 0)
    hy:remove()
    -- a non-leaf hook's replacement flows on to the leaves
    x.grad = nil
    local z = x * 2
    z:register_hook(function(g) return torch.ones_like(g) end)
    ;(z * 5):sum():backward()
    h.close(x.grad, {2, 2, 2}, 0, 0)
  end)

  it('errors in hooks are catchable and name the hook', function()
    local x = f64({1, 2}, true)
    local hd = x:register_hook(function() error('hook failed') end)
    local e = errmsg(function() (x * 2):sum():backward() end)
    assert.matches('^Tensor%.backward: tensor hook %(.*autograd_function_spec%.lua:%d+%): .*hook failed', e)
    hd:remove()
    local h2 = x:register_hook(function(g) return g:narrow(1, 1, 1) end)
    e = errmsg(function() (x * 2):sum():backward() end)
    assert.matches('returned a gradient of shape [1], expected [2]', e, 1, true)
    h2:remove()
    assert.matches('does not require grad', errmsg(function() torch.ones(2):register_hook(function() end) end), 1, true)
    assert.matches('expected a function', errmsg(function() x:register_hook(3) end), 1, true)
    ;(x * 2):sum():backward()
    h.close(x.grad, {2, 2}, 0, 0)
  end)
end)

describe('quantization-aware regression with an STE', function()
  -- fit y = W x where the model's weight goes through round-to-step in forward
  local function fit(quantize, steps)
    torch.manual_seed(0)
    local W_true = torch.randn(4, 8)
    local X = torch.randn(64, 8)
    local Y = X:matmul(W_true:t())
    local W = torch.randn(4, 8):mul_(0.1):requires_grad_()
    local step, lr = 0.05, 0.1
    local first, last
    for i = 1, steps do
      local loss = (X:matmul(quantize(W, step):t()) - Y):pow(2):mean()
      if i == 1 then first = loss:item() end
      last = loss:item()
      loss:backward()
      torch.no_grad(function() W:add_(W.grad * -lr) end)
      W.grad = nil
    end
    return first, last, W
  end

  it('trains through round with the STE, and does not without it', function()
    local first, last = fit(function(w, s) return STE(w, s) end, 100)
    local plain_first, plain_last, Wp = fit(function(w, s) return torch.round(w / s) * s end, 100)
    print(('\n  STE: loss %.4f -> %.6f (x%.0f lower); plain round: %.4f -> %.4f'):format(
      first, last, first / last, plain_first, plain_last))
    assert.is_true(first / last > 100, ('STE loss only dropped from %g to %g'):format(first, last))
    -- round's own gradient is zero: the weight never moves
    assert.are.equal(plain_first, plain_last)
    assert.is_true(Wp.requires_grad)
  end)
end)

describe('against PyTorch', function()
  it('an LSQ fake-quantizer Function matches PyTorch autograd of the detach-trick form', function()
    -- q = clamp(round(x / s), lo, hi) * s; LSQ's gradients: dx = g where x/s is in range,
    -- ds = sum g * (round(x/s) - x/s in range, else the bound)
    local LSQ = torch.autograd.Function{
      name = 'LSQ',
      forward = function(ctx, x, s, lo, hi)
        local v = x / s
        ctx:save_for_backward(v)
        ctx.lo, ctx.hi = lo, hi
        return v:clamp(lo, hi):round() * s
      end,
      backward = function(ctx, g)
        local v = ctx.saved_tensors[1]
        local inr = v:ge(ctx.lo):double() * v:le(ctx.hi):double()
        local ds = torch.where(inr:bool(), v:round() - v, v:clamp(ctx.lo, ctx.hi))
        return g * inr, (g * ds):sum():reshape({1}), nil, nil
      end,
    }
    local xs = {-1.37, -0.81, -0.2, 0.04, 0.33, 0.58, 0.91, 1.22, 1.6}
    local x, s = f64(xs, true), f64({0.3}, true)
    local wts = f64({1, -2, 3, 0.5, -1, 2, 0.25, 4, -3})
    local y = LSQ(x, s, -4, 3)
    ;(y * wts):sum():backward()
    local out = h.py([[
import torch
x = torch.tensor(]] .. '[' .. table.concat(xs, ', ') .. ']' .. [[, dtype=torch.float64, requires_grad=True)
s = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
w = torch.tensor([1, -2, 3, 0.5, -1, 2, 0.25, 4, -3], dtype=torch.float64)
v = (x / s).clamp(-4, 3)
y = ((v.round() - v).detach() + v) * s
(y * w).sum().backward()
print('return {y = {%s}, gx = {%s}, gs = %r}' % (', '.join(map(repr, y.tolist())),
      ', '.join(map(repr, x.grad.tolist())), s.grad.item()))
]])
    local ref = assert(loadstring(out))()
    h.close(y, ref.y, 1e-12, 1e-12)
    h.close(x.grad, ref.gx, 1e-12, 1e-12)
    h.close(s.grad, {ref.gs}, 1e-12, 1e-12)
  end)
end)

describe('leaks', function()
  it('2,000 applies with backward keep tensor bytes, Lua memory and registry references bounded', function()
    local w = torch.randn(16, 64):requires_grad_()
    local function round()
      local x = torch.randn(16, 64)
      local y = ScaledMul(x, w, 2)
      local z = Exp(y * 0.01)
      z:sum():backward()
      w.grad = nil
    end
    -- live registry references (released ones stay as numbers in the free list)
    local function refs()
      local n = 0
      for k, v in pairs(debug.getregistry()) do
        if type(k) == 'number' and type(v) ~= 'number' then n = n + 1 end
      end
      return n
    end
    local function measure()
      collectgarbage()
      collectgarbage()
      torch.ones(1)   -- a bound call releases the references freed by the collection
      return torch.memory_stats().cpu_live_bytes, collectgarbage('count'), refs()
    end
    for _ = 1, 500 do round() end
    local b0, k0, r0 = measure()
    for _ = 1, 2000 do round() end
    local b1, k1, r1 = measure()
    print(('\n  after 500 / 2500 rounds: tensor bytes %d / %d, Lua KiB %.0f / %.0f, live refs %d / %d'):format(
      b0, b1, k0, k1, r0, r1))
    assert.is_true(b1 <= b0 + 64 * 1024, ('tensor bytes grew from %d to %d'):format(b0, b1))
    assert.is_true(k1 <= k0 + 512, ('Lua memory grew from %.0f KiB to %.0f KiB'):format(k0, k1))
    assert.is_true(r1 <= r0 + 4, ('live registry references grew from %d to %d'):format(r0, r1))
  end)
end)
