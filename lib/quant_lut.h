// quant_lut: the seed's LUT-quantized linear layers (docs/formulas.md §1-§4): V2 (frozen LUT
// indices Q, low-rank scales S = (A_dir ⊙ g) B_dir, W_eff = Q ⊙ S), V1 (fake-quant with
// A@B scales), STE-FP16, init, freeze_Q, snapping, V1→V2 and Q4→Q2 conversions, export,
// replacement on a DecoderModel and the seed's checkpoint key layout.
#pragma once
#include "lib/model.h"

#include <ATen/core/Tensor.h>
#include <ATen/core/Generator.h>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace qatlab {

// -- configuration ---------------------------------------------------------------------------
// AnemllQuantConfigV2 with the defaults every seed script uses (not the dataclass defaults):
// force_positive_scales=false, magnitude_activation="identity".
struct LutConfig {
    int64_t lut_size = 16;                  // Lq
    int64_t scale_rank = 4;                 // r > 0
    int64_t group_size = 32;                // init only
    bool lut_include_zero = false;
    bool force_positive_scales = false;     // |A|, |B| before normalization ("abs" method)
    std::string magnitude_activation = "identity";   // "identity", "softplus" or "abs"
    double magnitude_eps = 1e-6;            // added to g even for identity
    double norm_eps = 1e-6;                 // clamp of column/row norms
    bool use_ste_fp16 = false;              // STE-FP16 in forward (docs/formulas.md §2.5)
};

// Forward forms (docs/formulas.md §2.4): one GEMM with W_eff = Q ⊙ S (default, fast), the seed's per-rank loop,
// the seed's batched einsum. Without STE they agree to float rounding.
enum class LutForm { materialized, loop, batched };
LutForm lut_form_parse(const std::string & s);       // "materialized" | "loop" | "batched"
const char * lut_form_name(LutForm f);

// train_v2_simple CONFIG_PRESETS: q2a4 (default), q4a4, q4a4_r32 (= q4_r32), q2a2.
struct LutPreset {
    int64_t mlp_lut, mlp_rank, attn_lut, attn_rank;
};
LutPreset lut_preset(const std::string & name);

// -- LUTs and STE ----------------------------------------------------------------------------
// make_lut: linspace(-1, 1, Lq) in fp16 on the CPU (or the include_zero layout), as fp32 [Lq].
at::Tensor lut_make(int64_t size, bool include_zero = false);
// Nearest LUT entry of each x (clamped to [min, max] of the LUT; ties to the lowest index).
// x any shape, lut [Lq] → uint8 (Lq ≤ 256) of x's shape, on x's device.
at::Tensor lut_nearest_indices(const at::Tensor & x, const at::Tensor & lut);
at::Tensor lut_nearest_long(const at::Tensor & x, const at::Tensor & lut);   // the same as int64
// lut[idx] for uint8/int indices, in lut's dtype: (..) → (..).
at::Tensor lut_gather(const at::Tensor & lut, const at::Tensor & idx);
// ste_fp16: x + (fp16(clamp(x, ±65504)) - x).detach(); identity for fp16 x; gradient identity.
at::Tensor ste_fp16(const at::Tensor & x, bool saturate = true);
// convert_q4_to_q2.kmeans_reduce_lut: 1-D k-means over the LUT values themselves (init at the
// sorted values' quantile positions floor(linspace(0,1,k+2)[1:k+1]·(n-1)), n_iter fixed
// iterations, ties to the first centre, empty clusters keep their centre), sorted, fp32.
at::Tensor lut_kmeans_reduce(const at::Tensor & lut, int64_t k, int64_t n_iter = 20);
// Trainable symmetric LUT16 (docs/formulas.md §2.8): raw [8] → LUT [16]. snap=false skips the final fp16 STE
// (for finite-difference checks).
at::Tensor lut16_from_raw(const at::Tensor & raw, double max_abs = 1.0, bool snap = true);
at::Tensor lut16_raw_init(const at::Tensor & lut, double max_abs = 1.0);   // [16] → raw [8]
double lut16_min_delta(double max_abs);

// -- V2 layer --------------------------------------------------------------------------------
struct LutLinearV2 : Linear {
    LutConfig cfg;
    LutForm form = LutForm::materialized;
    at::Tensor w;                // "weight" [out,in], the original float weight (frozen)
    at::Tensor b;                // "bias" [out] or undefined
    at::Tensor scale_A;          // [out,r] fp32 (direction of column k, re-normalized in forward)
    at::Tensor scale_B;          // [r,in] fp32 (direction of row k)
    at::Tensor rank_magnitude;   // [r] g
    at::Tensor lut;              // [Lq]
    at::Tensor indices;          // "_indices" [out,in] uint8 or undefined (then Q is computed on the fly)
    at::Tensor baked_flag;       // "_scales_baked_flag" int8 scalar: 1 = use raw A, B, g
    at::Tensor lut_raw;          // "_lut_raw_deltas" [8] when the LUT16 is trainable, else undefined
    double lut_max_abs = 1.0;
    // Recovery LoRA (docs/formulas.md §2.7), undefined when off: y = V2(x) + (alpha/r_l)·(dropout(x) A^T) B^T.
    at::Tensor lora_A;           // "lora_A" [r_l,in] fp32, N(0, 0.02) at start
    at::Tensor lora_B;           // "lora_B" [out,r_l] fp32, zero at start (the output is unchanged)
    double lora_alpha = 0.0, lora_dropout = 0.0;

