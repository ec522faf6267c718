// tokenizer: byte-level BPE as Hugging Face's tokenizers runs it: added tokens, normalizer,
// regex pre-tokenizer (PCRE2 JIT), rank-ordered merges with a per-pre-token cache, decoder.
#include "lib/tokenizer_bpe.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <stdexcept>

namespace fs = std::filesystem;

namespace qatlab {

Tokenizer::~Tokenizer() = default;

std::unique_ptr<Tokenizer> tokenizer_load(const std::string & path) {
    std::error_code ec;
    if (fs::is_directory(path, ec)) {
        if (fs::exists(fs::path(path) / "tokenizer.json")) return BpeTokenizer::from_json(path);
        if (fs::exists(fs::path(path) / "tokenizer.model"))
            return SentencePieceTokenizer::from_file((fs::path(path) / "tokenizer.model").string());
        throw std::runtime_error(path + ": expected a directory holding tokenizer.json or tokenizer.model, found neither");
    }
    if (path.size() > 6 && path.compare(path.size() - 6, 6, ".model") == 0)
        return SentencePieceTokenizer::from_file(path);
    return BpeTokenizer::from_json(path);
}

namespace bpe_detail {

void fail(const std::string & file, const std::string & key, const std::string & what) {
    throw std::runtime_error(file + ": " + key + ": " + what);
}

// -- UTF-8 ------------------------------------------------------------------------------

// Length of the valid UTF-8 sequence at s[i] (0 if invalid) and, through `bad`, how many
// bytes form the maximal invalid subpart to replace with one U+FFFD (WHATWG / Unicode §3.9).
size_t utf8_seq(const unsigned char * s, size_t n, size_t i, uint32_t & cp, size_t & bad) {
    unsigned char b = s[i];
    bad = 1;
    if (b < 0x80) { cp = b; return 1; }
    size_t need;
    unsigned char lo = 0x80, hi = 0xBF;
    if (b >= 0xC2 && b <= 0xDF) { need = 1; cp = b & 0x1F; }
    else if (b == 0xE0) { need = 2; lo = 0xA0; cp = b & 0x0F; }
    else if ((b >= 0xE1 && b <= 0xEC) || b == 0xEE || b == 0xEF) { need = 2; cp = b & 0x0F; }
    else if (b == 0xED) { need = 2; hi = 0x9F; cp = b & 0x0F; }
    else if (b == 0xF0) { need = 3; lo = 0x90; cp = b & 0x07; }
    else if (b >= 0xF1 && b <= 0xF3) { need = 3; cp = b & 0x07; }
    else if (b == 0xF4) { need = 3; hi = 0x8F; cp = b & 0x07; }
    else return 0;
    for (size_t k = 1; k <= need; k++) {
        if (i + k >= n) return 0;
        unsigned char c = s[i + k];
        if (c < lo || c > hi) return 0;
        lo = 0x80, hi = 0xBF;
        cp = (cp << 6) | (c & 0x3F);
        bad = k + 1;
    }
    return need + 1;
}

void utf8_append(std::string & out, uint32_t cp) {
    if (cp < 0x80) out += char(cp);
    else if (cp < 0x800) { out += char(0xC0 | (cp >> 6)); out += char(0x80 | (cp & 0x3F)); }
    else if (cp < 0x10000) {
        out += char(0xE0 | (cp >> 12)); out += char(0x80 | ((cp >> 6) & 0x3F)); out += char(0x80 | (cp & 0x3F));
    } else {
        out += char(0xF0 | (cp >> 18)); out += char(0x80 | ((cp >> 12) & 0x3F));
        out += char(0x80 | ((cp >> 6) & 0x3F)); out += char(0x80 | (cp & 0x3F));
    }
}

std::string utf8_lossy(const std::string & in) {
    const auto * s = reinterpret_cast<const unsigned char *>(in.data());
    size_t n = in.size(), i = 0;
    std::string out;
    out.reserve(n);
    while (i < n) {
        if (s[i] < 0x80) { out += char(s[i++]); continue; }
        uint32_t cp;
        size_t bad, len = utf8_seq(s, n, i, cp, bad);
        if (len) { out.append(in, i, len); i += len; }
        else { out += "\xEF\xBF\xBD"; i += bad; }
    }
    return out;
}

// Rust's char::is_whitespace (the White_Space property), for lstrip/rstrip of added tokens.
bool is_white_space(uint32_t c) {
    return (c >= 9 && c <= 13) || c == 32 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
           c == 0x3000;
}

// GPT-2's map from bytes to printable code points, so that every byte has a visible symbol.
struct ByteMap {
    uint32_t to_cp[256];
    int16_t to_byte[324];
    ByteMap() {
        std::fill(std::begin(to_byte), std::end(to_byte), int16_t(-1));
        int n = 0;
        for (int b = 0; b < 256; b++) {
            bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
            to_cp[b] = printable ? uint32_t(b) : uint32_t(256 + n++);
            to_byte[to_cp[b]] = int16_t(b);
        }
    }
};
const ByteMap & byte_map() {
    static const ByteMap m;
    return m;
}

std::string byte_level_encode(const std::string & raw) {
    std::string out;
    for (unsigned char b : raw) utf8_append(out, byte_map().to_cp[b]);
    return out;
}

// Spelled token → raw bytes; false when a character is outside GPT-2's alphabet.
bool byte_level_decode(const std::string & spelled, std::string & raw) {
    const auto * s = reinterpret_cast<const unsigned char *>(spelled.data());
    raw.clear();
    for (size_t i = 0; i < spelled.size();) {
        uint32_t cp;
        size_t bad, len = utf8_seq(s, spelled.size(), i, cp, bad);
        if (!len || cp >= 324 || byte_map().to_byte[cp] < 0) return false;
        raw += char(byte_map().to_byte[cp]);
        i += len;
    }
    return true;
}

// -- normalization --------------------------------------------------------------------------

int norm_flags(NormForm f) {
    switch (f) {
    case NormForm::NFC: return UTF8PROC_STABLE | UTF8PROC_COMPOSE;
    case NormForm::NFD: return UTF8PROC_STABLE | UTF8PROC_DECOMPOSE;
    case NormForm::NFKC: return UTF8PROC_STABLE | UTF8PROC_COMPOSE | UTF8PROC_COMPAT;
    default: return UTF8PROC_STABLE | UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT;
    }
}

// Valid UTF-8 text through utf8proc; invalid bytes pass through untouched.
void norm_chunk(const char * p, size_t n, int flags, std::string & out) {
    const auto * s = reinterpret_cast<const unsigned char *>(p);
    size_t i = 0;
    while (i < n) {
        size_t j = i;
        uint32_t cp;
        size_t bad;
        while (j < n) {
            size_t len = utf8_seq(s, n, j, cp, bad);
            if (!len) break;
            j += len;
        }
        if (j > i) {
            utf8proc_uint8_t * dst = nullptr;
            utf8proc_ssize_t m = utf8proc_map(s + i, utf8proc_ssize_t(j - i), &dst, utf8proc_option_t(flags));
            if (m < 0) out.append(p + i, j - i);
            else out.append(reinterpret_cast<const char *>(dst), size_t(m));
            free(dst);
        }
        if (j < n) {
            size_t len = utf8_seq(s, n, j, cp, bad);
            (void)len;
            out.append(p + j, bad);
            j += bad;
        }
        i = j;
    }
}

// ASCII is stable under every normalization form and never combines with what follows, so
// only non-ASCII runs (with the ASCII starter before them) go through utf8proc.
void normalize(const char * p, size_t n, const std::vector<NormForm> & forms, std::string & out,
               std::string & tmp) {
    out.assign(p, n);
    for (NormForm f : forms) {
        tmp.swap(out);
        out.clear();
        const char * s = tmp.data();
        size_t m = tmp.size(), i = 0;
        while (i < m) {
            size_t j = i;
            while (j < m && (unsigned char)s[j] < 0x80) j++;
            if (j == m) { out.append(s + i, m - i); break; }
            size_t start = j > i ? j - 1 : j;  // keep the preceding ASCII starter with the run
            out.append(s + i, start - i);
            size_t k = j;
            while (k < m && (unsigned char)s[k] >= 0x80) k++;
            norm_chunk(s + start, k - start, norm_flags(f), out);
            i = k;
        }
    }
}

// -- regex ------------------------------------------------------------------------------------

// Limits for one match. The JIT stack is only a first try: a match that outgrows it (a long
// run of backtracking points, e.g. a lookahead repeated over a megabyte without a split) is
// redone by the interpreter, whose backtracking frames live on the heap up to kHeapLimitKiB.
// The match limit bounds the work of one match (both engines count it) so that a catastrophic
// pattern is an error, not a hang: kMatchLimit steps, or kMatchPerByte per byte of a longer
// piece; valid patterns stay far below (under 3 steps a byte for a megabyte without a split).
const uint32_t kMatchLimit = 10000000;
const uint64_t kMatchPerByte = 16;
const uint32_t kHeapLimitKiB = 1024 * 1024;

// Per-thread match data and JIT stack, shared by every compiled pattern.
struct MatchScratch {
    pcre2_match_data * md = nullptr;
    pcre2_match_context * mctx = nullptr;
    pcre2_jit_stack * stack = nullptr;
    MatchScratch() {
        md = pcre2_match_data_create(1, nullptr);
        mctx = pcre2_match_context_create(nullptr);
        stack = pcre2_jit_stack_create(32 * 1024, 4 * 1024 * 1024, nullptr);
        if (!md || !mctx || !stack) throw std::bad_alloc();
        pcre2_jit_stack_assign(mctx, nullptr, stack);
        pcre2_set_heap_limit(mctx, kHeapLimitKiB);
    }
    ~MatchScratch() {
        pcre2_jit_stack_free(stack);
        pcre2_match_context_free(mctx);
        pcre2_match_data_free(md);
    }
};

MatchScratch & match_scratch() {
    thread_local MatchScratch s;
    return s;
}

// Oniguruma's \s (what Hugging Face compiles with) is the White_Space property; PCRE2's also
// takes U+180E. Spell \s and \S out (\S only outside classes, where patterns use it).
std::string onig_spaces(const std::string & pat) {
    static const char * ws = "\\t\\n\\x0b\\f\\r\\x20\\x{85}\\x{a0}\\x{1680}\\x{2000}-\\x{200a}\\x{2028}"
                             "\\x{2029}\\x{202f}\\x{205f}\\x{3000}";
    std::string out;
    bool in_class = false;
    for (size_t i = 0; i < pat.size(); i++) {
        char c = pat[i];
        if (c == '\\' && i + 1 < pat.size()) {
            char d = pat[i + 1];
            if (d == 's') out += in_class ? std::string(ws) : "[" + std::string(ws) + "]";
            else if (d == 'S' && !in_class) out += "[^" + std::string(ws) + "]";
            else out.append(pat, i, 2);
            i++;
        } else if (c == '[' && !in_class) {
            in_class = true;
            out += c;
            if (i + 1 < pat.size() && pat[i + 1] == '^') out += pat[++i];
            if (i + 1 < pat.size() && pat[i + 1] == ']') out += pat[++i];  // a literal ] first
        } else if (c == '[' && in_class && i + 1 < pat.size() && pat[i + 1] == ':') {
            size_t e = pat.find(":]", i + 2);  // POSIX [:alpha:] inside a class
            size_t end = e == std::string::npos ? pat.size() : e + 2;
            out.append(pat, i, end - i);
            i = end - 1;
        } else if (c == ']' && in_class) {
            in_class = false;
            out += c;
        } else
            out += c;
    }
    return out;
}

Regex::Regex(const std::string & pattern, bool literal, const std::string & file, const std::string & key)
    : pattern_(pattern), file_(file), key_(key) {
    int err;
    PCRE2_SIZE off;
    uint32_t flags = PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF | (literal ? PCRE2_LITERAL : 0);
    std::string pat = literal ? pattern : onig_spaces(pattern);
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pat.data()), pat.size(), flags, &err, &off, nullptr);
    if (!code_) {
        PCRE2_UCHAR buf[256];
        pcre2_get_error_message(err, buf, sizeof buf);
        fail(file, key, "cannot compile regex '" + pattern + "': " + reinterpret_cast<const char *>(buf));
    }
    jit_ = pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE) == 0;
}

