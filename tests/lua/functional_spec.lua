-- functional: torch.nn.functional (losses, linear, embedding, norms, activations, attention, pad...)
-- and the tensor ops isnan..bucketize, values and gradients checked against Python torch in one call.
local torch = require 'torch'
local F = require 'torch.nn.functional'
local h = require 'helper'

local function errmsg(f, ...)
  local ok, err = pcall(f, ...)
  assert.is_false(ok, 'expected an error')
  return tostring(err)
end

local function i64(t) return torch.tensor(t, {dtype = 'int64'}) end
local function f64(t) return torch.tensor(t, {dtype = 'float64'}) end

-- Deterministic inputs, S(shape, a, b) = sin(a * i + b) over the flat index i, as in the prelude.
local function S(shape, a, b)
  local n = 1
  for _, s in ipairs(shape) do n = n * s end
  return torch.arange(n):double():mul(a):add(b):sin():view(shape)
end

local X = S({4, 5}, 1.3, 0.2) * 2               -- logits (N, C)
local Y = i64{1, 0, 4, 2}                         -- class indices (0-based data)
local YI = i64{1, -100, 4, 2}                     -- one ignored target
local CW = f64{0.5, 1.0, 2.0, 1.5, 0.25}          -- class weights
local PT = (S({4, 5}, 0.9, 0.4) * 3):softmax(2)   -- class probabilities
local X3 = S({2, 5, 3}, 0.7, 0.1) * 2             -- (N, C, d)
local Y3 = i64{{0, 4, 2}, {3, 3, 1}}
local A = S({3, 4}, 0.8, 0.3)
local B = S({3, 4}, 1.7, 0.9)
local WE = S({3, 4}, 0.3, 0.5):abs() + 0.1        -- elementwise loss weights
local PR = S({3, 4}, 1.1, 0.6):sigmoid()          -- probabilities for BCE
local TB = S({3, 4}, 2.3, 0.1):sigmoid()          -- soft BCE targets
local LW = S({4, 6}, 0.45, 0.2)                   -- linear weight (out 4, in 6)
local LB = S({4}, 1.9, 0.3)
local LX = S({2, 3, 6}, 0.6, 0.8)
local EW = S({6, 4}, 0.55, 0.35) * 2              -- embedding table
local IDS = i64{{0, 3, 5}, {2, 0, 3}}
local NX = S({2, 3, 4}, 0.95, 0.15) * 3
local NW = S({4}, 0.5, 1.0) + 1
local NB = S({4}, 1.5, 0.2)
local Q = S({2, 4, 5, 8}, 0.31, 0.1)              -- (B, H, L, E)
local K = S({2, 4, 6, 8}, 0.27, 0.5)
local V = S({2, 4, 6, 8}, 0.19, 0.9)
local KG = S({2, 2, 6, 8}, 0.23, 0.4)             -- 2 key/value heads for 4 query heads
local VG = S({2, 2, 6, 8}, 0.41, 0.7)
local KC = S({2, 4, 5, 8}, 0.27, 0.5)             -- same length as Q, for is_causal
local VC = S({2, 4, 5, 8}, 0.19, 0.9)
local MB = torch.ones(5, 6):tril(1):bool()        -- bool mask, true = attend
local MF = S({5, 6}, 0.6, 0.2)                    -- additive float mask
local SPECIAL = f64{1, 0 / 0, math.huge, -math.huge, -2.5}
local UQ = i64{3, 1, 3, 2, 1, 3, 0}
local UM = i64{{1, 2}, {0, 5}, {1, 2}, {0, 5}, {4, 4}}
local MD = f64{{3, 1, 4, 1, 5}, {9, 2, 6, 5, 3}, {5, 8, 9, 7, 9}}
local QS = S({3, 7}, 0.77, 0.25)
local SS = f64{1, 3, 5, 7, 9}
local SV = f64{{3, 6, 9}, {1, 10, 5}}
local FD = f64{-7, -3.5, 0, 3, 7.5}

