-- model_hooks_spec: Lua inside the model: module hooks by Hugging Face name (values, replacement,
-- autograd, checkpointing, generation, errors), Lua layers through set_linear, model:loss.
local torch = require 'torch'
local nn = require 'nn'
local optim = require 'optim'
local trainer = require 'trainer'
local h = require 'helper'

local function tiny(model_type, extra)
  local cfg = {
    model_type = model_type or 'qwen3', vocab_size = 97, hidden_size = 32, intermediate_size = 48,
    num_hidden_layers = 2, num_attention_heads = 4, num_key_value_heads = 2,
    max_position_embeddings = 64, tie_word_embeddings = true, initializer_range = 0.1,
  }
  for k, v in pairs(extra or {}) do cfg[k] = v end
  torch.manual_seed(0)
  return nn.from_config(cfg)
end

local ids = torch.tensor({{3, 17, 96, 0, 42, 7}, {5, 5, 1, 2, 88, 60}}, {dtype = 'int64'})

-- HF RMSNorm with a unit weight (the weights of a fresh model).
local function rmsnorm(x, eps)
  return x * (x:square():mean(-1, {keepdim = true}) + (eps or 1e-6)):rsqrt()
end

-- Next-token CE by hand: mean over targets of -log_softmax(logits)[target].
local function manual_ce(logits, targets, ignore)
  local lp = logits:float():log_softmax(3)
  local keep = targets:ne(ignore or -100)
  local safe = torch.where(keep, targets, torch.zeros_like(targets))
  local nll = -lp:gather(3, safe:unsqueeze(3)):squeeze(3) * keep:float()
  return nll, keep:float():sum()
end

local function count_calls(m, module)
  local n = {0}
  local hd = m:register_forward_hook(module, function() n[1] = n[1] + 1 end)
  return n, hd
end

