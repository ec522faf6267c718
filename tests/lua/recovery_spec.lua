-- recovery_spec: the seed's recovery LoRA on V2 layers (forward, gradients, enable_all, freeze, checkpoints,
-- resnap_with_lora) and the training options of scripts/qat_options.lua (auto-snap, anchor KL), on a tiny Qwen3.
local torch = require 'torch'
local nn = require 'nn'
local optim = require 'optim'
local quant = require 'quant'
local trainer = require 'trainer'
local qo = require 'qat_options'
local h = require 'helper'

local function tiny(layers)
  torch.manual_seed(0)
  return nn.from_config({
    model_type = 'qwen3', vocab_size = 40, hidden_size = 64, intermediate_size = 96,
    num_hidden_layers = layers or 2, num_attention_heads = 4, num_key_value_heads = 2, head_dim = 16,
    max_position_embeddings = 64, tie_word_embeddings = true, initializer_range = 0.1,
  })
end

local ids = torch.tensor({{3, 17, 39, 0, 12, 7}, {5, 5, 9, 31, 2, 1}}, {dtype = 'int64'})

local function param(m, name)
  for _, p in ipairs(m:named_parameters()) do if p[1] == name then return p[2] end end
end

local function quantized()
  local m = tiny()
  m:eval()
  quant.replace(m, {preset = 'q2a4'})
  return m
end

local UP = 'model.layers.0.mlp.up_proj'

