// tokenizer_load: builds the byte-level BPE from a Hugging Face tokenizer.json (+ its
// tokenizer_config.json), OpenAI's GPT-2 files, or GGUF-style vocab lists.
#include "lib/tokenizer_bpe.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace qatlab {

using namespace bpe_detail;

namespace {

json json_read(const std::string & path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) throw std::runtime_error(path + ": cannot open (" + std::strerror(errno) + ")");
    std::stringstream ss;
    ss << f.rdbuf();
    try {
        return json::parse(ss.str());  // from memory: several times faster than from the stream
    } catch (const json::exception & e) {
        throw std::runtime_error(path + ": not valid JSON: " + e.what());
    }
}

std::string type_name(const json & j) { return j.is_null() ? "null" : std::string(j.type_name()); }

const json & member(const json & j, const char * k, const std::string & file, const std::string & where) {
    if (!j.is_object()) fail(file, where, "expected an object, found " + type_name(j));
    auto it = j.find(k);
    if (it == j.end()) fail(file, where + "." + k, "missing");
    return *it;
}

std::string str_of(const json & j, const std::string & file, const std::string & key) {
    if (!j.is_string()) fail(file, key, "expected a string, found " + type_name(j));
    return j.get<std::string>();
}

// A member that must be an array (what loops index into).
const json & array_of(const json & j, const char * k, const std::string & file, const std::string & where) {
    const json & a = member(j, k, file, where);
    if (!a.is_array()) fail(file, where + "." + k, "expected an array, found " + type_name(a));
    return a;
}

bool bool_or(const json & j, const char * k, bool def) {
    auto it = j.find(k);
    return it == j.end() || !it->is_boolean() ? def : it->get<bool>();
}

void norm_parse(const json & j, const std::string & file, const std::string & key, std::vector<NormForm> & out) {
    if (j.is_null()) return;
    std::string t = str_of(member(j, "type", file, key), file, key + ".type");
    if (t == "NFC") out.push_back(NormForm::NFC);
    else if (t == "NFD") out.push_back(NormForm::NFD);
    else if (t == "NFKC") out.push_back(NormForm::NFKC);
    else if (t == "NFKD") out.push_back(NormForm::NFKD);
    else if (t == "Sequence") {
        const json & list = array_of(j, "normalizers", file, key);
        for (size_t i = 0; i < list.size(); i++)
            norm_parse(list[i], file, key + ".normalizers[" + std::to_string(i) + "]", out);
    } else
        fail(file, key + ".type", "expected NFC, NFD, NFKC, NFKD or Sequence, found '" + t + "'");
}

Behavior behavior_parse(const std::string & s, const std::string & file, const std::string & key) {
    if (s == "Isolated") return Behavior::Isolated;
    if (s == "Removed") return Behavior::Removed;
    if (s == "MergedWithPrevious") return Behavior::MergedWithPrevious;
    if (s == "MergedWithNext") return Behavior::MergedWithNext;
    if (s == "Contiguous") return Behavior::Contiguous;
    fail(file, key, "expected Isolated, Removed, MergedWithPrevious, MergedWithNext or Contiguous, found '" + s + "'");
}

void byte_level_steps(bool add_prefix_space, bool use_regex, const std::string & file, std::vector<PreStep> & out) {
    if (add_prefix_space) {
        PreStep st;
        st.prefix_space = true;
        out.push_back(st);
    }
    if (use_regex) {
        PreStep st;
        st.re = std::make_shared<Regex>(kGpt2Regex, false, file, "ByteLevel");
        out.push_back(st);
    }
}

