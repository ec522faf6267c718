-- optim: AdamW/SGD/Muon from Lua: a tiny regression trained to low loss, parameter groups,
-- lr/momentum setters, state-dict round trips (also through safetensors), clipping and errors.
local torch = require 'torch'
local optim = require 'optim'
local nn = require 'nn'
local h = require 'helper'
local json = require 'json'

local function errmsg(f, ...)
  local ok, err = pcall(f, ...)
  assert.is_false(ok, 'expected an error')
  return tostring(err)
end

local function fails_with(fragments, f, ...)
  local msg = errmsg(f, ...)
  for _, frag in ipairs(fragments) do
    assert(msg:find(frag, 1, true), ('message %q lacks %q'):format(msg, frag))
  end
end

-- y = X W* + b* with a fixed target; returns the data and fresh parameters.
local function problem()
  torch.manual_seed(3)
  local X = torch.randn(64, 4)
  local Wt = torch.randn(4, 2)
  local Y = X:matmul(Wt) + 0.5
  local W = torch.zeros(4, 2):requires_grad_()
  local b = torch.zeros(2):requires_grad_()
  return X, Y, W, b
end

local function loss_of(X, Y, W, b) return ((X:matmul(W) + b - Y) ^ 2):mean() end

local function train(opt, X, Y, W, b, steps)
  local loss
  for _ = 1, steps do
    opt:zero_grad()
    loss = loss_of(X, Y, W, b)
    loss:backward()
    opt:step()
  end
  return loss_of(X, Y, W, b):item()
end

