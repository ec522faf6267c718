// model: one decoder-only language model (Qwen3, Llama, and a parameter-golf style small GPT)
// with Hugging Face names, swappable linear layers, safetensors I/O, KV-cache generation, perplexity.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/core/Generator.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/Device.h>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "lib/safetensors.h"

namespace qatlab {

// -- configuration ---------------------------------------------------------------------------
// The architecture switches every model_type maps to; parsed from a Hugging Face config.json.
struct DecoderConfig {
    std::string model_type;            // "qwen3", "llama" or "qatlab_gpt"
    int64_t vocab_size = 0;
    int64_t hidden_size = 0;
    int64_t intermediate_size = 0;
    int64_t num_hidden_layers = 0;
    int64_t num_attention_heads = 0;
    int64_t num_key_value_heads = 0;
    int64_t head_dim = 0;              // may differ from hidden_size / num_attention_heads (Qwen3)
    int64_t max_position_embeddings = 2048;
    double rms_norm_eps = 1e-6;
    double rope_theta = 10000.0;
    double initializer_range = 0.02;
    bool tie_word_embeddings = false;
    bool attention_bias = false;
    bool mlp_bias = false;
    // Switches (defaults follow model_type; explicit keys in config.json override them).
    bool qk_norm = false;              // per-head RMSNorm of q and k before RoPE (qwen3, golf)
    bool norm_weight = true;           // RMSNorm with a learned weight; false = parameter-free
    bool embed_norm = false;           // RMSNorm right after the token embedding (golf)
    std::string mlp_act = "swiglu";    // "swiglu": down(silu(gate) * up); "relu2": down(relu(up)^2)
    double logit_softcap = 0.0;        // > 0: logits = cap * tanh(logits / cap)
    std::string torch_dtype = "float32";
    std::string json;                  // the original config.json text (kept keys are re-saved)
};

// Throws std::runtime_error "<source>: <key>: <what was expected>" on a missing or bad key.
DecoderConfig decoder_config_parse(const std::string & json_text, const std::string & source);
DecoderConfig decoder_config_load(const std::string & path);
// config.json text for save_pretrained: the original keys updated with ours, architectures set.
std::string decoder_config_dump(const DecoderConfig & c);

// -- linear layers ---------------------------------------------------------------------------
// Every projection is one of these, reachable by its HF module name, so that a quantized layer
// can replace the dense one without the model knowing.
struct Linear {
    virtual ~Linear() = default;
    virtual at::Tensor forward(const at::Tensor & x) = 0;   // (..., in) -> (..., out)
    // The owned parameter slots under local names ("weight", "bias", "scale_A"...): the model
    // reads, replaces (to(), load) and freezes parameters through these pointers.
    virtual std::vector<std::pair<std::string, at::Tensor *>> parameter_slots() = 0;
    // The dense weight (out, in) this layer currently computes with (for inspection).
    virtual at::Tensor weight() = 0;
    virtual int64_t in_features() const = 0;
    virtual int64_t out_features() const = 0;
    // Train/eval mode (model.train(on) passes it on; built-in layers ignore it).
    virtual void train(bool on) {}
    // Replaces a parameter slot's tensor (model.to()); layers whose slots live elsewhere (Lua
    // layers) override it to keep their own bookkeeping right.
    virtual void slot_assign(at::Tensor * slot, at::Tensor value) { *slot = std::move(value); }
    // What save_pretrained writes for this layer under `prefix` (its module name): its
    // parameter slots; a Lua layer writes the dense weight it computes with instead.
    virtual std::vector<std::pair<std::string, at::Tensor>> save_tensors(const std::string & prefix) {
        std::vector<std::pair<std::string, at::Tensor>> out;
        for (auto & [n, p] : parameter_slots()) out.push_back({prefix + "." + n, p->detach()});
        return out;
    }
    // Set by set_linear: the HF module name, for error messages.
    std::string module_name;
};

// -- module hooks ----------------------------------------------------------------------------
// Hooks keyed by Hugging Face module name (model.layers.3.mlp, lm_head...), run where the model
// calls that module. A pre-hook sees the module's input and may return a replacement; a forward
// hook sees input and output and may return a replacement output (undefined = keep).
using ModulePreHook = std::function<at::Tensor(const std::string & module, const at::Tensor & input)>;
using ModuleHook = std::function<at::Tensor(const std::string & module, const at::Tensor & input,
                                            const at::Tensor & output)>;

// x @ W^T (+ b).
struct DenseLinear : Linear {
    at::Tensor w, b;   // (out, in), (out) or undefined
    DenseLinear(at::Tensor weight, at::Tensor bias = {}) : w(std::move(weight)), b(std::move(bias)) {}
    at::Tensor forward(const at::Tensor & x) override;
    std::vector<std::pair<std::string, at::Tensor *>> parameter_slots() override;
    at::Tensor weight() override { return w; }
    int64_t in_features() const override { return w.size(1); }
    int64_t out_features() const override { return w.size(0); }
};

// -- KV cache --------------------------------------------------------------------------------
struct KVCache {
    std::vector<at::Tensor> k, v;   // per layer (B, kv_heads, max_len, head_dim)
    at::Tensor key_mask;            // (B, max_len) bool: which cached positions are real tokens
    at::Tensor next_pos;            // (B) int64: RoPE position of the next token per row
    int64_t len = 0;                // filled positions
    int64_t max_len = 0;
    bool padded = false;            // some cached position is padding: masks are explicit
};

struct GenerateOptions {
    int64_t max_new_tokens = 32;
    double temperature = 0.0;             // 0 = greedy
    int64_t top_k = 0;                    // 0 = off
    double top_p = 1.0;                   // 1 = off
    double repetition_penalty = 1.0;      // HF convention: > 1 discourages seen tokens
    std::vector<int64_t> stop;            // stop token ids (the stop token is kept in the output)
    uint64_t seed = 42;
    int64_t num_samples = 1;              // independent samples per prompt row
    // (B, P) 1/true = real token, 0 = padding on the left of a shorter prompt (undefined: all
    // real). Each row then generates as its prompt alone would.
    at::Tensor attention_mask;
    // Called per generated token (row, token); return false to stop every row.
    std::function<bool(int64_t, int64_t)> on_token;
};

struct GenerateResult {
    std::vector<std::vector<int64_t>> tokens;   // generated ids per row (prompt b, sample s) -> b*S+s
    int64_t new_tokens = 0;                     // all rows together
    double prefill_seconds = 0, decode_seconds = 0;
    double tokens_per_second = 0;               // new_tokens / (prefill + decode seconds)
};

struct PerplexityResult {
    double nll = 0;         // mean negative log-likelihood (nats/token)
    double ppl = 0;
    int64_t tokens = 0;     // scored tokens
    double nll_sum = 0;
    double bits_per_byte = 0;   // set when a byte count is given
};

// -- the model -------------------------------------------------------------------------------
struct DecoderLayer {
    std::shared_ptr<Linear> q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj;
    at::Tensor q_norm, k_norm, input_norm, post_norm;   // (head_dim) / (hidden) or undefined
};

enum class ForwardOutput { logits, hidden };

class DecoderModel {
public:
    // Random init: normal(0, initializer_range) for matrices (ATen default generator), norms = 1.
    // init = false leaves the parameters uninitialized (they are about to be loaded).
    explicit DecoderModel(DecoderConfig config, c10::Device device = c10::kCPU,
                          at::ScalarType dtype = at::kFloat, bool init = true);