    LutLinearV2(int64_t out, int64_t in, LutConfig c, const at::TensorOptions & opts, bool has_bias = false);

    at::Tensor forward(const at::Tensor & x) override;   // (..., in) → (..., out)
    std::vector<std::pair<std::string, at::Tensor *>> parameter_slots() override;
    at::Tensor weight() override;                        // W_eff = Q ⊙ S [out,in], detached
    int64_t in_features() const override { return w.size(1); }
    int64_t out_features() const override { return w.size(0); }
    int64_t rank() const { return scale_A.size(1); }
    int64_t lora_rank() const { return lora_A.defined() ? lora_A.size(0) : 0; }
    double lora_scaling() const { return lora_rank() ? lora_alpha / (double)lora_rank() : 0.0; }
    bool baked();                                        // reads _scales_baked_flag (cached)
    void set_baked(bool on);
    void train(bool on) override { training_ = on; }   // LoRA dropout only
    bool training() const { return training_; }

private:
    bool training_ = true;
    const void * flag_impl_ = nullptr;
    int64_t flag_version_ = -1;
    bool flag_value_ = false;
};

// S's factors as the forward sees them (docs/formulas.md §2.3): A_dir [out,r], B_dir [r,in], g [r] (with eps,
// activation, STE on g when enabled), or the raw tensors when baked.
struct V2Scales {
    at::Tensor A_dir, B_dir, g;
};
V2Scales v2_scales(LutLinearV2 & l);
at::Tensor v2_full_scales(LutLinearV2 & l);              // S = (A_dir ⊙ g) @ B_dir [out,in], fp32+
at::Tensor v2_q(LutLinearV2 & l, at::ScalarType dt);     // Q = lut[idx] (or LUT16(raw)[idx]) [out,in]
// The three forms on explicit inputs (no form dispatch): x (..., in) → (..., out), plus the
// recovery LoRA's term when it is enabled.
at::Tensor v2_forward(LutLinearV2 & l, const at::Tensor & x, LutForm form);

// Init from a float weight W [out,in] (docs/formulas.md §2.2): group max-abs (group_size), rank-r SVD, floor on g;
// round_g_fp16 mirrors replace_linear_with_anemll_v2. Leaves indices undefined. svd: "exact"
// (the full thin SVD), "randomized" or "auto" (exact for small matrices; see svd_lowrank).
void v2_init_from_weight(LutLinearV2 & l, const at::Tensor & W, bool round_g_fp16 = true,
                         const std::string & svd = "auto", uint64_t seed = 0);
// freeze_Q (docs/formulas.md §2.3): indices = nearest LUT entry of W / S, as uint8; weight frozen.
void v2_freeze_q(LutLinearV2 & l);
// A V2 layer from a dense weight: init + optional freeze.
std::shared_ptr<LutLinearV2> v2_from_dense(const at::Tensor & W, const at::Tensor & bias, const LutConfig & c,
                                           bool freeze = true);
// Trainable LUT16 (docs/formulas.md §2.8): requires Lq = 16 and indices.
void v2_enable_lut_training(LutLinearV2 & l, double max_abs = 1.0);

// Recovery LoRA (docs/formulas.md §2.7). enable: lora_A ~ N(0, 0.02) (the global generator), lora_B = 0, fp32,
// both trainable; alpha defaults to rank; a layer that has LoRA already is left as it is (as the
// seed does). The term: scaling·(dropout(x) A^T) B^T, STE-FP16 on A, B, the hidden and the term
// when the layer's STE is on. lora_delta: scaling·B A [out,in] (fp32+). resnap: Q = nearest LUT
// entry of (W_eff + ΔW) / S with S unchanged, LoRA dropped; returns the number of changed indices.
void v2_enable_lora(LutLinearV2 & l, int64_t rank, std::optional<double> alpha = std::nullopt, double dropout = 0.0);
void v2_disable_lora(LutLinearV2 & l);
at::Tensor v2_lora_forward(LutLinearV2 & l, const at::Tensor & x);   // (..., in) → (..., out)
at::Tensor v2_lora_delta(LutLinearV2 & l);
int64_t v2_resnap_with_lora(LutLinearV2 & l);

