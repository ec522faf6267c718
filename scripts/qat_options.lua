-- qat_options: the seed's optional training mechanisms for V2 QAT as trainer hooks and loss wrappers:
-- auto-snap of rank magnitudes (snap to fp16 and freeze once they stop moving) and anchor KL.
--
--   local qo = require 'qat_options'
--   local snap = qo.auto_snap{threshold = 0.05, patience = 2, every = 50}
--   local ak = qo.anchor_kl(anchor_model, {weight = 0.01, T = 1})
--   trainer.new{..., loss = ak:wrap(loss_fn), hooks = snap}
local torch = require 'torch'
local optim = require 'optim'
local log = require 'log'

local M = {}

local MLP = { gate_proj = true, up_proj = true, down_proj = true }
local ATTN = { q_proj = true, k_proj = true, v_proj = true, o_proj = true }

local function check_opts(o, known, who) return require('opts').check(o, known, who, 4) end

-- The projection kind of "<...>.<proj>.rank_magnitude": 'mlp', 'attn' or nil.
local function kind_of(name)
  local proj = name:match('%.([%w_]+)%.rank_magnitude$')
  return MLP[proj] and 'mlp' or ATTN[proj] and 'attn' or nil
end

-- The trainable rank magnitudes of `target` ('mlp', 'attn', 'all'): {{name, tensor}, ...} in model order.
function M.magnitudes(model, target)
  local out = {}
  for _, p in ipairs(model:named_parameters()) do
    local k = kind_of(p[1])
    if k and (target == 'all' or target == k) and p[2].requires_grad then out[#out + 1] = p end
  end
  return out
end

-- g = fp16(g) in place (through the CPU, as the seed does), then frozen.
local function snap_freeze(p)
  torch.no_grad(function() p:copy_(p:detach():half()) end)   -- copy_ casts back
  p:requires_grad_(false)
end

-- A new AdamW over the parameters that still train, with each group's current hyper-parameters
-- (moments are lost, as in the seed). Returns false when the optimizer is not AdamW or the run is
-- data-parallel (its reducer holds the old list): those only freeze (a frozen tensor gets no
-- gradient, so the optimizer skips it and its state is never used again).
local function rebuild(t)
  local groups = t.optimizer:param_groups()
  if t.ddp or not groups[1] or not groups[1].betas then return false end
  local new, base, params = {}, {}, {}
  for i, g in ipairs(groups) do
    local keep = {}
    for _, p in ipairs(g.params) do if p.requires_grad then keep[#keep + 1] = p end end
    if #keep > 0 then
      new[#new + 1] = { params = keep, lr = g.lr, betas = g.betas, eps = g.eps, weight_decay = g.weight_decay }
      base[#base + 1] = t.base_lrs[i] or g.lr
      for _, p in ipairs(keep) do params[#params + 1] = p end
    end
  end
  if #new == 0 then return false end   -- nothing trains any more: the old optimizer skips everything
  t.optimizer, t.base_lrs, t.params = optim.AdamW(new), base, params
  return true
end

-- qat_options.auto_snap{threshold=0.05, patience=2, every=50, start_step=0, min_checks=2, target='mlp',
--   per_layer=false, rebuild=true, dry_run=false, on_snap=fn(t, names)} -> hooks {on_step=} for trainer.new.
-- Every `every` steps (from start_step) it reads the target's rank magnitudes; movement = max |g_now - g_prev|
-- since the last check. The seed's rule (per_layer=false): the max over all target layers; `patience`
-- consecutive checks under `threshold` (and at least min_checks checks) snap every target magnitude to fp16
-- and freeze it, once. per_layer=true applies the same rule to each layer on its own. After a snap the
-- trainer's AdamW is rebuilt over what still trains (rebuild=false: freeze only). The returned table's
-- `state` holds the checks ({step=, movement=, stable=}) and the snapped names.
-- A rebuilt optimizer has fewer tensors than the one a resumed run constructs: resume such a run with the
-- magnitudes frozen before trainer.new (quant.set_trainable(m, 'frozen_magnitude')), or use rebuild=false.
function M.auto_snap(o)
  o = o or {}
  check_opts(o, { threshold = 1, patience = 1, every = 1, start_step = 1, min_checks = 1, target = 1, per_layer = 1,
                  rebuild = 1, dry_run = 1, on_snap = 1 }, 'qat_options.auto_snap')
  local threshold, patience, every = o.threshold or 0.05, o.patience or 2, o.every or 50
  local start, min_checks, target = o.start_step or 0, o.min_checks or 2, o.target or 'mlp'
  assert(threshold > 0, 'qat_options.auto_snap: option threshold must be > 0')
  assert(patience >= 1 and every >= 1, 'qat_options.auto_snap: options patience and every must be >= 1')
  assert(target == 'mlp' or target == 'attn' or target == 'all',
         ("qat_options.auto_snap: option target: expected 'mlp', 'attn' or 'all', got %q"):format(tostring(target)))
  local st = { prev = {}, stable = {}, checks = {}, history = {}, snapped = {}, done = false, rebuilt = 0 }

  local function apply(t, list)
    if #list == 0 then return end
    local names = {}
    for _, p in ipairs(list) do
      if not o.dry_run then snap_freeze(p[2]) end
      names[#names + 1] = p[1]
      st.snapped[#st.snapped + 1] = p[1]
      st.prev[p[1]] = nil
    end
    if o.dry_run then
      log.info(('auto_snap: would snap %d magnitudes (dry run)'):format(#names))
      return
    end
    local rebuilt = o.rebuild ~= false and rebuild(t)
    if rebuilt then st.rebuilt = st.rebuilt + 1 end
    log.info(('auto_snap: step %d: snapped to fp16 and froze %d rank magnitudes%s'):format(
      t.global_step, #names, rebuilt and ' (optimizer rebuilt)' or ''))
    if o.on_snap then o.on_snap(t, names) end
  end

  local function on_step(t, info)
    local s = info.step
    if st.done or s < start or s % every ~= 0 then return end
    local mags = M.magnitudes(t.model, target)
    local moves, worst, ready = {}, nil, {}
    for _, p in ipairs(mags) do
      local now = p[2]:detach():float():cpu():clone()
      local prev = st.prev[p[1]]
      if prev then
        local d = (now - prev):abs():max():item()
        if d ~= d or d == math.huge then   -- NaN or inf: the seed gives up for the run
          log.warn(('auto_snap: non-finite movement in %s; auto-snap disabled'):format(p[1]))
          st.done = true
          return
        end
        moves[p[1]] = d
        worst = math.max(worst or 0, d)
      end
      st.prev[p[1]] = now
      st.checks[p[1]] = (st.checks[p[1]] or 0) + 1
    end
    st.history[#st.history + 1] = { step = s, movement = worst, layers = #mags }
    if worst == nil then return end   -- the first check only records
    if o.per_layer then
      for _, p in ipairs(mags) do
        local d = moves[p[1]]
        if d then
          st.stable[p[1]] = d < threshold and (st.stable[p[1]] or 0) + 1 or 0
          if st.stable[p[1]] >= patience and st.checks[p[1]] >= min_checks then ready[#ready + 1] = p end
        end
      end
      apply(t, ready)
      if #M.magnitudes(t.model, target) == 0 then st.done = true end
    else
      st.stable_all = worst < threshold and (st.stable_all or 0) + 1 or 0
      st.history[#st.history].stable = st.stable_all
      if st.stable_all >= patience and #st.history >= min_checks then
        apply(t, mags)
        st.done = true
      end
    end
  end

  return { on_step = on_step, state = st }
end

-- Hooks tables merged: every on_step/on_eval/on_save of each runs, in order.
function M.merge_hooks(...)
  local out, lists = {}, { on_step = {}, on_eval = {}, on_save = {} }
  for _, h in ipairs({ ... }) do
    for k, list in pairs(lists) do if h[k] then list[#list + 1] = h[k] end end
  end
  for k, list in pairs(lists) do
    if #list > 0 then out[k] = function(...) for _, f in ipairs(list) do f(...) end end end
  end
  return out
end

-- KL(p ‖ q) with p = softmax(anchor / T), q = softmax(student / T), summed over the last dimension and
-- averaged over the positions, times T²: a 0-dim float tensor with gradients to `student`. (..., V) each.
function M.kl(anchor_logits, student_logits, T)
  T = T or 1
  local V = student_logits:size(student_logits:dim())
  local lq = (student_logits:float() / T):log_softmax(student_logits:dim()):reshape(-1, V)
  local lp = (anchor_logits:detach():float() / T):log_softmax(anchor_logits:dim()):reshape(-1, V)
  return (lp:exp() * (lp - lq)):sum(2):mean() * (T * T)
end

local AnchorKL = {}
AnchorKL.__index = AnchorKL

-- qat_options.anchor_kl(anchor_model, {weight=0.01, T=1, interval=1, samples=, ids=fn(batch) -> ids})
-- The seed's anchor KL: weight·KL(p_anchor ‖ p_student) at temperature T (1 in the seed), which keeps a
-- trained model near a reference checkpoint's outputs. The anchor runs without gradients; with `samples`
-- (token ids [n, L]) its logits on those sequences are computed once (the anchor model may then be dropped)
-- and call k uses sample (k - 1) % n + 1, as the seed cycles its fixed anchor samples; otherwise the anchor
-- sees the same batch as the student (online). The seed's full-logits path writes this term as a soft
-- cross-entropy, which differs from the KL by the anchor's entropy (a constant): same gradient.
function M.anchor_kl(anchor, o)
  o = o or {}
  check_opts(o, { weight = 1, T = 1, interval = 1, samples = 1, ids = 1 }, 'qat_options.anchor_kl')
  local self = setmetatable({ anchor = anchor, weight = o.weight or 0.01, T = o.T or 1, interval = o.interval or 1,
                              ids_of = o.ids, calls = 0 }, AnchorKL)
  assert(self.T > 0, 'qat_options.anchor_kl: option T must be > 0')
  assert(self.interval >= 1, 'qat_options.anchor_kl: option interval must be >= 1')
  if o.samples then
    self.samples, self.cached = o.samples, {}
    torch.no_grad(function()
      for i = 1, o.samples:size(1) do self.cached[i] = anchor(o.samples:narrow(1, i, 1)):float() end
    end)
  end
  return self
end

-- The weighted term for `model` on `ids` (or the next fixed sample): weight·T²·KL, and the unweighted KL.
function AnchorKL:loss(model, ids)
  self.calls = self.calls + 1
  local ref
  if self.samples then
    local i = (self.calls - 1) % self.samples:size(1) + 1
    ids, ref = self.samples:narrow(1, i, 1), self.cached[i]
  else
    assert(ids, 'anchor_kl:loss: token ids are required (no fixed samples were given)')
    ref = torch.no_grad(function() return self.anchor(ids) end)
  end
  local kl = M.kl(ref, model(ids), self.T)
  return kl * self.weight, kl
end

-- A trainer loss function: loss_fn(model, batch) + the anchor term every `interval` calls (parts.anchor_kl
-- is the unweighted KL). The batch's token ids: o.ids(batch), else batch.input_ids, else the batch itself.
function AnchorKL:wrap(loss_fn)
  local n = 0
  return function(model, batch)
    local loss, parts = loss_fn(model, batch)
    n = n + 1
    if (n - 1) % self.interval ~= 0 then return loss, parts end
    local ids
    if not self.samples then
      ids = self.ids_of and self.ids_of(batch) or (type(batch) == 'table' and batch.input_ids) or batch
    end
    local term, kl = self:loss(model, ids)
    parts = parts or {}
    parts.anchor_kl = kl:detach()
    return loss + term, parts
  end
end

return M
