// sp_module: libqatlab_sp.so, the only place that includes SentencePiece's headers; a plain C
// table of functions over Debian's libsentencepiece, no ATen, no exceptions across the boundary.
#include "lib/sp/sp_api.h"

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <iostream>
#include <memory>
#include <new>
#include <string>
#include <unordered_map>
#include <vector>

#include <dlfcn.h>

struct qatlab_sp_processor {
    sentencepiece::SentencePieceProcessor sp;
};

namespace {

// RTLD_DEEPBIND binds libsentencepiece's std::cerr (and cout, cin) to libstdc++'s own object. A
// PIE executable that uses std::cerr holds a copy-relocated std::cerr instead, and libstdc++
// constructs only that copy: the original stays zeroed, and SentencePiece's first LOG line
// would crash. So when the executable has its own copy, the original becomes a second stream
// over the same buffer.
template <class Stream>
void share_stream(void * exe, const char * symbol, Stream & mine) {
    auto * theirs = static_cast<Stream *>(dlsym(exe, symbol));
    if (!theirs || theirs == &mine) return;
    new (&mine) Stream(theirs->rdbuf());
    mine.flags(theirs->flags());
    mine.tie(theirs->tie());
}

struct ShareStreams {
    ShareStreams() {
        void * exe = dlopen(nullptr, RTLD_NOW);  // the executable's own scope, copies first
        if (!exe) return;
        share_stream<std::istream>(exe, "_ZSt3cin", std::cin);
        share_stream<std::ostream>(exe, "_ZSt4cout", std::cout);
        share_stream<std::ostream>(exe, "_ZSt4cerr", std::cerr);
        share_stream<std::ostream>(exe, "_ZSt4clog", std::clog);
        share_stream<std::wistream>(exe, "_ZSt4wcin", std::wcin);
        share_stream<std::wostream>(exe, "_ZSt5wcout", std::wcout);
        share_stream<std::wostream>(exe, "_ZSt5wcerr", std::wcerr);
        share_stream<std::wostream>(exe, "_ZSt5wclog", std::wclog);
        dlclose(exe);
    }
} share_streams;

char * dup_string(const std::string & s) {
    char * p = static_cast<char *>(std::malloc(s.size() + 1));
    if (p) std::memcpy(p, s.c_str(), s.size() + 1);
    return p;
}

void set_error(char ** err, const std::string & msg) {
    if (err) *err = dup_string(msg);
}

// Runs f, turning any exception into an error message and a nonzero result.
template <class F>
int guarded(char ** err, F && f) {
    try {
        return f();
    } catch (const std::exception & e) {
        set_error(err, e.what());
    } catch (...) {
        set_error(err, "unknown C++ exception in SentencePiece");
    }
    return 1;
}

void sp_free_mem(void * p) { std::free(p); }

// The library's CHECK_OR_RETURN messages read "./src/x.cc(123) [expr] detail": keep the detail,
// or say in words what the check was about.
std::string plain_status(const sentencepiece::util::Status & st) {
    std::string m = st.message() ? st.message() : "";
    size_t open = m.find(") [");
    if (m.rfind("./", 0) == 0 && open != std::string::npos) {
        size_t close = m.find("] ", open);
        std::string expr = m.substr(open + 3, close == std::string::npos ? std::string::npos : close - open - 3);
        std::string detail = close == std::string::npos ? "" : m.substr(close + 2);
        while (!detail.empty() && detail.back() == ' ') detail.pop_back();
        if (expr.find("ParseFromArray") != std::string::npos) return "the bytes are not a valid SentencePiece ModelProto";
        if (!detail.empty()) return detail;
        return "the model failed the library's consistency check (" + expr + ")";
    }
    return m.empty() ? st.ToString() : m;
}

qatlab_sp_processor * sp_load(const char * model_path, char ** err) {
    qatlab_sp_processor * out = nullptr;
    int rc = guarded(err, [&] {
        // Owned until loaded: the library throws on some models (darts: "zero-length key").
        auto p = std::make_unique<qatlab_sp_processor>();
        auto st = p->sp.Load(model_path);
        if (!st.ok()) {
            set_error(err, plain_status(st));
            return 1;
        }
        out = p.release();
        return 0;
    });
    return rc == 0 ? out : nullptr;
}

qatlab_sp_processor * sp_load_proto(const char * data, size_t len, char ** err) {
    qatlab_sp_processor * out = nullptr;
    int rc = guarded(err, [&] {
        // Owned until loaded: the library throws on some models (darts: "zero-length key").
        auto p = std::make_unique<qatlab_sp_processor>();
        auto st = p->sp.LoadFromSerializedProto(absl::string_view(data, len));
        if (!st.ok()) {
            set_error(err, plain_status(st));
            return 1;
        }
        out = p.release();
        return 0;
    });
    return rc == 0 ? out : nullptr;
}

void sp_free_processor(qatlab_sp_processor * p) { delete p; }

int sp_encode(const qatlab_sp_processor * p, const char * text, size_t len, int32_t ** ids, size_t * n, char ** err) {
    *ids = nullptr;
    *n = 0;
    return guarded(err, [&] {
        std::vector<int> v;
        auto st = p->sp.Encode(absl::string_view(text, len), &v);
        if (!st.ok()) {
            set_error(err, plain_status(st));
            return 1;
        }
        if (v.empty()) return 0;
        auto * out = static_cast<int32_t *>(std::malloc(v.size() * sizeof(int32_t)));
        if (!out) throw std::bad_alloc();
        for (size_t i = 0; i < v.size(); i++) out[i] = v[i];
        *ids = out;
        *n = v.size();
        return 0;
    });
}

int sp_decode(const qatlab_sp_processor * p, const int32_t * ids, size_t n, char ** out, size_t * out_len, char ** err) {
    *out = nullptr;
    *out_len = 0;
    return guarded(err, [&] {
        std::vector<int> v(ids, ids + n);
        std::string s;
        auto st = p->sp.Decode(v, &s);
        if (!st.ok()) {
            set_error(err, plain_status(st));
            return 1;
        }
        char * d = dup_string(s);
        if (!d) throw std::bad_alloc();
        *out = d;
        *out_len = s.size();
        return 0;
    });
}

int32_t sp_piece_size(const qatlab_sp_processor * p) { return p->sp.GetPieceSize(); }

int32_t sp_piece_to_id(const qatlab_sp_processor * p, const char * piece, size_t len) {
    return p->sp.PieceToId(absl::string_view(piece, len));
}

const char * sp_id_to_piece(const qatlab_sp_processor * p, int32_t id, size_t * len) {
    const std::string & s = p->sp.IdToPiece(id);  // a reference into the model proto
    *len = s.size();
    return s.c_str();
}

int sp_piece_kind(const qatlab_sp_processor * p, int32_t id) {
    const auto & sp = p->sp;
    return (sp.IsControl(id) ? QATLAB_SP_CONTROL : 0) | (sp.IsUnknown(id) ? QATLAB_SP_UNKNOWN : 0) |
           (sp.IsUnused(id) ? QATLAB_SP_UNUSED : 0) | (sp.IsByte(id) ? QATLAB_SP_BYTE : 0);
}

void sp_special_ids(const qatlab_sp_processor * p, int32_t out[4]) {
    out[0] = p->sp.bos_id();
    out[1] = p->sp.eos_id();
    out[2] = p->sp.pad_id();
    out[3] = p->sp.unk_id();
}

int sp_train(const char * const * keys, const char * const * values, size_t n, char ** err) {
    return guarded(err, [&] {
        std::unordered_map<std::string, std::string> kw;
        for (size_t i = 0; i < n; i++) kw[keys[i]] = values[i];
        auto st = sentencepiece::SentencePieceTrainer::Train(kw);
        if (!st.ok()) {
            set_error(err, plain_status(st));
            return 1;
        }
        return 0;
    });
}

qatlab_sp_funcs make_funcs() {
    qatlab_sp_funcs f{};
    f.version = QATLAB_SP_API_VERSION;
    f.size = sizeof(f);
    f.free_mem = sp_free_mem;
    f.load = sp_load;
    f.free_processor = sp_free_processor;
    f.encode = sp_encode;
    f.decode = sp_decode;
    f.piece_size = sp_piece_size;
    f.piece_to_id = sp_piece_to_id;
    f.id_to_piece = sp_id_to_piece;
    f.piece_kind = sp_piece_kind;
    f.special_ids = sp_special_ids;
    f.train = sp_train;
    f.load_proto = sp_load_proto;
    return f;
}

const qatlab_sp_funcs funcs = make_funcs();

} // namespace

extern "C" __attribute__((visibility("default"))) const qatlab_sp_funcs * qatlab_sp_api(void) { return &funcs; }
