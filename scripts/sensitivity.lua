-- sensitivity: per-layer quantization sensitivity (the loss increase when only one projection is
-- quantized) and a greedy bit-budget allocator over it, returning a quant.replace recipe (docs/quality.md).
-- Called as quant.sensitivity and quant.allocate_bits (the quant module requires this file on first use).
local torch = require 'torch'
local nn = require 'nn'
local quant = require 'quant'
local qatlab = require 'qatlab'
local layerwise = require 'layerwise'
local F = require 'torch.nn.functional'

local M = {}

local MEASURE_OPTS = {candidates = 'table', metric = 'string', layers = 'string', replace = 'table',
                      check = 'boolean', verbose = 'boolean'}
local ALLOCATE_OPTS = {budget = 'number'}
local CONFIG_KEYS = {lut = true, rank = true, group_size = true, include_zero = true, kmeans = true}

local function is_projection(name)
  return name:find('%.mlp%.[%w_]+_proj$') ~= nil or name:find('%.self_attn%.[qkvo]_proj$') ~= nil
end

-- A Lua pattern matching exactly `name`.
local function exact(name) return '^' .. name:gsub('[%^%$%(%)%%%.%[%]%*%+%-%?]', '%%%0') .. '$' end

local function copy(t)
  local r = {}
  for k, v in pairs(t) do r[k] = v end
  return r
end

