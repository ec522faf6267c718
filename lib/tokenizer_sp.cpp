// tokenizer_sp: SentencePiece models through Debian's libsentencepiece: load, encode, decode,
// and training a new model into temporary names renamed at the end.
#include "lib/tokenizer.h"

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <unordered_map>

#include <unistd.h>

namespace fs = std::filesystem;

namespace qatlab {

struct SentencePieceTokenizer::Impl {
    std::string path;
    sentencepiece::SentencePieceProcessor sp;
};

SentencePieceTokenizer::SentencePieceTokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
SentencePieceTokenizer::~SentencePieceTokenizer() = default;

std::unique_ptr<SentencePieceTokenizer> SentencePieceTokenizer::from_file(const std::string & model_path) {
    std::error_code ec;
    if (!fs::is_regular_file(model_path, ec))
        throw std::runtime_error(model_path + ": cannot open SentencePiece model (" +
                                 (fs::exists(model_path, ec) ? "not a regular file" : "no such file") + ")");
    auto m = std::make_unique<Impl>();
    m->path = model_path;
    auto st = m->sp.Load(model_path);
    if (!st.ok()) throw std::runtime_error(model_path + ": not a SentencePiece model: " + st.ToString());
    auto tk = std::unique_ptr<SentencePieceTokenizer>(new SentencePieceTokenizer(std::move(m)));
    const auto & sp = tk->impl_->sp;
    tk->bos_id_ = sp.bos_id();
    tk->eos_id_ = sp.eos_id();
    tk->pad_id_ = sp.pad_id();
    tk->unk_id_ = sp.unk_id();
    return tk;
}

std::vector<int64_t> SentencePieceTokenizer::encode(const std::string & text, bool add_special_tokens) const {
    std::vector<int> ids;
    auto st = impl_->sp.Encode(text, &ids);
    if (!st.ok()) throw std::runtime_error(impl_->path + ": encode failed: " + st.ToString());
    std::vector<int64_t> out;
    out.reserve(ids.size() + 1);
    if (add_special_tokens && bos_id_ >= 0) out.push_back(bos_id_);
    out.insert(out.end(), ids.begin(), ids.end());
    return out;
}

static void sp_id_check(const sentencepiece::SentencePieceProcessor & sp, int64_t id) {
    if (id < 0 || id >= sp.GetPieceSize())
        throw std::runtime_error("id " + std::to_string(id) + " is not in the vocabulary (0.." +
                                 std::to_string(sp.GetPieceSize() - 1) + ")");
}

std::string SentencePieceTokenizer::decode(const std::vector<int64_t> & ids, bool skip_special_tokens) const {
    const auto & sp = impl_->sp;
    std::vector<int> v;
    v.reserve(ids.size());
    for (int64_t id : ids) {
        sp_id_check(sp, id);
        if (skip_special_tokens && (sp.IsControl(int(id)) || sp.IsUnknown(int(id)))) continue;
        v.push_back(int(id));
    }
    std::string out;
    auto st = sp.Decode(v, &out);
    if (!st.ok()) throw std::runtime_error(impl_->path + ": decode failed: " + st.ToString());
    return out;
}

int64_t SentencePieceTokenizer::vocab_size() const { return impl_->sp.GetPieceSize(); }

int64_t SentencePieceTokenizer::token_to_id(const std::string & piece) const {
    const auto & sp = impl_->sp;
    int id = sp.PieceToId(piece);
    // PieceToId answers unk_id for unknown pieces: absent unless the piece is unk itself.
    if (id == sp.unk_id() && sp.IdToPiece(id) != piece) return -1;
    return id;
}

std::string SentencePieceTokenizer::id_to_token(int64_t id) const {
    sp_id_check(impl_->sp, id);
    return impl_->sp.IdToPiece(int(id));
}

std::string SentencePieceTokenizer::token_bytes(int64_t id) const {
    const auto & sp = impl_->sp;
    sp_id_check(sp, id);
    if (sp.IsControl(int(id)) || sp.IsUnknown(int(id)) || sp.IsUnused(int(id))) return "";
    std::string p = sp.IdToPiece(int(id));
    if (sp.IsByte(int(id)) && p.size() == 6)  // <0xAB>
        return std::string(1, char(std::stoi(p.substr(3, 2), nullptr, 16)));
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
    const auto & sp = impl_->sp;
    return id >= 0 && id < sp.GetPieceSize() && (sp.IsControl(int(id)) || sp.IsUnknown(int(id)));
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
    sentencepiece::util::Status st;
    try {
        st = sentencepiece::SentencePieceTrainer::Train(kw);
    } catch (...) {
        cleanup();
        throw;
    }
    if (!st.ok()) {
        cleanup();
        throw std::runtime_error(std::string(fn) + ": " + o.input + ": " + st.ToString());
    }
    // The .vocab first: a reader that finds the .model finds its .vocab too.
    std::string model = o.model_prefix + ".model";
    if (std::rename((tmp + ".vocab").c_str(), (o.model_prefix + ".vocab").c_str()) != 0 ||
        std::rename((tmp + ".model").c_str(), model.c_str()) != 0) {
        std::string err = std::strerror(errno);
        cleanup();
        throw std::runtime_error(std::string(fn) + ": cannot rename " + tmp + ".* to " + o.model_prefix + ".*: " + err);
    }
    return model;
}

} // namespace qatlab
