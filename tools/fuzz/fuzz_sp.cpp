// fuzz_sp: libFuzzer target for SentencePiece models as qatlab loads them: the model check of
// lib/tokenizer_sp_check.cpp, then the module lib/sp/ (linked in directly, without LibTorch: the
// module exists to keep SentencePiece's flags away from c10's). What passes encodes samples,
// decodes them and walks the piece table: a crash past the check is a hole in the check.
#include "tools/fuzz/fuzz_common.h"
#include "lib/sp/sp_api.h"
#if __has_include("lib/tokenizer_sp_check.h")
#include "lib/tokenizer_sp_check.h"
#define FUZZ_SP_CHECK 1
#endif

#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t * data, size_t n) {
    const std::string path = fuzz::write_file("in.model", data, n);
#ifdef FUZZ_SP_CHECK
    try {
        qatlab::sentencepiece_model_check(std::string_view(reinterpret_cast<const char *>(data), n), path);
    } catch (const std::exception & e) {
        fuzz::rejected(e, path);
        return 0;
    }
#endif
    const qatlab_sp_funcs * sp = qatlab_sp_api();
    char * err = nullptr;
    qatlab_sp_processor * p = sp->load(path.c_str(), &err);
    if (!p) {
        sp->free_mem(err);
        return 0;
    }
    const int32_t size = sp->piece_size(p);
    for (int32_t id = 0; id < size && id < 512; id++) {
        size_t len = 0;
        const char * s = sp->id_to_piece(p, id, &len);
        (void)sp->piece_to_id(p, s, len);
        (void)sp->piece_kind(p, id);
    }
    int32_t special[4];
    sp->special_ids(p, special);
    static const char * const kTexts[] = {"a", "Hello world, 123 caf\xc3\xa9 \xe6\x97\xa5\xe6\x9c\xac", " \t\n  x",
                                           "\xef\xbc\xa1\xe2\x91\xa0", "\xff\xfe invalid"};
    for (const char * text : kTexts) {
        int32_t * ids = nullptr;
        size_t k = 0;
        if (sp->encode(p, text, std::strlen(text), &ids, &k, &err) != 0) {
            sp->free_mem(err);
            err = nullptr;
            continue;
        }
        for (size_t i = 0; i < k; i++)
            if (ids[i] < 0 || ids[i] >= size) std::abort();
        char * out = nullptr;
        size_t out_len = 0;
        if (sp->decode(p, ids, k, &out, &out_len, &err) == 0) sp->free_mem(out);
        else sp->free_mem(err), err = nullptr;
        sp->free_mem(ids);
    }
    sp->free_processor(p);
    return 0;
}