    const DecoderConfig & config() const { return cfg_; }
    int64_t num_layers() const { return (int64_t)layers_.size(); }

    // input_ids (B, T) int64; attention_mask (B, T) 1 = token, 0 = padding (left or right);
    // position_ids (B, T), default arange, or from the mask (cumsum - 1) when a mask is given.
    // Returns logits (B, T, V) or the final-normed hidden states (B, T, H).
    at::Tensor forward(const at::Tensor & input_ids, const at::Tensor & attention_mask = {},
                       const at::Tensor & position_ids = {}, ForwardOutput out = ForwardOutput::logits);
    // One step with a cache: writes K/V of the T new tokens at cache.len and advances it.
    // key_mask_new (B, T) bool marks real tokens (undefined = all real).
    at::Tensor forward_cached(const at::Tensor & input_ids, KVCache & cache,
                              const at::Tensor & key_mask_new = {}, ForwardOutput out = ForwardOutput::logits);
    // The LM head (with softcap) over final hidden states (..., H) -> (..., V).
    at::Tensor lm_head(const at::Tensor & hidden);
    // Decoder layers first..end on hidden (B, T, H), the states layer `first` receives in a plain
    // forward (positions 0..T-1, causal, no padding), then the final norm (and head): measures that
    // change only layers >= first skip recomputing the ones before (per-layer sensitivity).
    at::Tensor forward_from(int64_t first, const at::Tensor & hidden, ForwardOutput out = ForwardOutput::logits);

