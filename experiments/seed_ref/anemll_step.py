# anemll_step: the seed's V2-KD training step in plain PyTorch, written from docs/formulas.md §2.3-§2.5,
# docs/formulas.md §11, docs/formulas.md §6 (rank-by-rank V2 forward, unfused KD loss, AdamW); times it or replays a saved init.
#
#   python3 experiments/seed_ref/anemll_step.py --layers 2 --hidden 128 --vocab 4096 --L 64 --batch 8
#   python3 experiments/seed_ref/anemll_step.py --init init.safetensors --batch-file batch.safetensors \
#       --warmup 0 --steps 3 --save-params after.safetensors
#
# Prints one JSON line: step_s (median of the timed steps), tokens_s, peak/base memory bytes (CUDA
# max allocated, or VmHWM/VmRSS on the CPU after clear_refs), the losses of every step.
import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

PRESETS = {  # train_v2_simple CONFIG_PRESETS: (mlp lut, mlp rank, attn lut, attn rank)
    'q2a4': (4, 32, 16, 8), 'q4a4': (16, 4, 16, 4), 'q4a4_r32': (16, 32, 16, 32), 'q2a2': (4, 32, 4, 32)}


def ste_fp16(x):
    # docs/formulas.md §2.5: forward value fp16(clamp(x)), backward identity; fp16 input passes through.
    if x.dtype == torch.float16:
        return x
    return x + (x.clamp(-65504, 65504).to(torch.float16).to(x.dtype) - x).detach()


def make_lut(n):
    # docs/formulas.md §1: linspace(-1, 1, n) built in fp16 on the CPU, then upcast.
    return torch.linspace(-1, 1, n, dtype=torch.float16).float()


class V2Linear(nn.Module):
    """AnemllQATLinearV2 as the seed trains it: frozen weight and fp32 Q buffer, trainable A, B, g."""

    def __init__(self, out_f, in_f, lut_size, rank, ste):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_f, in_f), requires_grad=False)   # kept, unused
        self.scale_A = nn.Parameter(torch.empty(out_f, rank))                        # [out, r]
        self.scale_B = nn.Parameter(torch.empty(rank, in_f))                         # [r, in]
        self.rank_magnitude = nn.Parameter(torch.ones(rank))                         # [r]
        self.register_buffer('lut', make_lut(lut_size))
        self.register_buffer('_Q', torch.empty(out_f, in_f))                         # lut[idx], fp32
        self.ste = ste
        self.batched = rank >= 16   # the seed's default use_batched_forward = (scale_rank >= 16)

    def scales(self):
        # docs/formulas.md §2.3: unit columns of A, unit rows of B (norm clamp 1e-6), g + 1e-6 (identity activation).
        A_dir = self.scale_A / self.scale_A.norm(dim=0, keepdim=True).clamp(min=1e-6)
        B_dir = self.scale_B / self.scale_B.norm(dim=1, keepdim=True).clamp(min=1e-6)
        g = self.rank_magnitude + 1e-6
        return A_dir, B_dir, (ste_fp16(g) if self.ste else g)

    def forward(self, x):  # (..., in) -> (..., out)
        st = ste_fp16 if self.ste else (lambda t: t)
        A_dir, B_dir, g = self.scales()
        Q = st(self._Q.to(x.dtype))
        if self.batched:   # docs/formulas.md §2.4 batched: X (..., r, in), Y (..., r, out)
            Bm = st(B_dir)
            Am = st((A_dir * g).t())
            X = st(x.unsqueeze(-2) * Bm)
            Y = st(torch.einsum('...ri,oi->...ro', X, Q))
            return st((Y * Am).sum(-2))
        y = torch.zeros(*x.shape[:-1], Q.shape[0], dtype=x.dtype, device=x.device)
        for k in range(A_dir.shape[1]):   # docs/formulas.md §2.4 loop: r full GEMMs, the accumulator rounded every rank
            b = st(B_dir[k])
            a = st(g[k] * A_dir[:, k])
            v = st(F.linear(st(x * b), Q))
            y = st(y + a * v)
        return y


class RMSNorm(nn.Module):
    def __init__(self, n, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n), requires_grad=False)
        self.eps = eps

    def forward(self, x):  # HF: normalize in fp32, cast back, scale
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), -1)