Regex::~Regex() { pcre2_code_free(code_); }

template <class F>
void Regex::for_each(const char * s, size_t n, F && fn) const {
    MatchScratch & ms = match_scratch();
    pcre2_set_match_limit(ms.mctx, uint32_t(std::min<uint64_t>(UINT32_MAX, std::max<uint64_t>(kMatchLimit, kMatchPerByte * n))));
    auto subj = reinterpret_cast<PCRE2_SPTR>(s);
    size_t off = 0;
    while (off < n) {
        int rc = jit_ ? pcre2_jit_match(code_, subj, n, off, 0, ms.md, ms.mctx)
                      : pcre2_match(code_, subj, n, off, PCRE2_NO_JIT, ms.md, ms.mctx);
        if (rc == PCRE2_ERROR_JIT_STACKLIMIT) rc = pcre2_match(code_, subj, n, off, PCRE2_NO_JIT, ms.md, ms.mctx);
        if (rc == PCRE2_ERROR_NOMATCH) break;
        if (rc < 0) {
            PCRE2_UCHAR buf[256];
            pcre2_get_error_message(rc, buf, sizeof buf);
            std::string why = reinterpret_cast<const char *>(buf);
            if (rc == PCRE2_ERROR_MATCHLIMIT || rc == PCRE2_ERROR_HEAPLIMIT || rc == PCRE2_ERROR_DEPTHLIMIT)
                why += " (the pattern backtracks catastrophically on this text)";
            fail(file_, key_, "regex '" + pattern_ + "' failed at byte " + std::to_string(off) + " of a " +
                                  std::to_string(n) + "-byte piece: " + why);
        }
        PCRE2_SIZE * ov = pcre2_get_ovector_pointer(ms.md);
        size_t a = ov[0], b = ov[1];
        if (b == a) {  // an empty match: step over one character
            off = a + 1;
            while (off < n && ((unsigned char)s[off] & 0xC0) == 0x80) off++;
            continue;
        }
        fn(a, b);
        off = b;
    }
}

