-- plot: line plots (loss curves, sweeps) as standalone SVG files written by pure Lua, readable in
-- any browser. plot.lines{series={{name=, x={...}, y={...}}, ...}, title=, xlabel=, ylabel=,
-- out='f.svg', logy=false}; plot.loss_curves{csv='training_log.csv', out=, title=};
-- plot.sweep{runs={{name=, csv=}, ...}, out=, column='train_loss'}. Points that are missing,
-- NaN or infinite (or <= 0 with logy) are skipped. Files are written atomically (temp + rename).
local opts = require 'opts'

local M = {}

-- The plot area inside a W x H picture (pixels).
M.W, M.H = 640, 400
M.LEFT, M.RIGHT, M.TOP, M.BOTTOM = 70, 20, 40, 50

M.colors = { '#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b', '#e377c2', '#7f7f7f',
  '#bcbd22', '#17becf' }

local function finite(v)
  return type(v) == 'number' and v == v and v ~= math.huge and v ~= -math.huge
end
M.finite = finite

local function esc(s)
  return (tostring(s):gsub('[&<>"]', { ['&'] = '&amp;', ['<'] = '&lt;', ['>'] = '&gt;', ['"'] = '&quot;' }))
end

-- A "nice" number near x (1, 2, 5 times a power of ten); round picks the nearest, else the ceiling.
local function nicenum(x, round)
  local e = math.floor(math.log10(x))
  local f = x / 10 ^ e
  local nf
  if round then
    nf = f < 1.5 and 1 or f < 3 and 2 or f < 7 and 5 or 10
  else
    nf = f <= 1 and 1 or f <= 2 and 2 or f <= 5 and 5 or 10
  end
  return nf * 10 ^ e
end

