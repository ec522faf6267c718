// tokenizers: the `tokenizers` Lua module over lib/tokenizer: Hugging Face / GPT-2 byte-level
// BPE and SentencePiece tokenizers as userdata, SentencePiece training, chat templates.
#include "bindings/bind.h"

#include "lib/gguf.h"
#include "lib/tokenizer.h"

#include <ATen/ATen.h>
#include <cmath>
#include <cstring>
#include <memory>

namespace qatlab {
namespace {


struct TokenizerUd {
    std::shared_ptr<Tokenizer> tk;
    std::string source;                     // the path it was loaded from ("" when built otherwise)
    std::optional<std::pair<std::string, std::string>> chat_template;   // {text, where it was found}
};

void tokenizer_push(lua_State * L, std::shared_ptr<Tokenizer> tk, std::string source = "",
                    std::optional<std::pair<std::string, std::string>> tpl = std::nullopt) {
    udata_new<TokenizerUd>(L, QATLAB_TOKENIZER_MT, std::move(tk), std::move(source), std::move(tpl));
}

TokenizerUd & self_ud(lua_State * L) {
    return udata_check<TokenizerUd>(L, 1, QATLAB_TOKENIZER_MT, "a Tokenizer");
}

Tokenizer & self_check(lua_State * L) {
    return *self_ud(L).tk;
}

int64_t id_value(lua_State * L, int idx, int i) {
    if (lua_type(L, idx) != LUA_TNUMBER) bind_fail("ids[%d]: expected an integer id, got %s", i, luaL_typename(L, idx));
    double v = lua_tonumber(L, idx);
    if (std::floor(v) != v || std::fabs(v) >= 9.2e18) bind_fail("ids[%d]: expected an integer id, got %g", i, v);
    return int64_t(v);
}

void push_ids(lua_State * L, const std::vector<int64_t> & ids) {
    lua_createtable(L, int(ids.size()), 0);
    for (size_t i = 0; i < ids.size(); i++) {
        lua_pushnumber(L, lua_Number(ids[i]));
        lua_rawseti(L, -2, int(i) + 1);
    }
}

// -- methods ---------------------------------------------------------------------------------

// tk:encode(text, {add_special_tokens=false, return_tensor=false}) → ids (0-based) or an
// int64 Tensor; a table of texts gives a table of id lists.
int m_encode(lua_State * L) {
    Args a(L);
    Tokenizer & tk = self_check(L);
    bool special = a.opt_bool(0, "add_special_tokens", false);
    bool tensor = a.opt_bool(0, "return_tensor", false);
    int idx = a.find(2, "text", true);
    a.finish();
    if (idx && lua_type(L, idx) == LUA_TTABLE) {
        if (tensor) bind_fail("return_tensor: a batch of texts gives ragged ids; encode texts one by one");
        int n = int(lua_objlen(L, idx));
        lua_createtable(L, n, 0);
        for (int i = 1; i <= n; i++) {
            lua_rawgeti(L, idx, i);
            if (lua_type(L, -1) != LUA_TSTRING) bind_fail("text[%d]: expected a string, got %s", i, luaL_typename(L, -1));
            size_t len;
            const char * s = lua_tolstring(L, -1, &len);
            std::vector<int64_t> ids = tk.encode(std::string(s, len), special);
            lua_pop(L, 1);
            push_ids(L, ids);
            lua_rawseti(L, -2, i);
        }
        return 1;
    }
    std::vector<int64_t> ids = tk.encode(a.string(2, "text"), special);
    if (tensor) {
        at::Tensor t = at::empty({int64_t(ids.size())}, at::kLong);
        if (!ids.empty()) std::memcpy(t.data_ptr<int64_t>(), ids.data(), ids.size() * sizeof(int64_t));
        tensor_push(L, std::move(t));
    } else
        push_ids(L, ids);
    return 1;
}

// tk:decode(ids or Tensor, {skip_special_tokens=false}) → string
int m_decode(lua_State * L) {
    Args a(L);
    Tokenizer & tk = self_check(L);
    bool skip = a.opt_bool(0, "skip_special_tokens", false);
    int idx = a.find(2, "ids", true);
    a.finish();
    std::vector<int64_t> ids;
    if (!idx) bind_fail("argument #2 (ids): expected a table of ids or a Tensor, got nothing");
    if (at::Tensor * t = tensor_test(L, idx)) {
        if (!t->defined()) bind_fail("argument #2 (ids): the tensor was freed");
        if (t->dim() > 1) bind_fail("argument #2 (ids): expected a 0-dim or 1-dim tensor, got %lld dims", (long long)t->dim());
        if (at::isFloatingType(t->scalar_type()) || t->scalar_type() == at::kBool)
            bind_fail("argument #2 (ids): expected an integer tensor, got %s", c10::toString(t->scalar_type()));
        at::Tensor c = t->reshape({-1}).to(at::kCPU, at::kLong).contiguous();
        const int64_t * p = c.data_ptr<int64_t>();
        ids.assign(p, p + c.numel());
    } else if (lua_type(L, idx) == LUA_TTABLE) {
        int n = int(lua_objlen(L, idx));
        ids.reserve(n);
        for (int i = 1; i <= n; i++) {
            lua_rawgeti(L, idx, i);
            ids.push_back(id_value(L, -1, i));
            lua_pop(L, 1);
        }
    } else
        bind_fail("argument #2 (ids): expected a table of ids or a Tensor, got %s", luaL_typename(L, idx));
    std::string s = tk.decode(ids, skip);
    lua_pushlstring(L, s.data(), s.size());
    return 1;
}

int m_vocab_size(lua_State * L) {
    lua_pushnumber(L, lua_Number(self_check(L).vocab_size()));
    return 1;
}

// tk:token_to_id(s) → id or nil
int m_token_to_id(lua_State * L) {
    Args a(L);
    Tokenizer & tk = self_check(L);
    std::string s = a.string(2, "token");
    a.finish();
    int64_t id = tk.token_to_id(s);
    if (id < 0) lua_pushnil(L);
    else lua_pushnumber(L, lua_Number(id));
    return 1;
}

int m_id_to_token(lua_State * L) {
    Args a(L);
    Tokenizer & tk = self_check(L);
    int64_t id = a.integer(2, "id");
    a.finish();
    std::string s = tk.id_to_token(id);
    lua_pushlstring(L, s.data(), s.size());
    return 1;
}

// tk:token_bytes(id) → the raw bytes a token stands for (for bits-per-byte accounting)
int m_token_bytes(lua_State * L) {
    Args a(L);
    Tokenizer & tk = self_check(L);
    int64_t id = a.integer(2, "id");
    a.finish();
    std::string s = tk.token_bytes(id);
    lua_pushlstring(L, s.data(), s.size());
    return 1;
}

int m_is_special(lua_State * L) {
    Args a(L);
    Tokenizer & tk = self_check(L);
    int64_t id = a.integer(2, "id");
    a.finish();
    lua_pushboolean(L, tk.is_special(id));
    return 1;
}

std::string field_string(lua_State * L, int tbl, const char * key, int i, bool required) {
    lua_getfield(L, tbl, key);
    int t = lua_type(L, -1);
    std::string s;
    if (t == LUA_TSTRING) {
        size_t n;
        const char * p = lua_tolstring(L, -1, &n);
        s.assign(p, n);
    } else if (t != LUA_TNIL || required)
        bind_fail("messages[%d].%s: expected a string, got %s", i, key, luaL_typename(L, -1));
    lua_pop(L, 1);
    return s;
}

std::vector<ChatMessage> messages_arg(lua_State * L, int idx) {
    if (!idx || lua_type(L, idx) != LUA_TTABLE)
        bind_fail("argument (messages): expected a table of {role=, content=}, got %s", idx ? luaL_typename(L, idx) : "nothing");
    std::vector<ChatMessage> msgs;
    int n = int(lua_objlen(L, idx));
    for (int i = 1; i <= n; i++) {
        lua_rawgeti(L, idx, i);
        int m = lua_gettop(L);
        if (lua_type(L, m) != LUA_TTABLE) bind_fail("messages[%d]: expected a table {role=, content=}, got %s", i, luaL_typename(L, m));
        ChatMessage cm;
        cm.role = field_string(L, m, "role", i, true);
        cm.content = field_string(L, m, "content", i, true);
        lua_getfield(L, m, "reasoning_content");
        bool has_reasoning = !lua_isnil(L, -1);
        lua_pop(L, 1);
        if (has_reasoning) cm.reasoning_content = field_string(L, m, "reasoning_content", i, true);
        lua_pop(L, 1);
        msgs.push_back(std::move(cm));
    }
    return msgs;
}

void chat_options(Args & a, ChatFormatOptions & o) {
    o.add_generation_prompt = a.opt_bool(0, "add_generation_prompt", false);
    o.enable_thinking = a.opt_bool(0, "enable_thinking", false);
    o.strip_think = a.opt_bool(0, "strip_think", true);
}

// tk:apply_chat_template(messages, {add_generation_prompt=false, enable_thinking=false,
// strip_think=true, tokenize=false}) → the text the model's own template renders (ids when
// tokenize), from the template found when the tokenizer was loaded (GGUF tokenizer.chat_template,
// chat_template.jinja or tokenizer_config.json). Llama-3's bos is the tokenizer's own bos token.
int m_apply_chat_template(lua_State * L) {
    Args a(L);
    TokenizerUd & ud = self_ud(L);
    ChatFormatOptions o;
    chat_options(a, o);
    bool tokenize = a.opt_bool(0, "tokenize", false);
    int idx = a.find(2, "messages");
    a.finish();
    std::vector<ChatMessage> msgs = messages_arg(L, idx);
    if (!ud.chat_template)
        bind_fail("%s: the tokenizer has no chat template (looked for GGUF tokenizer.chat_template, chat_template.jinja, "
                  "tokenizer_config.json chat_template); use tokenizers.chat_format(messages, {template = ...}) with one of: %s",
                  ud.source.empty() ? "this tokenizer" : ud.source.c_str(), chat_template_families());
    ChatTemplate t = chat_template_parse(ud.chat_template->first, ud.chat_template->second);
    if (ud.tk->bos_token_id() >= 0) t.bos_token = ud.tk->id_to_token(ud.tk->bos_token_id());
    std::string s = chat_template_render(t, msgs, o);
    if (tokenize) push_ids(L, ud.tk->encode(s, false));
    else lua_pushlstring(L, s.data(), s.size());
    return 1;
}

const BindFn methods[] = {
    {"encode", m_encode},           {"decode", m_decode},           {"vocab_size", m_vocab_size},
    {"token_to_id", m_token_to_id}, {"id_to_token", m_id_to_token}, {"token_bytes", m_token_bytes},
    {"is_special", m_is_special},   {"apply_chat_template", m_apply_chat_template},
    {nullptr, nullptr},
};

// __index: methods first, then the read-only fields (special ids are nil when absent).
int tk_index(lua_State * L) {
    lua_pushvalue(L, 2);
    lua_rawget(L, lua_upvalueindex(1));
    if (!lua_isnil(L, -1)) return 1;
    lua_pop(L, 1);
    auto * ud = udata_test<TokenizerUd>(L, 1, QATLAB_TOKENIZER_MT);
    const char * k = lua_tostring(L, 2);
    if (!ud || !ud->tk || !k) return 0;
    const Tokenizer & tk = *ud->tk;
    int64_t id = -2;
    if (!strcmp(k, "eos_token_id")) id = tk.eos_token_id();
    else if (!strcmp(k, "bos_token_id")) id = tk.bos_token_id();
    else if (!strcmp(k, "pad_token_id")) id = tk.pad_token_id();
    else if (!strcmp(k, "unk_token_id")) id = tk.unk_token_id();
    else if (!strcmp(k, "kind")) {
        lua_pushstring(L, tk.kind());
        return 1;
    } else if (!strcmp(k, "source")) {
        if (ud->source.empty()) return 0;
        lua_pushlstring(L, ud->source.data(), ud->source.size());
        return 1;
    } else if (!strcmp(k, "chat_template") || !strcmp(k, "chat_template_source")) {
        if (!ud->chat_template) return 0;
        const std::string & v = strcmp(k, "chat_template") ? ud->chat_template->second : ud->chat_template->first;
        lua_pushlstring(L, v.data(), v.size());
        return 1;
    }
    if (id == -2 || id == -1) return 0;
    lua_pushnumber(L, lua_Number(id));
    return 1;
}

int tk_tostring(lua_State * L) {
    auto * ud = udata_test<TokenizerUd>(L, 1, QATLAB_TOKENIZER_MT);
    if (!ud || !ud->tk) lua_pushliteral(L, "Tokenizer(collected)");
    else lua_pushfstring(L, "Tokenizer(%s, vocab %d)", ud->tk->kind(), int(ud->tk->vocab_size()));
    return 1;
}

// -- module functions --------------------------------------------------------------------------

// tokenizers.from_file(path): tokenizer.json, a directory holding it, or a SentencePiece .model
int f_from_file(lua_State * L) {
    Args a(L);
    std::string path = a.string(1, "path");
    a.finish();
    std::shared_ptr<Tokenizer> tk(tokenizer_load(path));
    tokenizer_push(L, std::move(tk), path, chat_template_find(path));
    return 1;
}

// tokenizers.from_gguf(path): the tokenizer stored in a GGUF model file's metadata
int f_from_gguf(lua_State * L) {
    Args a(L);
    std::string path = a.string(1, "path");
    a.finish();
    GgufFile f = gguf_open(path);
    std::shared_ptr<Tokenizer> tk(gguf_tokenizer(f, path));
    std::optional<std::pair<std::string, std::string>> tpl;
    if (gguf_has(f, "tokenizer.chat_template"))
        tpl = std::make_pair(gguf_get_string(f, "tokenizer.chat_template"), path + ": tokenizer.chat_template");
    tokenizer_push(L, std::move(tk), path, std::move(tpl));
    return 1;
}

// tokenizers.gpt2(encoder_json, vocab_bpe)
int f_gpt2(lua_State * L) {
    Args a(L);
    std::string enc = a.string(1, "encoder_json"), bpe = a.string(2, "vocab_bpe");
    a.finish();
    tokenizer_push(L, std::shared_ptr<Tokenizer>(BpeTokenizer::from_gpt2_files(enc, bpe)), enc);
    return 1;
}

int f_sentencepiece(lua_State * L) {
    Args a(L);
    std::string path = a.string(1, "model_path");
    a.finish();
    tokenizer_push(L, std::shared_ptr<Tokenizer>(SentencePieceTokenizer::from_file(path)), path, chat_template_find(path));
    return 1;
}

// tokenizers.train_sentencepiece{input=, model_prefix=, vocab_size=, model_type='bpe',
// preset='golf', <any spm_train flag>=...} → the .model path
int f_train_sentencepiece(lua_State * L) {
    if (lua_type(L, 1) != LUA_TTABLE || lua_gettop(L) != 1)
        bind_fail("expected one table {input=, model_prefix=, vocab_size=, ...}, got %s", luaL_typename(L, 1));
    SentencePieceTrainOptions o;
    bool has_vocab = false;
    std::string preset;
    lua_pushnil(L);
    while (lua_next(L, 1)) {
        if (lua_type(L, -2) != LUA_TSTRING) bind_fail("options: expected string keys, got a %s key", luaL_typename(L, -2));
        std::string k = lua_tostring(L, -2), v;
        int t = lua_type(L, -1);
        if (t == LUA_TSTRING) v = lua_tostring(L, -1);
        else if (t == LUA_TBOOLEAN) v = lua_toboolean(L, -1) ? "true" : "false";
        else if (t == LUA_TNUMBER) {
            double d = lua_tonumber(L, -1);
            char buf[64];
            if (std::floor(d) == d && std::fabs(d) < 1e15) snprintf(buf, sizeof buf, "%lld", (long long)d);
            else snprintf(buf, sizeof buf, "%.17g", d);
            v = buf;
        } else
            bind_fail("option '%s': expected a string, number or boolean, got %s", k.c_str(), luaL_typename(L, -1));
        lua_pop(L, 1);
        if (k == "input") o.input = v;
        else if (k == "model_prefix") o.model_prefix = v;
        else if (k == "model_type") o.model_type = v;
        else if (k == "preset") preset = v;
        else if (k == "vocab_size") {
            if (t != LUA_TNUMBER) bind_fail("option 'vocab_size': expected a number, got %s", v.c_str());
            o.vocab_size = std::stoll(v);
            has_vocab = true;
        } else
            o.extra[k] = v;  // SentencePiece checks the flag names itself
    }
    if (o.input.empty()) bind_fail("option 'input' (a text file) is required");
    if (o.model_prefix.empty()) bind_fail("option 'model_prefix' is required");
    if (!has_vocab) bind_fail("option 'vocab_size' is required");
    if (!preset.empty()) {
        if (preset != "golf") bind_fail("option 'preset': expected 'golf', got '%s'", preset.c_str());
        auto golf = sentencepiece_golf_options();
        for (auto & kv : golf)
            if (!o.extra.count(kv.first) && kv.first != "model_type") o.extra[kv.first] = kv.second;
    }
    std::string model = sentencepiece_train(o);
    lua_pushlstring(L, model.data(), model.size());
    return 1;
}

// tokenizers.chat_format(messages, {template='qwen3', add_generation_prompt=false,
// enable_thinking=false, strip_think=true, bos_token='<|begin_of_text|>'}) → the chat text.
// template: a family name ('qwen3' as the seed's cache builder renders it, 'chatml', 'llama3')
// or a Jinja template text whose family is recognised.
int f_chat_format(lua_State * L) {
    Args a(L);
    ChatFormatOptions o;
    chat_options(a, o);
    std::string tpl = a.opt_string(0, "template", "qwen3");
    std::string bos = a.opt_string(0, "bos_token", "");
    int idx = a.find(1, "messages");
    a.finish();
    std::vector<ChatMessage> msgs = messages_arg(L, idx);
    ChatTemplate t = chat_template_named(tpl);
    if (!bos.empty()) t.bos_token = bos;
    std::string s = chat_template_render(t, msgs, o);
    lua_pushlstring(L, s.data(), s.size());
    return 1;
}

// tokenizers.chat_family(template_text) → 'qwen3' | 'chatml' | 'llama3', or nil and the reason
int f_chat_family(lua_State * L) {
    Args a(L);
    std::string text = a.string(1, "template");
    a.finish();
    try {
        lua_pushstring(L, chat_template_parse(text, "template text").family.c_str());
        return 1;
    } catch (const std::runtime_error & e) {
        lua_pushnil(L);
        lua_pushstring(L, e.what());
        return 2;
    }
}

const BindFn functions[] = {
    {"from_file", f_from_file},
    {"gpt2", f_gpt2},
    {"from_gguf", f_from_gguf},
    {"sentencepiece", f_sentencepiece},
    {"train_sentencepiece", f_train_sentencepiece},
    {"chat_format", f_chat_format},
    {"chat_family", f_chat_family},
    {nullptr, nullptr},
};

} // namespace

// The tokenizer held by the Tokenizer userdata at `idx` (declared in bind.h, used by `data`).
Tokenizer & tokenizer_check(lua_State * L, int idx) {
    auto * ud = static_cast<Udata<TokenizerUd> *>(luaL_testudata(L, idx, QATLAB_TOKENIZER_MT));
    if (idx > bind_call_nargs()) {   // a value read out of an options table: the caller labels it
        if (!ud) bind_fail("expected a Tokenizer, got %s", luaL_typename(L, idx));
        if (!ud->alive) bind_fail("the tokenizer was freed");
    }
    if (!ud) arg_fail(idx, "expected a Tokenizer, got %s", luaL_typename(L, idx));
    if (!ud->alive) arg_fail(idx, "the tokenizer was freed");
    return *ud->value.tk;
}

// The path a Tokenizer userdata was loaded from, "" when unknown (for KD cache meta).
std::string tokenizer_source(lua_State * L, int idx) {
    auto * ud = udata_test<TokenizerUd>(L, idx, QATLAB_TOKENIZER_MT);
    return ud ? ud->source : std::string();
}

int luaopen_tokenizers(lua_State * L) {
    // Tensors returned by encode need the Tensor methods, which loading torch installs.
    lua_getglobal(L, "require");
    lua_pushliteral(L, "torch");
    lua_call(L, 1, 0);
    udata_open_metatable<TokenizerUd>(L, QATLAB_TOKENIZER_MT, "Tokenizer", nullptr, tk_tostring);
    lua_newtable(L);
    bind_register(L, -1, "Tokenizer.", methods);
    lua_pushcclosure(L, tk_index, 1);
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);
    lua_newtable(L);
    bind_register(L, -1, "tokenizers.", functions);
    return 1;
}

} // namespace qatlab