const char * const kGpt2Regex = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";
const char * const kLlama3Regex = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+"
                                  "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
const char * const kQwen2Regex = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+"
                                 "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

// -- pre-tokenizer ------------------------------------------------------------------------------

struct Span {
    uint32_t a, b;
};
struct Mark {
    uint32_t a, b;
    bool match;
};

// HF's NormalizedString::split: marks (match or not) merged by the behavior, empties dropped.
void behavior_apply(Behavior bh, const std::vector<Mark> & m, std::vector<Span> & out) {
    switch (bh) {
    case Behavior::Removed:
        for (const Mark & x : m)
            if (!x.match) out.push_back({x.a, x.b});
        break;
    case Behavior::Isolated:
        for (const Mark & x : m) out.push_back({x.a, x.b});
        break;
    case Behavior::MergedWithPrevious: {
        bool prev_match = false;
        size_t first = out.size();
        for (const Mark & x : m) {
            if (x.match && !prev_match && out.size() > first) out.back().b = x.b;
            else out.push_back({x.a, x.b});
            prev_match = x.match;
        }
        break;
    }
    case Behavior::MergedWithNext: {
        bool prev_match = false;
        std::vector<Span> rev;
        for (size_t i = m.size(); i-- > 0;) {
            const Mark & x = m[i];
            if (x.match && !prev_match && !rev.empty()) rev.back().a = x.a;
            else rev.push_back({x.a, x.b});
            prev_match = x.match;
        }
        out.insert(out.end(), rev.rbegin(), rev.rend());
        break;
    }
    case Behavior::Contiguous: {
        bool prev_match = false;
        size_t first = out.size();
        for (const Mark & x : m) {
            if (x.match == prev_match && out.size() > first) out.back().b = x.b;
            else out.push_back({x.a, x.b});
            prev_match = x.match;
        }
        break;
    }
    }
}

