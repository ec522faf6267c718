-- bench_bf16_quality: does bf16 autocast cost quality? The same short KD run of SmolLM2-135M's V2 student
-- (qat_pretrained's Q4 stage: same init, same KD cache batches, same schedule) in fp32 and under bf16
-- autocast (fp32 master scales, gradients and AdamW state), each in its own child process
-- (--set child=fp32|bf16): the KD-loss curve and the held-out perplexity before and after, side by side.
--
--   qatlab run experiments/bench_bf16_quality.lua [--set steps=30] [--set cache=DIR] [--out DIR]
--
-- Options: steps=30 batch=4 L=128 K=32 train_blocks=160 held_bytes=20000 preset='q4a4' lr=2e-4 threads=1
--   cache=''  a KD cache directory of the teacher over L-token blocks (built in the out dir when empty)
local torch, quant, kd, optim = require 'torch', require 'quant', require 'kd', require 'optim'
local trainer, schedule, config, qatlab = require 'trainer', require 'schedule', require 'config', require 'qatlab'
local bench, json, pretrained, files = require 'bench', require 'json', require 'pretrained', require 'files'
local args = ...

local cfg = config.merge({child = '', steps = 30, batch = 4, L = 128, K = 32, train_blocks = 160,
  text_bytes = 800000, held_bytes = 20000, preset = 'q4a4', lr = 2e-4, threads = 1, cache = '', window = 512,
  stride = 256}, args)
local out = qatlab.out or 'runs/bench_bf16_quality'
files.mkdir(out, 'bench_bf16_quality')
torch.set_num_threads(cfg.threads)

local src = pretrained.load{}
local tk = src.tokenizer
local corpus = pretrained.text('')
local held_ids = torch.tensor(tk:encode(corpus:sub(cfg.text_bytes + 1, cfg.text_bytes + cfg.held_bytes)),
                              {dtype = 'int64'})

if cfg.child ~= '' then
  torch.manual_seed(0)
  local m = src.fresh()
  quant.replace(m, {preset = cfg.preset})
  m:train()
  quant.set_trainable(m, 'all')
  local function ppl()
    m:eval()
    local r = torch.no_grad(function()
      return m:perplexity(held_ids, {max_length = cfg.window, stride = cfg.stride})
    end)
    m:train()
    return r.ppl
  end
  local ppl0 = ppl()
  local curve = {}
  local t = trainer.new{
    model = m, optimizer = optim.AdamW(m, {lr = cfg.lr, weight_decay = 0}), steps = cfg.steps,
    schedule = schedule.cosine{total = cfg.steps, warmup = 5, min_ratio = 0.1},
    data = kd.open_cache(cfg.cache, {batch_size = cfg.batch, seed = 1}),
    loss = function(model, b) return kd.loss_model(model, b, {T = 2.0}) end,
    log_every = 1, eval_at_start = false, precision = cfg.child, seed = 1, progress = {mode = 'off'},
    save_final = false, hooks = {on_step = function(_, info) curve[#curve + 1] = info.loss end},
  }
  local t0 = qatlab.time()
  t:run()
  local secs = qatlab.time() - t0
  print('RESULT ' .. json.encode({precision = t.precision, why = t.precision_why, curve = curve, ppl0 = ppl0,
    ppl1 = ppl(), seconds = secs}))
  t:close()
  return
end

-- driver: the KD cache once, then both children ---------------------------------------------
if cfg.cache == '' then
  cfg.cache = out .. '/kd_train'
  local cut = pretrained.blocks(tk, {bytes = cfg.text_bytes, L = cfg.L, train = cfg.train_blocks, batch = cfg.batch})
  local teacher = src.fresh()
  teacher:requires_grad_(false)
  kd.build_cache{teacher = teacher, data = cut.train, K = cfg.K, out = cfg.cache, batch_size = 8, tokenizer = tk}
end
local qbin = bench.qatlab_bin()
if not (qbin or ''):match('qatlab$') then qbin = qatlab.scripts_dir .. '/../build/qatlab' end
local function q(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end
local load0 = require('bench_step').load_average()
local res = {}
for _, p in ipairs({'fp32', 'bf16'}) do
  io.stderr:write(('[bench_bf16_quality] %s ...\n'):format(p))
  local text = bench.sh(('%s run --device cpu --threads %d %s --out %s --set child=%s --set cache=%s --set steps=%d '
    .. '--set batch=%d --set preset=%s --set lr=%g --set threads=%d --set held_bytes=%d 2>&1'):format(q(qbin),
    cfg.threads, q(qatlab.script), q(out .. '/' .. p), p, q(cfg.cache), cfg.steps, cfg.batch, cfg.preset, cfg.lr,
    cfg.threads, cfg.held_bytes))
  local line = text:match('RESULT (%b{})')
  if not line then error(('bench_bf16_quality: child %s failed:\n%s'):format(p, text:sub(-1500)), 0) end
  res[p] = json.decode(line)
end
local a, b = res.fp32, res.bf16
print(('\nbench_bf16_quality: SmolLM2-135M %s student, %d KD steps of %d x %d tokens, lr %g cosine, %d thread(s); '
  .. 'load average %s -> %s'):format(cfg.preset, cfg.steps, cfg.batch, cfg.L, cfg.lr, cfg.threads, load0,
  require('bench_step').load_average()))
print(('bf16 child: %s\n'):format(b.why))
print('| step | KD loss fp32 | KD loss bf16 | rel. diff |')
print('|---:|---:|---:|---:|')
local worst = 0
for i = 1, #a.curve do
  local d = math.abs(a.curve[i] - b.curve[i]) / math.abs(a.curve[i])
  worst = math.max(worst, d)
  if i == 1 or i % 5 == 0 or i == #a.curve then
    print(('| %d | %.4f | %.4f | %.2e |'):format(i, a.curve[i], b.curve[i], d))
  end
end
print(('\n| | fp32 | bf16 |\n|---|---:|---:|\n| held-out perplexity before | %.3f | %.3f |\n'
  .. '| held-out perplexity after | %.3f | %.3f |\n| training time (s) | %.0f | %.0f |'):format(a.ppl0, b.ppl0,
  a.ppl1, b.ppl1, a.seconds, b.seconds))
print(('largest per-step KD-loss relative difference: %.2e'):format(worst))
files.write_atomic(out .. '/results.json', json.encode(res) .. '\n', 'bench_bf16_quality')
