// fuzz_config: libFuzzer target for config.json parsing in lib/model.cpp: any bytes as config
// text; what parses is dumped and parsed again, and must come back with the same architecture.
#include "tools/fuzz/fuzz_common.h"
#include "lib/model.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t * data, size_t n) {
    const std::string src = "fuzz/config.json";
    qatlab::DecoderConfig c;
    try {
        c = qatlab::decoder_config_parse(std::string(reinterpret_cast<const char *>(data), n), src);
    } catch (const std::exception & e) {
        fuzz::rejected(e, src);
        return 0;
    }
    qatlab::DecoderConfig d = qatlab::decoder_config_parse(qatlab::decoder_config_dump(c), src);
    if (d.model_type != c.model_type || d.vocab_size != c.vocab_size || d.hidden_size != c.hidden_size ||
        d.intermediate_size != c.intermediate_size || d.num_hidden_layers != c.num_hidden_layers ||
        d.num_attention_heads != c.num_attention_heads || d.num_key_value_heads != c.num_key_value_heads ||
        d.head_dim != c.head_dim || d.tie_word_embeddings != c.tie_word_embeddings)
        std::abort();   // save_pretrained would write another model than the one read
    return 0;
}
