-- bench_train_spec: experiments/bench_train.lua runs at tiny size (every impl when Python has torch), the fast
-- step (materialized W_eff, fused KD, checkpointing; scripts/bench_step.lua) matches the plain one, and both match
-- the seed reference and the strong PyTorch reference (experiments/seed_ref/strong_step.py) from the same weights;
-- max-batch mode (max_batch_mb) finds a consistent max batch per impl; the fast path in bf16 stays within bf16
-- tolerance of the plain fp32 path (CPU always, CUDA when present; CPU measured 2.7e-4 relative at step 3).
local torch = require 'torch'
local json = require 'json'
local h = require 'helper'

local SCRIPT = h.source_dir .. '/experiments/bench_train.lua'
local REF = h.source_dir .. '/experiments/seed_ref/anemll_step.py'
local STRONG = h.source_dir .. '/experiments/seed_ref/strong_step.py'
local lib = require 'bench_step'

-- Tiny Qwen3 shape: MLP rank 32 (LUT4) and attention rank 8 (LUT16) as in Q2A4.
local D = {layers = 2, hidden = 64, inter = 192, heads = 4, kv_heads = 2, head_dim = 16, vocab = 512}
local L, B, K, STEPS, LR = 16, 2, 8, 3, 1e-3
-- fp32 tolerances: losses agree to rounding (measured ≤ 1e-7 relative), parameters after 3 AdamW
-- steps at lr 1e-3 to a few 1e-6 (Adam's m/√v amplifies rounding only where a gradient is ~0).
local LOSS_RTOL, PARAM_ATOL = 1e-5, 2e-5

local function finite(x) return type(x) == 'number' and x == x and x ~= math.huge and x ~= -math.huge end

local function has_torch()
  local rc = h.sh(h.q(h.python) .. ' -c "import torch, safetensors" >/dev/null 2>&1')
  return rc == 0
end

local function trainable(m)
  local ps = {}
  for _, kv in ipairs(m:named_parameters()) do
    if kv[2].requires_grad then ps[kv[1]] = kv[2]:detach():clone() end
  end
  return ps
end

local function max_diff(a, b)
  local worst, n = 0, 0
  for k, v in pairs(a) do
    assert(b[k], 'missing parameter ' .. k)
    worst = math.max(worst, (v:double() - b[k]:double()):abs():max():item())
    n = n + 1
  end
  return worst, n
end

describe('bench_train', function()
  local dir = h.tmpdir()
  torch.manual_seed(0)
  local init = lib.build_model(D, L, {}):state_dict()
  local batch = lib.synthetic_batch(D, B, L, K)

  -- STEPS steps from the shared init on the same batch; returns the losses and trainable params.
  -- o.device / o.dtype place the model (the batch follows the device).
  local function train(o)
    local m = lib.build_model(D, L, o)
    m:load_state_dict(init)
    local b = batch
    if o.device then
      b = {}
      for k, v in pairs(batch) do b[k] = v:to{device = o.device} end
    end
    local step = lib.make_step(m, b, {lr = LR, fused = o.fused})
    local losses = {}
    for i = 1, STEPS do losses[i] = step() end
    return losses, trainable(m)
  end
  local fast_losses, fast_params = train{form = 'materialized', fused = true, ckpt = true}

  it('runs end to end at tiny size and writes results.json / results.csv', function()
    local sets = {}
    for k, v in pairs(D) do sets[#sets + 1] = ('--set %s=%d'):format(k, v) end
    local out = dir .. '/run'
    -- every impl but strong-compiled (torch.compile takes minutes on a loaded CPU)
    local rc, text, err = h.sh(('%s run --device cpu %s %s --set L=16 --set batches=2 --set K=8 '
      .. '--set warmup=0 --set steps=1 --set impls=qatlab,strong,seed-ref --out %s'):format(h.q(h.bin), h.q(SCRIPT),
      table.concat(sets, ' '), h.q(out)))
    assert.are.equal(0, rc, text .. '\n' .. err)
    assert.truthy(text:find('| impl | L | batch | step (s) | tokens/s |', 1, true), text)
    assert.truthy(text:find('FLOPs/step: F = ', 1, true))
    local f = assert(io.open(out .. '/results.json'))
    local res = json.decode(f:read('*a'))
    f:close()
    assert.truthy(io.open(out .. '/results.csv'))
    local seen = {}
    for _, r in ipairs(res.rows) do
      assert.are.equal('OK', r.status, json.encode(r))
      for _, k in ipairs({'step_s', 'tokens_s', 'peak_bytes', 'flops', 'mfu', 'loss'}) do
        assert.is_true(finite(r[k]) and r[k] > 0, ('%s %s = %s'):format(r.impl, k, tostring(r[k])))
      end
      seen[r.impl] = r
    end
    assert.truthy(seen.qatlab)
    if has_torch() then
      assert.truthy(seen['seed-ref'], 'Python has torch but no seed-ref row:\n' .. text)
      assert.truthy(seen.strong, 'Python has torch but no strong row:\n' .. text)
      assert.is_true(finite(seen.qatlab.speedup) and seen.qatlab.speedup > 0)
      assert.is_true(finite(seen.qatlab.speedup_strong) and seen.qatlab.speedup_strong > 0)
      -- init = 'file' at this size: every impl started from the same weights and batch
      assert.are.equal('file', res.init)
      for _, impl in ipairs({'strong', 'seed-ref'}) do
        assert.is_true(seen[impl].loss1_rel <= LOSS_RTOL, ('%s step-1 loss %.9g vs qatlab %.9g'):format(impl,
          seen[impl].loss1, seen.qatlab.losses[1]))
      end
      assert.truthy(text:find('step-1 losses (same weights and batch in every impl)', 1, true), text)
    else
      assert.truthy(text:find('Showing qatlab rows only', 1, true))
    end
  end)

  it('counts the FLOPs of the stated formula', function()
    local F, parts = lib.train_flops(D, B, L, K, 'q2a4')
    local H, q, kv, I = 64, 64, 32, 192
    local n_mm = 2 * (H * q + 2 * H * kv + q * H + 3 * H * I)
    assert.are.equal(n_mm, parts.n_mm)
    local want = B * L * (6 * n_mm + 12 * 2 * L * q) + B * (L - 1) * 4 * H * (512 + K)
      + 6 * 2 * (8 * (H * q + 2 * H * kv + q * H) + 32 * 3 * H * I)
    assert.are.equal(want, F)
  end)

  it('the fast step (materialized, fused KD, checkpointing) matches the plain one within fp32 tolerance', function()
    -- plain: the seed's forms (batched MLP, per-rank loop attention), unfused KD, no checkpointing
    local losses, params = train{form = 'seed', fused = false, ckpt = false}
    for i = 1, STEPS do
      assert.is_true(math.abs(fast_losses[i] - losses[i]) <= LOSS_RTOL * math.abs(losses[i]),
        ('step %d: fast %.9g vs plain %.9g'):format(i, fast_losses[i], losses[i]))
    end
    assert.is_true(fast_losses[STEPS] < fast_losses[1], 'the loss should fall')
    local worst, n = max_diff(fast_params, params)
    assert.are.equal(2 * 7 * 3, n)   -- A, B, g of 7 projections x 2 layers
    assert.is_true(worst <= PARAM_ATOL, 'parameters differ by ' .. worst)
    -- each fast path on its own
    for _, o in ipairs({{form = 'loop', fused = true, ckpt = true}, {form = 'materialized', fused = false, ckpt = true},
                        {form = 'materialized', fused = true, ckpt = false}}) do
      local l2 = train(o)
      assert.is_true(math.abs(fast_losses[STEPS] - l2[STEPS]) <= LOSS_RTOL * math.abs(l2[STEPS]), json.encode(o))
    end
  end)

  -- The fast path in bf16 (parameters bf16, fp32 masters in AdamW) against the plain path in fp32 on
  -- the same device: each step's loss within bf16 tolerance (2 % relative; 8 mantissa bits through
  -- 2 layers, the fused loss and 3 updates), and the loss falls in both.
  local BF16_RTOL = 2e-2
  local function bf16_matches_fp32(device)
    local plain = train{form = 'seed', fused = false, ckpt = false, device = device}
    local fast = train{form = 'materialized', fused = true, ckpt = true, device = device, dtype = 'bfloat16'}
    for i = 1, STEPS do
      assert.is_true(finite(fast[i]), ('step %d: bf16 loss %s'):format(i, tostring(fast[i])))
      assert.is_true(math.abs(fast[i] - plain[i]) <= BF16_RTOL * math.abs(plain[i]),
        ('%s step %d: fast bf16 %.6g vs plain fp32 %.6g'):format(device, i, fast[i], plain[i]))
    end
    assert.is_true(fast[STEPS] < fast[1] and plain[STEPS] < plain[1], 'the loss should fall in both')
  end

  it('the fast step in bf16 matches the plain fp32 step within bf16 tolerance (CPU)', function()
    bf16_matches_fp32('cpu')
  end)

  it('the fast step in bf16 matches the plain fp32 step within bf16 tolerance (CUDA)', function()
    if not torch.cuda.is_available() then
      pending('no CUDA device')
      return
    end
    bf16_matches_fp32('cuda')
  end)

  it('the Python seed reference gives the same losses and parameters from the same init and batch', function()
    if not has_torch() then
      pending(h.python .. ' has no torch + safetensors')
      return
    end
    torch.save(dir .. '/init.safetensors', init)
    torch.save(dir .. '/batch.safetensors', batch)
    local rc, text, err = h.sh(('%s %s --layers %d --hidden %d --inter %d --heads %d --kv-heads %d --head-dim %d '
      .. '--vocab %d --K %d --init %s --batch-file %s --warmup 0 --steps %d --lr %g --ckpt 0 --amp none --device cpu '
      .. '--threads 1 --save-params %s'):format(h.q(h.python), h.q(REF), D.layers, D.hidden, D.inter, D.heads,
      D.kv_heads, D.head_dim, D.vocab, K, h.q(dir .. '/init.safetensors'), h.q(dir .. '/batch.safetensors'), STEPS, LR,
      h.q(dir .. '/after.safetensors')))
    assert.are.equal(0, rc, text .. err)
    local r = json.decode(text:match('(%b{})%s*$'))
    for i = 1, STEPS do
      assert.is_true(math.abs(fast_losses[i] - r.losses[i]) <= LOSS_RTOL * math.abs(r.losses[i]),
        ('step %d: qatlab %.9g vs seed-ref %.9g'):format(i, fast_losses[i], r.losses[i]))
    end
    local worst, n = max_diff(fast_params, torch.load(dir .. '/after.safetensors'))
    assert.are.equal(42, n)
    assert.is_true(worst <= PARAM_ATOL, 'parameters differ by ' .. worst)
  end)

  -- The strong reference (W_eff in an autograd.Function, fused KD with gradients in forward, fused AdamW)
  -- from the same init and batch: the same losses at every step (step 1 is the forward alone) and the same
  -- parameters after 3 steps, to the fp32 tolerances above; with its per-layer checkpointing on as well.
  it('the strong PyTorch reference gives the same losses and parameters from the same init and batch', function()
    if not has_torch() then
      pending(h.python .. ' has no torch + safetensors')
      return
    end
    torch.save(dir .. '/init.safetensors', init)
    torch.save(dir .. '/batch.safetensors', batch)
    for _, ckpt in ipairs({0, 1}) do
      local rc, text, err = h.sh(('%s %s --layers %d --hidden %d --inter %d --heads %d --kv-heads %d --head-dim %d '
        .. '--vocab %d --K %d --init %s --batch-file %s --warmup 0 --steps %d --lr %g --ckpt %d --chunk 7 --amp none '
        .. '--device cpu --threads 1 --save-params %s'):format(h.q(h.python), h.q(STRONG), D.layers, D.hidden, D.inter,
        D.heads, D.kv_heads, D.head_dim, D.vocab, K, h.q(dir .. '/init.safetensors'), h.q(dir .. '/batch.safetensors'),
        STEPS, LR, ckpt, h.q(dir .. '/strong.safetensors')))
      assert.are.equal(0, rc, text .. err)
      local r = json.decode(text:match('(%b{})%s*$'))
      assert.are.equal('strong', r.impl)
      for i = 1, STEPS do
        assert.is_true(math.abs(fast_losses[i] - r.losses[i]) <= LOSS_RTOL * math.abs(r.losses[i]),
          ('ckpt %d step %d: qatlab %.9g vs strong %.9g'):format(ckpt, i, fast_losses[i], r.losses[i]))
      end
      local worst, n = max_diff(fast_params, torch.load(dir .. '/strong.safetensors'))
      assert.are.equal(42, n)
      assert.is_true(worst <= PARAM_ATOL, 'parameters differ by ' .. worst)
    end
  end)

  it('the shapes are the real models\' dims; a bad shape is an error naming the known ones', function()
    -- Qwen3-0.6B's config.json (hand-copied: 28 layers, hidden 1024, 16/8 heads x 128, inter 3072, vocab 151936)
    assert.same({layers = 28, hidden = 1024, inter = 3072, heads = 16, kv_heads = 8, head_dim = 128, vocab = 151936},
      lib.dims({shape = 'qwen3'}))
    assert.same(lib.dims({shape = 'qwen3'}), lib.dims({full = true}))
    assert.are.equal(64, lib.dims({shape = 'smollm2', hidden = 64}).hidden)
    -- SmolLM2-135M: against the GGUF the set-up fetches, when it is there
    local path = h.source_dir .. '/.cache/models/smollm2-135m-instruct-q4_1.gguf'
    if io.open(path) then
      local _, c = require('gguf').load(path)
      local d = lib.dims({shape = 'smollm2'})
      assert.same({c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads,
                   c.num_key_value_heads, c.vocab_size},
                  {d.layers, d.hidden, d.inter, d.heads, d.kv_heads, d.vocab})
      assert.are.equal(c.hidden_size / c.num_attention_heads, d.head_dim)
    end
    local ok, err = pcall(lib.dims, {shape = 'smollm3'})
    assert.is_false(ok)
    assert.truthy(tostring(err):find('shape: expected one of qwen3, smoke, smollm2, tiny, got "smollm3"', 1, true), err)
  end)

  it('refuses a bad batch list with a clear error', function()
    local rc, _, err = h.sh(('%s run --device cpu %s --set batches=0,x --out %s'):format(h.q(h.bin), h.q(SCRIPT),
      h.q(dir .. '/bad')))
    assert.are.equal(1, rc)
    assert.truthy(err:find('batches: expected positive integers', 1, true), err)
  end)

  it('search_max_batch doubles to the first miss, then bisects to the last fit', function()
    for _, c in ipairs({{limit = 37, start = 1, cap = 4096, best = 37, miss = 38},
                        {limit = 64, start = 1, cap = 4096, best = 64, miss = 65},
                        {limit = 100, start = 3, cap = 50, best = 50, miss = nil},
                        {limit = 5, start = 8, cap = 64, best = nil, miss = 8},
                        {limit = 1, start = 1, cap = 1, best = 1, miss = nil}}) do
      local tried = {}
      local best, miss = lib.search_max_batch(function(b)
        assert.is_nil(tried[b], 'batch tried twice: ' .. b)
        assert.is_true(b >= c.start and b <= c.cap, 'outside [start, cap]: ' .. b)
        tried[b] = true
        return b <= c.limit
      end, c.start, c.cap)
      assert.are.equal(c.best, best, json.encode(c))
      assert.are.equal(c.miss, miss, json.encode(c))
    end
  end)

  -- The max batch's row fits the budget, and the batch above it is a tried miss or the max is the cap.
  local function check_search(res, budget, cap)
    local rows = {}
    for _, r in ipairs(res.rows) do rows[r.impl .. ':' .. r.batch] = r end
    for _, s in ipairs(res.max_batch.results) do
      local at = s.max_batch and rows[s.impl .. ':' .. s.max_batch]
      if at then
        assert.are.equal('OK', at.status, json.encode(at))
        assert.is_true(at.fits and at.peak_bytes <= budget, json.encode(at))
        assert.are.equal(at.peak_bytes, s.peak_bytes)
        assert.is_true(finite(s.tokens_s) and s.tokens_s > 0, json.encode(s))
      end
      local above = (s.max_batch or 0) + 1
      if s.max_batch == cap then
        assert.is_true(s.hit_cap)
      else
        local r = assert(rows[s.impl .. ':' .. above], s.impl .. ': batch ' .. above .. ' not tried')
        assert.is_false(r.fits)
        assert.is_true(r.status ~= 'OK' or r.peak_bytes > budget, json.encode(r))
        assert.are.equal(above, s.first_miss)
      end
    end
  end

  it('max_batch_mb: finds each impl\'s largest batch under the budget (smoke)', function()
    -- tiny model: both impls fit batch 1 in 1 GiB (seed-ref ~330 MiB of Python + torch), so both reach the cap
    local budget_mb, cap, out = 1024, 2, dir .. '/maxb'
    local rc, text, err = h.sh(('%s run --device cpu %s --set tiny=true --set max_batch_mb=%d --set max_batch_cap=%d '
      .. '--out %s'):format(h.q(h.bin), h.q(SCRIPT), budget_mb, cap, h.q(out)))
    assert.are.equal(0, rc, text .. '\n' .. err)
    assert.truthy(text:find('| impl | L | budget | max batch | tokens/s at max | peak at max |', 1, true), text)
    local f = assert(io.open(out .. '/results.json'))
    local res = json.decode(f:read('*a'))
    f:close()
    assert.truthy(io.open(out .. '/results.csv'))
    assert.are.equal(budget_mb * 2 ^ 20, res.max_batch.budget_bytes)
    check_search(res, budget_mb * 2 ^ 20, cap)
    local seen = {}
    for _, s in ipairs(res.max_batch.results) do seen[s.impl] = s end
    assert.are.equal(cap, seen.qatlab.max_batch)
    if has_torch() then
      assert.are.equal(cap, seen['seed-ref'].max_batch)
      assert.are.equal(1, seen.qatlab.ratio)
      assert.truthy(text:find('max batch qatlab/seed-ref at L=16: 2 / 2 = 1.00x', 1, true), text)
    end
    -- a budget under qatlab's own footprint: batch 1 already misses, no max batch
    rc, text, err = h.sh(('%s run --device cpu %s --set tiny=true --set impls=qatlab --set max_batch_mb=16 --out %s')
      :format(h.q(h.bin), h.q(SCRIPT), h.q(out .. '2')))
    assert.are.equal(0, rc, text .. '\n' .. err)
    f = assert(io.open(out .. '2/results.json'))
    res = json.decode(f:read('*a'))
    f:close()
    local s = res.max_batch.results[1]
    assert.are.equal('NONE', s.status, json.encode(s))
    assert.are.equal(1, s.first_miss)
    assert.are.equal('over budget', s.first_miss_reason)
    check_search(res, 16 * 2 ^ 20, 4096)
  end)

  it('max-batch mode refuses options that do not apply, with clear errors', function()
    for _, c in ipairs({{'--set max_batch_mb=-5', 'max_batch_mb: expected a budget in MiB > 0'},
                        {'--set max_batch_oom=true', 'max_batch_oom needs --device cuda'},
                        {'--set max_batch_mb=100 --set batches=8', 'batches does not apply'},
                        {'--set max_batch_mb=100 --set max_batch_cap=0', 'need integers 1 <= max_batch_start'}}) do
      local rc, _, err = h.sh(('%s run --device cpu %s %s --out %s'):format(h.q(h.bin), h.q(SCRIPT), c[1],
        h.q(dir .. '/bad')))
      assert.are.equal(1, rc, c[1])
      assert.truthy(err:find(c[2], 1, true), err)
    end
  end)
end)
