// kd_cache: the resumable top-k cache builder (teacher forward, top-K, seeded negatives, safetensors
// shards, meta/progress JSON) and the validating, prefetching reader of safetensors and seed .pt shards.
#include "lib/kd_cache.h"

#include "lib/data.h"
#include "lib/model.h"
#include "lib/pt_reader.h"
#include "lib/safetensors.h"
#include "lib/tokenizer.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/autocast_mode.h>
#include <nlohmann/json.hpp>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include <unistd.h>

namespace fs = std::filesystem;

namespace qatlab {
namespace {

[[noreturn]] void fail(const std::string & where, const std::string & what) {
    throw std::runtime_error(where + ": " + what);
}

// A bad option of cache_build / the reader: "<option>: <what>", no C++ function name (the
// caller's name prefixes it).
[[noreturn]] void fail_option(const std::string & what) { throw std::invalid_argument(what); }

std::string shard_name(int64_t i) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "shard_%05lld.safetensors", (long long)i);
    return buf;
}

std::string shape_str(at::IntArrayRef s) {
    std::string o = "[";
    for (size_t i = 0; i < s.size(); i++) o += (i ? ", " : "") + std::to_string(s[i]);
    return o + "]";
}

void json_write_atomic(const fs::path & path, const nlohmann::json & j) {
    std::string text = j.dump(2) + "\n";
    std::string tmp = path.string() + ".tmp." + std::to_string(getpid());
    FILE * f = std::fopen(tmp.c_str(), "wb");
    if (!f) fail(path.string(), std::string("cannot write: ") + std::strerror(errno));
    // The first failing call's errno says why (a full disk: ENOSPC, often only at fflush/fclose).
    int err = 0;
    auto step = [&](bool ok) { if (!ok && !err) err = errno ? errno : EIO; };
    step(std::fwrite(text.data(), 1, text.size(), f) == text.size());
    step(std::fflush(f) == 0);
    step(fsync(fileno(f)) == 0);
    step(std::fclose(f) == 0);
    if (!err) step(std::rename(tmp.c_str(), path.c_str()) == 0);
    if (err) {
        std::remove(tmp.c_str());
        fail(path.string(), std::string("write failed: ") + std::strerror(err));
    }
}

nlohmann::json json_read(const fs::path & path) {
    std::ifstream f(path);
    if (!f) fail(path.string(), "cannot open (not a KD cache folder?)");
    try {
        return nlohmann::json::parse(f);
    } catch (const std::exception & e) {
        fail(path.string(), std::string("invalid JSON: ") + e.what());
    }
}

// FNV-1a of the ids' int64 values: resume refuses different data.
std::string ids_fingerprint(const at::Tensor & ids) {
    at::Tensor t = ids.to(at::kCPU, at::kLong).contiguous();
    uint64_t h = 1469598103934665603ull;
    auto * p = reinterpret_cast<const uint8_t *>(t.data_ptr<int64_t>());
    for (int64_t i = 0, n = t.numel() * 8; i < n; i++) h = (h ^ p[i]) * 1099511628211ull;
    char buf[32];
    std::snprintf(buf, sizeof buf, "%016llx", (unsigned long long)h);
    return buf;
}

uint64_t fnv1a(uint64_t h, const void * data, size_t n) {
    auto * p = static_cast<const uint8_t *>(data);
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 1099511628211ull;
    return h;
}

std::string hex64(uint64_t h) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%016llx", (unsigned long long)h);
    return buf;
}

std::string json_str(const nlohmann::json & j, const char * key) {
    auto it = j.find(key);
    return it != j.end() && it->is_string() ? it->get<std::string>() : std::string();
}

std::string utc_now() {
    std::time_t t = std::time(nullptr);
    char buf[64];
    std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&t));
    return buf;
}

