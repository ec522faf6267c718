-- hostrun: runs several qatlab subprocesses at once for the host specs (CLI, errors, log,
-- REPL, memory). Each start costs ~0.3 s of loading LibTorch, so specs batch their runs.
local h = require 'helper'

local M = {}

M.slurp = require('files').read

function M.spit(path, text)
  local f = assert(io.open(path, 'wb'))
  f:write(text)
  f:close()
  return path
end

-- A shell command line that runs the host with `args` (already shell-quoted as needed).
function M.cmd(args) return h.q(h.bin) .. ' ' .. args end

-- Runs shell commands in parallel, at most `jobs` at a time (a pool: a slow command does not
-- hold the others back); returns a list of {rc=, out=, err=} in the order given. Stdin is
-- /dev/null unless a command redirects it itself.
function M.many(cmds, jobs)
  jobs = jobs or 4
  local dir = h.tmpdir()
  for i, c in ipairs(cmds) do
    local base = dir .. '/' .. i
    M.spit(base .. '.sh', ('( %s ) </dev/null >%s 2>%s\necho $? >%s\n'):format(
      c, h.q(base .. '.out'), h.q(base .. '.err'), h.q(base .. '.rc')))
  end
  os.execute(('cd %s && ls *.sh | xargs -P %d -n 1 sh'):format(h.q(dir), jobs))
  local results = {}
  for i = 1, #cmds do
    local base = dir .. '/' .. i
    results[i] = {rc = tonumber(M.slurp(base .. '.rc')), out = M.slurp(base .. '.out') or '',
                  err = M.slurp(base .. '.err') or ''}
  end
  M.rmtree(dir)
  return results
end

-- Runs the host once per entry of `list` (each a string of arguments) in parallel.
function M.hosts(list, jobs)
  local cmds = {}
  for i, args in ipairs(list) do cmds[i] = M.cmd(args) end
  return M.many(cmds, jobs)
end

-- A batch of named shell commands, run together (in parallel) when a result is first asked
-- for; commands added later run at the next such request.
--   local B = hr.batch(); B.host('v', 'version'); ... B.get('v').rc
function M.batch(jobs)
  local b, pending, results = {}, {}, {}
  function b.add(name, cmd)
    assert(not results[name], 'a command named ' .. name .. ' already ran')
    pending[#pending + 1] = {name, cmd}
  end
  function b.host(name, args) b.add(name, M.cmd(args)) end
  function b.get(name)
    if not results[name] and #pending > 0 then
      local cmds = {}
      for i, p in ipairs(pending) do cmds[i] = p[2] end
      for i, r in ipairs(M.many(cmds, jobs)) do results[pending[i][1]] = r end
      pending = {}
    end
    return assert(results[name], 'no command named ' .. tostring(name))
  end
  return b
end

-- A fresh temporary directory holding the given files ({name = text}); returns its path.
function M.files(tbl)
  local d = h.tmpdir()
  for name, text in pairs(tbl or {}) do
    local sub = name:match('^(.*)/[^/]*$')
    if sub then os.execute('mkdir -p ' .. h.q(d .. '/' .. sub)) end
    M.spit(d .. '/' .. name, text)
  end
  return d
end

function M.rmtree(d)
  if d and d:match('^/tmp/') then os.execute('rm -rf ' .. h.q(d)) end
end

-- Plain-text search (no Lua patterns) with a readable failure.
function M.has(haystack, needle, what)
  assert(type(haystack) == 'string', (what or 'text') .. ' is not a string')
  assert(haystack:find(needle, 1, true),
         ('%s does not contain %q; it was:\n%s'):format(what or 'text', needle, haystack))
  return true
end

-- Parses `key=value` lines printed by a script into a table of strings.
function M.kv(text)
  local t = {}
  for k, v in text:gmatch('([%w_%.]+)=([^\n]*)') do t[k] = v end
  return t
end

return M