-- Round tick values covering [lo, hi]: returns the ticks, the step, and the covered range.
function M.ticks(lo, hi, n)
  n = n or 5
  if hi < lo then lo, hi = hi, lo end
  if hi == lo then
    local d = lo == 0 and 1 or math.abs(lo) * 0.1
    lo, hi = lo - d, hi + d
  end
  local step = nicenum(nicenum(hi - lo, false) / n, true)
  local first = math.floor(lo / step + 1e-9) * step
  local last = math.ceil(hi / step - 1e-9) * step
  local ticks = {}
  local k = 0
  while true do
    local t = first + k * step
    if t > last + step * 1e-6 then break end
    if math.abs(t) < step * 1e-9 then t = 0 end
    ticks[#ticks + 1] = t
    k = k + 1
  end
  return ticks, step, first, last
end

-- A tick label: as many decimals as the step needs.
function M.label(v, step)
  local dec = math.max(0, -math.floor(math.log10(step) + 1e-9)) + 0  -- + 0 turns -0 into 0
  if math.abs(v) >= 1e6 or (v ~= 0 and math.abs(v) < 1e-4) then return ('%g'):format(v) end
  return (('%.' .. dec .. 'f'):format(v))
end

local function fmt(v) return (('%.2f'):format(v):gsub('%.?0+$', '')) end

-- The finite points of one series (and for logy the positive ones), as {x, y} pairs.
local function points_of(s, logy)
  local pts = {}
  local n = math.max(#(s.x or {}), #(s.y or {}))
  for i = 1, n do
    local x, y = s.x[i], s.y[i]
    if finite(x) and finite(y) and (not logy or y > 0) then pts[#pts + 1] = { x, y } end
  end
  return pts
end

-- Builds the SVG text; returns it and the layout ({px = fn, py = fn, xticks, yticks}).
local LINES = {
  series = 'table!', out = 'string', title = 'string', xlabel = 'string', ylabel = 'string', logy = 'boolean',
  width = 'number', height = 'number', xticks = 'number', yticks = 'number',
}

function M.render(o)
  opts.check(o, LINES, 'plot.render')
  local W, H = o.width or M.W, o.height or M.H
  local x0, x1, y0, y1 = M.LEFT, W - M.RIGHT, M.TOP, H - M.BOTTOM
  local logy = o.logy and true or false
  local all = {}
  local xmin, xmax, ymin, ymax = math.huge, -math.huge, math.huge, -math.huge
  for i, s in ipairs(o.series) do
    assert(type(s.x) == 'table' and type(s.y) == 'table',
      ('plot.lines: series %d (%s) needs x and y tables'):format(i, tostring(s.name)))
    local pts = points_of(s, logy)
    all[i] = pts
    for _, p in ipairs(pts) do
      local y = logy and math.log10(p[2]) or p[2]
      xmin, xmax = math.min(xmin, p[1]), math.max(xmax, p[1])
      ymin, ymax = math.min(ymin, y), math.max(ymax, y)
    end
  end
  if xmin > xmax then xmin, xmax, ymin, ymax = 0, 1, 0, 1 end
  local xt, xstep, xlo, xhi = M.ticks(xmin, xmax, o.xticks or 6)
  local yt, ystep, ylo, yhi
  if logy then
    ylo, yhi = math.floor(ymin + 1e-9), math.ceil(ymax - 1e-9)
    if yhi == ylo then yhi = ylo + 1 end
    yt, ystep = {}, 1
    for e = ylo, yhi do yt[#yt + 1] = e end
  else
    yt, ystep, ylo, yhi = M.ticks(ymin, ymax, o.yticks or 5)
  end
  local function px(x) return x0 + (x - xlo) / (xhi - xlo) * (x1 - x0) end
  local function py(y)
    if logy then y = math.log10(y) end
    return y1 - (y - ylo) / (yhi - ylo) * (y1 - y0)
  end

  local out = {}
  local function add(s, ...) out[#out + 1] = select('#', ...) > 0 and s:format(...) or s end
  add('<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" ' ..
    'font-family="sans-serif" font-size="12">', W, H, W, H)
  add('<rect x="0" y="0" width="%d" height="%d" fill="white"/>', W, H)
  if o.title then add('<text x="%s" y="22" text-anchor="middle" font-size="15">%s</text>', fmt(W / 2), esc(o.title)) end
  -- grid and ticks
  add('<g stroke="#dddddd" stroke-width="1">')
  for _, t in ipairs(xt) do add('<line x1="%s" y1="%d" x2="%s" y2="%d"/>', fmt(px(t)), y0, fmt(px(t)), y1) end
  for _, t in ipairs(yt) do
    local yy = logy and y1 - (t - ylo) / (yhi - ylo) * (y1 - y0) or py(t)
    add('<line x1="%d" y1="%s" x2="%d" y2="%s"/>', x0, fmt(yy), x1, fmt(yy))
  end
  add('</g>')
  add('<rect x="%d" y="%d" width="%d" height="%d" fill="none" stroke="black"/>', x0, y0, x1 - x0, y1 - y0)
  add('<g text-anchor="middle">')
  for _, t in ipairs(xt) do
    add('<line x1="%s" y1="%d" x2="%s" y2="%d" stroke="black"/>', fmt(px(t)), y1, fmt(px(t)), y1 + 5)
    add('<text x="%s" y="%d">%s</text>', fmt(px(t)), y1 + 18, esc(M.label(t, xstep)))
  end
  add('</g><g text-anchor="end">')
  for _, t in ipairs(yt) do
    local yy = logy and y1 - (t - ylo) / (yhi - ylo) * (y1 - y0) or py(t)
    local text = logy and ('%g'):format(10 ^ t) or M.label(t, ystep)
    add('<line x1="%d" y1="%s" x2="%d" y2="%s" stroke="black"/>', x0 - 5, fmt(yy), x0, fmt(yy))
    add('<text x="%d" y="%s">%s</text>', x0 - 8, fmt(yy + 4), esc(text))
  end
  add('</g>')
  if o.xlabel then
    add('<text x="%s" y="%d" text-anchor="middle">%s</text>', fmt((x0 + x1) / 2), H - 12, esc(o.xlabel))
  end
  if o.ylabel then
    add('<text x="16" y="%s" text-anchor="middle" transform="rotate(-90 16 %s)">%s</text>',
      fmt((y0 + y1) / 2), fmt((y0 + y1) / 2), esc(o.ylabel))
  end
  -- series
  for i, s in ipairs(o.series) do
    local color = s.color or M.colors[(i - 1) % #M.colors + 1]
    local coords = {}
    for _, p in ipairs(all[i]) do coords[#coords + 1] = fmt(px(p[1])) .. ',' .. fmt(py(p[2])) end
    add('<polyline fill="none" stroke="%s" stroke-width="%s"%s points="%s"><title>%s</title></polyline>',
      color, s.width or 1.8, s.dash and ' stroke-dasharray="6,4"' or '', table.concat(coords, ' '),
      esc(s.name or ('series ' .. i)))
    if s.markers or #all[i] == 1 then
      for _, p in ipairs(all[i]) do
        add('<circle cx="%s" cy="%s" r="3" fill="%s"/>', fmt(px(p[1])), fmt(py(p[2])), color)
      end
    end
  end
  -- legend (top right, inside the plot)
  local longest = 0
  for _, s in ipairs(o.series) do longest = math.max(longest, #tostring(s.name or '')) end
  local lw = 40 + longest * 7
  local lx, ly = x1 - lw - 8, y0 + 8
  add('<g class="legend">')
  add('<rect x="%d" y="%d" width="%d" height="%d" fill="white" fill-opacity="0.85" stroke="#999999"/>',
    lx, ly, lw, 8 + 18 * #o.series)
  for i, s in ipairs(o.series) do
    local color = s.color or M.colors[(i - 1) % #M.colors + 1]
    local yy = ly + 4 + 18 * (i - 1) + 9
    add('<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="%s" stroke-width="2.5"%s/>', lx + 6, yy, lx + 28, yy,
      color, s.dash and ' stroke-dasharray="6,4"' or '')
    add('<text x="%d" y="%d">%s</text>', lx + 34, yy + 4, esc(s.name or ('series ' .. i)))
  end
  add('</g>')
  add('</svg>')
  return table.concat(out, '\n') .. '\n', { px = px, py = py, xticks = xt, yticks = yt,
    xrange = { xlo, xhi }, yrange = { ylo, yhi } }
end

-- Writes text to path atomically (temporary name in the same folder, then rename).
function M.write_atomic(path, text)
  local tmp = ('%s.tmp%d'):format(path, math.random(1, 1e9))
  local f, err = io.open(tmp, 'w')
  if not f then error(('plot: cannot write %s: %s'):format(path, tostring(err)), 0) end
  local ok, werr = f:write(text)
  f:close()
  if not ok then os.remove(tmp); error(('plot: cannot write %s: %s'):format(path, tostring(werr)), 0) end
  local rok, rerr = os.rename(tmp, path)
  if not rok then os.remove(tmp); error(('plot: cannot rename to %s: %s'):format(path, tostring(rerr)), 0) end
  return path
end

-- Renders and writes o.out; returns the path, the SVG text and the layout.
function M.lines(o)
  opts.check(o, LINES, 'plot.lines')
  if o.out == nil then error('plot.lines: option "out" is required (a string: the .svg file)', 2) end
  local svg, layout = M.render(o)
  M.write_atomic(o.out, svg)
  return o.out, svg, layout
end

-- Reads a CSV with a header row: returns {column = {values...}} (numbers, nil for empty or
-- unparsable cells) and the row count.
function M.read_csv(path)
  local f, err = io.open(path)
  if not f then error(('plot: cannot read %s: %s'):format(path, tostring(err)), 0) end
  local header, cols, n = nil, {}, 0
  for line in f:lines() do
    line = line:gsub('\r$', '')
    if line ~= '' then
      local cells = {}
      for cell in (line .. ','):gmatch('([^,]*),') do cells[#cells + 1] = cell end
      if not header then
        header = cells
        for _, name in ipairs(header) do cols[name] = {} end
      else
        n = n + 1
        for i, name in ipairs(header) do
          local s = cells[i] and cells[i]:match('^%s*(.-)%s*$') or ''
          local v = tonumber(s)
          local low = s:lower()
          if v == nil and (low == 'nan' or low == '-nan') then v = 0 / 0 end
          if v == nil and (low == 'inf' or low == '+inf') then v = math.huge end
          if v == nil and low == '-inf' then v = -math.huge end
          cols[name][n] = v
        end
      end
    end
  end
  f:close()
  if not header then error(('plot: %s is empty (expected a header row)'):format(path), 0) end
  return cols, n
end

local function column(cols, name, path)
  local c = cols[name]
  if not c then error(('plot: %s has no column %q'):format(path, name), 0) end
  return c
end

-- Train and eval loss of one training_log.csv (columns step,train_loss,eval_loss,...).
function M.loss_curves(o)
  opts.check(o, {csv = 'string!', out = 'string', x = 'string', title = 'string', xlabel = 'string',
                 ylabel = 'string', logy = 'boolean'}, 'plot.loss_curves')
  local cols = M.read_csv(o.csv)
  local step = column(cols, o.x or 'step', o.csv)
  local series = { { name = 'train_loss', x = step, y = column(cols, 'train_loss', o.csv) } }
  if cols.eval_loss then
    series[2] = { name = 'eval_loss', x = step, y = cols.eval_loss, markers = true }
  end
  return M.lines{ series = series, out = o.out or 'loss.svg', title = o.title or 'loss',
    xlabel = o.xlabel or 'step', ylabel = o.ylabel or 'loss', logy = o.logy }
end

-- Overlays one column (train_loss by default) of several runs' CSVs.
function M.sweep(o)
  opts.check(o, {runs = 'table!', column = 'string', out = 'string', x = 'string', title = 'string',
                 xlabel = 'string', ylabel = 'string', logy = 'boolean'}, 'plot.sweep')
  local col = o.column or 'train_loss'
  local series = {}
  for i, r in ipairs(o.runs) do
    local cols = M.read_csv(r.csv)
    series[i] = { name = r.name or r.csv, x = column(cols, o.x or 'step', r.csv), y = column(cols, col, r.csv) }
  end
  return M.lines{ series = series, out = o.out or 'sweep.svg', title = o.title or col,
    xlabel = o.xlabel or 'step', ylabel = o.ylabel or col, logy = o.logy }
end

return M
