// model_generate: KV-cache decoding (prefill once, one token per step, independent samples from
// one prefill as nanochat's engine, left-padded prompt batches) and the sliding-window perplexity of docs/formulas.md §9.
#include "lib/model.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <chrono>
#include <cmath>
#include <limits>
#include <stdexcept>

namespace qatlab {

KVCache DecoderModel::kvcache_init(int64_t batch, int64_t max_len) {
    KVCache c;
    auto opts = at::TensorOptions().device(device()).dtype(dtype());
    for (int64_t i = 0; i < num_layers(); i++) {
        c.k.push_back(at::zeros({batch, cfg_.num_key_value_heads, max_len, cfg_.head_dim}, opts));
        c.v.push_back(at::zeros({batch, cfg_.num_key_value_heads, max_len, cfg_.head_dim}, opts));
    }
    c.key_mask = at::zeros({batch, max_len}, opts.dtype(at::kBool));
    c.next_pos = at::zeros({batch}, opts.dtype(at::kLong));
    c.max_len = max_len;
    return c;
}

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Next token per row from logits (R, V) float32 on the CPU; HF order: penalty (done by the
// caller), temperature, top-k, top-p.
at::Tensor sample_rows(at::Tensor l, const GenerateOptions & o, at::Generator & gen) {
    if (o.temperature <= 0) return l.argmax(-1);
    l = l / o.temperature;
    const double ninf = -std::numeric_limits<double>::infinity();
    if (o.top_k > 0 && o.top_k < l.size(-1)) {
        at::Tensor kth = std::get<0>(l.topk(o.top_k, -1)).narrow(-1, o.top_k - 1, 1);   // (R, 1)
        l = l.masked_fill(l < kth, ninf);
    }
    if (o.top_p < 1.0) {
        auto [sorted, idx] = l.sort(-1, true);
        at::Tensor p = sorted.softmax(-1);
        at::Tensor drop = (p.cumsum(-1) - p) > o.top_p;   // keeps the smallest prefix reaching top_p
        l = at::full_like(l, ninf).scatter(-1, idx, sorted.masked_fill(drop, ninf));
    }
    return at::multinomial(l.softmax(-1), 1, false, gen).squeeze(-1);
}

} // namespace

GenerateResult DecoderModel::generate(const at::Tensor & input_ids, const GenerateOptions & o) {
    at::NoGradGuard ng;
    at::Tensor ids = input_ids.dim() == 1 ? input_ids.unsqueeze(0) : input_ids;
    if (ids.dim() != 2 || ids.scalar_type() != at::kLong || ids.size(1) == 0)
        throw std::runtime_error("generate: input_ids must be a non-empty int64 (P) or (B, P) tensor");
    if (o.num_samples < 1) throw std::runtime_error("generate: num_samples must be >= 1");
    if (o.max_new_tokens < 0) throw std::runtime_error("generate: max_new_tokens must be >= 0");
    if (o.top_p <= 0 || o.top_p > 1) throw std::runtime_error("generate: top_p must be in (0, 1]");
    if (o.repetition_penalty <= 0) throw std::runtime_error("generate: repetition_penalty must be > 0");
    const int64_t B = ids.size(0), P = ids.size(1), S = o.num_samples, R = B * S, V = cfg_.vocab_size;
    // Left padding: positions and keys come from the mask (forward_cached), so a row's real tokens
    // sit at RoPE positions 0.. and never attend to its padding, as the prompt alone would.
    at::Tensor mask;
    if (o.attention_mask.defined()) {
        mask = o.attention_mask.dim() == 1 ? o.attention_mask.unsqueeze(0) : o.attention_mask;
        if (mask.dim() != 2 || mask.size(0) != B || mask.size(1) != P)
            throw std::runtime_error("generate: attention_mask: expected shape (" + std::to_string(B) + ", " +
                                     std::to_string(P) + ") as input_ids");
        mask = mask.to(at::kCPU).ne(0);
        at::Tensor real = mask.sum(1);
        for (int64_t b = 0; b < B; b++)
            if (real[b].item<int64_t>() == 0)
                throw std::runtime_error("generate: attention_mask: row " + std::to_string(b + 1) + " has no real token");
        if (P > 1) {
            at::Tensor bad = (mask.narrow(1, 0, P - 1).to(at::kInt) > mask.narrow(1, 1, P - 1).to(at::kInt)).any(1);
            for (int64_t b = 0; b < B; b++)
                if (bad[b].item<bool>())
                    throw std::runtime_error("generate: attention_mask: row " + std::to_string(b + 1) +
                                             " is not left-padded (expected zeros, then ones up to the last position)");
        }
        if (mask.all().item<bool>()) mask = at::Tensor();   // nothing padded: the plain causal path
        else ids = ids.masked_fill(mask.to(ids.device()).logical_not(), 0);   // pad ids are never read
    }
    if (ids.min().item<int64_t>() < 0 || ids.max().item<int64_t>() >= V)
        throw std::runtime_error("generate: input_ids out of range [0, " + std::to_string(V) + ")");
    GenerateResult res;
    res.tokens.resize(R);
    auto t0 = std::chrono::steady_clock::now();
    // Prefill once per prompt, then replicate the cache: every sample row starts from it.
    KVCache cache = kvcache_init(B, P + std::max<int64_t>(o.max_new_tokens, 1));
    at::Tensor logits = forward_cached(ids.to(device()), cache, mask).select(1, P - 1).to(at::kFloat);   // (B, V)
    if (S > 1) {
        for (auto & t : cache.k) t = t.repeat_interleave(S, 0);
        for (auto & t : cache.v) t = t.repeat_interleave(S, 0);
        cache.key_mask = cache.key_mask.repeat_interleave(S, 0);
        cache.next_pos = cache.next_pos.repeat_interleave(S, 0);
        logits = logits.repeat_interleave(S, 0);                                                    // (R, V)
    }
    logits = logits.cpu();
    res.prefill_seconds = seconds_since(t0);
    auto t1 = std::chrono::steady_clock::now();
    at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(o.seed);
    at::Tensor seen;   // (R, V) bool: tokens in the prompt or generated, for the penalty
    if (o.repetition_penalty != 1.0) {
        at::Tensor real = mask.defined() ? mask.to(at::kLong) : at::ones({B, P}, at::kLong);
        at::Tensor count = at::zeros({B, V}, at::kLong).scatter_add_(1, ids.cpu(), real);   // padding adds 0
        seen = count.gt(0).repeat_interleave(S, 0);
    }
    std::vector<bool> done(R, false);
    int64_t live = R;
    bool stop_all = false;
    for (int64_t step = 0; step < o.max_new_tokens && live > 0 && !stop_all; step++) {
        if (seen.defined()) {
            const double p = o.repetition_penalty;
            logits = at::where(seen, at::where(logits < 0, logits * p, logits / p), logits);
        }
        at::Tensor next = sample_rows(logits, o, gen).contiguous();   // (R) int64, CPU
        const int64_t * nx = next.data_ptr<int64_t>();
        for (int64_t r = 0; r < R && !stop_all; r++) {
            if (done[r]) continue;
            res.tokens[r].push_back(nx[r]);
            res.new_tokens++;
            if (o.on_token && !o.on_token(r, nx[r])) stop_all = true;
            for (int64_t s : o.stop)
                if (s == nx[r]) {
                    done[r] = true;
                    live--;
                    break;
                }
        }
        if (seen.defined()) seen.scatter_(1, next.unsqueeze(1), true);
        if (step + 1 == o.max_new_tokens || live == 0 || stop_all) break;
        // Finished rows keep decoding their last token; their outputs are ignored.
        logits = forward_cached(next.view({R, 1}).to(device()), cache).select(1, 0).to(at::kFloat).cpu();
    }
    res.decode_seconds = seconds_since(t1);
    res.tokens_per_second = res.new_tokens / std::max(res.prefill_seconds + res.decode_seconds, 1e-9);
    return res;
}

PerplexityResult DecoderModel::perplexity(const at::Tensor & ids_in, int64_t max_length, int64_t stride, int64_t bytes) {
    at::NoGradGuard ng;
    if (!ids_in.defined() || ids_in.scalar_type() != at::kLong || ids_in.numel() < 2)
        throw std::runtime_error("perplexity: expected an int64 id sequence of at least 2 tokens");
    if (max_length < 2 || stride < 1 || stride > max_length)
        throw std::runtime_error("perplexity: need max_length >= 2 and 1 <= stride <= max_length");
    at::Tensor ids = ids_in.reshape(-1).to(device());
    const int64_t T = ids.size(0);
    PerplexityResult r;
    int64_t prev_end = 0;
    // Windows end at stride, 2*stride, ...; each scores only the tokens past the previous end.
    for (int64_t i = 0; i < T - 1; i += stride) {
        const int64_t begin = std::max<int64_t>(i + stride - max_length, 0), end = std::min(i + stride, T);
        const int64_t trg = end - prev_end, len = end - begin;
        prev_end = end;
        const int64_t first = std::max<int64_t>(len - trg, 1);   // first scored position in the window
        if (first >= len) continue;
        at::Tensor w = ids.narrow(0, begin, len).unsqueeze(0);                        // (1, len)
        at::Tensor h = forward(w, {}, {}, ForwardOutput::hidden);                      // (1, len, H)
        at::Tensor lg = lm_head(h.narrow(1, first - 1, len - first)).to(at::kFloat);   // (1, n, V)
        at::Tensor tgt = w.narrow(1, first, len - first);
        at::Tensor nll = -lg.log_softmax(-1).gather(-1, tgt.unsqueeze(-1));
        r.nll_sum += nll.sum().to(at::kDouble).item<double>();
        r.tokens += len - first;
    }
    r.nll = r.nll_sum / std::max<int64_t>(r.tokens, 1);
    r.ppl = std::exp(r.nll);
    if (bytes > 0) r.bits_per_byte = r.nll_sum / std::log(2.0) / (double)bytes;
    return r;
}

} // namespace qatlab
