-- lua_v2_layer: the seed's V2 LUT layer written in pure Lua (S = (A_dir · g) B_dir, W_eff = lut[idx] ⊙ S,
-- optional STE-FP16) and plugged into a model with model:set_linear. Checks it against the C++ V2
-- layer (outputs and gradients of A, B, g, 1e-5 relative), on the real SmolLM2-135M when it is fetched,
-- then times a training step of a Qwen3-0.6B-shaped decoder layer with every projection in Lua vs C++.
--
--   qatlab run experiments/lua_v2_layer.lua [--set tokens=256] [--set iters=5] [--set preset=q2a4]
--   (smoke size: --set hidden=64 --set inter=128 --set heads=4 --set kv_heads=2 --set head_dim=16 --set real=false)
local torch = require 'torch'
local nn = require 'nn'
local quant = require 'quant'
local pretrained = require 'pretrained'
local qatlab = require 'qatlab'
local config = require 'config'
local bench = require 'bench'
local args = ...

local cfg = config.merge({
  preset = 'q2a4', ste_fp16 = false,
  real = true,          -- also check on SmolLM2-135M (the GGUF set-up fetches) when present
  gguf = pretrained.SMOLLM2,
  check_tokens = 32,    -- tokens of the equality check
  tokens = 256, batch = 1, iters = 5, warmup = 1, threads = 2, vocab = 1024,
  hidden = 1024, inter = 3072, heads = 16, kv_heads = 8, head_dim = 128,   -- Qwen3-0.6B's decoder layer
}, args)
torch.set_num_threads(cfg.threads)

-- The V2 layer in Lua ------------------------------------------------------------------------
local V2 = nn.Module:extend('LuaV2')

-- From a C++ V2 layer's tensors (state dict entries under `prefix`): the same names, so the
-- two layers' state dicts are interchangeable.
function V2:__init(sd, prefix, ste)
  local w = sd[prefix .. '.weight']
  self.out_features, self.in_features = w:size(1), w:size(2)
  self.ste = ste
  self:register_buffer('weight', w:clone())                       -- (out, in) frozen float weight
  self:register_parameter('scale_A', sd[prefix .. '.scale_A']:clone())              -- (out, r)
  self:register_parameter('scale_B', sd[prefix .. '.scale_B']:clone())              -- (r, in)
  self:register_parameter('rank_magnitude', sd[prefix .. '.rank_magnitude']:clone())   -- (r)
  self:register_buffer('lut', sd[prefix .. '.lut']:clone())                         -- (L)
  self:register_buffer('_indices', sd[prefix .. '._indices']:clone())               -- (out, in) uint8
  self.weight:requires_grad_(false)
end

function V2:forward(x)
  local st = self.ste and quant.ste_fp16 or function(t) return t end
  local A_dir = self.scale_A / self.scale_A:norm(2, 1, true):clamp(1e-6)   -- unit columns (out, r)
  local B_dir = self.scale_B / self.scale_B:norm(2, 2, true):clamp(1e-6)   -- unit rows (r, in)
  local g = st(self.rank_magnitude + 1e-6)                                   -- identity activation + eps
  local S = st(A_dir * g):matmul(st(B_dir))                                  -- (out, in)
  local Q = st(self.lut:index_select(1, self._indices:reshape(-1):long()):view(self.out_features, self.in_features))
  local W = st(Q * S)                                                        -- W_eff (out, in)
  return st(x:matmul(W:to(x.dtype):t()))                                     -- (..., out)
end

-- The dense weight it computes with (save_pretrained): `weight` is the float master here, so the
-- layer names its effective weight dense_weight (read first by the model).
function V2:dense_weight()
  return torch.no_grad(function() return self:forward(torch.eye(self.in_features, {dtype = 'float32'})):t() end)
end

