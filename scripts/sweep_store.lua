-- sweep_store: a sweep's results on disk, safe when several processes write at once: one record per trial
-- written atomically (records/<run_id>.json), runs.jsonl rebuilt from them, sweep.json describing the trials.
--   <root>/records/<run_id>.json  the latest state of one trial: running, completed, pruned or failed
--   <root>/runs.jsonl             the merged ledger: one line per known trial, by trial index (rebuilt, atomic)
--   <root>/sweep.json             name, metric, goal and every trial, so that any process can summarize
-- An older runs.jsonl without records/ (appended by earlier versions) is still read, and kept in the rebuild.
local json = require 'json'
local files = require 'files'

local M = {}

M.q = require('util').q

M.read = files.read

-- The time now in UTC, as records show it: 2026-11-21T18:01:02Z.
function M.utc() return os.date('!%Y-%m-%dT%H:%M:%SZ') end

-- A trial's record with `status` (running, completed, pruned, failed or pending) started now.
function M.new_record(t, status)
  return { run_id = t.id, index = t.index, name = t.name, dir = t.dir, seed = t.seed, config = t.config,
           overrides = t.overrides, status = status, started_at = M.utc() }
end
function M.mkdir(d) files.mkdir(d, 'sweep') end
-- a reader sees the old text or the new, never half of it (files.write_atomic)
function M.write_atomic(path, text) files.write_atomic(path, text, 'sweep') end

local function decode(text)
  local ok, v = pcall(json.decode, text)
  return ok and type(v) == 'table' and v or nil
end

-- Last record per run_id in a runs.jsonl (a torn last line from a crash is ignored).
function M.read_ledger(path)
  local last, f = {}, io.open(path)
  if not f then return last end
  for line in f:lines() do
    local rec = decode(line)
    if rec and rec.run_id then last[rec.run_id] = rec end
  end
  f:close()
  return last
end

function M.record_path(root, id) return root .. '/records/' .. id .. '.json' end

local made = {}

function M.write_record(root, rec)
  if not made[root] then
    M.mkdir(root .. '/records')
    made[root] = true
  end
  M.write_atomic(M.record_path(root, rec.run_id), json.encode(rec) .. '\n')
end

-- The record of one trial, or nil when it has none (yet).
function M.read_record(root, id)
  local text = M.read(M.record_path(root, id))
  local rec = text and decode(text)
  return rec and rec.run_id == id and rec or nil
end

local function record_ids(root)
  local ids, p = {}, io.popen('ls -1 ' .. M.q(root .. '/records') .. ' 2>/dev/null')
  for name in p:lines() do
    local id = name:match('^(%x+)%.json$')
    if id then ids[#ids + 1] = id end
  end
  p:close()
  return ids
end

-- Every known record by run_id: the ledger's lines, overridden by the record files.
function M.load(root)
  local recs = M.read_ledger(root .. '/runs.jsonl')
  for _, id in ipairs(record_ids(root)) do recs[id] = M.read_record(root, id) or recs[id] end
  return recs
end

-- Rewrites runs.jsonl from the records (M.load's by default), one line per trial by index.
function M.rebuild_ledger(root, recs)
  local list = {}
  for _, rec in pairs(recs or M.load(root)) do list[#list + 1] = rec end
  table.sort(list, function(a, b)
    local ia, ib = tonumber(a.index) or math.huge, tonumber(b.index) or math.huge
    if ia ~= ib then return ia < ib end
    return a.run_id < b.run_id
  end)
  local lines = {}
  for i, rec in ipairs(list) do lines[i] = json.encode(rec) .. '\n' end
  M.write_atomic(root .. '/runs.jsonl', table.concat(lines))
end

function M.write_meta(root, meta) M.write_atomic(root .. '/sweep.json', json.encode(meta) .. '\n') end

function M.read_meta(root)
  local text = M.read(root .. '/sweep.json')
  if not text then
    error(('sweep.summarize: no sweep.json in %s: give the folder of one sweep (<out>/<name>), '
           .. 'which sweep.run creates'):format(root), 0)
  end
  return decode(text) or error(('sweep.summarize: %s/sweep.json is not valid JSON'):format(root), 0)
end

return M