class Attention(nn.Module):
    def __init__(self, c, q):
        super().__init__()
        self.nh, self.kvh, self.hd = c.heads, c.kv_heads, c.head_dim
        lut, r = q[2], q[3]
        self.q_proj = V2Linear(c.heads * c.head_dim, c.hidden, lut, r, c.ste)
        self.k_proj = V2Linear(c.kv_heads * c.head_dim, c.hidden, lut, r, c.ste)
        self.v_proj = V2Linear(c.kv_heads * c.head_dim, c.hidden, lut, r, c.ste)
        self.o_proj = V2Linear(c.hidden, c.heads * c.head_dim, lut, r, c.ste)
        self.q_norm = RMSNorm(c.head_dim, 1e-6)
        self.k_norm = RMSNorm(c.head_dim, 1e-6)

    def forward(self, x, cos, sin):  # x (B, T, C); cos/sin (T, hd)
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.nh, self.hd)).transpose(1, 2)    # (B, nh, T, hd)
        k = self.k_norm(self.k_proj(x).view(B, T, self.kvh, self.hd)).transpose(1, 2)   # (B, kvh, T, hd)
        v = self.v_proj(x).view(B, T, self.kvh, self.hd).transpose(1, 2)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = self.nh // self.kvh   # HF repeat_kv before SDPA
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        o = F.scaled_dot_product_attention(q, k, v.to(q.dtype), is_causal=True)          # (B, nh, T, hd)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.nh * self.hd))


class MLP(nn.Module):
    def __init__(self, c, q):
        super().__init__()
        self.gate_proj = V2Linear(c.inter, c.hidden, q[0], q[1], c.ste)
        self.up_proj = V2Linear(c.inter, c.hidden, q[0], q[1], c.ste)
        self.down_proj = V2Linear(c.hidden, c.inter, q[0], q[1], c.ste)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, c, q):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden, 1e-6)
        self.self_attn = Attention(c, q)
        self.post_attention_layernorm = RMSNorm(c.hidden, 1e-6)
        self.mlp = MLP(c, q)

    def forward(self, x, cos, sin):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))


class Inner(nn.Module):
    def __init__(self, c, q):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab, c.hidden)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(Layer(c, q) for _ in range(c.layers))
        self.norm = RMSNorm(c.hidden, 1e-6)


class Student(nn.Module):
    """Qwen3 decoder (tied lm_head) whose 7 projections per layer are V2 layers."""

    def __init__(self, c):
        super().__init__()
        self.model = Inner(c, PRESETS[c.preset])
        self.ckpt = c.ckpt
        self.hd = c.head_dim

    def hidden(self, ids):  # (B, L) -> (B, L, C) after the final norm
        T = ids.shape[1]
        inv = 1.0 / (1e6 ** (torch.arange(0, self.hd, 2, device=ids.device).float() / self.hd))
        freqs = torch.outer(torch.arange(T, device=ids.device).float(), inv)
        emb = torch.cat((freqs, freqs), -1)
        cos, sin = emb.cos(), emb.sin()
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            if self.ckpt and self.training:   # HF gradient_checkpointing_enable(use_reentrant=False)
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        return self.model.norm(x)


def kd_loss(model, batch, T, hard):
    # docs/formulas.md §6 compute_kd_loss_batch: top-K gather logits (materializes (N, K, H)), T²-scaled KL over
    # the K candidates, plus (hard_top1 + hard_full) × full-vocabulary CE on the teacher argmax ((N, V)).
    h = model.hidden(batch['input_ids'])[:, :-1]                       # (B, S, H)
    H = h.shape[-1]
    h = h.reshape(-1, H)                                               # (N, H)
    W = model.model.embed_tokens.weight                                # tied lm_head (V, H)
    idx = batch['topk_idx'].reshape(h.shape[0], -1)                    # (N, K)
    z_s = torch.einsum('nh,nkh->nk', h, W[idx])
    z_t = batch['topk_logits'].reshape(idx.shape).to(W.dtype)
    log_p_s = F.log_softmax(z_s / T, dim=-1)
    log_p_t = F.log_softmax(z_t / T, dim=-1)
    loss = (T * T) * (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean()
    if hard > 0:
        logits = h @ W.t()                                             # (N, V)
        loss = loss + hard * F.cross_entropy(logits, idx[:, 0])
    return loss


def rss_kb(key):
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(key + ':'):
                return int(line.split()[1])
    return 0


def reset_peak_rss():
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    except OSError:
        pass


def random_init(model, c):
    # Timing only: values do not change the work. Unit-norm directions, g ~ 0.05, random LUT indices.
    torch.manual_seed(c.seed)
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 0.02)
        for m in model.modules():
            if isinstance(m, V2Linear):
                m.weight.normal_(0, 0.02)
                m.scale_A.copy_(F.normalize(torch.randn_like(m.scale_A), dim=0))
                m.scale_B.copy_(F.normalize(torch.randn_like(m.scale_B), dim=1))
                m.rank_magnitude.fill_(0.05)
                m._Q.copy_(m.lut[torch.randint(0, m.lut.numel(), m._Q.shape)])


def load_init(model, path):
    # qatlab's state_dict (safetensors, the seed's key names): _indices (uint8) become _Q = lut[idx].
    from safetensors.torch import load_file
    sd = load_file(path)
    own = dict(model.named_parameters())
    own.update(dict(model.named_buffers()))
    used = set()
    with torch.no_grad():
        for name, t in own.items():
            if name.endswith('._Q'):
                base = name[:-3]
                t.copy_(sd[base + '.lut'][sd[base + '._indices'].long()])
                used.update({base + '._indices'})
            elif name in sd:
                t.copy_(sd[name])
                used.add(name)
            else:
                sys.exit(f'anemll_step: {path}: missing key {name}')
    extra = [k for k in sd if k not in used and not k.endswith('_scales_baked_flag')]
    if extra:
        sys.exit(f'anemll_step: {path}: unexpected keys {extra[:5]}')


