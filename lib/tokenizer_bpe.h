// tokenizer_bpe: internals of the byte-level BPE shared by tokenizer.cpp (which runs it) and
// tokenizer_load.cpp (which builds it from files); not part of the API.
#pragma once
#include "lib/tokenizer.h"

#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

struct pcre2_real_code_8;  // pcre2_code with PCRE2_CODE_UNIT_WIDTH 8

namespace qatlab {
namespace bpe_detail {

// "<file>: <key>: <what>"
[[noreturn]] void fail(const std::string & file, const std::string & key, const std::string & what);

// Token tables are dense (indexed by id): a file may leave at most this many ids unused, so that
// one large id in a small file cannot cost gigabytes.
constexpr int64_t kIdSlack = 65536;

enum class NormForm { NFC, NFD, NFKC, NFKD };
enum class Behavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous };

// A PCRE2 pattern compiled with UTF, UCP and JIT; \s is rewritten to Oniguruma's meaning.
class Regex {
public:
    Regex(const std::string & pattern, bool literal, const std::string & file, const std::string & key);
    ~Regex();
    Regex(const Regex &) = delete;
    Regex & operator=(const Regex &) = delete;
    // Calls fn(start, end) for each non-empty match in s[0, n), left to right (tokenizer.cpp).
    // A match that outgrows the JIT stack is redone by the interpreter; one past the match or
    // heap limit (a catastrophic pattern) throws, naming the file, the key and the pattern.
    template <class F>
    void for_each(const char * s, size_t n, F && fn) const;

private:
    pcre2_real_code_8 * code_ = nullptr;
    bool jit_ = false;
    std::string pattern_, file_, key_;  // for errors
};

extern const char * const kGpt2Regex;    // GPT-2, also ByteLevel's use_regex
extern const char * const kLlama3Regex;  // Llama-3: digits in groups of up to 3
extern const char * const kQwen2Regex;   // Qwen2/3: single digits

struct PreStep {
    bool prefix_space = false;  // ByteLevel add_prefix_space: " " before each piece lacking one
    std::shared_ptr<Regex> re;
    Behavior behavior = Behavior::Isolated;
    bool invert = false;
};

struct AddedToken {
    std::string content;
    int32_t id;
    bool special, normalized, lstrip, rstrip, single_word;
};

// Leftmost-longest matching of added tokens, indexed by first byte.
struct AddedMatcher {
    std::vector<const AddedToken *> by_first[256];
    bool empty = true;
    void add(const AddedToken * t);
    // Next match at or after `from`: [a, b) including stripped whitespace, and the token.
    const AddedToken * find(const char * s, size_t n, size_t from, size_t & a, size_t & b) const;
};

struct MergeVal {
    uint32_t rank;
    int32_t id;
};

struct EncodeScratch;

} // namespace bpe_detail

struct BpeTokenizer::Impl {
    using NormForm = bpe_detail::NormForm;
    std::string source;                       // file name for errors
    int64_t id_limit = int64_t(1) << 30;      // ids must be below: tables are dense, sized by the largest
    std::vector<std::string> spelled;         // id → token as the vocabulary spells it
    std::vector<std::string> raw;             // id → bytes
    std::vector<uint8_t> present, special;
    std::unordered_map<std::string, int32_t> by_spelled;
    std::unordered_map<uint64_t, bpe_detail::MergeVal> merges;  // (left id, right id) → rank, token
    int32_t byte_id[256];
    bool ignore_merges = false;

    std::vector<NormForm> norm;
    std::vector<bpe_detail::PreStep> steps;
    std::vector<bpe_detail::AddedToken> added;
    bpe_detail::AddedMatcher added_raw, added_norm;  // matched before / after normalization
    std::vector<int64_t> prefix_ids, suffix_ids;     // what add_special_tokens puts around

    mutable std::mutex cache_mu;
    mutable std::unordered_map<std::string, std::vector<int32_t>> cache;  // pre-token → ids
    std::string joined;                              // merge_add's buffer

    static uint64_t pair_key(int32_t l, int32_t r) { return (uint64_t(uint32_t(l)) << 32) | uint32_t(r); }

    // -- building (tokenizer_load.cpp calls these) --
    void id_set(int64_t id, const std::string & sp, const std::string & bytes);
    void vocab_add(const std::string & sp, int64_t id);  // spelled in GPT-2's alphabet
    void added_add(bpe_detail::AddedToken t);
    void merge_add(const std::string & l, const std::string & r, size_t rank, const std::string & where);
    void finish();  // after vocab, merges and added tokens: the byte table and matchers

    // -- encoding --
    void encode(const char * p, size_t n, std::vector<int64_t> & out) const;
    void encode_segment(const char * p, size_t n, std::vector<int64_t> & out) const;
    void encode_normalized(const char * p, size_t n, std::vector<int64_t> & out) const;
    void pre_bpe(const char * p, size_t n, std::vector<int64_t> & out) const;
    void bpe_word(const char * p, size_t n, std::vector<int64_t> & out) const;
    void bpe_merge(const char * p, size_t n, bpe_detail::EncodeScratch & sc, std::vector<int32_t> & word) const;
};

} // namespace qatlab
