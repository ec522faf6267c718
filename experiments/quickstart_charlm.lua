-- quickstart_charlm: a character-level MLP language model (Bengio et al. 2003 style) trained
-- from scratch with autograd and AdamW written in plain torch ops. Small enough for a CPU.
--
--   qatlab run experiments/quickstart_charlm.lua [--set steps=2000] [--set text=FILE] [--out runs/q]
local torch = require 'torch'
local F = require 'torch.nn.functional'
local log = require 'log'
local config = require 'config'
local qatlab = require 'qatlab'
local args = ...

local cfg = config.merge({
  text = '/usr/share/common-licenses/GPL-3',  -- any UTF-8/ASCII text file; read as bytes
  context = 8,        -- characters of context
  embed = 24,         -- embedding width per character
  hidden = 256,       -- hidden units
  batch = 64,
  steps = 600,
  lr = 3e-3,
  weight_decay = 0.01,
  eval_every = 100,
  sample_chars = 160,
  seed = 1337,
}, args)
torch.manual_seed(cfg.seed)
local device = qatlab.device
log.info('quickstart_charlm on ' .. device .. ': ' .. config.format(cfg))

-- data: bytes → ids (0-based, as token ids are everywhere) -----------------------------
local f = assert(io.open(cfg.text, 'rb'), 'cannot read ' .. cfg.text .. ' (set --set text=FILE)')
local text = f:read('*a')
f:close()
local stoi, itos = {}, {}
for i = 1, #text do
  local c = text:sub(i, i)
  if not stoi[c] then itos[#itos + 1] = c; stoi[c] = true end
end
table.sort(itos)
for i, c in ipairs(itos) do stoi[c] = i - 1 end
local ids = {}
for i = 1, #text do ids[i] = stoi[text:sub(i, i)] end
local data = torch.tensor(ids, {dtype = 'int64', device = device})        -- (N,)
local n = data:numel()
local split = math.floor(n * 0.9)
local train, val = data:narrow(1, 1, split), data:narrow(1, split + 1, n - split)
local V = #itos
log.info(('%d characters, vocabulary %d, %d train / %d val'):format(n, V, split, n - split))

local offsets = torch.arange(cfg.context, {device = device})              -- (T,)
local function batch(src, B)
  local ix = torch.randint(0, src:numel() - cfg.context, {B}, {device = device})
  local x = src:index_select(1, (ix:unsqueeze(2) + offsets):flatten()):view(B, cfg.context)  -- (B, T)
  local y = src:index_select(1, ix + cfg.context)                         -- (B,)
  return x, y
end

-- model: embedding → tanh MLP → logits -------------------------------------------------
local function param(t) return t:requires_grad_() end
local E, H, T = cfg.embed, cfg.hidden, cfg.context
local p = {
  emb = param(torch.randn(V, E, {device = device}) * 0.1),
  w1 = param(torch.randn(T * E, H, {device = device}) * (1 / math.sqrt(T * E))),
  b1 = param(torch.zeros(H, {device = device})),
  w2 = param(torch.randn(H, V, {device = device}) * (0.1 / math.sqrt(H))),
  b2 = param(torch.zeros(V, {device = device})),
}
local nparams = 0
for _, t in pairs(p) do nparams = nparams + t:numel() end
log.info(('%d parameters'):format(nparams))

local function forward(x)                                                  -- x (B, T)
  local e = p.emb:index_select(1, x:flatten()):view(x:size(1), T * E)      -- (B, T*E)
  local h = (e:matmul(p.w1) + p.b1):tanh()                                 -- (B, H)
  return h:matmul(p.w2) + p.b2                                             -- (B, V)
end

local cross_entropy = F.cross_entropy                                      -- (B, V), (B,) int64: mean over B

-- AdamW, decoupled weight decay on matrices only ----------------------------------------
local state = {}
for k, t in pairs(p) do state[k] = {m = torch.zeros_like(t), v = torch.zeros_like(t)} end
local b1, b2, eps = 0.9, 0.95, 1e-8
local function adamw_step(step, lr)
  torch.no_grad(function()
    for k, t in pairs(p) do
      local g, s = t.grad, state[k]
      s.m:mul_(b1):add_(g, {alpha = 1 - b1})
      s.v:mul_(b2):add_(g * g, {alpha = 1 - b2})
      local mhat = s.m / (1 - b1 ^ step)
      local vhat = s.v / (1 - b2 ^ step)
      if t:dim() == 2 then t:mul_(1 - lr * cfg.weight_decay) end
      t:sub_(mhat / (vhat:sqrt() + eps), {alpha = lr})
      t.grad = nil
    end
  end)
end

local function evaluate(src)
  return torch.no_grad(function()
    local total = 0
    for _ = 1, 8 do
      local x, y = batch(src, 256)
      total = total + cross_entropy(forward(x), y):item()
    end
    return total / 8
  end)
end

-- train ------------------------------------------------------------------------------------
local metrics = qatlab.out and assert(io.open(qatlab.out .. '/metrics.jsonl', 'w'))
local t0, last_val = qatlab.time(), nil
for step = 1, cfg.steps do
  local lr = cfg.lr * math.min(1, step / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / cfg.steps)))
  local x, y = batch(train, cfg.batch)
  local loss = cross_entropy(forward(x), y)
  loss:backward()
  adamw_step(step, lr)
  if step == 1 or step % cfg.eval_every == 0 or step == cfg.steps then
    local tl, vl = loss:item(), evaluate(val)
    last_val = vl
    local dt = qatlab.time() - t0
    log.info(('step %5d  train %.4f  val %.4f  val bpc %.3f  lr %.2e  %.0f samples/s'):format(
      step, tl, vl, vl / math.log(2), lr, step * cfg.batch / math.max(dt, 1e-9)))
    if metrics then
      metrics:write(('{"step":%d,"train_loss":%.6f,"val_loss":%.6f,"lr":%.6g}\n'):format(step, tl, vl, lr))
      metrics:flush()
    end
  end
end
if metrics then metrics:close() end

-- sample -----------------------------------------------------------------------------------
local ctx = {}
for i = 1, T do ctx[i] = stoi[text:sub(i, i)] end
local out = {}
torch.no_grad(function()
  for _ = 1, cfg.sample_chars do
    local x = torch.tensor({ctx}, {dtype = 'int64', device = device})
    local probs = forward(x):softmax(2)
    local nxt = torch.multinomial(probs, 1):item()
    out[#out + 1] = itos[nxt + 1]
    table.remove(ctx, 1)
    ctx[#ctx + 1] = nxt
  end
end)
log.info('sample: ' .. table.concat(out):gsub('\n', ' '))
log.info(('final val loss %.4f (uniform would be %.4f)'):format(last_val, math.log(V)))
if qatlab.out then
  torch.save(qatlab.out .. '/charlm.safetensors', p, {metadata = {vocab = table.concat(itos)}})
  log.info('saved ' .. qatlab.out .. '/charlm.safetensors')
end