// Snapping (docs/formulas.md §2.6). snap_for_export: bake (A_dir·g, B_dir, g=1). snap_for_ane: fp16 everything;
// with recompute_indices, indices from fp16(W) / S16 and baked scales. convert_to_fp16: fp16
// weight and scales, the LUT re-created by lut_make in fp16 (as the seed does).
void v2_snap_for_export(LutLinearV2 & l);
void v2_snap_for_ane(LutLinearV2 & l, bool recompute_indices = true);
void v2_convert_to_fp16(LutLinearV2 & l);
// Q4→Q2 (docs/formulas.md §4): k-means LUT reduction when the size shrinks, rank expansion with 0.01·N(0,1)
// new directions and g = 0.01 for new ranks, indices recomputed by freeze_Q.
void v2_convert_rank_lut(LutLinearV2 & l, int64_t new_rank, int64_t new_lut_size,
                         std::optional<at::Generator> gen = std::nullopt);

// -- V1 layer --------------------------------------------------------------------------------
struct LutLinearV1 : Linear {
    int64_t lut_size = 16, group_size = 128;
    at::Tensor w, b;             // [out,in] (trainable or not), [out]
    at::Tensor scale_A;          // [out,r]
    at::Tensor scale_B;          // [r,padded_in]  (padded_in = in rounded up to group_size)
    at::Tensor full_scales;      // [out,padded_in] when r is not low rank, else undefined
    at::Tensor lut;              // [Lq]

    LutLinearV1(int64_t out, int64_t in, int64_t lut_size, int64_t rank, int64_t group_size,
                const at::TensorOptions & opts, bool has_bias = false);
    at::Tensor forward(const at::Tensor & x) override;
    std::vector<std::pair<std::string, at::Tensor *>> parameter_slots() override;
    at::Tensor weight() override;   // the fake-quantized weight, detached
    int64_t in_features() const override { return w.size(1); }
    int64_t out_features() const override { return w.size(0); }
};
at::Tensor v1_scales(LutLinearV1 & l);                   // clamp(A@B, 1e-8)[:, :in] [out,in]
at::Tensor v1_fake_quant(LutLinearV1 & l);               // W_q with the docs/formulas.md §3 STE rule [out,in]
void v1_init_from_weight(LutLinearV1 & l, const at::Tensor & W);
// V1→V2 (docs/formulas.md §3): A_dir, B_dir unit; g = |A_k|·|B_k| so that (A_dir ⊙ g) B_dir = A @ B; then freeze_Q.
std::shared_ptr<LutLinearV2> v1_to_v2(LutLinearV1 & v1, LutConfig c, bool freeze = true);

// -- models ----------------------------------------------------------------------------------
// The seed's regexes: \.mlp\.(gate|up|down)_proj$ and \.self_attn\.(q|k|v|o)_proj$.
bool quant_is_mlp(const std::string & name);
bool quant_is_attn(const std::string & name);

struct QuantReplaceOptions {
    std::string preset = "q2a4";
    bool mlp = true, attn = true;
    std::string filter;             // std::regex_search on the layer name; empty = all
    LutForm form = LutForm::materialized;
    bool ste_fp16 = false;
    int64_t group_size = 32;
    bool freeze = true;             // run freeze_Q after init
};
// Swaps the matching projections for V2 layers (lm_head, embeddings, norms stay float).
// Returns the replaced names.
std::vector<std::string> quant_replace(DecoderModel & m, const QuantReplaceOptions & o);
// (name, layer) of every V2 / V1 layer.
std::vector<std::pair<std::string, std::shared_ptr<LutLinearV2>>> quant_v2_layers(DecoderModel & m);
std::vector<std::pair<std::string, std::shared_ptr<LutLinearV1>>> quant_v1_layers(DecoderModel & m);
void quant_set_form(DecoderModel & m, LutForm form, std::optional<bool> ste_fp16 = std::nullopt);
void quant_freeze_q(DecoderModel & m);
// Trainable subsets (train_v2_simple docs/formulas.md §11); everything else is frozen:
// "all" (A, B, g), "g_only", "mlp", "attn", "frozen_magnitude" (A, B; g fp16-snapped, frozen),
// "lut" (the LUT16 raw deltas only). Returns the number of trainable tensors.
int64_t quant_set_trainable(DecoderModel & m, const std::string & mode);
void quant_snap_for_ane(DecoderModel & m, bool recompute_indices = true);
void quant_snap_for_export(DecoderModel & m);
void quant_convert_to_fp16(DecoderModel & m);
// Recovery LoRA on a model (docs/formulas.md §2.7). enable_all: every V2 layer but k_proj (skip_k_proj) and,
// with mlp_only, the attention ones; returns the names enabled. One layer: an error unless `name`
// is a V2 layer. freeze_for_recovery: only lora_A/lora_B train (norms, embeddings, lm_head on
// request); returns the number of trainable tensors. resnap: every LoRA'd layer (see
// v2_resnap_with_lora).
struct RecoveryLoraOptions {
    int64_t rank = 8;
    std::optional<double> alpha;    // default: rank (scaling 1)
    double dropout = 0.0;
    bool mlp_only = false, skip_k_proj = true;
};
void quant_enable_recovery_lora(DecoderModel & m, const std::string & name, const RecoveryLoraOptions & o);
std::vector<std::string> quant_enable_recovery_lora_all(DecoderModel & m, const RecoveryLoraOptions & o);
int64_t quant_disable_recovery_lora(DecoderModel & m);
int64_t quant_freeze_for_recovery(DecoderModel & m, bool train_norms = false, bool train_embeddings = false,
                                  bool train_lm_head = false);
