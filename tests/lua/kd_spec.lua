-- kd: the KD loss from Lua: values against a loop in Lua, fused == unfused with gradients, errors,
-- and end to end on tiny models with a synthetic cache made from a teacher's own top-k.
local torch = require 'torch'
local nn = require 'nn'
local kd = require 'kd'
local h = require 'helper'

local function errmsg(f, ...)
  local ok, err = pcall(f, ...)
  assert.is_false(ok, 'expected an error')
  return tostring(err)
end

-- log(sum(exp(x))) of a Lua array
local function lse(x)
  local m = -math.huge
  for _, v in ipairs(x) do m = math.max(m, v) end
  local s = 0
  for _, v in ipairs(x) do s = s + math.exp(v - m) end
  return m + math.log(s)
end

-- A small random problem: the cache is a random teacher's own top-k.
local function problem(B, S, H, V, K, seed)
  torch.manual_seed(seed)
  local hs = torch.randn(B, S, H, {dtype = 'float64'})
  local W = torch.randn(V, H, {dtype = 'float64'})
  local teacher = torch.randn(B, S, V, {dtype = 'float64'}) * 2
  local vals, idx = teacher:topk(K)
  return hs, W, {topk_idx = idx:int(), topk_logits = vals:half()}
end

-- docs/formulas.md §6 with Lua loops: T²·mean KL over the K candidates + w·mean CE_full on the teacher top-1.
local function loop_loss(hs, W, batch, T, w)
  local B, S, H, V, K = hs:size(1), hs:size(2), hs:size(3), W:size(1), batch.topk_idx:size(3)
  local idx, tl = batch.topk_idx:long(), batch.topk_logits:double()
  local kl, ce = 0, 0
  for b = 1, B do
    for s = 1, S do
      local z = {}
      for v = 1, V do
        local acc = 0
        for j = 1, H do acc = acc + hs[b][s][j]:item() * W[v][j]:item() end
        z[v] = acc
      end
      local zs, ts = {}, {}
      for k = 1, K do
        zs[k] = z[idx[b][s][k]:item() + 1] / T
        ts[k] = tl[b][s][k]:item() / T
      end
      local lz, lt = lse(zs), lse(ts)
      for k = 1, K do kl = kl + math.exp(ts[k] - lt) * ((ts[k] - lt) - (zs[k] - lz)) end
      ce = ce + lse(z) - z[idx[b][s][1]:item() + 1]
    end
  end
  return T * T * kl / (B * S) + w * ce / (B * S), T * T * kl / (B * S), ce / (B * S)
end

local function tiny(seed, extra)
  local cfg = {
    model_type = 'qwen3', vocab_size = 61, hidden_size = 32, intermediate_size = 48,
    num_hidden_layers = 2, num_attention_heads = 4, num_key_value_heads = 2,
    max_position_embeddings = 64, tie_word_embeddings = true, initializer_range = 0.2,
  }
  for k, v in pairs(extra or {}) do cfg[k] = v end
  torch.manual_seed(seed)
  return nn.from_config(cfg, {dtype = 'float64'})
end

-- A synthetic cache batch from a teacher model's own logits (B, L-1, K), like the writer (docs/formulas.md §10).
local function cache_batch(teacher, ids, K)
  local L = ids:size(2)
  local logits = torch.no_grad(function() return teacher:forward(ids) end):narrow(2, 1, L - 1)
  local vals, idx = logits:topk(K)
  return {input_ids = ids:int(), attention_mask = torch.ones(ids:size(1), L, {dtype = 'uint8'}),
          topk_idx = idx:int(), topk_logits = vals:float()}
end

