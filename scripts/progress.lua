-- progress: a progress reporter. On a terminal, one stderr line redrawn with \r at most 10 times a
-- second; otherwise complete timestamped lines (first, every `interval` s or 10%, last), never \r.
-- `is_tty` defaults to the host's isatty(2) with TERM set and not 'dumb', so a redirected stderr
-- gets plain lines. Metrics belong in metrics.jsonl.
local opts = require 'opts'

local M = {}

local Progress = {}
Progress.__index = Progress

local function default_clock() return require('util').host().time or os.clock end

-- 1h02m03s / 4m05s / 12s / 0.4s
function M.duration(s)
  if s == nil or s ~= s or s == math.huge then return '?' end
  if s < 10 then return ('%.1fs'):format(s) end
  s = math.floor(s + 0.5)
  local h, m = math.floor(s / 3600), math.floor(s % 3600 / 60)
  if h > 0 then return ('%dh%02dm%02ds'):format(h, m, s % 60) end
  if m > 0 then return ('%dm%02ds'):format(m, s % 60) end
  return ('%ds'):format(s)
end

local function rate_text(r)
  if r <= 0 then return '? it/s' end
  if r < 1 then return ('%.2f s/it'):format(1 / r) end
  return ('%.1f it/s'):format(r)
end

-- Postfix: a string, or a table shown as sorted k=v with numbers in %.4g.
function M.postfix(p)
  if p == nil then return '' end
  if type(p) ~= 'table' then return tostring(p) end
  local keys = {}
  for k in pairs(p) do keys[#keys + 1] = tostring(k) end
  table.sort(keys)
  local parts = {}
  for i, k in ipairs(keys) do
    local v = p[k]
    parts[i] = k .. '=' .. (type(v) == 'number' and ('%.4g'):format(v) or tostring(v))
  end
  return table.concat(parts, ' ')
end

-- progress.new{total=, desc=, prefix=, interval=30, mode=, is_tty=, isatty=, width=, writer=, clock=,
--              stamp=, getenv=}
-- mode: 'auto' (bar if is_tty else lines), 'bar', 'lines', 'off'; QATLAB_PROGRESS overrides it and
-- QATLAB_PROGRESS_INTERVAL overrides interval. writer(s) defaults to io.stderr:write + flush;
-- clock() to qatlab.time; stamp() to the UTC time as 2026-11-21T18:01:02Z.
local KNOWN = {
  total = 'number', desc = 'string', prefix = 'string', interval = 'number', mode = 'string', is_tty = 'boolean',
  isatty = 'callable', width = 'number', writer = 'callable', clock = 'callable', stamp = 'callable',
  getenv = 'callable', min_redraw = 'number', color = 'boolean',
}

function M.new(o)
  o = opts.check(o, KNOWN, 'progress.new')
  if o.total ~= nil and (o.total ~= o.total or o.total < 0) then
    error(('progress.new: option "total" must be >= 0, got %s'):format(tostring(o.total)), 2)
  end
  local getenv = o.getenv or os.getenv
  local mode = getenv('QATLAB_PROGRESS') or o.mode or 'auto'
  if mode == '' then mode = 'auto' end
  if not (mode == 'auto' or mode == 'bar' or mode == 'lines' or mode == 'off') then
    error(('progress: QATLAB_PROGRESS must be auto, bar, lines or off, got %q'):format(mode), 2)
  end
  if mode == 'auto' then
    local tty = o.is_tty
    if tty == nil then
      local term = getenv('TERM')
      local isatty = o.isatty
      if not isatty then
        isatty = require('util').host().isatty or function() return true end
      end
      local stderr_tty = isatty(2)
      tty = stderr_tty and term ~= nil and term ~= '' and term ~= 'dumb'
    end
    mode = tty and 'bar' or 'lines'
  end
  local clock = o.clock or default_clock()
  local self = setmetatable({
    total = o.total, desc = o.desc or '', prefix = o.prefix, mode = mode, n = 0,
    interval = tonumber(getenv('QATLAB_PROGRESS_INTERVAL') or '') or o.interval or 30,
    min_redraw = o.min_redraw or 0.1, width = o.width or tonumber(getenv('COLUMNS') or '') or 80,
    color = getenv('NO_COLOR') == nil and o.color ~= false,
    writer = o.writer or function(s) io.stderr:write(s); io.stderr:flush() end,
    clock = clock, stamp = o.stamp or function() return os.date('!%Y-%m-%dT%H:%M:%SZ') end,
    last_len = 0, closed = false,
  }, Progress)
  self.start = clock()
  self.last_emit, self.next_tenth = nil, 1
  return self
end

-- The status text shared by both modes (without the bar).
function Progress:text(now)
  local elapsed = now - self.start
  local rate = elapsed > 0 and self.n / elapsed or 0
  local parts = {}
  if self.desc ~= '' then parts[#parts + 1] = self.desc end
  if self.total then
    parts[#parts + 1] = ('%d/%d'):format(self.n, self.total)
    parts[#parts + 1] = ('%d%%'):format(math.floor(100 * self.n / math.max(self.total, 1)))
  else
    parts[#parts + 1] = tostring(self.n)
  end
  parts[#parts + 1] = rate_text(rate)
  parts[#parts + 1] = 'elapsed ' .. M.duration(elapsed)
  if self.total then
    parts[#parts + 1] = 'eta ' .. M.duration(rate > 0 and (self.total - self.n) / rate or nil)
  end
  local pf = M.postfix(self.post)
  if pf ~= '' then parts[#parts + 1] = pf end
  return table.concat(parts, ' ')
end

function Progress:draw_bar(now, final)
  local text = self:text(now)
  local line, visible = text, #text
  local cells = self.total and math.min(self.width - #text - 4, 40) or 0
  if cells >= 5 then
    local filled = math.floor(cells * math.min(self.n / math.max(self.total, 1), 1))
    local bar = ('#'):rep(filled) .. ('.'):rep(cells - filled)
    visible = visible + cells + 3
    if self.color then bar = '\27[32m' .. bar .. '\27[0m' end
    local desc = self.desc ~= '' and self.desc .. ' ' or ''
    line = desc .. '|' .. bar .. '| ' .. text:sub(#desc + 1)
  end
  local pad = math.max(self.last_len - visible, 0)
  self.last_len = visible
  self.writer('\r' .. line .. (' '):rep(pad) .. (final and '\n' or ''))
  self.last_emit = now
end

function Progress:emit_line(now, final)
  local text = (self.prefix and (self.prefix .. ' ') or '') .. self:text(now)
  if final and text == self.last_text then return end  -- the last line is already out
  self.writer(self.stamp() .. ' ' .. text .. '\n')
  self.last_emit, self.last_text = now, text
end

function Progress:maybe_emit(final)
  if self.mode == 'off' then return end
  local now = self.clock()
  if self.mode == 'bar' then
    if final or self.last_emit == nil or now - self.last_emit >= self.min_redraw then self:draw_bar(now, final) end
    return
  end
  local due = final or self.last_emit == nil or now - self.last_emit >= self.interval
  if self.total and self.total > 0 then
    local tenth = math.floor(10 * self.n / self.total)
    if tenth >= self.next_tenth then
      due = true
      self.next_tenth = tenth + 1
    end
  end
  if due then self:emit_line(now, final) end
end

-- Advances by k (default 1) and sets the postfix metrics if given.
function Progress:update(k, postfix)
  if type(k) == 'table' then k, postfix = 1, k end
  k = k or 1
  if type(k) ~= 'number' or k < 0 then
    error(('progress:update: the step must be a number >= 0, got %s'):format(tostring(k)), 2)
  end
  return self:set(self.n + k, postfix)
end

-- Sets the count to n (and the postfix if given). A count past the total is held at the total (100%, then
-- closed): the bar never shows more than 100% or a negative time left.
function Progress:set(n, postfix)
  if self.closed then return end
  if type(n) ~= 'number' or n < 0 then
    error(('progress:set: the count must be a number >= 0, got %s'):format(tostring(n)), 2)
  end
  if self.total and n > self.total then n = self.total end
  self.n = n
  if postfix ~= nil then self.post = postfix end
  if self.total and n >= self.total then return self:close() end
  self:maybe_emit(false)
end

-- Finishes: the last line (or the bar's newline). Safe to call twice.
function Progress:close(postfix)
  if self.closed then return end
  if postfix ~= nil then self.post = postfix end
  self.closed = true
  self:maybe_emit(true)
end

-- for i in progress.range(n, opts) do ... end: counts 1..n and closes at the end.
function M.range(n, o)
  o = opts.check(o, KNOWN, 'progress.range')
  o.total = o.total or n
  local p, i = M.new(o), 0
  return function()
    if i > 0 then p:update(1) end
    if i >= n then p:close(); return nil end
    i = i + 1
    return i, p
  end
end

return M