// bf16 autocast on CUDA for an fp32 teacher; restores the previous state.
struct AutocastGuard {
    bool on = false, prev_enabled = false;
    at::ScalarType prev_dtype = at::kHalf;
    explicit AutocastGuard(bool enable) : on(enable) {
        if (!on) return;
        prev_enabled = at::autocast::is_autocast_enabled(at::kCUDA);
        prev_dtype = at::autocast::get_autocast_dtype(at::kCUDA);
        at::autocast::set_autocast_enabled(at::kCUDA, true);
        at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16);
    }
    ~AutocastGuard() {
        if (!on) return;
        at::autocast::set_autocast_enabled(at::kCUDA, prev_enabled);
        at::autocast::set_autocast_dtype(at::kCUDA, prev_dtype);
        at::autocast::clear_cache();
    }
};

uint64_t splitmix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

int64_t json_int(const nlohmann::json & j, std::initializer_list<const char *> keys, const std::string & where,
                 bool required, int64_t def = 0) {
    for (const char * k : keys) {
        auto it = j.find(k);
        if (it == j.end() || it->is_null()) continue;
        if (!it->is_number_integer()) fail(where, std::string(k) + ": expected an integer, got " + it->dump());
        return it->get<int64_t>();
    }
    if (required) fail(where, std::string("missing key '") + *keys.begin() + "'");
    return def;
}

} // namespace

uint64_t cache_shard_seed(uint64_t seed, int64_t shard) {
    return splitmix64(splitmix64(seed) ^ uint64_t(shard));
}

// -- builder ---------------------------------------------------------------------------------

