-- helper: shared assertions and subprocess helpers for the Lua specs.
-- Tensor comparisons report the worst element; sh() runs the host as a subprocess.
local torch = require 'torch'

local M = {}

M.bin = os.getenv('QATLAB_BIN') or 'qatlab'
M.python = os.getenv('QATLAB_PYTHON') or 'python3'
M.source_dir = os.getenv('QATLAB_SOURCE_DIR') or '.'
-- The real tokenizers tools/fetch_test_data.sh puts in the checkout (Qwen3, GPT-2; not in the repository).
M.test_data = M.source_dir .. '/.cache/data'

-- assert that a and b (tensors, or a tensor and a nested table) agree within atol + rtol*|b|.
function M.close(a, b, atol, rtol)
  atol, rtol = atol or 1e-6, rtol or 1e-5
  if not torch.is_tensor(b) then b = torch.tensor(b, {dtype = 'float64'}) end
  a, b = a:double(), b:double()
  assert(a:size() == b:size(), ('shape mismatch: %s vs %s'):format(tostring(a:size()), tostring(b:size())))
  local err = (a - b):abs() - (b:abs() * rtol + atol)
  local worst = err:numel() > 0 and err:max():item() or -1
  assert(worst <= 0, ('tensors differ by %g beyond tolerance\n%s\n%s'):format(worst, tostring(a), tostring(b)))
  return true
end

-- shell quote
M.q = require('util').q   -- POSIX shell quoting (scripts/util.lua)

-- Runs a command; returns exit code, stdout, stderr.
function M.sh(cmd)
  local tmp = os.tmpname()
  local out = io.popen(cmd .. ' 2>' .. tmp .. '; echo "__rc=$?"')
  local text = out:read('*a')
  out:close()
  local f = io.open(tmp); local err = f:read('*a'); f:close(); os.remove(tmp)
  local rc = tonumber(text:match('__rc=(%d+)%s*$'))
  text = text:gsub('__rc=%d+%s*$', '')
  return rc, text, err
end

-- Runs `qatlab <args>`; returns exit code, stdout, stderr.
function M.host(args) return M.sh(M.q(M.bin) .. ' ' .. args) end

-- Runs Python code with the project's torch; returns its stdout (asserts success).
function M.py(code)
  local rc, out, err = M.sh(M.q(M.python) .. ' -c ' .. M.q(code))
  assert(rc == 0, 'python failed: ' .. err)
  return out
end

function M.tmpdir()
  local d = os.tmpname()
  os.remove(d)
  assert(os.execute('mkdir -p ' .. M.q(d)) == 0)
  return d
end

-- lua(v): a Python value (dicts, lists, tensors, bools, NaN, infinities) as Lua source.
local PY_LUA = [==[
import torch
def lua(v):
    if isinstance(v, dict): return '{' + ','.join('[%r]=%s' % (k, lua(x)) for k, x in v.items()) + '}'
    if isinstance(v, (list, tuple)): return '{' + ','.join(lua(x) for x in v) + '}'
    if isinstance(v, bool): return 'true' if v else 'false'
    if isinstance(v, torch.Tensor): return lua(v.tolist())
    if isinstance(v, float) and v != v: return '(0/0)'
    if isinstance(v, float) and v in (float('inf'), float('-inf')): return ('-' if v < 0 else '') + 'math.huge'
    return repr(v)
R = {}]==]

-- Case tables checked against Python torch: cases = {{name, fn, python_expr}, ...}; prelude is the
-- Python that defines the inputs. Returns the results by name, computed in one Python run.
function M.pycases(prelude, cases)
  local lines = {PY_LUA, prelude}
  for _, c in ipairs(cases) do lines[#lines + 1] = ('R[%q] = (%s)'):format(c[1], c[3]) end
  lines[#lines + 1] = "print('return ' + lua(R))"
  return assert(loadstring(M.py(table.concat(lines, '\n'))))()
end

-- Asserts that a Lua value (number, boolean, nested table) agrees with a Python reference: numbers
-- within tol * (1 + |want|), NaN and infinities exactly.
function M.agree(got, want, path, tol)
  if type(want) == 'table' then
    assert(type(got) == 'table', path .. ': expected a table, got ' .. type(got))
    assert(#got == #want, ('%s: %d entries, expected %d'):format(path, #got, #want))
    for i = 1, #want do M.agree(got[i], want[i], path .. '[' .. i .. ']', tol) end
  elseif type(want) == 'number' then
    assert(type(got) == 'number', path .. ': expected a number, got ' .. type(got))
    if want ~= want then
      assert(got ~= got, path .. ': expected nan, got ' .. got)
    elseif want == math.huge or want == -math.huge then
      assert(got == want, ('%s: %s, expected %s'):format(path, got, want))
    else
      assert(math.abs(got - want) <= tol * (1 + math.abs(want)), ('%s: %.17g, expected %.17g'):format(path, got, want))
    end
  else
    assert(got == want, ('%s: %s, expected %s'):format(path, tostring(got), tostring(want)))
  end
end

-- Tensors (also inside arrays) as nested Lua tables.
function M.to_lua(v)
  if torch.is_tensor(v) then return v:totable() end
  if type(v) == 'table' then
    local r = {}
    for i, x in ipairs(v) do r[i] = M.to_lua(x) end
    return r
  end
  return v
end

return M
