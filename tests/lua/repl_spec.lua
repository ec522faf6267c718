-- repl: `qatlab repl` fed by a pipe (stdin not a terminal): no banner or prompts, values of
-- expressions printed, statements run, multi-line input gathered, errors reported and the
-- session going on, EOF ending it with status 0.
local h = require 'helper'
local hr = require 'hostrun'

local dir = h.tmpdir()
local function session(name, text)
  local f = hr.spit(dir .. '/' .. name .. '.txt', text)
  return f
end

local B = hr.batch()
local function repl(name, text, opts)
  B.add(name, hr.cmd('repl ' .. (opts or '')) .. ' <' .. h.q(session(name, text)))
end

repl('expr', '1+2\n')
repl('torch', 't = require("torch").ones(2)\nt:sum()\nt:size(1)\n')
repl('multiline', [[
function sq(x)
  local y = x * x
  return y
end
sq(7)
local tbl = {
  a = 1,
  b = 2,
}
for i = 1, 2 do
  print('loop', i)
end
]])
repl('errors', [[
print('first')
error('oops')
nil + 1
local = 1
error({})
error(nil)
require('torch').ones(2, 3):matmul(require('torch').ones(2, 3))
print('still here')
]])
repl('misc', [[
x = 10
x * 2
local z = 5
z
=x + 1
return 1, 'a', nil
args.lr
require('qatlab').device
]], '--set lr=0.5 --device cpu')
repl('empty', '')
repl('exit', 'print("before")\nos.exit(3)\nprint("after")\n')

local function lines(s)
  local t = {}
  for l in s:gmatch('[^\n]*\n') do t[#t + 1] = l:sub(1, -2) end
  return t
end

describe('qatlab repl with piped input', function()
  it('prints the value of an expression, with no banner or prompt', function()
    local r = B.get('expr')
    assert.are.equal(0, r.rc, r.err)
    assert.are.equal('3\n', r.out)
    assert.are.equal('', r.err)
  end)

  it('keeps assigned names from line to line: t = ones(2) then t:sum() prints a tensor holding 2', function()
    local r = B.get('torch')
    assert.are.equal(0, r.rc, r.err)
    local l = lines(r.out)
    assert.are.equal(2, #l, r.out)
    assert.truthy(l[1]:match('^tensor%(2%.'), l[1])
    assert.are.equal('2', l[2])
  end)

  it('gathers a statement spread over several lines', function()
    local r = B.get('multiline')
    assert.are.equal(0, r.rc, r.err)
    assert.are.same({'49', 'loop\t1', 'loop\t2'}, lines(r.out))
    assert.are.equal('', r.err)
  end)

  it('reports an error on stderr and goes on with the next line', function()
    local r = B.get('errors')
    assert.are.equal(0, r.rc, r.err)
    assert.are.same({'first', 'still here'}, lines(r.out))
    hr.has(r.err, 'oops', 'stderr')
    hr.has(r.err, 'attempt to perform arithmetic', 'stderr')
    hr.has(r.err, "'<name>' expected", 'stderr')                 -- a syntax error
    hr.has(r.err, '(error object is a table value)', 'stderr')
    hr.has(r.err, '(error object is a nil value)', 'stderr')
    hr.has(r.err, 'Tensor.matmul: shapes (2, 3) and (2, 3) cannot be multiplied', 'stderr')
  end)

  it('supports =expr, several values, --set args; locals end with their line', function()
    local r = B.get('misc')
    assert.are.equal(0, r.rc, r.err)
    assert.are.same({'20', 'nil', '11', '1\ta\tnil', '0.5', 'cpu'}, lines(r.out))
  end)

  it('exits 0 at end of input, and with the status given to os.exit', function()
    local r = B.get('empty')
    assert.are.equal(0, r.rc, r.err)
    assert.are.equal('', r.out)
    r = B.get('exit')
    assert.are.equal(3, r.rc)
    assert.are.equal('before\n', r.out)
  end)
end)

teardown(function() hr.rmtree(dir) end)