describe('kd.loss', function()
  it('matches a loop over positions and returns the parts', function()
    local hs, W, batch = problem(2, 3, 3, 7, 3, 1)
    local want, want_kl, want_ce = loop_loss(hs, W, batch, 2, 0.20005)
    local loss, parts = kd.loss(hs, W, batch)
    assert.is_true(math.abs(loss:item() - want) < 1e-12)
    assert.is_true(math.abs(parts.kl - want_kl) < 1e-12)
    assert.is_true(math.abs(parts.full_ce - want_ce) < 1e-12)
    assert.are.equal(parts.full_ce, parts.top1_ce)   -- V2 reuses one CE
    assert.is_nil(parts.sampled_ce)
    local l2, p2 = kd.loss(hs, W, batch, {T = 1.5, hard_top1 = 0, hard_full = 0})
    local w2 = loop_loss(hs, W, batch, 1.5, 0)
    assert.is_true(math.abs(l2:item() - w2) < 1e-12)
    assert.is_nil(p2.full_ce)
  end)

  it('fused equals the unfused reference in value and gradient for any chunk', function()
    local hs, W, batch = problem(2, 5, 4, 11, 3, 2)
    batch.rand_idx = torch.randint(0, 11, {2, 5, 4}):int()
    batch.rand_logits = torch.randn(2, 5, 4):half()
    batch.attention_mask = torch.ones(2, 6)
    batch.attention_mask[2][6] = 0
    for _, o in ipairs({{}, {hard_top1 = 0, hard_full = 0}, {sampled = 0.5}, {legacy = true, hard_top1 = 0.3, hard_full = 0.2}}) do
      local x = hs:clone():requires_grad_()
      local ref = kd.loss_reference(x, W, batch, o)
      ref:backward()
      local gref = x.grad:clone()
      for _, chunk in ipairs({1, 3, 7, 128}) do
        o.chunk = chunk
        local y = hs:clone():requires_grad_()
        local loss = kd.loss(y, W, batch, o)
        loss:backward()
        h.close(loss, ref, 1e-12, 0)
        h.close(y.grad, gref, 1e-12, 0)
      end
    end
  end)

  it('errors name the tensor or the option', function()
    local hs, W, batch = problem(1, 2, 3, 5, 2, 3)
    assert.truthy(errmsg(kd.loss, hs, W, {topk_idx = batch.topk_idx}):find('topk_logits', 1, true))
    assert.truthy(errmsg(kd.loss, hs, W:narrow(2, 1, 2), batch):find('lm_head_weight', 1, true))
    local bad = {topk_idx = batch.topk_idx:float(), topk_logits = batch.topk_logits}
    assert.truthy(errmsg(kd.loss, hs, W, bad):find('topk_idx: expected int32 or int64', 1, true))
    assert.truthy(errmsg(kd.loss, hs, W, batch, {temprature = 2}):find('temprature', 1, true))
    assert.truthy(errmsg(kd.loss, hs, W, 'x'):find('batch', 1, true))
    local e = errmsg(kd.loss, hs, W, {topk_idx = batch.topk_idx, topk_logits = batch.topk_logits, attention_mask = torch.ones(1, 2)})
    assert.truthy(e:find('^kd.loss: ') or e:find('kd.loss: ', 1, true))
    assert.truthy(e:find('attention_mask', 1, true))
  end)
end)

