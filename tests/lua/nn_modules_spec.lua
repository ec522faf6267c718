-- nn_modules_spec: the Lua module toolkit (nn.Module, Linear, Embedding, RMSNorm, Sequential, LoRA):
-- values against PyTorch's modules, parameters and state dicts, train/eval, to(), subclasses, errors.
local torch = require 'torch'
local nn = require 'nn'
local json = require 'json'
local h = require 'helper'

-- Fixed inputs both sides compute on (Lua builds them from the same numbers Python prints).
local X = {{0.5, -1.25, 2.0, 0.75}, {-0.3, 0.1, 0.0, 1.5}, {3.0, -2.0, 0.25, -0.5}}
local W = {{0.1, -0.2, 0.3, 0.05}, {-0.4, 0.25, 0.0, 0.6}}
local B = {0.01, -0.02}

local ref = json.decode(h.py([==[
import json, torch
X = torch.tensor(]==] .. json.encode(X) .. [==[)
W = torch.tensor(]==] .. json.encode(W) .. [==[)
B = torch.tensor(]==] .. json.encode(B) .. [==[)
lin = torch.nn.Linear(4, 2)
with torch.no_grad():
    lin.weight.copy_(W); lin.bias.copy_(B)
norm = torch.nn.RMSNorm(4, eps=1e-6)
with torch.no_grad():
    norm.weight.copy_(torch.tensor([1.0, 0.5, 2.0, -1.0]))
emb = torch.nn.Embedding(5, 4, padding_idx=1)
with torch.no_grad():
    emb.weight.copy_(torch.arange(20.).view(5, 4) / 10)
ids = torch.tensor([[0, 1, 4], [1, 3, 3]])
e = emb(ids); e.sum().backward()
print(json.dumps({'linear': lin(X).tolist(), 'rmsnorm': norm(X).tolist(), 'emb': e.tolist(),
                  'emb_grad': emb.weight.grad.tolist()}))
]==]))

describe('nn modules', function()
  it('Linear, RMSNorm and Embedding compute what PyTorch computes', function()
    local x = torch.tensor(X)
    local lin = nn.Linear(4, 2)
    lin:load_state_dict({weight = torch.tensor(W), bias = torch.tensor(B)})
    h.close(lin(x), ref.linear, 1e-6, 1e-6)
    local norm = nn.RMSNorm(4)
    norm:load_state_dict({weight = torch.tensor({1.0, 0.5, 2.0, -1.0})})
    h.close(norm(x), ref.rmsnorm, 1e-6, 1e-5)
    local emb = nn.Embedding(5, 4, {padding_idx = 1})
    emb:load_state_dict({weight = torch.arange(20):float():view(5, 4) / 10})
    local ids = torch.tensor({{0, 1, 4}, {1, 3, 3}}, {dtype = 'int64'})
    local e = emb(ids)
    h.close(e, ref.emb, 1e-6, 1e-6)
    e:sum():backward()
    h.close(emb.weight.grad, ref.emb_grad, 0, 0)   -- the padding row gets no gradient
  end)

  it("Linear's initialisation is PyTorch's: uniform in ±1/sqrt(in_features)", function()
    torch.manual_seed(3)
    local l = nn.Linear(400, 300)
    local bound = 1 / math.sqrt(400)
    assert.is_true(l.weight:abs():max():item() <= bound)
    assert.is_true(l.weight:abs():max():item() > 0.98 * bound)
    -- mean of |U(-b, b)| is b/2
    assert.is_true(math.abs(l.weight:abs():mean():item() - bound / 2) < 0.01 * bound)
    assert.is_true(l.weight.requires_grad and l.bias.requires_grad)
  end)

  it('Sequential names children 1, 2, ...; parameters, state_dict round trip, train/eval, to()', function()
    torch.manual_seed(0)
    local s = nn.Sequential(nn.Linear(4, 8), nn.RMSNorm(8), nn.Linear(8, 2, {bias = false}))
    local names = {}
    for i, p in ipairs(s:named_parameters()) do names[i] = p[1] end
    assert.are.same({'1.weight', '1.bias', '2.weight', '3.weight'}, names)
    assert.are.equal(4, #s:parameters())
    assert.are.equal(3, #s:children())
    local x = torch.tensor(X)
    local t = nn.Sequential():add(nn.Linear(4, 8)):add(nn.RMSNorm(8)):add(nn.Linear(8, 2, {bias = false}))
    t:load_state_dict(s:state_dict())
    h.close(t(x), s(x), 0, 0)
    s:eval()
    assert.is_false(s['1'].training or s['3'].training)
    s:train()
    assert.is_true(s['2'].training)
    s:to('float64')
    assert.are.equal('float64', s['1'].weight.dtype)
    assert.is_true(s['1'].weight.requires_grad)
    h.close(s(x:double()):float(), t(x), 1e-6, 1e-5)
    local ok, err = pcall(t.load_state_dict, t, {['1.weight'] = torch.zeros(8, 4)})
    assert.is_false(ok)
    assert.truthy(err:find('missing keys: 1.bias', 1, true), err)
    err = select(2, pcall(t.load_state_dict, t, {['1.weight'] = torch.zeros(4, 8)}, {strict = false}))
    assert.truthy(err:find('1.weight: shape (4, 8), expected (8, 4)', 1, true), err)
  end)

  it('LoRA: y = base(x) + (alpha/r) x Aᵀ Bᵀ, starts at the base, merges into it', function()
    torch.manual_seed(1)
    local base = nn.Linear(4, 2)
    local lora = nn.LoRA(base, {rank = 2, alpha = 4})
    local x = torch.tensor(X)
    h.close(lora(x), base(x), 0, 0)                       -- B = 0 at the start
    assert.is_false(base.weight.requires_grad)            -- the base is frozen
    torch.no_grad(function() lora.lora_B:copy_(torch.tensor({{0.5, -1}, {2, 0.25}})) end)
    local want = base(x) + x:matmul(lora.lora_A:t()):matmul(lora.lora_B:t()) * 2
    h.close(lora(x), want, 1e-6, 1e-5)
    h.close(x:matmul(lora:weight():t()) + base.bias, want, 1e-6, 1e-5)
    lora:merge_()
    h.close(base(x), want, 1e-6, 1e-5)
    h.close(lora(x), want, 1e-6, 1e-5)
    local names = {}
    for i, p in ipairs(lora:named_parameters()) do names[i] = p[1] end
    assert.are.same({'lora_A', 'lora_B', 'base.weight', 'base.bias'}, names)
  end)

  it('a subclass defines __init and forward; the protocol checks its arguments', function()
    local Scale = nn.Module:extend('Scale')
    function Scale:__init(n) self:register_parameter('s', torch.ones(n)) end
    function Scale:forward(x) return x * self.s end
    local m = Scale(4)
    h.close(m(torch.tensor(X)), X, 1e-6, 1e-6)
    assert.truthy(tostring(m):find('Scale', 1, true))
    local err = select(2, pcall(nn.Linear, 4, 2, {biass = false}))
    assert.truthy(err:find('unknown option "biass"', 1, true), err)
    err = select(2, pcall(m.register_parameter, m, 'a.b', torch.ones(1)))
    assert.truthy(err:find('without dots', 1, true), err)
    err = select(2, pcall(nn.LoRA, nn.Linear(4, 2), {rank = 3}))
    assert.truthy(err:find('rank: expected an integer in [1, 2]', 1, true), err)
    err = select(2, pcall(nn.Module.forward, m))
    assert.truthy(err:find('forward is not defined', 1, true), err)
    assert.is_nil(nn.NoSuchModule)
  end)
end)
