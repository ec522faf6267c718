-- bench_step_phases: where qatlab's V2-KD step (scripts/bench_step.lua) spends its time, phase by phase, at
-- a shape (default SmolLM2-135M) in fp32 and under bf16 autocast: the whole step, one forward of the V2
-- model and of the same model with plain float weights (their difference is the W_eff construction), the
-- fused KD loss forward + backward on fixed hidden states, clip + AdamW, and the rest (the backward of the
-- decoder layers: dx and dW GEMMs, W_eff rebuilt, dS = dW*Q, dA, dB, attention and norm backward).
--
--   qatlab run experiments/bench_step_phases.lua [--set shape=smollm2] [--set precisions=fp32,bf16] [--set reps=3]
--
-- Every phase is timed reps times, interleaved, in this one process (1 thread by default); medians are shown.
-- With checkpointing (the default, as bench_train) the step runs the forward twice: rest = step - 2 forwards
-- - KD loss - optimizer.
local torch, nn, kd, optim = require 'torch', require 'nn', require 'kd', require 'optim'
local config, bench, qatlab, M = require 'config', require 'bench', require 'qatlab', require 'bench_step'
local args = ...

local cfg = config.merge({shape = 'smollm2', precisions = 'fp32,bf16', batch = 4, L = 128, K = 32, reps = 3,
  threads = 1, preset = 'q2a4', ckpt = true}, args)
torch.set_num_threads(cfg.threads)
local d = M.dims(cfg)
torch.manual_seed(0)
local m = M.build_model(d, cfg.L, {preset = cfg.preset, ckpt = cfg.ckpt})
local dense = nn.from_config(M.qwen3_config(d, cfg.L))
dense:train()
local batch = M.synthetic_batch(d, cfg.batch, cfg.L, cfg.K)
local W = M.head_weight(m)
local kopts = {T = 2, hard_top1 = 0.2, hard_full = 0.00005}

local function timed(fn)
  local t0 = qatlab.time()
  fn()
  return qatlab.time() - t0
end

local results = {}
for p in cfg.precisions:gmatch('[^,%s]+') do
  local ac = p == 'bf16' and 'cpu' or nil
  local function under(fn) return ac and torch.autocast(ac, {dtype = 'bfloat16'}, fn) or fn() end
  local step = M.make_step(m, batch, {autocast = ac})
  local opt = optim.AdamW(m, {lr = 5e-5, weight_decay = 0})
  local h0 = torch.no_grad(function()
    return under(function() return m:forward(batch.input_ids, {output = 'hidden'}) end)
  end)
  local phases = {step = {}, fwd_v2 = {}, fwd_dense = {}, kd = {}, opt = {}}
  step()   -- warm-up
  for _ = 1, cfg.reps do
    phases.step[#phases.step + 1] = timed(step)
    phases.fwd_v2[#phases.fwd_v2 + 1] = timed(function()
      torch.no_grad(function() under(function() m:forward(batch.input_ids, {output = 'hidden'}):free() end) end)
    end)
    phases.fwd_dense[#phases.fwd_dense + 1] = timed(function()
      torch.no_grad(function() under(function() dense:forward(batch.input_ids, {output = 'hidden'}):free() end) end)
    end)
    phases.kd[#phases.kd + 1] = timed(function()
      local h = h0:detach():requires_grad_()
      local loss = under(function() return (kd.loss(h, W, batch, kopts)) end)
      loss:backward()
    end)
    -- gradients to clip and apply (the step zeroed its own): one backward of a cheap loss on every scale
    local ps, l = {}, nil
    for _, q in ipairs(m:parameters()) do if q.requires_grad then ps[#ps + 1] = q end end
    for _, q in ipairs(ps) do l = l and l + (q * q):sum() or (q * q):sum() end
    l:backward()
    phases.opt[#phases.opt + 1] = timed(function()
      optim.clip_grad_norm(ps, 1.0)
      opt:step()
      opt:zero_grad()
    end)
  end
  local r = {}
  for k, v in pairs(phases) do r[k] = bench.median(v) end
  r.weff = r.fwd_v2 - r.fwd_dense
  local fwds = cfg.ckpt and 2 or 1
  r.rest = r.step - fwds * r.fwd_v2 - r.kd - r.opt
  r.fwds = fwds
  results[#results + 1] = {p = p, r = r}
end

print(('\nbench_step_phases: %s shape (%d layers, hidden %d, vocab %d), %s, batch %d x L %d, %d thread(s), '
  .. 'checkpointing %s, median of %d; load average %s\n'):format(M.shape_name(cfg), d.layers, d.hidden, d.vocab,
  cfg.preset, cfg.batch, cfg.L, cfg.threads, cfg.ckpt and 'on' or 'off', cfg.reps, M.load_average()))
print('| phase | ' .. table.concat((function()
  local t = {}
  for _, x in ipairs(results) do t[#t + 1] = x.p .. ' (s) | share' end
  return t
end)(), ' | ') .. ' |')
print('|---|' .. ('---:|---:|'):rep(#results))
local rows = {{'whole step', 'step'}, {'forward, V2 model (x%d in a step)', 'fwd_v2'},
  {'  of which the same forward with float weights', 'fwd_dense'}, {'  of which W_eff construction', 'weff'},
  {'KD loss forward + backward (fused, chunked)', 'kd'}, {'clip + AdamW', 'opt'},
  {'rest: backward of the decoder layers', 'rest'}}
for _, row in ipairs(rows) do
  local cells = {}
  for _, x in ipairs(results) do
    cells[#cells + 1] = ('%.3f | %.0f%%'):format(x.r[row[2]], 100 * x.r[row[2]] / x.r.step)
  end
  print(('| %s | %s |'):format(row[1]:format(results[1].r.fwds), table.concat(cells, ' | ')))
end
print('load average after: ' .. M.load_average())