CacheBuildResult cache_build(DecoderModel & teacher, const at::Tensor & ids_in, const CacheBuildOptions & o) {
    if (o.out_dir.empty()) fail_option("out: expected an output folder");
    if (!ids_in.defined() || ids_in.dim() != 2 || at::isFloatingType(ids_in.scalar_type()))
        fail_option("data: expected integer token ids (N, L)");
    at::Tensor ids = ids_in.to(at::kCPU, at::kLong).contiguous();   // (N, L)
    const int64_t N = ids.size(0), L = ids.size(1), S = L - 1;
    const int64_t V = teacher.config().vocab_size;
    if (N < 1 || L < 2) fail_option("data: expected N >= 1 and L >= 2, got " + shape_str(ids.sizes()));
    if (o.K < 1 || o.K > V) fail_option("K: expected 1 <= K <= vocab_size (" + std::to_string(V) + ")");
    if (o.R < 0) fail_option("R: expected >= 0");
    if (o.shard_size < 1 || o.batch_size < 1) fail_option("shard_size and batch_size: expected >= 1");
    if (N > 0 && (ids.min().item<int64_t>() < 0 || ids.max().item<int64_t>() >= V))
        fail_option("data: token ids outside [0, vocab_size = " + std::to_string(V) + ")");

    fs::path dir(o.out_dir), meta_path = dir / "meta.json", prog_path = dir / "progress.json";
    fs::create_directories(dir);
    const int64_t num_shards = (N + o.shard_size - 1) / o.shard_size;
    std::string fp = ids_fingerprint(ids);

    if (fs::exists(meta_path) && o.overwrite) {
        for (auto & e : fs::directory_iterator(dir)) {
            std::string name = e.path().filename().string();
            if (name == "meta.json" || name == "progress.json" || name.rfind("shard_", 0) == 0) fs::remove(e.path());
        }
    }
    int64_t next_shard = 0, n_written = 0;
    if (fs::exists(meta_path)) {
        if (!o.resume) fail(meta_path.string(), "a cache exists here; pass resume or overwrite");
        nlohmann::json m = json_read(meta_path);
        auto expect = [&](const char * key, const nlohmann::json & want) {
            if (!m.contains(key) || m[key] != want)
                fail(meta_path.string(), std::string(key) + ": the existing cache has " +
                                             (m.contains(key) ? m[key].dump() : "nothing") + ", this build " +
                                             want.dump() + " (pass overwrite to rebuild)");
        };
        expect("max_length", L);
        expect("topk", o.K);
        expect("rand_neg", o.R);
        expect("num_sequences", N);
        expect("shard_size", o.shard_size);
        expect("seed", o.seed);
        expect("input_ids_fnv1a", fp);
        if (m.contains("teacher_fingerprint") && m["teacher_fingerprint"].is_string())   // older caches lack it
            expect("teacher_fingerprint", model_fingerprint(teacher));
        if (fs::exists(prog_path)) {
            nlohmann::json p = json_read(prog_path);
            next_shard = json_int(p, {"next_shard_id"}, prog_path.string(), true);
            n_written = json_int(p, {"n_written"}, prog_path.string(), true);
        }
    } else {
        nlohmann::json m;
        m["format"] = "qwen_kd_topk_cache_v1";
        auto str = [&](const char * k, const char * def) -> nlohmann::json {
            auto it = o.meta.find(k);
            if (it != o.meta.end()) return it->second;
            return def ? nlohmann::json(def) : nlohmann::json();
        };
        const DecoderConfig & c = teacher.config();
        m["teacher_model"] = str("teacher_model", nullptr);
        if (m["teacher_model"].is_null())   // no name given: say what the teacher is
            m["teacher_model"] = c.model_type + " (" + std::to_string(c.num_hidden_layers) + " layers, hidden " +
                                 std::to_string(c.hidden_size) + ", vocab " + std::to_string(c.vocab_size) + ")";
        m["teacher_fingerprint"] = model_fingerprint(teacher);
        m["tokenizer"] = str("tokenizer", "");
        if (o.tokenizer) {
            if (m["tokenizer"] == "") m["tokenizer"] = o.tokenizer_name.empty() ? std::string(o.tokenizer->kind()) : o.tokenizer_name;
            m["tokenizer_vocab_size"] = o.tokenizer->vocab_size();
            m["tokenizer_fingerprint"] = tokenizer_fingerprint(*o.tokenizer);
        }
        m["dataset_name"] = str("dataset_name", "");
        m["dataset_config_name"] = str("dataset_config_name", nullptr);
        m["dataset_split"] = str("dataset_split", "train");
        m["dataset_format"] = str("dataset_format", "plain");
        m["dataset_text_field"] = str("dataset_text_field", "text");
        m["chat_thinking"] = str("chat_thinking", "false");
        m["max_length"] = L;
        m["topk"] = m["top_k"] = o.K;
        m["rand_neg"] = m["random_negatives"] = o.R;
        m["num_sequences"] = m["total_sequences"] = N;
        m["vocab_size"] = V;
        m["transformers_version"] = nullptr;
        m["created_utc"] = utc_now();
        // Ours: what resume checks, and where the shards come from.
        m["writer"] = "qatlab";
        m["shard_format"] = "safetensors";
        m["shard_size"] = o.shard_size;
        m["seed"] = o.seed;
        m["input_ids_fnv1a"] = fp;
        for (auto & [k, v] : o.meta)
            if (!m.contains(k)) m[k] = v;
        json_write_atomic(meta_path, m);
    }

    CacheBuildResult res;
    res.num_shards = next_shard;
    res.n_written = n_written;
    if (next_shard >= num_shards) {
        res.done = true;
        return res;
    }

    at::InferenceMode im;
    const c10::Device dev = teacher.device();
    const bool autocast = dev.is_cuda() && teacher.dtype() == at::kFloat;
    auto t0 = std::chrono::steady_clock::now();
    int64_t run_rows = 0;
    for (int64_t s = next_shard; s < num_shards; s++) {
        if (o.stop_after_shards >= 0 && res.shards_written >= o.stop_after_shards) break;
        const int64_t r0 = s * o.shard_size, n = std::min(N, r0 + o.shard_size) - r0;
        at::Tensor shard_ids = ids.narrow(0, r0, n);   // (n, L)
        at::Tensor rand_idx;                           // (n, S, R) drawn per shard, on the CPU
        if (o.R > 0) {
            auto gen = at::make_generator<at::CPUGeneratorImpl>(cache_shard_seed(o.seed, s));
            rand_idx = at::randint(V, {n, S, o.R}, gen, at::TensorOptions().dtype(at::kLong));
        }
        std::vector<at::Tensor> ti, tl, rl;
        for (int64_t b0 = 0; b0 < n; b0 += o.batch_size) {
            const int64_t b = std::min(o.batch_size, n - b0);
            at::Tensor x = shard_ids.narrow(0, b0, b).to(dev);
            at::Tensor logits;
            {
                AutocastGuard ag(autocast);
                logits = teacher.forward(x);   // (b, L, V)
            }
            logits = logits.narrow(1, 0, S);   // (b, S, V): position t predicts t+1
            auto [vals, idx] = logits.topk(o.K, -1, true, true);
            ti.push_back(idx.to(at::kInt).to(at::kCPU));
            tl.push_back(vals.to(at::kHalf).to(at::kCPU));
            if (o.R > 0) {
                at::Tensor ri = rand_idx.narrow(0, b0, b).to(dev);
                rl.push_back(logits.gather(-1, ri).to(at::kHalf).to(at::kCPU));
            }
        }
        NamedTensors out = {
            {"input_ids", shard_ids.to(at::kInt)},
            {"attention_mask", at::ones({n, L}, at::kByte)},
            {"topk_idx", at::cat(ti)},
            {"topk_logits", at::cat(tl)},
        };
        if (o.R > 0) {
            out.emplace_back("rand_idx", rand_idx.to(at::kInt));
            out.emplace_back("rand_logits", at::cat(rl));
        }
        safetensors_save((dir / shard_name(s)).string(), out);
        n_written = r0 + n;
        res.shards_written++;
        res.num_shards = s + 1;
        res.n_written = n_written;
        run_rows += n;
        json_write_atomic(prog_path, {{"n_written", n_written}, {"next_shard_id", s + 1}, {"done", s + 1 == num_shards}});
        double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        if (o.on_progress) o.on_progress(n_written, N, secs > 0 ? run_rows / secs : 0.0);
    }
    res.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    res.seq_per_s = res.seconds > 0 ? run_rows / res.seconds : 0;
    res.done = res.num_shards == num_shards;
    return res;
}