// A letter, digit or underscore: what single_word added tokens may not touch.
bool word_char(const char * s, size_t i, size_t n) {
    utf8proc_int32_t cp;
    if (utf8proc_iterate(reinterpret_cast<const utf8proc_uint8_t *>(s + i), utf8proc_ssize_t(n - i), &cp) <= 0)
        return false;
    auto c = utf8proc_category(cp);
    return (c >= UTF8PROC_CATEGORY_LU && c <= UTF8PROC_CATEGORY_LO) ||
           (c >= UTF8PROC_CATEGORY_ND && c <= UTF8PROC_CATEGORY_NO) || cp == '_';
}

bool word_char_before(const char * s, size_t i) {
    if (i == 0) return false;
    size_t j = i - 1;
    while (j > 0 && ((unsigned char)s[j] & 0xC0) == 0x80) j--;
    return word_char(s, j, i);
}

void AddedMatcher::add(const AddedToken * t) {
    if (t->content.empty()) return;
    auto & v = by_first[(unsigned char)t->content[0]];
    v.push_back(t);
    std::stable_sort(v.begin(), v.end(), [](auto x, auto y) { return x->content.size() > y->content.size(); });
    empty = false;
}

const AddedToken * AddedMatcher::find(const char * s, size_t n, size_t from, size_t & a, size_t & b) const {
    if (empty) return nullptr;
    const auto * u = reinterpret_cast<const unsigned char *>(s);
    for (size_t i = from; i < n; i++) {
        for (const AddedToken * t : by_first[u[i]]) {
            size_t len = t->content.size();
            if (len > n - i || memcmp(s + i, t->content.data(), len) != 0) continue;
            if (t->single_word && (word_char_before(s, i) || (i + len < n && word_char(s, i + len, n)))) continue;
            a = i;
            b = i + len;
            if (t->lstrip)
                while (a > from) {
                    size_t j = a - 1;
                    while (j > from && (u[j] & 0xC0) == 0x80) j--;
                    uint32_t cp;
                    size_t bad;
                    if (!utf8_seq(u, n, j, cp, bad) || !is_white_space(cp)) break;
                    a = j;
                }
            if (t->rstrip)
                while (b < n) {
                    uint32_t cp;
                    size_t bad, l = utf8_seq(u, n, b, cp, bad);
                    if (!l || !is_white_space(cp)) break;
                    b += l;
                }
            return t;
        }
    }
    return nullptr;
}

