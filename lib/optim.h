// optim: AdamW, SGD and Muon over parameter groups (PyTorch's update rules), global-norm gradient
// clipping, zero_grad, and state dicts as named tensors + a JSON description (safetensors-ready).
#pragma once
#include <ATen/core/Tensor.h>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace qatlab {

enum class OptimKind { adamw, sgd, muon };

const char * optim_kind_name(OptimKind k);   // "AdamW", "SGD", "Muon"

// One parameter group. Fields a kind does not use are ignored (and kept in the state dict).
struct ParamGroup {
    std::vector<at::Tensor> params;
    double lr = 1e-3;
    double weight_decay = 0.0;    // AdamW, Muon: decoupled p *= 1 - lr*wd; SGD: coupled L2 (g += wd*p)
    double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;   // AdamW
    double momentum = 0.0;        // SGD, Muon
    bool nesterov = false;        // SGD, Muon
    int64_t ns_steps = 5;         // Muon: Newton–Schulz iterations
    bool ns_bf16 = true;          // Muon: iterate in bf16 as the reference does (fp32 when false)
};

// What state_dict() returns: every buffer as "state.<i>.<buffer>" (i: the parameter's index counting
// through all groups in order, as PyTorch numbers them; buffers: exp_avg, exp_avg_sq,
// momentum_buffer, master), and `meta`, a JSON object {"kind", "param_groups": [{hyper-parameters,
// "params": [indices]}], "state": [{"index", "step"}]}. A checkpoint is
// safetensors_save(path, sd.tensors, {{"optim", sd.meta}}).
struct OptimStateDict {
    std::vector<std::pair<std::string, at::Tensor>> tensors;
    std::string meta;   // JSON text
};

// Per-parameter state. Buffers are fp32 for half-precision (bf16/fp16) parameters, which also get an
// fp32 master copy: the update is applied to the master and the parameter is its rounding. A
// parameter changed from outside (its version counter moved) re-seeds its master from its value.
// fp32/fp64 parameters are updated in place, their buffers in their own dtype.
struct ParamState {
    int64_t step = 0;
    at::Tensor exp_avg, exp_avg_sq, momentum_buffer, master;
    int64_t version = -1;   // the parameter's _version() after our last write (master in sync)
};

class Optimizer {
public:
    Optimizer(OptimKind kind, std::vector<ParamGroup> groups);

    // One update of every parameter that has a gradient (those without are skipped and their step
    // count does not move, as in PyTorch). Runs under no-grad.
    void step();
    // Sets every gradient to none (PyTorch's set_to_none=True).
    void zero_grad();

    OptimKind kind() const { return kind_; }
    std::vector<ParamGroup> & param_groups() { return groups_; }
    const std::vector<ParamGroup> & param_groups() const { return groups_; }
    // group < 0: every group.
    void set_lr(double lr, int group = -1);
    void set_momentum(double m, int group = -1);   // SGD, Muon: momentum; AdamW: beta1
    int64_t num_params() const;

    OptimStateDict state_dict() const;
    // Restores buffers, step counts and hyper-parameters; the groups must have the same sizes and
    // the buffers the parameters' shapes. Throws std::runtime_error naming the mismatch.
    void load_state_dict(const OptimStateDict & sd);

private:
    void adamw_step(ParamGroup & g, std::vector<ParamState> & st);
    void sgd_step(ParamGroup & g, std::vector<ParamState> & st);
    void muon_step(ParamGroup & g, std::vector<ParamState> & st);

    OptimKind kind_;
    std::vector<ParamGroup> groups_;
    std::vector<std::vector<ParamState>> state_;   // parallel to groups_[i].params
};

// Newton–Schulz quintic iteration towards the orthogonal polar factor of a 2-D G (golf reference:
// X = G/(‖G‖_F+1e-7), transposed when rows > cols, X ← aX + (bA + cA²)X with A = XXᵀ,
// (a,b,c) = (3.4445, −4.7750, 2.0315)). Returns bf16 when `bf16`, else fp32. Singular values end
// near 1 (roughly 0.7–1.2), not exactly 1.
at::Tensor muon_orthogonalize(const at::Tensor & G, int64_t steps = 5, bool bf16 = true);

// torch.nn.utils.clip_grad_norm_(params, max_norm) with norm_type 2: scales every gradient by
// min(1, max_norm/(total+1e-6)) and returns the total norm before clipping. Parameters without a
// gradient are ignored; no gradients → 0. The norm is a 0-dim tensor on the gradients' device (no host sync).
at::Tensor clip_grad_norm(const std::vector<at::Tensor> & params, double max_norm);

} // namespace qatlab