// -- fingerprints --------------------------------------------------------------------------------

std::string model_fingerprint(DecoderModel & m) {
    const DecoderConfig & c = m.config();
    std::string arch = c.model_type + " " + std::to_string(c.vocab_size) + " " + std::to_string(c.hidden_size) + " " +
                       std::to_string(c.intermediate_size) + " " + std::to_string(c.num_hidden_layers) + " " +
                       std::to_string(c.num_attention_heads) + " " + std::to_string(c.num_key_value_heads) + " " +
                       std::to_string(c.head_dim) + " " + std::to_string(c.rope_theta) + " " +
                       std::to_string(int(c.tie_word_embeddings));
    uint64_t h = fnv1a(1469598103934665603ull, arch.data(), arch.size());
    // The first embedding rows, rounded to fp16 so a dtype or device change keeps the fingerprint.
    at::Tensor w = m.lm_head_weight();
    at::Tensor rows = w.detach().narrow(0, 0, std::min<int64_t>(4, w.size(0))).to(at::kCPU).to(at::kHalf).contiguous();
    h = fnv1a(h, rows.data_ptr(), size_t(rows.numel()) * 2);
    return c.model_type + " L" + std::to_string(c.num_hidden_layers) + " H" + std::to_string(c.hidden_size) + " V" +
           std::to_string(c.vocab_size) + " fnv1a:" + hex64(h);
}

std::string tokenizer_fingerprint(const Tokenizer & tk) {
    uint64_t h = 1469598103934665603ull;
    const int64_t V = tk.vocab_size();
    for (int64_t i = 0; i < V; i++) {
        std::string b = tk.token_bytes(i);
        uint8_t tag[2] = {uint8_t(tk.is_special(i)), 0};
        h = fnv1a(fnv1a(h, b.data(), b.size()), tag, 2);
    }
    return "V" + std::to_string(V) + " fnv1a:" + hex64(h);
}

// -- meta and shards ---------------------------------------------------------------------------

