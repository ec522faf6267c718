# strong_step: the same V2-KD training step as anemll_step.py, written the way a strong PyTorch engineer
# would: W_eff = Q ⊙ ((A_dir g) B_dir) materialized once per layer per step in a custom autograd.Function
# (recomputed in backward, never stored), SDPA with native GQA, fused RMSNorm, the chunked fused KD loss
# (gradients taken in the forward pass, no (N, V) tensor), fused AdamW, optionally torch.compile.
#
#   python3 experiments/seed_ref/strong_step.py --layers 2 --hidden 128 --vocab 4096 --L 64 --batch 8 [--compile 1]
#   python3 experiments/seed_ref/strong_step.py --init init.safetensors --batch-file batch.safetensors \
#       --warmup 0 --steps 3 --save-params after.safetensors
#
# Same options, weights exchange and JSON line as anemll_step.py, plus compile_s (the first step with
# torch.compile, compilation included) and "compile_error" when compilation failed.
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
from torch.autograd.profiler import record_function
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from anemll_step import PRESETS, make_lut, reset_peak_rss, rss_kb, synthetic_batch  # noqa: E402


class WeffLinear(torch.autograd.Function):
    """y = x W^T, W = Q ⊙ (Am Bm): saves x and the small factors; W is rebuilt in backward."""

    @staticmethod
    def forward(ctx, x, Am, Bm, Q):
        with record_function('weff_build'):
            W = Q * (Am @ Bm)
        ctx.save_for_backward(x, Am, Bm, Q)
        return F.linear(x, W.to(x.dtype))

    @staticmethod
    def backward(ctx, gy):
        x, Am, Bm, Q = ctx.saved_tensors
        with record_function('weff_build'):
            W = Q * (Am @ Bm)
        gx = gAm = gBm = None
        if ctx.needs_input_grad[0]:
            gx = gy @ W.to(gy.dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            gW = gy.reshape(-1, gy.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
            with record_function('weff_grad'):
                gS = gW.to(Q.dtype).mul_(Q)   # ∂W ⊙ Q
                if ctx.needs_input_grad[1]:
                    gAm = gS @ Bm.t()
                if ctx.needs_input_grad[2]:
                    gBm = Am.t() @ gS
        return gx, gAm, gBm, None


class V2Linear(nn.Module):
    """The V2 layer's trainable state (A, B, g) and its frozen Q = lut[idx] as an fp32 buffer."""

    def __init__(self, out_f, in_f, lut_size, rank):
        super().__init__()
        self.scale_A = nn.Parameter(torch.empty(out_f, rank))
        self.scale_B = nn.Parameter(torch.empty(rank, in_f))
        self.rank_magnitude = nn.Parameter(torch.ones(rank))
        self.register_buffer('lut', make_lut(lut_size))
        self.register_buffer('_Q', torch.empty(out_f, in_f))

    def forward(self, x):
        A_dir = self.scale_A / self.scale_A.norm(dim=0, keepdim=True).clamp(min=1e-6)
        B_dir = self.scale_B / self.scale_B.norm(dim=1, keepdim=True).clamp(min=1e-6)
        return WeffLinear.apply(x, A_dir * (self.rank_magnitude + 1e-6), B_dir, self._Q)


class RMSNorm(nn.Module):
    def __init__(self, n, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n), requires_grad=False)
        self.eps = eps

    def forward(self, x):
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def rope(x, cos, sin):
    h = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., h:], x[..., :h]), -1) * sin