void pre_parse(const json & j, const std::string & file, const std::string & key, std::vector<PreStep> & out,
               bool & byte_level) {
    if (j.is_null()) return;
    std::string t = str_of(member(j, "type", file, key), file, key + ".type");
    if (t == "Sequence") {
        const json & list = array_of(j, "pretokenizers", file, key);
        for (size_t i = 0; i < list.size(); i++)
            pre_parse(list[i], file, key + ".pretokenizers[" + std::to_string(i) + "]", out, byte_level);
    } else if (t == "Split") {
        const json & pat = member(j, "pattern", file, key);
        PreStep st;
        if (!pat.is_object()) fail(file, key + ".pattern", "expected {\"Regex\": ...} or {\"String\": ...}, found " + pat.dump());
        if (pat.contains("Regex"))
            st.re = std::make_shared<Regex>(str_of(pat["Regex"], file, key + ".pattern.Regex"), false, file,
                                            key + ".pattern.Regex");
        else if (pat.contains("String"))
            st.re = std::make_shared<Regex>(str_of(pat["String"], file, key + ".pattern.String"), true, file,
                                            key + ".pattern.String");
        else
            fail(file, key + ".pattern", "expected {\"Regex\": ...} or {\"String\": ...}, found " + pat.dump());
        st.behavior = behavior_parse(str_of(member(j, "behavior", file, key), file, key + ".behavior"), file,
                                     key + ".behavior");
        st.invert = bool_or(j, "invert", false);
        out.push_back(st);
    } else if (t == "ByteLevel") {
        byte_level = true;
        byte_level_steps(bool_or(j, "add_prefix_space", false), bool_or(j, "use_regex", true), file, out);
    } else if (t == "Digits") {
        PreStep st;
        bool individual = bool_or(j, "individual_digits", false);
        st.re = std::make_shared<Regex>(individual ? "\\p{N}" : "\\p{N}+", false, file, key);
        out.push_back(st);
    } else
        fail(file, key + ".type", "expected Sequence, Split, ByteLevel or Digits (byte-level BPE), found '" + t + "'");
}

// Special-token ids a post-processor adds around the sequence.
void post_parse(const json & j, BpeTokenizer::Impl & m, const std::string & file, const std::string & key,
                bool & templated) {
    if (j.is_null()) return;
    std::string t = str_of(member(j, "type", file, key), file, key + ".type");
    auto id_of = [&](const json & v, const std::string & k) -> int64_t {
        if (v.is_array() && v.size() == 2 && v[1].is_number_integer()) return v[1].get<int64_t>();
        fail(file, k, "expected [token, id], found " + v.dump());
    };
    if (t == "ByteLevel") return;
    if (t == "Sequence") {
        const json & list = array_of(j, "processors", file, key);
        for (size_t i = 0; i < list.size(); i++)
            post_parse(list[i], m, file, key + ".processors[" + std::to_string(i) + "]", templated);
    } else if (t == "TemplateProcessing") {
        const json & single = array_of(j, "single", file, key);
        const json & specials = member(j, "special_tokens", file, key);
        m.prefix_ids.clear();
        m.suffix_ids.clear();
        bool seen_seq = false;
        for (size_t i = 0; i < single.size(); i++) {
            const json & piece = single[i];
            if (piece.contains("Sequence")) {
                seen_seq = true;
                continue;
            }
            std::string name = str_of(member(member(piece, "SpecialToken", file, key + ".single"), "id", file,
                                             key + ".single"), file, key + ".single");
            const json & sp = member(specials, name.c_str(), file, key + ".special_tokens");
            for (const json & id : array_of(sp, "ids", file, key + ".special_tokens." + name)) {
                if (!id.is_number_integer())
                    fail(file, key + ".special_tokens." + name + ".ids", "expected integer ids, found " + id.dump());
                (seen_seq ? m.suffix_ids : m.prefix_ids).push_back(id.get<int64_t>());
            }
        }
        templated = true;
    } else if (t == "RobertaProcessing" || t == "BertProcessing") {
        m.prefix_ids = {id_of(member(j, "cls", file, key), key + ".cls")};
        m.suffix_ids = {id_of(member(j, "sep", file, key), key + ".sep")};
        templated = true;
    } else
        fail(file, key + ".type",
             "expected ByteLevel, TemplateProcessing, RobertaProcessing, BertProcessing or Sequence, found '" + t + "'");
}

// bos_token and friends in tokenizer_config.json: a string, {"content": ...} or null.
int64_t config_token(const json & cfg, const char * key, const BpeTokenizer::Impl & m, const std::string & file) {
    auto it = cfg.find(key);
    if (it == cfg.end() || it->is_null()) return -1;
    std::string content;
    if (it->is_string()) content = it->get<std::string>();
    else if (it->is_object() && it->contains("content")) content = str_of((*it)["content"], file, std::string(key) + ".content");
    else fail(file, key, "expected a string, {\"content\": ...} or null, found " + it->dump());
    auto f = m.by_spelled.find(content);
    if (f == m.by_spelled.end()) fail(file, key, "token '" + content + "' is not in the vocabulary");
    return f->second;
}

} // namespace

