-- autocast_spec: torch.autocast on the CPU (bf16 matmuls inside, fp32 outside, state restored after an error,
-- nesting, argument errors) and the trainer's precision option: bf16 losses track fp32 ones, params stay fp32.
local torch = require 'torch'
local nn = require 'nn'
local optim = require 'optim'
local json = require 'json'
local trainer = require 'trainer'
local h = require 'helper'

describe('torch.autocast', function()
  local a, b = torch.randn(8, 16), torch.randn(16, 4)

  it('makes a matmul bfloat16 inside and leaves it float32 outside', function()
    assert.is_false(torch.is_autocast_enabled('cpu'))
    local inside, n, on = torch.autocast('cpu', { dtype = 'bfloat16' }, function(x, y)
      return x:matmul(y), select('#', x, y), torch.is_autocast_enabled('cpu')
    end, a, b)
    assert.are.equal('bfloat16', inside.dtype)
    assert.are.equal(2, n)
    assert.is_true(on)
    assert.are.equal('float32', a:matmul(b).dtype)
    assert.is_false(torch.is_autocast_enabled('cpu'))
    -- the bf16 result is the fp32 one to bf16 precision (8-bit mantissa, K = 16 products)
    h.close(inside, a:matmul(b), 0.05, 0.02)
    -- elementwise ops are not autocast: they follow their inputs
    assert.are.equal('float32', torch.autocast('cpu', function() return a + 1 end).dtype)
  end)

  it('defaults to bfloat16 on the CPU, as PyTorch; enabled=false turns it off', function()
    assert.are.equal('bfloat16', torch.get_autocast_dtype('cpu'))
    assert.are.equal('bfloat16', torch.autocast('cpu', function() return a:matmul(b) end).dtype)
    assert.are.equal('float32', torch.autocast('cpu', { enabled = false }, function() return a:matmul(b) end).dtype)
    local outer, inner = torch.autocast('cpu', function()
      return torch.is_autocast_enabled('cpu'),
             torch.autocast('cpu', { enabled = false }, function() return torch.is_autocast_enabled('cpu') end)
    end)
    assert.is_true(outer)
    assert.is_false(inner)
  end)

  it('restores the previous state when fn raises, and passes the error through', function()
    local ok, err = pcall(torch.autocast, 'cpu', { dtype = 'float16' }, function() error('boom', 0) end)
    assert.is_false(ok)
    assert.are.equal('boom', err)
    assert.is_false(torch.is_autocast_enabled('cpu'))
    assert.are.equal('bfloat16', torch.get_autocast_dtype('cpu'))
    -- nested: the inner failure restores the outer scope's state, not the global one
    local state = torch.autocast('cpu', function()
      pcall(torch.autocast, 'cpu', { dtype = 'float16', enabled = false }, function() error('inner') end)
      return { torch.is_autocast_enabled('cpu'), torch.get_autocast_dtype('cpu'), a:matmul(b).dtype }
    end)
    assert.same({ true, 'bfloat16', 'bfloat16' }, state)
    assert.is_false(torch.is_autocast_enabled('cpu'))
    -- a CUDA scope leaves the CPU state alone (and is harmless without a GPU)
    local cpu_on = torch.autocast('cuda', function() return torch.is_autocast_enabled('cpu') end)
    assert.is_false(cpu_on)
    assert.is_false(torch.is_autocast_enabled('cuda'))
  end)

  it('rejects bad arguments with clear errors', function()
    local function err(...)
      local ok, e = pcall(torch.autocast, ...)
      assert.is_false(ok)
      return e
    end
    assert.truthy(err('tpu', function() end):find("expected 'cpu' or 'cuda', got 'tpu'", 1, true))
    assert.truthy(err('cpu'):find('fn%)?: expected a function'))   -- '(fn): ...' or the '(fn: ...)' grammar
    assert.truthy(err('cpu', { dtype = 'float32' }, function() end):find('float32 is not supported', 1, true))
    assert.truthy(err('cpu', { dtyp = 'bfloat16' }, function() end):find("unknown option 'dtyp'", 1, true))
    assert.truthy(err('cpu', { enabled = 1 }, function() end):find("option 'enabled': expected a boolean", 1, true))
    assert.is_false(torch.is_autocast_enabled('cpu'))
  end)
end)