std::map<std::string, at::Tensor> cache_shard_load(const std::string & path, const CacheMeta & meta) {
    std::map<std::string, at::Tensor> raw;
    bool is_pt = path.size() > 3 && path.compare(path.size() - 3, 3, ".pt") == 0;
    if (is_pt) {
        PtValue v = pt_load(path);
        if (!v.is_dict()) fail(path, std::string("expected a dict of tensors, got ") + v.kind_name());
        for (auto & [k, t] : v.entries())
            if (k.kind == PtValue::Kind::String && t.is_tensor()) raw[k.str] = t.tensor;
    } else {
        for (auto & [k, t] : safetensors_load(path).tensors) raw[k] = t;
    }
    const int64_t L = meta.L, S = meta.L - 1;
    std::map<std::string, at::Tensor> out;
    int64_t rows = -1;
    // name, expected dtype, accepted dtypes, trailing shape, batched rank
    auto take = [&](const char * name, at::ScalarType want, std::vector<at::ScalarType> ok,
                    std::vector<int64_t> tail, bool required) {
        auto it = raw.find(name);
        if (it == raw.end()) {
            if (required) fail(path, std::string(name) + ": missing tensor");
            return;
        }
        at::Tensor t = it->second;
        if (t.dim() == (int64_t)tail.size()) t = t.unsqueeze(0);   // unbatched, as the seed's _parse_shard
        bool dtype_ok = t.scalar_type() == want;
        for (auto d : ok) dtype_ok = dtype_ok || t.scalar_type() == d;
        if (!dtype_ok)
            fail(path, std::string(name) + ": expected dtype " + c10::toString(want) + ", got " +
                           c10::toString(t.scalar_type()));
        std::vector<int64_t> want_shape = {rows < 0 ? t.size(0) : rows};
        want_shape.insert(want_shape.end(), tail.begin(), tail.end());
        if (t.sizes() != at::IntArrayRef(want_shape))
            fail(path, std::string(name) + ": expected shape " + shape_str(want_shape) + " (meta.json: max_length " +
                           std::to_string(L) + ", topk " + std::to_string(meta.K) + ", rand_neg " +
                           std::to_string(meta.R) + "), got " + shape_str(t.sizes()));
        rows = t.size(0);
        out[name] = t.scalar_type() == want ? t : t.to(want);
    };
    take("input_ids", at::kInt, {at::kLong}, {L}, true);
    take("topk_idx", at::kInt, {at::kLong}, {S, meta.K}, true);
    take("topk_logits", at::kHalf, {at::kBFloat16, at::kFloat}, {S, meta.K}, true);
    if (raw.count("attention_mask"))
        take("attention_mask", at::kByte, {at::kBool, at::kInt, at::kLong}, {L}, true);
    else
        out["attention_mask"] = at::ones({rows, L}, at::kByte);   // the seed's default: ones_like(ids)
    if (meta.R > 0) {
        take("rand_idx", at::kInt, {at::kLong}, {S, meta.R}, true);
        take("rand_logits", at::kHalf, {at::kBFloat16, at::kFloat}, {S, meta.R}, true);
    }
    return out;
}

CacheMeta cache_meta_load(const std::string & dir) {
    CacheMeta m;
    m.dir = dir;
    fs::path mp = fs::path(dir) / "meta.json";
    nlohmann::json j = json_read(mp);
    if (!j.is_object()) fail(mp.string(), "expected a JSON object");
    m.json = j.dump(2);
    auto fmt = j.find("format");
    if (fmt != j.end() && !(fmt->is_string() && fmt->get<std::string>() == "qwen_kd_topk_cache_v1"))
        fail(mp.string(), "format: expected \"qwen_kd_topk_cache_v1\", got " + fmt->dump());
    m.L = json_int(j, {"max_length"}, mp.string(), true);
    m.K = json_int(j, {"topk", "top_k"}, mp.string(), true);
    m.R = json_int(j, {"rand_neg", "random_negatives"}, mp.string(), false, 0);
    m.vocab_size = json_int(j, {"vocab_size"}, mp.string(), false, 0);
    m.num_sequences = json_int(j, {"num_sequences", "total_sequences"}, mp.string(), false, 0);
    m.teacher_model = json_str(j, "teacher_model");
    m.teacher_fingerprint = json_str(j, "teacher_fingerprint");
    m.tokenizer = json_str(j, "tokenizer");
    m.tokenizer_fingerprint = json_str(j, "tokenizer_fingerprint");
    m.tokenizer_vocab_size = json_int(j, {"tokenizer_vocab_size"}, mp.string(), false, 0);
    if (m.L < 2 || m.K < 1 || m.R < 0) fail(mp.string(), "max_length >= 2, topk >= 1, rand_neg >= 0 expected");
    std::vector<std::string> st, pt;
    std::error_code ec;
    for (auto & e : fs::directory_iterator(dir, ec)) {
        std::string name = e.path().filename().string();
        if (!e.is_regular_file()) continue;
        if (name.rfind("shard_", 0) == 0 && e.path().extension() == ".safetensors") st.push_back(e.path().string());
        else if (e.path().extension() == ".pt") pt.push_back(e.path().string());   // the seed: glob('*.pt')
    }
    m.shards = st.empty() ? pt : st;
    std::sort(m.shards.begin(), m.shards.end());
    if (m.shards.empty()) fail(dir, "no shard_*.safetensors or *.pt shards");
    for (auto & s : m.shards) {
        auto t = cache_shard_load(s, m);   // validates; the mapping is dropped right away
        m.shard_rows.push_back(t["input_ids"].size(0));
        m.total_rows += m.shard_rows.back();
    }
    return m;
}

