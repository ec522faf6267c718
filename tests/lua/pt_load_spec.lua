-- pt_load: torch.load of files written by Python's torch.save (dicts, state dicts, nested
-- checkpoints, shared views, KD shards, CUDA tags), torch.None, load_state_dict, bad files.
local torch = require 'torch'
local h = require 'helper'

-- Fixtures written once by the real PyTorch; returns the folder and reference values.
local dir, ref
local function fixtures()
  if dir then return dir, ref end
  dir = h.tmpdir()
  local out = h.py(([==[
import os, sys, collections, torch
d = %s
def lua(v):
    if isinstance(v, dict): return '{' + ','.join('[%%r]=%%s' %% (k, lua(x)) for k, x in v.items()) + '}'
    if isinstance(v, (list, tuple)): return '{' + ','.join(lua(x) for x in v) + '}'
    if isinstance(v, bool): return 'true' if v else 'false'
    if isinstance(v, torch.Tensor): return lua(v.tolist())
    return repr(v)
g = torch.arange(12, dtype=torch.float32).reshape(3, 4)
plain = {'f32': g * 0.25 - 1, 'f16': (g * 0.5 - 2).half(), 'bf16': torch.tensor([1.0, -2.5, 3.140625]).bfloat16(),
         'i8': torch.tensor([-128, 0, 127], dtype=torch.int8), 'i64': torch.tensor([-2**40, 0, 2**50]),
         'bool': torch.tensor([True, False, True]), 'scalar': torch.tensor(3.5), 'empty': torch.empty(0, 3)}
torch.save(plain, os.path.join(d, 'plain.pt'))
torch.manual_seed(0)
m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
torch.save(m.state_dict(), os.path.join(d, 'module.pt'))
shared = {'w': torch.ones(2)}
nested = {'model_state_dict': {k: v.clone() for k, v in m.state_dict().items()},
          'config': {'hidden': 64, 'ratio': 0.5, 'names': ('a', 'b'), 'dtype': torch.float16},
          'step': 12, 'lr': 1e-3, 'name': 'x', 'flags': [True, None], 'intkeys': {0: 'zero', 7: 'seven'},
          'bytes': b'\x00\xffab', 'a': shared, 'b': shared}
torch.save(nested, os.path.join(d, 'nested.pt'))
base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
torch.save({'base': base, 't': base.t(), 'narrow': base.narrow(1, 2, 3)}, os.path.join(d, 'views.pt'))
N, L, K = 2, 6, 3
shard = {'input_ids': (torch.arange(N * L).reshape(N, L) * 7).int(), 'attention_mask': torch.ones(N, L, dtype=torch.uint8),
         'topk_idx': (torch.arange(N * (L - 1) * K).reshape(N, L - 1, K) * 13).int(),
         'topk_logits': (torch.arange(N * (L - 1) * K).reshape(N, L - 1, K) * 0.125 - 5).half()}
torch.save(shard, os.path.join(d, 'shard_00000.pt'))
import pickle, types
class CudaPickler(pickle._Pickler):
    def save_pers(self, pid):
        if isinstance(pid, tuple) and pid[0] == 'storage': pid = pid[:3] + ('cuda:0',) + pid[4:]
        super().save_pers(pid)
torch.save({'x': torch.arange(5.0)}, os.path.join(d, 'cuda.pt'), pickle_module=types.SimpleNamespace(Pickler=CudaPickler, __name__="cudapickle"))
R = {'plain': plain, 'sd': dict(m.state_dict()), 'shard': shard}
print('return ' + lua(R))
]==]):format(('%q'):format(dir)))
  ref = assert(loadstring(out))()
  return dir, ref
end

local function errmsg(f, ...)
  local ok, err = pcall(f, ...)
  assert.is_false(ok, 'expected an error')
  return tostring(err)
end