describe('module hooks', function()
  it('named_modules lists every module under its HF name with its type', function()
    local m = tiny('qwen3')
    local mods = m:named_modules()
    -- embed + 2 layers x (layer, 2 norms, attn, q/k/v/o, q/k norms, mlp, gate/up/down) + norm + lm_head
    assert.are.equal(1 + 2 * 14 + 2, #mods)
    assert.are.same({'model.embed_tokens', 'Embedding'}, mods[1])
    assert.are.same({'model.layers.0', 'DecoderLayer'}, mods[2])
    assert.are.same({'model.layers.0.input_layernorm', 'RMSNorm'}, mods[3])
    assert.are.same({'model.layers.0.self_attn', 'Attention'}, mods[4])
    assert.are.same({'model.layers.0.self_attn.q_proj', 'Linear'}, mods[5])
    assert.are.same({'lm_head', 'Linear (tied)'}, mods[#mods])
    assert.are.same({'model.norm', 'RMSNorm'}, mods[#mods - 1])
    -- llama: no q/k norms; gpt (relu2): no gate_proj
    assert.are.equal(1 + 2 * 12 + 2, #tiny('llama'):named_modules())
    assert.are.equal(1 + 2 * 13 + 2, #tiny('qatlab_gpt'):named_modules())
  end)

  it('hooks see the values the model computes', function()
    local m = tiny('qwen3')
    m:eval()
    local seen = {}
    local hs = {}
    for _, name in ipairs({'model.embed_tokens', 'model.layers.0', 'model.layers.0.input_layernorm',
                           'model.layers.0.self_attn.q_proj', 'model.norm', 'lm_head'}) do
      hs[#hs + 1] = m:register_forward_hook(name, function(n, input, output)
        assert.are.equal(name, n)
        seen[n] = {input, output}
      end)
    end
    local logits = m:forward(ids)
    local hidden = m:forward(ids, {output = 'hidden'})
    -- lm_head: input = final hidden, output = logits (tied: hidden @ E^T)
    h.close(seen['lm_head'][1], hidden, 1e-6, 1e-5)
    h.close(seen['lm_head'][2], logits, 1e-6, 1e-5)
    local E = m:state_dict()['model.embed_tokens.weight']
    h.close(seen['model.embed_tokens'][2], E:index_select(1, ids:reshape(-1)):view(2, 6, 32), 0, 0)
    -- q_proj's input is the input norm's output; its output is input @ W^T
    local qin = seen['model.layers.0.self_attn.q_proj'][1]
    h.close(qin, seen['model.layers.0.input_layernorm'][2], 0, 0)
    h.close(qin, rmsnorm(seen['model.embed_tokens'][2]), 1e-5, 1e-4)
    local W = m:get_linear('model.layers.0.self_attn.q_proj')
    h.close(seen['model.layers.0.self_attn.q_proj'][2], qin:matmul(W:t()), 1e-5, 1e-4)
    -- model.norm normalizes the last layer's output
    h.close(seen['model.norm'][2], rmsnorm(seen['model.norm'][1]), 1e-5, 1e-4)
    for _, hd in ipairs(hs) do assert.is_true(hd:remove()) end
    assert.is_false(hs[1]:remove())
  end)

  it('a hook may replace outputs and inputs; removing it restores the model', function()
    local m = tiny('qwen3')
    local base = m:forward(ids)
    -- skipping layer 1 (its output := its input) leaves norm(layer 0's output)
    local l0
    local h0 = m:register_forward_hook('model.layers.0', function(_, _, out) l0 = out end)
    local h1 = m:register_forward_hook('model.layers.1', function(_, input) return input end)
    local hidden = m:forward(ids, {output = 'hidden'})
    h.close(hidden, rmsnorm(l0), 1e-5, 1e-4)
    h0:remove(); h1:remove()
    -- a pre-hook replacing lm_head's input with zeros gives zero logits
    local hp = m:register_forward_pre_hook('lm_head', function(_, x) return torch.zeros_like(x) end)
    assert.are.equal(0, m:forward(ids):abs():max():item())
    hp:remove()
    h.close(m:forward(ids), base, 0, 0)
  end)

  it('names, Lua patterns and lists select modules; nothing matched is an error', function()
    local m = tiny('qwen3')
    local n, hd = count_calls(m, 'mlp%.down_proj$')
    m:forward(ids)
    assert.are.equal(2, n[1])
    hd:remove()
    local n2, hd2 = count_calls(m, {'model.layers.1.mlp', 'lm_head'})
    m:forward(ids)
    assert.are.equal(2, n2[1])
    hd2:remove()
    local ok, err = pcall(m.register_forward_hook, m, 'mlp.nothing', function() end)
    assert.is_false(ok)
    assert.truthy(err:find('matches none', 1, true))
    err = select(2, pcall(m.register_forward_hook, m, {'model.layers.7'}, function() end))
    assert.truthy(err:find("no module named 'model.layers.7'", 1, true))
    err = select(2, pcall(m.register_forward_hook, m, 'lm_head', 'not a function'))
    assert.truthy(err:find("bad argument #3 to 'Model:register_forward_hook' (hook:", 1, true), err)   -- self counted: a '.' call
  end)

  it('run inside autograd: a hook scaling lm_head by a parameter gets its gradient', function()
    local m = tiny('qwen3')
    local plain = m:forward(ids):detach()
    local s = torch.tensor(1.5):requires_grad_()
    local hd = m:register_forward_hook('lm_head', function(_, _, out) return out * s end)
    local logits = m:forward(ids)
    logits:sum():backward()
    h.close(s.grad, plain:sum(), 1e-3, 1e-5)   -- d(sum(s * z))/ds = sum(z)
    hd:remove()
  end)

  it('with gradient checkpointing, hooks inside a layer fire again in backward (is_recomputing)', function()
    local m = tiny('qwen3')
    m:train()
    local function grads(ckpt)
      m:gradient_checkpointing(ckpt)
      for _, p in ipairs(m:parameters()) do p.grad = nil end
      local calls = {mlp = 0, recomputed = 0, layer = 0}
      local a = m:register_forward_hook('model.layers.0.mlp', function(_, _, out)
        calls.mlp = calls.mlp + 1
        if m:is_recomputing() then calls.recomputed = calls.recomputed + 1 end
        return out * 0.5
      end)
      local b = m:register_forward_hook('model.layers.0', function() calls.layer = calls.layer + 1 end)
      m:forward(ids):float():pow(2):mean():backward()
      a:remove(); b:remove()
      local g = {}
      for i, p in ipairs(m:parameters()) do g[i] = p.grad:clone() end
      return g, calls
    end
    local g0, c0 = grads(false)
    local g1, c1 = grads(true)
    assert.are.same({mlp = 1, recomputed = 0, layer = 1}, c0)
    assert.are.same({mlp = 2, recomputed = 1, layer = 1}, c1)
    for i = 1, #g0 do h.close(g1[i], g0[i], 1e-6, 1e-4) end
  end)

  it('fire in the KV-cache generator, once per forward step', function()
    local m = tiny('qwen3')
    m:eval()
    local n, hd = count_calls(m, 'lm_head')
    local r = m:generate{input_ids = ids[1], max_new_tokens = 4}
    assert.are.equal(4, #r[1])
    assert.is_true(n[1] >= 4 and n[1] <= 5, 'lm_head ran ' .. n[1] .. ' times')
    hd:remove()
  end)

  it('a failing hook is a Lua error naming the hook and the module; the model stays usable', function()
    local m = tiny('qwen3')
    local base = m:forward(ids)
    local hd = m:register_forward_hook('model.layers.1.mlp', function() error('boom in hook') end)
    local ok, err = pcall(m.forward, m, ids)
    assert.is_false(ok)
    assert.truthy(err:find('forward hook on model.layers.1.mlp', 1, true), err)
    assert.truthy(err:find('model_hooks_spec.lua:%d+: boom in hook'), err)
    assert.is_true(hd:remove())
    h.close(m:forward(ids), base, 0, 0)
    local bad = m:register_forward_hook('lm_head', function() return 'nope' end)
    err = select(2, pcall(m.forward, m, ids))
    assert.truthy(err:find('expected a replacement Tensor or nil, got string', 1, true), err)
    bad:remove()
  end)

  it('cost nothing when absent: no hook registered leaves outputs bit-identical', function()
    local m = tiny('llama')
    local a = m:forward(ids)
    local hd = m:register_forward_hook('model.layers.0.mlp', function() end)
    local b = m:forward(ids)
    hd:remove()
    h.close(b, a, 0, 0)
    h.close(m:forward(ids), a, 0, 0)
  end)
end)

describe('Lua layers', function()
  local name = 'model.layers.0.self_attn.q_proj'

  it('set_linear with an nn.Linear copy gives the same outputs and joins the parameters', function()
    local m = tiny('qwen3', {tie_word_embeddings = false})
    local base = m:forward(ids)
    local lin = nn.Linear.from_weight(m:get_linear(name):clone())
    m:set_linear(name, lin)
    h.close(m:forward(ids), base, 1e-6, 1e-5)
    assert.are.same({name, 'LuaLinear'}, m:named_modules()[5])
    assert.are.equal(lin, m:get_submodule(name))
    local found
    for _, p in ipairs(m:named_parameters()) do
      if p[1] == name .. '.weight' then found = p[2] end
    end
    assert.truthy(found, 'the Lua weight is a model parameter')
    assert.is_true(found:equal(lin.weight))
    -- gradients reach the Lua tensor
    m:forward(ids):float():pow(2):mean():backward()
    assert.truthy(lin.weight.grad)
    assert.is_true(lin.weight.grad:abs():sum():item() > 0)
  end)

  it('state_dict / load_state_dict, to(), train/eval and save_pretrained act on the Lua tensors', function()
    local m = tiny('qwen3')
    local lin = nn.Linear.from_weight(m:get_linear(name):clone())
    m:set_linear(name, lin)
    local sd = m:state_dict()
    assert.truthy(sd[name .. '.weight'])
    local new = torch.randn(32, 32) * 0.1
    sd[name .. '.weight'] = new
    m:load_state_dict(sd)
    h.close(lin.weight, new, 0, 0)
    m:eval()
    assert.is_false(lin.training)
    m:train()
    assert.is_true(lin.training)
    m:to('float64')
    assert.are.equal('float64', lin.weight.dtype)
    assert.is_true(lin.weight.requires_grad)
    h.close(m:forward(ids):float(), m:forward(ids):float(), 0, 0)
    m:to('float32')
    local dir = h.tmpdir()
    m:save_pretrained(dir)
    local m2 = nn.from_pretrained(dir)
    h.close(m2:forward(ids), m:forward(ids), 1e-6, 1e-5)
    h.close(m2:get_linear(name), new, 0, 0)
  end)

  it('a LoRA on a projection trains under AdamW, with checkpointing, and exports its merged weight', function()
    local m = tiny('qwen3')
    m:requires_grad_(false)
    local lora = nn.LoRA(nn.Linear.from_weight(m:get_linear(name):clone()), {rank = 4})
    m:set_linear(name, lora)
    m:gradient_checkpointing(true)
    local trainable = {}
    for _, p in ipairs(m:named_parameters()) do
      if p[2].requires_grad then trainable[#trainable + 1] = p[1] end
    end
    table.sort(trainable)
    assert.are.same({name .. '.lora_A', name .. '.lora_B'}, trainable)
    local opt = optim.AdamW({lora.lora_A, lora.lora_B}, {lr = 1e-2})
    local first, last
    for step = 1, 30 do
      opt:zero_grad()
      local loss = m:loss(ids)
      loss:backward()
      opt:step()
      if step == 1 then first = loss:item() end
      last = loss:item()
    end
    assert.is_true(last < first - 0.05, ('loss %g -> %g'):format(first, last))
    assert.is_true(lora.lora_B:abs():sum():item() > 0)
    local dir = h.tmpdir()
    m:save_pretrained(dir)
    h.close(nn.from_pretrained(dir):forward(ids), m:forward(ids), 1e-5, 1e-4)
  end)

  it('trainer checkpoints and resume carry a Lua layer', function()
    local function make()
      local m = tiny('qwen3')
      m:set_linear(name, nn.Linear.from_weight(m:get_linear(name):clone()))
      return m
    end
    local data = function() return (torch.randint(0, 97, {2, 1}) + torch.arange(8)) % 97 end
    local function run(out, steps, resume)
      local m = make()
      local t = trainer.new{model = m, optimizer = optim.AdamW(m, {lr = 1e-2}), data = data, steps = steps,
        loss = function(model, b) return model:loss(b) end, out = out, save_every = 2, resume = resume,
        progress = {mode = 'off'}, seed = 1, log_every = 1}
      t:run()
      return m
    end
    local full = run(h.tmpdir(), 4)
    local out = h.tmpdir()
    run(out, 2)
    local resumed = run(out, 4, true)
    h.close(resumed:get_submodule(name).weight, full:get_submodule(name).weight, 0, 0)
  end)

  it('a Lua quantizer appears in quant.layers; export_hf and quant.replace{factory=} take Lua layers', function()
    local quant = require 'quant'
    local m = tiny('qwen3')
    -- a 3-bit per-row uniform quantizer written in Lua, with a straight-through rounding
    local Q3 = nn.Module:extend('Q3')
    function Q3:__init(w)
      self.out_features, self.in_features = w:size(1), w:size(2)
      self:register_parameter('weight', w:clone())
      self:register_parameter('step', w:abs():amax(2, {keepdim = true}) / 3)
    end
    function Q3:dense_weight()
      local v = (self.weight / self.step):clamp(-4, 3)
      return (v + (v:round() - v):detach()) * self.step
    end
    function Q3:forward(x) return x:matmul(self:dense_weight():t()) end
    function Q3:quant_info() return {kind = 'int3', bits_per_weight = 3 + 16 / self.in_features} end
    m:set_linear(name, Q3(m:get_linear(name)))
    local ql = quant.layers(m)
    assert.are.equal(1, #ql)
    assert.are.same({name = name, kind = 'int3', bits_per_weight = 3.5}, ql[1])
    local dir = h.tmpdir()
    quant.export_hf(m, dir)
    local back = nn.from_pretrained(dir)
    h.close(back:get_linear(name), m:get_submodule(name):dense_weight(), 0, 0)
    h.close(back:forward(ids), m:forward(ids), 1e-5, 1e-4)
    -- the factory gets each replaced layer's float weight and its recipe
    local f = tiny('llama')
    local seen = {}
    local names = quant.replace(f, {recipe = {['mlp%.up_proj'] = {lut = 8, rank = 2}}, factory = function(n, w, b, cfg)
      seen[#seen + 1] = {n, cfg.lut, cfg.rank, b == nil}
      return Q3(w)
    end})
    assert.are.same({'model.layers.0.mlp.up_proj', 'model.layers.1.mlp.up_proj'}, names)
    assert.are.same({'model.layers.0.mlp.up_proj', 8, 2, true}, seen[1])
    assert.are.equal('Q3', f:get_submodule('model.layers.1.mlp.up_proj').__name)
  end)

  it('errors name the module and both shapes; a failing layer leaves the model usable', function()
    local m = tiny('qwen3')
    local base = m:forward(ids)
    local w = m:get_linear(name):clone()
    local bad = {in_features = 32, out_features = 32, w = w}
    function bad.forward(_, x) return x:narrow(3, 1, 16) end
    m:set_linear(name, bad)
    local ok, err = pcall(m.forward, m, ids)
    assert.is_false(ok)
    assert.truthy(err:find('Lua layer ' .. name .. ':forward: returned shape (2, 6, 16) for input (2, 6, 32), ' ..
      'expected (2, 6, 32)', 1, true), err)
    function bad.forward(_, x) return x:double() end
    err = select(2, pcall(m.forward, m, ids))
    assert.truthy(err:find('returned torch.float64 for torch.float32 input', 1, true) or
                  err:find('returned float64', 1, true) or err:find('Double', 1, true), err)
    function bad.forward() error('layer failed') end
    err = select(2, pcall(m.forward, m, ids))
    assert.truthy(err:find('Lua layer ' .. name .. ':forward', 1, true) and err:find('layer failed', 1, true), err)
    -- plain tables: tensor fields are the parameters; no weight() means no export
    function bad.forward(self, x) return x:matmul(self.w:t()) end
    h.close(m:forward(ids), base, 1e-6, 1e-5)
    ok, err = pcall(m.save_pretrained, m, h.tmpdir())
    assert.is_false(ok)
    assert.truthy(err:find('weight', 1, true), err)
    -- wrong shapes are refused at set_linear
    err = select(2, pcall(m.set_linear, m, name, nn.Linear(32, 16)))
    assert.truthy(err:find('expected 32x32, found 16x32', 1, true), err)
    err = select(2, pcall(m.set_linear, m, name, {forward = function() end}))
    assert.truthy(err:find('in_features', 1, true), err)
    err = select(2, pcall(m.set_linear, m, 'model.layers.0.mlp', nn.Linear(32, 32)))
    assert.truthy(err:find('no projection named', 1, true), err)
  end)
end)

describe('model:loss', function()
  it('equals the next-token cross-entropy by hand, in value and gradient, chunk by chunk', function()
    for _, mt in ipairs({'qwen3', 'qatlab_gpt'}) do   -- tied, and untied with a logit softcap
      local m = tiny(mt, mt == 'qatlab_gpt' and {tie_word_embeddings = false} or nil)
      local nll, n = manual_ce(m:forward(ids:narrow(2, 1, 5)), ids:narrow(2, 2, 5))
      local want = nll:sum() / n
      want:backward()
      local g_want = {}
      for i, p in ipairs(m:parameters()) do g_want[i] = p.grad:clone(); p.grad = nil end
      local got = m:loss(ids, {chunk = 3})
      h.close(got, want, 1e-5, 1e-5)
      got:backward()
      for i, p in ipairs(m:parameters()) do h.close(p.grad, g_want[i], 1e-6, 1e-4) end
    end
  end)

  it('labels, ignore_index, attention_mask and reductions', function()
    local m = tiny('llama')
    local labels = ids:clone()
    labels[{1, 3}] = -100
    labels[{2, {5, 6}}] = -100
    local nll, n = manual_ce(m:forward(ids:narrow(2, 1, 5)), labels:narrow(2, 2, 5))
    h.close(m:loss(ids, {labels = labels}), nll:sum() / n, 1e-5, 1e-5)
    h.close(m:loss(ids, {labels = labels, reduction = 'sum'}), nll:sum(), 1e-4, 1e-5)
    h.close(m:loss(ids, {labels = labels, reduction = 'none'}), nll, 1e-5, 1e-5)
    -- a padding mask removes padded targets (and is the model's attention mask)
    local mask = torch.ones(2, 6, {dtype = 'int64'})
    mask[{2, {5, 6}}] = 0
    local lab2 = ids:clone()
    lab2[{2, {5, 6}}] = -100
    local nll2, n2 = manual_ce(m:forward(ids, {attention_mask = mask}):narrow(2, 1, 5), lab2:narrow(2, 2, 5))
    h.close(m:loss(ids, {attention_mask = mask}), nll2:sum() / n2, 1e-5, 1e-5)
    local err = select(2, pcall(m.loss, m, ids, {reduction = 'avg'}))
    assert.truthy(err:find("'mean', 'sum' or 'none'", 1, true), err)
    err = select(2, pcall(m.loss, m, ids, {labels = ids + 200}))
    assert.truthy(err:find('outside [0, 97)', 1, true), err)
    assert.is_false((pcall(m.loss, m, ids, {lables = ids})))
  end)

  it('lm_head_weight is the embedding when tied, the head otherwise', function()
    local t = tiny('qwen3')
    assert.is_true(t:lm_head_weight():equal(t:state_dict()['model.embed_tokens.weight']))
    local u = tiny('qwen3', {tie_word_embeddings = false})
    assert.is_true(u:lm_head_weight():equal(u:state_dict()['lm_head.weight']))
  end)
end)
