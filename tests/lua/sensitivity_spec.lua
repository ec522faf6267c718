-- sensitivity: per-layer measurement on a tiny model (the model left bit-identical, the restored copy
-- giving the float logits back), the greedy allocator's budget and preferences, bad options.
local torch = require 'torch'
local nn = require 'nn'
local quant = require 'quant'
local sensitivity = require 'sensitivity'

local CFG = {
  model_type = 'qwen3', vocab_size = 40, hidden_size = 32, intermediate_size = 48,
  num_hidden_layers = 2, num_attention_heads = 4, num_key_value_heads = 2, head_dim = 8,
  max_position_embeddings = 64, tie_word_embeddings = true, initializer_range = 0.2,
}

local function model()
  torch.manual_seed(0)
  local m = nn.from_config(CFG)
  m:eval()
  return m
end

local function batches()
  torch.manual_seed(1)
  return {torch.randint(0, 40, {2, 9}, {dtype = 'int64'}), torch.randint(0, 40, {1, 9}, {dtype = 'int64'})}
end

local function err(f)
  local ok, e = pcall(f)
  assert.is_false(ok, 'expected an error')
  return tostring(e)
end

local CANDS = {{lut = 2, rank = 1}, {lut = 4, rank = 2}, {lut = 16, rank = 4}}

-- measured once, shared by the tests below
local M0 = model()
local T0 = quant.sensitivity(M0, batches(), {candidates = CANDS, layers = 'mlp', check = true})

