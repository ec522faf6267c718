-- cli: the qatlab command line as a user meets it: version, --help, --set typing, script
-- arguments, exit codes of bad command lines, --seed/--threads/--device, module paths and
-- the promise of no globals. Every check runs the real executable as a subprocess; all of
-- them (and one Python for the reference values) run as one parallel batch.
local h = require 'helper'
local hr = require 'hostrun'

local B = hr.batch()

-- Python's view of the same machine: torch version, CUDA devices, and the first draws of
-- torch.randn(3) under manual_seed(7).
B.add('python', h.q(h.python) .. ' -c ' .. h.q([[
import torch
torch.manual_seed(7)
x = torch.randn(3)
print("version=" + torch.__version__.split("+")[0])
print("cuda=%d" % torch.cuda.device_count())
print("randn=" + ",".join(repr(float(v)) for v in x.tolist()))
]]))
local py
local function python()
  if not py then
    local r = B.get('python')
    assert(r.rc == 0, 'python failed: ' .. r.err)
    py = hr.kv(r.out)
    py.cuda = assert(tonumber(py.cuda))
    py.randn_list = {}
    for v in py.randn:gmatch('[^,]+') do py.randn_list[#py.randn_list + 1] = tonumber(v) end
  end
  return py
end

local function lines(s)
  local t = {}
  for l in s:gmatch('[^\n]+') do t[#t + 1] = l end
  return t
end

-- The scripts the checks run.
local dir = hr.files{
  ['show.lua'] = [[
local args, arg = ...
local env = getfenv(1)
for _, k in ipairs{'lr', 'name', 'flag', 'off', 'q', 'single', 'neg', 'empty', 'csv', 'sentence', 'eqs', 'over'} do
  local v = args[k]
  if v ~= nil then print(k .. '=' .. type(v) .. ':' .. (type(v) == 'number' and ('%.17g'):format(v) or tostring(v))) end
end
if args.model then
  print('model.width=' .. type(args.model.width) .. ':' .. tostring(args.model.width))
  print('model.act=' .. type(args.model.act) .. ':' .. tostring(args.model.act))
  print('model.opt.beta=' .. tostring(args.model.opt and args.model.opt.beta))
end
print('narg=' .. #arg)
for i = 0, #arg do print('arg' .. i .. '=' .. tostring(arg[i])) end
print('same_args=' .. tostring(rawequal(env.args, args)))
print('same_arg=' .. tostring(rawequal(env.arg, arg)))
print('global_args=' .. tostring(rawget(_G, 'args')))
print('global_arg=' .. tostring(rawget(_G, 'arg')))
]],
  ['s.lua'] = 'print("ran")\n',
  ['argv.lua'] = [[
local q = require 'qatlab'
print('nargv=' .. #q.argv)
for i, a in ipairs(q.argv) do print('argv' .. i .. '=' .. a) end
print('sweep_worker=' .. tostring(q.sweep_worker))
print('env_worker=' .. tostring(os.getenv('QATLAB_SWEEP_WORKER')))
local sh = io.popen('echo "child_worker=${QATLAB_SWEEP_WORKER-unset}"')
io.write(sh:read('*a'))
sh:close()
]],
  ['file'] = 'not a directory\n',
  ['rand.lua'] = [[
local torch = require 'torch'
local x = torch.randn(3)
print(('randn=%.9g,%.9g,%.9g'):format(x[1]:item(), x[2]:item(), x[3]:item()))
print('mathrandom=' .. math.random(1000000))
print('threads=' .. torch.get_num_threads())
print('default_device=' .. torch.get_default_device())
print('tensor_device=' .. torch.ones(2).device)
print('qatlab_device=' .. require('qatlab').device)
print('qatlab_seed=' .. tostring(require('qatlab').seed))
]],
  ['mods/main.lua'] = [[
local near = require 'nearby'
local pkg = require 'pkg'
local q = require 'qatlab'
print('nearby=' .. near.name)
print('pkg=' .. pkg.name)
print('script_dir=' .. q.script_dir)
local ok, m = pcall(require, 'fromqp')
print('fromqp=' .. (ok and m.name or 'missing'))
ok, m = pcall(require, 'fromqp2')
print('fromqp2=' .. (ok and m.name or 'missing'))
]],
  ['mods/nearby.lua'] = 'return {name = "nearby module"}\n',
  ['mods/pkg/init.lua'] = 'return {name = "package via init.lua"}\n',
  ['qp1/fromqp.lua'] = 'return {name = "from QATLAB_PATH"}\n',
  ['qp2/fromqp2.lua'] = 'return {name = "second entry"}\n',
  ['g.lua'] = [[
local function keys()
  local t = {}
  for k in pairs(_G) do t[#t + 1] = tostring(k) end
  table.sort(t)
  return table.concat(t, ' ')
end
print('before=' .. keys())
local torch = require 'torch'
local log = require 'log'
local q = require 'qatlab'
local x = torch.ones(2, 3):matmul(torch.ones(3)):sum()
log.debug('quiet')
undeclared_name = 5   -- lands in the script's environment, not in _G
print('after=' .. keys())
print('undeclared_in_G=' .. tostring(rawget(_G, 'undeclared_name')))
print('undeclared_seen=' .. tostring(undeclared_name))
]],
}
local function path(name) return h.q(dir .. '/' .. name) end

-- Every run, registered up front so that they all go in one parallel batch.
B.host('version', 'version')
B.host('version_extra', 'version extra')
local help_cases = {
  {'--help', 'qatlab run SCRIPT.lua'},
  {'run --help', '--set'},
  {'repl --help', '--device'},
  {'version --help', 'usage: qatlab version'},
  {'-e --help', 'qatlab -e'},
}
for _, c in ipairs(help_cases) do B.host('help ' .. c[1], c[1]) end
B.host('help none', '')
B.host('set1', 'run ' .. path('show.lua') ..
  [[ --set lr=3e-4 --set name=foo --set flag=true --set off=false --set model.width=256 ]] ..
  [[--set model.act=gelu --set model.opt.beta=0.9 --set q='"12"' --set "single='x y'" -- a b]])
B.host('set2', 'run ' .. path('show.lua') ..
  [[ --set csv=1,2,3 --set 'sentence=a, b, c' --set eqs=k=v --set=neg=-2.5e-3 --set empty= ]] ..
  [[--set over=1 --set over=2]])
-- `qatlab SCRIPT.lua` without `run`, and script arguments that look like options
B.host('set3', path('show.lua') .. ' --set name=bar -- --set x=1 -- --help')

local bad_cases = {
  {'run SCRIPT --bogus', 'bogus'},
  {'run SCRIPT --set noequals', "malformed --set 'noequals'"},
  {'run SCRIPT --set 1abc=2', '1abc'},
  {'run SCRIPT --seed abc', "--seed expects a non-negative integer, got 'abc'"},
  {'run SCRIPT --seed -3', "--seed expects a non-negative integer, got '-3'"},
  {'run SCRIPT --threads abc', "--threads expects a positive integer, got 'abc'"},
  {'run SCRIPT --threads=0', "--threads expects a positive integer, got '0'"},
  {'run SCRIPT --threads 2.5', "--threads expects a positive integer, got '2.5'"},
  {'run SCRIPT other.lua', 'other.lua'},
  {'frobnicate', "unknown command 'frobnicate'"},
  {'run MISSING', 'No such file'},
  {'MISSING', 'does_not_exist.lua'},
  {'-e', '-e needs'},
  {'run SCRIPT --device tpu', "'tpu'"},
  {'run SCRIPT --out FILE', 'not a directory'},
}
for _, c in ipairs(bad_cases) do
  -- one pass, so a placeholder-like word inside a substituted path is left alone
  B.host('bad ' .. c[1], (c[1]:gsub('%u%u+', {SCRIPT = path('s.lua'), MISSING = path('does_not_exist.lua'),
                                              FILE = path('file')})))
end

-- qatlab.argv is the command line exactly as given, options and all; the sweep worker variable is taken
-- out of the environment (qatlab.sweep_worker), so that processes the script starts do not inherit it.
B.host('argv', path('argv.lua') .. [[ --set 'x=a b' --threads 1 -- --seed '' z]])
B.add('argv_worker', 'QATLAB_SWEEP_WORKER=2:abc:1:toy ' .. hr.cmd('run ' .. path('argv.lua')))
B.host('e', [[-e 'print(1+1) print(args.x * 2, #arg)' --set x=21]])
B.host('e_err', [[-e 'error("from -e")']])
B.host('seed7a', 'run ' .. path('rand.lua') .. ' --seed 7 --threads 1 --device cpu')
B.host('seed7b', path('rand.lua') .. ' --seed 7 --threads 2')
B.host('seed8', path('rand.lua') .. ' --seed 8')
B.host('cuda', path('rand.lua') .. ' --device cuda')

local main = path('mods/main.lua')
B.add('mods', 'cd / && ' .. hr.cmd('run ' .. main))
B.add('mods_qp', 'cd / && QATLAB_PATH=' .. h.q(dir .. '/qp1:/nonexistent:' .. dir .. '/qp2') .. ' ' ..
      hr.cmd('run ' .. main))

B.host('globals', 'run ' .. path('g.lua'))
B.add('luajit', [[luajit -e 'local t = {} for k in pairs(_G) do t[#t + 1] = k end table.sort(t) print(table.concat(t, " "))']])

describe('qatlab version', function()
  it('prints qatlab, the LibTorch it was built with, LuaJIT and the CUDA device count', function()
    local p, r = python(), B.get('version')
    assert.are.equal(0, r.rc, r.err)
    local l = lines(r.out)
    assert.truthy(l[1]:match('^qatlab %d+%.%d+%.%d+$'), l[1])
    -- the LibTorch of the build (the test Python's torch may differ, e.g. a CUDA build's check)
    assert.are.equal('LibTorch ' .. (os.getenv('QATLAB_TORCH_VERSION') or p.version), l[2])
    assert.truthy(l[3]:match('^LuaJIT 2%.%d'), l[3])
    assert.truthy(l[4]:match('^allocator: '), l[4])
    assert.are.equal('CUDA devices: ' .. p.cuda, l[5])
    assert.are.equal('', r.err)
  end)

  it('runs on mimalloc whenever libmimalloc-dev was there to build with (a dropped link is an error)', function()
    local rc = h.sh('dpkg-query -W -f=\'${Status}\' libmimalloc-dev 2>/dev/null | grep -q "install ok installed"')
    local l = lines(B.get('version').out)
    if rc == 0 then
      assert.truthy(l[4]:match('^allocator: mimalloc %d'), l[4])
      local elf = select(2, h.sh('readelf -d ' .. h.q(h.bin)))
      assert.truthy(elf:find('libmimalloc', 1, true), 'build/qatlab does not list libmimalloc as NEEDED')
    else
      assert.are.equal('allocator: glibc malloc', l[4])
    end
  end)

  it('rejects extra arguments with exit 2', function()
    local r = B.get('version_extra')
    assert.are.equal(2, r.rc)
    hr.has(r.err, 'no arguments', 'stderr')
    assert.are.equal('', r.out)
  end)
end)

describe('--help', function()
  for _, c in ipairs(help_cases) do
    it('qatlab ' .. c[1] .. ' exits 0 and shows usage', function()
      local r = B.get('help ' .. c[1])
      assert.are.equal(0, r.rc, r.err)
      assert.truthy(r.out:lower():find('usage', 1, true), r.out)
      hr.has(r.out, c[2], 'help text')
      assert.are.equal('', r.err)
    end)
  end

  it('top-level help names every command; run --help lists every common option', function()
    local top, run = B.get('help --help').out, B.get('help run --help').out
    for _, c in ipairs{'run', 'repl', 'version', '-e'} do hr.has(top, 'qatlab ' .. c, '--help') end
    for _, o in ipairs{'--set', '--device', '--seed', '--threads', '--out', '--log-level', '--help'} do
      hr.has(run, o, 'run --help')
    end
  end)

  it('with no command shows usage and exits 2', function()
    local r = B.get('help none')
    assert.are.equal(2, r.rc)
    assert.truthy((r.out .. r.err):find('usage', 1, true))
  end)
end)

describe('args and arg', function()
  it('types --set values like literals', function()
    local r = B.get('set1')
    assert.are.equal(0, r.rc, r.err)
    local v = hr.kv(r.out)
    assert.are.equal('number', v.lr:match('^(%a+):'))
    assert.are.equal(3e-4, tonumber(v.lr:match(':(.*)')))
    assert.are.equal('string:foo', v.name)
    assert.are.equal('boolean:true', v.flag)
    assert.are.equal('boolean:false', v.off)
    assert.are.equal('string:12', v.q)         -- a quoted number stays a string
    assert.are.equal('string:x y', v.single)
  end)

  it('builds nested tables from dotted keys', function()
    local v = hr.kv(B.get('set1').out)
    assert.are.equal('number:256', v['model.width'])
    assert.are.equal('string:gelu', v['model.act'])
    assert.are.equal('0.9', v['model.opt.beta'])
  end)

  it('passes what follows -- as arg[1..n], with arg[0] the script', function()
    local v = hr.kv(B.get('set1').out)
    assert.are.equal('2', v.narg)
    assert.are.equal('a', v.arg1)
    assert.are.equal('b', v.arg2)
    assert.are.equal(dir .. '/show.lua', v.arg0)
  end)

  it('gives args and arg both as the chunk varargs and as names in the script environment, not as globals', function()
    local v = hr.kv(B.get('set1').out)
    assert.are.equal('true', v.same_args)
    assert.are.equal('true', v.same_arg)
    assert.are.equal('nil', v.global_args)
    assert.are.equal('nil', v.global_arg)
  end)

  it('keeps commas, spaces and = inside values; --set=k=v works; the last --set wins', function()
    local r = B.get('set2')
    assert.are.equal(0, r.rc, r.err)
    local v = hr.kv(r.out)
    assert.are.equal('string:1,2,3', v.csv)
    assert.are.equal('string:a, b, c', v.sentence)
    assert.are.equal('string:k=v', v.eqs)
    assert.are.equal(-2.5e-3, tonumber(v.neg:match('^number:(.*)')))
    assert.are.equal('string:', v.empty)
    assert.are.equal('number:2', v.over)
  end)

  it('runs `qatlab SCRIPT.lua` and leaves option-like words after -- to the script', function()
    local r = B.get('set3')
    assert.are.equal(0, r.rc, r.err)
    local v = hr.kv(r.out)
    assert.are.equal('string:bar', v.name)
    assert.are.equal('4', v.narg)
    assert.are.equal('--set', v.arg1)
    assert.are.equal('x=1', v.arg2)
    assert.are.equal('--', v.arg3)
    assert.are.equal('--help', v.arg4)
  end)
end)

describe('bad command lines exit 2 with a message and run nothing:', function()
  for _, c in ipairs(bad_cases) do
    it(c[1], function()
      local r = B.get('bad ' .. c[1])
      assert.are.equal(2, r.rc, r.out .. r.err)
      hr.has(r.err, 'qatlab: ', 'stderr')
      hr.has(r.err, c[2], 'stderr')
      assert.falsy(r.err:find('traceback', 1, true))
      assert.falsy(r.out:find('ran', 1, true), 'the script ran')
    end)
  end
end)

describe('qatlab.argv and the environment', function()
  it('gives the command line as given, argv[0] first, before any option is parsed', function()
    local r = B.get('argv')
    assert.are.equal(0, r.rc, r.err)
    local v = hr.kv(r.out)
    local want = {h.bin, dir .. '/argv.lua', '--set', 'x=a b', '--threads', '1', '--', '--seed', '', 'z'}
    assert.are.equal(tostring(#want), v.nargv)
    for i, a in ipairs(want) do assert.are.equal(a, v['argv' .. i], 'argv[' .. i .. ']') end
    assert.are.equal('nil', v.sweep_worker)
  end)

  it('takes QATLAB_SWEEP_WORKER out of the environment into qatlab.sweep_worker', function()
    local r = B.get('argv_worker')
    assert.are.equal(0, r.rc, r.err)
    local v = hr.kv(r.out)
    assert.are.equal('2:abc:1:toy', v.sweep_worker)
    assert.are.equal('nil', v.env_worker)
    assert.are.equal('unset', v.child_worker)
    assert.are.equal('3', v.nargv)   -- qatlab run SCRIPT
  end)
end)

describe('running code', function()
  it('-e runs a chunk with args', function()
    local r = B.get('e')
    assert.are.equal(0, r.rc, r.err)
    assert.are.equal('2\n42\t0\n', r.out)
    r = B.get('e_err')
    assert.are.equal(1, r.rc)
    hr.has(r.err, 'from -e', 'stderr')
  end)

  it('--seed makes torch.randn reproducible across processes and equal to PyTorch', function()
    local a, b, c = B.get('seed7a'), B.get('seed7b'), B.get('seed8')
    assert.are.equal(0, a.rc, a.err)
    assert.are.equal(0, b.rc, b.err)
    a, b, c = hr.kv(a.out), hr.kv(b.out), hr.kv(c.out)
    assert.are.equal(a.randn, b.randn)
    assert.are_not.equal(a.randn, c.randn)
    local i = 0
    for v in a.randn:gmatch('[^,]+') do
      i = i + 1
      local want = python().randn_list[i]
      assert(math.abs(tonumber(v) - want) <= 1e-7 * math.max(1, math.abs(want)),
             ('randn[%d]: qatlab %s, PyTorch %.9g'):format(i, v, want))
    end
    assert.are.equal(3, i)
  end)

  it('--seed also seeds math.random and is reported by require "qatlab"', function()
    local a, b, c = hr.kv(B.get('seed7a').out), hr.kv(B.get('seed7b').out), hr.kv(B.get('seed8').out)
    assert.are.equal(a.mathrandom, b.mathrandom)
    assert.are_not.equal(a.mathrandom, c.mathrandom)
    assert.are.equal('7', a.qatlab_seed)
  end)

  it('--threads sets the intra-op thread count', function()
    assert.are.equal('1', hr.kv(B.get('seed7a').out).threads)
    assert.are.equal('2', hr.kv(B.get('seed7b').out).threads)
  end)

  it('--device cpu puts new tensors on the CPU', function()
    local v = hr.kv(B.get('seed7a').out)
    assert.are.equal('cpu', v.default_device)
    assert.are.equal('cpu', v.tensor_device)
    assert.are.equal('cpu', v.qatlab_device)
  end)

  it('--device cuda needs a CUDA device: exit 2 with a message when there is none', function()
    local r = B.get('cuda')
    if python().cuda == 0 then
      assert.are.equal(2, r.rc, r.out)
      hr.has(r.err, 'CUDA', 'stderr')
      assert.are.equal('', r.out)
    else
      assert.are.equal(0, r.rc, r.err)
      assert.are.equal('cuda:0', hr.kv(r.out).default_device)
    end
  end)
end)

describe('modules', function()
  it('finds modules next to the script, whatever the working directory', function()
    local r = B.get('mods')
    assert.are.equal(0, r.rc, r.err)
    local v = hr.kv(r.out)
    assert.are.equal('nearby module', v.nearby)
    assert.are.equal('package via init.lua', v.pkg)
    assert.are.equal(dir .. '/mods', v.script_dir)
    assert.are.equal('missing', v.fromqp)
  end)

  it('adds every QATLAB_PATH entry to the module path', function()
    local r = B.get('mods_qp')
    assert.are.equal(0, r.rc, r.err)
    local v = hr.kv(r.out)
    assert.are.equal('from QATLAB_PATH', v.fromqp)
    assert.are.equal('second entry', v.fromqp2)
    assert.are.equal('nearby module', v.nearby)
  end)
end)

describe('globals', function()
  it('requiring torch, log and qatlab adds no global; undeclared names stay in the script', function()
    local r = B.get('globals')
    assert.are.equal(0, r.rc, r.err)
    local v = hr.kv(r.out)
    assert.are.equal(v.before, v.after)
    assert.are.equal('nil', v.undeclared_in_G)
    assert.are.equal('5', v.undeclared_seen)
  end)

  it('the globals are exactly LuaJIT\'s standard ones (less the executable\'s `arg`)', function()
    local v, lj = hr.kv(B.get('globals').out), B.get('luajit')
    local standard = '_G _VERSION assert bit collectgarbage coroutine debug dofile error gcinfo getfenv ' ..
      'getmetatable io ipairs jit load loadfile loadstring math module newproxy next os package pairs pcall ' ..
      'print rawequal rawget rawset require select setfenv setmetatable string table tonumber tostring type ' ..
      'unpack xpcall'
    if lj.rc == 0 and lj.out:find('_G', 1, true) then  -- a fresh luajit on this machine: its list less `arg`
      standard = (' ' .. lj.out:gsub('\n', '') .. ' '):gsub(' arg ', ' '):match('^ (.-) $')
    end
    assert.are.equal(standard, v.after)
  end)
end)

teardown(function() hr.rmtree(dir) end)