local function keys(t)
  local r = {}
  for k in pairs(t) do r[#r + 1] = tostring(k) end
  table.sort(r)
  return r
end

describe('torch.load of torch.save files', function()
  it('loads a plain dict of tensors with exact values and dtypes', function()
    local d, R = fixtures()
    local t = torch.load(d .. '/plain.pt')
    assert.are.same({'bf16', 'bool', 'empty', 'f16', 'f32', 'i64', 'i8', 'scalar'}, keys(t))
    for name, want in pairs(R.plain) do
      local got = t[name]
      assert.is_true(torch.is_tensor(got), name)
      if name == "scalar" then assert.are.equal(want, got:item())
      elseif name == "empty" then assert.are.same({0, 3}, {got:size(1), got:size(2)})
      else assert.are.same(want, got:totable(), name) end
    end
    assert.are.equal('float16', t.f16.dtype)
    assert.are.equal('bfloat16', t.bf16.dtype)
    assert.are.equal('int8', t.i8.dtype)
    assert.are.equal('int64', t.i64.dtype)
    assert.are.equal('bool', t.bool.dtype)
    assert.are.equal(0, t.scalar:dim())
    assert.are.equal(0, t.empty:numel())
  end)

  it('loads an nn.Module state dict (OrderedDict with _metadata) without the metadata', function()
    local d, R = fixtures()
    local sd = torch.load(d .. '/module.pt')
    assert.are.same({'0.bias', '0.weight', '1.bias', '1.weight'}, keys(sd))
    for name, want in pairs(R.sd) do assert.are.same(want, sd[name]:totable(), name) end
  end)

  it('loads nested values: numbers, strings, booleans, None, tuples, int keys, bytes', function()
    local d = fixtures()
    local v = torch.load(d .. '/nested.pt')
    assert.are.equal(12, v.step)
    assert.are.equal(1e-3, v.lr)
    assert.are.equal('x', v.name)
    assert.are.equal(2, #v.flags)
    assert.are.equal(true, v.flags[1])
    assert.are.equal(torch.None, v.flags[2])
    assert.are.equal('userdata', type(torch.None))
    assert.are.equal(64, v.config.hidden)
    assert.are.equal(0.5, v.config.ratio)
    assert.are.same({'a', 'b'}, v.config.names)
    assert.are.equal('torch.float16', v.config.dtype)
    assert.are.equal('zero', v.intkeys[0])
    assert.are.equal('seven', v.intkeys[7])
    assert.are.equal('\0\255ab', v.bytes)
    assert.is_true(torch.is_tensor(v.model_state_dict['0.weight']))
    assert.are.equal(v.a, v.b)  -- one Python dict saved twice stays one table
  end)

  it('keeps views of one storage shared', function()
    local d = fixtures()
    local v = torch.load(d .. '/views.pt')
    assert.are.same({6, 4}, {v.t:size(1), v.t:size(2)})
    assert.is_false(v.t:is_contiguous())
    assert.are.equal(2, v.narrow:storage_offset())
    v.base:fill_(-1)
    assert.are.equal(-1, v.t:sum():item() / 24)
    assert.are.equal(-12, v.narrow:sum():item())
    -- the file is untouched (copy-on-write mapping)
    assert.are.equal(276, torch.load(d .. '/views.pt').base:sum():item())
  end)

  it('loads a KD cache shard in its stored dtypes', function()
    local d, R = fixtures()
    local s = torch.load(d .. '/shard_00000.pt')
    assert.are.equal('int32', s.input_ids.dtype)
    assert.are.equal('uint8', s.attention_mask.dtype)
    assert.are.equal('int32', s.topk_idx.dtype)
    assert.are.equal('float16', s.topk_logits.dtype)
    for name, want in pairs(R.shard) do assert.are.same(want, s[name]:totable(), name) end
  end)

  it('loads CUDA-tagged storages to the CPU, and honours {device=}', function()
    local d = fixtures()
    local v = torch.load(d .. '/cuda.pt')
    assert.are.same({0, 1, 2, 3, 4}, v.x:totable())
    assert.are.equal('cpu', v.x.device)
    local c = torch.load(d .. '/cuda.pt', {device = 'cpu'})
    assert.are.equal(10, c.x:sum():item())
  end)
end)

describe('torch.load_state_dict', function()
  it('flattens nested dicts of a .pt file into dotted names', function()
    local d, R = fixtures()
    local sd = torch.load_state_dict(d .. '/nested.pt')
    assert.are.same({'a.w', 'b.w', 'model_state_dict.0.bias', 'model_state_dict.0.weight',
                     'model_state_dict.1.bias', 'model_state_dict.1.weight'}, keys(sd))
    assert.are.same(R.sd['0.weight'], sd['model_state_dict.0.weight']:totable())
    assert.are.same({'0.bias', '0.weight', '1.bias', '1.weight'}, keys(torch.load_state_dict(d .. '/module.pt')))
  end)

  it('reads safetensors files too, and torch.load keeps their two results', function()
    local d = h.tmpdir()
    torch.save(d .. '/w.safetensors', {w = torch.arange(3)}, {metadata = {format = 'pt'}})
    local sd = torch.load_state_dict(d .. '/w.safetensors')
    assert.are.same({0, 1, 2}, sd.w:totable())
    local ts, meta = torch.load(d .. '/w.safetensors'), torch.load_metadata(d .. '/w.safetensors')
    assert.are.same({0, 1, 2}, ts.w:totable())
    assert.are.equal('pt', meta.format)
    -- told by content, not name: a safetensors file named .pt still loads as one
    os.rename(d .. '/w.safetensors', d .. '/w.pt')
    assert.are.same({0, 1, 2}, torch.load(d .. '/w.pt').w:totable())
  end)
end)

describe('bad .pt files', function()
  it('raise errors naming the function and the file', function()
    local d = fixtures()
    local f = assert(io.open(d .. '/plain.pt', 'rb'))
    local bytes = f:read('*a')
    f:close()
    local cut = d .. '/cut.pt'
    for _, n in ipairs({10, 100, math.floor(#bytes / 2), #bytes - 1}) do
      local o = assert(io.open(cut, 'wb'))
      o:write(bytes:sub(1, n))
      o:close()
      local msg = errmsg(torch.load, cut)
      assert.truthy(msg:find('torch.load: ', 1, true), msg)
      assert.truthy(msg:find(cut, 1, true), msg)
      assert.truthy(errmsg(torch.load_state_dict, cut):find('torch.load_state_dict: ', 1, true))
    end
    assert.truthy(errmsg(torch.load, d .. '/missing.pt'):find('missing.pt', 1, true))
    -- a damaged first byte: still read as a .pt by its name, so the zip reader explains
    local o = assert(io.open(d .. '/flip.pt', 'wb'))
    o:write('X' .. bytes:sub(2))
    o:close()
    assert.truthy(errmsg(torch.load, d .. '/flip.pt'):find('local header', 1, true))
  end)

  it('rejects a .pt whose top level is not a dict for load_state_dict', function()
    local d = h.tmpdir()
    h.py(('import torch; torch.save(torch.ones(2), %q)'):format(d .. '/bare.pt'))
    assert.are.same({1, 1}, torch.load(d .. '/bare.pt'):totable())
    local e = errmsg(torch.load_state_dict, d .. '/bare.pt')
    assert.truthy(e:find('expected a dict', 1, true))
    assert.truthy(e:find(d .. '/bare.pt: ', 1, true), e)   -- the file is named
  end)
end)