namespace {

std::string json_file(const std::string & path_in) {
    std::error_code ec;
    return fs::is_directory(path_in, ec) ? (fs::path(path_in) / "tokenizer.json").string() : path_in;
}

// What escapes the checks above still names the file: nlohmann's type errors, allocation failures.
[[noreturn]] void reader_rethrow(const std::string & file) {
    try {
        throw;
    } catch (const json::exception & e) {
        std::string w = e.what();
        size_t b = w.find("] ");
        throw std::runtime_error(file + ": unexpected JSON structure: " + (b == std::string::npos ? w : w.substr(b + 2)));
    } catch (const std::bad_alloc &) {
        throw std::runtime_error(file + ": out of memory while reading it");
    } catch (const std::length_error & e) {
        throw std::runtime_error(file + ": a table it describes is too large (" + e.what() + ")");
    }
}

} // namespace

std::unique_ptr<BpeTokenizer> BpeTokenizer::from_json(const std::string & path_in) try {
    std::string path = json_file(path_in);
    json j = json_read(path);
    auto m = std::make_unique<Impl>();
    m->source = path;
    if (!j.is_object()) fail(path, "(top level)", "expected an object, found " + type_name(j));

    const json & model = member(j, "model", path, "(top level)");
    std::string mtype = model.contains("type") ? str_of(model["type"], path, "model.type") : "BPE";
    if (mtype != "BPE") fail(path, "model.type", "expected 'BPE', found '" + mtype + "'");
    for (const char * k : {"continuing_subword_prefix", "end_of_word_suffix"}) {
        auto it = model.find(k);
        if (it != model.end() && !it->is_null() && !(it->is_string() && it->get<std::string>().empty()))
            fail(path, std::string("model.") + k, "expected null or \"\", found " + it->dump());
    }
    m->ignore_merges = bool_or(model, "ignore_merges", false);

    const json & vocab = member(model, "vocab", path, "model");
    if (!vocab.is_object()) fail(path, "model.vocab", "expected an object, found " + type_name(vocab));
    {
        auto at = j.find("added_tokens");
        size_t declared = vocab.size() + (at != j.end() && at->is_array() ? at->size() : 0);
        m->id_limit = std::min<int64_t>(int64_t(1) << 30, int64_t(declared) + kIdSlack);
    }
    m->by_spelled.reserve(vocab.size() + 1024);
    for (auto it = vocab.begin(); it != vocab.end(); ++it) {
        if (!it.value().is_number_integer())
            fail(path, "model.vocab[\"" + it.key() + "\"]", "expected an integer id, found " + type_name(it.value()));
        m->vocab_add(it.key(), it.value().get<int64_t>());
    }

    const json & merges = member(model, "merges", path, "model");
    if (!merges.is_array()) fail(path, "model.merges", "expected an array, found " + type_name(merges));
    m->merges.reserve(merges.size());
    for (size_t i = 0; i < merges.size(); i++) {
        const json & e = merges[i];
        std::string where = "model.merges[" + std::to_string(i) + "]";
        if (e.is_string()) {
            std::string s = e.get<std::string>();
            size_t sp = s.find(' ');
            if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
                fail(path, where, "expected \"left right\" (one space), found \"" + s + "\"");
            m->merge_add(s.substr(0, sp), s.substr(sp + 1), i, where);
        } else if (e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string()) {
            m->merge_add(e[0].get<std::string>(), e[1].get<std::string>(), i, where);
        } else
            fail(path, where, "expected \"left right\" or [left, right], found " + e.dump());
    }

    if (j.contains("added_tokens") && !j["added_tokens"].is_null()) {
        const json & at = j["added_tokens"];
        if (!at.is_array()) fail(path, "added_tokens", "expected an array, found " + type_name(at));
        for (size_t i = 0; i < at.size(); i++) {
            std::string where = "added_tokens[" + std::to_string(i) + "]";
            const json & e = at[i];
            const json & id = member(e, "id", path, where);
            if (!id.is_number_integer()) fail(path, where + ".id", "expected an integer, found " + type_name(id));
            if (id.get<int64_t>() < 0 || id.get<int64_t>() >= m->id_limit)
                fail(path, where + ".id", "expected 0 ≤ id < " + std::to_string(m->id_limit) + " (the number of tokens declared + " +
                                              std::to_string(kIdSlack) + "), found " + id.dump());
            AddedToken t{str_of(member(e, "content", path, where), path, where + ".content"),
                         int32_t(id.get<int64_t>()), bool_or(e, "special", false), bool_or(e, "normalized", false),
                         bool_or(e, "lstrip", false), bool_or(e, "rstrip", false), bool_or(e, "single_word", false)};
            m->added_add(std::move(t));
        }
    }

    if (j.contains("normalizer")) norm_parse(j["normalizer"], path, "normalizer", m->norm);
    bool byte_level = false;
    if (j.contains("pre_tokenizer")) pre_parse(j["pre_tokenizer"], path, "pre_tokenizer", m->steps, byte_level);
    if (!byte_level)
        fail(path, "pre_tokenizer", "expected a ByteLevel pre-tokenizer (byte-level BPE); SentencePiece-style BPE "
                                    "(Metaspace, byte_fallback) is read from its tokenizer.model instead");
    if (j.contains("decoder") && !j["decoder"].is_null()) {
        std::string d = str_of(member(j["decoder"], "type", path, "decoder"), path, "decoder.type");
        if (d != "ByteLevel") fail(path, "decoder.type", "expected 'ByteLevel', found '" + d + "'");
    }
    bool templated = false;
    if (j.contains("post_processor")) post_parse(j["post_processor"], *m, path, "post_processor", templated);
    for (const auto * ids : {&m->prefix_ids, &m->suffix_ids})
        for (int64_t id : *ids)
            if (id < 0 || size_t(id) >= m->present.size() || !m->present[id])
                fail(path, "post_processor", "special token id " + std::to_string(id) + " is not in the vocabulary");
    m->finish();

    auto tk = std::unique_ptr<BpeTokenizer>(new BpeTokenizer(std::move(m)));
    Impl & im = *tk->impl_;
    fs::path cfg_path = fs::path(path).parent_path() / "tokenizer_config.json";
    if (fs::exists(cfg_path)) {
        std::string cp = cfg_path.string();
        json cfg = json_read(cp);
        tk->bos_id_ = config_token(cfg, "bos_token", im, cp);
        tk->eos_id_ = config_token(cfg, "eos_token", im, cp);
        tk->pad_id_ = config_token(cfg, "pad_token", im, cp);
        tk->unk_id_ = config_token(cfg, "unk_token", im, cp);
        if (!templated) {
            if (bool_or(cfg, "add_bos_token", false) && tk->bos_id_ >= 0) im.prefix_ids = {tk->bos_id_};
            if (bool_or(cfg, "add_eos_token", false) && tk->eos_id_ >= 0) im.suffix_ids = {tk->eos_id_};
        }
    }
    return tk;
} catch (const json::exception &) {
    reader_rethrow(json_file(path_in));
} catch (const std::bad_alloc &) {
    reader_rethrow(json_file(path_in));
} catch (const std::length_error &) {
    reader_rethrow(json_file(path_in));
}

