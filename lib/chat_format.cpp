// chat_format: Qwen3's chat template (tokenizer_config.json) rendered in C++ for the cases the
// seed's cache builder uses, plus its removal of <think> blocks when thinking is off.
#include "lib/tokenizer.h"

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
            throw std::runtime_error("chat_format: message " + std::to_string(i + 1) +
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

} // namespace qatlab
