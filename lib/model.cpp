// model: config parsing, the decoder forward (SDPA attention, RoPE, RMSNorm, SwiGLU/ReLU²),
// parameters by HF name, activation checkpointing, and Hugging Face directory load/save.
#include "lib/model.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <regex>
#include <set>
#include <sstream>
#include <stdexcept>
#include <unistd.h>

namespace qatlab {

using json = nlohmann::json;
namespace fs = std::filesystem;

// -- configuration ---------------------------------------------------------------------------

namespace {

[[noreturn]] void config_fail(const std::string & src, const std::string & key, const std::string & what) {
    throw std::runtime_error(src + ": " + key + ": " + what);
}

std::string json_type(const json & v) { return v.type_name(); }

// Keys decoder_config_parse reads. Real configs carry many more (bos_token_id, ...), which are
// accepted; a key one edit away from one of these is a typo that would silently be ignored.
const char * const config_keys[] = {
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "initializer_range",
    "rope_scaling", "rope_parameters", "rope_theta", "tie_word_embeddings", "attention_bias", "mlp_bias",
    "use_sliding_window", "qk_norm", "norm_weight", "embed_norm", "logit_softcap", "mlp_act", "hidden_act",
    "torch_dtype", "dtype",
};

bool one_edit_apart(const std::string & a, const std::string & b) {
    if (a == b) return false;
    size_t n = a.size(), m = b.size();
    if (n > m + 1 || m > n + 1) return false;
    size_t i = 0;
    while (i < n && i < m && a[i] == b[i]) i++;
    if (n == m) {   // one substitution, or one swap of neighbours
        if (a.compare(i + 1, std::string::npos, b, i + 1, std::string::npos) == 0) return true;
        return i + 1 < n && a[i] == b[i + 1] && a[i + 1] == b[i] && a.compare(i + 2, std::string::npos, b, i + 2, std::string::npos) == 0;
    }
    return n > m ? a.compare(i + 1, std::string::npos, b, i, std::string::npos) == 0
                 : b.compare(i + 1, std::string::npos, a, i, std::string::npos) == 0;
}

void config_check_typos(const json & j, const std::string & src) {
    for (auto it = j.begin(); it != j.end(); ++it) {
        bool known = false;
        for (const char * k : config_keys) known = known || it.key() == k;
        if (known) continue;
        for (const char * k : config_keys)
            if (one_edit_apart(it.key(), k))
                config_fail(src, it.key(), std::string("unknown key, one edit away from '") + k + "' (a typo? it would be ignored)");
    }
}

int64_t cfg_int(const json & j, const char * key, const std::string & src, std::optional<int64_t> def = {}) {
    auto it = j.find(key);
    if (it == j.end() || it->is_null()) {
        if (def) return *def;
        config_fail(src, key, "missing (expected an integer)");
    }
    if (!it->is_number_integer() && !(it->is_number_float() && std::floor(it->get<double>()) == it->get<double>()))
        config_fail(src, key, "expected an integer, found " + json_type(*it) + " " + it->dump());
    // A whole float or an unsigned beyond int64 (3.2e63 as found by tools/fuzz): casting it is undefined.
    if ((it->is_number_float() && !(std::fabs(it->get<double>()) < 9223372036854775808.0)) ||
        (it->is_number_unsigned() && it->get<uint64_t>() > uint64_t(INT64_MAX)))
        config_fail(src, key, "expected an integer below 2^63, found " + it->dump());
    int64_t v = it->is_number_integer() ? it->get<int64_t>() : (int64_t)it->get<double>();
    if (v < 0) config_fail(src, key, "expected a non-negative integer, found " + std::to_string(v));
    return v;
}

double cfg_num(const json & j, const char * key, const std::string & src, double def) {
    auto it = j.find(key);
    if (it == j.end() || it->is_null()) return def;
    if (!it->is_number()) config_fail(src, key, "expected a number, found " + json_type(*it) + " " + it->dump());
    return it->get<double>();
}

bool cfg_bool(const json & j, const char * key, const std::string & src, bool def) {
    auto it = j.find(key);
    if (it == j.end() || it->is_null()) return def;
    if (!it->is_boolean()) config_fail(src, key, "expected true or false, found " + it->dump());
    return it->get<bool>();
}

std::string cfg_str(const json & j, const char * key, const std::string & src, const std::string & def) {
    auto it = j.find(key);
    if (it == j.end() || it->is_null()) return def;
    if (!it->is_string()) config_fail(src, key, "expected a string, found " + it->dump());
    return it->get<std::string>();
}

std::string dtype_json_name(at::ScalarType t) {
    switch (t) {
    case at::kFloat: return "float32";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kDouble: return "float64";
    default: throw std::runtime_error(std::string("model dtype must be floating, got ") + c10::toString(t));
    }
}

std::string read_file_text(const std::string & path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) throw std::runtime_error(path + ": cannot open (" + std::strerror(errno) + ")");
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
}

// Atomic text write: <path>.tmp.<pid>, then rename.
void write_file_atomic(const std::string & path, const std::string & text) {
    std::string tmp = path + ".tmp." + std::to_string(getpid());
    {
        std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
        if (!f) throw std::runtime_error(tmp + ": cannot create (" + std::strerror(errno) + ")");
        f << text;
        f.flush();
        if (!f) {
            std::string why = std::strerror(errno);
            f.close();
            std::error_code ec;
            fs::remove(tmp, ec);   // nothing half-written is left behind
            throw std::runtime_error(tmp + ": write failed (" + why + ")");
        }
    }
    std::error_code ec;
    fs::rename(tmp, path, ec);
    if (ec) {
        fs::remove(tmp);
        throw std::runtime_error(path + ": rename failed: " + ec.message());
    }
}

} // namespace

