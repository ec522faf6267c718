-- nn: the decoder LM from Lua on tiny random models: construction, forward, parameters,
-- state dicts, freezing, checkpointing, save/load, generation and perplexity.
local torch = require 'torch'
local nn = require 'nn'
local h = require 'helper'

local function tiny(model_type, extra)
  local cfg = {
    model_type = model_type, vocab_size = 97, hidden_size = 64, intermediate_size = 96,
    num_hidden_layers = 2, num_attention_heads = 4, num_key_value_heads = 2,
    max_position_embeddings = 64, tie_word_embeddings = true, initializer_range = 0.1,
  }
  for k, v in pairs(extra or {}) do cfg[k] = v end
  torch.manual_seed(0)
  return nn.from_config(cfg)
end

local ids = torch.tensor({{3, 17, 96, 0, 42, 7}}, {dtype = 'int64'})

describe('nn model', function()
  it('builds each model type from a config table and runs forward', function()
    for _, mt in ipairs({'qwen3', 'llama', 'qatlab_gpt'}) do
      local m = tiny(mt)
      local logits = m:forward(ids)
      assert.are.same({1, 6, 97}, {logits:size(1), logits:size(2), logits:size(3)})
      h.close(m(ids), logits, 0, 0)   -- __call is forward
      local hid = m:forward(ids, {output = 'hidden'})
      assert.are.equal(64, hid:size(3))
      assert.are.equal(mt, m.config.model_type)
      assert.truthy(tostring(m):find(mt))
    end
  end)

  it('the config table reflects defaults and switches', function()
    local g = tiny('qatlab_gpt')
    assert.are.equal(30, g.config.logit_softcap)
    assert.are.equal('relu2', g.config.mlp_act)
    assert.are.equal(16, g.config.head_dim)
    local q = tiny('qwen3', {head_dim = 32, tie_word_embeddings = false})
    assert.are.equal(32, q.config.head_dim)
    assert.are.same({'Qwen3ForCausalLM'}, q.config.architectures)
  end)

  it('lists parameters in Hugging Face order and linear layers by module name', function()
    local m = tiny('qwen3', {tie_word_embeddings = false})
    local np = m:named_parameters()
    assert.are.equal('model.embed_tokens.weight', np[1][1])
    assert.are.equal('model.layers.0.self_attn.q_proj.weight', np[2][1])
    assert.are.equal('lm_head.weight', np[#np][1])
    assert.are.equal(#np, #m:parameters())
    local names = m:linear_names()
    assert.are.equal(15, #names)
    assert.are.equal('model.layers.0.mlp.gate_proj', names[5])
    local w = m:get_linear('model.layers.1.mlp.down_proj')
    assert.are.same({64, 96}, {w:size(1), w:size(2)})
    assert.has_error(function() m:get_linear('model.layers.5.mlp.down_proj') end)
    assert.is_true(m:num_parameters() > 0)
  end)

  it('state_dict / load_state_dict round trip, strict errors name the key', function()
    local a = tiny('llama')
    torch.manual_seed(1)
    local b = nn.from_config({model_type = 'llama', vocab_size = 97, hidden_size = 64, intermediate_size = 96,
                        num_hidden_layers = 2, num_attention_heads = 4, num_key_value_heads = 2,
                        tie_word_embeddings = true})
    local sd = a:state_dict()
    assert.is_true(torch.is_tensor(sd['model.norm.weight']))
    b:load_state_dict(sd)
    h.close(b(ids), a(ids), 0, 0)
    sd['model.norm.weight'] = nil
    local ok, err = pcall(function() b:load_state_dict(sd) end)
    assert.is_false(ok)
    assert.truthy(err:find('model.norm.weight', 1, true))
    local missing = b:load_state_dict(sd, {strict = false})
    assert.are.same({'model.norm.weight'}, missing)
    sd['model.norm.weight'] = torch.zeros(3)
    ok, err = pcall(function() b:load_state_dict(sd) end)
    assert.is_false(ok)
    assert.truthy(err:find('shape', 1, true) and err:find('model.norm.weight', 1, true))
  end)

  it('save_pretrained / from_pretrained give identical logits (single and sharded)', function()
    local m = tiny('qwen3')
    for _, shard in ipairs({false, true}) do
      local dir = h.tmpdir()
      m:save_pretrained(dir, shard and {max_shard_bytes = 20000} or nil)
      local f = io.open(dir .. (shard and '/model.safetensors.index.json' or '/model.safetensors'))
      assert.truthy(f); f:close()
      local m2 = nn.from_pretrained(dir)
      h.close(m2(ids), m(ids), 0, 0)
      local m3 = nn.from_pretrained(dir, {dtype = 'bfloat16'})
      assert.are.equal('bfloat16', m3.config.torch_dtype)
      os.execute('rm -rf ' .. h.q(dir))
    end
    local ok, err = pcall(nn.from_pretrained, '/nonexistent/qatlab_model')
    assert.is_false(ok)
    assert.truthy(err:find('nn.from_pretrained', 1, true) and err:find('/nonexistent/qatlab_model', 1, true))
  end)

  it('train/eval, freezing by pattern, checkpointed gradients equal plain ones', function()
    local m = tiny('qatlab_gpt')
    assert.is_true(m.training)
    m:eval()
    assert.is_false(m.training)
    m:train()
    local function grads(ckpt)
      m:gradient_checkpointing(ckpt)
      local ps = m:named_parameters()
      for _, p in ipairs(ps) do p[2].grad = nil end
      m(ids):pow(2):mean():backward()
      local g = {}
      for i, p in ipairs(ps) do g[i] = p[2].grad end
      return g, ps
    end
    local plain, ps = grads(false)
    local ck = grads(true)
    for i = 1, #plain do h.close(ck[i], plain[i], 1e-7, 0) end
    -- selective: only the first n layers checkpointed, the same gradients
    local n_layers = m.config.num_hidden_layers
    assert.is_true(n_layers >= 2)
    for _, n in ipairs({0, 1, n_layers, n_layers + 5}) do
      local sel = grads(n)
      assert.are.equal(math.min(n, n_layers), m:gradient_checkpointing_layers())
      for i = 1, #plain do h.close(sel[i], plain[i], 1e-7, 0) end
    end
    m:gradient_checkpointing(true)
    assert.are.equal(n_layers, m:gradient_checkpointing_layers())
    m:gradient_checkpointing(false)
    assert.are.equal(0, m:gradient_checkpointing_layers())
    for _, bad in ipairs({-1, 1.5, 'all'}) do
      local ok, err = pcall(m.gradient_checkpointing, m, bad)
      assert.is_false(ok)
      assert.truthy(err:find('expected true, false or a layer count', 1, true), err)
    end
    m:requires_grad_(false, {pattern = 'embed_tokens'})
    local fz = grads(false)
    assert.is_nil(fz[1])
    assert.is_false(ps[1][2].requires_grad)
    assert.has_error(function() m:requires_grad_(false, {pattern = 'no_such_param'}) end)
    m:requires_grad_(true)
    assert.is_true(ps[1][2].requires_grad)
  end)

  it('to() changes dtype and keeps the model usable', function()
    local m = tiny('llama')
    local ref = m(ids)
    m:to{dtype = 'float64'}
    assert.are.equal('float64', m.config.torch_dtype)
    h.close(m(ids), ref, 1e-5, 1e-5)
    m:to('float32')
    assert.has_error(function() m:to{dtype = 'int64'} end)
  end)

  it('padding mask: a left-padded row equals the unpadded sequence', function()
    local m = tiny('qwen3')
    local single = m(torch.tensor({{11, 22, 33}}, {dtype = 'int64'}))
    local batch = torch.tensor({{9, 8, 7, 6}, {0, 11, 22, 33}}, {dtype = 'int64'})
    local mask = torch.tensor({{1, 1, 1, 1}, {0, 1, 1, 1}}, {dtype = 'int64'})
    local out = m:forward(batch, {attention_mask = mask})
    h.close(out[2][4], single[1][3], 1e-5, 0)
  end)

  it('generate: greedy equals argmax by recompute, samples, stops, streams', function()
    local m = tiny('qwen3')
    m:eval()
    local prompt = {3, 1, 4, 1, 5}
    local r = m:generate{input_ids = torch.tensor(prompt, {dtype = 'int64'}), max_new_tokens = 5}
    assert.are.equal(5, #r[1])
    assert.is_true(r.tokens_per_second > 0)
    local seq = {unpack(prompt)}
    for i = 1, 5 do
      local l = torch.no_grad(function() return m(torch.tensor({seq}, {dtype = 'int64'})) end)
      local nx = l[1][#seq]:argmax():item()
      assert.are.equal(nx, r[1][i])
      seq[#seq + 1] = nx
    end
    local streamed = {}
    local s = m:generate{input_ids = prompt, max_new_tokens = 6, temperature = 1.2, top_k = 40, top_p = 0.9,
                         repetition_penalty = 1.2, seed = 5, num_samples = 3,
                         on_token = function(id) streamed[#streamed + 1] = id end}
    assert.are.equal(3, #s)
    assert.are.equal(18, #streamed)
    local s2 = m:generate{input_ids = prompt, max_new_tokens = 6, temperature = 1.2, top_k = 40, top_p = 0.9,
                          repetition_penalty = 1.2, seed = 5, num_samples = 3}
    assert.are.same(s[1], s2[1])
    local st = m:generate{input_ids = prompt, max_new_tokens = 5, stop = r[1][2]}
    assert.is_true(#st[1] <= 2)
    local stopped = m:generate{input_ids = prompt, max_new_tokens = 9, on_token = function() return false end}
    assert.are.equal(1, #stopped[1])
    local ok, err = pcall(function()
      m:generate{input_ids = prompt, max_new_tokens = 3, on_token = function() error('boom') end}
    end)
    assert.is_false(ok)
    assert.truthy(err:find('boom', 1, true))
  end)

  it('perplexity with the sliding window', function()
    local m = tiny('llama')
    m:eval()
    torch.manual_seed(3)
    local seq = torch.randint(0, 97, {40})
    local r = m:perplexity(seq, {max_length = 16, stride = 8, bytes = 100})
    assert.are.equal(39, r.tokens)
    assert.is_true(math.abs(r.ppl - math.exp(r.nll)) < 1e-9)
    assert.is_true(r.bpb > 0)
    -- one window: the plain mean next-token cross-entropy
    local one = m:perplexity(seq, {max_length = 64, stride = 64})
    local l = torch.no_grad(function() return m(seq:view(1, 40)) end)[1]
    local lp = l:narrow(1, 1, 39):log_softmax(2)
    local nll = -lp:gather(2, seq:narrow(1, 2, 39):view(39, 1)):mean():item()
    assert.is_true(math.abs(one.nll - nll) < 1e-5)
  end)

  it('rejects bad configs with the key in the message', function()
    local ok, err = pcall(nn.from_config, {model_type = 'qwen3', vocab_size = 10})
    assert.is_false(ok)
    assert.truthy(err:find('hidden_size', 1, true))
    ok, err = pcall(nn.from_config, {model_type = 'bert', vocab_size = 10})
    assert.is_false(ok)
    assert.truthy(err:find('model_type', 1, true))
  end)

  it('gives tensors with methods to a script that never required torch', function()
    local code = "local nn = require 'nn'; local m = nn.from_config({model_type = 'llama', vocab_size = 11, "
      .. "hidden_size = 8, intermediate_size = 16, num_hidden_layers = 1, num_attention_heads = 2, "
      .. "num_key_value_heads = 1}); print(m:named_parameters()[1][2]:dim())"
    local rc, out, err = h.host('-e ' .. h.q(code))
    assert.are.equal(0, rc, err)
    assert.are.equal('2', out:match('%S+'))
  end)
end)
