-- layerwise: the local MLP loss against a hand computation on hook-captured tensors, train_layer
-- touching layer i only and lowering its local loss, hooks removed after errors, bad options.
local torch = require 'torch'
local nn = require 'nn'
local quant = require 'quant'
local layerwise = require 'layerwise'

local CFG = {
  model_type = 'qwen3', vocab_size = 40, hidden_size = 32, intermediate_size = 48,
  num_hidden_layers = 3, num_attention_heads = 4, num_key_value_heads = 2, head_dim = 8,
  max_position_embeddings = 64, tie_word_embeddings = true, initializer_range = 0.2,
}

local function models()
  torch.manual_seed(0)
  local teacher = nn.from_config(CFG)
  teacher:eval()
  teacher:requires_grad_(false)
  local student = nn.from_config(CFG)
  student:load_state_dict(teacher:state_dict())
  quant.replace(student, {recipe = {default = {lut = 4, rank = 2}}})
  return teacher, student
end

local function batches(n, seed)
  torch.manual_seed(seed or 1)
  local r = {}
  for k = 1, n do r[k] = torch.randint(0, CFG.vocab_size, {2, 10}, {dtype = 'int64'}) end
  return r
end

local function err(f)
  local ok, e = pcall(f)
  assert.is_false(ok, 'expected an error')
  return tostring(e)
end