struct Sym {
    int32_t id, prev, next;
    uint32_t len;
};
struct Cand {
    uint32_t rank;
    int32_t pos, id;
    bool operator<(const Cand & o) const {  // max-heap order: lowest rank, then leftmost, on top
        return rank != o.rank ? rank > o.rank : pos > o.pos;
    }
};

// Per-thread work buffers: encode allocates nothing once they have grown.
struct EncodeScratch {
    std::string norm, norm_tmp, prefixed;
    std::vector<Span> spans, spans2;
    std::vector<Mark> marks;
    std::vector<Sym> syms;
    std::vector<Cand> heap;
    std::vector<int32_t> word;
};
EncodeScratch & encode_scratch() {
    thread_local EncodeScratch s;
    return s;
}

const size_t kCacheMax = 1 << 18;

} // namespace bpe_detail

using namespace bpe_detail;

// -- the model ------------------------------------------------------------------------------

void BpeTokenizer::Impl::id_set(int64_t id, const std::string & sp, const std::string & bytes) {
    if (id < 0 || id >= id_limit) {
        if (id_limit == (int64_t(1) << 30))
            fail(source, "vocab", "token '" + sp + "' has id " + std::to_string(id) + ", expected 0 ≤ id < 2^30");
        fail(source, "vocab", "token '" + sp + "' has id " + std::to_string(id) + ", expected 0 ≤ id < " +
                                  std::to_string(id_limit) + " (the file declares " + std::to_string(id_limit - kIdSlack) +
                                  " tokens; ids may leave at most " + std::to_string(kIdSlack) + " unused)");
    }
    if (size_t(id) >= spelled.size()) {
        spelled.resize(id + 1);
        raw.resize(id + 1);
        present.resize(id + 1, 0);
        special.resize(id + 1, 0);
    }
    spelled[id] = sp;
    raw[id] = bytes;
    present[id] = 1;
    by_spelled.emplace(sp, int32_t(id));
}