describe('kd end to end on tiny models', function()
  local ids = torch.tensor({{3, 17, 60, 0, 42, 7, 9, 11}, {5, 5, 1, 33, 21, 8, 2, 40}}, {dtype = 'int64'})

  it('student == teacher: KL is ~0, only the hard terms remain', function()
    local teacher = tiny(0)
    local batch = cache_batch(teacher, ids, 8)
    local loss, parts = kd.loss_model(teacher, batch)   -- T = 2, hard 0.2 + 0.00005
    assert.is_true(math.abs(parts.kl) < 1e-10)
    assert.is_true(math.abs(loss:item() - 0.20005 * parts.full_ce) < 1e-10)
    local kl_only = kd.loss_model(teacher, batch, {hard_top1 = 0, hard_full = 0, T = 3})
    assert.is_true(math.abs(kl_only:item()) < 1e-10)
    -- the teacher's argmax is its own top-1, so the CE equals the mean -log max softmax
    local logits = teacher:forward(ids):narrow(2, 1, 7)
    local lp = logits:log_softmax(3):max(3)
    assert.is_true(math.abs(parts.full_ce + lp:mean():item()) < 1e-10)
  end)

  it('a different student: finite loss, backward reaches the parameters, fused == reference', function()
    local teacher, student = tiny(0), tiny(1)
    local batch = cache_batch(teacher, ids, 8)
    batch.topk_logits = batch.topk_logits:half()   -- the cache stores fp16
    local loss, parts = kd.loss_model(student, batch, {chunk = 5})
    assert.is_true(loss:item() > 0 and loss:item() < math.huge)
    assert.is_true(parts.kl > 0)
    loss:backward()
    local np = student:named_parameters()
    local g = np[2][2].grad   -- a q_proj weight
    assert.is_true(g ~= nil and g:abs():sum():item() > 0)
    local hid = student:forward(ids, {output = 'hidden'})
    local W = student:state_dict()['model.embed_tokens.weight']
    h.close(kd.loss_reference(hid, W, batch), loss, 1e-10, 1e-10)
  end)

  it('evaluate: T²·KL averaged over the first n examples, batches or an iterator', function()
    local teacher, student = tiny(0), tiny(1)
    local batch = cache_batch(teacher, ids, 8)
    local v, n = kd.evaluate(teacher, {batch}, {examples = 40})
    assert.are.equal(2, n)
    assert.is_true(math.abs(v) < 1e-10)
    -- per example: kd.loss_model with B = 1 and no hard terms
    local per = {}
    for i = 1, 2 do
      local one = {}
      for k, t in pairs(batch) do one[k] = t:narrow(1, i, 1) end
      per[i] = kd.loss_model(student, one, {hard_top1 = 0, hard_full = 0}):item()
    end
    student:train()
    local v2 = kd.evaluate(student, {batch}, {examples = 40})
    assert.is_true(math.abs(v2 - (per[1] + per[2]) / 2) < 1e-10)
    assert.is_true(student.training)   -- the mode is restored
    local i = 0
    local v1, n1 = kd.evaluate(student, function() i = i + 1; if i == 1 then return batch end end, {examples = 1})
    assert.are.equal(1, n1)
    assert.is_true(math.abs(v1 - per[1]) < 1e-10)
    assert.truthy(errmsg(kd.evaluate, student, function() error('boom') end):find('boom', 1, true))
  end)

  it('evaluate: the count is named for what it counts (examples or batches); n alone is an error', function()
    local teacher, student = tiny(0), tiny(1)
    local batch = cache_batch(teacher, ids, 8)   -- 2 examples
    local per = {}
    for i = 1, 2 do
      local one = {}
      for k, t in pairs(batch) do one[k] = t:narrow(1, i, 1) end
      per[i] = kd.loss_model(student, one, {hard_top1 = 0, hard_full = 0}):item()
    end
    -- two batches of 2 examples: batches = 1 scores 2 examples, examples = 1 scores one
    local v, n = kd.evaluate(student, {batch, batch}, {batches = 1})
    assert.are.equal(2, n)
    assert.is_true(math.abs(v - (per[1] + per[2]) / 2) < 1e-10)
    local v3, n3 = kd.evaluate(student, {batch, batch}, {batches = 2})
    assert.are.equal(4, n3)
    assert.is_true(math.abs(v3 - (per[1] + per[2]) / 2) < 1e-10)
    local v1, n1 = kd.evaluate(student, {batch, batch}, {examples = 1})
    assert.are.equal(1, n1)
    assert.is_true(math.abs(v1 - per[1]) < 1e-10)
    local _, nd = kd.evaluate(student, {batch}, {})   -- {} is an empty options table
    assert.are.equal(2, nd)
    local e = errmsg(kd.evaluate, student, {batch}, {n = 2})
    assert.truthy(e:find("bad argument #3 to 'kd.evaluate' (option 'n': ambiguous count", 1, true), e)
    assert.truthy(e:find('examples = N', 1, true) and e:find('batches = N', 1, true), e)
    e = errmsg(kd.evaluate, student, {batch}, {examples = 1, batches = 1})
    assert.truthy(e:find('not both', 1, true), e)
    e = errmsg(kd.evaluate, student, {batch}, {batches = 0})
    assert.truthy(e:find("option 'batches': expected >= 1, got 0", 1, true), e)
    e = errmsg(kd.evaluate, student, {batch}, {exemples = 1})
    assert.truthy(e:find("unknown option 'exemples' (did you mean 'examples'?)", 1, true), e)
  end)

  it('untied lm_head and models with a softcap', function()
    local teacher = tiny(0, {tie_word_embeddings = false})
    local batch = cache_batch(teacher, ids, 4)
    local _, parts = kd.loss_model(teacher, batch)
    assert.is_true(math.abs(parts.kl) < 1e-10)
    local golf = tiny(0, {model_type = 'qatlab_gpt'})
    assert.truthy(errmsg(kd.loss_model, golf, batch):find('softcap', 1, true))
  end)
end)