local PRELUDE = [==[
import math, torch
import torch.nn.functional as F
d = torch.float64
def S(shape, a, b): return torch.arange(math.prod(shape), dtype=d).mul(a).add(b).sin().view(shape)
def i64(v): return torch.tensor(v, dtype=torch.int64)
def f64(v): return torch.tensor(v, dtype=d)
# the forward value and the gradients of sum(y * w) for fixed weights w (so softmax's are not 0)
def G(f, *xs):
    xs = [x.detach().clone().requires_grad_(True) for x in xs]
    y = f(*xs)
    w = torch.arange(y.numel(), dtype=d).mul(0.7).add(0.3).cos().view(y.shape)
    (y * w).sum().backward()
    return [y] + [x.grad for x in xs]
X = S((4, 5), 1.3, 0.2) * 2
Y = i64([1, 0, 4, 2])
YI = i64([1, -100, 4, 2])
CW = f64([0.5, 1.0, 2.0, 1.5, 0.25])
PT = (S((4, 5), 0.9, 0.4) * 3).softmax(1)
X3 = S((2, 5, 3), 0.7, 0.1) * 2
Y3 = i64([[0, 4, 2], [3, 3, 1]])
A = S((3, 4), 0.8, 0.3)
B = S((3, 4), 1.7, 0.9)
WE = S((3, 4), 0.3, 0.5).abs() + 0.1
PR = S((3, 4), 1.1, 0.6).sigmoid()
TB = S((3, 4), 2.3, 0.1).sigmoid()
LW = S((4, 6), 0.45, 0.2)
LB = S((4,), 1.9, 0.3)
LX = S((2, 3, 6), 0.6, 0.8)
EW = S((6, 4), 0.55, 0.35) * 2
IDS = i64([[0, 3, 5], [2, 0, 3]])
NX = S((2, 3, 4), 0.95, 0.15) * 3
NW = S((4,), 0.5, 1.0) + 1
NB = S((4,), 1.5, 0.2)
Q = S((2, 4, 5, 8), 0.31, 0.1)
K = S((2, 4, 6, 8), 0.27, 0.5)
V = S((2, 4, 6, 8), 0.19, 0.9)
KG = S((2, 2, 6, 8), 0.23, 0.4)
VG = S((2, 2, 6, 8), 0.41, 0.7)
KC = S((2, 4, 5, 8), 0.27, 0.5)
VC = S((2, 4, 5, 8), 0.19, 0.9)
MB = torch.ones(5, 6).tril(1).bool()
MF = S((5, 6), 0.6, 0.2)
inf = float('inf')
SPECIAL = f64([1, float('nan'), inf, -inf, -2.5])
UQ = i64([3, 1, 3, 2, 1, 3, 0])
UM = i64([[1, 2], [0, 5], [1, 2], [0, 5], [4, 4]])
MD = f64([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3], [5, 8, 9, 7, 9]])
QS = S((3, 7), 0.77, 0.25)
SS = f64([1, 3, 5, 7, 9])
SV = f64([[3, 6, 9], [1, 10, 5]])
FD = f64([-7, -3.5, 0, 3, 7.5])
def emb_max_norm():
    w = EW.clone()
    return [F.embedding(IDS, w, max_norm=1.5, norm_type=1), w]
]==]

-- Lua twin of the prelude's G: forward value, then the gradient of sum(y * w) for each input.
local function G(f, ...)
  local xs = {}
  for i, x in ipairs{...} do xs[i] = x:detach():clone():requires_grad_() end
  local y = f(unpack(xs))
  local w = torch.arange(y:numel()):double():mul(0.7):add(0.3):cos():reshape(y:size())
  local s = (y * w):sum()
  s:backward()
  local r = {y}
  for i, x in ipairs(xs) do r[i + 1] = x.grad end
  return unpack(r)
end

local function dropout_draw()
  torch.manual_seed(7)
  return F.dropout(A, {p = 0.4})
end