describe('quant.sensitivity', function()
  it('measures every matching projection and candidate, and leaves the model bit-identical', function()
    local m = model()
    local sd0 = {}
    for k, v in pairs(m:state_dict()) do sd0[k] = v:clone() end
    local mods0 = m:named_modules()
    local y0 = torch.no_grad(function() return m:forward(batches()[1]) end)
    local t = quant.sensitivity(m, batches(), {candidates = CANDS, layers = 'layers%.1%.', check = true})
    assert.are.equal(7, #t.layers)
    assert.are.equal('model.layers.1.self_attn.q_proj', t.layers[1].name)
    for k, v in pairs(m:state_dict()) do assert.is_true(v:equal(sd0[k]), k) end
    assert.are.same(mods0, m:named_modules())
    assert.is_true(torch.no_grad(function() return m:forward(batches()[1]) end):equal(y0))
    -- bits from quant.layers, more bits: less loss here
    for _, r in ipairs(t.layers) do
      assert.are.equal(r.out_features * r.in_features, r.weights)
      assert.is_true(r.candidates[1].bits < r.candidates[2].bits and r.candidates[2].bits < r.candidates[3].bits)
      for _, c in ipairs(r.candidates) do assert.is_true(c.delta >= 0, r.name) end
      assert.is_true(r.candidates[3].delta < r.candidates[1].delta, r.name)
    end
    assert.is_truthy(sensitivity.format(t):find('model.layers.1.mlp.down_proj', 1, true))
  end)

  it('the KL of a one-layer replace equals a direct measurement; ppl reports the cross-entropy increase', function()
    local name = T0.layers[2].name
    local m = model()
    local ids = batches()
    local ref = torch.no_grad(function() return {m:forward(ids[1]):log_softmax(3), m:forward(ids[2]):log_softmax(3)} end)
    local base = torch.no_grad(function() return (m:loss(ids[1]):item() * 16 + m:loss(ids[2]):item() * 8) / 24 end)
    quant.replace(m, {recipe = {{'^' .. name:gsub('%.', '%%.') .. '$', CANDS[2]}}})
    local kl = torch.no_grad(function()
      local s = 0
      for k = 1, 2 do
        local q = m:forward(ids[k]):log_softmax(3)
        s = s + (ref[k]:exp() * (ref[k] - q)):sum(3):mean():item() * ids[k]:size(1) * 9
      end
      return s / 27
    end)
    assert.is_true(math.abs(kl - T0.layers[2].candidates[2].delta) <= 1e-6 * kl + 1e-12)
    local ce = torch.no_grad(function() return (m:loss(ids[1]):item() * 16 + m:loss(ids[2]):item() * 8) / 24 end)
    local tp = quant.sensitivity(model(), ids, {candidates = {CANDS[2]}, layers = name:gsub('%.', '%%.'),
                                                   metric = 'ppl'})
    assert.are.equal('ppl', tp.metric)
    assert.is_true(math.abs(tp.base - base) < 1e-6)
    assert.is_true(math.abs(tp.layers[1].candidates[1].delta - (ce - base)) < 1e-6)
  end)

  it('bad options are errors', function()
    local m, b = model(), batches()
    assert.is_truthy(err(function() quant.sensitivity(m, b, {candidate = CANDS}) end)
      :find('did you mean "candidates"', 1, true))
    assert.is_truthy(err(function() quant.sensitivity(m, b, {candidates = {}}) end):find('non-empty', 1, true))
    assert.is_truthy(err(function() quant.sensitivity(m, b, {candidates = {{lut = 4, bits = 2}}}) end)
      :find('unknown key "bits"', 1, true))
    assert.is_truthy(err(function() quant.sensitivity(m, b, {candidates = CANDS, metric = 'mse'}) end)
      :find("expected 'kl' or 'ppl'", 1, true))
    assert.is_truthy(err(function() quant.sensitivity(m, b, {candidates = CANDS, layers = 'nothing'}) end)
      :find('matches no projection', 1, true))
    assert.is_truthy(err(function()
      quant.sensitivity(m, b, {candidates = {{lut = 300, rank = 1}}, layers = 'layers%.0%.mlp%.up'})
    end):find('lut', 1, true))
    local q = model()
    quant.replace(q, {preset = 'q4a4'})
    assert.is_truthy(err(function() quant.sensitivity(q, b, {candidates = CANDS}) end)
      :find('pass the float model', 1, true))
  end)
end)

describe('quant.allocate_bits', function()
  it('meets the budget, and its predicted bits per weight are what quant reports', function()
    local lo, hi = 0, 0
    for _, r in ipairs(T0.layers) do lo, hi = lo + r.weights * r.candidates[1].bits, hi + r.weights * r.candidates[3].bits end
    local W = 0
    for _, r in ipairs(T0.layers) do W = W + r.weights end
    lo, hi = lo / W, hi / W
    for _, budget in ipairs({lo, (lo + hi) / 2, (2 * lo + hi) / 3, hi, hi + 1}) do
      local recipe, p = quant.allocate_bits(T0, {budget = budget})
      assert.is_true(p.bits_per_weight <= budget * (1 + 1e-12))
      local m = model()
      quant.replace(m, {recipe = recipe})
      local b = quant.bits_per_weight(m)
      assert.are.equal(#T0.layers, #quant.layers(m))
      assert.is_true(math.abs(b.quantized - p.bits_per_weight) < 1e-12, ('%.15g vs %.15g'):format(b.quantized, p.bits_per_weight))
    end
    local _, pmax = quant.allocate_bits(T0, {budget = hi})
    local _, pmin = quant.allocate_bits(T0, {budget = lo})
    assert.are.equal(hi, pmax.bits_per_weight)
    assert.are.equal(lo, pmin.bits_per_weight)
    assert.is_true(pmax.delta < pmin.delta)
  end)

  it('upgrades the layer with the larger measured gain per extra bit first', function()
    local function row(name, weights, d_lo, d_hi)
      return {name = name, weights = weights, candidates = {
        {config = {lut = 4, rank = 1}, bits = 2, delta = d_lo},
        {config = {lut = 16, rank = 1}, bits = 4, delta = d_hi}}}
    end
    local t = {layers = {row('a', 100, 0.5, 0.1), row('b', 100, 0.9, 0.2), row('c', 200, 0.6, 0.0)}}
    -- room for one upgrade of 100 weights: b saves 0.7 per 200 bits, a 0.4, c does not fit
    local recipe, p = quant.allocate_bits(t, {budget = (2 * 400 + 200) / 400})
    assert.are.same({a = 1, b = 2, c = 1}, p.choice)
    assert.are.same({'^b$', {lut = 16, rank = 1}}, recipe[2])
    assert.are.equal(2.5, p.bits_per_weight)
    -- 600 bits of room: b (0.0035 per bit), then a (0.002) before c (0.0015), and c no longer fits;
    -- greedy, as the seed's search: b + c would have saved more (0.7 against 0.9 left)
    p = select(2, quant.allocate_bits(t, {budget = (2 * 400 + 600) / 400}))
    assert.are.same({a = 2, b = 2, c = 1}, p.choice)
    assert.is_true(math.abs(p.delta - 0.9) < 1e-12)
    -- an upgrade that saves nothing is never taken
    t.layers[1].candidates[2].delta = 0.5
    p = select(2, quant.allocate_bits(t, {budget = 4}))
    assert.are.same({a = 1, b = 2, c = 2}, p.choice)
  end)

  it('bad options are errors', function()
    assert.is_truthy(err(function() quant.allocate_bits(T0, {budgt = 3}) end):find('did you mean "budget"', 1, true))
    assert.is_truthy(err(function() quant.allocate_bits(T0, {}) end):find('option budget', 1, true))
    assert.is_truthy(err(function() quant.allocate_bits(T0, {budget = 0.5}) end):find('below the cheapest', 1, true))
    assert.is_truthy(err(function() quant.allocate_bits({}, {budget = 3}) end):find('quant.sensitivity', 1, true))
  end)
end)

describe('model:forward_from', function()
  it('runs the layers from i on the input layer i received: the logits and hidden states of forward', function()
    local m = model()
    local ids = batches()[1]
    local hs = {}
    local h = m:register_forward_pre_hook('^model%.layers%.%d+$', function(name, x)
      hs[tonumber(name:match('%d+$'))] = x:clone()
    end)
    local y = torch.no_grad(function() return m:forward(ids) end)
    h:remove()
    local yh = torch.no_grad(function() return m:forward(ids, {output = 'hidden'}) end)
    for i = 0, 1 do
      assert.is_true(torch.no_grad(function() return m:forward_from(i, hs[i]) end):equal(y), 'layer ' .. i)
      assert.is_true(torch.no_grad(function() return m:forward_from(i, hs[i], {output = 'hidden'}) end):equal(yh))
    end
    -- from a changed input, only later layers see the change: layer 1's input differs, so do the logits
    local y1 = torch.no_grad(function() return m:forward_from(1, hs[1] * 1.5) end)
    assert.is_false(y1:equal(y))
    assert.is_truthy(err(function() m:forward_from(3, hs[0]) end):find('out of range', 1, true))
    assert.is_truthy(err(function() m:forward_from(0, torch.zeros(2, 9, 31)) end):find('expected hidden states', 1, true))
    assert.is_truthy(err(function() m:forward_from(0, hs[0], {outptu = 'hidden'}) end):find('outptu', 1, true))
  end)
end)
