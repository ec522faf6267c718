-- bench_step: the seed's V2-KD training step as a module (model, synthetic teacher batch, one step, FLOP
-- count, max-batch search), shared by experiments/bench_train.lua, bench_dist.lua and their specs.
local torch, nn, quant, kd, optim = require 'torch', require 'nn', require 'quant', require 'kd', require 'optim'


local M = {}

-- Model shapes (Qwen3 layout: q/k norms, tied lm_head). smollm2 and qwen3 are the real models' dims
-- (SmolLM2-135M is a Llama; here it keeps its dims in the Qwen3 block, which adds only two head norms).
M.SHAPES = {
  smoke = {layers = 1, hidden = 64, inter = 192, heads = 4, kv_heads = 2, head_dim = 16, vocab = 512},
  tiny = {layers = 2, hidden = 128, inter = 384, heads = 4, kv_heads = 2, head_dim = 32, vocab = 4096},
  smollm2 = {layers = 30, hidden = 576, inter = 1536, heads = 9, kv_heads = 3, head_dim = 64, vocab = 49152},
  qwen3 = {layers = 28, hidden = 1024, inter = 3072, heads = 16, kv_heads = 8, head_dim = 128, vocab = 151936},
}

-- The shape's name from the options: shape= wins, then full=true (qwen3), tiny=true (smoke), else tiny.
function M.shape_name(c)
  local s = c.shape ~= nil and c.shape ~= '' and c.shape or (c.full and 'qwen3' or (c.tiny and 'smoke' or 'tiny'))
  if not M.SHAPES[s] then
    local known = {}
    for k in pairs(M.SHAPES) do known[#known + 1] = k end
    table.sort(known)
    error(('bench_step: shape: expected one of %s, got %q'):format(table.concat(known, ', '), tostring(s)), 0)
  end
  return s
end

-- The model dims: the shape, then single overrides (c.layers etc. > 0).
function M.dims(c)
  local d = {}
  for k, v in pairs(M.SHAPES[M.shape_name(c)]) do d[k] = (c[k] or 0) > 0 and c[k] or v end
  return d
end

function M.qwen3_config(d, L)
  return {model_type = 'qwen3', vocab_size = d.vocab, hidden_size = d.hidden, intermediate_size = d.inter,
          num_hidden_layers = d.layers, num_attention_heads = d.heads, num_key_value_heads = d.kv_heads,
          head_dim = d.head_dim, max_position_embeddings = math.max(L, 64), tie_word_embeddings = true,
          rope_theta = 1e6, rms_norm_eps = 1e-6, initializer_range = 0.02}
end

-- A V2 student: random Qwen3 init, the preset's LUT layers (SVD init, frozen Q), all scales trainable.
-- o: {preset=, form='materialized'|'loop'|'batched'|'seed', ste=, dtype=, device=, ckpt=}
-- ('seed' = the seed's choice per layer: batched for rank >= 16, else loop).
function M.build_model(d, L, o)
  local mc = M.qwen3_config(d, L)
  local m = o.device and nn.from_config(mc, {device = o.device}) or nn.from_config(mc)
  local form, preset, ste = o.form or 'materialized', o.preset or 'q2a4', o.ste or false
  if form == 'seed' then   -- the seed's per-layer default: batched for rank >= 16, else the loop
    local p = quant.preset(preset)
    local function f(r) return r >= 16 and 'batched' or 'loop' end
    quant.replace(m, {preset = preset, ste_fp16 = ste, attn = false, forward = f(p.mlp_rank)})
    quant.replace(m, {preset = preset, ste_fp16 = ste, mlp = false, forward = f(p.attn_rank)})
  else
    quant.replace(m, {preset = preset, ste_fp16 = ste, forward = form})
  end
  quant.set_trainable(m, 'all')
  if o.dtype and o.dtype ~= 'float32' and o.dtype ~= 'autocast' then m:to{dtype = o.dtype} end
  if type(o.ckpt) == 'number' then m:gradient_checkpointing(o.ckpt) else m:gradient_checkpointing(o.ckpt ~= false) end
  m:train()
  return m
end

-- Teacher top-k generated on the fly: (B, L) ids, (B, S, K) random ids, logits sorted descending (fp16).
function M.synthetic_batch(d, B, L, K, device)
  local S = L - 1
  local logits = (torch.randn(B, S, K) * 3):sort(3, {descending = true})
  return {input_ids = torch.randint(0, d.vocab, {B, L}, {dtype = 'int64'}):to{device = device},
          topk_idx = torch.randint(0, d.vocab, {B, S, K}, {dtype = 'int64'}):to{device = device},
          topk_logits = logits:half():to{device = device}}
end

-- The lm_head weight (V, H): the tied embedding.
function M.head_weight(m)
  for _, kv in ipairs(m:named_parameters()) do
    if kv[1] == 'model.embed_tokens.weight' then return kv[2] end
  end
  error('bench_train: the model has no model.embed_tokens.weight', 0)
end

-- One training step as a function () -> loss: KD loss (fused chunked kd.loss_model, or the unfused
-- kd.loss_reference on the hidden states when o.fused == false), backward, clip, AdamW, zero_grad.
-- o: {lr, T, hard_top1, hard_full, clip, fused, chunk, autocast = false | 'cpu' | 'cuda' (bf16 autocast of
-- forward + loss; parameters, gradients and AdamW stay fp32)}
function M.make_step(m, batch, o)
  local opt = optim.AdamW(m, {lr = o.lr or 5e-5, weight_decay = 0})
  local kopts = {T = o.T or 2, hard_top1 = o.hard_top1 or 0.2, hard_full = o.hard_full or 0.00005}
  if o.chunk then kopts.chunk = o.chunk end
  local W = M.head_weight(m)
  local function loss_of()
    if o.fused == false then
      local h = m:forward(batch.input_ids, {output = 'hidden'})   -- (B, L, H)
      return (kd.loss_reference(h, W, batch, kopts))
    end
    return (kd.loss_model(m, batch, kopts))
  end
  local ac = o.autocast == true and 'cuda' or o.autocast
  return function()
    local loss = ac and torch.autocast(ac, {dtype = 'bfloat16'}, loss_of) or loss_of()
    loss:backward()
    if (o.clip or 1) > 0 then optim.clip_grad_norm(m:parameters(), o.clip or 1) end
    opt:step()
    opt:zero_grad()
    local v = loss:item()
    loss:free()
    return v
  end
end

-- Model FLOPs of one step (see the header) and their parts.
function M.train_flops(d, B, L, K, preset)
  local p = quant.preset(preset)
  local H, q, kv, I = d.hidden, d.heads * d.head_dim, d.kv_heads * d.head_dim, d.inter
  local n_mm = d.layers * (H * q + 2 * H * kv + q * H + 3 * H * I)
  local dense = B * L * (6 * n_mm + 12 * d.layers * L * q)
  local head = B * (L - 1) * 4 * H * (d.vocab + K)
  local scales = 6 * d.layers * (p.attn_rank * (H * q + 2 * H * kv + q * H) + p.mlp_rank * 3 * H * I)
  return dense + head + scales, {dense = dense, head = head, scales = scales, n_mm = n_mm}
end

M.FLOP_FORMULA = 'F = B*L*(6*N_mm + 12*n_layer*L*n_head*head_dim) + B*(L-1)*4*H*(V+K) + 6*sum_proj(out*in*r)'

-- The largest batch in [start, cap] for which fits(batch) holds: doubling from start until a miss or
-- the cap, then bisection between the last fit and the first miss (fits is assumed monotone; each batch
-- is tried once). Returns the max batch (nil when start misses) and the first miss (nil when cap fits).
function M.search_max_batch(fits, start, cap)
  assert(start >= 1 and cap >= start, 'bench_train: need 1 <= max_batch_start <= max_batch_cap')
  local lo, hi, b = nil, nil, start
  while true do
    if fits(b) then lo = b else hi = b; break end
    if b >= cap then break end
    b = math.min(2 * b, cap)
  end
  while lo and hi and hi - lo > 1 do
    local mid = math.floor((lo + hi) / 2)
    if fits(mid) then lo = mid else hi = mid end
  end
  return lo, hi
end

-- "1.23 1.10 0.98" (1, 5, 15 min) from /proc/loadavg, or "n/a": printed beside every timing.
function M.load_average()
  local f = io.open('/proc/loadavg')
  if not f then return 'n/a' end
  local s = f:read('*l') or ''
  f:close()
  return s:match('^(%S+ %S+ %S+)') or 'n/a'
end

return M