-- {name, Lua function (may return several results), Python expression}
local cases = {
  -- cross_entropy
  {'ce', function() return G(function(x) return F.cross_entropy(x, Y) end, X) end,
    'G(lambda x: F.cross_entropy(x, Y), X)'},
  {'ce_weight_sum', function() return G(function(x) return F.cross_entropy(x, Y, CW, {reduction = 'sum'}) end, X) end,
    "G(lambda x: F.cross_entropy(x, Y, CW, reduction='sum'), X)"},
  {'ce_weight_mean', function() return G(function(x) return F.cross_entropy(x, Y, {weight = CW}) end, X) end,
    'G(lambda x: F.cross_entropy(x, Y, weight=CW), X)'},
  {'ce_ignore_default', function() return G(function(x) return F.cross_entropy(x, YI) end, X) end,
    'G(lambda x: F.cross_entropy(x, YI), X)'},
  {'ce_ignore_index', function() return G(function(x) return F.cross_entropy(x, Y, {ignore_index = 4}) end, X) end,
    'G(lambda x: F.cross_entropy(x, Y, ignore_index=4), X)'},
  {'ce_smooth', function()
    return G(function(x) return F.cross_entropy(x, YI, {weight = CW, label_smoothing = 0.1}) end, X)
  end, 'G(lambda x: F.cross_entropy(x, YI, weight=CW, label_smoothing=0.1), X)'},
  {'ce_none', function() return G(function(x) return F.cross_entropy(x, Y, {reduction = 'none'}) end, X) end,
    "G(lambda x: F.cross_entropy(x, Y, reduction='none'), X)"},
  {'ce_probs', function()
    return G(function(x) return F.cross_entropy(x, PT, {label_smoothing = 0.2, weight = CW}) end, X)
  end, 'G(lambda x: F.cross_entropy(x, PT, label_smoothing=0.2, weight=CW), X)'},
  {'ce_nd', function() return G(function(x) return F.cross_entropy(x, Y3, {reduction = 'none'}) end, X3) end,
    "G(lambda x: F.cross_entropy(x, Y3, reduction='none'), X3)"},
  {'ce_unbatched', function() return G(function(x) return F.cross_entropy(x, i64(3)) end, X[1]) end,
    'G(lambda x: F.cross_entropy(x, torch.tensor(3)), X[0])'},
  -- nll_loss
  {'nll', function() return G(function(x) return F.nll_loss(x:log_softmax(2), Y) end, X) end,
    'G(lambda x: F.nll_loss(x.log_softmax(1), Y), X)'},
  {'nll_opts', function()
    return G(function(x) return F.nll_loss(x, Y, {weight = CW, ignore_index = 0, reduction = 'sum'}) end, X)
  end, "G(lambda x: F.nll_loss(x, Y, weight=CW, ignore_index=0, reduction='sum'), X)"},
  {'nll_none', function() return G(function(x) return F.nll_loss(x, Y3, {reduction = 'none'}) end, X3) end,
    "G(lambda x: F.nll_loss(x, Y3, reduction='none'), X3)"},
  -- regression losses
  {'mse', function() return G(function(a, b) return F.mse_loss(a, b) end, A, B) end,
    'G(lambda a, b: F.mse_loss(a, b), A, B)'},
  {'mse_sum_none', function() return F.mse_loss(A, B, {reduction = 'sum'}), F.mse_loss(A, B, {reduction = 'none'}) end,
    "F.mse_loss(A, B, reduction='sum'), F.mse_loss(A, B, reduction='none')"},
  {'mse_weight', function() return G(function(a) return F.mse_loss(a, B, {weight = WE}) end, A) end,
    'G(lambda a: F.mse_loss(a, B, weight=WE), A)'},
  {'l1', function() return G(function(a, b) return F.l1_loss(a, b) end, A, B) end,
    'G(lambda a, b: F.l1_loss(a, b), A, B)'},
  {'l1_opts', function()
    return F.l1_loss(A, B, {reduction = 'none'}), F.l1_loss(A, B, {reduction = 'sum', weight = WE}),
      F.l1_loss(A, B, {weight = WE})
  end, "F.l1_loss(A, B, reduction='none'), F.l1_loss(A, B, reduction='sum', weight=WE), F.l1_loss(A, B, weight=WE)"},
  {'smooth_l1', function() return G(function(a) return F.smooth_l1_loss(a, B) end, A) end,
    'G(lambda a: F.smooth_l1_loss(a, B), A)'},
  {'smooth_l1_beta', function()
    return G(function(a) return F.smooth_l1_loss(a, B, {beta = 0.3, reduction = 'none'}) end, A)
  end, "G(lambda a: F.smooth_l1_loss(a, B, beta=0.3, reduction='none'), A)"},
  {'smooth_l1_beta0', function() return F.smooth_l1_loss(A, B, {beta = 0, reduction = 'sum'}) end,
    "F.smooth_l1_loss(A, B, beta=0.0, reduction='sum')"},
  -- kl_div
  {'kl_batchmean', function()
    return G(function(x) return F.kl_div(x:log_softmax(2), PT, {reduction = 'batchmean'}) end, X)
  end, "G(lambda x: F.kl_div(x.log_softmax(1), PT, reduction='batchmean'), X)"},
  {'kl_log_target', function()
    return G(function(x) return F.kl_div(x:log_softmax(2), PT:log(), {reduction = 'sum', log_target = true}) end, X)
  end, "G(lambda x: F.kl_div(x.log_softmax(1), PT.log(), reduction='sum', log_target=True), X)"},
  {'kl_none_mean', function()
    local lp = X:log_softmax(2)
    return F.kl_div(lp, PT, {reduction = 'none'}), F.kl_div(lp, PT)
  end, "F.kl_div(X.log_softmax(1), PT, reduction='none'), F.kl_div(X.log_softmax(1), PT, reduction='mean')"},
  -- binary cross-entropy
  {'bce', function() return G(function(p) return F.binary_cross_entropy(p, TB) end, PR) end,
    'G(lambda p: F.binary_cross_entropy(p, TB), PR)'},
  {'bce_weight', function()
    return G(function(p) return F.binary_cross_entropy(p, TB, NW, {reduction = 'none'}) end, PR)
  end, "G(lambda p: F.binary_cross_entropy(p, TB, NW, reduction='none'), PR)"},
  {'bce_logits', function()
    return G(function(x) return F.binary_cross_entropy_with_logits(x, TB, {weight = WE, pos_weight = NW}) end, A)
  end, 'G(lambda x: F.binary_cross_entropy_with_logits(x, TB, weight=WE, pos_weight=NW), A)'},
  {'bce_logits_sum', function() return F.binary_cross_entropy_with_logits(A, TB, {reduction = 'sum'}) end,
    "F.binary_cross_entropy_with_logits(A, TB, reduction='sum')"},
  -- linear, embedding
  {'linear', function() return G(function(x, w, b) return F.linear(x, w, b) end, LX, LW, LB) end,
    'G(lambda x, w, b: F.linear(x, w, b), LX, LW, LB)'},
  {'linear_nobias', function() return G(function(x, w) return F.linear(x, w) end, LX, LW) end,
    'G(lambda x, w: F.linear(x, w), LX, LW)'},
  {'embedding', function() return G(function(w) return F.embedding(IDS, w) end, EW) end,
    'G(lambda w: F.embedding(IDS, w), EW)'},
  {'embedding_pad', function() return G(function(w) return F.embedding(IDS, w, {padding_idx = 3}) end, EW) end,
    'G(lambda w: F.embedding(IDS, w, padding_idx=3), EW)'},
  {'embedding_pad_neg', function() return G(function(w) return F.embedding(IDS, w, {padding_idx = -6}) end, EW) end,
    'G(lambda w: F.embedding(IDS, w, padding_idx=-6), EW)'},
  {'embedding_max_norm', function()
    local w = EW:clone()
    local out = F.embedding(IDS, w, {max_norm = 1.5, norm_type = 1})
    return out, w
  end, 'emb_max_norm()'},
  -- norms
  {'layer_norm', function()
    return G(function(x, w, b) return F.layer_norm(x, {4}, {weight = w, bias = b, eps = 1e-3}) end, NX, NW, NB)
  end, 'G(lambda x, w, b: F.layer_norm(x, [4], weight=w, bias=b, eps=1e-3), NX, NW, NB)'},
  {'layer_norm_2d', function() return G(function(x) return F.layer_norm(x, {3, 4}) end, NX) end,
    'G(lambda x: F.layer_norm(x, [3, 4]), NX)'},
  {'layer_norm_pos', function() return F.layer_norm(NX, 4, NW, NB) end, 'F.layer_norm(NX, [4], NW, NB)'},
  {'rms_norm', function() return G(function(x, w) return F.rms_norm(x, {4}, {weight = w}) end, NX, NW) end,
    'G(lambda x, w: F.rms_norm(x, [4], weight=w), NX, NW)'},
  {'rms_norm_eps', function() return G(function(x) return F.rms_norm(x, {3, 4}, {eps = 0.5}) end, NX) end,
    'G(lambda x: F.rms_norm(x, [3, 4], eps=0.5), NX)'},
  {'normalize', function()
    return F.normalize(NX), F.normalize(NX, {p = 1, dim = -1}), F.normalize(NX, 3, 1), F.normalize(A, {eps = 10})
  end, 'F.normalize(NX), F.normalize(NX, p=1, dim=-1), F.normalize(NX, 3, 0), F.normalize(A, eps=10)'},
  {'normalize_grad', function() return G(function(x) return F.normalize(x, {dim = 3}) end, NX) end,
    'G(lambda x: F.normalize(x, dim=2), NX)'},
  {'cosine_similarity', function()
    return F.cosine_similarity(A, B), F.cosine_similarity(A, B, {dim = 1}), F.cosine_similarity(A, B[1], -1),
      F.cosine_similarity(A, A * 1e-9, {eps = 1e-3})
  end, 'F.cosine_similarity(A, B), F.cosine_similarity(A, B, dim=0), F.cosine_similarity(A, B[0], -1), ' ..
       'F.cosine_similarity(A, A * 1e-9, eps=1e-3)'},
  {'cosine_similarity_grad', function() return G(function(a, b) return F.cosine_similarity(a, b) end, A, B) end,
    'G(lambda a, b: F.cosine_similarity(a, b), A, B)'},
  -- dropout (same CPU generator as PyTorch, so the same draw)
  {'dropout_draw', dropout_draw, '(torch.manual_seed(7), F.dropout(A, p=0.4))[1]'},
  -- softmax family
  {'softmax', function() return G(function(x) return F.softmax(x, 2) end, X) end,
    'G(lambda x: F.softmax(x, 1), X)'},
  {'softmax_dims', function() return F.softmax(X3, 1), F.softmax(X3, -1), F.softmax(X3, {dim = 2}) end,
    'F.softmax(X3, 0), F.softmax(X3, -1), F.softmax(X3, dim=1)'},
  {'log_softmax', function() return G(function(x) return F.log_softmax(x, -1) end, X3) end,
    'G(lambda x: F.log_softmax(x, -1), X3)'},
  -- activations
  {'relu', function() return G(function(x) return F.relu(x) end, A) end, 'G(lambda x: F.relu(x), A)'},
  {'gelu', function() return G(function(x) return F.gelu(x) end, NX) end, 'G(lambda x: F.gelu(x), NX)'},
  {'gelu_tanh', function() return G(function(x) return F.gelu(x, {approximate = 'tanh'}) end, NX) end,
    "G(lambda x: F.gelu(x, approximate='tanh'), NX)"},
  {'silu', function() return G(function(x) return F.silu(x) end, NX) end, 'G(lambda x: F.silu(x), NX)'},
  {'softplus', function()
    return F.softplus(NX), F.softplus(NX, {beta = 2, threshold = 1.5}), F.softplus(NX, 0.5)
  end, 'F.softplus(NX), F.softplus(NX, beta=2, threshold=1.5), F.softplus(NX, 0.5)'},
  -- attention
  {'sdpa', function()
    return G(function(q, k, v) return F.scaled_dot_product_attention(q, k, v) end, Q, K, V)
  end, 'G(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), Q, K, V)'},
  {'sdpa_causal', function()
    return G(function(q, k, v) return F.scaled_dot_product_attention(q, k, v, {is_causal = true}) end, Q, KC, VC)
  end, 'G(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), Q, KC, VC)'},
  {'sdpa_gqa', function()
    return G(function(q, k, v)
      return F.scaled_dot_product_attention(q, k, v, {enable_gqa = true, scale = 0.5})
    end, Q, KG, VG)
  end, 'G(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True, scale=0.5), Q, KG, VG)'},
  {'sdpa_masks', function()
    return F.scaled_dot_product_attention(Q, K, V, {attn_mask = MB}), F.scaled_dot_product_attention(Q, K, V, MF)
  end, 'F.scaled_dot_product_attention(Q, K, V, attn_mask=MB), F.scaled_dot_product_attention(Q, K, V, MF)'},
  {'sdpa_mask_grad', function()
    return G(function(q, k, v, m) return F.scaled_dot_product_attention(q, k, v, {attn_mask = m}) end, Q, K, V, MF)
  end, 'G(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m), Q, K, V, MF)'},
  {'sdpa_causal_gqa', function()
    return F.scaled_dot_product_attention(Q, KG:narrow(3, 1, 5), VG:narrow(3, 1, 5), {is_causal = true, enable_gqa = true})
  end, 'F.scaled_dot_product_attention(Q, KG[:, :, :5], VG[:, :, :5], is_causal=True, enable_gqa=True)'},
  -- one_hot, pad
  {'one_hot', function() return F.one_hot(Y), F.one_hot(Y3, 6), F.one_hot(Y, {num_classes = 7}) end,
    'F.one_hot(Y), F.one_hot(Y3, 6), F.one_hot(Y, num_classes=7)'},
  {'pad', function()
    return F.pad(A, {1, 2}), F.pad(A, {1, 0, 0, 2}, {value = -1.5}), F.pad(NX, {2, 1}, 'reflect'),
      F.pad(NX, {1, 1, 2, 0}, {mode = 'replicate'}), F.pad(NX, {1, 2}, {mode = 'circular'}), F.pad(A, {-1, 1, 0, -2})
  end, "F.pad(A, (1, 2)), F.pad(A, (1, 0, 0, 2), value=-1.5), F.pad(NX, (2, 1), 'reflect'), " ..
       "F.pad(NX, (1, 1, 2, 0), mode='replicate'), F.pad(NX, (1, 2), mode='circular'), F.pad(A, (-1, 1, 0, -2))"},
  {'pad_grad', function() return G(function(x) return F.pad(x, {2, 1}, {mode = 'reflect'}) end, A) end,
    "G(lambda x: F.pad(x, (2, 1), mode='reflect'), A)"},
  -- tensor ops
  {'isnan', function() return SPECIAL:isnan(), torch.isfinite(SPECIAL), SPECIAL:isinf(), torch.isnan(Y) end,
    'SPECIAL.isnan(), torch.isfinite(SPECIAL), SPECIAL.isinf(), torch.isnan(Y)'},
  {'unique', function()
    local u, inv, cnt = UQ:unique{return_inverse = true, return_counts = true}
    local u2, c2 = torch.unique(UQ, {return_counts = true})
    local m, mi, mc = torch.unique(UM, {dim = 1, return_inverse = true, return_counts = true})
    return u, inv, cnt, u2, c2, m, mi, mc, UQ:unique(), torch.unique(UM, {dim = -1})
  end, 'list(UQ.unique(return_inverse=True, return_counts=True)) + list(torch.unique(UQ, return_counts=True)) + ' ..
       'list(torch.unique(UM, dim=0, return_inverse=True, return_counts=True)) + [UQ.unique(), torch.unique(UM, dim=-1)]'},
  {'median', function()
    local v, i = MD:median(2)
    local kv, ki = torch.median(MD, {dim = 1, keepdim = true})
    return MD:median(), v, i, kv, ki, torch.median(f64{4, 1, 3, 2})
  end, 'MD.median(), *MD.median(1), *torch.median(MD, dim=0, keepdim=True), torch.median(f64([4, 1, 3, 2]))'},
  {'quantile', function()
    return QS:quantile(0.3), torch.quantile(QS, f64{0.1, 0.5, 0.95}, {dim = 2}),
      QS:quantile(0.25, {dim = 1, keepdim = true}), QS:quantile(0.4, 2, true, 'lower'),
      QS:quantile(0.4, {interpolation = 'higher'}), QS:quantile(0.4, {interpolation = 'midpoint'}),
      QS:quantile(0.45, {interpolation = 'nearest', dim = -1})
  end, "QS.quantile(0.3), torch.quantile(QS, f64([0.1, 0.5, 0.95]), dim=1), QS.quantile(0.25, dim=0, keepdim=True), " ..
       "QS.quantile(0.4, 1, True, interpolation='lower'), QS.quantile(0.4, interpolation='higher'), " ..
       "QS.quantile(0.4, interpolation='midpoint'), QS.quantile(0.45, interpolation='nearest', dim=-1)"},
  {'diag', function()
    return LB:diag(), torch.diag(LB, 1), torch.diag(LB, {diagonal = -2}), MD:diag(), MD:diag{diagonal = 2}, MD:diag(-1)
  end, 'LB.diag(), torch.diag(LB, 1), torch.diag(LB, diagonal=-2), MD.diag(), MD.diag(diagonal=2), MD.diag(-1)'},
  {'repeat_interleave', function()
    return UQ:repeat_interleave(2), UM:repeat_interleave(i64{1, 0, 2, 1, 3}, {dim = 1}),
      torch.repeat_interleave(UM, 2, -1), torch.repeat_interleave(i64{2, 0, 3}),
      UM:repeat_interleave(i64{2, 1}, {dim = 2, output_size = 3})
  end, 'UQ.repeat_interleave(2), UM.repeat_interleave(i64([1, 0, 2, 1, 3]), dim=0), torch.repeat_interleave(UM, 2, -1), ' ..
       'torch.repeat_interleave(i64([2, 0, 3])), UM.repeat_interleave(i64([2, 1]), dim=1, output_size=3)'},
  {'floor_divide', function()
    local t = FD:clone()
    t:floor_divide_(2)
    return FD:floor_divide(2), torch.floor_divide(FD, f64{2, -2, 3, -4, 0.5}), i64{-7, 7, 5}:floor_divide(2), t
  end, 'FD.floor_divide(2), torch.floor_divide(FD, f64([2, -2, 3, -4, 0.5])), i64([-7, 7, 5]).floor_divide(2), ' ..
       'FD.clone().floor_divide_(2)'},
  {'searchsorted', function()
    return torch.searchsorted(SS, SV), SS:searchsorted(SV, {right = true}), torch.searchsorted(SS, SV, {side = 'right'}),
      torch.searchsorted(SS, 5), torch.searchsorted(f64{{1, 2, 3}, {2, 4, 6}}, f64{{2.5, 3}, {4, 0}}),
      torch.searchsorted(f64{9, 1, 5, 3}, f64{4, 6}, {sorter = i64{1, 3, 2, 0}})
  end, "torch.searchsorted(SS, SV), torch.searchsorted(SS, SV, right=True), torch.searchsorted(SS, SV, side='right'), " ..
       'torch.searchsorted(SS, 5), torch.searchsorted(f64([[1, 2, 3], [2, 4, 6]]), f64([[2.5, 3], [4, 0]])), ' ..
       'torch.searchsorted(f64([9, 1, 5, 3]), f64([4, 6]), sorter=i64([1, 3, 2, 0]))'},
  {'bucketize', function()
    return torch.bucketize(SV, SS), SV:bucketize(SS, {right = true}), torch.bucketize(7, SS),
      torch.bucketize(7, SS, {right = true})
  end, 'torch.bucketize(SV, SS), torch.bucketize(SV, SS, right=True), torch.bucketize(7, SS), ' ..
       'torch.bucketize(7, SS, right=True)'},
}

