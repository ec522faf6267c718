// sp_api: the C interface of libqatlab_sp.so, the SentencePiece module lib/tokenizer_sp.cpp
// dlopens (RTLD_LOCAL | RTLD_DEEPBIND), so that SentencePiece's exported symbols never meet c10's.
#pragma once
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define QATLAB_SP_API_VERSION 2

typedef struct qatlab_sp_processor qatlab_sp_processor;

// Piece kinds, as a bit set (piece_kind).
enum { QATLAB_SP_CONTROL = 1, QATLAB_SP_UNKNOWN = 2, QATLAB_SP_UNUSED = 4, QATLAB_SP_BYTE = 8 };

// Functions that can fail return NULL or nonzero and set *err to a malloc'd message (free with
// free_mem); nothing throws across the boundary. Memory a function returns is freed with free_mem.
typedef struct qatlab_sp_funcs {
    int version;     // QATLAB_SP_API_VERSION
    size_t size;     // sizeof(qatlab_sp_funcs), for adding members at the end

    void (*free_mem)(void * p);

    qatlab_sp_processor * (*load)(const char * model_path, char ** err);
    void (*free_processor)(qatlab_sp_processor * p);

    // ids: malloc'd, *n of them (NULL when *n is 0).
    int (*encode)(const qatlab_sp_processor * p, const char * text, size_t len, int32_t ** ids, size_t * n, char ** err);
    // *out: malloc'd, NUL-terminated, *out_len bytes before the NUL. Ids must be in range.
    int (*decode)(const qatlab_sp_processor * p, const int32_t * ids, size_t n, char ** out, size_t * out_len,
                  char ** err);

    int32_t (*piece_size)(const qatlab_sp_processor * p);
    int32_t (*piece_to_id)(const qatlab_sp_processor * p, const char * piece, size_t len);  // unk_id when absent
    // The piece's bytes, valid while the processor lives; id must be in range.
    const char * (*id_to_piece)(const qatlab_sp_processor * p, int32_t id, size_t * len);
    int (*piece_kind)(const qatlab_sp_processor * p, int32_t id);  // QATLAB_SP_* bits
    // bos, eos, pad, unk (-1 when the model has none).
    void (*special_ids)(const qatlab_sp_processor * p, int32_t out[4]);

    // SentencePieceTrainer::Train with n key/value flags (spm_train names, e.g. "vocab_size").
    int (*train)(const char * const * keys, const char * const * values, size_t n, char ** err);

    // A serialized ModelProto the caller has read and validated (lib/tokenizer_sp_check.h): the
    // library then never reads a file that could have changed since. Errors are in plain words.
    qatlab_sp_processor * (*load_proto)(const char * data, size_t len, char ** err);
} qatlab_sp_funcs;

// The one exported symbol.
const qatlab_sp_funcs * qatlab_sp_api(void);
#define QATLAB_SP_API_SYMBOL "qatlab_sp_api"

#ifdef __cplusplus
}
#endif
