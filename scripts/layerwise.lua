-- layerwise: layer-by-layer QAT of a quantized decoder (docs/quality.md): one decoder layer's quantized
-- scales train at a time on local_w·L_local (its MLP against a frozen float copy) + global_w·L_KD.
local torch = require 'torch'
local kd = require 'kd'
local optim = require 'optim'
local quant = require 'quant'
local qatlab = require 'qatlab'

local M = {}

-- options ---------------------------------------------------------------------------------------

-- Checks o against spec {key = 'type' | {'type', ...}} (opts.check, the toolkit's one options rule); unknown
-- keys name the closest known one.
function M.check_options(what, o, spec)
  if o == nil then return {} end
  return require('opts').check(o, spec, what, 4)
end

local LAYER_OPTS = {
  steps = 'integer', lr = 'number', data = {'function', 'table', 'userdata', 'tensor'},
  teacher = {'userdata', 'table'}, float_model = {'userdata', 'table'}, local_w = 'number',
  global_w = 'number', tokens = 'integer', mlp_only = 'boolean', grad_accum = 'integer',
  eval = 'function', eval_data = {'table', 'tensor'}, K = 'integer', kd = 'table', seed = 'integer',
  weight_decay = 'number', verbose = 'boolean',
}

local function defaults(o)
  local r = {steps = 20, lr = 2e-5, local_w = 0.5, global_w = 0.5, tokens = 128, mlp_only = false,
             grad_accum = 1, K = 32, kd = {T = 2}, seed = 0, weight_decay = 0, verbose = false}
  for k, v in pairs(o) do r[k] = v end
  return r
end

-- the local MLP loss ---------------------------------------------------------------------------

local function rms(z) return z * (z:square():mean(-1, {keepdim = true}) + 1e-6):rsqrt() end

-- A small xorshift generator, so that token sampling neither reads nor moves torch's global RNG.
local function sampler(seed)
  local s = (seed * 2654435761 + 12345) % 4294967296
  if s == 0 then s = 1 end
  return function(n)   -- uniform integer in [1, n]
    s = bit.bxor(s, bit.lshift(s, 13)); s = bit.bxor(s, bit.rshift(s, 17)); s = bit.bxor(s, bit.lshift(s, 5))
    return (s % n + n) % n + 1
  end
end

-- The seed's local MLP reconstruction loss (docs/quality.md). x (B, T, H) and yq (B, T, H) are the
-- MLP's input and output captured by a hook; W = {gate=, up=, down=} the frozen float weights.
-- Positions :-1 only, tokens with mask ~= 0 only, at most o.tokens of them (sampled by o.rand).
function M.local_loss(x, yq, W, o)
  o = o or {}
  local B, T, H = x:size(1), x:size(2), x:size(3)
  local xs = x:narrow(2, 1, T - 1):reshape({B * (T - 1), H})                       -- (N, H)
  local ys = yq:narrow(2, 1, T - 1):reshape({B * (T - 1), H})                      -- (N, H)
  local valid = {}
  if o.mask then
    local m = o.mask:narrow(2, 1, T - 1):reshape({-1}):totable()
    for k, v in ipairs(m) do if v ~= 0 then valid[#valid + 1] = k - 1 end end
  else
    for k = 1, B * (T - 1) do valid[k] = k - 1 end
  end
  if #valid == 0 then return torch.zeros({}) end
  local n = math.min(o.tokens or 128, #valid)
  if n < #valid then   -- partial Fisher-Yates: n distinct tokens
    local rand = o.rand or sampler(0)
    for k = 1, n do
      local j = k - 1 + rand(#valid - k + 1)
      valid[k], valid[j] = valid[j], valid[k]
    end
    for k = #valid, n + 1, -1 do valid[k] = nil end
  end
  local idx = torch.tensor(valid, {dtype = 'int64', device = x.device})
  xs, ys = xs:index_select(1, idx), ys:index_select(1, idx)
  local yfp = torch.no_grad(function()
    local xf = xs:detach():float()
    return (xf:matmul(W.gate:float():t()):silu() * xf:matmul(W.up:float():t())):matmul(W.down:float():t())
  end)                                                                              -- (n, H)
  local yf = ys:float()
  local l = (rms(yf) - rms(yfp)):square():mean() * 0.8
          + (yf - yfp):square():mean() / yfp:square():mean() * 0.2
  local v = l:item()
  if v ~= v or v == math.huge or v == -math.huge then return torch.tensor(10.0) end
  return l:clamp{max = 10}
end

-- batches ---------------------------------------------------------------------------------------

-- A function k -> batch over the source: a function, an array of batches (cycled), a KD cache reader
-- (next/reset) or one tensor. A batch is an ids tensor (B, T) or a table {input_ids=, topk_*=, ...}.
local function batch_source(src)
  if type(src) == 'function' then return src end
  if torch.is_tensor(src) then return function() return src end end
  if type(src) == 'table' and #src > 0 then return function(k) return src[(k - 1) % #src + 1] end end
  local ok, nx = pcall(function() return src.next end)
  if ok and nx then
    return function()
      local b = src:next()
      if b == nil and src.reset then src:reset(); b = src:next() end
      if b == nil then error('layerwise: the batch reader gave no batch', 0) end
      return b
    end
  end
  error('layerwise: option data: expected a function, an array of batches, a tensor or a reader with next()', 3)
end

-- A KD batch table for kd.loss_model: cache batches pass through; ids get the teacher's top-K.
local function kd_batch(b, teacher, K)
  if torch.is_tensor(b) then b = {input_ids = b} end
  if type(b) ~= 'table' or not torch.is_tensor(b.input_ids) then
    error('layerwise: a batch must be an ids tensor (B, T) or a table with input_ids', 0)
  end
  if b.topk_idx then return b end
  if not teacher then error('layerwise: batches without topk_idx need an online teacher (option teacher)', 0) end
  local logits = torch.no_grad(function()
    return teacher:forward(b.input_ids, b.attention_mask and {attention_mask = b.attention_mask} or nil)
  end)                                                                              -- (B, T, V)
  local vals, idx = logits:float():topk(K)
  local r = {topk_idx = idx:int(), topk_logits = vals}
  for k, v in pairs(b) do r[k] = v end
  return r
end

-- training one layer ----------------------------------------------------------------------------

local function float_mlp(ref, i)
  local p = 'model.layers.' .. i .. '.mlp.'
  local ok, g = pcall(ref.get_linear, ref, p .. 'gate_proj')
  if not ok then error(('layerwise: layer %d: the local loss needs a gated MLP (gate_proj): %s'):format(i, g), 0) end
  -- a frozen copy taken at layer start
  return {gate = g:detach():clone(), up = ref:get_linear(p .. 'up_proj'):detach():clone(),
          down = ref:get_linear(p .. 'down_proj'):detach():clone()}
end

-- Runs fn with a hook on layer i's MLP capturing (x, y); the hook goes, whatever fn does.
local function with_capture(student, i, fn)
  local cap = {}
  local hk = student:register_forward_hook('model.layers.' .. i .. '.mlp', function(_, x, y)
    if not student:is_recomputing() then cap.x, cap.y = x, y end
  end)
  local res = {pcall(fn, cap)}
  hk:remove()
  if not res[1] then error(res[2], 0) end
  return unpack(res, 2)
end

-- {local=, kd=} on the evaluation batches (all valid tokens), no gradients.
local function measure(student, i, W, batches, o)
  return with_capture(student, i, function(cap)
    return torch.no_grad(function()
      local lsum, ksum = 0, 0
      for _, b in ipairs(batches) do
        local kb = kd_batch(b, o.teacher, o.K)
        ksum = ksum + kd.loss_model(student, kb, o.kd):item()
        if W then
          lsum = lsum + M.local_loss(cap.x, cap.y, W, {tokens = math.huge, mask = kb.attention_mask}):item()
        end
      end
      return {['local'] = W and lsum / #batches or nil, kd = ksum / #batches}
    end)
  end)
end

-- Parameters of layer i that train, after quant.set_trainable (others frozen); returns them and a
-- function restoring every parameter's previous requires_grad.
local function freeze_except(student, i, mlp_only)
  local before = {}
  for _, kv in ipairs(student:named_parameters()) do before[#before + 1] = {kv[2], kv[2].requires_grad} end
  quant.set_trainable(student, mlp_only and 'mlp' or 'all')
  student:requires_grad_(false, '^(?!model\\.layers\\.' .. i .. '\\.)')
  local params, names = {}, {}
  for _, kv in ipairs(student:named_parameters()) do
    if kv[2].requires_grad then params[#params + 1] = kv[2]; names[#names + 1] = kv[1] end
  end
  return params, names, function()
    for _, e in ipairs(before) do e[1]:requires_grad_(e[2]) end
  end
end

-- layerwise.train_layer(student, i, o) -> {layer=, before={local=, kd=, metric=}, after=..., steps=, seconds=}
-- i is the 0-based decoder layer index (as in the module names).
function M.train_layer(student, i, o)
  o = defaults(M.check_options('layerwise.train_layer', o, LAYER_OPTS))
  if type(i) ~= 'number' or i % 1 ~= 0 then
    error('layerwise.train_layer: argument #2 (i): expected a layer index', 2)
  end
  local nl = student.config.num_hidden_layers
  if i < 0 or i >= nl then
    error(('layerwise.train_layer: layer %d out of range (the model has layers 0..%d)'):format(i, nl - 1), 2)
  end
  if o.data == nil then error('layerwise.train_layer: option data: missing (the batch source)', 2) end
  for _, k in ipairs({'steps', 'grad_accum', 'tokens', 'K'}) do
    if o[k] < 1 then error(('layerwise.train_layer: option %q: expected >= 1, got %d'):format(k, o[k]), 2) end
  end
  if o.local_w < 0 or o.global_w < 0 or o.local_w + o.global_w == 0 then
    error('layerwise.train_layer: options local_w and global_w: expected >= 0, not both 0', 2)
  end
  local ref = o.float_model or o.teacher
  if o.local_w > 0 and not ref then
    error('layerwise.train_layer: the local loss needs the float weights: option teacher or float_model', 2)
  end
  local W = ref and float_mlp(ref, i)
  local next_batch = batch_source(o.data)
  local eval_data = o.eval_data or {next_batch(0)}
  if torch.is_tensor(eval_data) or eval_data.input_ids then eval_data = {eval_data} end
  local rand = sampler(o.seed + i)

  local params, _, restore = freeze_except(student, i, o.mlp_only)
  if #params == 0 then
    restore()
    error(('layerwise.train_layer: layer %d has no quantized parameter to train (quant.replace first)'):format(i), 2)
  end
  local was_training = student.training
  local ok, res = pcall(function()
    student:eval()
    local before = measure(student, i, W, eval_data, o)
    if o.eval then before.metric = o.eval(student, i) end
    student:train()
    local opt = optim.AdamW({{params = params}}, {lr = o.lr, weight_decay = o.weight_decay})
    local t0, k, last = qatlab.time(), 0, nil
    for step = 1, o.steps do
      opt:zero_grad()
      local lsum, ksum = 0, 0
      for _ = 1, o.grad_accum do
        k = k + 1
        local kb = kd_batch(next_batch(k), o.teacher, o.K)
        with_capture(student, i, function(cap)
          local loss, lk, ll = nil, nil, nil
          if o.global_w > 0 then
            lk = kd.loss_model(student, kb, o.kd)
            loss = lk * o.global_w
          else
            student:forward(kb.input_ids, kb.attention_mask and {attention_mask = kb.attention_mask} or nil)
          end
          if o.local_w > 0 then
            if not cap.x then error('layerwise: the hook on model.layers.' .. i .. '.mlp captured nothing', 0) end
            ll = M.local_loss(cap.x, cap.y, W, {tokens = o.tokens, mask = kb.attention_mask, rand = rand})
            loss = loss and loss + ll * o.local_w or ll * o.local_w
          end
          (loss / o.grad_accum):backward()
          lsum = lsum + (ll and ll:item() or 0)
          ksum = ksum + (lk and lk:item() or 0)
        end)
      end
      opt:step()
      last = {['local'] = lsum / o.grad_accum, kd = ksum / o.grad_accum}
      if o.verbose then
        print(('layer %d step %d/%d: local %.5f kd %.5f'):format(i, step, o.steps, last['local'], last.kd))
      end
    end
    opt:zero_grad()
    local seconds = qatlab.time() - t0
    student:eval()
    local after = measure(student, i, W, eval_data, o)
    if o.eval then after.metric = o.eval(student, i) end
    return {layer = i, before = before, after = after, steps = o.steps, seconds = seconds, last = last,
            params = #params}
  end)
  restore()
  if was_training then student:train() else student:eval() end
  if not ok then error(res, 0) end
  return res
end

-- train_all -------------------------------------------------------------------------------------

local ALL_OPTS = {layers = 'table', order = 'string', schedule = {'string', 'function'}, passes = 'integer',
                  pass_lr_scale = 'number', print = 'boolean'}
for k, v in pairs(LAYER_OPTS) do ALL_OPTS[k] = v end

-- Steps for the k-th of n layers trained: constant, growing (0.5x..1.5x), shrinking (1.5x..0.5x), or fn.
local function steps_for(schedule, steps, k, n, i, pass)
  if type(schedule) == 'function' then
    local s = schedule(k, n, i, pass)
    if type(s) ~= 'number' or s < 1 or s % 1 ~= 0 then
      error(('layerwise.train_all: schedule(%d, %d, %d, %d): expected a positive integer, got %s')
        :format(k, n, i, pass, tostring(s)), 0)
    end
    return s
  end
  local f = n > 1 and (k - 1) / (n - 1) or 0.5
  if schedule == 'grow' then f = 0.5 + f elseif schedule == 'shrink' then f = 1.5 - f else f = 1 end
  return math.max(1, math.floor(steps * f + 0.5))
end

local function fmt(v) return v and ('%.5f'):format(v) or '' end

-- The per-layer table (markdown).
function M.format(rows)
  local out = {'| pass | layer | steps | local before | local after | KD before | KD after | metric before '
               .. '| metric after | s |', '|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|'}
  for _, r in ipairs(rows) do
    out[#out + 1] = ('| %d | %d | %d | %s | %s | %s | %s | %s | %s | %.1f |'):format(r.pass, r.layer, r.steps,
      fmt(r.before['local']), fmt(r.after['local']), fmt(r.before.kd), fmt(r.after.kd),
      fmt(r.before.metric), fmt(r.after.metric), r.seconds)
  end
  return table.concat(out, '\n')
end

-- layerwise.train_all(student, o) -> rows (one per layer and pass), printed as a markdown table.
-- o: the train_layer options plus layers (0-based indices), order ('forward' | 'reverse'),
-- schedule ('constant' | 'grow' | 'shrink' | fn(k, n, i, pass) -> steps), passes, pass_lr_scale, print.
function M.train_all(student, o)
  o = M.check_options('layerwise.train_all', o, ALL_OPTS)
  local layers = o.layers
  if not layers then
    layers = {}
    for i = 0, student.config.num_hidden_layers - 1 do layers[#layers + 1] = i end
  end
  local order = o.order or 'forward'
  if order ~= 'forward' and order ~= 'reverse' then
    error(("layerwise.train_all: option order: expected 'forward' or 'reverse', got %q"):format(order), 2)
  end
  local schedule = o.schedule or 'constant'
  if type(schedule) == 'string' and schedule ~= 'constant' and schedule ~= 'grow' and schedule ~= 'shrink' then
    error(("layerwise.train_all: option schedule: expected 'constant', 'grow', 'shrink' or a function, got %q")
      :format(schedule), 2)
  end
  local seq = {}
  for k = 1, #layers do seq[k] = order == 'forward' and layers[k] or layers[#layers - k + 1] end
  local passes, scale = o.passes or 1, o.pass_lr_scale or 0.5
  local base = defaults({})
  local lo = {}
  for k, v in pairs(o) do if LAYER_OPTS[k] then lo[k] = v end end
  local rows = {}
  for pass = 1, passes do
    for k, i in ipairs(seq) do
      lo.steps = steps_for(schedule, o.steps or base.steps, k, #seq, i, pass)
      lo.lr = (o.lr or base.lr) * scale ^ (pass - 1)
      local r = M.train_layer(student, i, lo)
      r.pass = pass
      rows[#rows + 1] = r
      if o.verbose then print(M.format({r})) end
    end
  end
  if o.print ~= false then print(M.format(rows)) end
  return rows
end

return M
