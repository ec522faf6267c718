-- contract: the one binding contract (issue 14): Lua's own "bad argument #n to 'name' (...)"
-- wording, self counted as Lua counts it, extra positional arguments and unknown keys rejected
-- (naming the closest key), `{}` as options, one result shape; and the silent mistakes that
-- are errors now (filters matching nothing, config typos, tables with holes, empty conversions).
local torch = require 'torch'
local nn = require 'nn'
local quant = require 'quant'
local optim = require 'optim'
local kd = require 'kd'
local h = require 'helper'

local function errmsg(f, ...)
  local ok, err = pcall(f, ...)
  assert.is_false(ok, 'expected an error')
  assert.are.equal('string', type(err))
  return err
end

local function has(msg, ...)
  for _, frag in ipairs{...} do assert(msg:find(frag, 1, true), ('message %q lacks %q'):format(msg, frag)) end
end

local CFG = {
  model_type = 'qwen3', vocab_size = 40, hidden_size = 64, intermediate_size = 96,
  num_hidden_layers = 2, num_attention_heads = 4, num_key_value_heads = 2, head_dim = 16,
  max_position_embeddings = 64, tie_word_embeddings = true, initializer_range = 0.1,
}
local function tiny(extra)
  torch.manual_seed(0)
  local cfg = {}
  for k, v in pairs(CFG) do cfg[k] = v end
  for k, v in pairs(extra or {}) do cfg[k] = v end
  return nn.from_config(cfg)
end

