-- files: a whole file read at once, folders made, and files written atomically (temporary name +
-- rename), safe when several processes (sweep workers, job-array tasks, ranks) write one folder.
local M = {}

-- The file's bytes, or nil when it cannot be opened.
function M.read(path)
  local f = io.open(path, 'rb')
  if not f then return nil end
  local s = f:read('*a')
  f:close()
  return s
end

local q = require('util').q

-- mkdir -p; `who` prefixes the error ("sweep: cannot create the folder ...").
function M.mkdir(dir, who)
  if os.execute('mkdir -p ' .. q(dir)) ~= 0 then
    error(('%s: cannot create the folder %s (check the path and its permissions)'):format(who or 'files', dir), 0)
  end
end

-- host and process id: temporary names of processes writing the same file (on a shared disk) differ.
local token
local function unique()
  if not token then
    local stat, host = M.read('/proc/self/stat'), M.read('/proc/sys/kernel/hostname')
    local pid = stat and stat:match('^(%d+)')
    if not pid then
      local n = os.tmpname()
      os.remove(n)
      pid = n:gsub('%W', '')
    end
    token = ((host or os.getenv('HOSTNAME') or ''):gsub('%W', '')) .. '.' .. pid
  end
  return token
end

-- Writes text through a temporary name and a rename: a reader sees the old text or the new, never
-- half of it. `who` prefixes errors; a failed write leaves no temporary file behind.
function M.write_atomic(path, text, who)
  local tmp = path .. '.tmp.' .. unique()
  local f, err = io.open(tmp, 'wb')
  if not f then error(('%s: cannot write %s: %s'):format(who or 'files', path, tostring(err)), 0) end
  local ok, werr = f:write(text)
  -- On a full disk a short text is still buffered after write: the failure comes from close.
  local cok, cerr = f:close()
  if ok and not cok then ok, werr = nil, cerr end
  if ok then ok, werr = os.rename(tmp, path) end
  if not ok then
    os.remove(tmp)
    error(('%s: cannot write %s: %s'):format(who or 'files', path, tostring(werr)), 0)
  end
end

return M