describe('recovery LoRA', function()
  it('forward = V2 forward + (alpha/r) x A^T B^T; B = 0 leaves the output; autograd = the plain formula', function()
    local m = quantized()
    local W = m:get_linear(UP):clone()   -- W_eff = Q * S  (96, 64)
    local y0 = torch.no_grad(function() return m(ids) end)
    quant.enable_recovery_lora(m, UP, {rank = 4, alpha = 8})
    local A, B = param(m, UP .. '.lora_A'), param(m, UP .. '.lora_B')
    assert.are.same({4, 64}, A:size())
    assert.are.same({96, 4}, B:size())
    assert.are.equal(0, B:abs():sum():item())
    h.close(torch.no_grad(function() return m(ids) end), y0, 0, 0)
    torch.no_grad(function() B:copy_(torch.randn(96, 4) * 0.1) end)
    -- the layer's own input and output, captured by a hook
    local x, y
    local hd = m:register_forward_hook(UP, function(_, input, output) x, y = input, output end)
    quant.freeze_for_recovery_training(m)
    m:train()
    local out = m(ids)
    h.close(y, x:matmul(W:t()) + x:matmul(A:t()):matmul(B:t()) * 2, 1e-5, 1e-4)
    -- gradients of a loss through the model equal those of the plain formula for the same upstream gradient
    local R = torch.randn(y:size())
    local gy = torch.no_grad(function() return R end)
    hd:remove()
    local Ap, Bp = A:detach():clone():requires_grad_(), B:detach():clone():requires_grad_()
    local plain = x:detach():matmul(W:t()) + x:detach():matmul(Ap:t()):matmul(Bp:t()) * 2
    ;(plain * gy):sum():backward()
    ;(y * gy):sum():backward()
    h.close(A.grad, Ap.grad, 1e-5, 1e-4)
    h.close(B.grad, Bp.grad, 1e-5, 1e-4)
    assert.is_nil(param(m, UP .. '.scale_A').grad)
    assert.truthy(out)
    -- weight() is what the layer computes with: W_eff + 2 B A
    h.close(m:get_linear(UP), W + B:matmul(A) * 2, 1e-6, 1e-5)
  end)

  it('enable_all skips k_proj and respects mlp_only; layers report the rank; freeze leaves only LoRA', function()
    local m = quantized()
    local names, info = quant.enable_recovery_lora_all(m, {rank = 8})
    assert.are.equal(12, #names)
    assert.are.equal(12, info.layers)
    for _, n in ipairs(names) do assert.is_nil(n:find('k_proj', 1, true)) end
    for _, l in ipairs(quant.layers(m)) do
      assert.are.equal(l.name:find('k_proj', 1, true) and 0 or 8, l.lora_rank)
      if l.lora_rank > 0 then assert.are.equal(8, l.lora_alpha) end
    end
    local m2 = quantized()
    assert.are.equal(6, #quant.enable_recovery_lora_all(m2, {rank = 2, mlp_only = true}))
    for _, l in ipairs(quant.layers(m2)) do
      assert.are.equal(l.name:find('mlp', 1, true) and 2 or 0, l.lora_rank)
    end
    assert.are.equal(24, quant.freeze_for_recovery_training(m))
    for _, p in ipairs(m:named_parameters()) do
      assert.are.equal(p[1]:find('.lora_', 1, true) ~= nil, p[2].requires_grad, p[1])
    end
    -- bad input names the option / the layer
    assert.has_error(function() quant.enable_recovery_lora_all(m2, {rank = 0}) end,
                     "bad argument #2 to 'quant.enable_recovery_lora_all' (option 'rank': expected >= 1, got 0)")
    assert.has_error(function() quant.enable_recovery_lora_all(m2, {rnak = 4}) end)
    local ok, err = pcall(quant.enable_recovery_lora, tiny(), UP, {rank = 2})   -- a dense layer
    assert.is_false(ok)
    assert.truthy(tostring(err):find("layer '" .. UP .. "' is not a V2", 1, true))
  end)

  it('save_checkpoint / load_checkpoint and state_dict carry the adapters', function()
    local m = quantized()
    quant.enable_recovery_lora_all(m, {rank = 4, alpha = 2})
    torch.no_grad(function()
      for _, p in ipairs(m:named_parameters()) do
        if p[1]:find('lora_B', 1, true) then p[2]:copy_(torch.randn(p[2]:size()) * 0.1) end
      end
    end)
    local y = torch.no_grad(function() return m(ids) end)
    local dir = h.tmpdir()
    quant.save_checkpoint(m, dir .. '/ck')
    local m2 = tiny()
    m2:eval()
    quant.load_checkpoint(m2, dir .. '/ck')
    local l = quant.layers(m2)[1]
    assert.are.equal(4, l.lora_rank)
    assert.are.equal(2, l.lora_alpha)
    h.close(torch.no_grad(function() return m2(ids) end), y, 1e-6, 1e-5)
    -- model:state_dict / load_state_dict into a model with LoRA enabled (what trainer resume does)
    local m3 = quantized()
    quant.enable_recovery_lora_all(m3, {rank = 4, alpha = 2})
    m3:load_state_dict(m:state_dict())
    h.close(torch.no_grad(function() return m3(ids) end), y, 1e-6, 1e-5)
    -- export_hf writes W_eff + scaling B A
    quant.export_hf(m, dir .. '/hf')
    local dense = nn.from_pretrained(dir .. '/hf')
    dense:eval()
    h.close(torch.no_grad(function() return dense(ids) end), y, 1e-4, 1e-3)
    os.execute('rm -rf ' .. h.q(dir))
  end)

  it('resnap_with_lora: new indices nearest to W_eff + dW with S unchanged, LoRA dropped', function()
    local m = quantized()
    quant.enable_recovery_lora(m, UP, {rank = 4})
    local A, B = param(m, UP .. '.lora_A'), param(m, UP .. '.lora_B')
    torch.no_grad(function() B:copy_(torch.randn(96, 4) * 0.5) end)
    local target = m:get_linear(UP):clone()                        -- W_eff + B A (alpha = r)
    local old = target - B:matmul(A):detach()                      -- W_eff
    local idx0 = param(m, UP .. '._indices'):clone()
    local st = quant.resnap_with_lora(m)
    assert.are.equal(1, st.layers)
    assert.is_nil(param(m, UP .. '.lora_A'))
    assert.are.equal(0, quant.layers(m)[1].lora_rank)
    local new = m:get_linear(UP)
    local changed = param(m, UP .. '._indices'):ne(idx0)
    assert.are.equal(st.changed, changed:sum():item())
    assert.is_true(st.changed > 0)
    local dn, dold = (new - target):abs(), (old - target):abs()
    assert.is_true((dn - dold):max():item() <= 1e-6)                -- never farther
    assert.is_true(dn:masked_select(changed):lt(dold:masked_select(changed)):all():item())   -- nearer where changed
  end)
end)

describe('qat_options', function()
  local function snap_run(per_layer, moving_lr)
    local m = quantized()
    quant.set_trainable(m, 'all')
    local moving, still, scales = {}, {}, {}
    for _, p in ipairs(m:named_parameters()) do
      if p[1]:find('rank_magnitude', 1, true) then
        if p[1] == UP .. '.rank_magnitude' then moving[#moving + 1] = p[2] else still[#still + 1] = p[2] end
      elseif p[2].requires_grad then
        scales[#scales + 1] = p[2]   -- scale_A, scale_B: in the optimizer, lr 0 (something still trains)
      end
    end
    local opt = optim.AdamW({{params = still, lr = 0}, {params = moving, lr = moving_lr}, {params = scales, lr = 0}},
                            {weight_decay = 0})
    local hooks = qo.auto_snap{threshold = 1e-3, patience = 2, every = 1, min_checks = 2, target = 'all',
                               per_layer = per_layer}
    local t = trainer.new{model = m, optimizer = opt, loss = function(mm, b) return mm:loss(b) end,
                          data = function() return ids end, steps = 6, hooks = hooks, progress = {mode = 'off'},
                          log_every = 0}
    t:run()
    return m, hooks.state, t
  end

  it('auto_snap (per layer) freezes a magnitude that stopped moving, not one that moves; optimizer rebuilt', function()
    local m, st, t = snap_run(true, 0.05)
    local g = param(m, UP .. '.rank_magnitude')
    assert.is_true(g.requires_grad)                                 -- still moving (Adam steps of ~0.05)
    local other = param(m, 'model.layers.1.mlp.down_proj.rank_magnitude')
    assert.is_false(other.requires_grad)                            -- lr 0: stopped, snapped, frozen
    h.close(other, other:half():float(), 0, 0)                      -- fp16 values
    assert.are.equal(13, #st.snapped)
    assert.are.equal(1 + 28, #t.params)                             -- the rebuilt AdamW holds what trains
    assert.are.equal(2, #t.optimizer:param_groups())
    assert.are.equal(0.05, t.optimizer:param_groups()[1].lr)
  end)

  it('auto_snap (the seed rule: max over all layers) waits while any layer moves, then snaps all', function()
    local m, st = snap_run(false, 0.05)
    assert.are.equal(0, #st.snapped)
    assert.is_true(param(m, UP .. '.rank_magnitude').requires_grad)
    local m2, st2 = snap_run(false, 0)
    assert.are.equal(14, #st2.snapped)
    for _, p in ipairs(m2:named_parameters()) do
      if p[1]:find('rank_magnitude', 1, true) then assert.is_false(p[2].requires_grad, p[1]) end
    end
    assert.has_error(function() qo.auto_snap{target = 'mlpp'} end)
  end)

  it('anchor KL equals a hand-computed KL, is 0 against itself, and wraps a loss', function()
    local a = torch.tensor({{{1.0, 2.0, 0.5}, {0.0, 0.0, 3.0}}})
    local s = torch.tensor({{{0.5, 0.5, 1.0}, {2.0, -1.0, 0.0}}})
    local function hand(T)
      local tot = 0
      for pos = 1, 2 do
        local za, zs, ea, es = 0, 0, {}, {}
        for v = 1, 3 do
          ea[v] = math.exp(a[1][pos][v]:item() / T); za = za + ea[v]
          es[v] = math.exp(s[1][pos][v]:item() / T); zs = zs + es[v]
        end
        for v = 1, 3 do
          local p, q = ea[v] / za, es[v] / zs
          tot = tot + p * math.log(p / q)
        end
      end
      return tot / 2 * T * T
    end
    h.close(qo.kl(a, s, 1), hand(1), 1e-6, 0)
    h.close(qo.kl(a, s, 2), hand(2), 1e-6, 0)
    local m = quantized()
    local anchor = tiny()
    anchor:eval()
    local self_ak = qo.anchor_kl(m, {weight = 0.5})
    h.close(torch.no_grad(function() return select(2, self_ak:loss(m, ids)) end), 0, 1e-6, 0)
    -- against the float model: weight * KL, added by the wrapper, gradient reaches the student
    local ak = qo.anchor_kl(anchor, {weight = 0.5, T = 2})
    local base = function(mm, b) return mm:loss(b), {ce = 1} end
    local loss, parts = ak:wrap(base)(m, ids)
    local ref = qo.kl(torch.no_grad(function() return anchor(ids) end), torch.no_grad(function() return m(ids) end), 2)
    h.close(parts.anchor_kl, ref, 1e-6, 1e-5)
    h.close(loss:detach(), torch.no_grad(function() return m:loss(ids) end) + ref * 0.5, 1e-5, 1e-5)
    assert.is_true(ref:item() > 0)
    -- fixed samples: the anchor's logits are cached and cycled
    local fixed = qo.anchor_kl(anchor, {samples = ids, weight = 1})
    local _, k1 = fixed:loss(m)
    local _, k2 = fixed:loss(m)
    h.close(k1, qo.kl(anchor(ids:narrow(1, 1, 1)), m(ids:narrow(1, 1, 1)), 1), 1e-6, 1e-5)
    h.close(k2, qo.kl(anchor(ids:narrow(1, 2, 1)), m(ids:narrow(1, 2, 1)), 1), 1e-6, 1e-5)
  end)
end)
