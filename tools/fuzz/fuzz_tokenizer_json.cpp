// fuzz_tokenizer_json: libFuzzer target for lib/tokenizer_load.cpp and lib/tokenizer.cpp: the input
// is a tokenizer.json, then after a NUL byte a text to encode; what encode gives must be in the id
// table, spelled and decodable.
#include "tools/fuzz/fuzz_common.h"
#include "lib/tokenizer.h"

#include <stdexcept>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t * data, size_t n) {
    const uint8_t * nul = static_cast<const uint8_t *>(std::memchr(data, 0, n));
    const size_t json_n = nul ? size_t(nul - data) : n;
    std::string text = nul ? std::string(reinterpret_cast<const char *>(nul + 1), n - json_n - 1)
                           : std::string("Hello world! 123 <|im_end|>\n\tcafé 日本");
    const std::string path = fuzz::write_file("tokenizer.json", data, json_n);
    std::unique_ptr<qatlab::BpeTokenizer> tk;
    try {
        tk = qatlab::BpeTokenizer::from_json(path);
    } catch (const std::exception & e) {
        fuzz::rejected(e, path);
        return 0;
    }
    std::vector<int64_t> ids;
    try {
        ids = tk->encode(text, true);
    } catch (const std::exception & e) {
        fuzz::rejected(e, path);   // a regex limit on a hostile pattern, say
        return 0;
    }
    // What encode gives must be usable: every id in the table, spelled, decodable.
    try {
        for (int64_t id : ids) {
            if (id < 0 || id >= tk->vocab_size()) throw std::runtime_error("id outside [0, vocab_size)");
            (void)tk->token_to_id(tk->id_to_token(id));
            (void)tk->token_bytes(id);
            (void)tk->is_special(id);
        }
        (void)tk->decode(ids, false);
        (void)tk->decode(ids, true);
        (void)tk->token_to_id(text);
    } catch (const std::exception & e) {
        std::fprintf(stderr, "encode gave ids that the tokenizer itself rejects: %s\n", e.what());
        std::abort();
    }
    return 0;
}