describe('optim', function()
  it('AdamW trains a tiny regression to low loss', function()
    local X, Y, W, b = problem()
    local opt = optim.AdamW({W, b}, {lr = 0.05, betas = {0.9, 0.95}, eps = 1e-8, weight_decay = 0})
    local start = loss_of(X, Y, W, b):item()
    local final = train(opt, X, Y, W, b, 300)
    assert.is_true(final < 1e-3 * start, ('loss %g -> %g'):format(start, final))
    assert.truthy(tostring(opt):find('AdamW'))
  end)

  it('SGD with Nesterov momentum trains it too', function()
    local X, Y, W, b = problem()
    local opt = optim.SGD({W, b}, {lr = 0.05, momentum = 0.9, nesterov = true})
    assert.is_true(train(opt, X, Y, W, b, 200) < 1e-4)
  end)

  it('one SGD step by hand, and param groups with different lr', function()
    local a = torch.tensor({1.0, 2.0}):requires_grad_()
    local c = torch.tensor({3.0}):requires_grad_()
    local opt = optim.SGD({{params = {a}, lr = 0.1}, {params = {c}}}, {lr = 0.01, weight_decay = 0.5})
    local groups = opt:param_groups()
    assert.are.equal(2, #groups)
    assert.are.equal(0.1, groups[1].lr)
    assert.are.equal(0.01, groups[2].lr)
    assert.are.equal(0.5, groups[2].weight_decay)
    assert.are.equal(1, #groups[1].params)
    ;(a:sum() + c:sum() * 2):backward()
    opt:step()
    -- p -= lr * (g + wd * p)
    h.close(a, {1 - 0.1 * (1 + 0.5), 2 - 0.1 * (1 + 1.0)}, 1e-6)
    h.close(c, {3 - 0.01 * (2 + 1.5)}, 1e-6)
    opt:set_lr(0.2, 2)
    assert.are.equal(0.2, opt:param_groups()[2].lr)
    assert.are.equal(0.1, opt:param_groups()[1].lr)
    opt:set_lr(0.3)
    assert.are.equal(0.3, opt:param_groups()[1].lr)
    opt:set_momentum(0.9, 1)
    assert.are.equal(0.9, opt:param_groups()[1].momentum)
    opt:zero_grad()
    assert.is_nil(a.grad)
  end)

  it('state_dict round trip continues the identical trajectory (also through safetensors)', function()
    local X, Y = problem()
    local function fresh() return torch.zeros(4, 2):requires_grad_(), torch.zeros(2):requires_grad_() end
    local W1, b1 = fresh()
    local o1 = optim.AdamW({W1, b1}, {lr = 0.01})
    train(o1, X, Y, W1, b1, 10)
    local W2, b2 = W1:detach():clone():requires_grad_(), b1:detach():clone():requires_grad_()
    local sd = o1:state_dict()
    assert.are.equal('AdamW', sd.meta.kind)
    assert.are.equal(10, sd.meta.state[1].step)
    assert.is_true(torch.is_tensor(sd.tensors['state.0.exp_avg']))
    local dir = h.tmpdir()
    torch.save(dir .. '/opt.safetensors', sd.tensors, {metadata = {meta = json.encode(sd.meta)}})
    local o2 = optim.AdamW({W2, b2}, {lr = 0.5})
    o2:load_state_dict({tensors = torch.load(dir .. '/opt.safetensors'), meta = json.decode(torch.load_metadata(dir .. '/opt.safetensors').meta)})
    assert.are.equal(0.01, o2:param_groups()[1].lr)
    train(o1, X, Y, W1, b1, 5)
    train(o2, X, Y, W2, b2, 5)
    h.close(W2, W1, 0, 0)
    h.close(b2, b1, 0, 0)
    -- state_dict() is the one form load_state_dict takes; a JSON string is not it
    assert.is_nil(sd.meta_json)
    assert.truthy(errmsg(function() o1:load_state_dict({tensors = sd.tensors, meta = json.encode(sd.meta)}) end)
                  :find("field 'meta': expected a table", 1, true))
    local o3 = optim.AdamW({W2, b2})
    o3:load_state_dict(o2:state_dict())
    assert.are.equal(15, o3:state_dict().meta.state[2].step)
  end)

  it('Muon orthogonalizes a matrix update', function()
    torch.manual_seed(5)
    local W = torch.zeros(8, 8):requires_grad_()
    local opt = optim.Muon({W}, {lr = 0.1, momentum = 0.95, nesterov = true, ns_steps = 5, ns_bf16 = false})
    local G = torch.randn(8, 8)
    W.grad = G
    opt:step()
    -- one step from zero: W = -lr * NS(g + 0.95 g); singular values of W/lr near 1
    local U = W:detach() / -0.1
    local diag = (U ^ 2):sum(2)   -- the diagonal of U Uᵀ
    assert.is_true(diag:min():item() > 0.4 and diag:max():item() < 1.6, tostring(diag))
    local _, S = torch.linalg.svd(U)
    assert.is_true(S:min():item() > 0.6 and S:max():item() < 1.3, tostring(S))
    local g = opt:param_groups()[1]
    assert.are.equal(5, g.ns_steps)
    assert.is_true(g.nesterov)
    fails_with({'optim.Muon', '2-D'}, optim.Muon, {torch.zeros(3):requires_grad_()})
  end)

  it('clip_grad_norm returns the total norm and scales the gradients', function()
    local a = torch.zeros(2):requires_grad_()
    local b = torch.zeros(1):requires_grad_()
    a.grad = torch.tensor({3.0, 0.0})
    b.grad = torch.tensor({4.0})
    assert.is_true(math.abs(optim.clip_grad_norm({a, b}, 1.0):item() - 5) < 1e-5)   -- a tensor, as torch
    h.close(b.grad, {0.8}, 1e-5)
  end)

  it('takes a model: its trainable parameters', function()
    torch.manual_seed(0)
    local m = nn.from_config({model_type = 'qwen3', vocab_size = 31, hidden_size = 16, intermediate_size = 24,
      num_hidden_layers = 1, num_attention_heads = 2, num_key_value_heads = 1, max_position_embeddings = 16})
    m:requires_grad_(true)
    local opt = optim.AdamW(m, {lr = 1e-3})
    assert.are.equal(#m:parameters(), #opt:param_groups()[1].params)
    local ids = torch.tensor({{1, 2, 3, 4}}, {dtype = 'int64'})
    local before = m:forward(ids):sum():item()
    m:forward(ids):pow(2):mean():backward()
    assert.is_true(optim.clip_grad_norm(m, 1.0):item() > 0)
    opt:step()
    assert.are_not.equal(before, m:forward(ids):sum():item())
    local named = optim.SGD(m:named_parameters(), {lr = 0.1})   -- {name, tensor} pairs
    assert.are.equal(#m:parameters(), #named:param_groups()[1].params)
  end)

  it('errors name the function and the problem', function()
    local p = torch.zeros(2):requires_grad_()
    fails_with({'optim.AdamW', "unknown option 'momentum'"}, optim.AdamW, {p}, {momentum = 0.9})
    fails_with({'optim.SGD', "unknown option 'betas'"}, optim.SGD, {p}, {betas = {0.9, 0.99}})
    fails_with({'optim.AdamW', 'element 2', 'expected a Tensor'}, optim.AdamW, {p, 'x'})
    fails_with({'optim.AdamW', 'group 1', "unknown option 'lrr'"}, optim.AdamW, {{params = {p}, lrr = 1}})
    fails_with({'optim.SGD', 'argument #1'}, optim.SGD, 42)
    fails_with({'optim.SGD', 'empty parameter list'}, optim.SGD, {})
    fails_with({'optim.clip_grad_norm', 'max_norm'}, optim.clip_grad_norm, {p})
    local opt = optim.AdamW({p})
    fails_with({'Optimizer:set_lr', 'group'}, function() opt:set_lr(0.1, 3) end)
    fails_with({'Optimizer:load_state_dict', 'SGD'},
               function() opt:load_state_dict(optim.SGD({p}, {lr = 1}):state_dict()) end)
    fails_with({'Optimizer:step'}, opt.step, 'notanoptimizer')
  end)
end)