def synthetic_batch(c, device):
    # Teacher top-k "cache" generated on the fly: K random ids per position, logits sorted descending.
    g = torch.Generator().manual_seed(c.seed + 1)
    S = c.L - 1
    return {
        'input_ids': torch.randint(0, c.vocab, (c.batch, c.L), generator=g).to(device),
        'topk_idx': torch.randint(0, c.vocab, (c.batch, S, c.K), generator=g).to(device),
        'topk_logits': (3 * torch.randn(c.batch, S, c.K, generator=g)).sort(-1, descending=True).values
                       .half().to(device),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__)
    a = p.add_argument
    a('--layers', type=int, default=2); a('--hidden', type=int, default=128); a('--inter', type=int, default=384)
    a('--heads', type=int, default=4); a('--kv-heads', type=int, default=2); a('--head-dim', type=int, default=32)
    a('--vocab', type=int, default=4096); a('--preset', default='q2a4', choices=sorted(PRESETS))
    a('--L', type=int, default=64); a('--batch', type=int, default=8); a('--K', type=int, default=32)
    a('--T', type=float, default=2.0); a('--hard', type=float, default=0.20005, help='hard_top1 + hard_full')
    a('--lr', type=float, default=5e-5); a('--clip', type=float, default=1.0)
    a('--ckpt', type=int, default=1, help='per-layer activation checkpointing')
    a('--ste', type=int, default=0, help='STE-FP16 in the V2 forward')
    a('--amp', default='auto', choices=['auto', 'none', 'autocast', 'bf16'],
      help='none: fp32; autocast: fp32 params + bf16 autocast (train_v2_simple); bf16: model in bf16 '
           '(speedrun/benchmark.py); auto: autocast on CUDA, none on the CPU')
    a('--device', default='auto'); a('--threads', type=int, default=0); a('--seed', type=int, default=0)
    a('--warmup', type=int, default=1); a('--steps', type=int, default=3)
    a('--init', default='', help='safetensors state dict to start from (qatlab key names)')
    a('--batch-file', default='', help='safetensors with input_ids, topk_idx, topk_logits')
    a('--save-params', default='', help='write the trainable parameters after the last step here')
    c = p.parse_args()
    c.ckpt, c.ste = bool(c.ckpt), bool(c.ste)
    dev = torch.device(('cuda' if torch.cuda.is_available() else 'cpu') if c.device == 'auto' else c.device)
    if c.threads > 0:
        torch.set_num_threads(c.threads)
    amp = c.amp if c.amp != 'auto' else ('autocast' if dev.type == 'cuda' else 'none')

    torch.manual_seed(c.seed)
    model = Student(c)
    if c.init:
        load_init(model, c.init)
    else:
        random_init(model, c)
    model.to(dev)
    if amp == 'bf16':
        model.to(torch.bfloat16)
    model.train()
    if c.batch_file:
        from safetensors.torch import load_file
        batch = {k: v.to(dev) for k, v in load_file(c.batch_file).items()}
        c.batch, c.L = batch['input_ids'].shape
    else:
        batch = synthetic_batch(c, dev)
    batch['input_ids'] = batch['input_ids'].long()
    batch['topk_idx'] = batch['topk_idx'].long()
    trainable = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=c.lr, weight_decay=0.0)   # betas (0.9, 0.999), eps 1e-8
    cuda = dev.type == 'cuda'

    def step():
        with torch.autocast('cuda', dtype=torch.bfloat16, enabled=(amp == 'autocast' and cuda)):
            loss = kd_loss(model, batch, c.T, c.hard)
        loss.backward()
        if c.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), c.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()   # the seed syncs every micro-step

    losses, times = [], []
    for _ in range(c.warmup):
        losses.append(step())
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_kb('VmRSS') * 1024
        reset_peak_rss()
    for _ in range(c.steps):
        t0 = time.perf_counter()
        losses.append(step())
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if cuda else rss_kb('VmHWM') * 1024
    if c.save_params:
        from safetensors.torch import save_file
        save_file({n: q.detach().float().cpu().contiguous() for n, q in model.named_parameters()
                   if q.requires_grad}, c.save_params)
    step_s = statistics.median(times) if times else float('nan')
    print(json.dumps({
        'impl': 'seed-ref', 'L': c.L, 'batch': c.batch, 'step_s': step_s,
        'tokens_s': c.batch * c.L / step_s if times else None, 'peak_bytes': peak, 'base_bytes': base,
        'losses': losses, 'loss': losses[-1] if losses else None, 'amp': amp, 'device': str(dev),
        'threads': torch.get_num_threads(), 'torch': torch.__version__,
        'finite': all(math.isfinite(x) for x in losses)}))


if __name__ == '__main__':
    main()