std::unique_ptr<BpeTokenizer> BpeTokenizer::from_gpt2_files(const std::string & encoder_json,
                                                            const std::string & vocab_bpe) try {
    json enc = json_read(encoder_json);
    if (!enc.is_object()) fail(encoder_json, "(top level)", "expected an object of token → id, found " + type_name(enc));
    auto m = std::make_unique<Impl>();
    m->source = encoder_json;
    m->id_limit = std::min<int64_t>(int64_t(1) << 30, int64_t(enc.size()) + kIdSlack);
    for (auto it = enc.begin(); it != enc.end(); ++it) {
        if (!it.value().is_number_integer())
            fail(encoder_json, "[\"" + it.key() + "\"]", "expected an integer id, found " + type_name(it.value()));
        m->vocab_add(it.key(), it.value().get<int64_t>());
    }
    std::ifstream f(vocab_bpe, std::ios::binary);
    if (!f) throw std::runtime_error(vocab_bpe + ": cannot open (" + std::strerror(errno) + ")");
    m->source = vocab_bpe;
    std::string line;
    size_t lineno = 0, rank = 0;
    while (std::getline(f, line)) {
        lineno++;
        if (!line.empty() && line.back() == '\r') line.pop_back();
        if (line.empty() || (lineno == 1 && line.rfind("#version", 0) == 0)) continue;
        size_t sp = line.find(' ');
        std::string where = "line " + std::to_string(lineno);
        if (sp == std::string::npos || line.find(' ', sp + 1) != std::string::npos)
            fail(vocab_bpe, where, "expected \"left right\" (one space), found \"" + line + "\"");
        m->merge_add(line.substr(0, sp), line.substr(sp + 1), rank++, where);
    }
    byte_level_steps(false, true, vocab_bpe, m->steps);
    int64_t eot = -1;
    auto it = m->by_spelled.find("<|endoftext|>");
    if (it != m->by_spelled.end()) {
        eot = it->second;
        m->added_add(AddedToken{"<|endoftext|>", int32_t(eot), true, false, false, false, false});
    }
    m->finish();
    auto tk = std::unique_ptr<BpeTokenizer>(new BpeTokenizer(std::move(m)));
    tk->bos_id_ = tk->eos_id_ = eot;
    return tk;
} catch (const json::exception &) {
    reader_rethrow(encoder_json);
} catch (const std::bad_alloc &) {
    reader_rethrow(encoder_json + " / " + vocab_bpe);
} catch (const std::length_error &) {
    reader_rethrow(encoder_json + " / " + vocab_bpe);
}

