-- util: the small helpers the toolkit shares, each written once: shell quoting, the median, the host module
-- (`qatlab`, or an empty table outside the host) and a checked shell command.
local M = {}

-- A string quoted for the POSIX shell: 'it'\''s'.
function M.q(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

-- The median of a list of numbers (the mean of the two middle values for an even count, as numpy's median);
-- sorts the list in place; nil for an empty list.
function M.median(xs)
  local n = #xs
  if n == 0 then return nil end
  table.sort(xs)
  if n % 2 == 1 then return xs[(n + 1) / 2] end
  return (xs[n / 2] + xs[n / 2 + 1]) / 2
end

-- The host's `qatlab` module (device, out, time, argv...), or {} when the toolkit runs outside the host.
function M.host()
  local ok, q = pcall(require, 'qatlab')
  return ok and type(q) == 'table' and q or {}
end

-- Runs a shell command; a non-zero status is an error "<who>: cannot <what>".
function M.sh(cmd, who, what)
  if os.execute(cmd) ~= 0 then error(('%s: cannot %s'):format(who, what), 0) end
end

return M