void BpeTokenizer::Impl::vocab_add(const std::string & sp, int64_t id) {
    std::string bytes;
    if (!byte_level_decode(sp, bytes)) bytes = sp;  // not in GPT-2's alphabet: literal text
    id_set(id, sp, bytes);
}

// Added tokens decode through the ByteLevel decoder too: mapped when every character is
// in the alphabet, literal otherwise (HF's decoder fallback).
void BpeTokenizer::Impl::added_add(AddedToken t) {
    std::string bytes;
    if (!byte_level_decode(t.content, bytes)) bytes = t.content;
    if (size_t(t.id) < present.size() && present[t.id]) {
        spelled[t.id] = t.content;
        raw[t.id] = bytes;
    } else
        id_set(t.id, t.content, bytes);
    by_spelled[t.content] = t.id;
    special[t.id] = t.special;
    added.push_back(std::move(t));
}

void BpeTokenizer::Impl::merge_add(const std::string & l, const std::string & r, size_t rank, const std::string & where) {
    joined.assign(l).append(r);
    auto il = by_spelled.find(l), ir = by_spelled.find(r), im = by_spelled.find(joined);
    auto missing = [&](const std::string & t) {
        fail(source, where, "merge '" + l + " " + r + "': token '" + t + "' is not in the vocabulary");
    };
    if (il == by_spelled.end()) missing(l);
    if (ir == by_spelled.end()) missing(r);
    if (im == by_spelled.end()) missing(l + r);
    merges.emplace(pair_key(il->second, ir->second), MergeVal{uint32_t(rank), im->second});
}

// After vocab, merges and added tokens are in: the byte table and matchers.
void BpeTokenizer::Impl::finish() {
    for (int b = 0; b < 256; b++) {
        std::string sp;
        utf8_append(sp, byte_map().to_cp[b]);
        auto it = by_spelled.find(sp);
        byte_id[b] = it == by_spelled.end() ? -1 : it->second;
    }
    for (const AddedToken & t : added) (t.normalized ? added_norm : added_raw).add(&t);
}

void BpeTokenizer::Impl::bpe_word(const char * p, size_t n, std::vector<int64_t> & out) const {
    if (n == 1 && byte_id[(unsigned char)p[0]] >= 0) {
        out.push_back(byte_id[(unsigned char)p[0]]);
        return;
    }
    std::string key(p, n);
    {
        std::lock_guard<std::mutex> g(cache_mu);
        auto it = cache.find(key);
        if (it != cache.end()) {
            out.insert(out.end(), it->second.begin(), it->second.end());
            return;
        }
    }
    EncodeScratch & sc = encode_scratch();
    std::vector<int32_t> & word = sc.word;
    word.clear();
    if (ignore_merges) {
        auto it = by_spelled.find(byte_level_encode(key));
        if (it != by_spelled.end()) word.push_back(it->second);
    }
    if (word.empty()) bpe_merge(p, n, sc, word);
    out.insert(out.end(), word.begin(), word.end());
    std::lock_guard<std::mutex> g(cache_mu);
    if (cache.size() >= kCacheMax) cache.clear();  // bounded; the hot words come back fast
    cache.emplace(std::move(key), word);
}

