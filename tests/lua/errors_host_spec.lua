-- errors_host: what a user sees when a script fails: the message, a traceback with file:line,
-- exit status 1; and that no script, however hostile, crashes the host (a signal, rc >= 128).
local h = require 'helper'
local hr = require 'hostrun'

local dir = hr.files{
  ['uncaught.lua'] = [[
print('before')
local x = 1
error('boom at line three')
print('after')
]],
  ['nested.lua'] = [[
local torch = require 'torch'
local function inner(a, b)
  local r = torch.matmul(a, b)
  return r
end
local function outer()
  local r = inner(torch.ones(3, 4), torch.ones(5, 6))
  return r
end
outer()
]],
  ['method.lua'] = [[
local torch = require 'torch'
local function reshape_it(t)
  local r = t:view(7)
  return r
end
reshape_it(torch.ones(2, 3))
]],
  ['caught.lua'] = [[
local torch = require 'torch'
local ok, e = pcall(torch.matmul, torch.ones(3, 4), torch.ones(5, 6))
print('ok=' .. tostring(ok))
print('type=' .. type(e))
print('msg=' .. tostring(e))
-- a bound function calling back into Lua passes Lua errors through untouched
local ok2, e2 = pcall(torch.no_grad, function() error({code = 7}) end)
print('table_code=' .. tostring(type(e2) == 'table' and e2.code))
local ok3, e3 = pcall(torch.no_grad, function() error('plain', 0) end)
print('plain=' .. tostring(e3))
print('grad_after=' .. tostring(torch.is_grad_enabled()))
-- an allocation that cannot succeed (32 PiB) is an error, not an abort
local ok4, e4 = pcall(torch.zeros, 2^53)
print('alloc=' .. tostring(ok4) .. ' ' .. tostring(e4))
]],
  ['errnil.lua'] = 'print("start")\nerror(nil)\n',
  ['syntax.lua'] = 'print("never")\nlocal = 2\n',
  ['errtable.lua'] = 'error({code = 42})\n',
  ['errtostring.lua'] = 'error(setmetatable({}, {__tostring = function() return "custom error object" end}))\n',
  ['errbadtostring.lua'] = 'error(setmetatable({}, {__tostring = function() error("again") end}))\n',
  ['callback_err.lua'] = [[
local torch = require 'torch'
torch.no_grad(function()
  error('inside a callback')
end)
]],
  ['overflow.lua'] = [[
local function f(n) return 1 + f(n + 1) end
f(1)
]],
  ['cstack.lua'] = [[
local torch = require 'torch'
local log = require 'log'
-- recursion through a bound function that calls back into Lua
local function f() local r = torch.no_grad(f) return r end
local ok, e = pcall(f)
print('nograd_ok=' .. tostring(ok))
print('nograd_msg=' .. tostring(e))
-- recursion through log.info's tostring
local t
t = setmetatable({}, {__tostring = function(s) log.info(s) return 'x' end})
ok, e = pcall(log.info, t)
print('log_ok=' .. tostring(ok))
print('log_msg=' .. tostring(e))
-- legitimate nesting still works, and so does everything after the errors
local function g(n) if n == 0 then return torch.ones(1) end local r = torch.no_grad(g, n - 1) return r end
print('nest100=' .. g(100):item())
for i = 1, 300 do assert(not pcall(torch.no_grad, function() error('x') end)) end
print('nest100_again=' .. g(100):item())
f()  -- uncaught: exit 1 with the message
]],
  ['gcabuse.lua'] = [[
local torch = require 'torch'
local t = torch.ones(4)
local mt = getmetatable(t)
mt.__gc(t); mt.__gc(t)           -- a finalizer called by hand, twice
print('freed=' .. tostring(t:is_freed()))
local ok, e = pcall(function() return t:sum() end)
print('use=' .. tostring(e))
mt.__gc(io.stdout); mt.__gc(newproxy()); mt.__gc(); mt.__gc(5)   -- not tensors at all
local smt = getmetatable(torch.ones(2):size())
print('size_tostring=' .. tostring(pcall(smt.__tostring, 5)))
print('size_eq=' .. tostring(smt.__eq({1}, 5)))
io.stdout:write('stdout_ok\n')
collectgarbage(); collectgarbage()
print('done')
]],
  ['objabuse.lua'] = ([==[
-- Every userdata object type with its finalizer called by hand, twice, and on other values.
local torch, nn, optim, quant = require 'torch', require 'nn', require 'optim', require 'quant'
local tokenizers = require 'tokenizers'
local m = nn.from_config({model_type = 'qwen3', vocab_size = 32, hidden_size = 8, intermediate_size = 16,
  num_hidden_layers = 1, num_attention_heads = 2, num_key_value_heads = 1, head_dim = 4, max_position_embeddings = 16})
local objs = {
  optimizer = optim.AdamW(m, {lr = 0.1}),
  schedule = quant.intn_schedule{step = 3},
  qat = quant.intn_apply(m, {bits = 6}),
  tokenizer = tokenizers.from_file(QWEN_TOKENIZER),
}
local calls = {optimizer = 'step', schedule = 'update', qat = 'enable', tokenizer = 'encode'}
for _, name in ipairs({'optimizer', 'schedule', 'qat', 'tokenizer'}) do
  local o = objs[name]
  local mt = getmetatable(o)
  mt.__gc(o); mt.__gc(o)
  mt.__gc(torch.ones(1)); mt.__gc(m); mt.__gc(io.stdout); mt.__gc(5)   -- other values: ignored
  local ok, e = pcall(function() return o[calls[name]](o, 'x') end)
  print(name .. '=' .. tostring(ok) .. ' ' .. tostring(e) .. ' | ' .. tostring(o))
end
local mt = getmetatable(m)
mt.__gc(m); mt.__gc(m)
local ok, e = pcall(function() return m:forward(torch.zeros(1, 2, {dtype = 'int64'})) end)
print('model=' .. tostring(ok) .. ' ' .. tostring(e) .. ' | ' .. tostring(m))
objs, m = nil, nil
collectgarbage(); collectgarbage()
print('done')
]==]):gsub('QWEN_TOKENIZER', ('%q'):format(h.test_data .. '/qwen3-tokenizer')),
  ['hostile.lua'] = [[
-- Every function of every module, and every Tensor method and metamethod, called with garbage.
local torch = require 'torch'
local log = require 'log'
local freed = torch.ones(2); freed:free()
local G = { true, false, 0, -1, 2.5, 3, 2^53, 1e308, -1e308, 0/0, 1/0, '', 'abc', 'float32', 'cuda', ':',
  {}, {1, 2}, {-1}, {2^53, 2^53}, {{1}, {2, 3}}, {x = 1}, {dtype = 'nope'}, {dim = 0}, function() end,
  coroutine.create(function() end), io.stdout, newproxy(),
  torch.ones(2, 3), torch.zeros(0), torch.tensor(1), freed, torch.ones(2, 2):int(), torch.ones(3):bool(),
  torch.ones(3, 2):t(), torch.ones(2, {requires_grad = true}), torch.tensor({5, -7}, {dtype = 'int64'}),
  torch.ones(2, 3):half(), torch.ones(2, 3):size() }
local self_ref = {}; self_ref[1] = self_ref
G[#G + 1] = self_ref
local N = #G + 1   -- index N stands for nil
local function arg(i) if i == N then return nil end return G[i] end
local fns = {}
local function collect(prefix, t)
  for k, v in pairs(t) do if type(v) == 'function' then fns[#fns + 1] = {prefix .. k, v} end end
end
collect('torch.', torch); collect('torch.Tensor.', torch.Tensor)
for _, sub in ipairs{'autograd', 'linalg', 'cuda'} do collect('torch.' .. sub .. '.', torch[sub]) end
collect('log.', {set_level = log.set_level, get_level = log.get_level})
collect('Tensor metatable.', getmetatable(torch.ones(1)))
table.sort(fns, function(a, b) return a[1] < b[1] end)
local calls, errs, T = 0, 0, torch.ones(2, 3)
local function try(name, f, ...)
  calls = calls + 1
  local ok, e = pcall(f, ...)
  if not ok then
    errs = errs + 1
    if type(e) ~= 'string' then print('nonstring=' .. name .. ' ' .. type(e)) end
  end
end
for _, nf in ipairs(fns) do
  local name, f = nf[1], nf[2]
  try(name, f)
  for i = 1, N do
    try(name, f, arg(i))
    for j = 1, N, 6 do try(name, f, arg(i), arg(j)) end
    for j = 1, N, 9 do try(name, f, T, arg(i), arg(j)) end
  end
  torch.set_gc_floor(64 * 2^20); torch.set_default_dtype('float32'); torch.set_default_device('cpu')
  torch.set_num_threads(1); log.set_level('info'); torch.set_grad_enabled(true)
end
collectgarbage(); torch.collect()
print('functions=' .. #fns)
print('calls=' .. calls)
print('errors=' .. errs)
print('done')
]],
}
local function path(name) return h.q(dir .. '/' .. name) end

local B = hr.batch()
for _, s in ipairs{'uncaught', 'nested', 'method', 'caught', 'errnil', 'syntax', 'errtable', 'errtostring',
                   'errbadtostring', 'callback_err', 'overflow', 'cstack', 'gcabuse', 'objabuse', 'hostile'} do
  B.host(s, 'run ' .. path(s .. '.lua'))
end
-- Ctrl-C: `code` runs under qatlab -e; the handshake waits for its "ready" line (the loop runs), then
-- SIGINT; the output ends in rc=<exit status>.
local function sigint_case(name, code, pause)
  B.add(name, ([[
%s -e %s >%s &
pid=$!
for i in $(seq 300); do grep -q ready %s 2>/dev/null && break; sleep 0.1; done
%skill -INT $pid; wait $pid; echo "rc=$?"]]):format(h.q(h.bin), h.q(code), path(name .. '.out'), path(name .. '.out'),
    pause or ''))
end
local READY = 'print("ready") io.stdout:flush() '
-- in torch calls (hooks run), in a compiled loop that calls nothing, and that loop inside a bound
-- call waiting on Lua (torch.no_grad(fn))
sigint_case('sigint', 'local torch = require "torch" ' .. READY .. 'while true do torch.ones(1) end')
sigint_case('sigint_jit', READY .. 'local x = 0 while true do x = x + 1 end', 'sleep 0.3; ')
sigint_case('sigint_jit_cb', 'local torch = require "torch" torch.no_grad(function() ' .. READY
  .. 'local x = 0 while true do x = x + 1 end end)', 'sleep 0.3; ')
-- a blocking read (a pipe that stays silent): Ctrl-C interrupts the read, then the script
sigint_case('sigint_read', READY .. 'local p = io.popen("sleep 20") local s = p:read("*a") print("read", s)')
-- The REPL: Ctrl-C interrupts the evaluation, the prompt goes on and the next line runs.
B.add('sigint_repl', ([[
mkfifo %s
%s repl <%s >%s 2>&1 &
pid=$!
exec 3>%s
echo 'print("ready") io.stdout:flush() local torch = require "torch" while true do torch.ones(1) end' >&3
for i in $(seq 300); do grep -q ready %s 2>/dev/null && break; sleep 0.1; done
kill -INT $pid; sleep 0.5
echo 'print("after=" .. 6 * 7)' >&3
exec 3>&-
wait $pid; echo "rc=$?"; cat %s]]):format(path('repl.fifo'), h.q(h.bin), path('repl.fifo'), path('sigint_repl.out'),
  path('repl.fifo'), path('sigint_repl.out'), path('sigint_repl.out')))

describe('an uncaught error', function()
  it('prints the message and a traceback with file:line to stderr and exits 1', function()
    local r = B.get('uncaught')
    assert.are.equal(1, r.rc)
    assert.are.equal('before\n', r.out)        -- stops at the error
    hr.has(r.err, 'uncaught.lua:3: boom at line three', 'stderr')
    hr.has(r.err, 'stack traceback:', 'stderr')
    hr.has(r.err, 'uncaught.lua:3: in main chunk', 'stderr')
  end)

  it('from a bound function names the function, with the shapes, and the traceback names the Lua frames', function()
    local r = B.get('nested')
    assert.are.equal(1, r.rc)
    hr.has(r.err, 'torch.matmul: shapes (3, 4) and (5, 6) cannot be multiplied', 'stderr')
    hr.has(r.err, "nested.lua:3: in function 'inner'", 'stderr')
    hr.has(r.err, "nested.lua:7: in function 'outer'", 'stderr')
    hr.has(r.err, 'nested.lua:10: in main chunk', 'stderr')
    -- the C++ side's own backtrace never leaks into the message
    assert.falsy(r.err:find('Exception raised from', 1, true), r.err)
    assert.falsy(r.err:find('frame #', 1, true), r.err)
  end)

  it('from a method names it as Tensor.<method>', function()
    local r = B.get('method')
    assert.are.equal(1, r.rc)
    hr.has(r.err, 'Tensor.view: ', 'stderr')
    hr.has(r.err, "method.lua:3: in function 'reshape_it'", 'stderr')
  end)

  it('raised by a Lua callback passes through the bound function that called it', function()
    local r = B.get('callback_err')
    assert.are.equal(1, r.rc)
    hr.has(r.err, 'callback_err.lua:3: inside a callback', 'stderr')
    hr.has(r.err, "in function 'no_grad'", 'stderr')
  end)

  it('error(nil) exits 1 (quietly: it is how busted and others exit with a failure)', function()
    local r = B.get('errnil')
    assert.are.equal(1, r.rc)
    assert.are.equal('start\n', r.out)
  end)

  it('with a table as error object exits 1, using __tostring when there is one', function()
    local r = B.get('errtable')
    assert.are.equal(1, r.rc)
    hr.has(r.err, 'table', 'stderr')
    hr.has(r.err, 'errtable.lua:1', 'stderr')
    r = B.get('errtostring')
    assert.are.equal(1, r.rc)
    hr.has(r.err, 'custom error object', 'stderr')
    r = B.get('errbadtostring')  -- __tostring itself fails
    assert.are.equal(1, r.rc)
  end)
end)

describe('pcall of a bound function', function()
  it('returns the prefixed message as a string, and callback error objects untouched', function()
    local r = B.get('caught')
    assert.are.equal(0, r.rc, r.err)
    local v = hr.kv(r.out)
    assert.are.equal('false', v.ok)
    assert.are.equal('string', v.type)
    assert.truthy(v.msg:match('^torch%.matmul: shapes %(3, 4%) and %(5, 6%) cannot be multiplied'), v.msg)
    assert.are.equal('7', v.table_code)
    assert.are.equal('plain', v.plain)
    assert.are.equal('true', v.grad_after)   -- no_grad restored grad mode on the error path
  end)

  it('turns a failed CPU allocation into an error, not an abort', function()
    local r = B.get('caught')
    assert(r.rc < 128, ('killed by signal %d\n%s'):format(r.rc - 128, r.err))
    local v = hr.kv(r.out)
    assert.truthy(v.alloc and v.alloc:match("^false torch%.zeros: .*can't allocate memory"), v.alloc)
  end)
end)

describe('a syntax error', function()
  it('exits 1 with file:line and runs nothing', function()
    local r = B.get('syntax')
    assert.are.equal(1, r.rc)
    assert.are.equal('', r.out)
    hr.has(r.err, 'syntax.lua:2:', 'stderr')
  end)
end)

describe('a hostile script is never a crash', function()
  it('deep Lua recursion is a stack overflow error, exit 1', function()
    local r = B.get('overflow')
    assert.are.equal(1, r.rc)
    hr.has(r.err, 'stack overflow', 'stderr')
    hr.has(r.err, 'overflow.lua:1', 'stderr')
  end)

  it('recursion through bound functions is a catchable C stack overflow error, exit 1 when uncaught', function()
    local r = B.get('cstack')
    assert.are.equal(1, r.rc, r.err)
    local v = hr.kv(r.out)
    assert.are.equal('false', v.nograd_ok)
    hr.has(v.nograd_msg, 'torch.no_grad: C stack overflow', 'no_grad message')
    assert.are.equal('false', v.log_ok)
    hr.has(v.log_msg, 'log.info: C stack overflow', 'log message')
    assert.are.equal('1', v.nest100)
    assert.are.equal('1', v.nest100_again)  -- the nesting count survived 300 errors
    hr.has(r.err, 'C stack overflow', 'stderr')
  end)

  it('calling the tensor finalizer by hand frees the tensor once and ignores non-tensors', function()
    local r = B.get('gcabuse')
    assert.are.equal(0, r.rc, r.err)
    local v = hr.kv(r.out)
    assert.are.equal('true', v.freed)
    hr.has(v.use, 'freed', 'use after free')
    assert.are.equal('false', v.size_tostring)
    assert.are.equal('false', v.size_eq)
    hr.has(r.out, 'stdout_ok\ndone\n', 'stdout')   -- io.stdout survived being passed as a tensor
  end)

  it('finalizers of models, optimizers, schedules, QAT handles and tokenizers run once, even by hand', function()
    local r = B.get('objabuse')
    assert.are.equal(0, r.rc, r.err)
    local v = hr.kv(r.out)
    hr.has(v.optimizer, "false bad argument #1 to 'Optimizer:step' (an Optimizer was freed) | Optimizer", 'optimizer')
    hr.has(v.schedule, "false bad argument #1 to 'IntNSchedule:update' (an int-N schedule was freed) | IntNSchedule (freed)", 'schedule')
    hr.has(v.qat, "false bad argument #1 to 'IntNQat:enable' (an int-N QAT handle was freed) | IntNQat(empty)", 'qat')
    hr.has(v.tokenizer, "false bad argument #1 to 'Tokenizer.encode' (a Tokenizer was freed) | Tokenizer(collected)", 'tokenizer')
    hr.has(v.model, "false bad argument #1 to 'Model:forward' (a Model was freed) | Model (freed)", 'model')
    hr.has(r.out, 'done\n', 'stdout')
  end)

  it('garbage passed to every function and method gives Lua errors, never a crash', function()
    local r = B.get('hostile')
    assert(r.rc < 128, ('killed by signal %d\n%s'):format(r.rc - 128, r.err:sub(-2000)))
    assert.are.equal(0, r.rc, r.err:sub(-2000))
    local v = hr.kv(r.out)
    assert.are.equal('done', r.out:match('(done)\n$'))
    assert.is_nil(v.nonstring, 'an error object that is not a string: ' .. tostring(v.nonstring))
    assert(tonumber(v.functions) > 200, 'too few functions found: ' .. v.functions)
    assert(tonumber(v.errors) > tonumber(v.calls) / 2, 'most garbage calls must fail')
  end)

  local function interrupted(name, rc, message)
    local r = B.get(name)
    assert.are.equal('rc=' .. rc, r.out:match('rc=%d+'), r.out .. r.err)
    hr.has(r.err, message, 'stderr')
  end

  it('Ctrl-C stops a script inside torch calls with a message and exit 1', function()
    interrupted('sigint', 1, 'interrupted')
  end)

  it('Ctrl-C in a compiled Lua loop that calls nothing ends the process with 130 and says why', function()
    interrupted('sigint_jit', 130, 'interrupted (Ctrl-C) while the script ran a compiled Lua loop')
    -- inside torch.no_grad(fn): the bound call waits on Lua, so the VM counts as running Lua
    interrupted('sigint_jit_cb', 130, 'interrupted (Ctrl-C) while the script ran a compiled Lua loop')
  end)

  it('Ctrl-C during a blocking read interrupts the read and stops the script with exit 1', function()
    interrupted('sigint_read', 1, 'interrupted (Ctrl-C)')
  end)

  it('Ctrl-C in the REPL interrupts the evaluation and the prompt goes on', function()
    local r = B.get('sigint_repl')
    assert.are.equal('rc=0', r.out:match('rc=%d+'), r.out .. r.err)
    hr.has(r.out, 'interrupted (Ctrl-C)', 'repl output')
    hr.has(r.out, 'after=42', 'repl output')
  end)
end)

teardown(function() hr.rmtree(dir) end)
