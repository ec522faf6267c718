// optim: AdamW, SGD and Muon with PyTorch's exact update order, fp32 masters for half-precision
// parameters, global-norm clipping, and state dicts (named tensors + JSON meta).
#include "lib/optim.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <map>
#include <set>
#include <stdexcept>

namespace qatlab {

using json = nlohmann::json;

const char * optim_kind_name(OptimKind k) {
    switch (k) {
    case OptimKind::adamw: return "AdamW";
    case OptimKind::sgd: return "SGD";
    case OptimKind::muon: return "Muon";
    }
    return "?";
}

namespace {

bool is_half(const at::Tensor & t) {
    return t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf;
}

// The tensor the update is applied to: the fp32 master of a half parameter (re-seeded when the
// parameter was changed from outside), else the parameter itself.
at::Tensor & work_tensor(at::Tensor & p, ParamState & s) {
    if (!is_half(p)) return p;
    if (!s.master.defined() || s.version != (int64_t)p._version()) s.master = p.detach().to(at::kFloat);
    return s.master;
}

// Writes the master back into a half parameter and remembers the version that write made.
void master_store(at::Tensor & p, ParamState & s) {
    if (!is_half(p)) return;
    p.detach().copy_(s.master);
    s.version = (int64_t)p._version();
}

at::Tensor grad_of(const at::Tensor & p, const at::Tensor & w) {
    at::Tensor g = p.grad();
    if (g.is_sparse()) throw std::runtime_error("optim: sparse gradients are not supported");
    return g.scalar_type() == w.scalar_type() ? g : g.to(w.scalar_type());
}

void positive_check(double v, const char * what) {
    if (!(v >= 0.0) || !std::isfinite(v))
        throw std::runtime_error(std::string("optim: ") + what + " must be a finite number >= 0, got " + std::to_string(v));
}

} // namespace

// -- Newton–Schulz ------------------------------------------------------------------------------

at::Tensor muon_orthogonalize(const at::Tensor & G, int64_t steps, bool bf16) {
    if (G.dim() != 2) throw std::runtime_error("muon_orthogonalize: expected a 2-D tensor, got " + std::to_string(G.dim()) + "-D");
    const double a = 3.4445, b = -4.7750, c = 2.0315;
    at::Tensor X = G.detach().to(bf16 ? at::kBFloat16 : at::kFloat);
    X = X / (X.norm() + 1e-7);
    bool tall = G.size(0) > G.size(1);
    if (tall) X = X.t();
    for (int64_t i = 0; i < steps; i++) {
        at::Tensor A = at::matmul(X, X.t());
        at::Tensor B = b * A + c * at::matmul(A, A);
        X = a * X + at::matmul(B, X);
    }
    return tall ? X.t() : X;
}

// -- Optimizer ------------------------------------------------------------------------------------

Optimizer::Optimizer(OptimKind kind, std::vector<ParamGroup> groups) : kind_(kind), groups_(std::move(groups)) {
    const char * name = optim_kind_name(kind_);
    if (groups_.empty()) throw std::runtime_error(std::string(name) + ": no parameter groups");
    std::set<const void *> seen;   // a tensor in two places would be updated twice per step
    for (size_t gi = 0; gi < groups_.size(); gi++) {
        auto & g = groups_[gi];
        positive_check(g.lr, "lr");
        positive_check(g.weight_decay, "weight_decay");
        positive_check(g.momentum, "momentum");
        if (kind_ == OptimKind::adamw) {
            if (!(g.beta1 >= 0 && g.beta1 < 1) || !(g.beta2 >= 0 && g.beta2 < 1))
                throw std::runtime_error("AdamW: betas must lie in [0, 1)");
            positive_check(g.eps, "eps");
        }
        if (kind_ == OptimKind::sgd && g.nesterov && g.momentum <= 0)
            throw std::runtime_error("SGD: nesterov needs momentum > 0");
        if (kind_ == OptimKind::muon && g.ns_steps < 0) throw std::runtime_error("Muon: ns_steps must be >= 0");
        for (size_t i = 0; i < g.params.size(); i++) {
            const at::Tensor & p = g.params[i];
            std::string where = std::string(name) + ": group " + std::to_string(gi + 1) + " parameter " + std::to_string(i + 1);
            if (!p.defined()) throw std::runtime_error(where + " is undefined");
            if (!at::isFloatingType(p.scalar_type()))
                throw std::runtime_error(where + ": expected a floating-point tensor, got " + c10::toString(p.scalar_type()));
            if (kind_ == OptimKind::muon && p.dim() != 2)
                throw std::runtime_error(where + ": Muon updates 2-D matrices only, got " + std::to_string(p.dim()) +
                                         "-D (use AdamW for vectors and scalars)");
            if (!seen.insert(p.unsafeGetTensorImpl()).second) throw std::runtime_error(where + " appears more than once");
        }
        state_.emplace_back(g.params.size());
    }
    // As torch: usually a frozen model or an empty selection, not an intent.
    if (seen.empty()) throw std::runtime_error(std::string(name) + ": got an empty parameter list");
}

int64_t Optimizer::num_params() const {
    int64_t n = 0;
    for (auto & g : groups_) n += (int64_t)g.params.size();
    return n;
}

void Optimizer::set_lr(double lr, int group) {
    positive_check(lr, "lr");
    if (group >= (int)groups_.size()) throw std::runtime_error("optim: no group " + std::to_string(group + 1));
    for (size_t i = 0; i < groups_.size(); i++)
        if (group < 0 || (int)i == group) groups_[i].lr = lr;
}

void Optimizer::set_momentum(double m, int group) {
    positive_check(m, "momentum");
    if (group >= (int)groups_.size()) throw std::runtime_error("optim: no group " + std::to_string(group + 1));
    for (size_t i = 0; i < groups_.size(); i++) {
        if (group >= 0 && (int)i != group) continue;
        if (kind_ == OptimKind::adamw) {
            if (m >= 1) throw std::runtime_error("AdamW: beta1 must lie in [0, 1)");
            groups_[i].beta1 = m;
        } else {
            groups_[i].momentum = m;
        }
    }
}

void Optimizer::zero_grad() {
    for (auto & g : groups_)
        for (auto & p : g.params)
            if (p.grad().defined()) p.mutable_grad() = at::Tensor();
}

void Optimizer::step() {
    at::NoGradGuard no_grad;
    for (size_t i = 0; i < groups_.size(); i++) {
        switch (kind_) {
        case OptimKind::adamw: adamw_step(groups_[i], state_[i]); break;
        case OptimKind::sgd: sgd_step(groups_[i], state_[i]); break;
        case OptimKind::muon: muon_step(groups_[i], state_[i]); break;
        }
    }
}

// torch.optim.AdamW (single-tensor path, same arithmetic as foreach):
// p *= 1-lr*wd; m.lerp_(g, 1-β1); v = β2 v + (1-β2) g²; p -= lr/bc1 · m / (√v/√bc2 + eps).
void Optimizer::adamw_step(ParamGroup & g, std::vector<ParamState> & st) {
    std::vector<at::Tensor> ws, gs, ms, vs;
    std::vector<at::Scalar> bc2_sqrt, neg_step_size;
    std::vector<size_t> idx;
    for (size_t i = 0; i < g.params.size(); i++) {
        at::Tensor & p = g.params[i];
        if (!p.grad().defined()) continue;
        ParamState & s = st[i];
        at::Tensor & w = work_tensor(p, s);
        if (!s.exp_avg.defined()) {
            s.exp_avg = at::zeros_like(w, at::MemoryFormat::Preserve);
            s.exp_avg_sq = at::zeros_like(w, at::MemoryFormat::Preserve);
        }
        s.step++;
        double bc1 = 1.0 - std::pow(g.beta1, (double)s.step);
        double bc2 = 1.0 - std::pow(g.beta2, (double)s.step);
        ws.push_back(w);
        gs.push_back(grad_of(p, w));
        ms.push_back(s.exp_avg);
        vs.push_back(s.exp_avg_sq);
        bc2_sqrt.emplace_back(std::sqrt(bc2));
        neg_step_size.emplace_back(-(g.lr / bc1));
        idx.push_back(i);
    }
    if (ws.empty()) return;
    if (g.weight_decay != 0) at::_foreach_mul_(ws, 1.0 - g.lr * g.weight_decay);
    at::_foreach_lerp_(ms, gs, 1.0 - g.beta1);
    at::_foreach_mul_(vs, g.beta2);
    at::_foreach_addcmul_(vs, gs, gs, 1.0 - g.beta2);
    std::vector<at::Tensor> denom = at::_foreach_sqrt(vs);
    at::_foreach_div_(denom, bc2_sqrt);
    at::_foreach_add_(denom, g.eps);
    at::_foreach_addcdiv_(ws, ms, denom, neg_step_size);
    for (size_t i : idx) master_store(g.params[i], st[i]);
}

// torch.optim.SGD with dampening 0: g += wd·p; buf = g (first step) else μ·buf + g;
// g = nesterov ? g + μ·buf : buf; p -= lr·g.
void Optimizer::sgd_step(ParamGroup & g, std::vector<ParamState> & st) {
    for (size_t i = 0; i < g.params.size(); i++) {
        at::Tensor & p = g.params[i];
        if (!p.grad().defined()) continue;
        ParamState & s = st[i];
        at::Tensor & w = work_tensor(p, s);
        at::Tensor d = grad_of(p, w);
        if (g.weight_decay != 0) d = d.add(w, g.weight_decay);
        if (g.momentum != 0) {
            if (!s.momentum_buffer.defined()) {
                s.momentum_buffer = d.clone();
            } else {
                s.momentum_buffer.mul_(g.momentum).add_(d);
            }
            d = g.nesterov ? d.add(s.momentum_buffer, g.momentum) : s.momentum_buffer;
        }
        s.step++;
        w.add_(d, -g.lr);
        master_store(p, s);
    }
}

// Muon as the golf reference: buf = μ·buf + g; u = nesterov ? g + μ·buf : buf;
// u = NS5(u)·sqrt(max(1, rows/cols)); p *= 1-lr·wd; p -= lr·u.
void Optimizer::muon_step(ParamGroup & g, std::vector<ParamState> & st) {
    for (size_t i = 0; i < g.params.size(); i++) {
        at::Tensor & p = g.params[i];
        if (!p.grad().defined()) continue;
        ParamState & s = st[i];
        at::Tensor & w = work_tensor(p, s);
        at::Tensor d = grad_of(p, w);
        if (!s.momentum_buffer.defined()) s.momentum_buffer = at::zeros_like(w, at::MemoryFormat::Preserve);
        s.momentum_buffer.mul_(g.momentum).add_(d);
        at::Tensor u = g.nesterov ? d.add(s.momentum_buffer, g.momentum) : s.momentum_buffer;
        u = muon_orthogonalize(u, g.ns_steps, g.ns_bf16);
        double scale = std::sqrt(std::max(1.0, (double)w.size(0) / (double)w.size(1)));
        s.step++;
        if (g.weight_decay != 0) w.mul_(1.0 - g.lr * g.weight_decay);
        w.add_(u.to(w.scalar_type()), -g.lr * scale);
        master_store(p, s);
    }
}

// -- state dicts ------------------------------------------------------------------------------------

OptimStateDict Optimizer::state_dict() const {
    OptimStateDict sd;
    json meta;
    meta["kind"] = optim_kind_name(kind_);
    json groups = json::array(), states = json::array();
    int64_t index = 0;
    for (size_t gi = 0; gi < groups_.size(); gi++) {
        const ParamGroup & g = groups_[gi];
        json jg;
        jg["lr"] = g.lr;
        jg["weight_decay"] = g.weight_decay;
        jg["betas"] = {g.beta1, g.beta2};
        jg["eps"] = g.eps;
        jg["momentum"] = g.momentum;
        jg["nesterov"] = g.nesterov;
        jg["ns_steps"] = g.ns_steps;
        jg["ns_bf16"] = g.ns_bf16;
        json ids = json::array();
        for (size_t i = 0; i < g.params.size(); i++, index++) {
            ids.push_back(index);
            const ParamState & s = state_[gi][i];
            if (s.step == 0 && !s.momentum_buffer.defined()) continue;
            states.push_back({{"index", index}, {"step", s.step}});
            std::string pre = "state." + std::to_string(index) + ".";
            auto add = [&](const char * name, const at::Tensor & t) {
                if (t.defined()) sd.tensors.emplace_back(pre + name, t.detach().clone());
            };
            add("exp_avg", s.exp_avg);
            add("exp_avg_sq", s.exp_avg_sq);
            add("momentum_buffer", s.momentum_buffer);
            // A master out of sync with its parameter is stale: the parameter is the truth then.
            if (s.master.defined() && s.version == (int64_t)g.params[i]._version()) add("master", s.master);
        }
        jg["params"] = ids;
        groups.push_back(jg);
    }
    meta["param_groups"] = groups;
    meta["state"] = states;
    sd.meta = meta.dump();
    return sd;
}

void Optimizer::load_state_dict(const OptimStateDict & sd) {
    const std::string name = std::string(optim_kind_name(kind_)) + ".load_state_dict";
    json meta;
    try {
        meta = json::parse(sd.meta);
    } catch (const std::exception & e) {
        throw std::runtime_error(name + ": meta is not valid JSON: " + e.what());
    }
    if (!meta.is_object() || !meta.contains("param_groups") || !meta["param_groups"].is_array())
        throw std::runtime_error(name + ": meta lacks 'param_groups'");
    if (meta.contains("kind") && meta["kind"] != optim_kind_name(kind_))
        throw std::runtime_error(name + ": the state dict is for " + meta["kind"].dump() + ", not " + optim_kind_name(kind_));
    const json & jgs = meta["param_groups"];
    if (jgs.size() != groups_.size())
        throw std::runtime_error(name + ": the state dict has " + std::to_string(jgs.size()) + " parameter groups, the optimizer " +
                                 std::to_string(groups_.size()));
    std::vector<std::pair<size_t, size_t>> where;   // flat index -> (group, i)
    for (size_t gi = 0; gi < groups_.size(); gi++) {
        const json & jg = jgs[gi];
        size_t n = jg.contains("params") ? jg["params"].size() : 0;
        if (n != groups_[gi].params.size())
            throw std::runtime_error(name + ": group " + std::to_string(gi + 1) + " has " + std::to_string(n) +
                                     " parameters in the state dict, " + std::to_string(groups_[gi].params.size()) + " here");
        for (size_t i = 0; i < n; i++) where.emplace_back(gi, i);
    }
    // Build the new state first so that a failure leaves the optimizer as it was.
    std::vector<std::vector<ParamState>> fresh;
    for (auto & g : groups_) fresh.emplace_back(g.params.size());
    std::map<std::string, const at::Tensor *> byname;
    for (auto & [k, t] : sd.tensors) byname[k] = &t;
    size_t used = 0;
    if (meta.contains("state")) {
        for (const json & js : meta["state"]) {
            int64_t index = js.at("index").get<int64_t>();
            if (index < 0 || index >= (int64_t)where.size())
                throw std::runtime_error(name + ": state index " + std::to_string(index) + " out of range");
            auto [gi, i] = where[(size_t)index];
            const at::Tensor & p = groups_[gi].params[i];
            ParamState & s = fresh[gi][i];
            s.step = js.at("step").get<int64_t>();
            std::string pre = "state." + std::to_string(index) + ".";
            auto get = [&](const char * buf, at::Tensor & out) {
                auto it = byname.find(pre + buf);
                if (it == byname.end()) return;
                const at::Tensor & t = *it->second;
                if (t.sizes() != p.sizes())
                    throw std::runtime_error(name + ": " + pre + buf + ": shape " + c10::str(t.sizes()) + " != parameter shape " +
                                             c10::str(p.sizes()));
                at::ScalarType dt = is_half(p) ? at::kFloat : p.scalar_type();
                out = t.detach().to(p.device(), dt, false, true).contiguous();
                used++;
            };
            get("exp_avg", s.exp_avg);
            get("exp_avg_sq", s.exp_avg_sq);
            get("momentum_buffer", s.momentum_buffer);
            get("master", s.master);
            if (kind_ == OptimKind::adamw && s.step > 0 && (!s.exp_avg.defined() || !s.exp_avg_sq.defined()))
                throw std::runtime_error(name + ": " + pre + "exp_avg / exp_avg_sq missing");
            if (s.master.defined()) {
                if (!is_half(p)) s.master = at::Tensor();   // fp32 parameters carry no master
                else s.version = (int64_t)p._version();     // the master is the truth from here on
            }
        }
    }
    if (used != sd.tensors.size()) {
        for (auto & [k, t] : sd.tensors) {
            bool ok = k.rfind("state.", 0) == 0;
            if (!ok) throw std::runtime_error(name + ": unexpected tensor '" + k + "'");
        }
        throw std::runtime_error(name + ": tensors not described by meta.state");
    }
    for (size_t gi = 0; gi < groups_.size(); gi++) {
        const json & jg = jgs[gi];
        ParamGroup & g = groups_[gi];
        if (jg.contains("lr")) g.lr = jg["lr"].get<double>();
        if (jg.contains("weight_decay")) g.weight_decay = jg["weight_decay"].get<double>();
        if (jg.contains("betas")) {
            g.beta1 = jg["betas"].at(0).get<double>();
            g.beta2 = jg["betas"].at(1).get<double>();
        }
        if (jg.contains("eps")) g.eps = jg["eps"].get<double>();
        if (jg.contains("momentum")) g.momentum = jg["momentum"].get<double>();
        if (jg.contains("nesterov")) g.nesterov = jg["nesterov"].get<bool>();
        if (jg.contains("ns_steps")) g.ns_steps = jg["ns_steps"].get<int64_t>();
        if (jg.contains("ns_bf16")) g.ns_bf16 = jg["ns_bf16"].get<bool>();
    }
    state_ = std::move(fresh);
}

// -- clipping ------------------------------------------------------------------------------------

at::Tensor clip_grad_norm(const std::vector<at::Tensor> & params, double max_norm) {
    at::NoGradGuard no_grad;
    std::vector<at::Tensor> grads;
    for (auto & p : params)
        if (p.grad().defined()) grads.push_back(p.grad());
    if (grads.empty()) return at::zeros({}, at::kFloat);
    // As torch: per-tensor norms (in each grad's dtype), the norm of their stack, one coefficient.
    std::vector<at::Tensor> norms = at::_foreach_norm(grads, 2);
    at::ScalarType dt = norms[0].scalar_type();
    for (auto & n : norms) dt = at::promote_types(dt, n.scalar_type());
    for (auto & n : norms) n = n.to(grads[0].device(), dt);
    at::Tensor total = at::linalg_vector_norm(at::stack(norms), 2);
    at::Tensor coef = at::clamp_max(max_norm / (total + 1e-6), 1.0);
    for (auto & g : grads) g.mul_(coef.to(g.device()));
    return total;   // a tensor, as torch: reading it would wait for the device
}

} // namespace qatlab