std::unique_ptr<BpeTokenizer> BpeTokenizer::from_vocab(const BpeVocab & v) {
    auto m = std::make_unique<Impl>();
    const std::string & src = v.source;
    m->source = src;
    if (!v.token_types.empty() && v.token_types.size() != v.tokens.size())
        fail(src, "tokenizer.ggml.token_type", "expected " + std::to_string(v.tokens.size()) + " entries (one per token), found " +
                                                   std::to_string(v.token_types.size()));
    for (size_t i = 0; i < v.tokens.size(); i++) {
        int32_t ty = v.token_types.empty() ? 1 : v.token_types[i];
        if (ty == 3 || ty == 4) m->id_set(int64_t(i), v.tokens[i], v.tokens[i]);
        else
            m->vocab_add(v.tokens[i], int64_t(i));
    }
    for (size_t i = 0; i < v.merges.size(); i++) {
        const std::string & s = v.merges[i];
        std::string where = "tokenizer.ggml.merges[" + std::to_string(i) + "]";
        size_t sp = s.find(' ');
        if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
            fail(src, where, "expected \"left right\" (one space), found \"" + s + "\"");
        m->merge_add(s.substr(0, sp), s.substr(sp + 1), i, where);
    }
    for (size_t i = 0; i < v.token_types.size(); i++)
        if (v.token_types[i] == 3 || v.token_types[i] == 4)
            m->added_add(AddedToken{v.tokens[i], int32_t(i), v.token_types[i] == 3, false, false, false, false});

    const std::string & pre = v.pre;
    auto regex_step = [&](const char * pat) {
        PreStep st;
        st.re = std::make_shared<Regex>(pat, false, src, "tokenizer.ggml.pre");
        m->steps.push_back(st);
    };
    if (pre == "gpt2" || pre == "default" || pre == "mpt" || pre == "olmo") regex_step(kGpt2Regex);
    else if (pre == "llama-bpe" || pre == "llama3" || pre == "llama-v3" || pre == "dbrx" || pre == "smaug-bpe")
        regex_step(kLlama3Regex);
    else if (pre == "qwen2" || pre == "stablelm2" || pre == "deepseek-r1-qwen") {
        m->norm.push_back(NormForm::NFC);
        regex_step(kQwen2Regex);
    } else if (pre == "smollm" || pre == "starcoder" || pre == "refact" || pre == "command-r" || pre == "codeshell") {
        regex_step("\\p{N}");
        regex_step(kGpt2Regex);
    } else
        fail(src, "tokenizer.ggml.pre", "expected gpt2, default, llama-bpe, llama3, qwen2, smollm or starcoder "
                                        "(or an alias listed in lib/tokenizer.h), found '" + pre + "'");
    m->finish();
    auto tk = std::unique_ptr<BpeTokenizer>(new BpeTokenizer(std::move(m)));
    Impl & im = *tk->impl_;
    auto id_ok = [&](int64_t id, const char * key) -> int64_t {
        if (id < 0) return -1;
        if (size_t(id) >= im.present.size() || !im.present[id])
            fail(src, key, "id " + std::to_string(id) + " is not in the vocabulary (0.." +
                               std::to_string(int64_t(im.present.size()) - 1) + ")");
        return id;
    };
    tk->bos_id_ = id_ok(v.bos_id, "tokenizer.ggml.bos_token_id");
    tk->eos_id_ = id_ok(v.eos_id, "tokenizer.ggml.eos_token_id");
    tk->pad_id_ = id_ok(v.pad_id, "tokenizer.ggml.padding_token_id");
    tk->unk_id_ = id_ok(v.unk_id, "tokenizer.ggml.unknown_token_id");
    if (v.add_bos && tk->bos_id_ >= 0) im.prefix_ids = {tk->bos_id_};
    if (v.add_eos && tk->eos_id_ >= 0) im.suffix_ids = {tk->eos_id_};
    return tk;
}

} // namespace qatlab