void cache_check_model(const CacheMeta & meta, const DecoderModel & m, const std::string & what) {
    const int64_t v = m.config().vocab_size;
    if (meta.vocab_size > 0 && meta.vocab_size != v)
        fail((fs::path(meta.dir) / "meta.json").string(),
             "vocab_size: the cache's teacher" + (meta.teacher_model.empty() ? "" : " (" + meta.teacher_model + ")") +
                 " has " + std::to_string(meta.vocab_size) + " tokens, " + what + " has " + std::to_string(v));
}

void cache_check_tokenizer(const CacheMeta & meta, const Tokenizer & tk, const std::string & what) {
    const std::string mp = (fs::path(meta.dir) / "meta.json").string();
    const int64_t v = tk.vocab_size();
    if (meta.tokenizer_vocab_size > 0 && meta.tokenizer_vocab_size != v)
        fail(mp, "tokenizer_vocab_size: the cache was built with a tokenizer" +
                     (meta.tokenizer.empty() ? "" : " (" + meta.tokenizer + ")") + " of " +
                     std::to_string(meta.tokenizer_vocab_size) + " tokens, " + what + " has " + std::to_string(v));
    if (meta.tokenizer_vocab_size == 0 && meta.vocab_size > 0 && v > meta.vocab_size)
        fail(mp, "vocab_size: the cache's teacher has " + std::to_string(meta.vocab_size) + " tokens, " + what +
                     " has " + std::to_string(v));
    if (!meta.tokenizer_fingerprint.empty()) {
        std::string fp = tokenizer_fingerprint(tk);
        if (fp != meta.tokenizer_fingerprint)
            fail(mp, "tokenizer_fingerprint: the cache was built with " + meta.tokenizer_fingerprint + ", " + what +
                         " is " + fp + " (same size, other tokens)");
    }
}

// -- reader ----------------------------------------------------------------------------------

CacheReader::CacheReader(const std::string & dir, const CacheReaderOptions & opts) : opts_(opts) {
    if (opts_.batch_size < 1) fail_option("batch_size: expected >= 1");
    if (opts_.prefetch < 1) opts_.prefetch = 1;
    meta_ = cache_meta_load(dir);
    start();
}

CacheReader::~CacheReader() { stop(); }

int64_t CacheReader::batches_per_epoch() const {
    int64_t b = opts_.batch_size;
    return opts_.drop_last ? meta_.total_rows / b : (meta_.total_rows + b - 1) / b;
}

std::vector<std::pair<int64_t, int64_t>> CacheReader::epoch_order(int64_t epoch) const {
    const int64_t ns = (int64_t)meta_.shards.size();
    const uint64_t es = cache_shard_seed(opts_.seed, epoch);
    std::vector<int64_t> shard_order(ns);
    for (int64_t i = 0; i < ns; i++) shard_order[i] = i;
    if (opts_.shuffle) shard_order = data_permutation(ns, es);
    std::vector<std::pair<int64_t, int64_t>> out;
    out.reserve(meta_.total_rows);
    for (int64_t s : shard_order) {
        int64_t n = meta_.shard_rows[s];
        if (opts_.shuffle)
            for (int64_t r : data_permutation(n, cache_shard_seed(es, s + 1))) out.emplace_back(s, r);
        else
            for (int64_t r = 0; r < n; r++) out.emplace_back(s, r);
    }
    return out;
}