class Layer(nn.Module):
    def __init__(self, c, q):
        super().__init__()
        self.nh, self.kvh, self.hd = c.heads, c.kv_heads, c.head_dim
        H, qd, kvd = c.hidden, c.heads * c.head_dim, c.kv_heads * c.head_dim
        self.input_layernorm = RMSNorm(H, 1e-6)
        self.post_attention_layernorm = RMSNorm(H, 1e-6)
        self.q_norm, self.k_norm = RMSNorm(c.head_dim, 1e-6), RMSNorm(c.head_dim, 1e-6)
        self.q_proj = V2Linear(qd, H, q[2], q[3])
        self.k_proj = V2Linear(kvd, H, q[2], q[3])
        self.v_proj = V2Linear(kvd, H, q[2], q[3])
        self.o_proj = V2Linear(H, qd, q[2], q[3])
        self.gate_proj = V2Linear(c.inter, H, q[0], q[1])
        self.up_proj = V2Linear(c.inter, H, q[0], q[1])
        self.down_proj = V2Linear(H, c.inter, q[0], q[1])

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        a = self.input_layernorm(x)
        q = self.q_norm(self.q_proj(a).view(B, T, self.nh, self.hd)).transpose(1, 2)
        k = self.k_norm(self.k_proj(a).view(B, T, self.kvh, self.hd)).transpose(1, 2)
        v = self.v_proj(a).view(B, T, self.kvh, self.hd).transpose(1, 2)
        o = F.scaled_dot_product_attention(rope(q, cos, sin), rope(k, cos, sin), v, is_causal=True,
                                           enable_gqa=self.nh != self.kvh)
        h = x + self.o_proj(o.transpose(1, 2).reshape(B, T, self.nh * self.hd))
        m = self.post_attention_layernorm(h)
        return h + self.down_proj(F.silu(self.gate_proj(m)) * self.up_proj(m))


class Student(nn.Module):
    def __init__(self, c):
        super().__init__()
        q = PRESETS[c.preset]
        self.embed = nn.Embedding(c.vocab, c.hidden)
        self.embed.weight.requires_grad_(False)
        self.layers = nn.ModuleList(Layer(c, q) for _ in range(c.layers))
        self.norm = RMSNorm(c.hidden, 1e-6)
        self.ckpt, self.hd = c.ckpt, c.head_dim

    def hidden(self, ids):
        T = ids.shape[1]
        inv = 1.0 / (1e6 ** (torch.arange(0, self.hd, 2, device=ids.device).float() / self.hd))
        freqs = torch.outer(torch.arange(T, device=ids.device).float(), inv)
        emb = torch.cat((freqs, freqs), -1)
        cos, sin = emb.cos(), emb.sin()
        x = self.embed(ids)
        for layer in self.layers:
            if self.ckpt and self.training:
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        return self.norm(x)


class FusedKD(torch.autograd.Function):
    """The seed's V2 KD loss, T²·KL over the K candidates + hard·CE_full on the teacher top-1, mean
    over N rows, chunk by chunk: one (C, V) logits block at a time, gradients taken in forward."""

    @staticmethod
    def forward(ctx, h, W, cand, tk, T, hard, chunk):
        with record_function('kd_loss'):
            return FusedKD._forward(ctx, h, W, cand, tk, T, hard, chunk)

    @staticmethod
    def _forward(ctx, h, W, cand, tk, T, hard, chunk):
        N = h.shape[0]
        need = ctx.needs_input_grad[0]
        dh = torch.empty_like(h) if need else None
        kl = h.new_zeros((), dtype=torch.float32)
        ce = h.new_zeros((), dtype=torch.float32)
        wk, wf = T / N, hard / N   # ∂(T²·KL/N)/∂z = T·(p_s − p_t)/N; ∂(hard·CE/N)/∂Z = hard·(softmax − 1_y)/N
        for r0 in range(0, N, chunk):
            hc = h[r0:r0 + chunk]
            c, y = cand[r0:r0 + chunk], cand[r0:r0 + chunk, :1]
            Z = (hc @ W.t()).float()                                      # (C, V)
            ls = torch.log_softmax(Z.gather(1, c) / T, 1)
            lt = torch.log_softmax(tk[r0:r0 + chunk] / T, 1)
            pt = lt.exp()
            kl += (pt * (lt - ls)).sum()
            if hard > 0:
                lse = torch.logsumexp(Z, 1, keepdim=True)
                ce += (lse - Z.gather(1, y)).sum()
            if need:
                gz = (ls.exp() - pt) * wk
                if hard > 0:
                    Z.sub_(lse).exp_().mul_(wf).scatter_add_(1, y, torch.full_like(lse, -wf))
                else:
                    Z.zero_()
                Z.scatter_add_(1, c, gz)
                dh[r0:r0 + chunk] = (Z.to(W.dtype) @ W).to(h.dtype)
        ctx.save_for_backward(dh if need else None)
        return (T * T * kl + hard * ce) / N

    @staticmethod
    def backward(ctx, g):
        dh, = ctx.saved_tensors
        return (dh * g.to(dh.dtype) if dh is not None else None), None, None, None, None, None, None


