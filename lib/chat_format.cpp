// chat_format: chat templates rendered in C++: Qwen3's (the seed's cache builder and its removal of
// <think> blocks), ChatML (SmolLM2) and Llama-3, recognised from the Jinja text a model ships.
#include "lib/tokenizer.h"

#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <sstream>

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <stdexcept>

namespace qatlab {
namespace {

std::string lstrip_nl(const std::string & s) {
    size_t i = s.find_first_not_of('\n');
    return i == std::string::npos ? "" : s.substr(i);
}
std::string rstrip_nl(const std::string & s) {
    size_t i = s.find_last_not_of('\n');
    return i == std::string::npos ? "" : s.substr(0, i + 1);
}
bool starts_with(const std::string & s, const char * p) { return s.rfind(p, 0) == 0; }
bool ends_with(const std::string & s, const std::string & p) {
    return s.size() >= p.size() && s.compare(s.size() - p.size(), p.size(), p) == 0;
}

// Python's re.sub(pattern, '', text) with `\s` spelled out as Python's str.isspace set
// (PCRE2's \s lacks U+001C..U+001F and adds U+180E).
std::string regex_remove(const std::string & text, const char * pattern, uint32_t flags) {
    int err;
    PCRE2_SIZE off;
    pcre2_code * re = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern), PCRE2_ZERO_TERMINATED,
                                    PCRE2_UTF | PCRE2_MATCH_INVALID_UTF | flags, &err, &off, nullptr);
    if (!re) throw std::runtime_error("chat_format: internal regex failed to compile");
    pcre2_match_data * md = pcre2_match_data_create(1, nullptr);
    std::string out;
    size_t pos = 0;
    auto subj = reinterpret_cast<PCRE2_SPTR>(text.data());
    while (pos <= text.size()) {
        int rc = pcre2_match(re, subj, text.size(), pos, 0, md, nullptr);
        if (rc < 0) break;
        PCRE2_SIZE * ov = pcre2_get_ovector_pointer(md);
        out.append(text, pos, ov[0] - pos);
        pos = ov[1] > ov[0] ? ov[1] : ov[1] + 1;  // patterns here never match empty
    }
    if (pos < text.size()) out.append(text, pos, std::string::npos);
    pcre2_match_data_free(md);
    pcre2_code_free(re);
    return out;
}

#define PY_WS "[\\t\\n\\x0b\\f\\r\\x1c-\\x20\\x{85}\\x{a0}\\x{1680}\\x{2000}-\\x{200a}\\x{2028}\\x{2029}\\x{202f}\\x{205f}\\x{3000}]"

} // namespace

std::string chat_format_qwen3(const std::vector<ChatMessage> & msgs, const ChatFormatOptions & opts) {
    std::string out;
    const int n = int(msgs.size());
    if (n > 0 && msgs[0].role == "system") out += "<|im_start|>system\n" + msgs[0].content + "<|im_end|>\n";
    // The last user query that is not a tool response: thinking is shown after it only.
    int last_query = n - 1;
    for (int i = n - 1; i >= 0; i--) {
        const ChatMessage & m = msgs[i];
        if (m.role == "user" && !(starts_with(m.content, "<tool_response>") && ends_with(m.content, "</tool_response>"))) {
            last_query = i;
            break;
        }
    }
    for (int i = 0; i < n; i++) {
        const ChatMessage & m = msgs[i];
        if (m.role == "user" || (m.role == "system" && i != 0)) {
            out += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
        } else if (m.role == "assistant") {
            std::string content = m.content, reasoning;
            if (m.reasoning_content) {
                reasoning = *m.reasoning_content;
            } else {
                size_t close = m.content.rfind("</think>");
                if (close != std::string::npos) {
                    content = lstrip_nl(m.content.substr(close + 8));
                    std::string before = rstrip_nl(m.content.substr(0, m.content.find("</think>")));
                    size_t open = before.rfind("<think>");
                    reasoning = lstrip_nl(open == std::string::npos ? before : before.substr(open + 7));
                }
            }
            if (i > last_query && (i == n - 1 || !reasoning.empty()))
                out += "<|im_start|>assistant\n<think>\n" + lstrip_nl(rstrip_nl(reasoning)) + "\n</think>\n\n" +
                       lstrip_nl(content);
            else
                out += "<|im_start|>assistant\n" + content;
            out += "<|im_end|>\n";
        } else if (m.role == "tool") {
            if (i == 0 || msgs[i - 1].role != "tool") out += "<|im_start|>user";
            out += "\n<tool_response>\n" + m.content + "\n</tool_response>";
            if (i == n - 1 || msgs[i + 1].role != "tool") out += "<|im_end|>\n";
        } else if (m.role != "system") {
            throw std::runtime_error("message " + std::to_string(i + 1) +
                                     ": role: expected system, user, assistant or tool, found '" + m.role + "'");
        }
    }
    if (!opts.enable_thinking && opts.strip_think) {
        out = regex_remove(out, "<think>" PY_WS "*</think>" PY_WS "*", 0);
        out = regex_remove(out, "<think>.*?</think>" PY_WS "*", PCRE2_DOTALL);
    }
    if (opts.add_generation_prompt) {
        out += "<|im_start|>assistant\n";
        if (!opts.enable_thinking) out += "<think>\n\n</think>\n\n";
    }
    return out;
}

