-- plot_spec: SVG line plots by pure Lua: structure, legend, round ticks, pixel mapping of a
-- hand-computed case, CSV reading with empty eval cells, NaN/inf skipped, atomic writes.
local plot = require 'plot'
local h = require 'helper'

local function read(path) return assert(require('files').read(path), 'cannot read ' .. path) end

local function count(s, pat)
  local n = 0
  for _ in s:gmatch(pat) do n = n + 1 end
  return n
end

local function polylines(svg)
  local out = {}
  for pts in svg:gmatch('<polyline[^>]- points="([^"]*)"') do
    local p = {}
    for x, y in pts:gmatch('([%-%d%.]+),([%-%d%.]+)') do p[#p + 1] = { tonumber(x), tonumber(y) } end
    out[#out + 1] = p
  end
  return out
end

local function write(path, text)
  local f = assert(io.open(path, 'w')); f:write(text); f:close()
end

describe('plot', function()
  local dir = h.tmpdir()

  it('round ticks', function()
    assert.same({ 0, 2, 4, 6, 8, 10 }, (plot.ticks(0, 10, 6)))
    local t, step = plot.ticks(0.13, 0.87, 5)
    assert.near(0.2, step, 1e-12)
    assert.near(0, t[1], 1e-12); assert.near(1, t[#t], 1e-12)
    assert.equal('0.4', plot.label(0.4, 0.2))
    assert.equal('2000', plot.label(2000, 500))
  end)

  it('writes a well-formed SVG with one polyline per series, a legend and the right pixels', function()
    local out = dir .. '/a.svg'
    local path, svg, layout = plot.lines{ out = out, title = 'T <1>', xlabel = 'step', ylabel = 'loss',
      series = { { name = 'train', x = { 0, 5, 10 }, y = { 0, 0.5, 1 } },
                 { name = 'eval & more', x = { 0, 10 }, y = { 1, 0 } } } }
    assert.equal(out, path)
    local text = read(out)
    assert.equal(svg, text)
    assert.truthy(text:match('^<svg '))
    assert.truthy(text:match('</svg>\n$'))
    assert.equal(2, count(text, '<polyline'))
    assert.equal(2, count(text, '</polyline>'))
    assert.truthy(text:find('>train</text>', 1, true))
    assert.truthy(text:find('>eval &amp; more</text>', 1, true))
    assert.truthy(text:find('T &lt;1&gt;', 1, true))
    assert.is_nil(text:find('<1>', 1, true))
    -- each opened element is closed or self-closed
    local opens = count(text, '<[%a]') ; local closes = count(text, '</%a') + count(text, '/>')
    assert.equal(opens, closes)
    -- plot area x: 70..620, y: 40..350; ranges [0, 10] x [0, 1]
    assert.same({ 0, 10 }, layout.xrange); assert.same({ 0, 1 }, layout.yrange)
    local p = polylines(text)
    assert.same({ { 70, 350 }, { 345, 195 }, { 620, 40 } }, p[1])
    assert.same({ { 70, 40 }, { 620, 350 } }, p[2])
    assert.truthy(text:find('stroke="' .. plot.colors[1] .. '"', 1, true))
    assert.truthy(text:find('stroke="' .. plot.colors[2] .. '"', 1, true))
    assert.is_nil(io.open(out .. '.tmp', 'r'))
  end)

  it('skips NaN, inf and missing values without crashing; logy skips non-positive', function()
    local out = dir .. '/b.svg'
    local _, svg = plot.lines{ out = out, series = { { name = 's', x = { 0, 1, 2, 3, 4, 5 },
      y = { 1, 0 / 0, math.huge, -math.huge, nil, 2 } } } }
    local p = polylines(svg)
    assert.equal(2, #p[1])
    local _, svg2 = plot.lines{ out = out, logy = true, series = { { name = 's', x = { 1, 2, 3, 4 },
      y = { 10, 0, -1, 1000 } } } }
    p = polylines(svg2)
    assert.equal(2, #p[1])
    assert.near(350, p[1][1][2], 1e-9)       -- 10 at the bottom of decades 1..3
    assert.near(40, p[1][2][2], 1e-9)        -- 1000 at the top
    -- all points invalid: still a picture, with an empty polyline
    local _, svg3 = plot.lines{ out = out, series = { { name = 'none', x = { 1 }, y = { 0 / 0 } } } }
    assert.equal(1, count(svg3, '<polyline'))
  end)

  it('plots train and eval loss from a training_log.csv, skipping empty eval cells', function()
    local csv = dir .. '/training_log.csv'
    write(csv, 'step,train_loss,eval_loss,lr,elapsed_sec\n' ..
      '0,4.0,4.1,0.001,0.1\n10,3.0,,0.001,0.2\n20,2.0,,0.001,0.3\n30,1.5,nan,0.001,0.4\n40,1.0,1.2,0.001,0.5\n')
    local out = dir .. '/loss.svg'
    local _, svg = plot.loss_curves{ csv = csv, out = out, title = 'run' }
    local p = polylines(svg)
    assert.equal(2, #p)
    assert.equal(5, #p[1])
    assert.equal(2, #p[2])
    assert.truthy(svg:find('>train_loss</text>', 1, true) and svg:find('>eval_loss</text>', 1, true))
    assert.has_error(function() plot.loss_curves{ csv = dir .. '/missing.csv', out = out } end)
  end)

  it('overlays the runs of a sweep', function()
    local runs = {}
    for i = 1, 3 do
      local csv = ('%s/run%d.csv'):format(dir, i)
      write(csv, 'step,train_loss,eval_loss,lr,elapsed_sec\n0,' .. (4 + i) .. ',,0.1,0\n10,' .. i .. ',,0.1,1\n')
      runs[i] = { name = 'lr=' .. i, csv = csv }
    end
    local _, svg = plot.sweep{ runs = runs, out = dir .. '/sweep.svg' }
    assert.equal(3, count(svg, '<polyline'))
    for i = 1, 3 do assert.truthy(svg:find('>lr=' .. i .. '</text>', 1, true)) end
  end)
end)
