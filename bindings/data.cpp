// data: the `data` Lua module over lib/data: text, JSONL and alpaca readers, the seed's packing,
// seeded shuffles and splits, parameter-golf token shards and the KJV corpus.
#include "bindings/bind.h"

#include "lib/data.h"
#include "lib/tokenizer.h"

#include <ATen/ATen.h>
#include <fstream>
#include <sstream>

namespace qatlab {
namespace {

// A string or an array of strings.
std::vector<std::string> strings_arg(lua_State * L, int idx, const char * name) {
    std::vector<std::string> out;
    if (lua_type(L, idx) == LUA_TSTRING) {
        size_t n;
        const char * s = lua_tolstring(L, idx, &n);
        out.emplace_back(s, n);
        return out;
    }
    if (lua_type(L, idx) != LUA_TTABLE) bind_fail("%s: expected a string or a table of strings, got %s", name, luaL_typename(L, idx));
    size_t n = lua_objlen(L, idx);
    out.reserve(n);
    for (size_t i = 1; i <= n; i++) {
        lua_rawgeti(L, idx, int(i));
        if (lua_type(L, -1) != LUA_TSTRING) bind_fail("%s[%zu]: expected a string, got %s", name, i, luaL_typename(L, -1));
        size_t len;
        const char * s = lua_tolstring(L, -1, &len);
        out.emplace_back(s, len);
        lua_pop(L, 1);
    }
    return out;
}

uint64_t seed_arg(Args & a, int pos) {
    int64_t s = a.opt_integer(pos, "seed", 0);
    if (s < 0) a.fail(pos, "seed", "expected an integer >= 0, got %lld", (long long)s);
    return uint64_t(s);
}

// data.read_text(path_or_dir) -> {text, ...}
int f_read_text(lua_State * L) {
    Args a(L);
    std::string p = a.string(1, "path");
    a.finish();
    strings_push(L, data_read_text(p));
    return 1;
}

// data.read_jsonl(path, {field='text'}) -> {text, ...}
int f_read_jsonl(lua_State * L) {
    Args a(L);
    std::string p = a.string(1, "path");
    std::string field = a.opt_string(2, "field", "text");
    a.finish();
    strings_push(L, data_read_jsonl(p, field));
    return 1;
}

// data.read_alpaca(path, {thinking='false'}) -> {text, ...} (Qwen3 chat format, docs/formulas.md §10 modes)
int f_read_alpaca(lua_State * L) {
    Args a(L);
    std::string p = a.string(1, "path");
    std::string thinking = a.opt_string(2, "thinking", "false");
    a.finish();
    strings_push(L, data_read_alpaca(p, thinking));
    return 1;
}

// data.alpaca_render({instruction=, input=, output=}, {thinking=}) -> {text, ...}
int f_alpaca_render(lua_State * L) {
    // The example has string keys like options: it is read by slot, the options after it.
    if (lua_type(L, 1) != LUA_TTABLE) bind_fail("argument #1 (example): expected a table {instruction, input, output}, got %s", luaL_typename(L, 1));
    AlpacaExample ex;
    auto field = [&](const char * k, std::string & out, bool required) {
        lua_getfield(L, 1, k);
        if (lua_type(L, -1) == LUA_TSTRING) out = lua_tostring(L, -1);
        else if (required || !lua_isnil(L, -1)) bind_fail("argument #1 (example): field '%s': expected a string, got %s", k, luaL_typename(L, -1));
        lua_pop(L, 1);
    };
    field("instruction", ex.instruction, true);
    field("input", ex.input, false);
    field("output", ex.output, true);
    Args a(L, 2);
    std::string thinking = a.opt_string(0, "thinking", "false");
    a.finish();
    strings_push(L, data_alpaca_render(ex, thinking));
    return 1;
}

// data.kjv_path({cache_dir='.cache/corpora'}) -> path; data.kjv_text(...) -> the text
int f_kjv_path(lua_State * L) {
    Args a(L);
    std::string dir = a.opt_string(1, "cache_dir", ".cache/corpora");
    a.finish();
    std::string p = data_kjv_path(dir);
    lua_pushlstring(L, p.data(), p.size());
    return 1;
}

int f_kjv_text(lua_State * L) {
    Args a(L);
    std::string dir = a.opt_string(1, "cache_dir", ".cache/corpora");
    a.finish();
    std::string text = data_read_text(data_kjv_path(dir))[0];
    lua_pushlstring(L, text.data(), text.size());
    return 1;
}

// data.pack(tokenizer, texts, {L=, eos=}) -> int64 (N, L)
int f_pack(lua_State * L) {
    Tokenizer & tk = tokenizer_check(L, 1);
    Args a(L, 2);
    int ti = a.find(1, "texts", true);
    if (!ti) a.fail(1, "texts", "expected a string or a table of strings, got nothing");
    std::vector<std::string> texts = strings_arg(L, ti, "texts");
    int64_t len = a.integer(0, "L");
    int64_t eos = a.opt_integer(0, "eos", -1);
    a.finish();
    tensor_push(L, data_pack(tk, texts, len, eos));
    return 1;
}

// data.split(t, {fraction=0.1, seed=0}) -> train, held_out
int f_split(lua_State * L) {
    Args a(L);
    at::Tensor t = a.tensor(1, "t");
    double fraction = a.opt_number(2, "fraction", 0.1);
    uint64_t seed = seed_arg(a, 0);
    a.finish();
    auto [train, held] = data_split(t, fraction, seed);
    tensor_push(L, train);
    tensor_push(L, held);
    return 2;
}

// data.shuffle(t, {seed=0}) -> rows of t in a seeded order (std::mt19937_64 Fisher-Yates)
int f_shuffle(lua_State * L) {
    Args a(L);
    at::Tensor t = a.tensor(1, "t");
    uint64_t seed = seed_arg(a, 2);
    a.finish();
    tensor_push(L, data_shuffle(t, seed));
    return 1;
}

// data.permutation(n, {seed=0}) -> int64 (n), 0-based
int f_permutation(lua_State * L) {
    Args a(L);
    int64_t n = a.integer(1, "n");
    uint64_t seed = seed_arg(a, 2);
    a.finish();
    if (n < 0) a.fail(1, "n", "expected >= 0, got %lld", (long long)n);
    tensor_push(L, at::tensor(data_permutation(n, seed), at::kLong));
    return 1;
}

// data.write_shard(path, ids) / data.read_shard(path) -> int64 (count)
int f_write_shard(lua_State * L) {
    Args a(L);
    std::string p = a.string(1, "path");
    at::Tensor t = a.tensor(2, "tokens");
    a.finish();
    data_shard_write(p, t);
    return 0;
}

int f_read_shard(lua_State * L) {
    Args a(L);
    std::string p = a.string(1, "path");
    a.finish();
    tensor_push(L, data_shard_read(p));
    return 1;
}

const BindFn functions[] = {
    {"read_text", f_read_text},
    {"read_jsonl", f_read_jsonl},
    {"read_alpaca", f_read_alpaca},
    {"alpaca_render", f_alpaca_render},
    {"kjv_path", f_kjv_path},
    {"kjv_text", f_kjv_text},
    {"pack", f_pack},
    {"split", f_split},
    {"shuffle", f_shuffle},
    {"permutation", f_permutation},
    {"write_shard", f_write_shard},
    {"read_shard", f_read_shard},
    {nullptr, nullptr},
};

} // namespace

int luaopen_data(lua_State * L) {
    // Returned tensors need the Tensor methods, which loading torch installs.
    lua_getglobal(L, "require");
    lua_pushliteral(L, "torch");
    lua_call(L, 1, 0);
    lua_newtable(L);
    bind_register(L, -1, "data.", functions);
    return 1;
}

} // namespace qatlab