// -- templates by family -----------------------------------------------------------------------

namespace {

bool has(const std::string & s, const char * p) { return s.find(p) != std::string::npos; }

// Length of the UTF-8 code point at s[i] and its value (invalid bytes count as one, value -1).
size_t utf8_at(const std::string & s, size_t i, int32_t & cp) {
    unsigned char c = s[i];
    size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (n == 0 || i + n > s.size()) { cp = -1; return 1; }
    cp = n == 1 ? c : c & (0x7f >> n);
    for (size_t k = 1; k < n; k++) cp = (cp << 6) | (s[i + k] & 0x3f);
    return n;
}

// Python's str.isspace (Jinja's trim filter is str.strip()).
bool py_space(int32_t c) {
    return (c >= 9 && c <= 13) || (c >= 0x1c && c <= 0x20) || c == 0x85 || c == 0xa0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200a) || c == 0x2028 || c == 0x2029 || c == 0x202f || c == 0x205f || c == 0x3000;
}

std::string py_strip(const std::string & s) {
    size_t b = 0, e = s.size();
    while (b < e) {
        int32_t cp;
        size_t n = utf8_at(s, b, cp);
        if (!py_space(cp)) break;
        b += n;
    }
    while (e > b) {   // step back to the start of the last code point
        size_t k = e - 1;
        while (k > b && (static_cast<unsigned char>(s[k]) & 0xc0) == 0x80) k--;
        int32_t cp;
        if (utf8_at(s, k, cp) != e - k || !py_space(cp)) break;
        e = k;
    }
    return s.substr(b, e - b);
}

// The escapes a Jinja string literal may hold; a real newline stays as it is.
std::string jinja_unescape(const std::string & s) {
    std::string out;
    for (size_t i = 0; i < s.size(); i++) {
        if (s[i] != '\\' || i + 1 == s.size()) { out += s[i]; continue; }
        char c = s[++i];
        out += c == 'n' ? '\n' : c == 't' ? '\t' : c == 'r' ? '\r' : c;
    }
    return out;
}

// ChatML's default system message: the literal after "<|im_start|>system" (then a newline, real or
// escaped) up to "<|im_end|>", when the template tests that the first message is not a system one.
bool chatml_default_system(const std::string & text, std::string & out) {
    if (!has(text, "!= 'system'") && !has(text, "!= \"system\"")) return false;
    const std::string open = "<|im_start|>system";
    size_t p = text.find(open);
    if (p == std::string::npos) return false;
    p += open.size();
    if (text.compare(p, 1, "\n") == 0) p += 1;
    else if (text.compare(p, 2, "\\n") == 0) p += 2;
    else return false;
    size_t e = text.find("<|im_end|>", p);
    if (e == std::string::npos) return false;
    out = jinja_unescape(text.substr(p, e - p));
    return true;
}

std::string read_text(const std::filesystem::path & p) {
    std::ifstream f(p, std::ios::binary);
    if (!f) throw std::runtime_error(p.string() + ": cannot open");
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
}

} // namespace

const char * chat_template_families() { return "qwen3, chatml, llama3"; }

