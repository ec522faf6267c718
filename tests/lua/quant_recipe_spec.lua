-- quant recipes: per-layer LUT sizes and ranks (table, array and function recipes), their errors,
-- bits per weight, calibration (E[x^2] through hooks), the weighted init and Lua-layer factories.
local torch = require 'torch'
local nn = require 'nn'
local quant = require 'quant'
local h = require 'helper'

local function tiny(layers)
  torch.manual_seed(0)
  return nn.from_config({
    model_type = 'qwen3', vocab_size = 40, hidden_size = 64, intermediate_size = 96,
    num_hidden_layers = layers or 2, num_attention_heads = 4, num_key_value_heads = 2, head_dim = 16,
    max_position_embeddings = 64, tie_word_embeddings = true, initializer_range = 0.1,
  })
end

local ids = torch.tensor({{3, 17, 39, 0, 12, 7}}, {dtype = 'int64'})

local function by_name(m)
  local t = {}
  for _, l in ipairs(quant.layers(m)) do t[l.name] = l end
  return t
end

local function shape(t)
  local s, r = t:size(), {}
  for i = 1, #s do r[i] = s[i] end
  return r
end

local function err(f)
  local ok, e = pcall(f)
  assert.is_false(ok)
  return tostring(e)
end

describe('quant recipes', function()
  it('a map recipe: one match per layer, default = false keeps the rest float', function()
    local m = tiny()
    local names = quant.replace(m, {recipe = {
      ['mlp%.down_proj'] = {lut = 8, rank = 3},
      ['self_attn%.[qk]_proj'] = {lut = 5, rank = 2, group_size = 16},
      default = false,
    }})
    assert.are.equal(6, #names)
    local l = by_name(m)
    assert.are.equal(8, l['model.layers.1.mlp.down_proj'].lut_size)
    assert.are.equal(3, l['model.layers.1.mlp.down_proj'].rank)
    assert.are.equal(5, l['model.layers.0.self_attn.k_proj'].lut_size)
    assert.are.equal(16, l['model.layers.0.self_attn.k_proj'].group_size)
    assert.is_nil(l['model.layers.0.mlp.up_proj'])
    -- down_proj (64, 96): 3 index bits + 16 (3 (64 + 96) + 3 + 8) / 6144
    assert.is_true(math.abs(l['model.layers.0.mlp.down_proj'].bits_per_weight - (3 + 16 * (3 * 160 + 3 + 8) / 6144)) < 1e-12)
    local b = quant.bits_per_weight(m)
    assert.are.equal(2 * 6144 + 2 * (64 * 64 + 32 * 64), b.quantized_weights)
    assert.is_true(b.quantized < 5 and b.model > b.quantized and b.model < 16)
    -- the model still runs; the default table form applies to unmatched layers
    local y = torch.no_grad(function() return m(ids) end)
    assert.are.same({1, 6, 40}, shape(y))
    local m2 = tiny(1)
    assert.are.equal(7, #quant.replace(m2, {recipe = {['mlp'] = {lut = 4, rank = 2}, default = {lut = 16, rank = 1}}}))
    assert.are.equal(1, by_name(m2)['model.layers.0.self_attn.o_proj'].rank)
  end)

  it('an array recipe: first match wins; a function recipe sees name, shape and layer index', function()
    local m = tiny()
    quant.replace(m, {recipe = {
      {'layers%.1%.mlp', {lut = 2, rank = 1}},
      {'mlp', {lut = 256, rank = 6}},
      {'self_attn', false},
    }})
    local l = by_name(m)
    assert.are.equal(2, l['model.layers.1.mlp.gate_proj'].lut_size)
    assert.are.equal(256, l['model.layers.0.mlp.gate_proj'].lut_size)
    assert.is_nil(l['model.layers.0.self_attn.q_proj'])
    local seen = {}
    local m2 = tiny()
    local names = quant.replace(m2, {recipe = function(name, out, inp, layer)
      seen[#seen + 1] = {name, out, inp, layer}
      if layer == 1 and name:find('v_proj') then return {lut = 3, rank = 2, include_zero = true} end
      return false
    end})
    assert.are.same({'model.layers.1.self_attn.v_proj'}, names)
    assert.are.equal(14, #seen)
    assert.are.same({'model.layers.0.self_attn.q_proj', 64, 64, 0}, seen[1])
    assert.is_true(by_name(m2)['model.layers.1.self_attn.v_proj'].include_zero)
  end)

  it('impossible configurations name the layer and the option', function()
    local e = err(function() quant.replace(tiny(1), {recipe = {mlp = {lut = 1}}}) end)
    assert.truthy(e:find("layer 'model.layers.0.mlp.gate_proj': lut = 1", 1, true), e)
    e = err(function() quant.replace(tiny(1), {recipe = function() return {lut = 300} end}) end)
    assert.truthy(e:find("lut = 300: expected an integer in 2..256", 1, true), e)
    e = err(function() quant.replace(tiny(1), {recipe = {k_proj = {rank = 33}}}) end)
    assert.truthy(e:find("layer 'model.layers.0.self_attn.k_proj': rank = 33: expected an integer in 1..32", 1, true), e)
    e = err(function() quant.replace(tiny(1), {recipe = {mlp = {lut = 4, bits = 2}}}) end)
    assert.truthy(e:find("unknown option 'bits'", 1, true), e)
    e = err(function() quant.replace(tiny(1), {recipe = {mlp = {lut = 4.5}}}) end)
    assert.truthy(e:find("option 'lut': expected an integer", 1, true), e)
    e = err(function() quant.replace(tiny(1), {recipe = {['mlp%.gate'] = {}, ['mlpx'] = {}}}) end)
    assert.truthy(e:find("pattern 'mlpx' matches no layer", 1, true), e)
    e = err(function() quant.replace(tiny(1), {recipe = {{'mlp', {}}, {'nothing_here', {}}}}) end)
    assert.truthy(e:find("pattern 'nothing_here' matches no layer", 1, true), e)
    e = err(function() quant.replace(tiny(1), {recipe = {mlp = {}, down = {}}}) end)
    assert.truthy(e:find("matches both 'down' and 'mlp'", 1, true), e)
    e = err(function() quant.replace(tiny(1), {recipe = {mlp = {}}, preset = 'q4a4'}) end)
    assert.truthy(e:find("option 'preset': not with 'recipe'", 1, true), e)
    e = err(function() quant.replace(tiny(1), {recipe = function() return 'q4' end}) end)
    assert.truthy(e:find("expected a config table or false", 1, true), e)
    local m = tiny(1)
    pcall(quant.replace, m, {recipe = {mlp = {lut = 4}, ['k_proj'] = {rank = 99}}})
    assert.are.equal(0, #quant.layers(m))   -- checked before anything is replaced
  end)

  it('calibrate: E[x^2] per input channel from hooks, hooks gone afterwards', function()
    local m = tiny(1)
    m:train()
    local b1 = torch.tensor({{3, 17, 39, 0}}, {dtype = 'int64'})
    local b2 = torch.tensor({{5, 6}, {7, 8}}, {dtype = 'int64'})
    local stats, tokens = quant.calibrate(m, {b1, b2}, {modules = 'self_attn%.q_proj'})
    assert.are.equal(8, tokens)
    local keys = {}
    for k in pairs(stats) do keys[#keys + 1] = k end
    assert.are.same({'model.layers.0.self_attn.q_proj'}, keys)
    -- by hand: q_proj's input is input_layernorm(embed(ids)), norm weight 1 at init
    local E
    for _, p in ipairs(m:named_parameters()) do if p[1] == 'model.embed_tokens.weight' then E = p[2] end end
    local all = torch.cat({b1:reshape(-1), b2:reshape(-1)})
    local e = E:index_select(1, all):double()
    local x = e / (e:pow(2):mean(2, {keepdim = true}) + 1e-6):sqrt()
    h.close(stats['model.layers.0.self_attn.q_proj'], x:pow(2):mean(1), 1e-6, 1e-5)
    assert.is_true(m.training)
    local all_stats = quant.calibrate(m, b1)
    local n = 0
    for _ in pairs(all_stats) do n = n + 1 end
    assert.are.equal(7, n)
    assert.has_error(function() quant.calibrate(m, {b1}, {modules = 'nothing'}) end)
    assert.has_error(function() quant.calibrate(m, {torch.tensor({{99}}, {dtype = 'int64'})}) end)
    -- no hook is left behind: the model's output is unchanged by a later replace-less forward
    assert.are.same({1, 4, 40}, shape(torch.no_grad(function() return m(b1) end)))
  end)

  it('weighted init with an imatrix and refinements is closer to the float model than the seed init', function()
    local ref_m = tiny(1)
    ref_m:eval()
    local batches = {}
    torch.manual_seed(1)
    for i = 1, 4 do batches[i] = torch.randint(0, 40, {2, 16}) end
    local stats = quant.calibrate(ref_m, batches)
    local ref = torch.no_grad(function() return ref_m(batches[1]) end)
    local function gap(opts)
      local m = tiny(1)
      m:eval()
      opts.recipe = {mlp = {lut = 4, rank = 4}, self_attn = {lut = 16, rank = 2}}
      local _, info = quant.replace(m, opts)
      assert.is_true(info.seconds >= 0)
      return (torch.no_grad(function() return m(batches[1]) end) - ref):pow(2):mean():item()
    end
    local seed = gap({})
    local weighted = gap({init = 'weighted', imatrix = stats, refine = 3})
    local km = gap({init = 'weighted', imatrix = stats, refine = 3, lut = 'kmeans'})
    print(('[weighted init, tiny model] logits MSE to float: seed %.5f, weighted %.5f, +k-means %.5f')
      :format(seed, weighted, km))
    assert.is_true(weighted < seed)
    assert.is_true(km < seed)
    assert.has_error(function() gap({init = 'magic'}) end)
    assert.has_error(function() gap({init = 'weighted', imatrix = {['model.layers.0.mlp.up_proj'] = torch.ones(64)}}) end)
    -- tighten_q keeps stored indices of a weighted init (they are already nearest-LUT)
    local m = tiny(1)
    quant.replace(m, {preset = 'q4a4', init = 'weighted', imatrix = stats, refine = 1})
    local y = torch.no_grad(function() return m(batches[1]) end)
    assert.are.equal(7, quant.tighten_q(m))
    h.close(torch.no_grad(function() return m(batches[1]) end), y, 1e-6, 1e-6)
  end)

  it('compact export packs any LUT size at ceil(log2 L) bits', function()
    local m = tiny(1)
    quant.replace(m, {recipe = {mlp = {lut = 8, rank = 2}, default = {lut = 3, rank = 1}}})
    local dir = h.tmpdir()
    local bytes = quant.export_compact(m, dir .. '/c.safetensors')
    local f = io.open(dir .. '/c.safetensors', 'rb')
    assert.are.equal(bytes, f:seek('end'))
    f:close()
    os.execute('rm -rf ' .. h.q(dir))
  end)

  it('factory: the returned Lua object becomes the layer', function()
    local m = tiny(1)
    m:eval()
    local calls = {}
    quant.replace(m, {recipe = {['mlp%.up_proj'] = {lut = 4, rank = 2}}, factory = function(name, w, b, cfg)
      calls[#calls + 1] = {name, cfg.lut, cfg.rank, b == nil}
      local layer = {weight_t = w:clone(), in_features = w:size(2), out_features = w:size(1)}
      function layer.forward(self, x) return x:matmul(self.weight_t:t()) end
      return layer
    end})
    assert.are.same({{'model.layers.0.mlp.up_proj', 4, 2, true}}, calls)
    assert.are.equal(0, #quant.layers(m))
    assert.are.same({1, 6, 40}, shape(torch.no_grad(function() return m(ids) end)))
  end)

  it('checkpoints leave frozen V2 layers\' float weights out and refuse another float model', function()
    local json = require 'json'
    local function header(path)   -- a safetensors header, read by hand
      local f = assert(io.open(path, 'rb'))
      local b, n = f:read(8), 0
      for i = 8, 1, -1 do n = n * 256 + b:byte(i) end
      local t = json.decode(f:read(n))
      local size = f:seek('end')
      f:close()
      return t, size - 8 - n   -- the header and the data size
    end
    local m = tiny()
    m:eval()
    quant.replace(m, {preset = 'q4a4', init = 'weighted'})   -- indices frozen by the init
    local y = torch.no_grad(function() return m(ids) end)
    local dir = h.tmpdir()
    quant.save_checkpoint(m, dir .. '/c')
    quant.save_checkpoint(m, dir .. '/f', {float_weights = true})
    local hc, data_c = header(dir .. '/c/model.safetensors')
    local hf, data_f = header(dir .. '/f/model.safetensors')
    local saved = 0
    for _, l in ipairs(quant.layers(m)) do
      assert.is_nil(hc[l.name .. '.weight'], l.name)
      assert.are.equal('U8', hc[l.name .. '._indices'].dtype)
      local w = hf[l.name .. '.weight']
      assert.are.same({'F32', hc[l.name .. '._indices'].shape}, {w.dtype, w.shape})
      assert.is_truthy(hc.__metadata__[l.name .. '.weight_fingerprint']:match('^%S+,%S+$'))
      saved = saved + 4 * w.shape[1] * w.shape[2]
    end
    assert.are.equal(saved, data_f - data_c)   -- exactly the fp32 weights, nothing else
    -- the same float model (and the same weights rounded to fp16) give the same logits back
    local m2 = tiny()
    m2:eval()
    assert.are.same({}, quant.load_checkpoint(m2, dir .. '/c'))
    assert.is_true(torch.no_grad(function() return m2(ids) end):equal(y))
    local m16 = tiny()
    m16:eval()
    m16:to({dtype = 'float16'})
    m16:to({dtype = 'float32'})
    quant.load_checkpoint(m16, dir .. '/c')
    -- another float model: refused, naming the layer; with float_weights it loads everything
    torch.manual_seed(7)
    local other = nn.from_config(m.config)
    other:eval()
    local ok, e = pcall(quant.load_checkpoint, other, dir .. '/c')
    assert.is_false(ok)
    assert.is_truthy(tostring(e):find('model.layers.0.self_attn.q_proj.weight', 1, true), tostring(e))
    assert.is_truthy(tostring(e):find('saved without the float weight', 1, true), tostring(e))
    assert.are.same({}, quant.load_checkpoint(other, dir .. '/f'))
    assert.is_true(torch.no_grad(function() return other(ids) end):equal(y))
    os.execute('rm -rf ' .. h.q(dir))
  end)

  it('the init\'s fused nearest-entry pass agrees with tighten_q (uniform, k-means, 256 entries)', function()
    local function indices(m)
      local t = {}
      for _, p in ipairs(m:named_parameters()) do
        if p[1]:find('_indices$') then t[p[1]] = p[2]:clone() end
      end
      return t
    end
    for _, o in ipairs({{preset = 'q4a4'}, {preset = 'q2a4', lut = 'kmeans'}, {recipe = {mlp = {lut = 256, rank = 2}}}}) do
      local m = tiny()
      o.init, o.refine = 'weighted', 2
      quant.replace(m, o)
      local before = indices(m)
      quant.tighten_q(m)   -- the tensor-operation rule (lut_nearest_indices) on the same scales
      local n = 0
      for k, v in pairs(indices(m)) do
        assert.is_true(v:equal(before[k]), k)
        n = n + 1
      end
      assert.is_true(n > 0)
    end
  end)
end)
