// kd_loss: the seed's knowledge-distillation loss (docs/formulas.md §6) over cached teacher top-k logits,
// fused with the lm_head and chunked over positions so no (N, V) or (N, K, H) tensor lives whole.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/core/Generator.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <optional>

namespace qatlab {

// One batch of the KD cache (docs/formulas.md §5.2). S = L - 1 predicted positions.
struct KDBatch {
    at::Tensor input_ids;        // (B, L) int32/int64; only kd_evaluate reads it
    at::Tensor attention_mask;   // (B, L) or undefined (= all ones)
    at::Tensor topk_idx;         // (B, S, K) int32/int64, sorted descending: [..., 0] = teacher argmax
    at::Tensor topk_logits;      // (B, S, K) raw teacher logits (fp16 in the cache)
    at::Tensor rand_idx;         // (B, S, R) or undefined
    at::Tensor rand_logits;      // (B, S, R) or undefined (legacy only)
};

struct KDOptions {
    double temperature = 2.0;         // T
    double hard_top1 = 0.2;           // V2: weight of the full-vocab CE on the teacher top-1;
                                      // legacy: NLL of candidate 0 under the candidate softmax
    double hard_full = 0.00005;       // V2: added to the same CE (the seed reuses one CE);
                                      // legacy: full-vocab CE at the last non-pad position only
    double sampled_ce = 0.0;          // V2: weight of CE over [top-K ‖ negatives], target index 0
    int64_t sampled_negatives = 64;   // on-the-fly negatives when the batch has no rand_idx
    bool legacy = false;              // docs/formulas.md §6: KL over [top-K ‖ rand], masked by attention_mask[:, 1:]
    double distill_weight = 1.0;      // legacy: factor on T²·KL
    bool masked = false;              // V2 extension: average over attention_mask[:, 1:] like legacy
                                      // (the seed's V2 loss is an unmasked mean over B·S positions)
    int64_t chunk = 128;              // positions per chunk (fused only)
    std::optional<at::Generator> generator;   // for on-the-fly negatives
};

// The loss and its unweighted parts (NaN when a part is not computed).
struct KDResult {
    at::Tensor loss;          // 0-dim, float32 (float64 if h or W is), differentiable w.r.t. h (and W)
    double kl = NAN;          // T²·KL averaged over positions (what evaluate_kd_loss reports)
    double cand_ce = NAN;     // V2: sampled CE; legacy: hard-top1 candidate NLL
    double full_ce = NAN;     // V2: CE_full (the one CE of hard_top1 + hard_full); legacy: last-position CE
};

// h: (B, S, H), or (B, S + 1, H) whose last position is dropped (hidden states of all L tokens).
// W: the lm_head weight (V, H), no bias, no softcap. The matmul runs in the promoted dtype of h and
// W; softmax/logsumexp accumulate in float32 (float64 if either input is float64).
// Errors (std::invalid_argument) name the offending tensor.
KDResult kd_loss_fused(const at::Tensor & h, const at::Tensor & W, const KDBatch & batch, const KDOptions & opt);
// The same loss with straightforward ops under autograd: materializes (N, V) and (N, M, H).
KDResult kd_loss_reference(const at::Tensor & h, const at::Tensor & W, const KDBatch & batch, const KDOptions & opt);

// evaluate_kd_loss (docs/formulas.md §6): examples one at a time (B = 1) in the order the batches come, no grad,
// T²·KL only (hard weights 0), averaged over the first n examples (fewer if the batches run out).
// hidden(input_ids (1, L) int64, attention_mask (1, L) or undefined when all ones) -> (1, L, H).
// next(batch) fills the next batch and returns false at the end.
using KDHiddenFn = std::function<at::Tensor(const at::Tensor & input_ids, const at::Tensor & attention_mask)>;
using KDBatchFn = std::function<bool(KDBatch & batch)>;
struct KDEvalResult {
    double kd_loss = NAN;
    int64_t examples = 0;
};
KDEvalResult kd_evaluate(const KDHiddenFn & hidden, const at::Tensor & W, const KDBatchFn & next, int64_t n = 40,
                         double temperature = 2.0);

} // namespace qatlab
