-- hostrun: runs several qatlab subprocesses at once for the host specs (CLI, errors, log,
-- REPL, memory). Each start costs ~0.3 s of loading LibTorch, so specs batch their runs.
local h = require 'helper'

local M = {}

local function slurp(path)
  local f = io.open(path, 'rb')
  if not f then return nil end
  local s = f:read('*a')
  f:close()
  return s
end
M.slurp = slurp

function M.spit(path, text)
  local f = assert(io.open(path, 'wb'))
  f:write(text)
  f:close()
  return path
end

-- A shell command line that runs the host with `args` (already shell-quoted as needed).
function M.cmd(args) return h.q(h.bin) .. ' ' .. args end

-- Runs shell commands in parallel, `jobs` at a time; returns a list of {rc=, out=, err=}
-- in the order given. Stdin is /dev/null unless a command redirects it itself.
function M.many(cmds, jobs)
  jobs = jobs or 4
  local dir = h.tmpdir()
  local results = {}
  for first = 1, #cmds, jobs do
    local parts = {}
    for i = first, math.min(first + jobs - 1, #cmds) do
      local base = dir .. '/' .. i
      -- a redirection inside the command (a REPL's input) overrides the outer /dev/null
      parts[#parts + 1] = ('{ ( %s ) </dev/null >%s 2>%s; echo $? >%s; } &'):format(
        cmds[i], h.q(base .. '.out'), h.q(base .. '.err'), h.q(base .. '.rc'))
    end
    parts[#parts + 1] = 'wait'
    os.execute(table.concat(parts, ' '))
  end
  for i = 1, #cmds do
    local base = dir .. '/' .. i
    results[i] = {rc = tonumber(slurp(base .. '.rc')), out = slurp(base .. '.out') or '',
                  err = slurp(base .. '.err') or ''}
    os.remove(base .. '.out'); os.remove(base .. '.err'); os.remove(base .. '.rc')
  end
  os.remove(dir)
  return results
end

-- Runs the host once per entry of `list` (each a string of arguments) in parallel.
function M.hosts(list, jobs)
  local cmds = {}
  for i, args in ipairs(list) do cmds[i] = M.cmd(args) end
  return M.many(cmds, jobs)
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