// Merges by rank with a heap over adjacent pairs (HF's word.rs): stale entries are skipped
// when the pair at their position no longer yields the same token.
void BpeTokenizer::Impl::bpe_merge(const char * p, size_t n, EncodeScratch & sc, std::vector<int32_t> & word) const {
    std::vector<Sym> & s = sc.syms;
    s.clear();
    for (size_t i = 0; i < n; i++) {
        int32_t id = byte_id[(unsigned char)p[i]];
        if (id < 0) continue;  // a byte missing from the vocabulary (no unk): dropped, as HF does
        int32_t k = int32_t(s.size());
        s.push_back({id, k - 1, -1, 1});
        if (k > 0) s[k - 1].next = k;
    }
    std::vector<Cand> & h = sc.heap;
    h.clear();
    auto push = [&](int32_t pos) {
        if (pos < 0 || s[pos].next < 0) return;
        auto it = merges.find(pair_key(s[pos].id, s[s[pos].next].id));
        if (it == merges.end()) return;
        h.push_back({it->second.rank, pos, it->second.id});
        std::push_heap(h.begin(), h.end());
    };
    for (int32_t i = 0; i + 1 < int32_t(s.size()); i++) push(i);
    while (!h.empty()) {
        std::pop_heap(h.begin(), h.end());
        Cand c = h.back();
        h.pop_back();
        Sym & x = s[c.pos];
        if (x.len == 0 || x.next < 0) continue;
        Sym & y = s[x.next];
        auto it = merges.find(pair_key(x.id, y.id));
        if (it == merges.end() || it->second.id != c.id) continue;
        x.id = c.id;
        x.len += y.len;
        y.len = 0;
        x.next = y.next;
        if (x.next >= 0) s[x.next].prev = c.pos;
        push(x.prev);
        push(c.pos);
    }
    for (const Sym & x : s)
        if (x.len) word.push_back(x.id);
}

void BpeTokenizer::Impl::pre_bpe(const char * p, size_t n, std::vector<int64_t> & out) const {
    if (n == 0) return;
    EncodeScratch & sc = encode_scratch();
    // The common case (Qwen3, Llama-3, GPT-2): one isolating split, words straight to BPE.
    if (steps.size() == 1 && !steps[0].prefix_space && steps[0].behavior == Behavior::Isolated &&
        !steps[0].invert) {
        size_t prev = 0;
        steps[0].re->for_each(p, n, [&](size_t a, size_t b) {
            if (a > prev) bpe_word(p + prev, a - prev, out);
            bpe_word(p + a, b - a, out);
            prev = b;
        });
        if (prev < n) bpe_word(p + prev, n - prev, out);
        return;
    }
    std::vector<Span> & cur = sc.spans;
    std::vector<Span> & nxt = sc.spans2;
    cur.assign(1, Span{0, uint32_t(n)});
    const char * text = p;
    std::string local;  // owns the text once a prefix space was inserted
    for (const PreStep & st : steps) {
        nxt.clear();
        if (st.prefix_space) {
            std::string t;
            for (const Span & x : cur) {
                uint32_t a = uint32_t(t.size());
                if (x.b > x.a && text[x.a] != ' ') t += ' ';
                t.append(text + x.a, x.b - x.a);
                nxt.push_back({a, uint32_t(t.size())});
            }
            local.swap(t);
            text = local.data();
        } else {
            for (const Span & x : cur) {
                std::vector<Mark> & m = sc.marks;
                m.clear();
                uint32_t prev = x.a;
                st.re->for_each(text + x.a, x.b - x.a, [&](size_t a, size_t b) {
                    uint32_t ua = x.a + uint32_t(a), ub = x.a + uint32_t(b);
                    if (ua > prev) m.push_back({prev, ua, false});
                    m.push_back({ua, ub, true});
                    prev = ub;
                });
                if (prev < x.b) m.push_back({prev, x.b, false});
                if (st.invert)
                    for (Mark & k : m) k.match = !k.match;
                behavior_apply(st.behavior, m, nxt);
            }
        }
        cur.swap(nxt);
    }
    // `cur` may be overwritten by bpe_word's use of the scratch: copy the spans first.
    std::vector<Span> spans(cur.begin(), cur.end());
    for (const Span & x : spans)
        if (x.b > x.a) bpe_word(text + x.a, x.b - x.a, out);
}