describe('argument errors in Lua\'s own form', function()
  it('functions count from 1; methods called with : do not count self, as luaL_argerror', function()
    local t = torch.ones(2, 3)
    assert.are.equal("bad argument #2 to 'torch.sum' (dim: expected an integer, got 1.5)",
                     errmsg(torch.sum, t, 1.5))
    -- (not as a tail call: Lua then no longer knows how the function was called)
    assert.are.equal("bad argument #1 to 'Tensor.sum' (dim: expected an integer, got 1.5)",
                     errmsg(function() local r = t:sum(1.5); return r end))
    assert.are.equal("bad argument #2 to 'Tensor.sum' (dim: expected an integer, got 1.5)",
                     errmsg(function() return t.sum(t, 1.5) end))
    local p = torch.zeros(2, {requires_grad = true})
    local o = optim.SGD({p}, {lr = 1})
    has(errmsg(function() o:set_lr('x') end), "bad argument #1 to 'Optimizer:set_lr' (lr: expected a number")
    has(errmsg(function() o.set_lr(o, 'x') end), "bad argument #2 to 'Optimizer:set_lr' (lr: expected a number")
    has(errmsg(function() o.step(42) end), "bad argument #1 to 'Optimizer:step' (expected an Optimizer")
    local fake = {step = o.step}
    has(errmsg(function() fake:step() end), "calling 'Optimizer:step' on bad self (expected an Optimizer")
  end)

  it('options: the table is the bad argument; unknown keys name the closest known one', function()
    has(errmsg(torch.zeros, 2, {requires_grad = 'yes'}),
        "bad argument #2 to 'torch.zeros' (option 'requires_grad': expected a boolean, got string)")
    local m = tiny()
    has(errmsg(quant.replace, m, {filtr = 'mlp'}), "bad argument #2 to 'quant.replace' (unknown option 'filtr' (did you mean 'filter'?)")
    has(errmsg(optim.AdamW, {torch.zeros(1, {requires_grad = true})}, {lr = 1, weight_decy = 0}),
        "bad argument #2 to 'optim.AdamW' (unknown option 'weight_decy' (did you mean 'weight_decay'?)")
  end)

  it('extra positional arguments are errors, not ignored', function()
    local m = tiny()
    has(errmsg(quant.replace, m, 'q4a4'), "bad argument #2 to 'quant.replace' (expected options {...} or nothing, got string 'q4a4')")
    assert.are.equal(0, #quant.layers(m))   -- nothing replaced
    has(errmsg(torch.sum, torch.ones(2), 1, false, 'float32', 'x'), "bad argument #5 to 'torch.sum' (unexpected extra argument")
    has(errmsg(torch.save, os.tmpname() .. '.safetensors', {a = torch.ones(1)}, 'x'),
        "bad argument #3 to 'torch.save' (expected options {...} or nothing, got string 'x')")
    local o = optim.SGD({torch.zeros(1, {requires_grad = true})}, {lr = 1})
    has(errmsg(function() o:step(1) end), "bad argument #1 to 'Optimizer:step' (unexpected extra argument (number)")
    has(errmsg(function() o:set_lr(0.1, 1, 'x') end), "bad argument #3 to 'Optimizer:set_lr' (unexpected extra argument")
    -- trailing nils are no arguments
    assert.are.equal(6, torch.ones(2, 3):sum(nil, nil):item())
  end)

  it('{} is an empty options table, and still a table argument where one is expected', function()
    assert.are.equal(6, torch.ones(2, 3):sum({}):item())
    assert.are.equal(2, torch.zeros(2, {}):numel())
    assert.are.equal(0, torch.tensor({}):numel())
    assert.are.equal(0, torch.zeros({}):dim())
  end)

  it('library errors carry the Lua name only', function()
    local m = tiny()
    local e = errmsg(kd.build_cache, {teacher = m, data = torch.zeros(1, 4, {dtype = 'int64'}), K = 0, out = os.tmpname()})
    has(e, 'kd.build_cache: K: expected 1 <= K <= vocab_size')
    assert.is_nil(e:find('cache_build', 1, true), e)
  end)
end)

describe('silent mistakes are errors', function()
  it('quant.replace: a filter matching no layer says it is a C++ regex', function()
    local m = tiny()
    local e = errmsg(quant.replace, m, {filter = 'layers%.[12]%.'})
    has(e, "option 'filter': 'layers%.[12]%.' matches no layer", 'std::regex', 'ECMAScript', 'not a Lua pattern')
    has(errmsg(quant.replace, m, {filter = 'layers.(1'}), "option 'filter'", 'not a valid regular expression')
    has(errmsg(quant.replace_v1, m, {filter = 'nothing_here'}), "quant.replace_v1", 'matches no layer')
    has(errmsg(quant.replace, m, {mlp = false, attn = false}), "options 'mlp' and 'attn' are both false")
    -- the same regex in C++ syntax selects layer 1 only
    local names = quant.replace(m, {filter = 'layers\\.1\\.', preset = 'q4a4'})
    assert.are.equal(7, #names)
    for _, n in ipairs(names) do assert.truthy(n:find('layers.1.', 1, true), n) end
  end)

  it('nn.from_config: a key one edit away from a known key is an error naming both', function()
    local e = errmsg(tiny, {hidden_sise = 32})
    has(e, 'hidden_sise', "one edit away from 'hidden_size'")
    has(errmsg(tiny, {num_hiden_layers = 1}), "'num_hidden_layers'")
    has(errmsg(tiny, {rope_thete = 1}), "'rope_theta'")
    -- keys real configs carry stay accepted
    local m = tiny({bos_token_id = 1, eos_token_id = 2, architectures = {'Qwen3ForCausalLM'}, transformers_version = '4'})
    assert.are.equal(64, m.config.hidden_size)
  end)

  it('torch.tensor: tables with holes or non-array keys are errors', function()
    has(errmsg(torch.tensor, {1, nil, 3}), 'torch.tensor', 'hole')
    local t = {1, 2}
    t[4] = 4
    has(errmsg(torch.tensor, t), 'hole')
    has(errmsg(torch.tensor, {1, 2, x = 3}), "key 'x'")
    h.close(torch.tensor({{1, 2}, {3, 4}}), {{1, 2}, {3, 4}}, 0, 0)
  end)

  it('quant.q4_to_q2: nothing to convert, LUT sizes and ranks out of range name the option', function()
    has(errmsg(quant.q4_to_q2, tiny()), 'no V2 (LUT) layers to convert')
    local q = tiny()
    quant.replace(q, {preset = 'q4a4'})
    local before = quant.layers(q)
    has(errmsg(quant.q4_to_q2, q, {mlp_lut = 1}), 'mlp_lut: expected a LUT size in 2..16', 'got 1')
    has(errmsg(quant.q4_to_q2, q, {attn_lut = 32}), 'attn_lut: expected a LUT size in 2..16')
    -- k_proj is 32 x 64: its rank can reach 32, not 33
    has(errmsg(quant.q4_to_q2, q, {attn_rank = 33}), 'attn_rank: expected 4..32', 'min(out, in) = 32')
    has(errmsg(quant.q4_to_q2, q, {mlp_rank = 2}), 'mlp_rank', 'the rank can only grow')
    -- every error left the model as it was
    local after = quant.layers(q)
    for i = 1, #before do
      assert.are.equal(before[i].rank, after[i].rank)
      assert.are.equal(before[i].lut_size, after[i].lut_size)
    end
    assert.are.equal(14, quant.q4_to_q2(q, {attn_rank = 32}))
  end)

  it('optim: a map of named tensors works like named parameters (AdamW step by hand)', function()
    local a = torch.tensor({1.0, -2.0}, {requires_grad = true})
    local b = torch.tensor({3.0}, {requires_grad = true})
    local o = optim.AdamW({A = a, B = b}, {lr = 0.1, weight_decay = 0.01})
    assert.are.equal(2, #o:param_groups()[1].params)
    a.grad = torch.tensor({2.0, -0.5})
    b.grad = torch.tensor({4.0})
    o:step()
    -- first AdamW step: p <- p - lr*wd*p - lr * g / (|g| + eps) (bias-corrected m = g, v = g^2)
    local function want(p, g) return p - 0.1 * 0.01 * p - 0.1 * g / (math.abs(g) + 1e-8) end
    h.close(a:detach(), {want(1, 2), want(-2, -0.5)}, 1e-6, 1e-6)
    h.close(b:detach(), {want(3, 4)}, 1e-6, 1e-6)
    has(errmsg(optim.SGD, {A = a, B = 'x'}, {lr = 1}), 'optim.SGD', "a table {name = Tensor}", 'key B holds a string')
  end)
end)

describe('results of one shape', function()
  it('torch.load returns one value for every format; metadata comes from torch.load_metadata', function()
    local dir = h.tmpdir()
    torch.save(dir .. '/a.safetensors', {x = torch.ones(2)}, {metadata = {note = 'hi'}})
    assert.are.equal(1, select('#', torch.load(dir .. '/a.safetensors')))
    h.close(torch.load(dir .. '/a.safetensors').x, {1, 1}, 0, 0)
    assert.are.same({note = 'hi'}, torch.load_metadata(dir .. '/a.safetensors'))
    os.execute('rm -rf ' .. h.q(dir))
  end)

  it('one name per function: quant.load_checkpoint reads both checkpoint kinds', function()
    assert.is_nil(quant.load_seed_checkpoint)
    assert.are.equal('function', type(quant.load_checkpoint))
  end)
end)