void CacheReader::start() {
    {
        std::lock_guard<std::mutex> lk(mu_);
        stopping_ = false;
        queue_.clear();
    }
    ended_ = false;
    thread_ = std::thread(&CacheReader::loader_run, this, epoch_);
}

void CacheReader::stop() {
    {
        std::lock_guard<std::mutex> lk(mu_);
        stopping_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
    std::lock_guard<std::mutex> lk(mu_);
    queue_.clear();
}

void CacheReader::reset(std::optional<int64_t> epoch) {
    stop();
    epoch_ = epoch ? *epoch : epoch_ + 1;
    start();
}

bool CacheReader::queue_push(Item item) {
    std::unique_lock<std::mutex> lk(mu_);
    cv_.wait(lk, [&] { return stopping_ || (int64_t)queue_.size() < opts_.prefetch; });
    if (stopping_) return false;
    queue_.push_back(std::move(item));
    cv_.notify_all();
    return true;
}

std::optional<CacheBatch> CacheReader::next() {
    if (ended_) return std::nullopt;
    Item it;
    {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return !queue_.empty(); });
        it = std::move(queue_.front());
        queue_.pop_front();
    }
    cv_.notify_all();
    if (it.error) {
        ended_ = true;
        std::rethrow_exception(it.error);
    }
    if (!it.batch) ended_ = true;
    return std::move(it.batch);
}

void CacheReader::loader_run(int64_t epoch) {
    try {
        at::NoGradGuard ng;
        const bool rand = opts_.with_rand && meta_.R > 0;
        std::vector<const char *> names = {"input_ids", "attention_mask", "topk_idx", "topk_logits"};
        if (rand) {
            names.push_back("rand_idx");
            names.push_back("rand_logits");
        }
        auto order = epoch_order(epoch);
        const int64_t B = opts_.batch_size, total = (int64_t)order.size();
        std::vector<std::vector<at::Tensor>> pieces(names.size());   // parts of the pending batch
        int64_t pending = 0;
        auto emit = [&]() -> bool {
            CacheBatch b;
            at::Tensor * slots[] = {&b.input_ids, &b.attention_mask, &b.topk_idx, &b.topk_logits, &b.rand_idx,
                                    &b.rand_logits};
            for (size_t k = 0; k < names.size(); k++) {
                at::Tensor t = pieces[k].size() == 1 ? pieces[k][0] : at::cat(pieces[k]);
                if (opts_.device.is_cuda()) t = t.pin_memory().to(opts_.device, /*non_blocking=*/true);
                *slots[k] = t;
                pieces[k].clear();
            }
            pending = 0;
            return queue_push(Item{std::move(b), nullptr});
        };
        std::map<std::string, at::Tensor> shard;
        int64_t cur = -1;
        for (int64_t i = 0; i < total;) {
            // A run of consecutive rows of one shard, at most what the pending batch still needs.
            int64_t s = order[i].first, j = i;
            while (j < total && order[j].first == s && pending + (j - i) < B) j++;
            if (s != cur) {
                shard.clear();   // unmaps the previous shard
                shard = cache_shard_load(meta_.shards[s], meta_);
                cur = s;
            }
            at::Tensor rows;
            const bool contiguous_run = !opts_.shuffle;   // unshuffled runs are row ranges
            if (!contiguous_run) {
                std::vector<int64_t> r(j - i);
                for (int64_t k = i; k < j; k++) r[k - i] = order[k].second;
                rows = at::tensor(r, at::kLong);
            }
            for (size_t k = 0; k < names.size(); k++) {
                const at::Tensor & t = shard[names[k]];
                pieces[k].push_back(contiguous_run ? t.narrow(0, order[i].second, j - i).clone() : t.index_select(0, rows));
            }
            pending += j - i;
            i = j;
            if (pending == B && !emit()) return;
        }
        shard.clear();
        if (pending > 0 && !opts_.drop_last && !emit()) return;
        queue_push(Item{std::nullopt, nullptr});
    } catch (...) {
        queue_push(Item{std::nullopt, std::current_exception()});
    }
}

} // namespace qatlab