describe('trainer precision', function()
  local cfg = { model_type = 'qwen3', vocab_size = 17, hidden_size = 32, intermediate_size = 48, num_hidden_layers = 2,
                num_attention_heads = 2, num_key_value_heads = 1, max_position_embeddings = 16 }
  local seen   -- the dtype of the logits in the last loss call

  local function lm_loss(model, ids)
    local S = ids:size(2)
    local logits = model:forward(ids:narrow(2, 1, S - 1))
    seen = logits.dtype
    local lp = logits:float():log_softmax(3)
    return -lp:gather(3, ids:narrow(2, 2, S - 1):unsqueeze(3)):mean()
  end

  local function run(precision, out)
    torch.manual_seed(5)
    local m = nn.from_config(cfg)
    m:requires_grad_(true)
    local losses = {}
    local t = trainer.new{
      model = m, optimizer = optim.AdamW(m, { lr = 1e-2, weight_decay = 0 }), loss = lm_loss, steps = 8, seed = 3,
      data = function() return (torch.randint(0, 17, { 8, 1 }) + torch.arange(12)) % 17 end,
      precision = precision, progress = { mode = 'off' }, out = out, config = out and { name = 'amp' } or nil,
      save_final = false, hooks = { on_step = function(_, info) losses[#losses + 1] = info.loss end },
    }
    t:run()
    t:close()
    return losses, m, t
  end

  it('bf16 autocast on the CPU: losses within bf16 tolerance of fp32, parameters and grads stay float32', function()
    local out = h.tmpdir()
    local f32 = run('fp32')
    assert.are.equal('float32', seen)
    local b16, m, t = run('bf16', out)
    assert.are.equal('bfloat16', seen)
    assert.are.equal('bf16', t.precision)
    local worst = 0
    for i = 1, #f32 do
      worst = math.max(worst, math.abs(b16[i] - f32[i]) / f32[i])
    end
    print(('\n  [autocast_spec] 8 steps, loss %.4f -> %.4f (fp32) vs %.4f -> %.4f (bf16), worst rel. diff %.2e')
      :format(f32[1], f32[#f32], b16[1], b16[#b16], worst))
    -- bf16 keeps 8 mantissa bits (relative rounding 2^-9 ~ 2e-3 per op); over 2 layers and 8 AdamW steps the
    -- losses stay within 1 % (measured: 0.2 %)
    assert.is_true(worst < 0.01, 'bf16 vs fp32 loss relative difference ' .. worst)
    assert.is_true(b16[#b16] < b16[1], 'bf16 training did not lower the loss')
    for name, p in pairs(m:state_dict()) do assert.are.equal('float32', p.dtype, name) end
    for _, p in ipairs(m:parameters()) do
      if p.grad then assert.are.equal('float32', p.grad.dtype) end
    end
    assert.is_false(torch.is_autocast_enabled('cpu'))
    local f = assert(io.open(out .. '/config.json'))
    assert.same({ name = 'amp', precision = 'bf16' }, json.decode(f:read('*a')))
    f:close()
    os.execute('rm -rf ' .. h.q(out))
  end)

  it("'auto' follows the CPU's bf16 support (fp32 without AMX-BF16 / AVX512-BF16); an unknown precision is an error",
    function()
    local m = nn.from_config(cfg)
    local base = { model = m, optimizer = optim.SGD(m, { lr = 0.1 }), loss = lm_loss, steps = 1,
                   data = function() end, progress = { mode = 'off' } }
    base.precision = 'auto'
    local t = trainer.new(base)
    local fast = torch.cpu.supports_bf16()
    assert.are.equal(fast and 'bf16' or 'fp32', t.precision)
    assert.are.equal(fast and 'cpu' or nil, t.autocast)
    assert.truthy(t.precision_why:find(fast and 'bf16 autocast on the CPU' or 'fp32 on the CPU', 1, true), t.precision_why)
    base.precision = 'fp16'
    local ok, err = pcall(trainer.new, base)
    assert.is_false(ok)
    assert.truthy(tostring(err):find("precision must be 'auto', 'fp32' or 'bf16', got \"fp16\"", 1, true), err)
  end)
end)

-- The CPU's capabilities as LibTorch and the kernel report them, and the 'auto' decision on other CPUs.
describe('CPU bf16 detection (torch.cpu, torch.backends.cpu) and precision.resolve', function()
  local precision = require 'precision'

  -- the flags line of the first processor, read here independently of the binding
  local function proc_flags()
    local f = io.open('/proc/cpuinfo')
    if not f then return nil end
    local text = f:read('*a')
    f:close()
    local line = text:match('\nflags%s*:%s*([^\n]*)') or text:match('^flags%s*:%s*([^\n]*)')
    if not line then return nil end
    local set = {}
    for w in line:gmatch('%S+') do set[w] = true end
    return set
  end

  it('get_cpu_capability is what PyTorch reports', function()
    local got = torch.backends.cpu.get_cpu_capability()
    assert.are.equal((h.py('import torch; print(torch.backends.cpu.get_cpu_capability())'):gsub('%s+$', '')), got)
    assert.are.equal(got, torch.cpu.capabilities().capability)
  end)

  it('the flags are the kernel\'s and agree with PyTorch\'s cpuinfo; supports_bf16 follows them', function()
    local c = torch.cpu.capabilities()
    local flags = proc_flags()
    if not flags then
      pending('no flags line in /proc/cpuinfo (not x86 Linux)')
      return
    end
    assert.are.equal('/proc/cpuinfo', c.source)
    for _, k in ipairs({'avx2', 'avx512f', 'avx512_bf16', 'amx_tile', 'amx_bf16'}) do
      assert.are.equal(flags[k] == true, c[k], k)
    end
    local n = 0
    for _ in pairs(flags) do n = n + 1 end
    assert.are.equal(n, #c.flags)
    -- PyTorch's own detection (cpuinfo library) says the same about the bf16 units
    local py = h.py('import torch; print(int(torch.cpu._is_avx512_bf16_supported()), '
      .. 'int(torch.cpu._is_amx_tile_supported()))')
    local py_avx512bf16, py_amx = py:match('(%d) (%d)')
    assert.are.equal(py_avx512bf16 == '1', c.avx512_bf16)
    assert.are.equal(py_amx == '1', c.amx_tile)
    local ok, why = torch.cpu.supports_bf16()
    assert.are.equal((c.amx_bf16 and c.amx_tile) or c.avx512_bf16, ok)
    assert.truthy(why:find(ok and 'bf16' or 'no amx_bf16 or avx512_bf16', 1, true), why)
    local e = select(2, pcall(torch.cpu.supports_bf16, 1))
    assert.truthy(tostring(e):find('torch.cpu.supports_bf16', 1, true), tostring(e))
  end)

  it("'auto' picks bf16 on AMX / AVX512-BF16 CPUs and CUDA, fp32 elsewhere; given values win", function()
    local amx = {cpu_name = 'Xeon', amx_tile = true, amx_bf16 = true, avx512_bf16 = true, capability = 'AVX512'}
    local avx = {cpu_name = 'Zen 4', avx512_bf16 = true, capability = 'AVX512'}
    local avx2 = {cpu_name = 'AMD EPYC', avx2 = true, capability = 'AVX2'}
    local p, ac, why = precision.resolve('auto', 'cpu', amx)
    assert.same({'bf16', 'cpu'}, {p, ac})
    assert.truthy(why:find('Xeon has AMX-BF16', 1, true), why)
    p, ac, why = precision.resolve(nil, 'cpu', avx)
    assert.same({'bf16', 'cpu'}, {p, ac})
    assert.truthy(why:find('AVX512-BF16', 1, true), why)
    p, ac, why = precision.resolve('auto', 'cpu', avx2)
    assert.are.equal('fp32', p)
    assert.is_nil(ac)
    assert.truthy(why:find('AMD EPYC has no AMX-BF16 or AVX512-BF16; LibTorch kernels AVX2', 1, true), why)
    -- AMX tiles without the bf16 unit are not enough
    assert.are.equal('fp32', (precision.resolve('auto', 'cpu', {amx_tile = true})))
    p, ac = precision.resolve('auto', 'cuda', avx2)
    assert.same({'bf16', 'cuda'}, {p, ac})
    p, ac = precision.resolve('fp32', 'cpu', amx)
    assert.same({'fp32'}, {p, ac})
    p, ac = precision.resolve('bf16', 'cpu', avx2)
    assert.same({'bf16', 'cpu'}, {p, ac})
    local ok, err = pcall(precision.resolve, 'bfloat16', 'cpu', avx2)
    assert.is_false(ok)
    assert.truthy(tostring(err):find("precision must be 'auto', 'fp32' or 'bf16', got \"bfloat16\"", 1, true))
  end)
end)