DecoderConfig decoder_config_parse(const std::string & text, const std::string & src) {
    json j;
    try {
        j = json::parse(text);
    } catch (const json::exception & e) {
        throw std::runtime_error(src + ": not valid JSON: " + e.what());
    }
    if (!j.is_object()) throw std::runtime_error(src + ": expected a JSON object at the top level");
    config_check_typos(j, src);
    DecoderConfig c;
    c.json = text;
    c.model_type = cfg_str(j, "model_type", src, "");
    if (c.model_type.empty()) config_fail(src, "model_type", "missing (expected \"qwen3\", \"llama\" or \"qatlab_gpt\")");
    const bool qwen3 = c.model_type == "qwen3", llama = c.model_type == "llama", gpt = c.model_type == "qatlab_gpt";
    if (!qwen3 && !llama && !gpt)
        config_fail(src, "model_type", "unsupported \"" + c.model_type + "\" (expected \"qwen3\", \"llama\" or \"qatlab_gpt\")");
    c.vocab_size = cfg_int(j, "vocab_size", src);
    c.hidden_size = cfg_int(j, "hidden_size", src);
    c.intermediate_size = cfg_int(j, "intermediate_size", src);
    c.num_hidden_layers = cfg_int(j, "num_hidden_layers", src);
    c.num_attention_heads = cfg_int(j, "num_attention_heads", src);
    c.num_key_value_heads = cfg_int(j, "num_key_value_heads", src, c.num_attention_heads);
    for (auto [k, v] : {std::pair<const char *, int64_t>{"vocab_size", c.vocab_size}, {"hidden_size", c.hidden_size},
                        {"intermediate_size", c.intermediate_size}, {"num_attention_heads", c.num_attention_heads},
                        {"num_key_value_heads", c.num_key_value_heads}})
        if (v == 0) config_fail(src, k, "must be positive");
    if (c.num_attention_heads % c.num_key_value_heads != 0)
        config_fail(src, "num_key_value_heads", std::to_string(c.num_key_value_heads) + " does not divide num_attention_heads " +
                                                    std::to_string(c.num_attention_heads));
    int64_t def_hd = c.hidden_size / c.num_attention_heads;
    c.head_dim = cfg_int(j, "head_dim", src, def_hd);
    if (c.head_dim == 0 || c.head_dim % 2) config_fail(src, "head_dim", "must be positive and even, found " + std::to_string(c.head_dim));
    if (!j.contains("head_dim") && c.hidden_size % c.num_attention_heads)
        config_fail(src, "hidden_size", "not divisible by num_attention_heads and no head_dim given");
    c.max_position_embeddings = cfg_int(j, "max_position_embeddings", src, 2048);
    c.rms_norm_eps = cfg_num(j, "rms_norm_eps", src, 1e-6);
    c.initializer_range = cfg_num(j, "initializer_range", src, 0.02);
    // rope_theta: top level (transformers 4) or inside rope_parameters (transformers 5).
    c.rope_theta = gpt ? 10000.0 : (qwen3 ? 1000000.0 : 10000.0);
    for (const char * rk : {"rope_scaling", "rope_parameters"}) {
        auto it = j.find(rk);
        if (it == j.end() || it->is_null()) continue;
        if (!it->is_object()) config_fail(src, rk, "expected an object or null");
        std::string type = cfg_str(*it, "rope_type", src + ": " + rk, cfg_str(*it, "type", src + ": " + rk, "default"));
        if (type != "default")
            config_fail(src, rk, "rope_type \"" + type + "\" is not supported (only plain RoPE)");
        c.rope_theta = cfg_num(*it, "rope_theta", src + ": " + rk, c.rope_theta);
    }
    c.rope_theta = cfg_num(j, "rope_theta", src, c.rope_theta);
    c.tie_word_embeddings = cfg_bool(j, "tie_word_embeddings", src, gpt);
    c.attention_bias = cfg_bool(j, "attention_bias", src, false);
    c.mlp_bias = cfg_bool(j, "mlp_bias", src, false);
    if (cfg_bool(j, "use_sliding_window", src, false))
        config_fail(src, "use_sliding_window", "sliding-window attention is not supported");
    // Switches: defaults per model type, explicit keys win.
    c.qk_norm = cfg_bool(j, "qk_norm", src, qwen3 || gpt);
    c.norm_weight = cfg_bool(j, "norm_weight", src, !gpt);
    c.embed_norm = cfg_bool(j, "embed_norm", src, gpt);
    c.logit_softcap = cfg_num(j, "logit_softcap", src, gpt ? 30.0 : 0.0);
    c.mlp_act = cfg_str(j, "mlp_act", src, gpt ? "relu2" : "swiglu");
    if (c.mlp_act != "swiglu" && c.mlp_act != "relu2")
        config_fail(src, "mlp_act", "expected \"swiglu\" or \"relu2\", found \"" + c.mlp_act + "\"");
    std::string act = cfg_str(j, "hidden_act", src, c.mlp_act == "swiglu" ? "silu" : "relu2");
    if (c.mlp_act == "swiglu" && act != "silu")
        config_fail(src, "hidden_act", "expected \"silu\" (SwiGLU), found \"" + act + "\"");
    c.torch_dtype = cfg_str(j, "torch_dtype", src, cfg_str(j, "dtype", src, "float32"));
    return c;
}

DecoderConfig decoder_config_load(const std::string & path) {
    return decoder_config_parse(read_file_text(path), path);
}

std::string decoder_config_dump(const DecoderConfig & c) {
    json j = c.json.empty() ? json::object() : json::parse(c.json);
    j["model_type"] = c.model_type;
    j["architectures"] = json::array({c.model_type == "qwen3"   ? "Qwen3ForCausalLM"
                                      : c.model_type == "llama" ? "LlamaForCausalLM"
                                                                : "QatlabGPTForCausalLM"});
    j["vocab_size"] = c.vocab_size;
    j["hidden_size"] = c.hidden_size;
    j["intermediate_size"] = c.intermediate_size;
    j["num_hidden_layers"] = c.num_hidden_layers;
    j["num_attention_heads"] = c.num_attention_heads;
    j["num_key_value_heads"] = c.num_key_value_heads;
    j["head_dim"] = c.head_dim;
    j["max_position_embeddings"] = c.max_position_embeddings;
    j["rms_norm_eps"] = c.rms_norm_eps;
    j["rope_theta"] = c.rope_theta;
    if (j.contains("rope_parameters") && j["rope_parameters"].is_object()) j["rope_parameters"]["rope_theta"] = c.rope_theta;
    j["initializer_range"] = c.initializer_range;
    j["tie_word_embeddings"] = c.tie_word_embeddings;
    j["attention_bias"] = c.attention_bias;
    if (c.model_type != "qwen3") j["mlp_bias"] = c.mlp_bias;
    j["hidden_act"] = c.mlp_act == "swiglu" ? "silu" : "relu2";
    j["torch_dtype"] = c.torch_dtype;
    if (j.contains("dtype")) j["dtype"] = c.torch_dtype;
    if (c.model_type == "qatlab_gpt") {
        j["qk_norm"] = c.qk_norm;
        j["norm_weight"] = c.norm_weight;
        j["embed_norm"] = c.embed_norm;
        j["logit_softcap"] = c.logit_softcap;
        j["mlp_act"] = c.mlp_act;
    }
    return j.dump(2) + "\n";
}

// -- linear ----------------------------------------------------------------------------------

at::Tensor DenseLinear::forward(const at::Tensor & x) {
    return at::linear(x, w, b.defined() ? std::optional<at::Tensor>(b) : std::nullopt);
}

std::vector<std::pair<std::string, at::Tensor *>> DenseLinear::parameter_slots() {
    std::vector<std::pair<std::string, at::Tensor *>> s{{"weight", &w}};
    if (b.defined()) s.push_back({"bias", &b});
    return s;
}

// -- construction ----------------------------------------------------------------------------

