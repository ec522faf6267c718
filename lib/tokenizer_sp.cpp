// tokenizer_sp: SentencePiece models through libqatlab_sp.so (lib/sp/), dlopened at first use so
// that libsentencepiece's symbols (its FLAGS_minloglevel) never interpose on c10's; training too.
#include "lib/tokenizer.h"

#include "lib/sp/sp_api.h"
#include "lib/tokenizer_sp_check.h"

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <stdexcept>
#include <unordered_map>
#include <vector>

#include <dlfcn.h>
#include <unistd.h>

namespace fs = std::filesystem;

namespace qatlab {

namespace {

const char * const kSpModule = "libqatlab_sp.so";

std::string exe_dir() {
    std::error_code ec;
    fs::path exe = fs::read_symlink("/proc/self/exe", ec);
    return ec ? std::string() : exe.parent_path().string();
}

// Next to the executable, then $QATLAB_SP_MODULE_DIR, then the plain name (rpath,
// LD_LIBRARY_PATH). RTLD_LOCAL keeps SentencePiece's symbols out of the global scope;
// RTLD_DEEPBIND makes libsentencepiece bind to its own definitions, not the c10 ones
// already loaded.
const qatlab_sp_funcs * sp_module_load(std::string & error) {
    std::string dir = exe_dir();
    std::vector<std::string> tries;
    if (!dir.empty()) tries.push_back(dir + "/" + kSpModule);
    if (const char * env = std::getenv("QATLAB_SP_MODULE_DIR"); env && *env) tries.push_back(std::string(env) + "/" + kSpModule);
    tries.push_back(kSpModule);
    std::string failures;
    for (const auto & path : tries) {
        bool plain = path == kSpModule;
        std::error_code ec;
        if (!plain && !fs::exists(path, ec)) continue;
        void * h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
        if (!h) {
            const char * why = dlerror();
            std::string e = why ? why : path + ": dlopen failed";
            // The plain name being absent is "not found"; anything else (a missing
            // libsentencepiece.so.0, say) is worth telling.
            if (!plain || e.find(std::string(kSpModule) + ": cannot open shared object file") == std::string::npos)
                failures += "; " + e;
            continue;
        }
        using get_fn = const qatlab_sp_funcs * (*)();
        auto get = reinterpret_cast<get_fn>(dlsym(h, QATLAB_SP_API_SYMBOL));
        const qatlab_sp_funcs * api = get ? get() : nullptr;
        if (!api || api->version != QATLAB_SP_API_VERSION || api->size < sizeof(qatlab_sp_funcs)) {
            failures += "; " + path + ": not a compatible qatlab SentencePiece module (rebuild it)";
            dlclose(h);
            continue;
        }
        return api;  // never closed: processors may live until exit
    }
    if (!failures.empty())
        error = std::string("SentencePiece support module ") + kSpModule + " could not be loaded" + failures;
    else
        error = std::string("SentencePiece support module ") + kSpModule + " not found next to " +
                (dir.empty() ? std::string("the executable") : dir) + "; rebuild or set QATLAB_SP_MODULE_DIR";
    return nullptr;
}

const qatlab_sp_funcs & sp_api() {
    static std::once_flag once;
    static const qatlab_sp_funcs * api = nullptr;
    static std::string error;
    std::call_once(once, [] { api = sp_module_load(error); });
    if (!api) throw std::runtime_error(error);
    return *api;
}

// Takes a malloc'd message from the module.
std::string take_error(const qatlab_sp_funcs & api, char * err) {
    std::string s = err ? err : "unknown error";
    api.free_mem(err);
    return s;
}

} // namespace

struct SentencePieceTokenizer::Impl {
    const qatlab_sp_funcs * api = nullptr;
    qatlab_sp_processor * proc = nullptr;
    std::string path;
    int64_t size = 0;
    ~Impl() {
        if (proc) api->free_processor(proc);
    }
    void id_check(int64_t id) const {
        if (id < 0 || id >= size)
            throw std::runtime_error("id " + std::to_string(id) + " is not in the vocabulary (0.." +
                                     std::to_string(size - 1) + ")");
    }
    int kind(int64_t id) const { return api->piece_kind(proc, int32_t(id)); }
    std::string piece(int64_t id) const {
        size_t n = 0;
        const char * p = api->id_to_piece(proc, int32_t(id), &n);
        return std::string(p, n);
    }
};

SentencePieceTokenizer::SentencePieceTokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
SentencePieceTokenizer::~SentencePieceTokenizer() = default;

std::unique_ptr<SentencePieceTokenizer> SentencePieceTokenizer::from_file(const std::string & model_path) {
    std::error_code ec;
    if (!fs::is_regular_file(model_path, ec))
        throw std::runtime_error(model_path + ": cannot open SentencePiece model (" +
                                 (fs::exists(model_path, ec) ? "not a regular file" : "no such file") + ")");
    // Read once, prove the bytes safe for the library, then hand it these same bytes.
    std::string bytes;
    {
        std::ifstream f(model_path, std::ios::binary | std::ios::ate);
        if (!f) throw std::runtime_error(model_path + ": cannot open SentencePiece model: " + std::strerror(errno));
        std::streamoff size = f.tellg();
        if (size < 0 || size >= (std::streamoff(1) << 31))  // protobuf's own limit
            throw std::runtime_error(model_path + ": not a SentencePiece model: " + std::to_string(size) +
                                     " bytes, over the 2 GiB a ModelProto can hold");
        try {
            bytes.resize(size_t(size));
        } catch (const std::bad_alloc &) {
            throw std::runtime_error(model_path + ": out of memory reading " + std::to_string(size) + " bytes");
        }
        f.seekg(0);
        if (!f.read(bytes.data(), size)) throw std::runtime_error(model_path + ": read failed");
    }
    sentencepiece_model_check(bytes, model_path);
    const auto & api = sp_api();
    auto m = std::make_unique<Impl>();
    m->api = &api;
    m->path = model_path;
    char * err = nullptr;
    m->proc = api.load_proto(bytes.data(), bytes.size(), &err);
    if (!m->proc) throw std::runtime_error(model_path + ": not a SentencePiece model: " + take_error(api, err));
    m->size = api.piece_size(m->proc);
    int32_t special[4];
    api.special_ids(m->proc, special);
    auto tk = std::unique_ptr<SentencePieceTokenizer>(new SentencePieceTokenizer(std::move(m)));
    tk->bos_id_ = special[0];
    tk->eos_id_ = special[1];
    tk->pad_id_ = special[2];
    tk->unk_id_ = special[3];
    return tk;
}

std::vector<int64_t> SentencePieceTokenizer::encode(const std::string & text, bool add_special_tokens) const {
    const auto & api = *impl_->api;
    int32_t * ids = nullptr;
    size_t n = 0;
    char * err = nullptr;
    if (api.encode(impl_->proc, text.data(), text.size(), &ids, &n, &err) != 0)
        throw std::runtime_error(impl_->path + ": encode failed: " + take_error(api, err));
    std::vector<int64_t> out;
    try {
        out.reserve(n + 1);
    } catch (...) {
        api.free_mem(ids);
        throw;
    }
    if (add_special_tokens && bos_id_ >= 0) out.push_back(bos_id_);
    out.insert(out.end(), ids, ids + n);
    api.free_mem(ids);
    return out;
}

std::string SentencePieceTokenizer::decode(const std::vector<int64_t> & ids, bool skip_special_tokens) const {
    const auto & api = *impl_->api;
    std::vector<int32_t> v;
    v.reserve(ids.size());
    for (int64_t id : ids) {
        impl_->id_check(id);
        if (skip_special_tokens && (impl_->kind(id) & (QATLAB_SP_CONTROL | QATLAB_SP_UNKNOWN))) continue;
        v.push_back(int32_t(id));
    }
    char * text = nullptr;
    size_t len = 0;
    char * err = nullptr;
    if (api.decode(impl_->proc, v.data(), v.size(), &text, &len, &err) != 0)
        throw std::runtime_error(impl_->path + ": decode failed: " + take_error(api, err));
    std::string out;
    try {
        out.assign(text, len);
    } catch (...) {
        api.free_mem(text);
        throw;
    }
    api.free_mem(text);
    return out;
}

int64_t SentencePieceTokenizer::vocab_size() const { return impl_->size; }

int64_t SentencePieceTokenizer::token_to_id(const std::string & piece) const {
    int64_t id = impl_->api->piece_to_id(impl_->proc, piece.data(), piece.size());
    // PieceToId answers unk_id for unknown pieces: absent unless the piece is unk itself.
    if (id == unk_id_ && impl_->piece(id) != piece) return -1;
    return id;
}

std::string SentencePieceTokenizer::id_to_token(int64_t id) const {
    impl_->id_check(id);
    return impl_->piece(id);
}

std::string SentencePieceTokenizer::token_bytes(int64_t id) const {
    impl_->id_check(id);
    int kind = impl_->kind(id);
    if (kind & (QATLAB_SP_CONTROL | QATLAB_SP_UNKNOWN | QATLAB_SP_UNUSED)) return "";
    std::string p = impl_->piece(id);
    auto hex = [](char c) { return c >= '0' && c <= '9' ? c - '0' : c >= 'A' && c <= 'F' ? c - 'A' + 10 : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1; };
    if ((kind & QATLAB_SP_BYTE) && p.size() == 6 && p.compare(0, 3, "<0x") == 0 && p[5] == '>' && hex(p[3]) >= 0 &&
        hex(p[4]) >= 0)  // <0xAB>
        return std::string(1, char(hex(p[3]) * 16 + hex(p[4])));
    std::string out;
    static const std::string space = "\xE2\x96\x81";  // ▁
    for (size_t i = 0; i < p.size();) {
        if (p.compare(i, 3, space) == 0) {
            out += ' ';
            i += 3;
        } else
            out += p[i++];
    }
    return out;
}

bool SentencePieceTokenizer::is_special(int64_t id) const {
    return id >= 0 && id < impl_->size && (impl_->kind(id) & (QATLAB_SP_CONTROL | QATLAB_SP_UNKNOWN));
}

// -- training -----------------------------------------------------------------------------

std::map<std::string, std::string> sentencepiece_golf_options() {
    return {{"model_type", "bpe"},       {"character_coverage", "0.999"},
            {"byte_fallback", "true"},   {"split_digits", "true"},
            {"normalization_rule_name", "nmt_nfkc"}, {"add_dummy_prefix", "false"},
            {"pad_id", "0"},             {"bos_id", "1"},
            {"eos_id", "2"},             {"unk_id", "3"},
            {"hard_vocab_limit", "false"}};
}

std::string sentencepiece_train(const SentencePieceTrainOptions & o) {
    const char * fn = "train_sentencepiece";
    std::error_code ec;
    if (o.input.empty()) throw std::runtime_error(std::string(fn) + ": input: expected a text file, found nothing");
    if (!fs::is_regular_file(o.input, ec))
        throw std::runtime_error(std::string(fn) + ": input: " + o.input + ": no such file");
    if (o.model_prefix.empty())
        throw std::runtime_error(std::string(fn) + ": model_prefix: expected a path prefix, found nothing");
    fs::path prefix(o.model_prefix);
    fs::path dir = prefix.has_parent_path() ? prefix.parent_path() : fs::path(".");
    if (!fs::is_directory(dir, ec))
        throw std::runtime_error(std::string(fn) + ": model_prefix: directory " + dir.string() + " does not exist");
    if (o.vocab_size < 2)
        throw std::runtime_error(std::string(fn) + ": vocab_size: expected ≥ 2, found " + std::to_string(o.vocab_size));

    static std::atomic<int> counter{0};
    std::string tmp = o.model_prefix + ".tmp-" + std::to_string(getpid()) + "-" + std::to_string(counter++);
    std::unordered_map<std::string, std::string> kw;
    kw["minloglevel"] = "1";
    for (const auto & kv : o.extra) kw[kv.first] = kv.second;
    kw["input"] = o.input;
    kw["model_prefix"] = tmp;
    kw["vocab_size"] = std::to_string(o.vocab_size);
    if (!o.extra.count("model_type")) kw["model_type"] = o.model_type;
    auto cleanup = [&] {
        std::remove((tmp + ".model").c_str());
        std::remove((tmp + ".vocab").c_str());
    };
    const auto & api = sp_api();
    std::vector<const char *> keys, values;
    for (const auto & kv : kw) {
        keys.push_back(kv.first.c_str());
        values.push_back(kv.second.c_str());
    }
    char * err = nullptr;
    if (api.train(keys.data(), values.data(), keys.size(), &err) != 0) {
        std::string msg = take_error(api, err);
        cleanup();
        throw std::runtime_error(std::string(fn) + ": " + o.input + ": " + msg);
    }
    // The .vocab first: a reader that finds the .model finds its .vocab too.
    std::string model = o.model_prefix + ".model";
    if (std::rename((tmp + ".vocab").c_str(), (o.model_prefix + ".vocab").c_str()) != 0 ||
        std::rename((tmp + ".model").c_str(), model.c_str()) != 0) {
        std::string why = std::strerror(errno);
        cleanup();
        throw std::runtime_error(std::string(fn) + ": cannot rename " + tmp + ".* to " + o.model_prefix + ".*: " + why);
    }
    return model;
}

} // namespace qatlab
