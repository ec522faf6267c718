// quant_intn: parameter-golf int-N quantization: symmetric per-row (or row-group) int8/int6/int5,
// STE fake-quant QAT linears switched on by a schedule, and a bit-packed zstd artifact.
#pragma once
#include <ATen/core/Tensor.h>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "lib/model.h"

namespace qatlab {

// -- the quantizer ---------------------------------------------------------------------------
// A weight (out, in...) is viewed as rows (out, numel/out). Rows are grouped `group_rows` at a
// time (1 = per row, the records' rule; 8 = PR #488's group_rows=8) and each group gets one scale:
//   clip c = k * std(group)    (SDClip; torch's unbiased std)      when clip_k > 0
//   clip c = max |w| (group)   (the QAT records: row_max / 31)     when clip_k == 0
//   scale = fp16(c / qmax), qmax = 2^(bits-1) - 1;  q = clamp(round(w / scale), -qmax, qmax)
// round is torch.round (half to even). The scale is rounded to fp16 before use, so the in-memory
// quantizer, the STE forward and the exported artifact agree bit for bit. A zero group gets scale 1.
// Reference values: matrices b=6 k=12.85, embeddings b=8 k=20 (SDClip); QAT records k=0.
struct IntNOptions {
    int bits = 6;              // 2..8
    double clip_k = 0.0;       // 0 = max-abs
    int64_t group_rows = 1;    // rows sharing one scale; must divide the row count
};

struct IntNQuantized {
    at::Tensor q;       // int8, the weight's shape, values in [-qmax, qmax]
    at::Tensor scale;   // float32 (rows / group_rows), every value exactly representable in fp16
};

int64_t intn_qmax(int bits);
// Checks bits / clip_k / group_rows against a weight; throws "<what>: ..." on a bad value.
void intn_check(const at::Tensor & w, const IntNOptions & opt, const std::string & what = "intn");
at::Tensor intn_scale(const at::Tensor & w, const IntNOptions & opt);
IntNQuantized intn_quantize(const at::Tensor & w, const IntNOptions & opt);
// q * scale (broadcast over each group's rows) in `dtype`.
at::Tensor intn_dequantize(const at::Tensor & q, const at::Tensor & scale, int64_t group_rows = 1,
                           at::ScalarType dtype = at::kFloat);
// Straight-through fake quant: the value of dequantize(quantize(w)) (in w's dtype), the gradient
// of the identity. Written dq.detach() + (w - w.detach()) so that the value is dq exactly (not
// w + (dq - w), which rounds twice in bf16).
at::Tensor intn_fake_quant(const at::Tensor & w, const IntNOptions & opt);

// -- QAT layers and the switch ---------------------------------------------------------------
// A dense linear whose forward uses the fake-quantized weight while `enabled`. It shares the
// dense layer's weight and bias tensors, so optimizers and state dicts see the same parameters.
// The flag is read at every forward (no graph capture to constant-fold it, the 03-21 record bug).
struct IntNLinear : Linear {
    at::Tensor w, b;
    IntNOptions opt;
    bool enabled = false;
    IntNLinear(at::Tensor weight, at::Tensor bias, IntNOptions o) : w(std::move(weight)), b(std::move(bias)), opt(o) {}
    at::Tensor forward(const at::Tensor & x) override;
    std::vector<std::pair<std::string, at::Tensor *>> parameter_slots() override;
    at::Tensor weight() override { return w; }
    int64_t in_features() const override { return w.size(1); }
    int64_t out_features() const override { return w.size(0); }
};

// Replaces every linear whose name matches `filter` (std::regex_search; empty = all) by an
// IntNLinear (disabled) over the same tensors; an IntNLinear already there gets the new options.
// Only layers with exactly "weight" (+ "bias") slots can be wrapped. Returns (name, layer).
std::vector<std::pair<std::string, std::shared_ptr<IntNLinear>>>
intn_apply(DecoderModel & m, const IntNOptions & opt, const std::string & filter = "");

// When QAT turns on. Each trigger that is set turns it on once it holds; once on it stays on
// (latched, like the records' late_qat flag). Triggers:
//   step >= start_step;  lr_mult < lr_below (records: 0.15);  elapsed / budget >= time_fraction
//   (PR #488: 0.85, "the last 15% of wallclock"). No trigger set = on from the first update.
struct IntNSchedule {
    std::optional<int64_t> start_step;
    std::optional<double> lr_below;
    std::optional<double> time_fraction;
    bool on = false;
    int64_t switched_step = -1;   // the step given to the update that turned it on (-1 = unknown)

    struct Input {
        std::optional<int64_t> step;
        std::optional<double> lr_mult, elapsed, budget;
    };
    bool update(const Input & in);
};

// -- the artifact ----------------------------------------------------------------------------
// File: 32-byte header, then one zstd frame (with checksum) of the payload.
//   header: "QINTN\0\0\1" | u32 version=1 | u32 flags=0 | u64 payload bytes | u64 frame bytes
//   payload: u64 index bytes | index JSON | blob
// The index lists the entries in order: {"name","kind":"intn"|"raw","shape","dtype" (the
// original dtype, restored on load), and for intn "bits","group_rows","clip_k", else "store":
// "float16"|"float32"}. In the blob, an intn entry is its bit-packed codes (ceil(numel*bits/8)
// bytes; code u = q + qmax in bits [i*bits, (i+1)*bits) of a little-endian bit stream) followed
// by its fp16 scales; a raw entry is its values in the stored dtype, little-endian.
// payload bytes = 8 + index bytes + sum(entry bytes): what intn_export_stats computes.
struct IntNRule {
    std::string pattern;   // std::regex_search on the name
    int bits = 6;          // 2..8 = intN; 16 = keep fp16; 32 = keep fp32
    std::optional<double> clip_k;
    std::optional<int64_t> group_rows;
};

struct IntNExportOptions {
    IntNOptions quant;              // default for 2-D floating tensors
    std::vector<IntNRule> rules;    // first match wins (e.g. {"mlp", 5}, {"embed_tokens", 16})
    int64_t keep_numel = 65536;     // tensors with <= this many elements, or not 2-D: fp16 (reference)
    int level = 22;                 // zstd level (reference: zstd-22)
};

struct IntNExportStats {
    int64_t file_bytes = 0;       // what lands on disk: header + zstd frame
    int64_t payload_bytes = 0;    // before compression
    int64_t index_bytes = 0;
    int64_t quantized = 0, kept = 0;   // entry counts
};

struct IntNEntry {
    std::string name;
    std::string kind;               // "intn" or "raw"
    at::ScalarType dtype = at::kFloat;   // original dtype
    std::vector<int64_t> shape;
    int bits = 0;
    int64_t group_rows = 1;
    double clip_k = 0;
    at::Tensor q, scale;            // intn: int8 codes, float32 scales
    at::Tensor value;               // dequantized (intn) or the stored values, in `dtype`
};

IntNExportStats intn_export(const std::string & path, const NamedTensors & tensors, const IntNExportOptions & opt);
// Throws std::runtime_error "<path>: <what was expected, what was found>" on a bad artifact.
std::vector<IntNEntry> intn_load(const std::string & path);

// Bit packing of codes in [0, 2^bits) (exposed for tests).
std::vector<uint8_t> intn_pack(const at::Tensor & codes, int bits);
at::Tensor intn_unpack(const uint8_t * data, size_t bytes, int64_t n, int bits);

} // namespace qatlab