DecoderModel::DecoderModel(DecoderConfig config, c10::Device device, at::ScalarType dtype, bool init)
    : cfg_(std::move(config)) {
    const auto & c = cfg_;
    auto opts = at::TensorOptions().device(device).dtype(dtype);
    const double std_ = c.initializer_range;
    auto matrix = [&](int64_t out, int64_t in) {
        at::Tensor w = at::empty({out, in}, opts);
        if (init) w.normal_(0.0, std_);
        return w;
    };
    auto ones = [&](int64_t n) { return at::ones({n}, opts); };
    auto linear = [&](int64_t in, int64_t out, bool bias) {
        at::Tensor b = bias ? at::zeros({out}, opts) : at::Tensor();
        return std::make_shared<DenseLinear>(matrix(out, in), b);
    };
    const int64_t H = c.hidden_size, hd = c.head_dim;
    embed_ = matrix(c.vocab_size, H);
    layers_.resize(c.num_hidden_layers);
    for (auto & L : layers_) {
        L.q_proj = linear(H, c.num_attention_heads * hd, c.attention_bias);
        L.k_proj = linear(H, c.num_key_value_heads * hd, c.attention_bias);
        L.v_proj = linear(H, c.num_key_value_heads * hd, c.attention_bias);
        L.o_proj = linear(c.num_attention_heads * hd, H, c.attention_bias);
        if (c.qk_norm && c.norm_weight) {
            L.q_norm = ones(hd);
            L.k_norm = ones(hd);
        }
        if (c.mlp_act == "swiglu") L.gate_proj = linear(H, c.intermediate_size, c.mlp_bias);
        L.up_proj = linear(H, c.intermediate_size, c.mlp_bias);
        L.down_proj = linear(c.intermediate_size, H, c.mlp_bias);
        if (c.norm_weight) {
            L.input_norm = ones(H);
            L.post_norm = ones(H);
        }
    }
    if (c.norm_weight) final_norm_ = ones(H);
    if (!c.tie_word_embeddings) lm_head_ = linear(H, c.vocab_size, false);
    requires_grad(true);
}

// -- parameters ------------------------------------------------------------------------------

std::vector<std::pair<std::string, at::Tensor *>> DecoderModel::slots() {
    std::vector<std::pair<std::string, at::Tensor *>> s;
    s.push_back({"model.embed_tokens.weight", &embed_});
    auto add_linear = [&](const std::string & name, const std::shared_ptr<Linear> & l) {
        if (!l) return;
        for (auto & [n, p] : l->parameter_slots()) s.push_back({name + "." + n, p});
    };
    for (size_t i = 0; i < layers_.size(); i++) {
        auto & L = layers_[i];
        std::string p = "model.layers." + std::to_string(i) + ".";
        add_linear(p + "self_attn.q_proj", L.q_proj);
        add_linear(p + "self_attn.k_proj", L.k_proj);
        add_linear(p + "self_attn.v_proj", L.v_proj);
        add_linear(p + "self_attn.o_proj", L.o_proj);
        if (L.q_norm.defined()) s.push_back({p + "self_attn.q_norm.weight", &L.q_norm});
        if (L.k_norm.defined()) s.push_back({p + "self_attn.k_norm.weight", &L.k_norm});
        add_linear(p + "mlp.gate_proj", L.gate_proj);
        add_linear(p + "mlp.up_proj", L.up_proj);
        add_linear(p + "mlp.down_proj", L.down_proj);
        if (L.input_norm.defined()) s.push_back({p + "input_layernorm.weight", &L.input_norm});
        if (L.post_norm.defined()) s.push_back({p + "post_attention_layernorm.weight", &L.post_norm});
    }
    if (final_norm_.defined()) s.push_back({"model.norm.weight", &final_norm_});
    add_linear("lm_head", lm_head_);
    return s;
}

NamedTensors DecoderModel::named_parameters() {
    NamedTensors out;
    for (auto & [n, p] : slots()) out.push_back({n, *p});
    return out;
}

std::pair<std::vector<std::string>, std::vector<std::string>>
DecoderModel::load_state_dict(const NamedTensors & sd, bool strict, const std::string & source) {
    std::map<std::string, const at::Tensor *> given;
    for (auto & [n, t] : sd) given[n] = &t;
    std::vector<std::string> missing, unexpected, bad_shape;
    auto sl = slots();
    std::set<std::string> known;
    for (auto & [n, p] : sl) {
        known.insert(n);
        auto it = given.find(n);
        if (it == given.end()) {
            missing.push_back(n);
            continue;
        }
        if (it->second->sizes() != p->sizes()) {
            std::ostringstream m;
            m << n << " (expected " << p->sizes() << ", found " << it->second->sizes() << ")";
            bad_shape.push_back(m.str());
        }
    }
    for (auto & [n, t] : given)
        if (!known.count(n)) unexpected.push_back(n);
    auto join = [](const std::vector<std::string> & v) {
        std::string s;
        for (size_t i = 0; i < v.size(); i++) s += (i ? ", " : "") + v[i];
        return s;
    };
    std::string err;
    if (!bad_shape.empty()) err += "shape mismatch: " + join(bad_shape);
    if (strict && !missing.empty()) err += std::string(err.empty() ? "" : "; ") + "missing keys: " + join(missing);
    if (strict && !unexpected.empty()) err += std::string(err.empty() ? "" : "; ") + "unexpected keys: " + join(unexpected);
    if (!err.empty()) throw std::runtime_error(source + ": " + err);
    at::NoGradGuard ng;
    for (auto & [n, p] : sl) {
        auto it = given.find(n);
        if (it != given.end()) p->copy_(*it->second);
    }
    return {missing, unexpected};
}

void DecoderModel::to(std::optional<c10::Device> device, std::optional<at::ScalarType> dtype) {
    // A linear layer's slots are replaced through the layer (Lua layers keep their own books).
    std::map<at::Tensor *, Linear *> owner;
    for (auto & n : linear_names()) {
        auto l = get_linear(n);
        for (auto & [ln, p] : l->parameter_slots()) owner[p] = l.get();
    }
    for (auto & [n, p] : slots()) {
        bool rg = p->requires_grad();
        auto opts = p->options();
        if (device) opts = opts.device(*device);
        if (dtype && p->is_floating_point()) opts = opts.dtype(*dtype);
        at::Tensor t = p->detach().to(opts);
        if (rg) t.requires_grad_(true);
        auto it = owner.find(p);
        if (it != owner.end()) it->second->slot_assign(p, std::move(t));
        else *p = std::move(t);
    }
    if (dtype) cfg_.torch_dtype = dtype_json_name(*dtype);
}

void DecoderModel::train(bool on) {
    training_ = on;
    for (auto & n : linear_names()) get_linear(n)->train(on);
}