-- Replaces every V2 layer of `cpp` by a Lua copy in `lua` (a model with the same weights).
local function mirror(cpp, lua)
  local sd = cpp:state_dict()
  local names = {}
  for _, l in ipairs(quant.layers(cpp)) do
    lua:set_linear(l.name, V2(sd, l.name, cfg.ste_fp16))
    names[#names + 1] = l.name
  end
  lua:load_state_dict(sd, {strict = false})   -- the float parts (embeddings, norms)
  lua:requires_grad_(false)                    -- as quant.set_trainable(cpp, 'all'): only A, B, g train
  lua:requires_grad_(true, 'scale_A|scale_B|rank_magnitude')
  return names
end

local function rel(a, b)
  return (a:double() - b:double()):abs():max():item() / math.max(b:double():abs():max():item(), 1e-30)
end

-- Output and A/B/g gradients of every quantized layer, C++ vs Lua, on ids.
local function compare(cpp, lua, names, ids)
  for _, m in ipairs({cpp, lua}) do
    m:train()
    quant.set_trainable(cpp, 'all')
    for _, p in ipairs(m:parameters()) do p.grad = nil end
  end
  local yc, yl = cpp:forward(ids), lua:forward(ids)
  yc:float():pow(2):mean():backward()
  yl:float():pow(2):mean():backward()
  local worst_g = 0
  local pc = {}
  for _, p in ipairs(cpp:named_parameters()) do pc[p[1]] = p[2] end
  for _, n in ipairs(names) do
    local l = lua:get_submodule(n)
    for _, k in ipairs({'scale_A', 'scale_B', 'rank_magnitude'}) do
      worst_g = math.max(worst_g, rel(l[k].grad, pc[n .. '.' .. k].grad))
    end
  end
  return rel(yl, yc), worst_g
end

local results = {}

-- 1. equality on the real model -------------------------------------------------------------
local function exists(p) local f = io.open(p, 'rb'); if f then f:close() end return f ~= nil end
if cfg.real and exists(cfg.gguf) then
  local src = pretrained.load{gguf = cfg.gguf}
  local load, hf = src.fresh, src.config
  local t0 = qatlab.time()
  local cpp, lua = load(), load()
  quant.replace(cpp, {preset = cfg.preset, ste_fp16 = cfg.ste_fp16})
  local names = mirror(cpp, lua)
  torch.manual_seed(1)
  local ids = torch.randint(0, hf.vocab_size, {1, cfg.check_tokens})
  local dy, dg = compare(cpp, lua, names, ids)
  results[#results + 1] = ('| SmolLM2-135M, %d projections, %s | %.2e | %.2e | %s |'):format(#names, cfg.preset, dy, dg,
    (dy <= 1e-5 and dg <= 1e-5) and 'yes' or 'NO')
  print(('SmolLM2-135M: %d V2 projections in Lua, logits rel. diff %.2e, A/B/g grads %.2e (%.1f s)'):format(
    #names, dy, dg, qatlab.time() - t0))
elseif cfg.real then
  print('SmolLM2-135M not fetched (tools/fetch_smollm2.sh): equality checked on the benchmark shape only')
end

-- 2. a Qwen3-0.6B decoder layer: equality and step time --------------------------------------
local shape = {
  model_type = 'qwen3', vocab_size = cfg.vocab, hidden_size = cfg.hidden, intermediate_size = cfg.inter,
  num_hidden_layers = 1, num_attention_heads = cfg.heads, num_key_value_heads = cfg.kv_heads,
  head_dim = cfg.head_dim, max_position_embeddings = 4096, tie_word_embeddings = true, initializer_range = 0.02,
}
torch.manual_seed(0)
local cpp = nn.from_config(shape)
quant.replace(cpp, {preset = cfg.preset, ste_fp16 = cfg.ste_fp16})
local lua = nn.from_config(shape)
local names = mirror(cpp, lua)
torch.manual_seed(2)
local dy, dg = compare(cpp, lua, names, torch.randint(0, cfg.vocab, {1, cfg.check_tokens}))
results[#results + 1] = ('| Qwen3-0.6B layer, %d projections, %s | %.2e | %.2e | %s |'):format(
  #names, cfg.preset, dy, dg,
  (dy <= 1e-5 and dg <= 1e-5) and 'yes' or 'NO')

local ids = torch.randint(0, cfg.vocab, {cfg.batch, cfg.tokens})
local function stepper(m)
  local params = {}
  for _, p in ipairs(m:parameters()) do if p.requires_grad then params[#params + 1] = p end end
  return function()
    for _, p in ipairs(params) do p.grad = nil end
    m:forward(ids, {output = 'hidden'}):pow(2):mean():backward()
  end
end
local steps = {cpp = stepper(cpp), lua = stepper(lua)}
for _ = 1, cfg.warmup do steps.cpp(); steps.lua() end
local times = {cpp = {}, lua = {}}
for _ = 1, cfg.iters do   -- alternate, so both see the same machine load
  for _, k in ipairs({'cpp', 'lua'}) do
    collectgarbage()
    local t0 = qatlab.time()
    steps[k]()
    times[k][#times[k] + 1] = qatlab.time() - t0
  end
end
local tc, tl = bench.median(times.cpp), bench.median(times.lua)

print()
print(('## Lua V2 layer vs C++ V2 layer (%s, %s)'):format(cfg.preset, bench.device_name()))
print()
print('| model | logits rel. diff | A/B/g grad rel. diff | within 1e-5 |')
print('|---|---:|---:|:---:|')
for _, r in ipairs(results) do print(r) end
print()
print(('Training step (forward + backward), one decoder layer %dx%d, %d tokens, %d threads, median of %d:'):format(
  cfg.hidden, cfg.inter, cfg.batch * cfg.tokens, cfg.threads, cfg.iters))
print()
print('| layer | s/step | × C++ |')
print('|---|---:|---:|')
print(('| C++ V2 (materialized) | %.3f | 1.00 |'):format(tc))
print(('| Lua V2 (this file) | %.3f | %.2f |'):format(tl, tl / tc))
return {logits_rel = dy, grad_rel = dg, cpp_s = tc, lua_s = tl, ratio = tl / tc}