-- The metric on every batch: 'kl' = mean KL(float || model) per position over the full vocabulary,
-- against the cached float log-probabilities; 'ppl' = mean next-token cross-entropy (log perplexity).
-- With `from` (a 0-based layer) and `hidden` (each batch's input to that layer), only the layers from
-- there on run: a projection of layer i changes nothing before it.
local function evaluate(m, batches, metric, ref, from, hidden)
  return torch.no_grad(function()
    local sum, n = 0, 0
    for k, ids in ipairs(batches) do
      local logits = from and m:forward_from(from, hidden[k][from]) or m:forward(ids)   -- (B, T, V)
      local tok
      if metric == 'kl' then
        local q = logits:float():log_softmax(3)
        local p = ref[k]
        tok = ids:size(1) * ids:size(2)
        sum = sum + (p:exp() * (p - q)):sum(3):mean():item() * tok
      else
        tok = ids:size(1) * (ids:size(2) - 1)
        local V = logits:size(3)
        local lp = logits:narrow(2, 1, ids:size(2) - 1):float():reshape(tok, V)
        sum = sum + F.cross_entropy(lp, ids:narrow(2, 2, ids:size(2) - 1):reshape(tok)):item() * tok
      end
      n = n + tok
    end
    return sum / n
  end)
end

-- quant.sensitivity(model, batches, {candidates = {{lut=4, rank=8}, ...}, metric = 'kl' | 'ppl',
--   layers = pattern, replace = {quant.replace options but recipe}, check = false, verbose = false})
-- -> {metric=, base=, layers = {{name=, weights=, candidates = {{config=, bits=, loss=, delta=}, ...}}, ...}}
-- The model must be float; it is only read: each projection is quantized in a working copy, measured,
-- and put back there as an nn.Linear holding the saved float weight (check = true verifies, after
-- every restore, that the copy's logits equal the float model's bit for bit).
function M.measure(model, batches, o)
  o = layerwise.check_options('quant.sensitivity', o, MEASURE_OPTS)
  local cands, metric = o.candidates, o.metric or 'kl'
  if not cands or #cands == 0 then
    error('quant.sensitivity: option candidates: expected a non-empty array of configs', 2)
  end
  for k, c in ipairs(cands) do
    if type(c) ~= 'table' then error(('quant.sensitivity: candidates[%d]: expected a config table'):format(k), 2) end
    for key in pairs(c) do
      if not CONFIG_KEYS[key] then
        error(('quant.sensitivity: candidates[%d]: unknown key %q (expected lut, rank, group_size, '
               .. 'include_zero, kmeans)'):format(k, tostring(key)), 2)
      end
    end
  end
  if metric ~= 'kl' and metric ~= 'ppl' then
    error(("quant.sensitivity: option metric: expected 'kl' or 'ppl', got %q"):format(metric), 2)
  end
  if o.replace and o.replace.recipe then
    error('quant.sensitivity: option replace: no recipe (each layer gets its own)', 2)
  end
  if torch.is_tensor(batches) then batches = {batches} end
  if type(batches) ~= 'table' or #batches == 0 then
    error('quant.sensitivity: argument #2 (batches): expected an array of ids tensors (B, T)', 2)
  end
  if #quant.layers(model) > 0 then
    error('quant.sensitivity: the model has quantized layers; pass the float model', 2)
  end
  local names = {}
  for _, n in ipairs(model:linear_names()) do
    if is_projection(n) and (not o.layers or n:find(o.layers)) then names[#names + 1] = n end
  end
  if #names == 0 then
    error(('quant.sensitivity: option layers: pattern %q matches no projection'):format(tostring(o.layers)), 2)
  end
  local t0 = qatlab.time()
  local was_training = model.training
  model:eval()
  -- the float reference, cached once
  local ref, first = {}, nil
  torch.no_grad(function()
    for k, ids in ipairs(batches) do
      if metric == 'kl' or (o.check and k == 1) then
        local logits = model:forward(ids)                                            -- (B, T, V)
        if k == 1 and o.check then first = logits:clone() end
        if metric == 'kl' then ref[k] = logits:float():log_softmax(3) end
      end
    end
  end)
  local base = metric == 'kl' and 0 or evaluate(model, batches, metric, ref)
  -- every decoder layer's input per batch (hidden[k][i], 0-based i), captured once by pre-hooks
  local hidden = {}
  torch.no_grad(function()
    for k, ids in ipairs(batches) do
      hidden[k] = {}
      local h = model:register_forward_pre_hook('^model%.layers%.%d+$', function(name, x)
        hidden[k][tonumber(name:match('%d+$'))] = x:detach():clone()
      end)
      local ok, err = pcall(model.forward, model, ids)
      h:remove()
      if not ok then error(err, 0) end
    end
  end)
  if was_training then model:train() end
  -- the working copy
  local place = model:named_parameters()[1][2]
  local work = nn.from_config(model.config, {device = tostring(place.device)})
  local sd = model:state_dict()
  work:load_state_dict(sd)
  work:eval()
  work:requires_grad_(false)
  local rows = {}
  for li, name in ipairs(names) do
    local W = work:get_linear(name):detach():clone()                                -- (out, in)
    local b = sd[name .. '.bias']
    local row = {name = name, weights = W:size(1) * W:size(2), out_features = W:size(1),
                 in_features = W:size(2), candidates = {}}
    for k, c in ipairs(cands) do
      local ro = copy(o.replace or {})
      ro.recipe = {{exact(name), c}}
      quant.replace(work, ro)
      local bits
      for _, l in ipairs(quant.layers(work)) do if l.name == name then bits = l.bits_per_weight end end
      local loss = evaluate(work, batches, metric, ref, tonumber(name:match('^model%.layers%.(%d+)%.')), hidden)
      row.candidates[k] = {config = c, bits = bits, loss = loss, delta = loss - base}
      work:set_linear(name, nn.Linear.from_weight(W:clone(), b and b:detach():clone() or nil))
      if o.check then
        local y = torch.no_grad(function() return work:forward(batches[1]) end)
        if not y:equal(first) then
          error(('quant.sensitivity: restoring %s did not give the float logits back'):format(name), 0)
        end
      end
      if o.verbose then
        print(('[%d/%d] %s %s: %.3f bits/weight, %s %+.5f'):format(li, #names, name, M.config_string(c), bits,
          metric, loss - base))
      end
    end
    rows[li] = row
  end
  work = nil   -- luacheck: ignore 311
  collectgarbage()
  return {metric = metric, base = base, layers = rows, candidates = cands, seconds = qatlab.time() - t0}
end

function M.config_string(c)
  local keys, parts = {}, {}
  for k in pairs(c) do keys[#keys + 1] = k end
  table.sort(keys)
  for _, k in ipairs(keys) do parts[#parts + 1] = k .. '=' .. tostring(c[k]) end
  return '{' .. table.concat(parts, ', ') .. '}'
end

-- The measured table (markdown): one row per layer, bits/weight and loss increase per candidate.
function M.format(t)
  local head, sep = {'| layer |'}, {'|---|'}
  for _, c in ipairs(t.candidates) do
    head[#head + 1] = (' %s bits | Δ%s |'):format(M.config_string(c), t.metric)
    sep[#sep + 1] = '---:|---:|'
  end
  local out = {table.concat(head), table.concat(sep)}
  for _, r in ipairs(t.layers) do
    local cells = {'| ' .. r.name .. ' |'}
    for _, c in ipairs(r.candidates) do cells[#cells + 1] = (' %.3f | %.5f |'):format(c.bits, c.delta) end
    out[#out + 1] = table.concat(cells)
  end
  return table.concat(out, '\n')
end

-- quant.allocate_bits(t, {budget = bits_per_weight}) -> recipe, {bits_per_weight=, delta=, choice = {name -> k}}
-- Greedy: every layer starts at its cheapest candidate; then, while it fits the budget, the upgrade
-- (any dearer candidate of one layer) with the largest loss saved per extra bit is taken. The recipe
-- (an array of {exact pattern, config}) quantizes exactly the measured layers; bits_per_weight is what
-- quant.bits_per_weight(model).quantized reports after quant.replace{recipe = recipe}.
function M.allocate(t, o)
  o = layerwise.check_options('quant.allocate_bits', o, ALLOCATE_OPTS)
  if type(t) ~= 'table' or type(t.layers) ~= 'table' or #t.layers == 0 then
    error('quant.allocate_bits: argument #1: expected the table of quant.sensitivity', 2)
  end
  if not o.budget or o.budget <= 0 then
    error('quant.allocate_bits: option budget: expected bits per weight > 0', 2)
  end
  local total_w, choice, bits = 0, {}, 0
  for li, r in ipairs(t.layers) do
    local best
    for k, c in ipairs(r.candidates) do
      local b = r.candidates[best or k]
      if not best or c.bits < b.bits or (c.bits == b.bits and c.delta < b.delta) then best = k end
    end
    choice[li] = best
    total_w = total_w + r.weights
    bits = bits + r.weights * r.candidates[best].bits
  end
  local limit = o.budget * total_w * (1 + 1e-12)
  if bits > limit then
    error(('quant.allocate_bits: budget %.4f bits/weight is below the cheapest recipe (%.4f)')
      :format(o.budget, bits / total_w), 2)
  end
  while true do
    local best_gain, bl, bk = 0, nil, nil
    for li, r in ipairs(t.layers) do
      local cur = r.candidates[choice[li]]
      for k, c in ipairs(r.candidates) do
        local extra = (c.bits - cur.bits) * r.weights
        if extra > 0 and bits + extra <= limit then
          local gain = (cur.delta - c.delta) / extra
          if gain > best_gain then best_gain, bl, bk = gain, li, k end
        end
      end
    end
    if not bl then break end
    local r = t.layers[bl]
    bits = bits + (r.candidates[bk].bits - r.candidates[choice[bl]].bits) * r.weights
    choice[bl] = bk
  end
  local recipe, named, qbits, delta = {}, {}, 0, 0
  for li, r in ipairs(t.layers) do
    local c = r.candidates[choice[li]]
    recipe[li] = {exact(r.name), copy(c.config)}
    named[r.name] = choice[li]
    qbits = qbits + r.weights * c.bits
    delta = delta + c.delta
  end
  return recipe, {bits_per_weight = qbits / total_w, delta = delta, choice = named}
end

return M