int64_t DecoderModel::requires_grad(bool on, const std::string & pattern) {
    std::regex re(pattern.empty() ? std::string(".*") : pattern);
    int64_t n = 0;
    for (auto & [name, p] : slots())
        if (std::regex_search(name, re)) {
            if (on && !p->is_floating_point()) continue;   // integer buffers (LUT indices, flags) never train
            p->requires_grad_(on);
            n++;
        }
    return n;
}

std::vector<std::string> DecoderModel::linear_names() const {
    std::vector<std::string> out;
    for (size_t i = 0; i < layers_.size(); i++) {
        std::string p = "model.layers." + std::to_string(i) + ".";
        for (const char * n : {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"})
            out.push_back(p + n);
        if (layers_[i].gate_proj) out.push_back(p + "mlp.gate_proj");
        out.push_back(p + "mlp.up_proj");
        out.push_back(p + "mlp.down_proj");
    }
    if (lm_head_) out.push_back("lm_head");
    return out;
}

namespace {
// "model.layers.3.mlp.gate_proj" -> (3, "mlp.gate_proj"); layer -1 for lm_head.
std::pair<int64_t, std::string> linear_split(const std::string & name) {
    static const std::regex re(R"(^model\.layers\.(\d+)\.(.+)$)");
    std::smatch m;
    if (std::regex_match(name, m, re)) return {std::stoll(m[1].str()), m[2].str()};
    return {-1, name};
}
} // namespace

std::shared_ptr<Linear> DecoderModel::get_linear(const std::string & name) const {
    auto [i, rest] = linear_split(name);
    std::shared_ptr<Linear> l;
    if (i < 0 && rest == "lm_head") l = lm_head_;
    if (i >= 0 && i < (int64_t)layers_.size()) {
        auto & L = layers_[i];
        if (rest == "self_attn.q_proj") l = L.q_proj;
        else if (rest == "self_attn.k_proj") l = L.k_proj;
        else if (rest == "self_attn.v_proj") l = L.v_proj;
        else if (rest == "self_attn.o_proj") l = L.o_proj;
        else if (rest == "mlp.gate_proj") l = L.gate_proj;
        else if (rest == "mlp.up_proj") l = L.up_proj;
        else if (rest == "mlp.down_proj") l = L.down_proj;
    }
    if (!l) throw std::runtime_error("no linear layer named '" + name + "' (see linear_names())");
    return l;
}

void DecoderModel::set_linear(const std::string & name, std::shared_ptr<Linear> layer) {
    if (!layer) throw std::runtime_error(name + ": null layer");
    auto old = get_linear(name);
    if (old->in_features() != layer->in_features() || old->out_features() != layer->out_features())
        throw std::runtime_error(name + ": expected " + std::to_string(old->out_features()) + "x" +
                                 std::to_string(old->in_features()) + ", found " + std::to_string(layer->out_features()) +
                                 "x" + std::to_string(layer->in_features()));
    auto [i, rest] = linear_split(name);
    if (i < 0) {
        lm_head_ = layer;
        return;
    }
    auto & L = layers_[i];
    std::shared_ptr<Linear> * slot = rest == "self_attn.q_proj"   ? &L.q_proj
                                     : rest == "self_attn.k_proj" ? &L.k_proj
                                     : rest == "self_attn.v_proj" ? &L.v_proj
                                     : rest == "self_attn.o_proj" ? &L.o_proj
                                     : rest == "mlp.gate_proj"    ? &L.gate_proj
                                     : rest == "mlp.up_proj"      ? &L.up_proj
                                                                  : &L.down_proj;
    layer->module_name = name;
    *slot = std::move(layer);
}

// -- module hooks ----------------------------------------------------------------------------

std::string DecoderModel::module_name_of(int64_t id) const {
    if (id == 0) return "model.embed_tokens";
    if (id == norm_id()) return "model.norm";
    if (id == head_id()) return "lm_head";
    static const char * subs[kSub] = {"", ".input_layernorm", ".self_attn", ".self_attn.q_proj", ".self_attn.k_proj",
                                      ".self_attn.v_proj", ".self_attn.q_norm", ".self_attn.k_norm", ".self_attn.o_proj",
                                      ".post_attention_layernorm", ".mlp", ".mlp.gate_proj", ".mlp.up_proj",
                                      ".mlp.down_proj"};
    int64_t i = (id - 1) / kSub, sub = (id - 1) % kSub;
    return "model.layers." + std::to_string(i) + subs[sub];
}

std::vector<std::string> DecoderModel::module_names() const {
    std::vector<std::string> out;
    for (int64_t id = 0; id <= head_id(); id++)
        if (id == 0 || id >= norm_id()) {
            out.push_back(module_name_of(id));
        } else {
            int64_t sub = (id - 1) % kSub;
            if ((sub == kQNorm || sub == kKNorm) && !cfg_.qk_norm) continue;
            if (sub == kGate && cfg_.mlp_act != "swiglu") continue;
            out.push_back(module_name_of(id));
        }
    return out;
}

int64_t DecoderModel::module_find(const std::string & name) const {
    for (int64_t id = 0; id <= head_id(); id++)
        if (module_name_of(id) == name) {
            auto names = module_names();
            return std::find(names.begin(), names.end(), name) == names.end() ? -1 : id;
        }
    return -1;
}

namespace {
std::vector<int64_t> module_ids(const DecoderModel & m, const std::vector<std::string> & modules,
                                const std::function<int64_t(const std::string &)> & find) {
    if (modules.empty()) throw std::runtime_error("register hook: no module named");
    std::vector<int64_t> ids;
    for (auto & n : modules) {
        int64_t id = find(n);
        if (id < 0) throw std::runtime_error("register hook: no module named '" + n + "' (see named_modules())");
        ids.push_back(id);
    }
    return ids;
}
} // namespace

int64_t DecoderModel::register_forward_pre_hook(const std::vector<std::string> & modules, ModulePreHook fn) {
    auto ids = module_ids(*this, modules, [this](const std::string & n) { return module_find(n); });
    auto f = std::make_shared<ModulePreHook>(std::move(fn));
    int64_t h = next_hook_++;
    for (int64_t id : ids) {
        hooks_[id].push_back({h, f, nullptr});
        hook_count_++;
    }
    return h;
}

int64_t DecoderModel::register_forward_hook(const std::vector<std::string> & modules, ModuleHook fn) {
    auto ids = module_ids(*this, modules, [this](const std::string & n) { return module_find(n); });
    auto f = std::make_shared<ModuleHook>(std::move(fn));
    int64_t h = next_hook_++;
    for (int64_t id : ids) {
        hooks_[id].push_back({h, nullptr, f});
        hook_count_++;
    }
    return h;
}

bool DecoderModel::remove_hook(int64_t handle) {
    bool found = false;
    for (auto it = hooks_.begin(); it != hooks_.end();) {
        auto & v = it->second;
        for (size_t k = 0; k < v.size();)
            if (v[k].handle == handle) {
                v.erase(v.begin() + (long)k);
                hook_count_--;
                found = true;
            } else {
                k++;
            }
        it = v.empty() ? hooks_.erase(it) : std::next(it);
    }
    return found;
}

at::Tensor DecoderModel::call_hooked(int64_t id, const at::Tensor & x, const std::function<at::Tensor(const at::Tensor &)> & f) {
    auto it = hooks_.find(id);
    if (it == hooks_.end()) return f(x);
    std::vector<HookEntry> hs = it->second;   // a hook may add or remove hooks
    const std::string name = module_name_of(id);
    at::Tensor in = x;
    for (auto & h : hs)
        if (h.pre) {
            at::Tensor r = (*h.pre)(name, in);
            if (r.defined()) in = r;
        }
    at::Tensor out = f(in);
    for (auto & h : hs)
        if (h.post) {
            at::Tensor r = (*h.post)(name, in, out);
            if (r.defined()) out = r;
        }
    return out;
}

at::Tensor DecoderModel::proj(int64_t layer, Sub s, Linear & l, const at::Tensor & x) {
    return call(module_id(layer, s), x, [&l](const at::Tensor & v) { return l.forward(v); });
}

std::vector<at::Tensor> DecoderModel::layer_parameters(int64_t i) {
    std::string p = "model.layers." + std::to_string(i) + ".";
    std::vector<at::Tensor> out;
    for (auto & [n, t] : slots())
        if (n.compare(0, p.size(), p) == 0) out.push_back(*t);
    return out;
}

// -- forward ---------------------------------------------------------------------------------

// HF RMSNorm: normalize in float32, cast back, then scale (w undefined = parameter-free).
at::Tensor DecoderModel::rms_norm(const at::Tensor & x, const at::Tensor & w) {
    at::Tensor xf = x.to(at::kFloat);
    at::Tensor y = (xf * at::rsqrt(xf.pow(2).mean(-1, true) + cfg_.rms_norm_eps)).to(x.scalar_type());
    return w.defined() ? w * y : y;
}

// cos/sin (B, T, head_dim) for positions (B, T): a float32 table per device, cast to dtype.
std::pair<at::Tensor, at::Tensor> DecoderModel::rope(const at::Tensor & pos, at::ScalarType dtype) {
    const int64_t hd = cfg_.head_dim;
    // Sized by the positions in use (grown by doubling), not by max_position_embeddings alone: a
    // config may declare 2^40 positions. The values per position do not depend on the length.
    int64_t need = pos.numel() ? pos.max().item<int64_t>() + 1 : 1;
    if (need > (int64_t(1) << 32))
        throw std::runtime_error("position " + std::to_string(need - 1) + " is beyond the 2^32 positions RoPE tables support");
    need = std::max<int64_t>(need, std::min<int64_t>(cfg_.max_position_embeddings, 8192));
    if (rope_cache_.count(pos.device().str()) && rope_cache_[pos.device().str()].defined()) {
        int64_t have = rope_cache_[pos.device().str()].size(1);
        if (have < need) need = std::max(need, std::min<int64_t>(2 * have, int64_t(1) << 32));
    }
    std::string key = pos.device().str();
    at::Tensor & tab = rope_cache_[key];
    if (!tab.defined() || tab.size(1) < need) {
        auto f32 = at::TensorOptions().dtype(at::kFloat).device(pos.device());
        // inv_freq = 1 / theta^(2i/d), as HF (int64 arange cast to float, float32 pow).
        at::Tensor inv = 1.0 / at::pow(at::scalar_tensor(cfg_.rope_theta, f32),
                                       at::arange(0, hd, 2, f32.dtype(at::kLong)).to(at::kFloat) / (double)hd);
        at::Tensor t = at::arange(need, f32.dtype(at::kLong)).to(at::kFloat);
        at::Tensor freqs = at::outer(t, inv);                  // (L, hd/2)
        at::Tensor emb = at::cat({freqs, freqs}, -1);           // (L, hd)
        tab = at::stack({emb.cos(), emb.sin()});               // (2, L, hd)
    }
    at::Tensor c = tab[0].index_select(0, pos.reshape(-1)).view({pos.size(0), pos.size(1), hd});
    at::Tensor s = tab[1].index_select(0, pos.reshape(-1)).view({pos.size(0), pos.size(1), hd});
    return {c.to(dtype), s.to(dtype)};
}

namespace {
at::Tensor rotate_half(const at::Tensor & x) {
    int64_t h = x.size(-1) / 2;
    return at::cat({-x.narrow(-1, h, h), x.narrow(-1, 0, h)}, -1);
}
} // namespace

at::Tensor DecoderModel::attention(int64_t i, const at::Tensor & x, const Aux & aux) {
    auto & L = layers_[i];
    const int64_t B = x.size(0), T = x.size(1), nh = cfg_.num_attention_heads, kvh = cfg_.num_key_value_heads,
                  hd = cfg_.head_dim;
    at::Tensor q = proj(i, kQ, *L.q_proj, x).view({B, T, nh, hd});   // (B, T, nh, hd)
    at::Tensor k = proj(i, kK, *L.k_proj, x).view({B, T, kvh, hd});
    at::Tensor v = proj(i, kV, *L.v_proj, x).view({B, T, kvh, hd}).transpose(1, 2);
    if (cfg_.qk_norm) {
        q = call(module_id(i, kQNorm), q, [&](const at::Tensor & t) { return rms_norm(t, L.q_norm); });
        k = call(module_id(i, kKNorm), k, [&](const at::Tensor & t) { return rms_norm(t, L.k_norm); });
    }
    q = q.transpose(1, 2);                                       // (B, nh, T, hd)
    k = k.transpose(1, 2);                                       // (B, kvh, T, hd)
    at::Tensor cos = aux.cos.unsqueeze(1), sin = aux.sin.unsqueeze(1);
    q = q * cos + rotate_half(q) * sin;
    k = k * cos + rotate_half(k) * sin;
    if (aux.cache) {
        auto & c = *aux.cache;
        c.k[i].narrow(2, c.len, T).copy_(k);
        c.v[i].narrow(2, c.len, T).copy_(v);
        k = c.k[i].narrow(2, 0, c.len + T);                      // (B, kvh, S, hd)
        v = c.v[i].narrow(2, 0, c.len + T);
    }
    const bool causal = !aux.mask.defined() && T > 1;
    std::optional<at::Tensor> mask;
    if (aux.mask.defined()) mask = aux.mask;
    at::Tensor o = at::scaled_dot_product_attention(q, k, v, mask, 0.0, causal, 1.0 / std::sqrt((double)hd),
                                                    /*enable_gqa=*/kvh != nh);   // (B, nh, T, hd)
    return proj(i, kO, *L.o_proj, o.transpose(1, 2).reshape({B, T, nh * hd}));
}

at::Tensor DecoderModel::mlp(int64_t i, const at::Tensor & y) {
    auto & L = layers_[i];
    if (cfg_.mlp_act == "swiglu")
        return proj(i, kDown, *L.down_proj, at::silu(proj(i, kGate, *L.gate_proj, y)) * proj(i, kUp, *L.up_proj, y));
    return proj(i, kDown, *L.down_proj, at::relu(proj(i, kUp, *L.up_proj, y)).square());
}

at::Tensor DecoderModel::layer_forward(int64_t i, const at::Tensor & x, const Aux & aux) {
    auto & L = layers_[i];
    at::Tensor a = call(module_id(i, kInNorm), x, [&](const at::Tensor & t) { return rms_norm(t, L.input_norm); });
    at::Tensor h = x + call(module_id(i, kSelfAttn), a, [&](const at::Tensor & t) { return attention(i, t, aux); });
    at::Tensor y = call(module_id(i, kPostNorm), h, [&](const at::Tensor & t) { return rms_norm(t, L.post_norm); });
    return h + call(module_id(i, kMlp), y, [&](const at::Tensor & t) { return mlp(i, t); });
}

namespace {
// Per-layer activation checkpointing: forward saves only the input; backward recomputes the
// layer with grad enabled and backpropagates into the input and the layer's parameters.
struct LayerCheckpoint : torch::autograd::Function<LayerCheckpoint> {
    static at::Tensor forward(torch::autograd::AutogradContext * ctx, const at::Tensor & x, at::TensorList params,
                              int64_t model, int64_t layer, const at::Tensor & cos, const at::Tensor & sin,
                              const std::optional<at::Tensor> & mask) {
        ctx->saved_data["model"] = model;   // the model must outlive backward
        ctx->saved_data["layer"] = layer;
        ctx->saved_data["cos"] = cos;
        ctx->saved_data["sin"] = sin;
        ctx->saved_data["mask"] = mask ? c10::IValue(*mask) : c10::IValue();
        ctx->saved_data["nparams"] = (int64_t)params.size();
        std::vector<at::Tensor> save{x};
        save.insert(save.end(), params.begin(), params.end());
        ctx->save_for_backward(save);
        DecoderModel::Aux aux{cos, sin, mask ? *mask : at::Tensor(), nullptr};
        return reinterpret_cast<DecoderModel *>(model)->layer_forward(layer, x, aux);
    }
    static torch::autograd::variable_list backward(torch::autograd::AutogradContext * ctx,
                                                   torch::autograd::variable_list gy) {
        auto saved = ctx->get_saved_variables();
        auto * model = reinterpret_cast<DecoderModel *>(ctx->saved_data["model"].toInt());
        int64_t layer = ctx->saved_data["layer"].toInt();
        DecoderModel::Aux aux;
        aux.cos = ctx->saved_data["cos"].toTensor();
        aux.sin = ctx->saved_data["sin"].toTensor();
        if (!ctx->saved_data["mask"].isNone()) aux.mask = ctx->saved_data["mask"].toTensor();
        at::Tensor xd = saved[0].detach().requires_grad_(saved[0].requires_grad());
        at::Tensor y;
        {
            at::AutoGradMode on(true);
            DecoderModel::Recompute mark(*model);
            y = model->layer_forward(layer, xd, aux);
        }
        std::vector<at::Tensor> inputs;
        std::vector<int64_t> where;   // index into the returned grads
        if (xd.requires_grad()) {
            inputs.push_back(xd);
            where.push_back(0);
        }
        for (size_t j = 1; j < saved.size(); j++)
            if (saved[j].requires_grad()) {
                inputs.push_back(saved[j]);
                where.push_back((int64_t)j);
            }
        // grads: x, each param, then model, layer, cos, sin, mask.
        torch::autograd::variable_list out(saved.size() + 5);
        if (!inputs.empty() && y.requires_grad()) {
            auto g = torch::autograd::grad({y}, inputs, {gy[0]}, false, false, true);
            for (size_t j = 0; j < g.size(); j++) out[where[j]] = g[j];
        }
        return out;
    }
};
} // namespace

at::Tensor DecoderModel::forward_impl(const at::Tensor & ids, const at::Tensor & key_mask, const at::Tensor & pos,
                                      KVCache * cache, ForwardOutput out) {
    const int64_t B = ids.size(0), T = ids.size(1);
    at::Tensor x = call(0, ids, [this](const at::Tensor & t) { return at::embedding(embed_, t); });   // (B, T, H)
    if (cfg_.embed_norm) x = rms_norm(x, {});
    Aux aux;
    std::tie(aux.cos, aux.sin) = rope(pos, x.scalar_type());
    aux.cache = cache;
    const int64_t past = cache ? cache->len : 0, S = past + T;
    const bool need_mask = cache ? (cache->padded || (past > 0 && T > 1)) : key_mask.defined();
    if (need_mask) {
        // (B, 1, T, S): key s visible to query t iff s <= past + t and s is a real token; the
        // diagonal is always visible so padded queries get a finite (ignored) output.
        auto lopts = at::TensorOptions().dtype(at::kLong).device(ids.device());
        at::Tensor qs = at::arange(past, S, lopts).unsqueeze(1), ks = at::arange(S, lopts).unsqueeze(0);
        at::Tensor m = (ks <= qs).view({1, 1, T, S});
        at::Tensor km = cache ? cache->key_mask.narrow(1, 0, S) : key_mask;
        if (km.defined()) m = (m & km.to(at::kBool).view({B, 1, 1, S})) | (ks == qs).view({1, 1, T, S});
        aux.mask = m.expand({B, 1, T, S});
    }
    return layers_from(0, x, aux, cache, out);
}

at::Tensor DecoderModel::layers_from(int64_t first, at::Tensor x, const Aux & aux, KVCache * cache, ForwardOutput out) {
    const int64_t T = x.size(1);
    const bool ckpt = ckpt_layers_ != 0 && training_ && !cache && at::GradMode::is_enabled();
    const int64_t n_ckpt = gradient_checkpointing_layers();
    for (int64_t i = first; i < (int64_t)layers_.size(); i++) {
        // The layer's own hooks run here, once per forward; hooks inside a checkpointed layer
        // run in forward and again when backward recomputes it.
        x = call(module_id(i, kLayer), x, [&](const at::Tensor & xi) {
            if (ckpt && i < n_ckpt) {
                auto params = layer_parameters(i);
                std::optional<at::Tensor> mask;   // an undefined Tensor argument is refused by apply()
                if (aux.mask.defined()) mask = aux.mask;
                return LayerCheckpoint::apply(xi, at::TensorList(params), (int64_t)(intptr_t)this, i, aux.cos, aux.sin, mask);
            }
            return layer_forward(i, xi, aux);
        });
    }
    if (cache) cache->len += T;
    x = call(norm_id(), x, [this](const at::Tensor & t) { return rms_norm(t, final_norm_); });
    return out == ForwardOutput::hidden ? x : lm_head(x);
}

void DecoderModel::gradient_checkpointing_layers(int64_t n) {
    if (n < 0) throw std::runtime_error("expected a layer count >= 0, got " + std::to_string(n));
    ckpt_layers_ = std::min<int64_t>(n, (int64_t)layers_.size());
}

int64_t DecoderModel::gradient_checkpointing_layers() const {
    return ckpt_layers_ < 0 ? (int64_t)layers_.size() : ckpt_layers_;
}

at::Tensor DecoderModel::lm_head_weight() {
    return lm_head_ ? lm_head_->weight() : embed_;
}

at::Tensor DecoderModel::lm_head(const at::Tensor & h) {
    at::Tensor logits = call(head_id(), h, [this](const at::Tensor & t) {
        return lm_head_ ? lm_head_->forward(t) : at::linear(t, embed_);   // (..., V)
    });
    if (cfg_.logit_softcap > 0) logits = at::tanh(logits / cfg_.logit_softcap) * cfg_.logit_softcap;
    return logits;
}

namespace {
void check_ids(const at::Tensor & ids, const char * what) {
    if (!ids.defined() || ids.dim() != 2 || ids.scalar_type() != at::kLong)
        throw std::runtime_error(std::string(what) + ": expected int64 (B, T), found " +
                                 (ids.defined() ? std::string(c10::toString(ids.scalar_type())) + " of " +
                                                      std::to_string(ids.dim()) + " dims"
                                                : std::string("nothing")));
}
} // namespace

at::Tensor DecoderModel::forward(const at::Tensor & input_ids, const at::Tensor & attention_mask,
                                 const at::Tensor & position_ids, ForwardOutput out) {
    check_ids(input_ids, "forward: input_ids");
    at::Tensor ids = input_ids.to(device());
    at::Tensor mask, pos;
    if (attention_mask.defined()) {
        if (attention_mask.sizes() != ids.sizes()) throw std::runtime_error("forward: attention_mask must be shaped like input_ids");
        mask = attention_mask.to(device()).to(at::kBool);
    }
    if (position_ids.defined()) {
        if (position_ids.sizes() != ids.sizes()) throw std::runtime_error("forward: position_ids must be shaped like input_ids");
        pos = position_ids.to(device()).to(at::kLong);
    } else if (mask.defined()) {
        pos = (mask.to(at::kLong).cumsum(1) - 1).clamp_min(0);   // left padding: real tokens start at 0
    } else {
        pos = at::arange(ids.size(1), ids.options()).unsqueeze(0).expand_as(ids);
    }
    return forward_impl(ids, mask, pos, nullptr, out);
}

at::Tensor DecoderModel::forward_from(int64_t first, const at::Tensor & hidden, ForwardOutput out) {
    const int64_t n = (int64_t)layers_.size();
    if (first < 0 || first > n)
        throw std::runtime_error("layer " + std::to_string(first) + " out of range (the model has " +
                                 std::to_string(n) + " layers)");
    if (!hidden.defined() || hidden.dim() != 3 || hidden.size(2) != cfg_.hidden_size)
        throw std::runtime_error("expected hidden states (B, T, " + std::to_string(cfg_.hidden_size) +
                                 "), found " + (hidden.defined() ? c10::str(hidden.sizes()) : std::string("nothing")));
    at::Tensor x = hidden.to(device(), dtype());
    at::Tensor pos = at::arange(x.size(1), at::TensorOptions().dtype(at::kLong).device(x.device())).unsqueeze(0)
                         .expand({x.size(0), x.size(1)});
    Aux aux;
    std::tie(aux.cos, aux.sin) = rope(pos, x.scalar_type());
    return layers_from(first, x, aux, nullptr, out);
}

at::Tensor DecoderModel::forward_cached(const at::Tensor & input_ids, KVCache & cache, const at::Tensor & key_mask_new,
                                        ForwardOutput out) {
    check_ids(input_ids, "input_ids");
    at::Tensor ids = input_ids.to(device());
    const int64_t B = ids.size(0), T = ids.size(1);
    if (B != cache.key_mask.size(0)) throw std::runtime_error("batch does not match the cache");
    if (cache.len + T > cache.max_len)
        throw std::runtime_error("cache full (" + std::to_string(cache.len) + " + " + std::to_string(T) +
                                 " > " + std::to_string(cache.max_len) + ")");
    at::Tensor m = key_mask_new.defined() ? key_mask_new.to(device()).to(at::kBool) : at::ones({B, T}, ids.options().dtype(at::kBool));
    if (key_mask_new.defined()) cache.padded = true;
    cache.key_mask.narrow(1, cache.len, T).copy_(m);
    at::Tensor pos = cache.next_pos.unsqueeze(1) + (m.to(at::kLong).cumsum(1) - 1).clamp_min(0);   // (B, T)
    cache.next_pos = cache.next_pos + m.to(at::kLong).sum(1);
    return forward_impl(ids, at::Tensor(), pos, &cache, out);
}

// -- Hugging Face directories ----------------------------------------------------------------

namespace {

// Every parameter the config implies must be in the weight files with the same shape, checked
// on a meta-device model (no memory) before the real one is allocated: a config that asks for
// more than the files hold is an error, not a terabyte allocation.
void pretrained_shapes_check(const DecoderConfig & cfg, const std::string & config_path, const NamedTensors & all,
                             const std::map<std::string, std::string> & file_of, const std::string & dir) {
    // A layer holds at least one tensor: bounds the layer list before it is built.
    if (cfg.num_hidden_layers > int64_t(all.size()))
        throw std::runtime_error(config_path + ": num_hidden_layers: " + std::to_string(cfg.num_hidden_layers) +
                                 " layers, but the weight files hold only " + std::to_string(all.size()) + " tensors");
    std::unique_ptr<DecoderModel> meta;
    try {
        meta = std::make_unique<DecoderModel>(cfg, c10::Device(c10::kMeta), at::kFloat, false);
    } catch (const c10::Error & e) {
        throw std::runtime_error(config_path + ": the parameter shapes it implies are not representable: " +
                                 e.what_without_backtrace());
    }
    std::map<std::string, const at::Tensor *> given;
    for (auto & [n, t] : all) given[n] = &t;
    for (auto & [n, p] : meta->named_parameters()) {
        auto it = given.find(n);
        if (it == given.end())
            throw std::runtime_error(dir + ": " + n + ": missing (" + config_path + " implies a tensor of shape " +
                                     c10::str(p.sizes()) + ", found in no weight file)");
        if (it->second->sizes() != p.sizes())
            throw std::runtime_error(file_of.at(n) + ": " + n + ": " + config_path + " implies shape " +
                                     c10::str(p.sizes()) + ", the file holds " + c10::str(it->second->sizes()));
    }
}

} // namespace

std::shared_ptr<DecoderModel> DecoderModel::from_pretrained(const std::string & dir, std::optional<c10::Device> device,
                                                            std::optional<at::ScalarType> dtype) {
    fs::path d(dir);
    if (!fs::is_directory(d)) throw std::runtime_error(dir + ": not a directory");
    const std::string config_path = (d / "config.json").string();
    DecoderConfig cfg = decoder_config_load(config_path);
    at::ScalarType dt = dtype.value_or(at::kFloat);
    // Shards: model.safetensors, or every file named in the index's weight_map.
    std::vector<std::string> files;
    fs::path single = d / "model.safetensors", index = d / "model.safetensors.index.json";
    if (fs::exists(single)) {
        files.push_back(single.string());
    } else if (fs::exists(index)) {
        json j;
        try {
            j = json::parse(read_file_text(index.string()));
        } catch (const json::exception & e) {
            throw std::runtime_error(index.string() + ": not valid JSON: " + e.what());
        }
        if (!j.contains("weight_map") || !j["weight_map"].is_object())
            throw std::runtime_error(index.string() + ": weight_map: missing (expected an object name -> file)");
        std::set<std::string> seen;
        for (auto & [k, v] : j["weight_map"].items()) {
            if (!v.is_string()) throw std::runtime_error(index.string() + ": weight_map: " + k + ": expected a file name");
            std::string f = v.get<std::string>();
            if (f.find('/') != std::string::npos || f.find("..") != std::string::npos)
                throw std::runtime_error(index.string() + ": weight_map: " + k + ": file name '" + f + "' leaves the directory");
            if (seen.insert(f).second) files.push_back((d / f).string());
        }
    } else {
        throw std::runtime_error(dir + ": neither model.safetensors nor model.safetensors.index.json found");
    }
    // The weights are memory-mapped views: reading every header first costs no memory.
    NamedTensors all;
    std::map<std::string, std::string> file_of;
    for (auto & f : files) {
        auto st = safetensors_load(f);
        for (auto & [n, t] : st.tensors) {
            if (cfg.tie_word_embeddings && n == "lm_head.weight") continue;   // a redundant copy of the tie
            if (!t.is_floating_point())
                throw std::runtime_error(f + ": " + n + ": expected a floating-point tensor, found " +
                                         c10::toString(t.scalar_type()));
            file_of[n] = f;
            all.push_back({n, std::move(t)});
        }
    }
    pretrained_shapes_check(cfg, config_path, all, file_of, dir);
    std::shared_ptr<DecoderModel> model;
    try {
        model = std::make_shared<DecoderModel>(cfg, device.value_or(c10::Device(c10::kCPU)), dt, false);
    } catch (const std::bad_alloc &) {
        throw std::runtime_error(dir + ": out of memory allocating the model " + config_path + " describes");
    } catch (const c10::Error & e) {
        throw std::runtime_error(dir + ": cannot allocate the model " + config_path + " describes: " +
                                 e.what_without_backtrace());
    }
    model->cfg_.torch_dtype = dtype_json_name(dt);
    try {
        model->load_state_dict(all, true, dir);
    } catch (const std::bad_alloc &) {
        throw std::runtime_error(dir + ": out of memory copying the weights into the model");
    }
    model->train(false);
    return model;
}

void DecoderModel::save_pretrained(const std::string & dir, int64_t max_shard_bytes) {
    fs::path d(dir);
    std::error_code ec;
    fs::create_directories(d, ec);
    if (ec) throw std::runtime_error(dir + ": cannot create directory: " + ec.message());
    cfg_.torch_dtype = dtype_json_name(dtype());
    // Each linear layer says what it saves (its slots; a Lua layer its dense weight).
    std::map<at::Tensor *, std::pair<std::string, Linear *>> owner;
    for (auto & ln : linear_names()) {
        auto l = get_linear(ln);
        for (auto & [sn, p] : l->parameter_slots()) owner[p] = {ln, l.get()};
    }
    NamedTensors all;
    std::set<Linear *> done;
    for (auto & [n, p] : slots()) {
        auto it = owner.find(p);
        if (it == owner.end()) {
            all.push_back({n, p->detach()});
        } else if (done.insert(it->second.second).second) {
            for (auto & nt : it->second.second->save_tensors(it->second.first)) all.push_back(nt);
        }
    }
    std::vector<NamedTensors> shards(1);
    int64_t shard_bytes = 0, total = 0;
    for (auto & [n, t] : all) {
        int64_t nb = t.numel() * (int64_t)t.element_size();
        if (shard_bytes > 0 && shard_bytes + nb > max_shard_bytes) {
            shards.emplace_back();
            shard_bytes = 0;
        }
        shards.back().push_back({n, t.detach()});
        shard_bytes += nb;
        total += nb;
    }
    const std::map<std::string, std::string> meta{{"format", "pt"}};
    fs::path single = d / "model.safetensors", index = d / "model.safetensors.index.json";
    // Every file is written under a temporary name first; only when all are written are they
    // renamed into place (config.json last): a failing write leaves the previous save whole.
    const std::string sfx = ".tmp." + std::to_string(getpid());
    std::vector<std::pair<fs::path, fs::path>> staged;   // temporary -> final
    auto stage = [&](const fs::path & final) {
        fs::path t = final;
        t += sfx;
        staged.push_back({t, final});
        return t.string();
    };
    auto drop_staged = [&]() {
        for (auto & [t, f] : staged) fs::remove(t, ec);
    };
    try {
        if (shards.size() == 1) {
            safetensors_save(stage(single), shards[0], meta);
        } else {
            json wm = json::object();
            char name[64];
            for (size_t s = 0; s < shards.size(); s++) {
                snprintf(name, sizeof(name), "model-%05zu-of-%05zu.safetensors", s + 1, shards.size());
                safetensors_save(stage(d / name), shards[s], meta);
                for (auto & [n, t] : shards[s]) wm[n] = name;
            }
            json j = {{"metadata", {{"total_size", total}}}, {"weight_map", wm}};
            write_file_atomic(stage(index), j.dump(2) + "\n");
        }
        write_file_atomic(stage(d / "config.json"), decoder_config_dump(cfg_));
    } catch (...) {
        drop_staged();
        throw;
    }
    for (auto & [t, f] : staged) {
        fs::rename(t, f, ec);
        if (ec) {
            std::string why = ec.message();
            drop_staged();
            throw std::runtime_error(f.string() + ": rename failed: " + why);
        }
    }
    if (shards.size() == 1) fs::remove(index, ec);   // a stale index from an earlier sharded save
    else fs::remove(single, ec);                     // transformers prefers model.safetensors over the index
}

} // namespace qatlab