local ref
local function pyref()
  ref = ref or h.pycases(PRELUDE, cases)
  return ref
end
local agree, to_lua = h.agree, h.to_lua

describe('torch.nn.functional and the new tensor ops agree with Python torch (float64)', function()
  local r
  setup(function() r = pyref() end)
  for _, c in ipairs(cases) do
    it(c[1], function()
      local res = {c[2]()}
      local got = #res == 1 and to_lua(res[1]) or to_lua(res)
      local want = r[c[1]]
      assert(want ~= nil, 'no Python result for ' .. c[1])
      agree(got, want, c[1], 1e-10)
    end)
  end
end)

describe('torch.nn.functional', function()
  it('is one module table, also reachable again through require', function()
    assert.are.equal(F, require 'torch.nn.functional')
    assert.are.equal('function', type(F.cross_entropy))
  end)

  it('cross_entropy matches the hand-written next-token loss it replaces', function()
    local logits = S({2, 3, 5}, 0.9, 0.1)
    local y = i64{{1, 4, 0}, {2, 2, 3}}
    local manual = -logits:log_softmax(3):gather(3, y:unsqueeze(3)):mean()
    h.close(F.cross_entropy(logits:flatten(1, 2), y:flatten()), manual, 1e-12)
    h.close(F.cross_entropy(logits:transpose(2, 3), y), manual, 1e-12)
  end)

  it('dropout: identity when not training or p = 0, zeros at p = 1, scaled survivors otherwise', function()
    assert.is_true(F.dropout(A, {training = false}):equal(A))
    assert.is_true(F.dropout(A, 0):equal(A))
    assert.are.equal(0, F.dropout(A, {p = 1}):abs():sum():item())
    local x = torch.ones(10000, {dtype = 'float64'})
    local y = F.dropout(x, {p = 0.25})
    assert.is_true(y:eq(0):logical_or(y:eq(1 / 0.75)):all():item())
    assert.is_true(math.abs(y:mean():item() - 1) < 0.05)
    local z = x:clone()
    assert.are.equal(z, F.dropout(z, {p = 0.5, inplace = true}))
    assert.is_true(z:eq(0):any():item())
  end)

  it('relu and silu work in place on request', function()
    local t = A:clone()
    assert.are.equal(t, F.relu(t, {inplace = true}))
    h.close(t, A:relu())
    local s = A:clone()
    F.silu(s, true)
    h.close(s, A:silu())
  end)

  it('softmax takes a dtype', function()
    local s = F.softmax(X:float(), 2, {dtype = 'float64'})
    assert.are.equal('float64', s.dtype)
    assert.are.equal('float64', F.log_softmax(X:float(), -1, {dtype = 'float64'}).dtype)
  end)

  it('searchsorted and bucketize return int64, or int32 with out_int32', function()
    assert.are.equal('int64', torch.searchsorted(SS, SV).dtype)
    assert.are.equal('int32', torch.searchsorted(SS, SV, {out_int32 = true}).dtype)
    assert.are.equal('int32', torch.bucketize(SV, SS, {out_int32 = true}).dtype)
    assert.are.equal('bool', SPECIAL:isnan().dtype)
  end)
end)

