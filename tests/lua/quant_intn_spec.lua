-- quant_intn: the parameter-golf int-N API from Lua: hand-computed quantization, STE gradient,
-- QAT linears switched by a schedule on a tiny model, and the zstd artifact round trip.
local torch = require 'torch'
local nn = require 'nn'
local quant = require 'quant'
local h = require 'helper'

local function tiny()
  torch.manual_seed(0)
  return nn.from_config({
    model_type = 'qatlab_gpt', vocab_size = 97, hidden_size = 64, intermediate_size = 128,
    num_hidden_layers = 2, num_attention_heads = 4, num_key_value_heads = 2,
    max_position_embeddings = 64, tie_word_embeddings = false, initializer_range = 0.1, norm_weight = true,
  })
end

local ids = torch.tensor({{3, 17, 96, 0, 42, 7}}, {dtype = 'int64'})

describe('quant int-N', function()
  it('quantizes per row with the max-abs rule and rounds half to even', function()
    -- int6: max |w| = 31 * 0.125; 1.5 and -2.5 steps round to 2 and -2
    local q, s = quant.intn_quantize(torch.tensor({{3.875, 0.1875, -0.3125, -3.875}}), {bits = 6})
    assert.truthy(q.dtype:find('int8'))
    assert.are.same({{31, 2, -2, -31}}, q:totable())
    assert.are.same({0.125}, s:totable())
    -- int5 with the std clip: [1, -1, 0] has std 1; k = 0.9375 -> scale 1/16, 16 clipped to 15
    q, s = quant.intn_quantize(torch.tensor({{1, -1, 0}}), {bits = 5, clip = 0.9375})
    assert.are.same({{15, -15, 0}}, q:totable())
    h.close(quant.intn_dequantize(q, s), {{0.9375, -0.9375, 0}}, 0, 0)
    -- int8, groups of two rows share a scale
    q, s = quant.intn_quantize(torch.tensor({{7.9375, 0}, {0, 1}}), {bits = 8, group_rows = 2})
    assert.are.same({0.0625}, s:totable())
    assert.are.same({{127, 0}, {0, 16}}, q:totable())
    assert.has_error(function() quant.intn_quantize(torch.randn(3, 4), {bits = 9}) end)
    assert.has_error(function() quant.intn_quantize(torch.randn(3, 4), {bits = 6, group_rows = 2}) end)
  end)

  it('fake quant: forward is the dequantized weight, gradient is the identity', function()
    torch.manual_seed(1)
    local w = torch.randn(8, 32):requires_grad_()
    local y = quant.intn_fake_quant(w, {bits = 5, clip = 1.0})
    local q, s = quant.intn_quantize(w, {bits = 5, clip = 1.0})
    h.close(y:detach(), quant.intn_dequantize(q, s), 0, 0)
    local g = torch.randn(8, 32)
    local loss = (y * g):sum()
    loss:backward()
    h.close(w.grad, g, 0, 0)
  end)

  it('QAT linears: dense forward while off, different once the schedule switches them on', function()
    local m = tiny()
    m:eval()
    local dense = m(ids)
    local qat = quant.intn_apply(m, {bits = 6, filter = 'mlp'})
    assert.are.equal(4, #qat:names())
    assert.is_false(qat:enabled())
    local sched = quant.intn_schedule{lr_below = 0.15}
    for step = 0, 19 do
      local lr = 1 - step / 20
      local on = sched:update{step = step, lr_mult = lr}
      qat:enable(on)
      assert.are.equal(on, qat:enabled())
      local same = m(ids):equal(dense)
      assert.are.equal(not on, same, 'step ' .. step)
      assert.are.equal(step >= 18, on, 'step ' .. step)
    end
    assert.are.equal(18, sched:switched_step())
    qat:enable(false)
    h.close(m(ids), dense, 0, 0)
    local t = quant.intn_schedule{time_fraction = 0.85}
    assert.is_false(t:update{elapsed = 500, budget = 600})
    assert.is_true(t:update{elapsed = 510, budget = 600})
    local s = quant.intn_schedule{step = 3}
    assert.is_false(s:update{step = 2})
    assert.is_true(s:update{step = 3})
    assert.has_error(function() quant.intn_apply(m, {filter = 'no_such_layer'}) end)
  end)

  it('export / load round trip a model bit-exactly, and report the artifact size', function()
    local m = tiny()
    local dir = h.tmpdir()
    local path = dir .. '/model.intn'
    local bytes, st = quant.intn_export(m, path, {bits = 6, keep_numel = 0, level = 3,
                                                  rules = {{'mlp', bits = 5}, {'embed_tokens', bits = 8}}})
    local f = io.open(path, 'rb')
    assert.are.equal(bytes, f:seek('end'))
    f:close()
    assert.is_true(st.quantized > 0 and st.kept > 0)
    assert.is_true(bytes < st.payload_bytes)
    local ts, info = quant.intn_load(path)
    for _, p in ipairs(m:named_parameters()) do
      local name, w = p[1], p[2]
      assert.truthy(ts[name], name)
      local e = info[name]
      if e.kind == 'intn' then
        local bits = name:find('mlp') and 5 or name:find('embed_tokens') and 8 or 6
        assert.are.equal(bits, e.bits)
        local q, s = quant.intn_quantize(w, {bits = bits})
        assert.is_true(q:equal(e.q), name)
        assert.is_true(s:equal(e.scale), name)
        h.close(ts[name], quant.intn_dequantize(q, s), 0, 0)
      else
        h.close(ts[name], w:half():float(), 0, 0)
      end
    end
    -- a truncated artifact is an error naming the file
    local data = io.open(path, 'rb'):read('*a')
    local bad = dir .. '/bad.intn'
    local g = io.open(bad, 'wb'); g:write(data:sub(1, #data - 7)); g:close()
    local ok, err = pcall(quant.intn_load, bad)
    assert.is_false(ok)
    assert.truthy(err:find(bad, 1, true) and err:find('quant.intn_load', 1, true))
    -- a {name = tensor} table works too
    local n = quant.intn_export({a = torch.randn(16, 8), b = torch.ones(4)}, path, {keep_numel = 0, level = 1})
    assert.is_true(n > 0)
    os.execute('rm -rf ' .. h.q(dir))
  end)
end)
