-- quant (LUT): the seed's V2/V1 layers from Lua on a tiny Qwen3: LUT constants, replacement,
-- forward forms, trainable subsets, snapping, conversions, export and checkpoints.
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

local function param(m, name)
  for _, p in ipairs(m:named_parameters()) do if p[1] == name then return p[2] end end
end

describe('quant LUT', function()
  it('LUT constants, presets and the Q4->Q2 k-means example', function()
    h.close(quant.lut(4), {-1, -0.33349609375, 0.33349609375, 1}, 0, 0)
    h.close(quant.lut('lut16'):narrow(1, 1, 3), {-1, -0.86669921875, -0.7333984375}, 0, 0)
    h.close(quant.lut(4, {include_zero = true}), {-1, -0.5, 0, 1}, 0, 0)
    assert.are.same({mlp_lut = 4, mlp_rank = 32, attn_lut = 16, attn_rank = 8}, quant.preset('q2a4'))
    h.close(quant.kmeans_reduce(quant.lut(16), 4),
            {-0.7333984375, -0.2001953125, 0.2668457031, 0.8000488281}, 1e-9, 0)
    local x = torch.tensor({1 / 3, 1e6}, {requires_grad = true})
    local y = quant.ste_fp16(x)
    h.close(y, {0.333251953125, 65504}, 0, 0)
    y:sum():backward()
    h.close(x.grad, {1, 1}, 0, 0)
  end)

  it('replace swaps the 7 projections per layer; the three forms agree without STE', function()
    local m = tiny()
    m:eval()
    local names = quant.replace(m, {preset = 'q2a4'})
    assert.are.equal(14, #names)
    local layers = quant.layers(m)
    assert.are.equal(14, #layers)
    for _, l in ipairs(layers) do
      local mlp = l.name:find('mlp', 1, true) ~= nil
      assert.are.equal(mlp and 4 or 16, l.lut_size)
      assert.are.equal(mlp and 32 or 8, l.rank)
      assert.are.equal('materialized', l.forward)
    end
    assert.truthy(tostring(param(m, 'model.layers.0.mlp.up_proj._indices').dtype):find('uint8'))
    assert.is_nil(param(m, 'lm_head.weight'))   -- tied, stays float
    local ref = torch.no_grad(function() return m(ids) end)
    for _, f in ipairs({'loop', 'batched'}) do
      quant.set_forward(m, f)
      h.close(torch.no_grad(function() return m(ids) end), ref, 2e-5, 1e-4)
    end
    quant.set_forward(m, 'materialized')
    -- filter and mlp/attn switches
    local m2 = tiny()
    assert.are.equal(4, #quant.replace(m2, {mlp = false, filter = 'layers\\.1\\.'}))
    assert.has_error(function() quant.replace(m2, {preset = 'q3'}) end)
    assert.has_error(function() quant.replace(m2, {forward = 'fused'}) end)
  end)

  it('trainable subsets; gradients reach A, B, g only', function()
    local m = tiny(1)
    quant.replace(m)
    assert.are.equal(21, quant.set_trainable(m, 'all'))
    m:train()
    m(ids):pow(2):mean():backward()
    assert.truthy(param(m, 'model.layers.0.mlp.down_proj.scale_A').grad)
    assert.truthy(param(m, 'model.layers.0.self_attn.q_proj.rank_magnitude').grad)
    assert.is_nil(param(m, 'model.layers.0.mlp.down_proj.weight').grad)
    assert.is_nil(param(m, 'model.embed_tokens.weight').grad)
    assert.are.equal(7, quant.set_trainable(m, 'g_only'))
    assert.are.equal(9, quant.set_trainable(m, 'mlp'))
    assert.are.equal(12, quant.set_trainable(m, 'attn'))
    assert.are.equal(14, quant.set_trainable(m, 'frozen_magnitude'))
    assert.is_false(param(m, 'model.layers.0.mlp.up_proj.rank_magnitude').requires_grad)
    m:requires_grad_(true)   -- integer buffers are skipped
    assert.is_false(param(m, 'model.layers.0.mlp.up_proj._indices').requires_grad)
  end)

  it('freeze_q recomputes indices; convert_to_fp16; trainable LUT16', function()
    local m = tiny(1)
    m:eval()
    quant.replace(m, {preset = 'q4a4', freeze = false})
    assert.is_nil(param(m, 'model.layers.0.mlp.up_proj._indices'))   -- Q on the fly until frozen
    local y0 = torch.no_grad(function() return m(ids) end)
    quant.freeze_q(m)
    assert.truthy(param(m, 'model.layers.0.mlp.up_proj._indices'))
    h.close(torch.no_grad(function() return m(ids) end), y0, 1e-6, 1e-6)
    assert.are.equal(7, quant.enable_lut_training(m))
    assert.are.equal(7, quant.set_trainable(m, 'lut'))
    m(ids):pow(2):mean():backward()
    assert.truthy(param(m, 'model.layers.0.mlp.up_proj._lut_raw_deltas').grad)
    local c = tiny(1)
    quant.replace(c, {preset = 'q2a4'})
    quant.convert_to_fp16(c)
    local lut = param(c, 'model.layers.0.mlp.up_proj.lut')
    assert.truthy(tostring(lut.dtype):find('float16'))
    h.close(lut, quant.lut(4), 0, 0)
  end)

  it('snap_for_ane: the fp16 model matches the STE-FP16 forward', function()
    local m = tiny(1)
    m:eval()
    quant.replace(m, {forward = 'loop', ste_fp16 = true})
    local ref = torch.no_grad(function() return m(ids) end)
    quant.snap_for_ane(m, {recompute_indices = false})
    assert.truthy(tostring(param(m, 'model.layers.0.mlp.up_proj.scale_A').dtype):find('float16'))
    local y = torch.no_grad(function() return m(ids) end)
    local d = (y:double() - ref:double()):abs():max():item()
    print(('\n  [quant_spec] snap_for_ane (no recompute): max |fp16 layers - STE-FP16| on logits = %.3g'):format(d))
    assert.is_true(d < 5e-2)
    local m2 = tiny(1)
    quant.replace(m2)
    quant.snap_for_ane(m2)
    for _, l in ipairs(quant.layers(m2)) do assert.is_true(l.baked) end
  end)

  it('snap_for_export keeps outputs; export_hf loads as a plain model; compact export', function()
    local m = tiny()
    m:eval()
    quant.replace(m)
    local ref = torch.no_grad(function() return m(ids) end)
    quant.snap_for_export(m)
    h.close(torch.no_grad(function() return m(ids) end), ref, 1e-5, 1e-5)
    local dir = h.tmpdir()
    quant.export_hf(m, dir .. '/hf')
    local plain = nn.from_pretrained(dir .. '/hf')
    h.close(torch.no_grad(function() return plain(ids) end), ref, 1e-4, 1e-4)
    local bytes = quant.export_compact(m, dir .. '/compact.safetensors')
    assert.is_true(bytes > 0)
    local f = io.open(dir .. '/compact.safetensors', 'rb')
    assert.are.equal(bytes, f:seek('end'))
    f:close()
    -- our checkpoint round trip
    quant.save_checkpoint(m, dir .. '/ckpt')
    local m2 = tiny()
    m2:eval()
    assert.are.same({}, quant.load_checkpoint(m2, dir .. '/ckpt'))
    h.close(torch.no_grad(function() return m2(ids) end), ref, 1e-5, 1e-5)
    os.execute('rm -rf ' .. h.q(dir))
  end)

  it('V1 -> V2 and Q4 -> Q2', function()
    local m = tiny(1)
    m:eval()
    assert.are.equal(7, #quant.replace_v1(m, {preset = 'q4a4'}))
    assert.are.equal('v1', quant.layers(m)[1].kind)
    assert.are.equal(7, quant.v1_to_v2(m))
    assert.are.equal('v2', quant.layers(m)[1].kind)
    local q = tiny(1)
    quant.replace(q, {preset = 'q4a4'})
    assert.are.equal(7, quant.q4_to_q2(q))
    for _, l in ipairs(quant.layers(q)) do
      local mlp = l.name:find('mlp', 1, true) ~= nil
      assert.are.equal(mlp and 32 or 8, l.rank)
      assert.are.equal(mlp and 4 or 16, l.lut_size)
    end
    h.close(param(q, 'model.layers.0.mlp.up_proj.lut'),
            {-0.7333984375, -0.2001953125, 0.2668457031, 0.8000488281}, 1e-9, 0)
  end)

  it('loads a seed .pt checkpoint written by PyTorch (the file LUT wins)', function()
    local dir = h.tmpdir()
    local m = tiny(1)
    m:eval()
    quant.replace(m)
    -- Write the model's V2 state with PyTorch in the seed's layout: int64 _indices for the MLP,
    -- _Q only for attention, a custom MLP LUT.
    local sd = m:state_dict()
    local st = dir .. '/src.safetensors'
    torch.save(st, sd)
    h.py(([[
import torch, collections
from safetensors.torch import load_file
sd = load_file('%s')
out = collections.OrderedDict()
for k, v in sd.items():
    if k.endswith('._indices'):
        p = k[:-len('_indices')]
        if '.mlp.' in k: out[k] = v.long()
        else: out[p + '_Q'] = sd[p + 'lut'][v.long()]
    elif k.endswith('mlp.up_proj.lut'):
        out[k] = v * 0.5
    else:
        out[k] = v
torch.save(out, '%s/best_state_dict.pt')
]]):format(st, dir))
    local m2 = tiny(1)
    m2:eval()
    local unused = quant.load_checkpoint(m2, dir .. '/best_state_dict.pt')
    assert.are.same({}, unused)
    h.close(param(m2, 'model.layers.0.mlp.up_proj.lut'), param(m, 'model.layers.0.mlp.up_proj.lut') * 0.5, 0, 0)
    h.close(param(m2, 'model.layers.0.self_attn.k_proj._indices'), param(m, 'model.layers.0.self_attn.k_proj._indices'), 0, 0)
    os.execute('rm -rf ' .. h.q(dir))
  end)
end)