describe('bad input gets errors naming the function and the argument', function()
  local function has(msg, ...)
    for _, want in ipairs{...} do
      assert(msg:find(want, 1, true), ('error %q does not mention %q'):format(msg, want))
    end
  end

  it('in the losses', function()
    has(errmsg(F.cross_entropy, X, Y, {reduction = 'avg'}), 'F.cross_entropy', "option 'reduction'", "'avg'")
    has(errmsg(F.mse_loss, A, B, {reduction = 'batchmean'}), 'F.mse_loss', 'reduction', 'batchmean')
    has(errmsg(F.mse_loss, A, B, {reduce = 'sum'}), 'F.mse_loss', "unknown option 'reduce'", 'reduction')
    has(errmsg(F.cross_entropy, X, Y, {ignore = 1}), 'F.cross_entropy', "unknown option 'ignore'", 'ignore_index')
    has(errmsg(F.cross_entropy, X, torch.tensor{1, 0, 4, 2}), 'F.cross_entropy', 'argument #2 to \'F.cross_entropy\' (target:', 'int64')
    has(errmsg(F.cross_entropy, X, i64{1, 0}), 'F.cross_entropy', 'argument #2 to \'F.cross_entropy\' (target:', '(4,)', '(2,)')
    has(errmsg(F.cross_entropy, X, Y:int()), 'argument #2 to \'F.cross_entropy\' (target:', 'int32')
    has(errmsg(F.cross_entropy, X, Y, {label_smoothing = 1.5}), "option 'label_smoothing'")
    has(errmsg(F.cross_entropy, X, i64{1, 0, 9, 2}), 'F.cross_entropy', 'out of bounds')
    has(errmsg(F.nll_loss, X, PT), 'F.nll_loss', 'argument #2 to \'F.nll_loss\' (target:')
    has(errmsg(F.cross_entropy, Y, Y), 'F.cross_entropy', 'argument #1 to \'F.cross_entropy\' (input:', 'floating-point')
    has(errmsg(F.binary_cross_entropy, PR, TB:narrow(1, 1, 2)), 'F.binary_cross_entropy', 'argument #2 to \'F.binary_cross_entropy\' (target:')
    has(errmsg(F.binary_cross_entropy_with_logits, A, TB, {pos_weigth = NW}), "unknown option 'pos_weigth'")
    has(errmsg(F.kl_div, X, PT, {reduction = 'batch'}), 'F.kl_div', 'batchmean')
    has(errmsg(F.mse_loss, A, B, {weight = NW}), 'F.mse_loss', "option 'weight'")
    has(errmsg(F.smooth_l1_loss, A, B, {beta = -1}), 'F.smooth_l1_loss', "option 'beta'")
    has(errmsg(F.cross_entropy, X), 'F.cross_entropy', 'argument #2 to \'F.cross_entropy\' (target:', 'expected a Tensor')
  end)

  it('in the layers, norms and activations', function()
    has(errmsg(F.softmax, X, 3), 'F.softmax', 'dim 3 out of range')
    has(errmsg(F.softmax, X), 'F.softmax', 'argument #2 (dim) is required')
    has(errmsg(F.log_softmax, X, 0), 'F.log_softmax', '1-based')
    has(errmsg(F.linear, LX, LW:t()), 'F.linear', 'argument #2 to \'F.linear\' (weight:')
    has(errmsg(F.embedding, torch.tensor{1, 2}, EW), 'F.embedding', 'argument #1 to \'F.embedding\' (input:', 'int64')
    has(errmsg(F.embedding, IDS, EW, {padding_idx = 6}), 'F.embedding', "option 'padding_idx'")
    has(errmsg(F.layer_norm, NX, {3}), 'F.layer_norm', 'argument #2 to \'F.layer_norm\' (normalized_shape:')
    has(errmsg(F.layer_norm, NX, {4}, {weigth = NW}), 'F.layer_norm', "unknown option 'weigth'")
    has(errmsg(F.rms_norm, NX, 'x'), 'F.rms_norm', 'argument #2 to \'F.rms_norm\' (normalized_shape:')
    has(errmsg(F.dropout, A, {p = 1.5}), 'F.dropout', 'argument #2 to \'F.dropout\' (p:')
    has(errmsg(F.gelu, A, {approximate = 'fast'}), 'F.gelu', "option 'approximate'", "'fast'")
    has(errmsg(F.normalize, A, {dim = 3}), 'F.normalize', 'dim 3 out of range')
    has(errmsg(F.cosine_similarity, A, B, {dim = 0}), 'F.cosine_similarity', 'dim 0 is invalid')
    has(errmsg(F.one_hot, torch.tensor{0, 1}), 'F.one_hot', 'argument #1 to \'F.one_hot\' (input:', 'int64')
    has(errmsg(F.pad, A, {1, 2, 3}), 'F.pad', 'argument #2 to \'F.pad\' (pad:', 'pairs')
    has(errmsg(F.pad, A, {1, 1}, {mode = 'mirror'}), 'F.pad', 'argument #3 to \'F.pad\' (mode:', "'mirror'")
    has(errmsg(F.pad, A, {1, 1}, {mode = 'reflect', value = 1}), 'F.pad', 'argument #3 to \'F.pad\' (option \'value\':')
    has(errmsg(F.pad, A, {1.5, 1}), 'F.pad', 'argument #2 to \'F.pad\' (pad:', 'entry 1')
  end)

  it('in scaled_dot_product_attention', function()
    has(errmsg(F.scaled_dot_product_attention, Q, KG, VG), 'F.scaled_dot_product_attention', 'argument #2 to \'F.scaled_dot_product_attention\' (key:',
        'enable_gqa')
    has(errmsg(F.scaled_dot_product_attention, Q, K, V, {attn_mask = MB, is_causal = true}), 'attn_mask', 'is_causal')
    has(errmsg(F.scaled_dot_product_attention, Q, K:narrow(4, 1, 4), V), 'argument #2 to \'F.scaled_dot_product_attention\' (key:')
    has(errmsg(F.scaled_dot_product_attention, Q, K, V:narrow(3, 1, 2)), 'argument #3 to \'F.scaled_dot_product_attention\' (value:')
    has(errmsg(F.scaled_dot_product_attention, Q, K, V, {attn_mask = MB:long()}), 'argument #4 to \'F.scaled_dot_product_attention\'', 'attn_mask')
    has(errmsg(F.scaled_dot_product_attention, Q, K, V, {causal = true}), "unknown option 'causal'", 'is_causal')
  end)

  it('in the tensor ops', function()
    has(errmsg(torch.quantile, QS, 0.5, {interpolation = 'cubic'}), 'torch.quantile', 'argument #3 to \'torch.quantile\' (option \'interpolation\':')
    has(errmsg(torch.quantile, QS, 1.5), 'torch.quantile', 'argument #2 to \'torch.quantile\' (q:')
    has(errmsg(function() return QS:quantile('x') end), 'Tensor.quantile', 'argument #2 to \'Tensor.quantile\' (q:')
    has(errmsg(function() return UM:unique{dim = 3} end), 'Tensor.unique', 'dim 3 out of range')
    has(errmsg(torch.unique, UQ, {return_index = true}), 'torch.unique', "unknown option 'return_index'")
    has(errmsg(torch.median, MD, 0), 'torch.median', 'dim 0 is invalid')
    has(errmsg(torch.diag, NX), 'torch.diag', 'argument #1 to \'torch.diag\' (input:')
    has(errmsg(torch.repeat_interleave, UQ, -1), 'torch.repeat_interleave', 'argument #2 to \'torch.repeat_interleave\' (repeats:')
    has(errmsg(torch.searchsorted, SS, SV, {side = 'middle'}), 'torch.searchsorted', "option 'side'")
    has(errmsg(torch.searchsorted, SS, 'x'), 'torch.searchsorted', 'argument #2 to \'torch.searchsorted\' (input:')
    has(errmsg(torch.bucketize, SV, SV), 'torch.bucketize', 'argument #2 to \'torch.bucketize\' (boundaries:')
    has(errmsg(function() return SPECIAL:isnan{x = 1} end), 'Tensor.isnan', "unknown option 'x'")
  end)
end)