    // Parameters, HF order: embed, per layer (attn q,k,v,o, q_norm, k_norm, mlp, norms), norm, lm_head.
    NamedTensors named_parameters();
    NamedTensors state_dict() { return named_parameters(); }
    // Copies values into the existing parameters (keeps their identity, device and dtype).
    // strict: any missing or unexpected key or a shape mismatch is an error listing every name.
    // Returns the missing and unexpected keys (non-strict).
    std::pair<std::vector<std::string>, std::vector<std::string>>
    load_state_dict(const NamedTensors & sd, bool strict = true, const std::string & source = "state_dict");

    void train(bool on = true);   // also passed on to every linear layer
    bool is_training() const { return training_; }
    // Per-layer activation checkpointing: every layer (true), none (false), or the first n
    // layers (n >= number of layers = all): a dial between memory and recomputation.
    void gradient_checkpointing(bool on) { ckpt_layers_ = on ? -1 : 0; }
    void gradient_checkpointing_layers(int64_t n);
    bool is_gradient_checkpointing() const { return ckpt_layers_ != 0; }
    // How many layers are checkpointed (0 .. number of layers).
    int64_t gradient_checkpointing_layers() const;
    void to(std::optional<c10::Device> device, std::optional<at::ScalarType> dtype);
    c10::Device device() const { return embed_.device(); }
    at::ScalarType dtype() const { return embed_.scalar_type(); }
    // Sets requires_grad on every parameter whose name matches `pattern` (std::regex_search;
    // empty = all). Returns how many matched.
    int64_t requires_grad(bool on, const std::string & pattern = "");

    // Every module under its Hugging Face name, in call order: model.embed_tokens, per layer
    // model.layers.i, its input_layernorm, self_attn (q/k/v_proj, q/k_norm, o_proj),
    // post_attention_layernorm, mlp (gate/up/down_proj); model.norm; lm_head.
    std::vector<std::string> module_names() const;
    // Hooks on the named modules (each must be in module_names()); returns a handle for
    // remove_hook. Hooks run in the order registered, in training and eval, in generate();
    // a checkpointed layer's hooks run again when backward recomputes it (is_recomputing()).
    int64_t register_forward_pre_hook(const std::vector<std::string> & modules, ModulePreHook fn);
    int64_t register_forward_hook(const std::vector<std::string> & modules, ModuleHook fn);
    bool remove_hook(int64_t handle);   // false when already removed
    int64_t num_hooks() const { return hook_count_; }
    bool is_recomputing() const { return recomputing_ > 0; }
    // The lm_head weight (V, H): the embedding when tied.
    at::Tensor lm_head_weight();
    // Next-token cross-entropy of input_ids (B, T) (labels default to input_ids, shifted inside),
    // chunked over positions with the lm_head recomputed in backward: no (N, V) tensor lives
    // whole. reduction "mean" (over non-ignored targets), "sum" or "none" ((B, T-1)).
    at::Tensor loss(const at::Tensor & input_ids, const at::Tensor & labels = {}, const at::Tensor & attention_mask = {},
                    int64_t ignore_index = -100, const std::string & reduction = "mean", int64_t chunk = 256);

    std::vector<std::string> linear_names() const;
    std::shared_ptr<Linear> get_linear(const std::string & name) const;
    // Replaces a linear layer; its in/out features must match the old one.
    void set_linear(const std::string & name, std::shared_ptr<Linear> layer);

    // Hugging Face directories (config.json + model.safetensors or a sharded index).
    static std::shared_ptr<DecoderModel> from_pretrained(const std::string & dir,
                                                         std::optional<c10::Device> device = {},
                                                         std::optional<at::ScalarType> dtype = {});
    // Writes config.json + model.safetensors (sharded with an index above max_shard_bytes) into
    // `dir`, each under a temporary name first, renamed into place once every file is written.
    void save_pretrained(const std::string & dir, int64_t max_shard_bytes = 5LL << 30);

