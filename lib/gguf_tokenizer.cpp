// gguf_tokenizer: the byte-level BPE tokenizer stored in a GGUF file's tokenizer.ggml.* metadata
// (a real model ships its tokenizer this way), built through BpeTokenizer::from_vocab.
#include "lib/gguf.h"
#include "lib/tokenizer.h"

#include <new>
#include <stdexcept>

namespace qatlab {

std::unique_ptr<BpeTokenizer> gguf_tokenizer(const GgufFile & f, const std::string & path) try {
    std::string model = gguf_has(f, "tokenizer.ggml.model") ? gguf_get_string(f, "tokenizer.ggml.model") : "";
    if (model != "gpt2")
        throw std::runtime_error(path + ": tokenizer.ggml.model: expected \"gpt2\" (byte-level BPE), found \"" +
                                 model + "\" (SentencePiece-style GGUF vocabularies are not supported)");
    BpeVocab v;
    v.source = path;
    v.tokens = gguf_get_strings(f, "tokenizer.ggml.tokens");
    v.merges = gguf_get_strings(f, "tokenizer.ggml.merges");
    if (gguf_has(f, "tokenizer.ggml.token_type"))
        for (int64_t t : gguf_get_ints(f, "tokenizer.ggml.token_type")) v.token_types.push_back(int32_t(t));
    if (gguf_has(f, "tokenizer.ggml.pre")) v.pre = gguf_get_string(f, "tokenizer.ggml.pre");
    v.bos_id = gguf_get_int(f, "tokenizer.ggml.bos_token_id", -1);
    v.eos_id = gguf_get_int(f, "tokenizer.ggml.eos_token_id", -1);
    v.pad_id = gguf_get_int(f, "tokenizer.ggml.padding_token_id", -1);
    v.unk_id = gguf_get_int(f, "tokenizer.ggml.unknown_token_id", -1);
    if (gguf_has(f, "tokenizer.ggml.add_bos_token")) v.add_bos = gguf_get_bool(f, "tokenizer.ggml.add_bos_token");
    if (gguf_has(f, "tokenizer.ggml.add_eos_token")) v.add_eos = gguf_get_bool(f, "tokenizer.ggml.add_eos_token");
    return BpeTokenizer::from_vocab(v);
} catch (const std::bad_alloc &) {
    throw std::runtime_error(path + ": out of memory while building its tokenizer");
} catch (const std::length_error & e) {
    throw std::runtime_error(path + ": its tokenizer tables are too large (" + e.what() + ")");
}

} // namespace qatlab