def kd_loss(model, batch, T, hard, chunk=128):
    h = model.hidden(batch['input_ids'])[:, :-1]
    h = h.reshape(-1, h.shape[-1])
    idx = batch['topk_idx'].reshape(h.shape[0], -1)
    tk = batch['topk_logits'].reshape(idx.shape).float()
    return FusedKD.apply(h, model.embed.weight, idx, tk, T, hard, chunk)


def random_init(model, c):
    torch.manual_seed(c.seed)
    with torch.no_grad():
        model.embed.weight.normal_(0, 0.02)
        for m in model.modules():
            if isinstance(m, V2Linear):
                m.scale_A.copy_(F.normalize(torch.randn_like(m.scale_A), dim=0))
                m.scale_B.copy_(F.normalize(torch.randn_like(m.scale_B), dim=1))
                m.rank_magnitude.fill_(0.05)
                m._Q.copy_(m.lut[torch.randint(0, m.lut.numel(), m._Q.shape)])


def key_of(name):
    # our module names -> qatlab's (the seed's) state-dict names
    if name.startswith('embed.'):
        return 'model.embed_tokens.' + name[6:]
    if name.startswith('norm.'):
        return 'model.' + name
    parts = name.split('.')   # layers.i.<module>.<tensor>
    sub = {'q_proj': 'self_attn', 'k_proj': 'self_attn', 'v_proj': 'self_attn', 'o_proj': 'self_attn',
           'q_norm': 'self_attn', 'k_norm': 'self_attn', 'gate_proj': 'mlp', 'up_proj': 'mlp', 'down_proj': 'mlp'}
    if parts[2] in sub:
        parts.insert(2, sub[parts[2]])
    return 'model.' + '.'.join(parts)


def load_init(model, path):
    # qatlab's state_dict (safetensors, the seed's key names): _indices (uint8) become _Q = lut[idx].
    from safetensors.torch import load_file
    sd = load_file(path)
    own = dict(model.named_parameters())
    own.update(dict(model.named_buffers()))
    with torch.no_grad():
        for name, t in own.items():
            key = key_of(name)
            if key.endswith('._Q'):
                base = key[:-3]
                t.copy_(sd[base + '.lut'][sd[base + '._indices'].long()])
            elif key in sd:
                t.copy_(sd[key])
            else:
                sys.exit(f'strong_step: {path}: missing key {key}')


# Phases of the profile: the innermost annotation around an op (weff_build, weff_grad, kd_loss, optimizer),
# else the op's kind. Self CPU time per phase, in seconds; kd_loss split into its GEMMs and the rest.
PHASE_OPS = [('matmul', ('aten::mm', 'aten::addmm', 'aten::bmm', 'aten::baddbmm')),
             ('attention', ('scaled_dot_product', 'flash_attention', 'attention')),
             ('norms', ('rms_norm',)),
             ('activation', ('silu',)),
             ('rope/reshape/copy', ('aten::cat', 'aten::copy_', 'aten::clone', 'aten::contiguous', 'aten::neg',
                                   'aten::slice', 'aten::view', 'aten::transpose', 'aten::reshape', 'aten::_to_copy')),
             ('elementwise', ('aten::mul', 'aten::add', 'aten::sub', 'aten::div', 'aten::pow', 'aten::rsqrt',
                              'aten::mean', 'aten::sum', 'aten::norm', 'aten::linalg_vector_norm', 'aten::clamp'))]


