-- bench: helpers shared by the benchmark experiments: medians, shell capture, peak RSS of this
-- process, and the path of the running qatlab binary (for timing child runs).
local M = {}

-- The median of a list of numbers (sorts it in place).
function M.median(xs)
  table.sort(xs)
  return xs[math.floor((#xs + 1) / 2)]
end

-- stdout of a shell command.
function M.sh(cmd)
  local p = assert(io.popen(cmd))
  local out = p:read('*a')
  p:close()
  return out
end

-- A field of /proc/self/status in kB (VmRSS, VmHWM...).
function M.status_kb(key)
  local f = assert(io.open('/proc/self/status'))
  local text = f:read('*a')
  f:close()
  return tonumber(text:match(key .. ':%s*(%d+)')) or 0
end

-- Resets VmHWM to the current RSS ("5" to clear_refs), so a later VmHWM is the peak of what follows.
function M.reset_peak_rss()
  local f = io.open('/proc/self/clear_refs', 'w')
  if f then f:write('5'); f:close() end
end

-- The qatlab executable running this script.
function M.qatlab_bin()
  return require('qatlab').executable
end

return M