struct ResnapStats {
    int64_t layers = 0, changed = 0, weights = 0;
    double rel_error = 0;   // mean over layers of mean|W_target - W_new| / mean|W_target|
};
ResnapStats quant_resnap_with_lora(DecoderModel & m);

// Swaps the matching projections for V1 layers (preset's LUT size and rank, group_size 128).
std::vector<std::string> quant_replace_v1(DecoderModel & m, const QuantReplaceOptions & o);
// Replaces every V1 layer by its V2 conversion (same rank and LUT; form and STE from o).
int64_t quant_v1_to_v2(DecoderModel & m, LutForm form = LutForm::materialized, bool ste_fp16 = false);
// convert_q4_to_q2 on a V2 model: MLP to (mlp_lut, mlp_rank), attention to (attn_lut, attn_rank).
int64_t quant_q4_to_q2(DecoderModel & m, int64_t mlp_rank = 32, int64_t attn_rank = 8, int64_t mlp_lut = 4,
                       int64_t attn_lut = 16, uint64_t seed = 0);

// -- files -----------------------------------------------------------------------------------
// A Hugging Face directory with plain weights (W_eff for V2/V1 layers, plus scaling·B A for a
// V2 layer with recovery LoRA: the dense model computes what the LoRA'd one does), loadable by
// DecoderModel::from_pretrained and transformers.
void quant_export_hf(DecoderModel & m, const std::string & dir, std::optional<at::ScalarType> dtype = std::nullopt);
// Compact form: one safetensors file with, per quantized layer, indices packed at ceil(log2 L)
// bits ("<name>.indices_packed", uint8), "lut", "scale_A"/"scale_B"/"rank_magnitude" (unit
// directions and g) in fp16, shapes and bits in the metadata; other parameters in fp16.
// Returns the file size in bytes.
int64_t quant_export_compact(DecoderModel & m, const std::string & path);
// A bit stream, little-endian: index j occupies stream bits [j·bits, (j+1)·bits), bit k of the
// stream being bit k % 8 of byte k / 8 (for 1, 2, 4, 8 bits: element j of a byte at j·bits).
at::Tensor indices_pack(const at::Tensor & idx, int64_t bits);                  // uint8 (N) → (ceil(N·bits/8)), bits 1..8
at::Tensor indices_unpack(const at::Tensor & packed, int64_t bits, int64_t n);  // → uint8 (n)
int64_t lut_bits_for(int64_t lut_size);   // ceil(log2 L), at least 1

// The seed's config.json for a V2 model (version, lut_bits, attn_lut_bits, scale_rank, ...).
std::string quant_config_json(DecoderModel & m);
// The (lut_size, rank) of MLP and attention layers named by a seed config.json text
// (lut_bits, attn_lut_bits, scale_rank, attn_scale_rank; attention defaults to the MLP values).
LutPreset quant_seed_config_parse(const std::string & json_text, const std::string & source);
// Our checkpoint: model.safetensors (the seed's key names, uint8 _indices) + config.json.
// Compact unless float_weights: a V2 layer whose indices are frozen leaves out its float
// weight (W_eff needs only indices, scales and LUT) and records a fingerprint of it instead,
// so loading into a model with other float weights is an error, not a silent mix.
void quant_save_checkpoint(DecoderModel & m, const std::string & dir, bool float_weights = false);
// Loads a seed checkpoint (.pt: a state dict, or {model_state_dict|state_dict: ...}) or our
// safetensors checkpoint (a file or a directory): V2 layers take the file's shapes (rank, LUT);
// Q from _indices, else from _Q (nearest LUT), else freeze_Q; dense layers named in the file
// with V2 keys are replaced. Other keys load into the model. A layer saved without its float
// weight takes the model's (checked against the saved fingerprint). Returns the keys not used.
std::vector<std::string> quant_load_checkpoint(DecoderModel & m, const std::string & path,
                                               const LutConfig & base = LutConfig());

} // namespace qatlab
