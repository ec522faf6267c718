// quant_init: per-layer recipes (any LUT size and rank), data-aware initialisation of V2 layers
// (activation statistics, weighted scale fit, alternating refinement, k-means LUT, tighten_q),
// a fast low-rank SVD, and the bits-per-weight accounting.
#pragma once
#include "lib/quant_lut.h"

#include <ATen/core/Tensor.h>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace qatlab {

// -- low-rank SVD ----------------------------------------------------------------------------
// The top-r singular triplets of M (m, n): U (m, k), S (k), Vh (k, n), k = min(r, m, n).
// Exact thin SVD when min(m, n) <= exact_below (or r + oversample reaches it); otherwise a
// randomized range finder (Gaussian sketch of r + oversample columns, power_iters QR-stabilised
// power iterations, then the exact SVD of the small projected matrix). seed makes it repeatable.
struct LowRankSvd {
    at::Tensor U, S, Vh;
};
LowRankSvd svd_lowrank(const at::Tensor & M, int64_t r, int64_t oversample = 10, int64_t power_iters = 2,
                       uint64_t seed = 0, int64_t exact_below = 64);

// -- recipes ---------------------------------------------------------------------------------
// One layer's quantization: LUT size 2..256, scale rank 1..min(out, in), init group size,
// LUT with a zero entry, LUT fitted by weighted k-means instead of the uniform one.
struct LayerRecipe {
    std::string name;
    int64_t lut_size = 16;
    int64_t rank = 4;
    int64_t group_size = 32;
    bool include_zero = false;
    bool kmeans = false;
    bool preset = false;   // from a preset: rank may exceed min(out, in), as the seed allows
};
// Throws "layer '<name>': <option> = <value>: expected ..." for an impossible configuration.
void layer_recipe_check(const LayerRecipe & r, int64_t out, int64_t in);
// The float weight (out, in) and bias of a layer about to be quantized: a dense layer's own,
// a V1 layer's original weight (not its fake-quantized one), else weight().
void linear_dense_weight(const std::shared_ptr<Linear> & l, at::Tensor & W, at::Tensor & bias);
// The recipe a preset (with mlp/attn switches and the regex filter) stands for, in model order.
std::vector<LayerRecipe> quant_preset_recipe(DecoderModel & m, const QuantReplaceOptions & o);

// -- initialisation --------------------------------------------------------------------------
struct V2InitOptions {
    // "svd": the seed's (group max-abs, rank-r SVD, floor on g, nearest-LUT Q);
    // "weighted": minimise sum_i d_i (W_eff - W)_oi^2 with d = the imatrix (ones when absent).
    std::string init = "svd";
    int64_t refine = 0;              // alternating rounds (scales by least squares, then Q, then LUT)
    bool tighten = false;            // Q = nearest(W / S) with |S| floored at 1e-4 (sign kept)
    std::string svd = "auto";        // "auto", "exact" or "randomized"
    uint64_t seed = 0;
    LutForm form = LutForm::materialized;
    bool ste_fp16 = false;
    bool freeze = true;              // indices stored (always for "weighted")
    std::map<std::string, at::Tensor> imatrix;   // layer name -> (in) E[x^2]
};

// Sets the scales, the LUT (k-means when asked) and the indices of l from its weight l.w.
// d: (in) per-input-channel weights, undefined = ones (only used by "weighted").
void v2_init(LutLinearV2 & l, const at::Tensor & d, const LayerRecipe & r, const V2InitOptions & o);
// sum_{o,i} d_i (W_eff - W)_oi^2 of a V2 layer (d undefined = ones), in float64.
double v2_weighted_error(LutLinearV2 & l, const at::Tensor & d);
// tighten_q: indices = nearest LUT entry of W / S, |S| floored at `floor` with its sign kept.
void v2_tighten_q(LutLinearV2 & l, double floor = 1e-4);
// Weighted 1-D k-means (Lloyd) of values v with weights w (same shape) into k centres started
// at `init` (k, sorted); empty clusters keep their centre; returns sorted centres (k), fp32.
at::Tensor lut_weighted_kmeans(const at::Tensor & v, const at::Tensor & w, const at::Tensor & init, int64_t iters);

// Replaces each named projection by a V2 layer built and initialised as its recipe says.
// Layers already V2 are skipped. Returns the replaced names; seconds (if given) = init time.
std::vector<std::string> quant_replace_recipe(DecoderModel & m, const std::vector<LayerRecipe> & recipe,
                                              const V2InitOptions & o, double * seconds = nullptr);
int64_t quant_tighten_q(DecoderModel & m, double floor = 1e-4);

// -- calibration -----------------------------------------------------------------------------
// E[x^2] per input channel of each named module (float32 (in)), over every token of the
// batches (int64 (B, T) ids), from forward pre-hooks; eval mode and no grad during the pass;
// the hooks are removed and the training mode restored afterwards, also on error.
struct Calibration {
    std::map<std::string, at::Tensor> stats;
    int64_t tokens = 0;
};
Calibration quant_calibrate(DecoderModel & m, const std::vector<at::Tensor> & batches,
                            const std::vector<std::string> & modules);

// -- size ------------------------------------------------------------------------------------
// Index bits ceil(log2 L) + 16 bits per scale value (rank (out + in) + rank) and per LUT entry,
// spread over the out x in weights.
double v2_bits_per_weight(int64_t out, int64_t in, int64_t rank, int64_t lut_size);
struct BitsReport {
    double quantized = 0;            // bits per weight over the quantized layers' weights
    double model = 0;                // over every parameter, the others counted at 16 bits
    int64_t quantized_weights = 0, model_weights = 0;
    double bits = 0;                 // the model's total bits
};
BitsReport quant_bits_per_weight(DecoderModel & m);

} // namespace qatlab
