// kd: the KD loss (lib/kd_loss, docs/formulas.md §6) for Lua: kd.loss on hidden states, kd.loss_model on
// a model, kd.evaluate (docs/formulas.md §6) and the unfused kd.loss_reference; the cache functions join the table.
#include "bindings/bind.h"
#include "lib/kd_loss.h"
#include "lib/model.h"

#include <ATen/ATen.h>

#include <cmath>
#include <string>

namespace qatlab {

void kd_open_cache(lua_State * L, int t);   // bindings/kd_cache.cpp

void kd_cache_check_reader(lua_State * L, int idx, const DecoderModel & m);   // bindings/kd_cache.cpp

namespace {

// batch table at stack index idx: {input_ids=, attention_mask=, topk_idx=, topk_logits=, rand_idx=, rand_logits=}
KDBatch batch_read(lua_State * L, int idx, const char * what) {
    if (lua_type(L, idx) != LUA_TTABLE) bind_fail("%s: expected a batch table {topk_idx=, topk_logits=, ...}, got %s", what, luaL_typename(L, idx));
    KDBatch b;
    auto field = [&](const char * k, at::Tensor & out) {
        lua_getfield(L, idx, k);
        if (!lua_isnil(L, -1)) {
            at::Tensor * t = tensor_test(L, -1);
            if (!t) bind_fail("%s.%s: expected a Tensor, got %s", what, k, luaL_typename(L, -1));
            if (!t->defined()) bind_fail("%s.%s: the tensor was freed", what, k);
            out = *t;
        }
        lua_pop(L, 1);
    };
    field("input_ids", b.input_ids);
    field("attention_mask", b.attention_mask);
    field("topk_idx", b.topk_idx);
    field("topk_logits", b.topk_logits);
    field("rand_idx", b.rand_idx);
    field("rand_logits", b.rand_logits);
    if (!b.topk_idx.defined()) bind_fail("%s.topk_idx: missing", what);
    if (!b.topk_logits.defined()) bind_fail("%s.topk_logits: missing", what);
    return b;
}

// Options table from stack index `first` on: {T=2, hard_top1=0.2, hard_full=0.00005, sampled=0,
// sampled_negatives=64, legacy=false, distill_weight=1, masked=false, chunk=128}.
KDOptions opts_read(lua_State * L, int first) {
    Args a(L, first);
    KDOptions o;
    o.temperature = a.opt_number(0, "T", o.temperature);
    o.hard_top1 = a.opt_number(0, "hard_top1", o.hard_top1);
    o.hard_full = a.opt_number(0, "hard_full", o.hard_full);
    o.sampled_ce = a.opt_number(0, "sampled", o.sampled_ce);
    o.sampled_negatives = a.opt_integer(0, "sampled_negatives", o.sampled_negatives);
    o.legacy = a.opt_bool(0, "legacy", o.legacy);
    o.distill_weight = a.opt_number(0, "distill_weight", o.distill_weight);
    o.masked = a.opt_bool(0, "masked", o.masked);
    o.chunk = a.opt_integer(0, "chunk", o.chunk);
    a.finish();
    return o;
}

// loss, {kl=, top1_ce=, full_ce=, sampled_ce=}: parts not computed are nil.
int result_push(lua_State * L, const KDResult & r, const KDOptions & o) {
    tensor_push(L, r.loss);
    lua_createtable(L, 0, 4);
    auto set = [&](const char * k, double v) {
        if (std::isnan(v)) return;
        lua_pushnumber(L, v);
        lua_setfield(L, -2, k);
    };
    set("kl", r.kl);
    if (o.legacy) {
        set("top1_ce", r.cand_ce);   // NLL of candidate 0 under the candidate softmax
        set("full_ce", r.full_ce);   // last non-pad position only
    } else {
        set("top1_ce", r.full_ce);   // V2: hard_top1 and hard_full weight the same CE
        set("full_ce", r.full_ce);
        set("sampled_ce", r.cand_ce);
    }
    return 2;
}

at::Tensor & weight_arg(lua_State * L, int idx) {
    at::Tensor * t = tensor_test(L, idx);
    if (!t) bind_fail("argument #%d (lm_head_weight): expected a Tensor (V, H), got %s", idx, luaL_typename(L, idx));
    if (!t->defined()) bind_fail("lm_head_weight: the tensor was freed");
    return *t;
}

template <bool Fused>
int kd_loss_l(lua_State * L) {
    at::Tensor * h = tensor_test(L, 1);
    if (!h) bind_fail("argument #1 (h): expected hidden states (B, S, H), got %s", luaL_typename(L, 1));
    at::Tensor & W = weight_arg(L, 2);
    KDBatch b = batch_read(L, 3, "batch");
    KDOptions o = opts_read(L, 4);
    try {
        return result_push(L, Fused ? kd_loss_fused(*h, W, b, o) : kd_loss_reference(*h, W, b, o), o);
    } catch (const std::invalid_argument & e) {
        throw BindError(e.what());
    }
}

// The lm_head weight (V, H) the model computes logits with (the embedding when tied).
at::Tensor model_head_weight(DecoderModel & m) {
    if (m.config().logit_softcap > 0)
        bind_fail("the model has logit_softcap = %g; the KD loss uses plain logits h·W", m.config().logit_softcap);
    if (!m.config().tie_word_embeddings) return m.get_linear("lm_head")->weight();
    for (auto & [name, t] : m.named_parameters())
        if (name == "model.embed_tokens.weight") return t;
    bind_fail("the model has no model.embed_tokens.weight");
}

// docs/formulas.md §6: an all-ones mask is passed as none (plain causal attention).
at::Tensor model_hidden(DecoderModel & m, const at::Tensor & ids_in, const at::Tensor & mask_in) {
    at::Tensor ids = ids_in.to(m.device(), at::kLong), mask;
    if (mask_in.defined() && !(mask_in != 0).all().item<bool>()) mask = mask_in.to(m.device());
    return m.forward(ids, mask, {}, ForwardOutput::hidden);   // (B, L, H)
}

int kd_loss_model(lua_State * L) {
    DecoderModel & m = nn_model_check(L, 1);
    KDBatch b = batch_read(L, 2, "batch");
    KDOptions o = opts_read(L, 3);
    if (!b.input_ids.defined()) bind_fail("batch.input_ids: missing");
    at::Tensor W = model_head_weight(m);
    at::Tensor h = model_hidden(m, b.input_ids, b.attention_mask);
    try {
        return result_push(L, kd_loss_fused(h, W, b, o), o);
    } catch (const std::invalid_argument & e) {
        throw BindError(e.what());
    }
}

// Restores the model's train/eval mode on every exit.
struct TrainModeRestore {
    DecoderModel & m;
    bool was;
    ~TrainModeRestore() { m.train(was); }
};

// kd.evaluate(model, batches | iterator | reader, {examples=40 | batches=, T=2}) -> kd_loss, examples
// The count is named for what it counts: `examples` (rows, the seed's n=40) or `batches`
// (items the source yields); without either, the first 40 examples.
int kd_evaluate_l(lua_State * L) {
    DecoderModel & m = nn_model_check(L, 1);
    const int src = 2;
    // A reader object (kd.open_cache) is read through its :next method.
    bool reader = false;
    if (lua_type(L, src) == LUA_TUSERDATA || (lua_type(L, src) == LUA_TTABLE && lua_objlen(L, src) == 0)) {
        lua_getfield(L, src, "next");
        reader = lua_isfunction(L, -1);
        lua_pop(L, 1);
    }
    if (!reader && lua_type(L, src) != LUA_TTABLE && lua_type(L, src) != LUA_TFUNCTION)
        bind_fail("argument #2 (batches): expected an array of batches, an iterator function or a cache reader, got %s",
                  luaL_typename(L, src));
    if (reader) kd_cache_check_reader(L, src, m);   // a cache of another vocabulary is an error
    Args a(L, 3);
    if (a.has(0, "n"))
        a.fail(0, "n", "ambiguous count: use examples = N (rows scored) or batches = N (batches read)");
    const bool by_batches = a.has(0, "batches");
    if (by_batches && a.has(0, "examples")) a.fail(0, "batches", "give examples = or batches =, not both");
    int64_t max_batches = a.opt_integer(0, "batches", -1);
    int64_t n = by_batches ? INT64_MAX : a.opt_integer(0, "examples", 40);
    if (by_batches && max_batches < 1) a.fail(0, "batches", "expected >= 1, got %lld", (long long)max_batches);
    if (!by_batches && n < 1) a.fail(0, "examples", "expected >= 1, got %lld", (long long)n);
    double T = a.opt_number(0, "T", 2.0);
    a.finish();
    at::Tensor W = model_head_weight(m);
    TrainModeRestore restore{m, m.is_training()};
    m.train(false);
    int next_i = 0, count = 0;
    auto next = [&](KDBatch & b) {
        if (by_batches && count >= max_batches) return false;
        if (lua_type(L, src) == LUA_TTABLE && !reader) {
            lua_rawgeti(L, src, ++next_i);
        } else {
            int nargs = 0;
            if (reader) {
                lua_getfield(L, src, "next");
                lua_pushvalue(L, src);
                nargs = 1;
            } else {
                lua_pushvalue(L, src);
            }
            if (bind_pcall(L, nargs, 1) != 0) {
                std::string err = lua_tostring(L, -1) ? lua_tostring(L, -1) : "(error object)";
                lua_pop(L, 1);
                throw BindError("the batch iterator failed: " + err);
            }
        }
        if (lua_isnil(L, -1)) {
            lua_pop(L, 1);
            return false;
        }
        std::string what = "batch " + std::to_string(++count);
        b = batch_read(L, lua_gettop(L), what.c_str());
        lua_pop(L, 1);
        return true;
    };
    KDEvalResult r;
    try {
        r = kd_evaluate([&](const at::Tensor & ids, const at::Tensor & mask) { return model_hidden(m, ids, mask); }, W,
                        next, n, T);
    } catch (const std::invalid_argument & e) {
        throw BindError(e.what());
    }
    lua_pushnumber(L, r.kd_loss);
    lua_pushinteger(L, (lua_Integer)r.examples);
    return 2;
}

const BindFn fns[] = {
    {"loss", kd_loss_l<true>},
    {"loss_reference", kd_loss_l<false>},
    {"loss_model", kd_loss_model},
    {"evaluate", kd_evaluate_l},
    {nullptr, nullptr},
};

} // namespace

int luaopen_kd(lua_State * L) {
    lua_newtable(L);
    bind_register(L, -1, "kd.", fns);
    kd_open_cache(L, lua_gettop(L));
    return 1;
}

} // namespace qatlab
