-- sweep_report: a sweep's results ranked and written: trials grouped by name (seeds together) with the mean and
-- std of the metric, as Markdown (summary.md) and CSV (results.csv), from records in memory or on disk.
local store = require 'sweep_store'
local space = require 'sweep_space'
local key = require 'sweep_key'

local M = {}
local sorted_keys, value_text = space.sorted_keys, key.value_text

local function fmt(x) return x and ('%.6g'):format(x) or '-' end

local function csv_field(v)
  v = v == nil and '' or tostring(v)
  if v:find('[,"\n]') then v = '"' .. v:gsub('"', '""') .. '"' end
  return v
end

-- Groups the trials by name (seeds together), ranked by the mean metric; Markdown and CSV text.
-- sweep.summarize(dir): the same from the files of <out>/<name>, written there again (any process).
function M.summarize(results, metric, goal)
  if type(results) == 'string' then return M.summarize_dir(results) end
  local groups, by_name = {}, {}
  for _, r in ipairs(results) do
    local g = by_name[r.name]
    if not g then
      g = { name = r.name, vals = {}, status = {}, first = r.index }
      by_name[r.name] = g
      groups[#groups + 1] = g
    end
    local v = r.summary and r.summary[metric]
    if r.status == 'completed' and type(v) == 'number' then g.vals[#g.vals + 1] = v end
    g.status[r.status] = (g.status[r.status] or 0) + 1
  end
  for _, g in ipairs(groups) do
    local n, s, ss = #g.vals, 0, 0
    for _, v in ipairs(g.vals) do s = s + v end
    g.mean = n > 0 and s / n or nil
    for _, v in ipairs(g.vals) do ss = ss + (v - g.mean) ^ 2 end
    g.std = n > 1 and math.sqrt(ss / (n - 1)) or (n == 1 and 0 or nil)
  end
  table.sort(groups, function(a, b)
    if (a.mean == nil) ~= (b.mean == nil) then return a.mean ~= nil end
    if a.mean and a.mean ~= b.mean then
      if goal == 'maximize' then return a.mean > b.mean end
      return a.mean < b.mean
    end
    return a.first < b.first
  end)
  local lines = { ('| rank | run | %s (mean ± std) | n | status |'):format(metric), '|---:|---|---|---:|---|' }
  for i, g in ipairs(groups) do
    local st = {}
    for _, k in ipairs(sorted_keys(g.status)) do st[#st + 1] = k .. ' ' .. g.status[k] end
    lines[#lines + 1] = ('| %d | %s | %s ± %s | %d | %s |'):format(i, g.name, fmt(g.mean), fmt(g.std), #g.vals,
                                                                 table.concat(st, ', '))
  end
  local ckeys, skeys, cset, sset = {}, {}, {}, {}
  local flats = {}
  for i, r in ipairs(results) do
    flats[i] = space.flatten(r.config or {})
    for k in pairs(flats[i]) do if not cset[k] then cset[k] = true; ckeys[#ckeys + 1] = k end end
    for k in pairs(r.summary or {}) do if not sset[k] then sset[k] = true; skeys[#skeys + 1] = k end end
  end
  table.sort(ckeys)
  table.sort(skeys)
  local head = { 'index', 'run_id', 'name', 'seed', 'status', 'duration_s' }
  for _, k in ipairs(ckeys) do head[#head + 1] = k end
  for _, k in ipairs(skeys) do head[#head + 1] = k end
  local rows = { table.concat(head, ',') }
  for i, r in ipairs(results) do
    local row = { r.index, r.run_id, csv_field(r.name), r.seed, r.status,
                  r.duration_s and ('%.3f'):format(r.duration_s) }
    for _, k in ipairs(ckeys) do row[#row + 1] = csv_field(value_text(flats[i][k])) end
    for _, k in ipairs(skeys) do row[#row + 1] = csv_field((r.summary or {})[k]) end
    for j = 1, #head do row[j] = row[j] == nil and '' or tostring(row[j]) end
    rows[#rows + 1] = table.concat(row, ',')
  end
  return groups, table.concat(lines, '\n') .. '\n', table.concat(rows, '\n') .. '\n'
end

-- Every trial's record from disk (status 'pending' where none), the ledger rebuilt, the summary written.
function M.collect(root, trials, metric, goal, write)
  local recs, results, failed = store.load(root), {}, 0
  for k, t in ipairs(trials) do
    local rec = recs[t.id]
    if rec then
      rec.index = k
    else
      rec = store.new_record(t, 'pending')
      rec.started_at = nil
    end
    if rec.status == 'failed' then failed = failed + 1 end
    results[k] = rec
  end
  local groups, md, csv = M.summarize(results, metric, goal)
  if write then
    store.rebuild_ledger(root, recs)
    store.write_atomic(root .. '/results.csv', csv)
    store.write_atomic(root .. '/summary.md', md)
  end
  return { results = results, groups = groups, markdown = md, csv = csv, failed = failed, dir = root }
end

function M.summarize_dir(root)
  root = root:gsub('/+$', '')
  local meta = store.read_meta(root)
  local trials = {}
  for k, t in ipairs(meta.trials or {}) do
    trials[k] = { id = t.run_id, index = k, name = t.name, seed = t.seed, dir = t.dir, config = t.config,
                  overrides = t.overrides }
  end
  return M.collect(root, trials, meta.metric, meta.goal, true)
end


return M