ChatTemplate chat_template_parse(const std::string & text, const std::string & source) {
    ChatTemplate t;
    t.source = source;
    t.text = text;
    auto unknown = [&](const std::string & why) {
        return std::runtime_error(source + ": chat template not recognised (" + why + "); known families: " +
                                  chat_template_families() +
                                  " (pass {template = 'qwen3'|'chatml'|'llama3'} to tokenizers.chat_format to pick one)");
    };
    if (has(text, "<|start_header_id|>") && has(text, "<|end_header_id|>") && has(text, "<|eot_id|>")) {
        // Llama-3.1 and later add a dated system header and tool blocks; only Llama-3's is known.
        if (has(text, "Cutting Knowledge Date") || has(text, "tools"))
            throw unknown("a Llama-3.1+ template with a dated system header or tools; only Llama-3's is rendered");
        t.family = "llama3";
        return t;
    }
    if (has(text, "<|im_start|>") && has(text, "<|im_end|>")) {
        if (has(text, "<think>") && has(text, "enable_thinking") && has(text, "last_query_index")) {
            t.family = "qwen3";
            return t;
        }
        if (has(text, "<think>") || has(text, "tool") || has(text, "enable_thinking"))
            throw unknown("ChatML markers with thinking or tool blocks that are not Qwen3's");
        t.family = "chatml";
        t.has_default_system = chatml_default_system(text, t.default_system);
        return t;
    }
    throw unknown("no <|im_start|>/<|im_end|> or <|start_header_id|>/<|eot_id|> markers");
}

ChatTemplate chat_template_named(const std::string & name) {
    if (name == "qwen3" || name == "chatml" || name == "llama3") {
        ChatTemplate t;
        t.family = name;
        t.source = "template '" + name + "'";
        return t;
    }
    return chat_template_parse(name, "template text");
}

std::string chat_template_render(const ChatTemplate & t, const std::vector<ChatMessage> & msgs,
                                 const ChatFormatOptions & opts) {
    if (t.family == "qwen3") return chat_format_qwen3(msgs, opts);
    std::string out;
    if (t.family == "chatml") {
        for (size_t i = 0; i < msgs.size(); i++) {
            if (i == 0 && t.has_default_system && msgs[0].role != "system")
                out += "<|im_start|>system\n" + t.default_system + "<|im_end|>\n";
            out += "<|im_start|>" + msgs[i].role + "\n" + msgs[i].content + "<|im_end|>\n";
        }
        if (opts.add_generation_prompt) out += "<|im_start|>assistant\n";
        return out;
    }
    if (t.family == "llama3") {
        for (size_t i = 0; i < msgs.size(); i++) {
            if (i == 0) out += t.bos_token;
            out += "<|start_header_id|>" + msgs[i].role + "<|end_header_id|>\n\n" + py_strip(msgs[i].content) + "<|eot_id|>";
        }
        if (opts.add_generation_prompt) out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
        return out;
    }
    throw std::runtime_error(t.source + ": unknown chat template family '" + t.family + "' (known: " +
                             chat_template_families() + ")");
}

std::optional<std::pair<std::string, std::string>> chat_template_find(const std::string & tokenizer_path) {
    namespace fs = std::filesystem;
    fs::path p(tokenizer_path);
    fs::path dir = fs::is_directory(p) ? p : p.parent_path();
    if (dir.empty()) dir = ".";
    fs::path jinja = dir / "chat_template.jinja", cfg = dir / "tokenizer_config.json";
    if (fs::is_regular_file(jinja)) return std::make_pair(read_text(jinja), jinja.string());
    if (!fs::is_regular_file(cfg)) return std::nullopt;
    nlohmann::json j;
    try {
        j = nlohmann::json::parse(read_text(cfg));
    } catch (const nlohmann::json::exception & e) {
        throw std::runtime_error(cfg.string() + ": not valid JSON: " + e.what());
    }
    if (!j.is_object() || !j.contains("chat_template") || j["chat_template"].is_null()) return std::nullopt;
    const nlohmann::json & c = j["chat_template"];
    const std::string src = cfg.string() + ": chat_template";
    if (c.is_string()) return std::make_pair(c.get<std::string>(), src);
    if (c.is_array()) {
        for (const auto & e : c)
            if (e.is_object() && e.value("name", "") == "default" && e.contains("template") && e["template"].is_string())
                return std::make_pair(e["template"].get<std::string>(), src + "[default]");
        throw std::runtime_error(src + ": expected a string or a list holding a {name = \"default\", template} entry");
    }
    throw std::runtime_error(src + ": expected a string or a list of {name, template}, found " + std::string(c.type_name()));
}

} // namespace qatlab
