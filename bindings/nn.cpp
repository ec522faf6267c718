// nn: the decoder language model (lib/model) as Lua userdata: from_pretrained / from_config,
// forward, parameters and state dicts, freezing, checkpointing, save, generation and perplexity.
#include "bindings/bind.h"
#include "lib/model.h"

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <cstring>
#include <memory>
#include <regex>
#include <string>

namespace qatlab {

namespace {


struct ModelUD {
    std::shared_ptr<DecoderModel> m;
};

using json = nlohmann::json;

void model_push(lua_State * L, std::shared_ptr<DecoderModel> m) {
    udata_new<ModelUD>(L, QATLAB_MODEL_MT, std::move(m));
}

DecoderModel & model_check(lua_State * L, int idx) {
    ModelUD & u = udata_check<ModelUD>(L, idx, QATLAB_MODEL_MT, "a Model");
    if (!u.m) bind_fail("the model was freed");
    return *u.m;
}

// -- constructors ----------------------------------------------------------------------------

void read_place(Args & a, int pos, std::optional<c10::Device> & dev, std::optional<at::ScalarType> & dt) {
    c10::Device d(at::kCPU);
    at::ScalarType t;
    if (a.opt_device(0, "device", d)) dev = d;
    if (a.opt_dtype(0, "dtype", t)) {
        if (!at::isFloatingType(t)) bind_fail("option 'dtype': a model needs a floating dtype, got %s", c10::toString(t));
        dt = t;
    }
}

int nn_from_pretrained(lua_State * L) {
    Args a(L);
    int idx = a.find(1, "dir");
    if (!idx || lua_type(L, idx) != LUA_TSTRING) bind_fail("argument #1 (dir): expected a directory path");
    std::string dir = lua_tostring(L, idx);
    std::optional<c10::Device> dev;
    std::optional<at::ScalarType> dt;
    read_place(a, 0, dev, dt);
    a.finish();
    if (!dev) dev = default_device();
    model_push(L, DecoderModel::from_pretrained(dir, dev, dt));
    return 1;
}

int nn_from_config(lua_State * L) {
    // The config table has string keys like an options table: read it by position, options after it.
    DecoderConfig cfg;
    if (lua_type(L, 1) == LUA_TSTRING) {
        cfg = decoder_config_load(lua_tostring(L, 1));
    } else if (lua_type(L, 1) == LUA_TTABLE) {
        cfg = decoder_config_parse(json_from_lua(L, 1, "config table").dump(), "config table");
    } else {
        bind_fail("argument #1 (config): expected a config.json path or a config table, got %s", luaL_typename(L, 1));
    }
    Args a(L, 2);
    std::optional<c10::Device> dev;
    std::optional<at::ScalarType> dt;
    read_place(a, 0, dev, dt);
    a.finish();
    at::ScalarType t = dt.value_or(at::isFloatingType(default_dtype()) ? default_dtype() : at::kFloat);
    auto m = std::make_shared<DecoderModel>(cfg, dev.value_or(default_device()), t);
    m->to(std::nullopt, t);   // records the dtype in the config
    model_push(L, m);
    return 1;
}

// -- methods ---------------------------------------------------------------------------------

at::Tensor ids_arg(Args & a, int pos, const char * name) {
    int idx = a.find(pos, name);
    if (!idx) bind_fail("%s: expected token ids (an int64 Tensor or an array of numbers)", name);
    if (at::Tensor * t = tensor_test(a.L, idx)) {
        if (!t->defined()) bind_fail("%s: the tensor was freed", name);
        if (at::isFloatingType(t->scalar_type())) bind_fail("%s: token ids must be integers, got %s", name, c10::toString(t->scalar_type()));
        return t->to(at::kLong);
    }
    if (lua_type(a.L, idx) != LUA_TTABLE) bind_fail("%s: expected token ids, got %s", name, luaL_typename(a.L, idx));
    std::vector<int64_t> v;
    int n = (int)lua_objlen(a.L, idx);
    for (int i = 1; i <= n; i++) {
        lua_rawgeti(a.L, idx, i);
        if (lua_type(a.L, -1) != LUA_TNUMBER) bind_fail("%s: element %d is not a number", name, i);
        v.push_back((int64_t)lua_tonumber(a.L, -1));
        lua_pop(a.L, 1);
    }
    return at::tensor(v, at::kLong);
}

int m_forward(lua_State * L) {
    Args a(L);
    DecoderModel & m = model_check(L, 1);
    at::Tensor ids = ids_arg(a, 2, "input_ids");
    if (ids.dim() == 1) ids = ids.unsqueeze(0);
    at::Tensor * mask = a.opt_tensor(0, "attention_mask");
    at::Tensor * pos = a.opt_tensor(0, "position_ids");
    std::string out = a.opt_string(0, "output", "logits");
    a.finish();
    if (out != "logits" && out != "hidden") bind_fail("option 'output': expected 'logits' or 'hidden', got '%s'", out.c_str());
    tensor_push(L, m.forward(ids, mask ? *mask : at::Tensor(), pos ? *pos : at::Tensor(),
                             out == "hidden" ? ForwardOutput::hidden : ForwardOutput::logits));
    return 1;
}

// model:forward_from(layer, hidden, {output = 'logits'}): decoder layers `layer` (0-based, as in
// the HF names model.layers.<i>) to the end on the hidden states that layer receives (B, T, H).
int m_forward_from(lua_State * L) {
    Args a(L);
    DecoderModel & m = model_check(L, 1);
    int64_t first = a.integer(2, "layer");
    at::Tensor & h = a.tensor(3, "hidden");
    std::string out = a.opt_string(0, "output", "logits");
    a.finish();
    if (out != "logits" && out != "hidden") bind_fail("option 'output': expected 'logits' or 'hidden', got '%s'", out.c_str());
    tensor_push(L, m.forward_from(first, h, out == "hidden" ? ForwardOutput::hidden : ForwardOutput::logits));
    return 1;
}

int m_named_parameters(lua_State * L) {
    DecoderModel & m = model_check(L, 1);
    auto np = m.named_parameters();
    lua_createtable(L, (int)np.size(), 0);
    for (size_t i = 0; i < np.size(); i++) {
        lua_createtable(L, 2, 0);
        lua_pushstring(L, np[i].first.c_str());
        lua_rawseti(L, -2, 1);
        tensor_push(L, np[i].second);
        lua_rawseti(L, -2, 2);
        lua_rawseti(L, -2, (int)i + 1);
    }
    return 1;
}

int m_parameters(lua_State * L) {
    DecoderModel & m = model_check(L, 1);
    auto np = m.named_parameters();
    lua_createtable(L, (int)np.size(), 0);
    for (size_t i = 0; i < np.size(); i++) {
        tensor_push(L, np[i].second);
        lua_rawseti(L, -2, (int)i + 1);
    }
    return 1;
}

int m_state_dict(lua_State * L) {
    DecoderModel & m = model_check(L, 1);
    auto sd = m.state_dict();
    lua_createtable(L, 0, (int)sd.size());
    for (auto & [n, t] : sd) {
        tensor_push(L, t.detach());
        lua_setfield(L, -2, n.c_str());
    }
    return 1;
}

// load_state_dict(tbl, {strict=true}): tbl maps name -> Tensor (or is an array of {name, tensor}).
int m_load_state_dict(lua_State * L) {
    DecoderModel & m = model_check(L, 1);
    if (lua_type(L, 2) != LUA_TTABLE) bind_fail("argument #1 (state_dict): expected a table name -> Tensor");
    bool strict = true;
    if (lua_gettop(L) >= 3) {
        Args a(L, 3);
        strict = a.opt_bool(0, "strict", true);
        a.finish();
    }
    NamedTensors sd;
    lua_pushnil(L);
    while (lua_next(L, 2)) {
        if (lua_type(L, -2) == LUA_TSTRING) {
            at::Tensor * t = tensor_test(L, -1);
            if (!t || !t->defined()) bind_fail("state_dict['%s']: expected a Tensor", lua_tostring(L, -2));
            sd.push_back({lua_tostring(L, -2), *t});
        } else if (lua_type(L, -1) == LUA_TTABLE) {   // {name, tensor} pair
            lua_rawgeti(L, -1, 1);
            lua_rawgeti(L, -2, 2);
            at::Tensor * t = tensor_test(L, -1);
            if (lua_type(L, -2) != LUA_TSTRING || !t || !t->defined())
                bind_fail("state_dict: array entries must be {name, tensor} pairs");
            sd.push_back({lua_tostring(L, -2), *t});
            lua_pop(L, 2);
        } else {
            bind_fail("state_dict: keys must be parameter names");
        }
        lua_pop(L, 1);
    }
    auto [missing, unexpected] = m.load_state_dict(sd, strict, "load_state_dict");
    strings_push(L, missing);
    strings_push(L, unexpected);
    return 2;
}

int m_train(lua_State * L) {
    DecoderModel & m = model_check(L, 1);
    bool on = lua_isnoneornil(L, 2) ? true : lua_toboolean(L, 2);
    m.train(on);
    lua_settop(L, 1);
    return 1;
}

int m_eval(lua_State * L) {
    model_check(L, 1).train(false);
    lua_settop(L, 1);
    return 1;
}

int m_to(lua_State * L) {
    Args a(L);
    DecoderModel & m = model_check(L, 1);
    a.take(1);
    std::optional<c10::Device> dev;
    std::optional<at::ScalarType> dt;
    // positional strings: a device or a dtype name
    for (int p = 2; p <= a.npos(); p++) {
        int idx = a.find(p, nullptr);
        if (!idx) continue;
        if (lua_type(L, idx) != LUA_TSTRING) arg_fail(idx, "expected a device or dtype name, got %s", luaL_typename(L, idx));
        std::string s = lua_tostring(L, idx);
        if (s.rfind("cpu", 0) == 0 || s.rfind("cuda", 0) == 0) dev = device_parse(s.c_str());
        else dt = dtype_parse(s.c_str());
    }
    read_place(a, 0, dev, dt);
    a.finish();
    if (dt && !at::isFloatingType(*dt)) bind_fail("a model needs a floating dtype");
    m.to(dev, dt);
    lua_settop(L, 1);
    return 1;
}

int m_requires_grad(lua_State * L) {
    Args a(L);
    DecoderModel & m = model_check(L, 1);
    bool on = a.opt_bool(2, "requires_grad", true);
    std::string pattern = a.opt_string(3, "pattern", "");
    a.finish();
    int64_t n = 0;
    try {
        n = m.requires_grad(on, pattern);
    } catch (const std::regex_error & e) {
        bind_fail("option 'pattern': bad regular expression '%s': %s", pattern.c_str(), e.what());
    }
    if (!pattern.empty() && n == 0) bind_fail("pattern '%s' matches no parameter name", pattern.c_str());
    lua_settop(L, 1);
    return 1;
}

// m:gradient_checkpointing([on = true | n]): every layer, none, or the first n layers.
int m_gradient_checkpointing(lua_State * L) {
    DecoderModel & m = model_check(L, 1);
    if (lua_type(L, 2) == LUA_TNUMBER) {
        double n = lua_tonumber(L, 2);
        if (!(n >= 0) || n != std::floor(n))
            bind_fail("argument #1: expected true, false or a layer count >= 0, got %g", n);
        m.gradient_checkpointing_layers((int64_t)n);
    } else if (lua_isnoneornil(L, 2) || lua_isboolean(L, 2)) {
        m.gradient_checkpointing(lua_isnoneornil(L, 2) ? true : lua_toboolean(L, 2));
    } else {
        bind_fail("argument #1: expected true, false or a layer count, got %s", luaL_typename(L, 2));
    }
    lua_settop(L, 1);
    return 1;
}

// m:gradient_checkpointing_layers() -> how many layers are checkpointed
int m_gradient_checkpointing_layers(lua_State * L) {
    lua_pushinteger(L, (lua_Integer)model_check(L, 1).gradient_checkpointing_layers());
    return 1;
}

int m_linear_names(lua_State * L) {
    strings_push(L, model_check(L, 1).linear_names());
    return 1;
}

int m_get_linear(lua_State * L) {
    DecoderModel & m = model_check(L, 1);
    Args a(L, 2);
    std::string name = a.string(1, "name");
    a.finish();
    tensor_push(L, m.get_linear(name)->weight());
    return 1;
}

int m_save_pretrained(lua_State * L) {
    Args a(L);
    DecoderModel & m = model_check(L, 1);
    int idx = a.find(2, "dir");
    if (!idx || lua_type(L, idx) != LUA_TSTRING) bind_fail("argument #1 (dir): expected a directory path");
    std::string dir = lua_tostring(L, idx);
    int64_t shard = a.opt_integer(0, "max_shard_bytes", 5LL << 30);
    a.finish();
    if (shard <= 0) bind_fail("option 'max_shard_bytes' must be positive");
    m.save_pretrained(dir, shard);
    return 0;
}

// model:generate{input_ids=, attention_mask=, pad_token_id=0, max_new_tokens=32, temperature=0,
// top_k=0, top_p=1, repetition_penalty=1, stop=, seed=42, num_samples=1, on_token=fn(id, row)}
// input_ids: (P) or (B, P) int64 (attention_mask (B, P): 0 marks left padding), or a Lua array of
// id arrays of different lengths, left-padded here with pad_token_id. Each row generates as its
// prompt alone would. Returns {[r] = the generated ids of row r (prompt b, sample s: r = (b-1)*S+s;
// stop tokens kept, the prompt not repeated), new_tokens = all rows together, tokens_per_second,
// prefill_seconds, decode_seconds}.
int m_generate(lua_State * L) {
    DecoderModel & m = model_check(L, 1);
    if (!is_options_table(L, 2)) bind_fail("expected an options table: model:generate{input_ids = ..., ...}");
    Args a(L, 2);
    GenerateOptions o;
    at::Tensor ids;
    int64_t pad = a.opt_integer(0, "pad_token_id", 0);
    int ii = a.find(0, "input_ids");
    bool ragged = false;
    if (ii && lua_type(L, ii) == LUA_TTABLE) {
        lua_rawgeti(L, ii, 1);
        ragged = lua_type(L, -1) == LUA_TTABLE;
        lua_pop(L, 1);
    }
    if (ragged) {
        // A batch of prompts of different lengths: left-pad to the longest, mask the padding.
        std::vector<std::vector<int64_t>> rows;
        int64_t P = 0;
        for (int b = 1, n = (int)lua_objlen(L, ii); b <= n; b++) {
            lua_rawgeti(L, ii, b);
            if (lua_type(L, -1) != LUA_TTABLE) bind_fail("input_ids[%d]: expected an array of token ids, got %s", b, luaL_typename(L, -1));
            std::vector<int64_t> r;
            for (int i = 1, k = (int)lua_objlen(L, -1); i <= k; i++) {
                lua_rawgeti(L, -1, i);
                if (lua_type(L, -1) != LUA_TNUMBER) bind_fail("input_ids[%d][%d]: expected a token id, got %s", b, i, luaL_typename(L, -1));
                r.push_back((int64_t)lua_tonumber(L, -1));
                lua_pop(L, 1);
            }
            lua_pop(L, 1);
            if (r.empty()) bind_fail("input_ids[%d]: empty prompt", b);
            P = std::max<int64_t>(P, (int64_t)r.size());
            rows.push_back(std::move(r));
        }
        if (a.find(0, "attention_mask")) bind_fail("option 'attention_mask': not allowed with an array of prompts (they are padded here)");
        ids = at::full({(int64_t)rows.size(), P}, pad, at::kLong);
        o.attention_mask = at::zeros({(int64_t)rows.size(), P}, at::kBool);
        for (size_t b = 0; b < rows.size(); b++) {
            int64_t off = P - (int64_t)rows[b].size();
            ids[b].narrow(0, off, (int64_t)rows[b].size()).copy_(at::tensor(rows[b], at::kLong));
            o.attention_mask[b].narrow(0, off, (int64_t)rows[b].size()).fill_(true);
        }
    } else {
        ids = ids_arg(a, 0, "input_ids");
        if (int mi = a.find(0, "attention_mask")) {
            if (at::Tensor * t = tensor_test(L, mi)) {
                if (!t->defined()) bind_fail("attention_mask: the tensor was freed");
                o.attention_mask = *t;
            } else {
                o.attention_mask = ids_arg(a, 0, "attention_mask");
            }
        }
    }
    o.max_new_tokens = a.opt_integer(0, "max_new_tokens", o.max_new_tokens);
    o.temperature = a.opt_number(0, "temperature", o.temperature);
    o.top_k = a.opt_integer(0, "top_k", o.top_k);
    o.top_p = a.opt_number(0, "top_p", o.top_p);
    o.repetition_penalty = a.opt_number(0, "repetition_penalty", o.repetition_penalty);
    o.seed = (uint64_t)a.opt_integer(0, "seed", (int64_t)o.seed);
    o.num_samples = a.opt_integer(0, "num_samples", o.num_samples);
    if (int idx = a.find(0, "stop")) {
        if (lua_type(L, idx) == LUA_TNUMBER) {
            o.stop.push_back((int64_t)lua_tonumber(L, idx));
        } else if (lua_type(L, idx) == LUA_TTABLE) {
            int n = (int)lua_objlen(L, idx);
            for (int i = 1; i <= n; i++) {
                lua_rawgeti(L, idx, i);
                o.stop.push_back((int64_t)lua_tonumber(L, -1));
                lua_pop(L, 1);
            }
        } else {
            bind_fail("option 'stop': expected a token id or an array of ids");
        }
    }
    int cb = a.find(0, "on_token");
    if (cb && lua_type(L, cb) != LUA_TFUNCTION) bind_fail("option 'on_token': expected a function(id, row)");
    a.finish();
    if (cb) {
        // on_token(id, row): row is 1-based; returning false stops generation.
        o.on_token = [L, cb](int64_t row, int64_t tok) {
            lua_pushvalue(L, cb);
            lua_pushnumber(L, (lua_Number)tok);
            lua_pushnumber(L, (lua_Number)(row + 1));
            if (bind_pcall(L, 2, 1) != 0) {
                std::string msg = lua_tostring(L, -1) ? lua_tostring(L, -1) : "error in on_token";
                lua_pop(L, 1);
                throw std::runtime_error("on_token: " + msg);
            }
            bool go = !(lua_type(L, -1) == LUA_TBOOLEAN && !lua_toboolean(L, -1));
            lua_pop(L, 1);
            return go;
        };
    }
    GenerateResult r = m.generate(ids, o);
    lua_createtable(L, (int)r.tokens.size(), 5);
    for (size_t i = 0; i < r.tokens.size(); i++) {
        lua_createtable(L, (int)r.tokens[i].size(), 0);
        for (size_t j = 0; j < r.tokens[i].size(); j++) {
            lua_pushnumber(L, (lua_Number)r.tokens[i][j]);
            lua_rawseti(L, -2, (int)j + 1);
        }
        lua_rawseti(L, -2, (int)i + 1);
    }
    lua_pushnumber(L, (lua_Number)r.new_tokens);
    lua_setfield(L, -2, "new_tokens");
    lua_pushnumber(L, r.tokens_per_second);
    lua_setfield(L, -2, "tokens_per_second");
    lua_pushnumber(L, r.prefill_seconds);
    lua_setfield(L, -2, "prefill_seconds");
    lua_pushnumber(L, r.decode_seconds);
    lua_setfield(L, -2, "decode_seconds");
    return 1;
}

int m_perplexity(lua_State * L) {
    Args a(L);
    DecoderModel & m = model_check(L, 1);
    at::Tensor ids = ids_arg(a, 2, "ids");
    int64_t max_length = a.opt_integer(0, "max_length", 1024);
    int64_t stride = a.opt_integer(0, "stride", 512);
    int64_t bytes = a.opt_integer(0, "bytes", 0);
    a.finish();
    PerplexityResult r = m.perplexity(ids, max_length, stride, bytes);
    lua_createtable(L, 0, 5);
    lua_pushnumber(L, r.ppl);
    lua_setfield(L, -2, "ppl");
    lua_pushnumber(L, r.nll);
    lua_setfield(L, -2, "nll");
    lua_pushnumber(L, (lua_Number)r.tokens);
    lua_setfield(L, -2, "tokens");
    if (bytes > 0) {
        lua_pushnumber(L, r.bits_per_byte);
        lua_setfield(L, -2, "bpb");
    }
    return 1;
}

int m_num_parameters(lua_State * L) {
    int64_t n = 0;
    for (auto & [name, t] : model_check(L, 1).named_parameters()) n += t.numel();
    lua_pushnumber(L, (lua_Number)n);
    return 1;
}

int m_tostring(lua_State * L) {
    auto * u = udata_test<ModelUD>(L, 1, QATLAB_MODEL_MT);
    if (!u || !u->m) {
        lua_pushstring(L, "Model (freed)");
        return 1;
    }
    const auto & c = u->m->config();
    lua_pushfstring(L, "Model(%s, layers=%d, hidden=%d, heads=%d/%d, vocab=%d, %s, %s)", c.model_type.c_str(),
                    (int)c.num_hidden_layers, (int)c.hidden_size, (int)c.num_attention_heads, (int)c.num_key_value_heads,
                    (int)c.vocab_size, u->m->device().str().c_str(), c10::toString(u->m->dtype()));
    return 1;
}

const BindFn model_methods[] = {
    {"forward", m_forward},
    {"forward_from", m_forward_from},
    {"named_parameters", m_named_parameters},
    {"parameters", m_parameters},
    {"state_dict", m_state_dict},
    {"load_state_dict", m_load_state_dict},
    {"train", m_train},
    {"eval", m_eval},
    {"to", m_to},
    {"requires_grad_", m_requires_grad},
    {"gradient_checkpointing", m_gradient_checkpointing},
    {"gradient_checkpointing_layers", m_gradient_checkpointing_layers},
    {"linear_names", m_linear_names},
    {"get_linear", m_get_linear},
    {"save_pretrained", m_save_pretrained},
    {"generate", m_generate},
    {"perplexity", m_perplexity},
    {"num_parameters", m_num_parameters},
    {nullptr, nullptr},
};

// __index: methods, then the config property (a fresh table each time).
int model_index(lua_State * L) {
    if (lua_type(L, 2) == LUA_TSTRING) {
        luaL_getmetatable(L, QATLAB_MODEL_MT);
        lua_getfield(L, -1, "__methods");
        lua_pushvalue(L, 2);
        lua_rawget(L, -2);
        if (!lua_isnil(L, -1)) return 1;
        if (strcmp(lua_tostring(L, 2), "config") == 0) {
            DecoderModel & m = model_check(L, 1);
            json_push(L, json::parse(decoder_config_dump(m.config())));
            return 1;
        }
        if (strcmp(lua_tostring(L, 2), "training") == 0) {
            lua_pushboolean(L, model_check(L, 1).is_training());
            return 1;
        }
    }
    lua_pushnil(L);
    return 1;
}

// model(ids, opts) == model:forward(ids, opts)
int model_call(lua_State * L) {
    return m_forward(L);
}

const BindFn nn_functions[] = {
    {"from_pretrained", nn_from_pretrained},
    {"from_config", nn_from_config},
    {nullptr, nullptr},
};

} // namespace

DecoderModel & nn_model_check(lua_State * L, int idx) {
    return model_check(L, idx);
}

std::shared_ptr<DecoderModel> nn_model_shared(lua_State * L, int idx) {
    ModelUD & u = udata_check<ModelUD>(L, idx, QATLAB_MODEL_MT, "a Model");
    if (!u.m) bind_fail("the model was freed");
    return u.m;
}

void nn_open_lua_methods(lua_State * L, int methods);

int luaopen_nn(lua_State * L) {
    udata_open_metatable<ModelUD>(L, QATLAB_MODEL_MT, "Model", nullptr, m_tostring);
    bind_push_function(L, "Model.__index", model_index);
    lua_setfield(L, -2, "__index");
    bind_push_function(L, "Model:forward", model_call);
    lua_setfield(L, -2, "__call");
    lua_newtable(L);   // methods live in the metatable of this Lua state
    bind_register(L, -1, "Model:", model_methods);
    nn_open_lua_methods(L, lua_gettop(L));
    lua_setfield(L, -2, "__methods");
    lua_pop(L, 1);
    lua_newtable(L);
    bind_register(L, -1, "nn.", nn_functions);
    // nn.Module, nn.Linear, ...: the Lua module toolkit (scripts/nn/*.lua), required on first use.
    static const char * lazy =
        "local t = ...\n"
        "return setmetatable(t, {__index = function(_, k)\n"
        "  if type(k) ~= 'string' or not k:match('^%u[%w_]*$') then return nil end\n"
        "  local ok, m = pcall(require, 'nn.' .. k)\n"
        "  if ok then rawset(t, k, m) return m end\n"
        "  if not tostring(m):find(\"module 'nn.\" .. k .. \"' not found\", 1, true) then error(m, 2) end\n"
        "end})\n";
    if (luaL_loadbuffer(L, lazy, strlen(lazy), "=nn") != 0) return lua_error(L);
    lua_insert(L, -2);
    lua_call(L, 1, 1);
    return 1;
}

} // namespace qatlab
