-- gguf: the Lua API over GGUF files (metadata, tensors, load with HF names and config), on a
-- small llama file written by Python's gguf package, values checked against its dequantizer.
local torch = require 'torch'
local gguf = require 'gguf'
local h = require 'helper'

-- Writes <dir>/tiny.gguf (a 1-layer llama: Q8_0, Q4_1, F16 and F32 tensors, Q/K permuted as
-- llama.cpp's converter does) and returns the reference values as a Lua table.
local dir, ref
local function setup()
  if ref then return ref end
  dir = h.tmpdir()
  local out = h.py(([==[
import numpy as np
from gguf import GGUFWriter, GGMLQuantizationType as T, GGUFValueType as V
from gguf.quants import quantize, dequantize
def lua(v):
    if isinstance(v, dict): return '{' + ','.join('[%%r]=%%s' %% (k, lua(x)) for k, x in v.items()) + '}'
    if isinstance(v, (list, tuple)): return '{' + ','.join(lua(x) for x in v) + '}'
    if isinstance(v, np.ndarray): return lua(v.tolist())
    if isinstance(v, bool): return 'true' if v else 'false'
    return repr(v)
def permute(w, n_head):  # convert_hf_to_gguf.py LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
rng = np.random.default_rng(5)
w = GGUFWriter('%s/tiny.gguf', 'llama')
w.add_block_count(1); w.add_context_length(64); w.add_embedding_length(32); w.add_feed_forward_length(32)
w.add_head_count(2); w.add_head_count_kv(1); w.add_layer_norm_rms_eps(1e-6); w.add_rope_freq_base(10000.0)
w.add_vocab_size(40); w.add_eos_token_id(3)
w.add_array('tokenizer.ggml.tokens', ['<s>', 'a', 'b'])
w.add_key_value('test.u64', 2**40, V.UINT64)
w.add_bool('test.flag', False)
w.add_key_value('test.nested', [[1, 2], [3]], V.ARRAY)
R = {}
emb = rng.standard_normal((40, 32)).astype(np.float32)
q8 = quantize(emb, T.Q8_0)
w.add_tensor('token_embd.weight', q8, raw_dtype=T.Q8_0); R['emb'] = dequantize(q8, T.Q8_0)
q = rng.standard_normal((32, 32)).astype(np.float32)
w.add_tensor('blk.0.attn_q.weight', permute(q, 2)); R['q'] = q
k = rng.standard_normal((16, 32)).astype(np.float32)
w.add_tensor('blk.0.attn_k.weight', permute(k, 1)); R['k'] = k
v = rng.standard_normal((16, 32)).astype(np.float32)
q41 = quantize(v, T.Q4_1)
w.add_tensor('blk.0.attn_v.weight', q41, raw_dtype=T.Q4_1); R['v'] = dequantize(q41, T.Q4_1)
o = rng.standard_normal((32, 32)).astype(np.float16)
w.add_tensor('blk.0.attn_output.weight', o); R['o'] = o.astype(np.float32)
n = rng.standard_normal(32).astype(np.float32)
w.add_tensor('blk.0.attn_norm.weight', n); R['norm'] = n
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
print('return ' + lua(R))
]==]):format(dir))
  ref = assert(loadstring(out))()
  return ref
end

local function errmsg(f, ...)
  local ok, err = pcall(f, ...)
  assert.is_false(ok, 'expected an error')
  return tostring(err)
end

describe('gguf', function()
  setup()
  local path = dir .. '/tiny.gguf'

  it('reads metadata of every kind', function()
    local m = gguf.metadata(path)
    assert.are.equal('llama', m['general.architecture'])
    assert.are.equal(1, m['llama.block_count'])
    assert.are.equal(2, m['llama.attention.head_count'])
    assert.is_true(math.abs(m['llama.attention.layer_norm_rms_epsilon'] - 1e-6) < 1e-12)
    assert.are.same({'<s>', 'a', 'b'}, m['tokenizer.ggml.tokens'])
    assert.are.equal(2 ^ 40, m['test.u64'])
    assert.is_false(m['test.flag'])
    assert.are.same({{1, 2}, {3}}, m['test.nested'])
  end)

  it('lists tensors in PyTorch order', function()
    local ts = gguf.tensors(path)
    assert.are.equal(6, #ts)
    local by = {}
    for _, t in ipairs(ts) do by[t.name] = t end
    assert.are.same({40, 32}, by['token_embd.weight'].shape)
    assert.are.equal('Q8_0', by['token_embd.weight'].type)
    assert.are.equal('Q4_1', by['blk.0.attn_v.weight'].type)
    assert.are.equal('F16', by['blk.0.attn_output.weight'].type)
    assert.are.same({16, 32}, by['blk.0.attn_k.weight'].shape)
    assert.are.equal(40 * 34, by['token_embd.weight'].nbytes)
  end)

  it('loads with Hugging Face names, layout and config', function()
    local t, cfg = gguf.load(path)
    local names = {}
    for k in pairs(t) do names[#names + 1] = k end
    table.sort(names)
    assert.are.same({'model.embed_tokens.weight', 'model.layers.0.input_layernorm.weight',
                     'model.layers.0.self_attn.k_proj.weight', 'model.layers.0.self_attn.o_proj.weight',
                     'model.layers.0.self_attn.q_proj.weight', 'model.layers.0.self_attn.v_proj.weight'}, names)
    h.close(t['model.embed_tokens.weight'], ref.emb, 0, 0)
    h.close(t['model.layers.0.self_attn.q_proj.weight'], ref.q, 0, 0)
    h.close(t['model.layers.0.self_attn.k_proj.weight'], ref.k, 0, 0)
    h.close(t['model.layers.0.self_attn.v_proj.weight'], ref.v, 0, 0)
    h.close(t['model.layers.0.self_attn.o_proj.weight'], ref.o, 0, 0)
    h.close(t['model.layers.0.input_layernorm.weight'], ref.norm, 0, 0)
    assert.are.equal(torch.float32, t['model.embed_tokens.weight'].dtype)
    assert.are.equal('llama', cfg.model_type)
    assert.are.same({'LlamaForCausalLM'}, cfg.architectures)
    assert.are.equal(32, cfg.hidden_size)
    assert.are.equal(2, cfg.num_attention_heads)
    assert.are.equal(1, cfg.num_key_value_heads)
    assert.are.equal(16, cfg.head_dim)
    assert.are.equal(40, cfg.vocab_size)
    assert.are.equal(1e-6, cfg.rms_norm_eps)
    assert.are.equal(3, cfg.eos_token_id)
    assert.is_true(cfg.tie_word_embeddings)
  end)

  it('loads GGUF names and layout as stored, in other dtypes', function()
    local t, cfg = gguf.load(path, {hf_names = false, dtype = 'bfloat16'})
    assert.are.equal(torch.bfloat16, t['token_embd.weight'].dtype)
    h.close(t['blk.0.attn_v.weight']:float(), torch.tensor(ref.v):bfloat16():float(), 0, 0)
    -- Q rows stay interleaved: row 2 of head 1 is HF row 9 (head_dim 16)
    h.close(t['blk.0.attn_q.weight'][2]:float(), torch.tensor(ref.q[9]):bfloat16():float(), 0, 0)
    assert.are.equal(32, cfg.hidden_size)
    local f16 = gguf.load(path, {hf_names = false, dtype = 'float16'})
    assert.are.equal(torch.float16, f16['blk.0.attn_output.weight'].dtype)
    h.close(f16['blk.0.attn_output.weight'], ref.o, 0, 0)
  end)

  it('reports errors with the function, file and key', function()
    local e = errmsg(gguf.metadata, dir .. '/none.gguf')
    assert.is_truthy(e:find('gguf.metadata: ', 1, true), e)
    assert.is_truthy(e:find('none.gguf: file: cannot open', 1, true), e)
    local bad = dir .. '/bad.gguf'
    local f = io.open(bad, 'wb'); f:write('GGUF\3\0\0\0' .. ('\255'):rep(16)); f:close()
    e = errmsg(gguf.tensors, bad)
    assert.is_truthy(e:find('gguf.tensors: ', 1, true), e)
    assert.is_truthy(e:find('bad.gguf: metadata count: expected at most', 1, true), e)
    e = errmsg(gguf.load, path, {dtype = 'int32'})
    assert.is_truthy(e:find("bad argument #2 to 'gguf.load' (option 'dtype':", 1, true) and e:find('float dtype', 1, true), e)
    e = errmsg(gguf.load, path, {hf_name = true})
    assert.is_truthy(e:find("unknown option 'hf_name'", 1, true), e)
    e = errmsg(gguf.load, 42)
    assert.is_truthy(e:find('expected a string', 1, true), e)
  end)

  it('cleans up', function() os.execute('rm -rf ' .. h.q(dir)) end)
end)
