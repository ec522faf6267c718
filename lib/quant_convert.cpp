// quant_convert: LUT layers on a whole DecoderModel: replacement by the seed's regexes,
// trainable subsets, snapping, V1→V2 and Q4→Q2, Hugging Face and compact export, and the
// seed's checkpoint layout (.pt state dicts, config.json) plus our safetensors checkpoints.
#include "lib/pt_reader.h"
#include "lib/quant_init.h"
#include "lib/quant_lut.h"
#include "lib/safetensors.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <set>
#include <sstream>
#include <unistd.h>

namespace qatlab {

using json = nlohmann::json;
namespace fs = std::filesystem;

bool quant_is_mlp(const std::string & n) {
    static const std::regex re(R"(\.mlp\.(gate_proj|up_proj|down_proj)$)");
    return std::regex_search(n, re);
}

bool quant_is_attn(const std::string & n) {
    static const std::regex re(R"(\.self_attn\.(q_proj|k_proj|v_proj|o_proj)$)");
    return std::regex_search(n, re);
}

std::vector<std::pair<std::string, std::shared_ptr<LutLinearV2>>> quant_v2_layers(DecoderModel & m) {
    std::vector<std::pair<std::string, std::shared_ptr<LutLinearV2>>> out;
    for (auto & n : m.linear_names())
        if (auto l = std::dynamic_pointer_cast<LutLinearV2>(m.get_linear(n))) out.push_back({n, l});
    return out;
}

std::vector<std::pair<std::string, std::shared_ptr<LutLinearV1>>> quant_v1_layers(DecoderModel & m) {
    std::vector<std::pair<std::string, std::shared_ptr<LutLinearV1>>> out;
    for (auto & n : m.linear_names())
        if (auto l = std::dynamic_pointer_cast<LutLinearV1>(m.get_linear(n))) out.push_back({n, l});
    return out;
}

namespace {
// The names replace() would touch, with their (lut, rank).
std::vector<std::tuple<std::string, int64_t, int64_t>> replace_targets(DecoderModel & m, const QuantReplaceOptions & o) {
    LutPreset p = lut_preset(o.preset);
    std::regex filter(o.filter.empty() ? std::string(".*") : o.filter);
    std::vector<std::tuple<std::string, int64_t, int64_t>> out;
    for (auto & n : m.linear_names()) {
        bool mlp = quant_is_mlp(n), attn = quant_is_attn(n);
        if (!((mlp && o.mlp) || (attn && o.attn))) continue;
        if (!o.filter.empty() && !std::regex_search(n, filter)) continue;
        out.push_back({n, mlp ? p.mlp_lut : p.attn_lut, mlp ? p.mlp_rank : p.attn_rank});
    }
    return out;
}

} // namespace

void linear_dense_weight(const std::shared_ptr<Linear> & l, at::Tensor & W, at::Tensor & bias) {
    if (auto d = std::dynamic_pointer_cast<DenseLinear>(l)) {
        W = d->w;
        bias = d->b;
    } else if (auto v1 = std::dynamic_pointer_cast<LutLinearV1>(l)) {   // the original weight, not W_q
        W = v1->w;
        bias = v1->b;
    } else {
        W = l->weight();
    }
}

std::vector<LayerRecipe> quant_preset_recipe(DecoderModel & m, const QuantReplaceOptions & o) {
    std::vector<LayerRecipe> out;
    for (auto & [n, lut, rank] : replace_targets(m, o)) {
        LayerRecipe r;
        r.name = n;
        r.lut_size = lut;
        r.rank = rank;
        r.group_size = o.group_size;
        r.preset = true;
        out.push_back(r);
    }
    return out;
}

std::vector<std::string> quant_replace(DecoderModel & m, const QuantReplaceOptions & o) {
    V2InitOptions io;
    io.form = o.form;
    io.ste_fp16 = o.ste_fp16;
    io.freeze = o.freeze;
    return quant_replace_recipe(m, quant_preset_recipe(m, o), io);
}

std::vector<std::string> quant_replace_v1(DecoderModel & m, const QuantReplaceOptions & o) {
    std::vector<std::string> done;
    for (auto & [n, lut, rank] : replace_targets(m, o)) {
        auto old = m.get_linear(n);
        at::Tensor W, bias;
        linear_dense_weight(old, W, bias);
        auto l = std::make_shared<LutLinearV1>(W.size(0), W.size(1), lut, rank, 128, W.options(), bias.defined());
        l->w = W.detach();
        if (bias.defined()) l->b = bias.detach();
        v1_init_from_weight(*l, l->w);
        m.set_linear(n, l);
        done.push_back(n);
    }
    return done;
}

void quant_set_form(DecoderModel & m, LutForm form, std::optional<bool> ste) {
    for (auto & [n, l] : quant_v2_layers(m)) {
        l->form = form;
        if (ste) l->cfg.use_ste_fp16 = *ste;
    }
}

void quant_freeze_q(DecoderModel & m) {
    for (auto & [n, l] : quant_v2_layers(m)) v2_freeze_q(*l);
}

int64_t quant_set_trainable(DecoderModel & m, const std::string & mode) {
    static const std::set<std::string> modes{"all", "g_only", "mlp", "attn", "frozen_magnitude", "lut"};
    if (!modes.count(mode))
        throw std::runtime_error("unknown mode '" + mode + "' (expected all, g_only, mlp, attn, frozen_magnitude or lut)");
    m.requires_grad(false);   // everything starts frozen (docs/formulas.md §11)
    int64_t n = 0;
    auto on = [&](at::Tensor & t) {
        t.requires_grad_(true);
        n++;
    };
    for (auto & [name, l] : quant_v2_layers(m)) {
        if (mode == "lut") {
            if (l->lut_raw.defined()) on(l->lut_raw);
            continue;
        }
        if (mode == "mlp" && !quant_is_mlp(name)) continue;
        if (mode == "attn" && !quant_is_attn(name)) continue;
        if (mode != "g_only") {
            on(l->scale_A);
            on(l->scale_B);
        }
        if (mode == "frozen_magnitude") {   // snapped cpu().half().float() and frozen
            at::NoGradGuard ng;
            l->rank_magnitude = l->rank_magnitude.detach().cpu().to(at::kHalf).to(l->rank_magnitude.options());
        } else {
            on(l->rank_magnitude);
        }
    }
    return n;
}

void quant_snap_for_ane(DecoderModel & m, bool recompute) {
    for (auto & [n, l] : quant_v2_layers(m)) v2_snap_for_ane(*l, recompute);
}

void quant_snap_for_export(DecoderModel & m) {
    for (auto & [n, l] : quant_v2_layers(m)) v2_snap_for_export(*l);
}

void quant_convert_to_fp16(DecoderModel & m) {
    for (auto & [n, l] : quant_v2_layers(m)) v2_convert_to_fp16(*l);
}

int64_t quant_v1_to_v2(DecoderModel & m, LutForm form, bool ste) {
    int64_t n = 0;
    for (auto & [name, l1] : quant_v1_layers(m)) {
        LutConfig c;
        c.use_ste_fp16 = ste;
        auto l = v1_to_v2(*l1, c, true);
        l->form = form;
        m.set_linear(name, l);
        n++;
    }
    return n;
}

// -- recovery LoRA (docs/formulas.md §2.7) -------------------------------------------------------------------

void quant_enable_recovery_lora(DecoderModel & m, const std::string & name, const RecoveryLoraOptions & o) {
    auto l = std::dynamic_pointer_cast<LutLinearV2>(m.get_linear(name));
    if (!l) throw std::runtime_error("layer '" + name + "' is not a V2 (LUT) layer");
    v2_enable_lora(*l, o.rank, o.alpha, o.dropout);
    l->train(m.is_training());
}

std::vector<std::string> quant_enable_recovery_lora_all(DecoderModel & m, const RecoveryLoraOptions & o) {
    static const std::regex k_proj(R"(\.k_proj$)");
    std::vector<std::string> done;
    for (auto & [n, l] : quant_v2_layers(m)) {
        if (o.skip_k_proj && std::regex_search(n, k_proj)) continue;
        if (o.mlp_only && !quant_is_mlp(n)) continue;
        quant_enable_recovery_lora(m, n, o);
        done.push_back(n);
    }
    return done;
}

int64_t quant_disable_recovery_lora(DecoderModel & m) {
    int64_t n = 0;
    for (auto & [name, l] : quant_v2_layers(m))
        if (l->lora_A.defined()) {
            v2_disable_lora(*l);
            n++;
        }
    return n;
}

int64_t quant_freeze_for_recovery(DecoderModel & m, bool norms, bool embed, bool lm_head) {
    m.requires_grad(false);
    int64_t n = 0;
    for (auto & [name, l] : quant_v2_layers(m))
        if (l->lora_A.defined()) {
            l->lora_A.requires_grad_(true);
            l->lora_B.requires_grad_(true);
            n += 2;
        }
    std::set<std::string> quantized;
    for (auto & [name, l] : quant_v2_layers(m)) quantized.insert(name);
    for (auto & [name, t] : m.named_parameters()) {
        auto dot = name.rfind('.');
        if (dot != std::string::npos && quantized.count(name.substr(0, dot))) continue;
        bool on = (norms && name.find("norm") != std::string::npos) || (embed && name.find("embed_tokens") != std::string::npos) ||
                  (lm_head && name.rfind("lm_head.", 0) == 0);
        if (on && t.is_floating_point()) {
            at::Tensor p = t;   // shares the parameter's TensorImpl
            p.requires_grad_(true);
            n++;
        }
    }
    return n;
}

ResnapStats quant_resnap_with_lora(DecoderModel & m) {
    at::NoGradGuard ng;
    ResnapStats st;
    for (auto & [name, l] : quant_v2_layers(m)) {
        if (!l->lora_A.defined()) continue;
        at::Tensor target = l->weight().to(at::kFloat);   // W_eff + scaling·B A
        st.changed += v2_resnap_with_lora(*l);
        at::Tensor now = l->weight().to(at::kFloat);
        st.rel_error += ((target - now).abs().mean() / target.abs().mean().clamp_min(1e-30)).item<double>();
        st.weights += target.numel();
        st.layers++;
    }
    if (st.layers) st.rel_error /= (double)st.layers;
    return st;
}

int64_t quant_q4_to_q2(DecoderModel & m, int64_t mlp_rank, int64_t attn_rank, int64_t mlp_lut, int64_t attn_lut,
                       uint64_t seed) {
    auto layers = quant_v2_layers(m);
    if (layers.empty())
        throw std::invalid_argument("the model has no V2 (LUT) layers to convert (quant.replace or quant.v1_to_v2 first)");
    // Every layer is checked before any is touched: an error leaves the model as it was.
    for (auto & [name, l] : layers) {
        const bool mlp = quant_is_mlp(name);
        const char * rk = mlp ? "mlp_rank" : "attn_rank";
        const char * lk = mlp ? "mlp_lut" : "attn_lut";
        const int64_t rank = mlp ? mlp_rank : attn_rank, lut = mlp ? mlp_lut : attn_lut;
        const int64_t cap = std::min(l->out_features(), l->in_features());
        if (rank < l->rank() || rank > cap)
            throw std::invalid_argument(std::string(rk) + ": expected " + std::to_string(l->rank()) + ".." +
                                        std::to_string(cap) + " for " + name + " (rank " + std::to_string(l->rank()) +
                                        ", min(out, in) = " + std::to_string(cap) + "; the rank can only grow), got " +
                                        std::to_string(rank));
        if (lut < 2 || lut > l->lut.numel())
            throw std::invalid_argument(std::string(lk) + ": expected a LUT size in 2.." + std::to_string(l->lut.numel()) +
                                        " for " + name + " (the LUT can only shrink), got " + std::to_string(lut));
    }
    at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
    int64_t n = 0;
    for (auto & [name, l] : layers) {
        bool mlp = quant_is_mlp(name);
        v2_convert_rank_lut(*l, mlp ? mlp_rank : attn_rank, mlp ? mlp_lut : attn_lut, gen);
        n++;
    }
    return n;
}

// -- files -----------------------------------------------------------------------------------

namespace {
std::string dtype_name(at::ScalarType t) {
    switch (t) {
    case at::kFloat: return "float32";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kDouble: return "float64";
    default: throw std::runtime_error(std::string("export: dtype must be floating, got ") + c10::toString(t));
    }
}

void write_text_atomic(const std::string & path, const std::string & text) {
    std::string tmp = path + ".tmp." + std::to_string(getpid());
    {
        std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
        if (!f) throw std::runtime_error(tmp + ": cannot create");
        f << text;
        if (!f.flush()) throw std::runtime_error(tmp + ": write failed");
    }
    fs::rename(tmp, path);
}

// Which quantized layer owns a parameter name ("<layer>.<slot>"), or "".
std::string owner(const std::string & n, const std::set<std::string> & layers) {
    auto dot = n.rfind('.');
    if (dot == std::string::npos) return "";
    std::string p = n.substr(0, dot);
    return layers.count(p) ? p : "";
}

std::set<std::string> quant_layer_names(DecoderModel & m) {
    std::set<std::string> s;
    for (auto & [n, l] : quant_v2_layers(m)) s.insert(n);
    for (auto & [n, l] : quant_v1_layers(m)) s.insert(n);
    return s;
}
} // namespace

void quant_export_hf(DecoderModel & m, const std::string & dir, std::optional<at::ScalarType> dtype) {
    at::NoGradGuard ng;
    at::ScalarType dt = dtype.value_or(m.dtype());
    std::set<std::string> qnames = quant_layer_names(m), emitted;
    auto ln = m.linear_names();
    std::set<std::string> linears(ln.begin(), ln.end());
    NamedTensors out;
    for (auto & [n, t] : m.named_parameters()) {
        std::string o = owner(n, linears);
        if (o.empty()) {
            out.push_back({n, t.detach().to(dt)});
            continue;
        }
        if (!emitted.insert(o).second) continue;
        auto l = m.get_linear(o);
        if (!qnames.count(o)) {   // dense or Lua layers: what they save (a Lua layer its dense weight)
            for (auto & [sn, st] : l->save_tensors(o)) out.push_back({sn, st.detach().to(dt)});
            continue;
        }
        out.push_back({o + ".weight", l->weight().to(dt)});   // baked W_eff = Q ⊙ S
        for (auto & [sn, p] : l->parameter_slots())
            if (sn == "bias") out.push_back({o + ".bias", p->detach().to(dt)});
    }
    DecoderConfig c = m.config();
    c.torch_dtype = dtype_name(dt);
    fs::path d(dir), tmp(dir + ".tmp." + std::to_string(getpid())), old(dir + ".old." + std::to_string(getpid()));
    fs::remove_all(tmp);
    fs::create_directories(tmp);
    std::error_code ec;
    try {
        safetensors_save((tmp / "model.safetensors").string(), out, {{"format", "pt"}});
        write_text_atomic((tmp / "config.json").string(), decoder_config_dump(c));
    } catch (...) {
        fs::remove_all(tmp, ec);
        throw;
    }
    // The previous export is moved aside, not removed, until the new one is in place: a failing
    // rename (full or failing disk) leaves it whole.
    const bool had = fs::exists(d);
    try {
        if (had) fs::rename(d, old);
        fs::rename(tmp, d);
    } catch (...) {
        if (had && fs::exists(old) && !fs::exists(d)) fs::rename(old, d, ec);
        fs::remove_all(tmp, ec);
        throw;
    }
    fs::remove_all(old, ec);
}

int64_t lut_bits_for(int64_t n) {
    int64_t b = 1;
    while ((int64_t(1) << b) < n) b++;
    return b;
}

at::Tensor indices_pack(const at::Tensor & idx, int64_t bits) {
    if (bits < 1 || bits > 8) throw std::runtime_error("indices_pack: bits must be in 1..8, got " + std::to_string(bits));
    const int64_t n = idx.numel();
    at::Tensor v = idx.reshape({-1}).to(at::kCPU, at::kInt);
    if (n && v.max().item<int64_t>() >= (1 << bits))
        throw std::runtime_error("indices_pack: an index does not fit in " + std::to_string(bits) + " bits");
    if (8 % bits == 0) {   // whole elements per byte: element j of a byte at bits [j·bits, (j+1)·bits)
        const int64_t per = 8 / bits, pad = (per - n % per) % per;
        if (pad) v = at::cat({v, at::zeros({pad}, v.options())});
        v = v.view({-1, per});
        return at::bitwise_left_shift(v, at::arange(per, v.options()) * bits).sum(1).to(at::kByte);
    }
    // The same stream bit by bit: (n, bits) → n·bits stream bits → bytes.
    at::Tensor s = at::bitwise_and(at::bitwise_right_shift(v.unsqueeze(1), at::arange(bits, v.options())), 1).reshape({-1});
    const int64_t pad = (8 - s.numel() % 8) % 8;
    if (pad) s = at::cat({s, at::zeros({pad}, s.options())});
    return at::bitwise_left_shift(s.view({-1, 8}), at::arange(8, s.options())).sum(1).to(at::kByte);
}

at::Tensor indices_unpack(const at::Tensor & packed, int64_t bits, int64_t n) {
    if (bits < 1 || bits > 8) throw std::runtime_error("indices_unpack: bits must be in 1..8, got " + std::to_string(bits));
    at::Tensor p = packed.reshape({-1}).to(at::kCPU, at::kInt).unsqueeze(1);
    if (8 % bits == 0) {
        const int64_t per = 8 / bits;
        at::Tensor shifts = at::arange(per, p.options()) * bits;
        return at::bitwise_and(at::bitwise_right_shift(p, shifts), (1 << bits) - 1).reshape({-1}).narrow(0, 0, n).to(at::kByte);
    }
    at::Tensor s = at::bitwise_and(at::bitwise_right_shift(p, at::arange(8, p.options())), 1).reshape({-1});   // stream bits
    s = s.narrow(0, 0, n * bits).view({n, bits});
    return at::bitwise_left_shift(s, at::arange(bits, s.options())).sum(1).to(at::kByte);
}

int64_t quant_export_compact(DecoderModel & m, const std::string & path) {
    at::NoGradGuard ng;
    std::set<std::string> v2names, emitted;
    for (auto & [n, l] : quant_v2_layers(m)) v2names.insert(n);
    NamedTensors out;
    std::map<std::string, std::string> meta{{"format", "qatlab_compact_v2"},
                                            {"semantics", "W = lut[unpack(indices_packed)] * ((scale_A * rank_magnitude) @ scale_B)"}};
    for (auto & [n, t] : m.named_parameters()) {
        std::string o = owner(n, v2names);
        if (o.empty()) {
            out.push_back({n, t.detach().is_floating_point() ? t.detach().to(at::kHalf) : t.detach()});
            continue;
        }
        if (!emitted.insert(o).second) continue;
        auto l = std::dynamic_pointer_cast<LutLinearV2>(m.get_linear(o));
        V2Scales s = v2_scales(*l);
        at::Tensor idx = l->indices.defined() ? l->indices
                                               : lut_nearest_indices(l->w.to(at::kFloat) / v2_full_scales(*l), l->lut);
        at::Tensor lv = l->lut_raw.defined() ? lut16_from_raw(l->lut_raw, l->lut_max_abs) : l->lut;
        int64_t bits = lut_bits_for(lv.numel());
        out.push_back({o + ".indices_packed", indices_pack(idx, bits)});
        out.push_back({o + ".lut", lv.detach().to(at::kHalf)});
        out.push_back({o + ".scale_A", s.A_dir.detach().to(at::kHalf)});
        out.push_back({o + ".scale_B", s.B_dir.detach().to(at::kHalf)});
        out.push_back({o + ".rank_magnitude", s.g.detach().to(at::kHalf)});
        if (l->b.defined()) out.push_back({o + ".bias", l->b.detach().to(at::kHalf)});
        meta[o + ".shape"] = std::to_string(l->out_features()) + "," + std::to_string(l->in_features());
        meta[o + ".bits"] = std::to_string(bits);
    }
    safetensors_save(path, out, meta);
    return (int64_t)fs::file_size(path);
}

// -- configs and checkpoints -----------------------------------------------------------------

std::string quant_config_json(DecoderModel & m) {
    json j = json::parse(decoder_config_dump(m.config()));
    std::shared_ptr<LutLinearV2> mlp, attn;
    for (auto & [n, l] : quant_v2_layers(m)) {
        if (!mlp && quant_is_mlp(n)) mlp = l;
        if (!attn && quant_is_attn(n)) attn = l;
    }
    auto bits = [](const std::shared_ptr<LutLinearV2> & l) { return (int64_t)std::ceil(std::log2((double)l->lut.numel())); };
    j["version"] = "v2";
    auto first = mlp ? mlp : attn;
    if (first) {
        j["lut_bits"] = bits(first);
        j["scale_rank"] = first->rank();
        j["group_size"] = first->cfg.group_size;
        j["force_positive_scales"] = first->cfg.force_positive_scales;
        j["magnitude_activation"] = first->cfg.magnitude_activation;
    }
    j["quantize_attn"] = (bool)attn;
    for (auto & [n, l] : quant_v2_layers(m))   // the seed's recovery config keys, when LoRA is on
        if (l->lora_A.defined()) {
            j["recovery_lora_r"] = l->lora_rank();
            j["recovery_lora_alpha"] = l->lora_alpha;
            break;
        }
    if (attn) {
        j["attn_lut_bits"] = bits(attn);
        j["attn_scale_rank"] = attn->rank();
    }
    if (mlp && attn) {
        for (const char * p : {"q2a4", "q4a4", "q4a4_r32", "q2a2"}) {
            LutPreset ps = lut_preset(p);
            if (ps.mlp_lut == mlp->lut.numel() && ps.mlp_rank == mlp->rank() && ps.attn_lut == attn->lut.numel() &&
                ps.attn_rank == attn->rank())
                j["config_preset"] = p;
        }
    }
    return j.dump(2) + "\n";
}

LutPreset quant_seed_config_parse(const std::string & text, const std::string & src) {
    json j;
    try {
        j = json::parse(text);
    } catch (const json::exception & e) {
        throw std::runtime_error(src + ": not valid JSON: " + e.what());
    }
    auto get = [&](const char * k, int64_t def) -> int64_t {
        if (!j.contains(k) || j[k].is_null()) return def;
        if (!j[k].is_number_integer()) throw std::runtime_error(src + ": " + k + ": expected an integer, found " + j[k].dump());
        return j[k].get<int64_t>();
    };
    if (!j.contains("lut_bits") && !j.contains("scale_rank"))
        throw std::runtime_error(src + ": lut_bits: missing (not a V2 quantization config)");
    int64_t lb = get("lut_bits", 4), r = get("scale_rank", 4);
    int64_t alb = get("attn_lut_bits", lb), ar = get("attn_scale_rank", r);
    return {int64_t(1) << lb, r, int64_t(1) << alb, ar};
}

namespace {
// Two numbers that tell a float weight from another: a = Σw² and b = Σ p·w with p a fixed
// pattern in -3..3 over positions (catches a permutation, or another tensor of the same norm), in
// float64. Rounding the same weight to fp16 or bf16 moves b by a few 1e-3·sqrt(a) at most (the
// rounding errors are independent), another weight moves it by about 2·sqrt(a).
std::pair<double, double> weight_fingerprint(const at::Tensor & w) {
    at::Tensor wd = w.detach().to(at::kCPU, at::kDouble).reshape({w.size(0), -1});
    at::Tensor ri = at::arange(wd.size(0), wd.options()).unsqueeze(1), ci = at::arange(wd.size(1), wd.options()).unsqueeze(0);
    at::Tensor pw = at::remainder(ri * 31 + ci * 17, 7) - 3;   // (out, in)
    return {wd.pow(2).sum().item<double>(), (wd * pw).sum().item<double>()};
}

bool fingerprint_close(std::pair<double, double> saved, std::pair<double, double> now) {
    const double a = std::max(saved.first, 1e-30);
    return std::abs(saved.first - now.first) <= 1e-2 * a && std::abs(saved.second - now.second) <= 0.05 * std::sqrt(a);
}
} // namespace

void quant_save_checkpoint(DecoderModel & m, const std::string & dir, bool float_weights) {
    std::set<std::string> skip;
    std::map<std::string, std::string> meta{{"format", "pt"}};
    if (!float_weights)
        for (auto & [n, l] : quant_v2_layers(m))
            if (l->indices.defined()) {
                skip.insert(n + ".weight");
                auto [a, b] = weight_fingerprint(l->w);
                char buf[80];
                std::snprintf(buf, sizeof buf, "%.17g,%.17g", a, b);
                meta[n + ".weight_fingerprint"] = buf;
            }
    fs::create_directories(dir);
    NamedTensors sd;
    for (auto & [n, t] : m.named_parameters())
        if (!skip.count(n)) sd.push_back({n, t.detach()});
    safetensors_save((fs::path(dir) / "model.safetensors").string(), sd, meta);
    json j = json::parse(quant_config_json(m));
    j["qatlab_float_weights"] = float_weights;
    write_text_atomic((fs::path(dir) / "config.json").string(), j.dump(2) + "\n");
}

namespace {
[[noreturn]] void ck_fail(const std::string & src, const std::string & key, const std::string & what) {
    throw std::runtime_error(src + ": " + key + ": " + what);
}

std::string shape_str(at::IntArrayRef s) {
    std::ostringstream o;
    o << s;
    return o.str();
}

NamedTensors checkpoint_tensors(const std::string & path, std::string & src, std::map<std::string, std::string> & meta) {
    fs::path p(path);
    src = path;
    if (fs::is_directory(p)) {
        for (const char * f : {"model.safetensors", "best_state_dict.pt", "q2_init.pt", "v2_initial.pt"})
            if (fs::exists(p / f)) {
                src = (p / f).string();
                break;
            }
        if (src == path) throw std::runtime_error(path + ": no model.safetensors or seed .pt checkpoint in the directory");
    }
    if (pt_file_is_torch(src)) {
        PtValue v = pt_load(src);
        const PtValue * root = &v;
        for (const char * k : {"model_state_dict", "state_dict"})
            if (const PtValue * inner = v.get(k); inner && inner->is_dict()) {
                root = inner;
                break;
            }
        try {
            return pt_state_dict(*root);
        } catch (const std::runtime_error & e) {
            throw std::runtime_error(src + ": " + e.what());
        }
    }
    SafetensorsFile f = safetensors_load(src);
    meta = f.metadata;
    return f.tensors;
}
} // namespace

std::vector<std::string> quant_load_checkpoint(DecoderModel & m, const std::string & path, const LutConfig & base) {
    at::NoGradGuard ng;
    std::string src;
    std::map<std::string, std::string> meta;
    NamedTensors all = checkpoint_tensors(path, src, meta);
    std::map<std::string, at::Tensor> sd;
    for (auto & [n, t] : all) sd[n] = t;
    std::set<std::string> used;
    std::optional<double> lora_alpha;   // recovery_lora_alpha of a config.json beside the file
    if (fs::path cj = fs::path(src).parent_path() / "config.json"; fs::exists(cj)) {
        std::ifstream f(cj);
        std::stringstream ss;
        ss << f.rdbuf();
        json j = json::parse(ss.str(), nullptr, false);
        if (!j.is_discarded() && j.is_object() && j.contains("recovery_lora_alpha") && j["recovery_lora_alpha"].is_number())
            lora_alpha = j["recovery_lora_alpha"].get<double>();
    }
    auto take = [&](const std::string & k) -> at::Tensor {
        auto it = sd.find(k);
        if (it == sd.end()) return {};
        used.insert(k);
        return it->second;
    };
    for (auto & name : m.linear_names()) {
        if (!sd.count(name + ".scale_A")) continue;
        auto old = m.get_linear(name);
        const int64_t out = old->out_features(), in = old->in_features();
        auto need = [&](const char * k) {
            at::Tensor t = take(name + "." + k);
            if (!t.defined()) ck_fail(src, name + "." + k, "missing (a V2 layer needs scale_A, scale_B, rank_magnitude, lut)");
            return t;
        };
        at::Tensor A = need("scale_A"), B = need("scale_B"), g = need("rank_magnitude"), lut = need("lut");
        at::Tensor W = take(name + ".weight"), bias = take(name + ".bias"), idx = take(name + "._indices"),
                   Q = take(name + "._Q"), flag = take(name + "._scales_baked_flag"),
                   raw = take(name + "._lut_raw_deltas"), lA = take(name + ".lora_A"), lB = take(name + ".lora_B");
        take(name + "._cached_weight_q");
        const int64_t r = A.dim() == 2 ? A.size(1) : -1;
        auto expect = [&](const char * k, const at::Tensor & t, std::vector<int64_t> shape) {
            if (t.defined() && t.sizes() != at::IntArrayRef(shape))
                ck_fail(src, name + "." + k, "expected shape " + shape_str(shape) + ", found " + shape_str(t.sizes()));
        };
        if (A.dim() != 2 || A.size(0) != out) ck_fail(src, name + ".scale_A", "expected shape [" + std::to_string(out) + ", r], found " + shape_str(A.sizes()));
        expect("scale_B", B, {r, in});
        expect("rank_magnitude", g, {r});
        expect("weight", W, {out, in});
        expect("_indices", idx, {out, in});
        expect("_Q", Q, {out, in});
        if (lut.dim() != 1 || lut.numel() < 2 || lut.numel() > 256) ck_fail(src, name + ".lut", "expected a 1-D LUT of 2..256 entries, found " + shape_str(lut.sizes()));
        auto prev = std::dynamic_pointer_cast<LutLinearV2>(old);
        LutConfig c = prev ? prev->cfg : base;
        c.lut_size = lut.numel();
        c.scale_rank = r;
        at::Tensor oldW = old->weight().detach();
        at::Tensor baseW = prev ? prev->w.detach() : oldW;   // the model's float weight (a V2 layer's W_eff is not)
        if (!W.defined()) {
            auto fp = meta.find(name + ".weight_fingerprint");
            if (fp != meta.end()) {
                double a = 0, b = 0;
                if (std::sscanf(fp->second.c_str(), "%lf,%lf", &a, &b) != 2)
                    ck_fail(src, name + ".weight_fingerprint", "expected two numbers, found '" + fp->second + "'");
                if (!fingerprint_close({a, b}, weight_fingerprint(baseW)))
                    ck_fail(src, name + ".weight",
                            "saved without the float weight, and the model's float weight is not the one it was "
                            "saved from: load it into the same float model (or save with float_weights = true)");
            } else if (!idx.defined() && !Q.defined()) {
                ck_fail(src, name + ".weight", "missing (a V2 layer needs its weight, or _indices / _Q)");
            }
        }
        auto l = std::make_shared<LutLinearV2>(out, in, c, oldW.options(), bias.defined());
        if (prev) l->form = prev->form;
        auto so = l->scale_A.options();
        l->w = W.defined() ? W.to(oldW.options()) : baseW.to(oldW.options());   // only used by freeze_Q / snap / tighten_q
        if (bias.defined()) l->b = bias.to(oldW.options());
        l->scale_A = A.to(so).contiguous();
        l->scale_B = B.to(so).contiguous();
        l->rank_magnitude = g.to(so).contiguous();
        l->lut = lut.to(so).contiguous();   // the checkpoint's LUT always wins
        if (flag.defined()) l->set_baked(flag.numel() == 1 && flag.to(at::kCPU).to(at::kLong).item<int64_t>() != 0);
        if (idx.defined()) {
            at::Tensor il = idx.to(at::kLong);
            if (il.numel() && (il.min().item<int64_t>() < 0 || il.max().item<int64_t>() >= lut.numel()))
                ck_fail(src, name + "._indices", "index out of range for a LUT of " + std::to_string(lut.numel()) + " entries");
            l->indices = idx.to(oldW.device(), at::kByte);
        } else if (Q.defined()) {
            at::Tensor qi = lut_nearest_indices(Q.to(at::kFloat), lut.to(at::kFloat));
            double err = (lut_gather(lut.to(at::kFloat), qi) - Q.to(at::kFloat)).abs().max().item<double>();
            if (err > 1e-2) ck_fail(src, name + "._Q", "values are not LUT entries (max error " + std::to_string(err) + ")");
            l->indices = qi.to(oldW.device());
        } else {
            v2_freeze_q(*l);
        }
        if (raw.defined()) {   // a trained LUT16 that was saved without baking (docs/formulas.md §2.8)
            if (raw.numel() != 8 || lut.numel() != 16)
                ck_fail(src, name + "._lut_raw_deltas", "expected 8 deltas for a 16-entry LUT, found " + shape_str(raw.sizes()));
            l->lut_raw = raw.to(so).reshape({8}).contiguous();
        }
        if (lA.defined() || lB.defined()) {   // recovery LoRA (docs/formulas.md §2.7): both or neither
            if (!lA.defined() || !lB.defined())
                ck_fail(src, name + (lA.defined() ? ".lora_B" : ".lora_A"), "missing (recovery LoRA needs lora_A and lora_B)");
            const int64_t rl = lA.dim() == 2 ? lA.size(0) : -1;
            if (rl < 1) ck_fail(src, name + ".lora_A", "expected shape [r, " + std::to_string(in) + "], found " + shape_str(lA.sizes()));
            expect("lora_A", lA, {rl, in});
            expect("lora_B", lB, {out, rl});
            // alpha: the previous layer's, else the file's config.json (recovery_lora_alpha), else r_l
            std::optional<double> alpha;
            if (prev && prev->lora_A.defined() && prev->lora_rank() == rl) alpha = prev->lora_alpha;
            else if (lora_alpha) alpha = *lora_alpha;
            v2_enable_lora(*l, rl, alpha, prev ? prev->lora_dropout : 0.0);
            l->lora_A = lA.to(l->lora_A.options()).contiguous().requires_grad_(true);
            l->lora_B = lB.to(l->lora_B.options()).contiguous().requires_grad_(true);
            l->train(m.is_training());
        }
        l->scale_A.requires_grad_(true);
        l->scale_B.requires_grad_(true);
        l->rank_magnitude.requires_grad_(true);
        m.set_linear(name, l);
    }
    // Everything else by name (embeddings, norms, dense layers, lm_head).
    std::set<std::string> known;
    for (auto & [n, t] : m.named_parameters()) known.insert(n);
    NamedTensors rest;
    std::vector<std::string> unused;
    for (auto & [n, t] : all) {
        if (used.count(n)) continue;
        if (known.count(n)) {
            used.insert(n);
            rest.push_back({n, t});
        } else {
            unused.push_back(n);
        }
    }
    m.load_state_dict(rest, false, src);
    return unused;
}

} // namespace qatlab