def profile_step(step, path):
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        step()
        wall = time.perf_counter() - t0
    phases, others = {}, {}
    for e in prof.events():
        if e.name in ('weff_build', 'weff_grad', 'kd_loss', 'optimizer'):
            continue
        tag, p = None, e.cpu_parent
        while p is not None and tag is None:
            if p.name in ('weff_build', 'weff_grad', 'kd_loss', 'optimizer'):
                tag = p.name
            p = p.cpu_parent
        kind = 'other'
        for k, names in PHASE_OPS:
            if any(n in e.name for n in names):
                kind = k
                break
        if tag == 'kd_loss':
            tag = 'kd_loss: GEMMs' if kind == 'matmul' else 'kd_loss: the rest'
        elif tag in ('weff_build', 'weff_grad'):
            tag = 'W_eff construction' if tag == 'weff_build' else 'W_eff backward (dS = dW*Q, dA, dB)'
        name = tag or kind
        phases[name] = phases.get(name, 0.0) + e.self_cpu_time_total / 1e6
        if name == 'other':
            others[e.name] = others.get(e.name, 0.0) + e.self_cpu_time_total / 1e6
    top = dict(sorted(others.items(), key=lambda kv: -kv[1])[:8])
    with open(path + '.tmp', 'w') as f:
        json.dump({'wall_s': wall, 'phases': phases, 'other_top': top}, f)
    os.replace(path + '.tmp', path)


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
    a('--ste', type=int, default=0, help='STE-FP16 (not supported here: refused)')
    a('--amp', default='auto', choices=['auto', 'none', 'autocast'],
      help='autocast: fp32 params + bf16 autocast; auto: autocast on CUDA, none on the CPU')
    a('--compile', type=int, default=0, help='torch.compile each decoder layer (inductor)')
    a('--chunk', type=int, default=128, help='KD loss positions per chunk')
    a('--device', default='auto'); a('--threads', type=int, default=0); a('--seed', type=int, default=0)
    a('--warmup', type=int, default=1); a('--steps', type=int, default=3)
    a('--init', default=''); a('--batch-file', default=''); a('--save-params', default='')
    a('--profile', default='', help='after the timed steps, profile one step (torch.profiler) into this JSON')
    c = p.parse_args()
    if c.ste:
        sys.exit('strong_step: --ste 1 is not implemented (the STE-FP16 roundings); use anemll_step.py')
    c.ckpt = bool(c.ckpt)
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
    model.to(dev).train()
    if c.batch_file:
        from safetensors.torch import load_file
        batch = {k: v.to(dev) for k, v in load_file(c.batch_file).items()}
        c.batch, c.L = batch['input_ids'].shape
    else:
        batch = synthetic_batch(c, dev)
    batch['input_ids'] = batch['input_ids'].long()
    batch['topk_idx'] = batch['topk_idx'].long()
    if c.compile:
        for layer in model.layers:
            layer.compile()
    trainable = [q for q in model.parameters() if q.requires_grad]
    try:
        opt = torch.optim.AdamW(trainable, lr=c.lr, weight_decay=0.0, fused=True)
    except (RuntimeError, ValueError):
        opt = torch.optim.AdamW(trainable, lr=c.lr, weight_decay=0.0, foreach=True)
    cuda = dev.type == 'cuda'

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp == 'autocast'):
            loss = kd_loss(model, batch, c.T, c.hard, c.chunk)
        loss.backward()
        with record_function('optimizer'):
            if c.clip > 0:
                torch.nn.utils.clip_grad_norm_(trainable, c.clip, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss.item()

    losses, times, compile_s, compile_error = [], [], None, None
    if c.compile:   # the first step compiles: timed apart, always run
        t0 = time.perf_counter()
        try:
            losses.append(step())
        except Exception as e:   # report, do not hide: the driver shows the row as failed
            compile_error = f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'
        compile_s = time.perf_counter() - t0
        if compile_error:
            print(json.dumps({'impl': 'strong-compiled', 'L': c.L, 'batch': c.batch, 'step_s': None,
                              'compile_s': compile_s, 'compile_error': compile_error}))
            sys.exit(3)
    for _ in range(c.warmup - (1 if c.compile else 0)):
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
    if c.profile:
        profile_step(step, c.profile)
    if c.save_params:
        from safetensors.torch import save_file
        save_file({key_of(n): q.detach().float().cpu().contiguous() for n, q in model.named_parameters()
                   if q.requires_grad}, c.save_params)
    step_s = statistics.median(times) if times else float('nan')
    print(json.dumps({
        'impl': 'strong-compiled' if c.compile else 'strong', 'L': c.L, 'batch': c.batch, 'step_s': step_s,
        'tokens_s': c.batch * c.L / step_s if times else None, 'peak_bytes': peak, 'base_bytes': base,
        'losses': losses, 'loss': losses[-1] if losses else None, 'amp': amp, 'device': str(dev),
        'threads': torch.get_num_threads(), 'torch': torch.__version__, 'compile_s': compile_s,
        'finite': all(math.isfinite(x) for x in losses)}))


if __name__ == '__main__':
    main()
