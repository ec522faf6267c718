-- bench_soak: a long run of the whole training loop, for leaks and resume exactness: a tiny student trained by
-- KD from a KD cache (the prefetching reader) for 10,000 steps with evaluation and checkpoints; reports the RSS
-- through the run (flat within a few MB once warm), then kills a second run with SIGKILL at a random step,
-- resumes it, and checks that its final losses and weights equal the uninterrupted run's.
--
--   qatlab run experiments/bench_soak.lua [--out runs/soak] [--set steps=10000] [--set kill_at=N]
-- Each training run is a child process (`--set role=train`), so each RSS is one run's own.
local torch = require 'torch'
local nn = require 'nn'
local kd = require 'kd'
local optim = require 'optim'
local json = require 'json'
local config = require 'config'
local files = require 'files'
local trainer = require 'trainer'
local schedule = require 'schedule'
local bench = require 'bench'
local util = require 'util'
local qatlab = require 'qatlab'
local args = ...

local cfg = config.merge({
  steps = 10000,        -- training steps of each run
  eval_every = 500,     -- KD eval on held-out cache batches; RSS is sampled at the same steps
  save_every = 1000,    -- checkpoints (the newest 2 kept)
  log_every = 100,      -- training_log.csv rows
  kill_at = 0,          -- the step the second run is killed at (0: random, after the first checkpoint)
  vocab = 97, hidden = 32, layers = 2, heads = 2, L = 32, K = 8,
  cache_rows = 512, eval_rows = 32, batch = 8, lr = 3e-3, T = 2.0,
  seed = 1,
  role = 'main',        -- 'train': one training run (the children)
  resume = false,
  cache = '',           -- the KD cache (children)
}, args)
local out = qatlab.out or 'runs/soak'

local function model_cfg(vocab)
  return {model_type = 'qwen3', vocab_size = vocab, hidden_size = cfg.hidden, intermediate_size = 3 * cfg.hidden,
          num_hidden_layers = cfg.layers, num_attention_heads = cfg.heads, num_key_value_heads = 1,
          head_dim = math.floor(cfg.hidden / cfg.heads), max_position_embeddings = cfg.L, tie_word_embeddings = true}
end

local function kd_loss(m, b)
  local loss, parts = kd.loss_model(m, b, {T = cfg.T})
  parts.tokens = b.input_ids:numel()
  return loss, parts
end

