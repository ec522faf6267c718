-- log: the `log` module over spdlog as a script sees it: timestamped lines with the level on
-- stderr, filtering by --log-level and log.set_level, and the copy in <out>/qatlab.log.
local h = require 'helper'
local hr = require 'hostrun'

local dir = hr.files{
  ['talk.lua'] = [[
local log = require 'log'
print('stdout line')
log.debug('a debug line')
log.info('hello', 42, nil, true, setmetatable({}, {__tostring = function() return 'custom' end}))
log.warn('careful')
log.error('bad thing')
print('level=' .. log.get_level())
]],
  ['levels.lua'] = [[
local log = require 'log'
log.info('info before')
log.set_level('error')
print('level=' .. log.get_level())
log.warn('warn hidden')
log.error('error shown')
log.set_level('debug')
log.debug('debug shown')
local ok, e = pcall(log.set_level, 'loud')
print('bad_ok=' .. tostring(ok))
print('bad_msg=' .. tostring(e))
print('level_after=' .. log.get_level())
print('out=' .. tostring(require('qatlab').out))
]],
}
local out = h.tmpdir()
local nested = out .. '/deep/er/run1'
local function path(name) return h.q(dir .. '/' .. name) end

local B = hr.batch()
B.host('talk', 'run ' .. path('talk.lua'))
B.host('warn', 'run ' .. path('talk.lua') .. ' --log-level warn')
B.host('off', 'run ' .. path('talk.lua') .. ' --log-level off')
B.host('levels', 'run ' .. path('levels.lua'))
-- the same --out twice in a row: the second run adds to the log
B.add('out', hr.cmd('run ' .. path('levels.lua') .. ' --out ' .. h.q(nested)) .. ' && ' ..
             hr.cmd('run ' .. path('talk.lua') .. ' --out ' .. h.q(nested) .. ' --log-level debug'))

local function lines(s)
  local t = {}
  for l in s:gmatch('[^\n]+') do t[#t + 1] = l end
  return t
end
-- stderr lines: [HH:MM:SS.mmm] [level] message
local function parse_stderr(s)
  local t = {}
  for _, l in ipairs(lines(s)) do
    local level, msg = l:match('^%[%d%d:%d%d:%d%d%.%d%d%d%] %[(%a+)%] (.*)$')
    assert(level, 'not a log line: ' .. l)
    t[#t + 1] = level .. ' ' .. msg
  end
  return t
end

describe('log', function()
  it('writes info, warn and error to stderr with a timestamp and the level, nothing to stdout', function()
    local r = B.get('talk')
    assert.are.equal(0, r.rc, r.err)
    assert.are.same({'info hello 42 nil true custom', 'warning careful', 'error bad thing'}, parse_stderr(r.err))
    assert.are.equal('stdout line\nlevel=info\n', r.out)
    assert.falsy(r.err:find('\27[', 1, true), 'colour codes on a stderr that is not a terminal')
  end)

  it('--log-level warn hides info (and debug); off hides everything', function()
    local r = B.get('warn')
    assert.are.equal(0, r.rc, r.err)
    assert.are.same({'warning careful', 'error bad thing'}, parse_stderr(r.err))
    assert.truthy(r.out:find('level=warn', 1, true))
    r = B.get('off')
    assert.are.equal(0, r.rc, r.err)
    assert.are.equal('', r.err)
  end)

  it('log.set_level changes the level at run time and rejects unknown names', function()
    local r = B.get('levels')
    assert.are.equal(0, r.rc, r.err)
    assert.are.same({'info info before', 'error error shown', 'debug debug shown'}, parse_stderr(r.err))
    local v = hr.kv(r.out)
    assert.are.equal('error', v.level)
    assert.are.equal('false', v.bad_ok)
    hr.has(v.bad_msg, "log.set_level: unknown level 'loud'", 'message')
    assert.are.equal('debug', v.level_after)
    assert.are.equal('nil', v.out)
  end)
end)

describe('--out', function()
  it('creates nested directories and tells the script where they are', function()
    local r = B.get('out')
    assert.are.equal(0, r.rc, r.err)
    local f = io.open(nested .. '/qatlab.log')
    assert.truthy(f, 'no ' .. nested .. '/qatlab.log')
    f:close()
    hr.has(r.out, 'out=' .. nested, 'stdout')
  end)

  it('copies every shown log line, with a full timestamp, into OUT/qatlab.log; a second run appends', function()
    B.get('out')
    local text = hr.slurp(nested .. '/qatlab.log')
    local got = {}
    for _, l in ipairs(lines(text)) do
      local level, msg = l:match('^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%d (%a+) (.*)$')
      assert(level, 'not a log line: ' .. l)
      got[#got + 1] = level .. ' ' .. msg
    end
    assert.are.same({
      -- first run (levels.lua, default level)
      'info info before', 'error error shown', 'debug debug shown',
      -- second run (talk.lua, --log-level debug)
      'debug a debug line', 'info hello 42 nil true custom', 'warning careful', 'error bad thing',
    }, got)
    assert.falsy(text:find('stdout line', 1, true), 'print() output does not belong in the log')
  end)

  it('the file holds the same messages as stderr', function()
    local r = B.get('out')
    local stderr_msgs = parse_stderr(r.err)
    assert.are.equal(7, #stderr_msgs)
  end)
end)

teardown(function() hr.rmtree(dir); hr.rmtree(out) end)