-- The loss by plain Lua loops in double precision over the given token rows (1-based (b, t) pairs).
local function hand_loss(x, y, W, rows)
  local H, I = x:size(3), W.gate:size(1)
  local xd, yd = x:double(), y:double()
  local g, u, d = W.gate:double(), W.up:double(), W.down:double()
  local yq, yf = {}, {}
  for n, bt in ipairs(rows) do
    local xv = {}
    for j = 1, H do xv[j] = xd[bt[1]][bt[2]][j]:item() end
    local a = {}
    for k = 1, I do
      local sg, su = 0, 0
      for j = 1, H do sg = sg + g[k][j]:item() * xv[j]; su = su + u[k][j]:item() * xv[j] end
      a[k] = sg / (1 + math.exp(-sg)) * su
    end
    yq[n], yf[n] = {}, {}
    for j = 1, H do
      local s = 0
      for k = 1, I do s = s + d[j][k]:item() * a[k] end
      yf[n][j] = s
      yq[n][j] = yd[bt[1]][bt[2]][j]:item()
    end
  end
  local function rmsrow(v)
    local s = 0
    for j = 1, #v do s = s + v[j] * v[j] end
    local r = 1 / math.sqrt(s / #v + 1e-6)
    local o = {}
    for j = 1, #v do o[j] = v[j] * r end
    return o
  end
  local m1, m2, m3, cnt = 0, 0, 0, 0
  for n = 1, #rows do
    local a, b = rmsrow(yq[n]), rmsrow(yf[n])
    for j = 1, H do
      m1 = m1 + (a[j] - b[j]) ^ 2
      m2 = m2 + (yq[n][j] - yf[n][j]) ^ 2
      m3 = m3 + yf[n][j] ^ 2
      cnt = cnt + 1
    end
  end
  return math.min(10, 0.8 * m1 / cnt + 0.2 * (m2 / cnt) / (m3 / cnt))
end

local function float_mlp(m, i)
  local p = 'model.layers.' .. i .. '.mlp.'
  return {gate = m:get_linear(p .. 'gate_proj'), up = m:get_linear(p .. 'up_proj'), down = m:get_linear(p .. 'down_proj')}
end

local function flags(m)
  local r = {}
  for _, kv in ipairs(m:named_parameters()) do r[kv[1]] = kv[2].requires_grad end
  return r
end

local function snapshot(m)
  local r = {}
  for k, v in pairs(m:state_dict()) do r[k] = v:clone() end
  return r
end

-- Counts the hooks registered and not removed, by wrapping the model's method (restored by the caller).
local function count_hooks()
  local methods = getmetatable(models()).__methods
  local orig = methods.register_forward_hook
  local live = {n = 0}
  methods.register_forward_hook = function(self, ...)
    local hd = orig(self, ...)
    live.n = live.n + 1
    return {remove = function()
      local r = hd:remove()
      if r then live.n = live.n - 1 end
      return r
    end}
  end
  return live, function() methods.register_forward_hook = orig end
end

describe('layerwise', function()
  it('L_local equals a hand computation on tensors captured by a hook', function()
    local teacher, student = models()
    local ids = batches(1)[1]
    local cap = {}
    local hk = student:register_forward_hook('model.layers.1.mlp', function(_, x, y) cap.x, cap.y = x, y end)
    torch.no_grad(function() student:forward(ids) end)
    hk:remove()
    local W = float_mlp(teacher, 1)
    local rows = {}
    for b = 1, 2 do for t = 1, 9 do rows[#rows + 1] = {b, t} end end        -- positions :-1
    local l = layerwise.local_loss(cap.x, cap.y, W, {tokens = 1000}):item()
    local want = hand_loss(cap.x, cap.y, W, rows)
    assert.is_true(want > 1e-4, 'the quantized MLP differs from the float one')
    assert.is_true(math.abs(l - want) <= 1e-5 * want, ('%g vs %g'):format(l, want))
    -- a mask keeps its valid tokens only; the last position never counts
    local mask = torch.zeros({2, 10}, {dtype = 'int64'})
    mask[1][3] = 1; mask[2][5] = 1; mask[2][10] = 1
    local lm = layerwise.local_loss(cap.x, cap.y, W, {tokens = 1000, mask = mask}):item()
    local wm = hand_loss(cap.x, cap.y, W, {{1, 3}, {2, 5}})
    assert.is_true(math.abs(lm - wm) <= 1e-5 * wm, ('%g vs %g'):format(lm, wm))
    -- sampling: `tokens` distinct rows; the same seed gives the same value
    local l3 = layerwise.local_loss(cap.x, cap.y, W, {tokens = 3}):item()
    assert.are.equal(l3, layerwise.local_loss(cap.x, cap.y, W, {tokens = 3}):item())
    -- the float MLP itself gives 0; a huge or non-finite output gives 10
    local yfp = torch.no_grad(function()
      local xf = cap.x:float()
      return (xf:matmul(W.gate:t()):silu() * xf:matmul(W.up:t())):matmul(W.down:t())
    end)
    assert.is_true(layerwise.local_loss(cap.x, yfp, W):item() < 1e-10)
    assert.are.equal(10, layerwise.local_loss(cap.x, yfp * 1e6, W):item())
    assert.are.equal(10, layerwise.local_loss(cap.x, yfp * (0 / 0), W):item())
  end)

  it('train_layer changes layer i only and lowers its local loss', function()
    local teacher, student = models()
    local before, fl = snapshot(student), flags(student)
    local seen = 0
    local r = layerwise.train_layer(student, 1, {teacher = teacher, data = batches(4), steps = 25, lr = 5e-3,
      grad_accum = 2, eval = function(m, i) seen = seen + 1; assert.are.equal(1, i); return m:loss(batches(1)[1]):item() end})
    assert.are.equal(2, seen)
    assert.is_true(r.after['local'] < r.before['local'] * 0.9,
      ('local %g -> %g'):format(r.before['local'], r.after['local']))
    assert.is_true(r.after.kd < r.before.kd, ('kd %g -> %g'):format(r.before.kd, r.after.kd))
    assert.is_number(r.before.metric)
    local changed = 0
    for k, v in pairs(student:state_dict()) do
      if k:find('^model%.layers%.1%.') and not v:equal(before[k]) then changed = changed + 1
      else assert.is_true(v:equal(before[k]), k .. ' changed') end
    end
    assert.is_true(changed > 0)
    -- every parameter's trainable flag is as before
    assert.are.same(fl, flags(student))
  end)

  it('mlp_only trains the MLP of layer i; local loss only and KD only both run', function()
    local teacher, student = models()
    local before = snapshot(student)
    layerwise.train_layer(student, 0, {teacher = teacher, data = batches(2), steps = 3, lr = 1e-3, mlp_only = true,
      global_w = 0, local_w = 1})
    for k, v in pairs(student:state_dict()) do
      if not k:find('^model%.layers%.0%.mlp%.') then assert.is_true(v:equal(before[k]), k .. ' changed') end
    end
    local r = layerwise.train_layer(student, 2, {teacher = teacher, data = batches(2), steps = 2, local_w = 0,
      global_w = 1})
    assert.is_number(r.before['local'])   -- still reported when it does not train
  end)

  it('takes KD cache-style batches (topk given) and the float weights from float_model', function()
    local teacher, student = models()
    local b = batches(2)
    local cache = {}
    for k, ids in ipairs(b) do
      local v, i = torch.no_grad(function() return teacher:forward(ids):topk(8) end)
      cache[k] = {input_ids = ids, topk_idx = i:int(), topk_logits = v:half()}
    end
    local pos = 0
    local reader = {next = function() pos = pos + 1; return cache[pos] end, reset = function() pos = 0 end}
    local r = layerwise.train_layer(student, 0, {float_model = teacher, data = reader, steps = 3, lr = 1e-3})
    assert.is_true(r.after.kd <= r.before.kd * 1.01)
  end)

  it('train_all: order, schedules and passes, a row per layer and pass', function()
    local teacher, student = models()
    local o = {teacher = teacher, data = batches(2), steps = 4, lr = 1e-3, schedule = 'grow', order = 'reverse',
               passes = 2, print = false}
    local rows = layerwise.train_all(student, o)
    assert.are.equal(6, #rows)
    assert.are.same({2, 1, 0, 2, 1, 0}, {rows[1].layer, rows[2].layer, rows[3].layer, rows[4].layer,
                                         rows[5].layer, rows[6].layer})
    assert.are.same({2, 4, 6}, {rows[1].steps, rows[2].steps, rows[3].steps})
    assert.are.equal(2, rows[4].pass)
    assert.is_truthy(layerwise.format(rows):find('| 2 | 0 | 6 |', 1, true))
    rows = layerwise.train_all(student, {teacher = teacher, data = batches(1), layers = {1}, print = false,
      schedule = function(k, n, i, pass) assert.are.same({1, 1, 1, 1}, {k, n, i, pass}); return 2 end})
    assert.are.equal(2, rows[1].steps)
  end)

  it('removes its hooks when a step, an eval or the data raises', function()
    local live, restore = count_hooks()
    local ok, e = pcall(function()
      local teacher, student = models()
      local fl = flags(student)
      local n = 0
      local msg = err(function()
        layerwise.train_layer(student, 1, {teacher = teacher, steps = 3, data = function(k)
          n = n + 1
          if n == 3 then error('data source broke at ' .. k) end
          return batches(1)[1]
        end})
      end)
      assert.is_truthy(msg:find('data source broke'), msg)
      assert.are.equal(0, live.n)
      msg = err(function()
        layerwise.train_layer(student, 1, {teacher = teacher, steps = 1, data = batches(1),
          eval = function() error('eval broke') end})
      end)
      assert.is_truthy(msg:find('eval broke'), msg)
      assert.are.equal(0, live.n)
      -- a hook raising inside the forward (here: the student's own) also leaves none of ours
      local bad = student:register_forward_hook('model.layers.2.mlp', function() error('forward broke') end)
      live.n = live.n - 1
      msg = err(function() layerwise.train_layer(student, 1, {teacher = teacher, steps = 1, data = batches(1)}) end)
      assert.is_truthy(msg:find('forward broke'), msg)
      assert.are.equal(0, live.n)
      bad:remove()
      -- and the parameters' trainable flags are back
      assert.are.same(fl, flags(student))
    end)
    restore()
    if not ok then error(e, 0) end
  end)

  it('bad options are errors naming the option (and the closest known one)', function()
    local teacher, student = models()
    local d = batches(1)
    assert.is_truthy(err(function() layerwise.train_layer(student, 0, {teacher = teacher, data = d, step = 3}) end)
      :find('unknown option "step" (did you mean "steps"?)', 1, true))
    assert.is_truthy(err(function() layerwise.train_layer(student, 0, {teacher = teacher, data = d, lcoal_w = 1}) end)
      :find('did you mean "local_w"', 1, true))
    assert.is_truthy(err(function() layerwise.train_layer(student, 0, {teacher = teacher, data = d, lr = '1e-3'}) end)
      :find('option "lr" must be a number, got string', 1, true))
    assert.is_truthy(err(function() layerwise.train_layer(student, 0, {teacher = teacher, data = d, steps = 1.5}) end)
      :find('option "steps" must be an integer', 1, true))
    assert.is_truthy(err(function() layerwise.train_layer(student, 3, {teacher = teacher, data = d}) end)
      :find('layer 3 out of range', 1, true))
    assert.is_truthy(err(function() layerwise.train_layer(student, 0, {teacher = teacher}) end)
      :find('option data: missing', 1, true))
    assert.is_truthy(err(function() layerwise.train_layer(student, 0, {data = d}) end)
      :find('option teacher or float_model', 1, true))
    assert.is_truthy(err(function() layerwise.train_layer(teacher, 0, {teacher = teacher, data = d}) end)
      :find('no quantized parameter', 1, true))
    assert.is_truthy(err(function() layerwise.train_all(student, {teacher = teacher, data = d, ordr = 'reverse'}) end)
      :find('did you mean "order"', 1, true))
    assert.is_truthy(err(function() layerwise.train_all(student, {teacher = teacher, data = d, schedule = 'up'}) end)
      :find("expected 'constant', 'grow', 'shrink'", 1, true))
  end)
end)