    // KV-cache decoding (lib/model_generate.cpp).
    KVCache kvcache_init(int64_t batch, int64_t max_len);
    // input_ids (B, P) int64 prompts of equal length (or (P)); one row per prompt x sample.
    GenerateResult generate(const at::Tensor & input_ids, const GenerateOptions & opt);
    // Sliding-window perplexity of one id sequence (T) (docs/formulas.md §9); bits per byte if bytes > 0.
    PerplexityResult perplexity(const at::Tensor & ids, int64_t max_length = 1024, int64_t stride = 512,
                                int64_t bytes = 0);

    // One decoder layer on (B, T, H) hidden states (public for the checkpoint function).
    struct Aux {
        at::Tensor cos, sin;   // (B, T, head_dim) in the compute dtype
        at::Tensor mask;       // (B, 1, T, S) bool or undefined (then causal when T > 1)
        KVCache * cache = nullptr;
    };
    at::Tensor layer_forward(int64_t i, const at::Tensor & x, const Aux & aux);
    // Marks a backward recomputation of checkpointed layers while alive (is_recomputing()).
    struct Recompute {
        DecoderModel & m;
        explicit Recompute(DecoderModel & model) : m(model) { m.recomputing_++; }
        ~Recompute() { m.recomputing_--; }
    };
    std::vector<at::Tensor> layer_parameters(int64_t i);

private:
    // Module ids: 0 embed_tokens; 1 + i * kSub + sub per layer; then model.norm, lm_head.
    enum Sub { kLayer, kInNorm, kSelfAttn, kQ, kK, kV, kQNorm, kKNorm, kO, kPostNorm, kMlp, kGate, kUp, kDown, kSub };
    int64_t module_id(int64_t layer, Sub s) const { return 1 + layer * kSub + s; }
    int64_t norm_id() const { return 1 + (int64_t)layers_.size() * kSub; }
    int64_t head_id() const { return norm_id() + 1; }
    std::string module_name_of(int64_t id) const;
    int64_t module_find(const std::string & name) const;   // -1 if no such module
    // Runs f(x) as module `id`, with its hooks when any are registered.
    template <class F> at::Tensor call(int64_t id, const at::Tensor & x, F && f) {
        if (hook_count_ == 0) return f(x);
        return call_hooked(id, x, std::function<at::Tensor(const at::Tensor &)>(std::forward<F>(f)));
    }
    at::Tensor call_hooked(int64_t id, const at::Tensor & x, const std::function<at::Tensor(const at::Tensor &)> & f);
    at::Tensor proj(int64_t layer, Sub s, Linear & l, const at::Tensor & x);
    at::Tensor mlp(int64_t i, const at::Tensor & y);

    struct HookEntry {
        int64_t handle;
        std::shared_ptr<ModulePreHook> pre;   // one of the two
        std::shared_ptr<ModuleHook> post;
    };
    std::map<int64_t, std::vector<HookEntry>> hooks_;   // module id -> hooks in order
    int64_t hook_count_ = 0, next_hook_ = 1;
    int recomputing_ = 0;

    at::Tensor forward_impl(const at::Tensor & ids, const at::Tensor & key_mask, const at::Tensor & pos,
                            KVCache * cache, ForwardOutput out);
    at::Tensor layers_from(int64_t first, at::Tensor x, const Aux & aux, KVCache * cache, ForwardOutput out);
    at::Tensor rms_norm(const at::Tensor & x, const at::Tensor & w);
    at::Tensor attention(int64_t i, const at::Tensor & x, const Aux & aux);
    std::pair<at::Tensor, at::Tensor> rope(const at::Tensor & pos, at::ScalarType dtype);
    std::vector<std::pair<std::string, at::Tensor *>> slots();

    DecoderConfig cfg_;
    at::Tensor embed_, final_norm_;
    std::shared_ptr<Linear> lm_head_;   // null when tied
    std::vector<DecoderLayer> layers_;
    bool training_ = true;
    int64_t ckpt_layers_ = 0;   // -1: all
    std::map<std::string, at::Tensor> rope_cache_;   // "device/dtype" -> (cos|sin table)
};

} // namespace qatlab