void BpeTokenizer::Impl::encode_normalized(const char * p, size_t n, std::vector<int64_t> & out) const {
    if (added_norm.empty) return pre_bpe(p, n, out);
    size_t from = 0, a, b;
    while (const AddedToken * t = added_norm.find(p, n, from, a, b)) {
        pre_bpe(p + from, a - from, out);
        out.push_back(t->id);
        from = b;
    }
    pre_bpe(p + from, n - from, out);
}

void BpeTokenizer::Impl::encode_segment(const char * p, size_t n, std::vector<int64_t> & out) const {
    if (n == 0) return;
    bool ascii = true;
    for (size_t i = 0; i < n && ascii; i++) ascii = (unsigned char)p[i] < 0x80;
    if (norm.empty() || ascii) return encode_normalized(p, n, out);
    // A local copy: the scratch buffers are reused by nested calls.
    std::string normed, tmp;
    normalize(p, n, norm, normed, tmp);
    encode_normalized(normed.data(), normed.size(), out);
}

void BpeTokenizer::Impl::encode(const char * p, size_t n, std::vector<int64_t> & out) const {
    size_t from = 0, a, b;
    while (const AddedToken * t = added_raw.find(p, n, from, a, b)) {
        encode_segment(p + from, a - from, out);
        out.push_back(t->id);
        from = b;
    }
    encode_segment(p + from, n - from, out);
}

BpeTokenizer::BpeTokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
BpeTokenizer::~BpeTokenizer() = default;

void BpeTokenizer::encode_into(const char * text, size_t len, std::vector<int64_t> & out) const {
    impl_->encode(text, len, out);
}

std::vector<int64_t> BpeTokenizer::encode(const std::string & text, bool add_special_tokens) const {
    std::vector<int64_t> out;
    out.reserve(text.size() / 3 + 4);
    if (add_special_tokens) out.insert(out.end(), impl_->prefix_ids.begin(), impl_->prefix_ids.end());
    impl_->encode(text.data(), text.size(), out);
    if (add_special_tokens) out.insert(out.end(), impl_->suffix_ids.begin(), impl_->suffix_ids.end());
    return out;
}

std::string BpeTokenizer::decode(const std::vector<int64_t> & ids, bool skip_special_tokens) const {
    std::string bytes;
    const Impl & m = *impl_;
    for (int64_t id : ids) {
        if (id < 0 || size_t(id) >= m.present.size() || !m.present[id])
            throw std::runtime_error("id " + std::to_string(id) + " is not in the vocabulary (0.." +
                                     std::to_string(int64_t(m.present.size()) - 1) + ")");
        if (skip_special_tokens && m.special[id]) continue;
        bytes += m.raw[id];
    }
    return utf8_lossy(bytes);
}

int64_t BpeTokenizer::vocab_size() const { return int64_t(impl_->spelled.size()); }

int64_t BpeTokenizer::token_to_id(const std::string & token) const {
    auto it = impl_->by_spelled.find(token);
    return it == impl_->by_spelled.end() ? -1 : it->second;
}

static void id_check(const BpeTokenizer::Impl & m, int64_t id) {
    if (id < 0 || size_t(id) >= m.present.size() || !m.present[id])
        throw std::runtime_error("id " + std::to_string(id) + " is not in the vocabulary (0.." +
                                 std::to_string(int64_t(m.present.size()) - 1) + ")");
}

std::string BpeTokenizer::id_to_token(int64_t id) const {
    id_check(*impl_, id);
    return impl_->spelled[id];
}

std::string BpeTokenizer::token_bytes(int64_t id) const {
    id_check(*impl_, id);
    return impl_->raw[id];
}

bool BpeTokenizer::is_special(int64_t id) const {
    return id >= 0 && size_t(id) < impl_->special.size() && impl_->special[id];
}

} // namespace qatlab
