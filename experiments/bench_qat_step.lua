-- bench_qat_step: the KD training step of experiments/qat_pretrained.lua on the real SmolLM2-135M (its V2
-- layers, the trainer with AdamW, cosine schedule, clip, kd.loss_model), timed per precision: tokens/s and
-- peak RSS. Teacher top-K is synthetic (the step's work does not depend on its values).
--
--   qatlab run experiments/bench_qat_step.lua [--set precisions=fp32,bf16] [--set preset=q2a4] [--set steps=4]
--
-- Options (--set key=value): precisions='fp32,bf16' (each in its own child process: --set child=fp32|bf16|auto)
--   preset='q2a4'  batch=4  L=128  K=32  warmup=1  steps=3  threads=1  gguf= dir= (as qat_pretrained)
-- Peak RSS = VmHWM of the child after clear_refs before the timed steps (the model, the optimizer state, and
-- the step's activations); step time = median of the timed steps. Prints a Markdown table with the load average.
local torch, quant, kd, optim = require 'torch', require 'quant', require 'kd', require 'optim'
local trainer, schedule, config, qatlab = require 'trainer', require 'schedule', require 'config', require 'qatlab'
local bench, json, pretrained, step_lib = require 'bench', require 'json', require 'pretrained', require 'bench_step'
local args = ...

local cfg = config.merge({
  child = '',   -- '' = driver; else the child's precision
  precisions = 'fp32,bf16', preset = 'q2a4', batch = 4, L = 128, K = 32, warmup = 1, steps = 3, threads = 1,
  gguf = pretrained.SMOLLM2, dir = '', lr = 5e-4, T = 2.0,
}, args)

if cfg.child ~= '' then
  torch.set_num_threads(cfg.threads)
  torch.manual_seed(0)
  local src = pretrained.load{gguf = cfg.gguf, dir = cfg.dir}
  local m = src.fresh()
  quant.replace(m, {preset = cfg.preset})
  m:train()
  quant.set_trainable(m, 'all')
  local vocab = assert(src.config and src.config.vocab_size, 'bench_qat_step: the model config has no vocab_size')
  local batch = step_lib.synthetic_batch({vocab = vocab}, cfg.batch, cfg.L, cfg.K)
  local total = cfg.warmup + cfg.steps
  local times, t_last, base = {}, nil, nil
  local t = trainer.new{
    model = m, optimizer = optim.AdamW(m, {lr = cfg.lr, weight_decay = 0}), steps = total,
    schedule = schedule.cosine{total = total, warmup = 1, min_ratio = 0.1},
    data = function() return batch end,
    loss = function(model, b) return kd.loss_model(model, b, {T = cfg.T}) end,
    log_every = 1, eval_at_start = false, precision = cfg.child, seed = 1, progress = {mode = 'off'},
    save_final = false,
    hooks = {on_step = function(_, info)
      local now = qatlab.time()
      if info.step == cfg.warmup then
        collectgarbage()
        base = bench.status_kb('VmRSS') * 1024
        bench.reset_peak_rss()
        now = qatlab.time()
      elseif info.step > cfg.warmup then
        times[#times + 1] = now - t_last
      end
      t_last = now
    end},
  }
  t:run()
  local step_s = bench.median(times)
  print('RESULT ' .. json.encode({precision = t.precision, why = t.precision_why, step_s = step_s,
    tokens_s = cfg.batch * cfg.L / step_s, peak_bytes = bench.status_kb('VmHWM') * 1024, base_bytes = base,
    times = times}))
  t:close()
  return
end

-- driver --------------------------------------------------------------------------------------
local qbin = bench.qatlab_bin()
if not (qbin or ''):match('qatlab$') then qbin = qatlab.scripts_dir .. '/../build/qatlab' end
local function q(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end
print(('bench_qat_step: SmolLM2-135M (%s), %s, batch %d x L %d, K %d, %d threads, %d warm-up + %d timed steps; '
  .. 'load average %s'):format(cfg.dir ~= '' and cfg.dir or cfg.gguf:match('[^/]*$'), cfg.preset, cfg.batch, cfg.L,
  cfg.K, cfg.threads, cfg.warmup, cfg.steps, step_lib.load_average()))
local rows = {}
for p in cfg.precisions:gmatch('[^,%s]+') do
  io.stderr:write(('[bench_qat_step] %s ...\n'):format(p))
  local cmd = ('%s run --device cpu --threads %d %s --set child=%s --set preset=%s --set batch=%d --set L=%d '
    .. '--set K=%d --set warmup=%d --set steps=%d --set threads=%d --set gguf=%s --set dir=%s 2>&1'):format(q(qbin),
    cfg.threads, q(qatlab.script), p, cfg.preset, cfg.batch, cfg.L, cfg.K, cfg.warmup, cfg.steps, cfg.threads,
    q(cfg.gguf), q(cfg.dir))
  local text = bench.sh(cmd)
  local line = text:match('RESULT (%b{})')
  if not line then error(('bench_qat_step: child %s failed:\n%s'):format(p, text:sub(-1500)), 0) end
  local r = json.decode(line)
  r.asked = p
  rows[#rows + 1] = r
end
print('\n| precision asked | ran | step (s) | tokens/s | peak RSS (MiB) | why |')
print('|---|---|---:|---:|---:|---|')
for _, r in ipairs(rows) do
  print(('| %s | %s | %.2f | %s | %s | %s |'):format(r.asked, r.precision, r.step_s, bench.commas(r.tokens_s),
    bench.commas(r.peak_bytes / 2 ^ 20), r.why))
end
print('load average after: ' .. step_lib.load_average())
