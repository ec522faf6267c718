-- errors: every mistake is a catchable Lua error naming the function and the problem (types,
-- options, dims, devices, dtypes, autograd, item, use after free), and a hostile-input loop
-- that calls every torch function and Tensor method with bad arguments: the process survives.
local torch = require 'torch'
local h = require 'helper'

local function errmsg(f, ...)
  local ok, err = pcall(f, ...)
  assert.is_false(ok, 'expected an error')
  assert.are.equal('string', type(err))
  return err
end

-- asserts that calling f(...) fails with a message containing every given fragment (plain text)
local function fails_with(fragments, f, ...)
  local msg = errmsg(f, ...)
  if type(fragments) == 'string' then fragments = {fragments} end
  for _, frag in ipairs(fragments) do
    assert(msg:find(frag, 1, true), ('message %q lacks %q'):format(msg, frag))
  end
  return msg
end

describe('error messages', function()
  it('matmul names the shapes exactly', function()
    assert.are.equal('torch.matmul: shapes (3, 4) and (5, 6) cannot be multiplied (4 != 5)',
                     errmsg(torch.matmul, torch.zeros(3, 4), torch.zeros(5, 6)))
    local a = torch.zeros(3, 4)
    assert.are.equal('Tensor.matmul: shapes (3, 4) and (5,) cannot be multiplied (4 != 5)',
                     errmsg(function() return a:matmul(torch.zeros(5)) end))
    assert.are.equal('torch.matmul: shapes (2, 3, 4) and (2, 5, 6) cannot be multiplied (4 != 5)',
                     errmsg(torch.matmul, torch.zeros(2, 3, 4), torch.zeros(2, 5, 6)))
    fails_with('torch.matmul: both arguments need at least 1 dimension', torch.matmul, torch.tensor(1), a)
  end)

  it('wrong argument types name the argument and the type given', function()
    local t = torch.ones(2, 3)
    fails_with("bad argument #1 to 'torch.add' (input: expected a Tensor, got string", torch.add, 'a', 1)
    fails_with("bad argument #2 to 'Tensor.matmul' (other: expected a Tensor, got string", t.matmul, t, 'x')
    fails_with("bad argument #1 to 'Tensor.sum' (input: expected a Tensor, got string", torch.Tensor.sum, 'x')
    fails_with("bad argument #1 to 'Tensor.add' (input: expected a Tensor, got nothing", torch.Tensor.add)
    fails_with("bad argument #3 to 'Tensor.add' (alpha: expected a number, got userdata", t.add, t, t, t)
    fails_with("bad argument #2 to 'Tensor.clamp' (min: expected a number, got string", t.clamp, t, 'a')
    fails_with("bad argument #4 to 'Tensor.narrow' (length: expected a number, got string", t.narrow, t, 2, 1, 'x')
    fails_with("bad argument #2 to 'Tensor.mean' (dim: expected an integer, got 1.5", t.mean, t, 1.5)
    fails_with('torch.zeros: size #1: expected a number, got string', torch.zeros, 'a')
    fails_with('torch.zeros: size #2: expected a non-negative integer, got -2', torch.zeros, 2, -2)
    fails_with("bad argument #1 to 'torch.einsum' (equation: expected a string, got number", torch.einsum, 1, t)
    fails_with("bad argument #1 to 'torch.no_grad' (fn: expected a function, got no value", torch.no_grad)
    fails_with("bad argument #1 to 'torch.manual_seed' (seed: expected a number, got string", torch.manual_seed, 'x')
    fails_with("bad argument #1 to 'torch.cat' (tensors: expected a table of tensors", torch.cat)
    fails_with('torch.cat: tensors: entry 2 is string, expected a Tensor', torch.cat, {t, 'x'})
    fails_with("bad argument #2 to 'torch.zeros' (option 'requires_grad': expected a boolean, got string", torch.zeros, 2, {requires_grad = 'yes'})
    fails_with("bad argument #2 to 'torch.zeros' (option 'device': expected a device name such as 'cuda:0', got number", torch.zeros, 2, {device = 5})
    fails_with('torch.tensor: expected a number at depth 2, got string', torch.tensor, {1, 'a'})
    fails_with('Tensor.__add: expected a Tensor or a number, got string', function() return t + 'a' end)
    fails_with('Tensor.__add: expected a Tensor or a number, got string', function() return 'a' + t end)
    fails_with('Tensor.__mul: expected a Tensor or a number, got table', function() return t * {} end)
    fails_with('Tensor.__sub: expected a Tensor or a number, got nil', function() return t - nil end)
    fails_with('Tensor.__len: len() of a 0-dim tensor', function() return #torch.tensor(1) end)
    fails_with('Tensor.__newindex: expected a number or boolean, got string', function() t[1] = 'x' end)
    fails_with("Tensor.__newindex: cannot set field 'shape'", function() t.shape = {1} end)
    fails_with('Tensor.__newindex: grad: expected a Tensor, got number', function() t.grad = 1 end)
  end)

  it('unknown options are errors that list the known ones', function()
    local t = torch.ones(2, 3)
    fails_with({"torch.zeros", "unknown option 'dtyp'", 'dtype, device, requires_grad'}, torch.zeros, 2, {dtyp = 'float32'})
    -- each known option is listed once
    fails_with({"Tensor.sum", "unknown option 'keepdims' (did you mean 'keepdim'?); this call takes: dim, keepdim, dtype"}, t.sum, t, {dim = 1, keepdims = true})
    fails_with({"Tensor.to", "unknown option 'dtpye'"}, t.to, t, {dtpye = 'float64'})
    fails_with({"torch.autograd.grad", "unknown option 'retain'"}, torch.autograd.grad, t, {t}, {retain = true})
    fails_with({"torch.set_printoptions", "unknown option 'precison'"}, torch.set_printoptions, {precison = 2})
    fails_with({"Tensor.softmax", "unknown option 'dims'"}, t.softmax, t, 2, {dims = 1})
  end)

  it('dims out of range and dim 0', function()
    local t = torch.ones(2, 3)
    fails_with({'Tensor.sum', 'dim 3 out of range for a tensor of 2 dims (expected 1..2 or -2..-1)'}, t.sum, t, 3)
    fails_with({'Tensor.softmax', 'dim -3 out of range'}, t.softmax, t, -3)
    fails_with({'Tensor.transpose', 'dim 0 is invalid: dims are 1-based in qatlab'}, t.transpose, t, 0, 1)
    fails_with({'torch.cat', 'dim 3 out of range'}, torch.cat, {t, t}, 3)
    fails_with({'Tensor.size', 'dim 5 out of range'}, t.size, t, 5)
    fails_with({'Tensor.gather', 'dim 0 is invalid'}, t.gather, t, 0, torch.zeros(1, 1, {dtype = 'int64'}))
    fails_with({'Tensor.sum', 'entry 2 is not an integer'}, t.sum, t, {1, 'x'})
  end)

  it('devices: unknown names, and CUDA on a machine without it, are errors (no crash)', function()
    fails_with({"torch.zeros", "unknown device 'gpu' (expected 'cpu', 'cuda' or 'cuda:N')"}, torch.zeros, 2, {device = 'gpu'})
    fails_with({"Tensor.to", "unknown device 'cudaa'"}, function() return torch.ones(2):to('cudaa') end)
    fails_with("torch.tensor: unknown device 'tpu'", torch.tensor, {1}, {device = 'tpu'})
    fails_with("torch.set_default_device: unknown device 'nope'", torch.set_default_device, 'nope')
    if torch.cuda.is_available() then
      fails_with("torch.zeros: device 'cuda:99' is not available", torch.zeros, 2, {device = 'cuda:99'})
      local name = torch.cuda.get_device_name(0)
      assert.are.equal(name, torch.cuda.get_device_properties('cuda:0').name)
      assert.is_true(torch.cuda.get_device_properties().total_memory > 0)
      fails_with('torch.cuda.get_device_name: device 99: expected 0 <= index <', torch.cuda.get_device_name, 99)
      fails_with("torch.cuda.get_device_name: argument #1: expected a CUDA device, got 'cpu'",
                 torch.cuda.get_device_name, 'cpu')
    else
      fails_with({"torch.zeros: device 'cuda' is not available", 'no CUDA GPU'}, torch.zeros, 2, {device = 'cuda'})
      fails_with("torch.ones: device 'cuda:0' is not available", torch.ones, 2, {device = 'cuda:0'})
      fails_with("torch.tensor: device 'cuda' is not available", torch.tensor, {1, 2}, {device = 'cuda'})
      fails_with("torch.randn_like: device 'cuda' is not available", torch.randn_like, torch.ones(2), {device = 'cuda'})
      fails_with("Tensor.cuda: device 'cuda:0' is not available", function() return torch.ones(2):cuda() end)
      fails_with("Tensor.to: device 'cuda' is not available", function() return torch.ones(2):to('cuda') end)
      fails_with("Tensor.to: device 'cuda' is not available", function() return torch.ones(2):to{device = 'cuda'} end)
      fails_with("torch.set_default_device: device 'cuda' is not available", torch.set_default_device, 'cuda')
      assert.are.equal(0, torch.cuda.device_count())
      fails_with('torch.cuda.get_device_name: no CUDA device is available', torch.cuda.get_device_name)
      fails_with('torch.cuda.get_device_properties: no CUDA device is available', torch.cuda.get_device_properties, 0)
    end
    assert.are.equal('cpu', torch.get_default_device())
    assert.are.equal('cpu', torch.zeros(1).device)
  end)

  it('bad dtype names', function()
    local list = 'expected float32, float16, bfloat16, float64, int8, uint8, int16, int32, int64 or bool'
    fails_with({"torch.zeros", "unknown dtype 'float33'", list}, torch.zeros, 2, {dtype = 'float33'})
    fails_with({"torch.tensor", "unknown dtype 'intt'"}, function() return torch.tensor({1}, {dtype = 'intt'}) end)
    fails_with({"Tensor.to", "unknown dtype 'int3'"}, function() return torch.ones(2):to{dtype = 'int3'} end)
    fails_with({"Tensor.view", "unknown dtype 'bogus'"}, function() return torch.ones(2):view('bogus') end)
    fails_with({"torch.set_default_dtype", "unknown dtype 'quad'"}, torch.set_default_dtype, 'quad')
    fails_with({'torch.set_default_dtype', 'the default dtype must be a floating-point type'}, torch.set_default_dtype, 'int32')
    fails_with("bad argument #2 to 'torch.zeros' (option 'dtype': expected a dtype name such as 'float32', got number", torch.zeros, 2, {dtype = 1})
    assert.are.equal('float32', torch.get_default_dtype())
  end)

  it('autograd mistakes', function()
    fails_with('Tensor.backward: this tensor does not require grad and has no grad_fn', function()
      torch.ones(2):sum():backward()
    end)
    local x = torch.ones(2, {requires_grad = true})
    fails_with('Tensor.backward: a gradient is needed for a non-scalar output of 2 elements', function()
      (x * 2):backward()
    end)
    fails_with('Tensor.__newindex: assigned grad has a different size', function() x.grad = torch.zeros(3) end)
    fails_with('Tensor.__newindex: assigned grad has dtype', function() x.grad = torch.zeros(2, {dtype = 'float64'}) end)
    assert.is_nil(x.grad)
    fails_with('torch.autograd.grad: output 1 does not require grad', torch.autograd.grad, torch.ones(1), {x})
    fails_with('Tensor.add_: a leaf Variable that requires grad is being used in an in-place operation', x.add_, x, 1)
    fails_with('Tensor.requires_grad_: Only Tensors of floating point', function()
      torch.ones(2, {dtype = 'int64'}):requires_grad_()
    end)
  end)

  it('item on tensors that are not one element', function()
    fails_with('Tensor.item: only a tensor with one element can be converted to a number, this one has 6',
               function() return torch.ones(2, 3):item() end)
    fails_with('this one has 0', function() return torch.zeros(0):item() end)
  end)

  it('use after t:free() is an error, never a crash', function()
    local t = torch.ones(2, 3)
    local before = torch.memory_stats().cpu_live_bytes
    t:free()
    assert.is_true(t:is_freed())
    assert.is_true(torch.memory_stats().cpu_live_bytes <= before - 24)
    t:free()  -- twice is harmless
    local msg = 'the tensor was freed (t:free() was called on it)'
    fails_with({"bad argument #1 to 'Tensor.sum' (input: ", msg}, t.sum, t)
    fails_with({'Tensor.size', '', msg}, t.size, t)
    fails_with({'Tensor.dim', '', msg}, t.dim, t)
    fails_with({'Tensor.item', '', msg}, t.item, t)
    fails_with({'Tensor.totable', '', msg}, t.totable, t)
    fails_with({'torch.add', '', msg}, torch.add, t, 1)
    fails_with({'torch.add', '', msg}, torch.add, torch.ones(1), t)
    fails_with({'Tensor.__add', '', msg}, function() return t + 1 end)
    fails_with({'Tensor.__add', '', msg}, function() return 1 + t end)
    fails_with({'Tensor.__unm', '', msg}, function() return -t end)
    fails_with({'Tensor.__index', '', msg}, function() return t[1] end)
    fails_with({'Tensor.__newindex', '', msg}, function() t[1] = 0 end)
    fails_with({'Tensor.__index', 'index: ', msg}, function() return torch.ones(2)[t] end)
    fails_with({'torch.cat: tensors: entry 1 was freed'}, torch.cat, {t})
    fails_with({'torch.tensor', '', msg}, torch.tensor, t)
    fails_with({'torch.matmul', '', msg}, torch.matmul, t, t)
    fails_with({'torch.einsum', '', msg}, torch.einsum, 'ij->ji', t)
    fails_with({'Tensor.backward', '', msg}, t.backward, t)
    fails_with({"bad argument #2 to 'Tensor.copy_' (src: ", msg}, function() return torch.ones(1):copy_(t) end)
    assert.is_nil(t.shape)  -- properties of a freed tensor read as nil
    assert.matches('undefined', tostring(t))
    collectgarbage()
    collectgarbage()
  end)

  it('messages carry no C++ backtrace', function()
    for _, f in ipairs{
      function() return torch.zeros(2, 3):view(4) end,
      function() return torch.cat{torch.zeros(2, 3), torch.zeros(3, 2)} end,
      function() return torch.zeros(2):expand(3, 3) end,
      function() return torch.zeros(2, 2):bmm(torch.zeros(2, 2)) end,
    } do
      local msg = errmsg(f)
      assert.is_nil(msg:find('Exception raised from', 1, true), msg)
      assert.is_nil(msg:find('frame #', 1, true), msg)
      assert.is_true(#msg < 1500, 'overlong message: ' .. #msg)
    end
  end)

  it('a failed in-place op leaves the tensor as it was', function()
    local i = torch.tensor({1, 2}, {dtype = 'int64'})
    fails_with('Tensor.add_', i.add_, i, 2.5)
    assert.are.same({1, 2}, i:totable())
    local m = torch.ones(2, 2)
    fails_with('Tensor.copy_', m.copy_, m, torch.ones(3))
    assert.are.same({{1, 1}, {1, 1}}, m:totable())
  end)

  it('an uncaught error exits 1 with the message and a traceback, not a crash', function()
    local rc, out, err = h.host("-e \"local torch = require 'torch'; local function f() return torch.zeros(3, 4):matmul(torch.zeros(5, 6)) end; f()\"")
    assert.are.equal(1, rc, out .. err)
    assert.matches('Tensor.matmul: shapes (3, 4) and (5, 6) cannot be multiplied (4 != 5)', err, 1, true)
    assert.matches('traceback', err, 1, true)
  end)
end)

-- Hostile inputs: every function of the torch table (and its sub-tables) and every Tensor method,
-- called with bad argument combinations. The sizes used are either tiny or so huge that an
-- allocation fails at once (2^62, 1e300): nothing in between, so nothing can eat the memory.
-- The loop runs in a child qatlab, so that a crash is reported (signal, stderr) rather than
-- taking this spec file down with it; it prints a Lua table with its counts.
local HOSTILE = [==[
local torch = require 'torch'
local function values()
  local freed = torch.ones(2)
  freed:free()
  return {
    0, 1, -1, -5, 2.5, 1e300, -1e300, 0 / 0, math.huge, -math.huge, 2 ^ 62, -2 ^ 62,
    '', 'abc', 'float32', 'cuda', ':', {}, {1, 2}, {-1}, {{}}, {0, 0}, {1e300}, {{1, 2}, {3}},
    {dtype = 'nope'}, {dim = 1}, {keepdim = 'yes'}, true, false,
    torch.tensor(3.5), torch.zeros(0), torch.randn(2, 3), torch.tensor({1, 0}, {dtype = 'int64'}),
    torch.tensor{true, false}, freed, torch.zeros(2, 3):t(), torch.zeros(1, 0, 2),
    function() return 1 end, setmetatable({}, {__index = function() error('metatable hit') end}),
    coroutine.create(function() end),
  }
end
local function selves()
  local freed = torch.ones(2)
  freed:free()
  return {
    torch.tensor(3.5), torch.zeros(0), torch.randn(2, 3), torch.tensor({1, 0}, {dtype = 'int64'}),
    torch.tensor{true, false}, freed, torch.randn(2, 3, {requires_grad = true}),
    torch.ones(1, 2, {dtype = 'float16'}), torch.zeros(3, 1, 2), torch.tensor{{1, 2}, {3, 4}}:t(),
  }
end
-- functions with effects outside the process or on every later allocation, tested apart
local skip = {save = true, set_gc_floor = true}
local fns = {}
for k, v in pairs(torch) do
  if type(v) == 'function' and not skip[k] and not torch.Tensor[k] then fns[#fns + 1] = {'torch.' .. k, v} end
end
for _, sub in ipairs{'autograd', 'linalg', 'cuda'} do
  for k, v in pairs(torch[sub]) do fns[#fns + 1] = {'torch.' .. sub .. '.' .. k, v} end
end
for k, v in pairs(torch.Tensor) do fns[#fns + 1] = {'Tensor.' .. k, v} end
table.sort(fns, function(a, b) return a[1] < b[1] end)

local calls, failures, unnamed = 0, 0, {}
local function note(label, prefix_ok, err)
  failures = failures + 1
  if (type(err) ~= 'string' or not prefix_ok(err)) and #unnamed < 10 then
    unnamed[#unnamed + 1] = label .. ' -> ' .. tostring(err)
  end
end
local function try(name, f, ...)
  calls = calls + 1
  local ok, err = pcall(f, ...)
  if not ok then
    note(name, function(e)
      local plain = name:gsub('%p', '%%%0')
      return e:sub(1, #name + 2) == name .. ': ' or e:find("^bad argument #%d+ to '" .. plain .. "' %(") ~= nil
          or e:find("^calling '" .. plain .. "' on bad self %(") ~= nil
    end, err)
  end
end
for _, nf in ipairs(fns) do
  local name, f = nf[1], nf[2]
  local V = values()
  try(name, f)
  for i = 1, #V do try(name, f, V[i]) end
  local S = selves()
  for s = 1, #S do
    for i = 1, #V do try(name, f, S[s], V[i]) end
  end
  S = selves()
  for i = 1, #V do
    for _, j in ipairs{2, 4, 12, 19, 20, 33} do try(name, f, S[3], V[i], V[j]) end
    try(name, f, S[1], V[i], V[i], V[i])
    try(name, f, S[3], 2, V[i])            -- a valid dim first reaches deeper code
    try(name, f, S[9], 1, V[i], V[20])
  end
  torch.set_grad_enabled(true)
end
-- operators and indexing
local ops = {
  ['+'] = function(a, b) return a + b end, ['-'] = function(a, b) return b - a end,
  ['*'] = function(a, b) return a * b end, ['/'] = function(a, b) return b / a end,
  ['^'] = function(a, b) return a ^ b end, ['%'] = function(a, b) return b % a end,
  idx = function(a, b) return a[b] end, set = function(a, b) a[b] = b end,
  len = function(a) return #a end, unm = function(a) return -a end,
}
for mm, op in pairs(ops) do
  local V, S = values(), selves()
  for s = 1, #S do
    for i = 1, #V do
      calls = calls + 1
      local ok, err = pcall(op, S[s], V[i])
      if not ok then
        note('operator ' .. mm, function(e)
          return e:match('^Tensor%.__%a+: ') or e:match("^bad argument #%d+ to 'Tensor%.__%a+' %(")
        end, err)
      end
    end
  end
end
collectgarbage()
collectgarbage()
local ok_after = torch.tensor{{1, 2}, {3, 4}}:matmul(torch.tensor{{5, 6}, {7, 8}}):totable()[2][2] == 50
local q = {}
for i, u in ipairs(unnamed) do q[i] = ('%q'):format(u) end
print(('return {functions = %d, calls = %d, failures = %d, works_after = %s, unnamed = {%s}}'):format(
  #fns, calls, failures, tostring(ok_after), table.concat(q, ', ')))
]==]

-- The same for every other module and every object's methods: wrong types, extra positional
-- arguments, unknown option keys. Each error names the function by its Lua name, either as
-- "<name>: ..." or in Lua's own "bad argument #n to '<name>' (...)" / "calling '<name>' on bad
-- self (...)"; functions that write files or start processes are left out (tested in their specs).
local HOSTILE_MODULES = [==[
local torch = require 'torch'
local mods = {}
for _, m in ipairs{'nn', 'quant', 'kd', 'optim', 'data', 'tokenizers', 'gguf', 'dist', 'log'} do mods[m] = require(m) end
local skip = {
  ['quant.export_hf'] = true, ['quant.export_compact'] = true, ['quant.save_checkpoint'] = true,
  ['quant.intn_export'] = true, ['data.write_shard'] = true, ['kd.build_cache'] = true,
  ['tokenizers.train_sentencepiece'] = true, ['Model:save_pretrained'] = true,
  ['dist.init'] = true, ['dist.ddp'] = true, ['data.kjv_path'] = true, ['data.kjv_text'] = true,
}
local function tiny()
  torch.manual_seed(0)
  return mods.nn.from_config{model_type = 'qwen3', vocab_size = 16, hidden_size = 8, intermediate_size = 12,
    num_hidden_layers = 1, num_attention_heads = 2, num_key_value_heads = 1, head_dim = 4,
    max_position_embeddings = 16, tie_word_embeddings = true}
end
local function values()
  local freed = torch.ones(2)
  freed:free()
  return {
    0, -1, 2.5, 1e300, 0 / 0, 2 ^ 62, '', 'abc', 'q4a4', {}, {1, 2}, {{}}, {bogus_key = 1}, {dim = 'x'},
    true, torch.zeros(0), torch.randn(2, 3), torch.tensor({1, 0}, {dtype = 'int64'}), freed,
    function() return 1 end, function() error('callback failed') end,
  }
end
local fns = {}
for mname, m in pairs(mods) do
  for k, v in pairs(m) do
    -- bound (C) functions only: Lua functions the toolkit adds to a module follow its own rules
    if type(v) == 'function' and debug.getinfo(v, 'S').what == 'C' and not skip[mname .. '.' .. k] then
      fns[#fns + 1] = {mname .. '.' .. k, v, false}
    end
  end
end
local model = tiny()
local objects = {
  Model = model,
  Optimizer = mods.optim.SGD({torch.zeros(2, {requires_grad = true})}, {lr = 0.1}),
  HookHandle = model:register_forward_hook('model.norm', function() end),
}
local model_methods = {'forward', 'forward_from', 'named_parameters', 'parameters', 'state_dict', 'load_state_dict',
  'train', 'eval', 'to', 'requires_grad_', 'gradient_checkpointing', 'gradient_checkpointing_layers',
  'linear_names', 'get_linear', 'generate', 'perplexity', 'num_parameters', 'named_modules',
  'register_forward_hook', 'register_forward_pre_hook', 'set_linear', 'get_submodule', 'lm_head_weight', 'loss'}
for _, k in ipairs(model_methods) do fns[#fns + 1] = {'Model:' .. k, k, 'Model'} end
for tname, obj in pairs(objects) do
  local idx = getmetatable(obj).__index
  if type(idx) == 'table' then
    for k, v in pairs(idx) do
      if type(v) == 'function' and not skip[tname .. ':' .. k] then fns[#fns + 1] = {tname .. ':' .. k, k, tname} end
    end
  end
end
table.sort(fns, function(a, b) return a[1] < b[1] end)

local calls, failures, unnamed = 0, 0, {}
local function named(name, e)
  if type(e) ~= 'string' then return false end
  local plain = name:gsub('%p', '%%%0')
  return e:sub(1, #name + 2) == name .. ': ' or e:find("^bad argument #%d+ to '" .. plain .. "' %(") ~= nil
      or e:find("^calling '" .. plain .. "' on bad self %(") ~= nil
end
local function try(name, f, ...)
  calls = calls + 1
  local ok, err = pcall(f, ...)
  if not ok then
    failures = failures + 1
    if not named(name, err) and #unnamed < 20 then unnamed[#unnamed + 1] = name .. ' -> ' .. tostring(err) end
  end
end
for _, nf in ipairs(fns) do
  local name, f, tname = nf[1], nf[2], nf[3]
  local V = values()
  if tname then
    -- methods: a fresh object each round (a bad call may free or change it), called with ':'
    local method = f
    for i = 1, #V do
      local obj = tname == 'Model' and tiny() or objects[tname]
      try(name, function(...) return obj[method](obj, ...) end, V[i])
      try(name, function(...) return obj[method](obj, ...) end, V[i], V[i], V[i], V[i])
      try(name, function(...) return obj[method](...) end, V[i])   -- a bad self
    end
  else
    try(name, f)
    for i = 1, #V do
      try(name, f, V[i])
      try(name, f, model, V[i])
      try(name, f, model, V[i], {bogus_key = 1})
      try(name, f, V[i], V[i], V[i], V[i], V[i])
    end
  end
end
collectgarbage()
collectgarbage()
local works = model:num_parameters() > 0 and torch.ones(2):sum():item() == 2
local q = {}
for i, u in ipairs(unnamed) do q[i] = ('%q'):format(u) end
print(('return {functions = %d, calls = %d, failures = %d, works_after = %s, unnamed = {%s}}'):format(
  #fns, calls, failures, tostring(works), table.concat(q, ', ')))
]==]

describe('hostile input', function()
  it('every function and method survives bad arguments, and names itself in its errors', function()
    local dir = h.tmpdir()
    local script = dir .. '/hostile.lua'
    local f = assert(io.open(script, 'w'))
    f:write(HOSTILE)
    f:close()
    local rc, out, err = h.host('run --device cpu --threads 1 ' .. h.q(script))
    os.remove(script)
    os.remove(dir)
    assert(rc == 0, ('the hostile loop died (exit %s); stderr tail:\n%s'):format(tostring(rc), err:sub(-1500)))
    local r = assert(loadstring(out:match('return %b{}')))()
    assert.is_true(r.functions > 200, 'only ' .. r.functions .. ' functions found')
    assert.is_true(r.calls > 50000, 'only ' .. r.calls .. ' calls')
    assert.is_true(r.failures > r.calls / 2, 'most hostile calls should fail')
    assert.are.same({}, r.unnamed)
    assert.is_true(r.works_after)
  end)

  it('every other module function and object method survives bad arguments and names itself', function()
    local dir = h.tmpdir()
    local script = dir .. '/hostile_modules.lua'
    local f = assert(io.open(script, 'w'))
    f:write(HOSTILE_MODULES)
    f:close()
    -- in its own folder: path arguments such as 'abc' or '' must find nothing there
    local rc, out, err = h.sh('cd ' .. h.q(dir) .. ' && ' .. h.q(h.bin) .. ' run --device cpu --threads 1 hostile_modules.lua')
    os.execute('rm -rf ' .. h.q(dir))
    assert(rc == 0, ('the hostile loop died (exit %s); stderr tail:\n%s'):format(tostring(rc), err:sub(-1500)))
    local r = assert(loadstring(out:match('return %b{}')))()
    assert.is_true(r.functions > 100, 'only ' .. r.functions .. ' functions found')
    assert.is_true(r.failures > r.calls / 2, 'most hostile calls should fail')
    assert.are.same({}, r.unnamed)
    assert.is_true(r.works_after)
  end)

  it('a failed allocation is a catchable error, not an abort', function()
    -- 2^50 floats (4 PiB) cannot be allocated; c10 reports it through CAFFE_ENFORCE, which
    -- aborts the process when FLAGS_caffe2_use_fatal_for_enforce is set (or overwritten).
    local rc, out, err = h.host([[-e "local torch = require 'torch'; ]] ..
      [[for _, n in ipairs{2^50, 2^52} do local ok, e = pcall(torch.zeros, n); print(ok, e) end; ]] ..
      [[local ok, e = pcall(torch.ones, 2^60, {dtype = 'bool'}); print(ok, e)"]])
    assert(rc == 0, ('the host died (exit %s): %s'):format(tostring(rc), err:sub(-600)))
    local n = 0
    for line in out:gmatch('[^\n]+') do
      n = n + 1
      assert.matches('^false\ttorch%.%a+: ', line)
      assert.matches("can't allocate memory", line, 1, true)
    end
    assert.are.equal(3, n)
  end)

  it('the functions left out of the loop reject bad input too', function()
    fails_with("bad argument #1 to 'torch.save' (path: expected a string, got number", torch.save, 1, {})
    fails_with("bad argument #2 to 'torch.save' (tensors: expected a table of tensors, got no value", torch.save, '/nonexistent/x')
    fails_with("torch.save: /nonexistent/x.safetensors: value of 'a' is number, expected a Tensor", torch.save,
               '/nonexistent/x.safetensors', {a = 1})
    assert.is_false(pcall(torch.save, '/nonexistent-dir/x.safetensors', {a = torch.ones(1)}))
    fails_with("bad argument #1 to 'torch.set_gc_floor' (bytes: expected a number, got string", torch.set_gc_floor, 'x')
    fails_with('torch.set_gc_floor: bytes: expected a non-negative number', torch.set_gc_floor, -1)
    fails_with('torch.set_gc_floor: bytes: expected a non-negative number', torch.set_gc_floor, 0 / 0)
    fails_with('torch.set_num_threads: n: expected an integer in 1..4096, got 0', torch.set_num_threads, 0)
    fails_with('torch.set_num_threads', torch.set_num_threads, 1e300)
  end)

  it('huge and invalid sizes fail fast instead of allocating', function()
    fails_with('torch.zeros: size #1: expected a non-negative integer, got 1e+300', torch.zeros, 1e300)
    fails_with('torch.zeros: size #1', torch.zeros, 0 / 0)
    fails_with('torch.zeros', torch.zeros, 2 ^ 62)
    fails_with('torch.zeros', torch.zeros, 2 ^ 40, 2 ^ 40)
    fails_with('torch.ones', torch.ones, -1)
    fails_with('torch.eye', torch.eye, 2 ^ 62)
    fails_with('torch.randperm', torch.randperm, 2 ^ 62)
    fails_with('torch.arange', torch.arange, 1e300)
    fails_with('torch.linspace', torch.linspace, 0, 1, -1)
    fails_with('torch.full', torch.full, {2 ^ 62}, 1)
    fails_with('Tensor.new_zeros', function() return torch.ones(1):new_zeros(2 ^ 62) end)
    fails_with("bad argument #3 to 'Tensor.narrow' (start: expected an integer, got 1e+300", function()
      return torch.ones(2):narrow(1, 1e300, 1)
    end)
    fails_with('Tensor.__index: index: expected an integer', function() return torch.ones(2)[1e300] end)
    fails_with('Tensor.roll: shifts: entry 1 is not an integer', function() return torch.ones(2):roll{0 / 0} end)
    local nested = {}
    nested[1] = nested
    fails_with('torch.tensor: nested table is more than 64 levels deep', torch.tensor, nested)
  end)
end)