-- The mean KD loss over the first n batches of the cache (read in order): the held-out measure.
local function eval_batches(n)
  local r, list = kd.open_cache(cfg.cache, {batch_size = cfg.batch, shuffle = false, device = 'cpu'}), {}
  for i = 1, n do list[i] = r:next() end
  r:close()
  return function(m)
    local total = 0
    for _, b in ipairs(list) do total = total + kd.loss_model(m, b, {T = cfg.T}):item() end
    return {eval_loss = total / #list}
  end
end

-- One training run (a child process): writes <out>/result.json and final.safetensors.
local function train()
  torch.manual_seed(cfg.seed)
  local m = nn.from_config(model_cfg(cfg.vocab))
  m:requires_grad_(true)
  local evaluate = eval_batches(math.floor(cfg.eval_rows / cfg.batch))
  local reader = kd.open_cache(cfg.cache, {batch_size = cfg.batch, seed = cfg.seed, device = 'cpu'})
  local rss = {}
  local function on_step(t)
    local s = t.global_step
    if s == 1 or s % cfg.eval_every == 0 then rss[#rss + 1] = {s, bench.status_kb('VmRSS')} end
    if cfg.kill_at > 0 and s == cfg.kill_at then
      local pid = files.read('/proc/self/stat'):match('^(%d+)')
      os.execute('kill -9 ' .. pid)
      os.execute('sleep 5')
    end
  end
  local t = trainer.new{model = m, optimizer = optim.AdamW(m, {lr = cfg.lr, weight_decay = 0.01}),
    loss = kd_loss, data = reader, steps = cfg.steps, clip = 1.0,
    schedule = schedule.cosine{total = cfg.steps, warmup = math.min(100, math.floor(cfg.steps / 10)), min_ratio = 0.1},
    eval = evaluate,
    eval_every = cfg.eval_every, save_every = cfg.save_every, keep_last = 2, log_every = cfg.log_every,
    seed = cfg.seed, resume = cfg.resume, progress = {mode = 'off'}, hooks = {on_step = on_step}}
  local sum = t:run()
  t:close()
  reader:close()
  torch.save(out .. '/final.safetensors', m:state_dict())
  files.write_atomic(out .. '/result.json', json.encode({train_loss = sum.train_loss, eval_loss = sum.eval_loss,
    steps = sum.steps, elapsed = sum.elapsed, resumed_from = t.resumed_from, rss_kb = rss}) .. '\n', 'bench_soak')
end

if cfg.role == 'train' then return train() end

-- The cache: a tiny random teacher's top-K over token rows with some structure (runs of counting mod vocab).
files.mkdir(out, 'bench_soak')
local cache = out .. '/cache'
do
  torch.manual_seed(cfg.seed + 100)
  local teacher = nn.from_config(model_cfg(cfg.vocab))
  local start = torch.randint(0, cfg.vocab, {cfg.cache_rows, 1})
  local step = torch.randint(1, 4, {cfg.cache_rows, 1})
  local ids = (start + step * torch.arange(cfg.L)):remainder(cfg.vocab)
  kd.build_cache{teacher = teacher, data = ids, K = cfg.K, shard_size = 128, out = cache, overwrite = true}
end

local function child(dir, extra)
  local sets = {}
  for _, k in ipairs({'steps', 'eval_every', 'save_every', 'log_every', 'vocab', 'hidden', 'layers', 'heads', 'L', 'K',
                      'eval_rows', 'batch', 'lr', 'T', 'seed'}) do
    sets[#sets + 1] = ('--set %s=%s'):format(k, tostring(cfg[k]))
  end
  local cmd = ('%s run --device cpu --threads 1 %s --out %s --set role=train --set cache=%s %s %s'):format(
    util.q(bench.qatlab_bin()), util.q(qatlab.script), util.q(dir), util.q(cache), table.concat(sets, ' '), extra or '')
  local t0 = os.time()
  local ok, how, code = os.execute(cmd .. ' >' .. util.q(dir .. '.log') .. ' 2>&1')
  local rc = type(ok) == 'number' and ok or (ok and 0 or code)
  return rc, os.time() - t0, how
end

local function result(dir)
  return json.decode(assert(files.read(dir .. '/result.json'), dir .. '/result.json missing'))
end

os.execute('rm -rf ' .. util.q(out .. '/a') .. ' ' .. util.q(out .. '/b'))
local rc, secs = child(out .. '/a')
assert(rc == 0, 'bench_soak: the uninterrupted run failed (see ' .. out .. '/a.log)')
local a = result(out .. '/a')
math.randomseed(os.time())
local kill_at = cfg.kill_at > 0 and cfg.kill_at or math.random(cfg.save_every + 1, cfg.steps - 1)
local krc = child(out .. '/b', '--set kill_at=' .. kill_at)
assert(krc ~= 0, 'bench_soak: the run to be killed at step ' .. kill_at .. ' finished')
assert(not files.read(out .. '/b/result.json'), 'bench_soak: the killed run wrote its result')
rc = child(out .. '/b', '--set resume=true')
assert(rc == 0, 'bench_soak: the resumed run failed (see ' .. out .. '/b.log)')
local b = result(out .. '/b')

local wa, wb = torch.load(out .. '/a/final.safetensors'), torch.load(out .. '/b/final.safetensors')
local same_weights = true
for k, v in pairs(wa) do same_weights = same_weights and v:equal(wb[k]) end
-- RSS: samples at step 1 and every eval_every steps. Once warm (from the second sample) it wanders by a few MB
-- with the allocator's caches; a leak shows as a trend: the median of the last five samples against the median
-- of the first five warm ones, and the least-squares slope per 1,000 steps.
local rss = a.rss_kb
local function median(xs)
  local t = {}
  for i, x in ipairs(xs) do t[i] = x end
  return util.median(t)
end
local warm, last, lo, hi = {}, {}, math.huge, 0
for i = 2, #rss do
  local mb = rss[i][2] / 1024
  if #warm < 5 then warm[#warm + 1] = mb end
  if i > #rss - 5 then last[#last + 1] = mb end
  lo, hi = math.min(lo, mb), math.max(hi, mb)
end
local sx, sy, sxx, sxy, n = 0, 0, 0, 0, 0
for i = 2, #rss do
  local x, y = rss[i][1] / 1000, rss[i][2] / 1024
  sx, sy, sxx, sxy, n = sx + x, sy + y, sxx + x * x, sxy + x * y, n + 1
end
local slope = n > 1 and (n * sxy - sx * sy) / math.max(1e-9, n * sxx - sx * sx) or 0
local res = {
  steps = cfg.steps, seconds = secs, ms_per_step = 1000 * a.elapsed / cfg.steps,
  rss_first_mb = rss[1][2] / 1024, rss_warm_mb = #warm > 0 and median(warm) or 0,
  rss_end_mb = #last > 0 and median(last) or 0, rss_min_mb = lo, rss_max_mb = hi, rss_slope_mb_per_1k = slope,
  kill_at = kill_at, resumed_from = b.resumed_from,
  train_loss = a.train_loss, resumed_train_loss = b.train_loss,
  eval_loss = a.eval_loss, resumed_eval_loss = b.eval_loss,
  same_final_loss = a.train_loss == b.train_loss and a.eval_loss == b.eval_loss, same_weights = same_weights,
}
res.rss_growth_mb = res.rss_end_mb - res.rss_warm_mb
files.write_atomic(out .. '/soak.json', json.encode(res) .. '\n', 'bench_soak')
print(('bench_soak: %d steps in %d s (%.2f ms/step); RSS %.1f MB at step 1, warm median %.1f MB, final median %.1f MB '
       .. '(growth %.2f MB, slope %.3f MB per 1000 steps, range %.1f-%.1f MB)'):format(cfg.steps, secs, res.ms_per_step,
       res.rss_first_mb, res.rss_warm_mb, res.rss_end_mb, res.rss_growth_mb, res.rss_slope_mb_per_1k, res.rss_min_mb,
       res.rss_max_mb))
print(('bench_soak: SIGKILL at step %d, resumed from ckpt_%s: final train loss %.17g vs %.17g, eval %.17g vs %.17g, '
       .. 'weights %s'):format(kill_at, tostring(b.resumed_from), a.train_loss, b.train_loss, a.eval_loss, b.eval_loss,
       same_weights and 'identical' or 'DIFFER'))
assert(res.same_final_loss and same_weights, 'bench_soak: the resumed run does not end as the uninterrupted one')
return res
