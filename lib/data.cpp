// data: text corpora, alpaca rendering, the seed's packing, seeded shuffles/splits, golf token
// shards and the KJV corpus (see data.h for the formats and where they come from).
#include "lib/data.h"

#include "lib/tokenizer.h"

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <stdexcept>

#include <unistd.h>

namespace fs = std::filesystem;

namespace qatlab {
namespace {

[[noreturn]] void fail(const std::string & where, const std::string & what) {
    throw std::runtime_error(where + ": " + what);
}

std::string file_read(const std::string & path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) fail(path, std::string("cannot open: ") + std::strerror(errno));
    std::ostringstream ss;
    ss << f.rdbuf();
    if (f.bad()) fail(path, "read error");
    return ss.str();
}

std::string strip(const std::string & s) {
    const char * ws = " \t\n\r\f\v";
    size_t b = s.find_first_not_of(ws);
    if (b == std::string::npos) return "";
    size_t e = s.find_last_not_of(ws);
    return s.substr(b, e - b + 1);
}

// Writes bytes to <path>.tmp.<pid>, then renames: readers never see a half-written file.
void file_write_atomic(const std::string & path, const void * data, size_t n) {
    fs::path p(path);
    if (p.has_parent_path()) fs::create_directories(p.parent_path());
    std::string tmp = path + ".tmp." + std::to_string(getpid());
    FILE * f = std::fopen(tmp.c_str(), "wb");
    if (!f) fail(path, std::string("cannot write: ") + std::strerror(errno));
    bool ok = std::fwrite(data, 1, n, f) == n;
    ok = (std::fflush(f) == 0) && ok;
    ok = (fsync(fileno(f)) == 0) && ok;
    ok = (std::fclose(f) == 0) && ok;
    if (!ok || std::rename(tmp.c_str(), path.c_str()) != 0) {
        std::remove(tmp.c_str());
        fail(path, std::string("write failed: ") + std::strerror(errno));
    }
}

std::string json_string_field(const nlohmann::json & o, const std::string & key, const std::string & where,
                              bool required) {
    auto it = o.find(key);
    if (it == o.end() || it->is_null()) {
        if (required) fail(where, "missing key '" + key + "'");
        return "";
    }
    if (!it->is_string()) fail(where, "'" + key + "': expected a string, got " + std::string(it->type_name()));
    return it->get<std::string>();
}

// Unbiased integer in [0, bound) from the 64-bit engine (rejection of the short top range).
uint64_t rng_below(std::mt19937_64 & rng, uint64_t bound) {
    uint64_t limit = UINT64_MAX - UINT64_MAX % bound;
    uint64_t x;
    do x = rng();
    while (x >= limit);
    return x % bound;
}

} // namespace

// -- text sources ----------------------------------------------------------------------------

std::vector<std::string> data_read_text(const std::string & path) {
    std::error_code ec;
    if (!fs::exists(path, ec)) fail(path, "no such file or folder");
    if (!fs::is_directory(path, ec)) return {file_read(path)};
    std::vector<std::string> files;
    for (auto it = fs::recursive_directory_iterator(path, ec); !ec && it != fs::recursive_directory_iterator();
         it.increment(ec))
        if (it->is_regular_file()) files.push_back(it->path().string());
    if (ec) fail(path, "cannot list: " + ec.message());
    std::sort(files.begin(), files.end());
    std::vector<std::string> out;
    out.reserve(files.size());
    for (auto & f : files) out.push_back(file_read(f));
    return out;
}

std::vector<std::string> data_read_jsonl(const std::string & path, const std::string & field) {
    std::ifstream f(path);
    if (!f) fail(path, std::string("cannot open: ") + std::strerror(errno));
    std::vector<std::string> out;
    std::string line;
    for (int64_t n = 1; std::getline(f, line); n++) {
        if (strip(line).empty()) continue;
        std::string where = path + ":" + std::to_string(n);
        nlohmann::json o;
        try {
            o = nlohmann::json::parse(line);
        } catch (const std::exception & e) {
            fail(where, std::string("invalid JSON: ") + e.what());
        }
        if (!o.is_object()) fail(where, "expected a JSON object per line");
        out.push_back(strip(json_string_field(o, field, where, true)));
    }
    return out;
}

// -- alpaca ----------------------------------------------------------------------------------

std::vector<AlpacaExample> data_read_alpaca_examples(const std::string & path) {
    std::string text = file_read(path);
    std::vector<std::pair<std::string, nlohmann::json>> objs;   // (where, object)
    size_t first = text.find_first_not_of(" \t\r\n");
    if (first != std::string::npos && text[first] == '[') {
        nlohmann::json arr;
        try {
            arr = nlohmann::json::parse(text);
        } catch (const std::exception & e) {
            fail(path, std::string("invalid JSON: ") + e.what());
        }
        for (size_t i = 0; i < arr.size(); i++) objs.emplace_back(path + ": [" + std::to_string(i) + "]", arr[i]);
    } else {
        std::istringstream ss(text);
        std::string line;
        for (int64_t n = 1; std::getline(ss, line); n++) {
            if (strip(line).empty()) continue;
            std::string where = path + ":" + std::to_string(n);
            try {
                objs.emplace_back(where, nlohmann::json::parse(line));
            } catch (const std::exception & e) {
                fail(where, std::string("invalid JSON: ") + e.what());
            }
        }
    }
    std::vector<AlpacaExample> out;
    out.reserve(objs.size());
    for (auto & [where, o] : objs) {
        if (!o.is_object()) fail(where, "expected an object with instruction, input, output");
        out.push_back({json_string_field(o, "instruction", where, true), json_string_field(o, "input", where, false),
                       json_string_field(o, "output", where, true)});
    }
    return out;
}

std::vector<std::string> data_alpaca_render(const AlpacaExample & ex, const std::string & thinking) {
    std::string user = ex.instruction;
    if (!ex.input.empty()) user += "\n\n" + ex.input;
    std::string answer = strip(ex.output);
    std::vector<ChatMessage> msgs = {{"user", user, std::nullopt}, {"assistant", answer, std::nullopt}};
    auto chat = [&](bool flag) {
        ChatFormatOptions o;
        o.enable_thinking = flag;
        o.strip_think = true;   // only acts when flag is false, as the seed's regexes do
        return chat_format_qwen3(msgs, o);
    };
    auto raw = [&] {
        std::string s = ex.instruction;
        if (!ex.input.empty()) s += "\n\n" + ex.input;
        return s + "\n\n" + answer;
    };
    if (thinking == "false") return {chat(false)};
    if (thinking == "true") return {chat(true)};
    if (thinking == "both") return {chat(false), chat(true)};
    if (thinking == "none") return {raw()};
    if (thinking == "all") return {chat(true), chat(false), raw()};
    throw std::runtime_error("thinking: expected false, true, both, none or all, got '" +
                             thinking + "'");
}

std::vector<std::string> data_read_alpaca(const std::string & path, const std::string & thinking) {
    std::vector<std::string> out;
    for (auto & ex : data_read_alpaca_examples(path))
        for (auto & s : data_alpaca_render(ex, thinking)) out.push_back(std::move(s));
    return out;
}

// -- packing ---------------------------------------------------------------------------------

at::Tensor data_pack_ids(const std::vector<std::vector<int64_t>> & docs, int64_t L, int64_t eos) {
    if (L < 1) throw std::runtime_error("L: expected >= 1, got " + std::to_string(L));
    if (eos < 0) throw std::runtime_error("eos: expected an id >= 0, got " + std::to_string(eos));
    int64_t total = 0;
    for (auto & d : docs) total += (int64_t)d.size() + 1;
    int64_t n = total / L;
    at::Tensor out = at::empty({n, L}, at::kLong);   // (N, L)
    int64_t * p = out.data_ptr<int64_t>();
    int64_t cap = n * L, i = 0;
    for (auto & d : docs) {
        for (int64_t id : d) {
            if (i == cap) return out;
            p[i++] = id;
        }
        if (i == cap) return out;
        p[i++] = eos;
    }
    return out;
}

at::Tensor data_pack(const Tokenizer & tk, const std::vector<std::string> & texts, int64_t L, int64_t eos) {
    if (eos < 0) eos = tk.eos_token_id();
    if (eos < 0) throw std::runtime_error("eos: the tokenizer has no eos id; pass one");
    std::vector<std::vector<int64_t>> docs;
    docs.reserve(texts.size());
    for (auto & t : texts) docs.push_back(tk.encode(t, false));
    return data_pack_ids(docs, L, eos);
}

// -- shuffling and splits ----------------------------------------------------------------------

std::vector<int64_t> data_permutation(int64_t n, uint64_t seed) {
    std::vector<int64_t> p(n);
    for (int64_t i = 0; i < n; i++) p[i] = i;
    std::mt19937_64 rng(seed);
    for (int64_t i = n - 1; i > 0; i--) std::swap(p[i], p[rng_below(rng, uint64_t(i) + 1)]);
    return p;
}

at::Tensor data_shuffle(const at::Tensor & t, uint64_t seed) {
    if (t.dim() < 1) throw std::runtime_error("expected a tensor with at least one dim");
    auto p = data_permutation(t.size(0), seed);
    at::Tensor idx = at::tensor(p, at::kLong).to(t.device());
    return t.index_select(0, idx);
}

std::pair<at::Tensor, at::Tensor> data_split(const at::Tensor & t, double fraction, uint64_t seed) {
    if (t.dim() < 1) throw std::runtime_error("expected a tensor with at least one dim");
    if (!(fraction >= 0 && fraction < 1))
        throw std::runtime_error("fraction: expected 0 <= fraction < 1, got " + std::to_string(fraction));
    int64_t n = t.size(0);
    int64_t held = (int64_t)std::llround(fraction * (double)n);
    if (fraction > 0 && held == 0 && n > 1) held = 1;
    if (held >= n) held = n - 1;
    if (held < 0) held = 0;
    at::Tensor s = data_shuffle(t, seed);
    return {s.narrow(0, 0, n - held).contiguous(), s.narrow(0, n - held, held).contiguous()};
}

// -- golf token shards -------------------------------------------------------------------------

void data_shard_write(const std::string & path, const at::Tensor & tokens) {
    at::Tensor t = tokens.reshape({-1}).to(at::kCPU);
    if (at::isFloatingType(t.scalar_type()) || t.scalar_type() == at::kBool)
        fail(path, std::string("tokens: expected an integer tensor, got ") + c10::toString(t.scalar_type()));
    t = t.to(at::kLong).contiguous();
    int64_t n = t.numel();
    if (n > INT32_MAX) fail(path, "tokens: more than 2^31-1 tokens do not fit the header");
    if (n > 0) {
        int64_t lo = t.min().item<int64_t>(), hi = t.max().item<int64_t>();
        if (lo < 0 || hi > 65535)
            fail(path, "tokens: expected ids in [0, 65535] (uint16), got range [" + std::to_string(lo) + ", " +
                           std::to_string(hi) + "]");
    }
    std::vector<uint8_t> buf(1024 + 2 * size_t(n));
    int32_t header[256] = {};
    header[0] = GOLF_SHARD_MAGIC;
    header[1] = GOLF_SHARD_VERSION;
    header[2] = int32_t(n);
    std::memcpy(buf.data(), header, 1024);   // little-endian host (x86-64, aarch64)
    const int64_t * src = t.data_ptr<int64_t>();
    uint16_t * dst = reinterpret_cast<uint16_t *>(buf.data() + 1024);
    for (int64_t i = 0; i < n; i++) dst[i] = uint16_t(src[i]);
    file_write_atomic(path, buf.data(), buf.size());
}

at::Tensor data_shard_read(const std::string & path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) fail(path, std::string("cannot open: ") + std::strerror(errno));
    f.seekg(0, std::ios::end);
    int64_t size = f.tellg();
    f.seekg(0);
    if (size < 1024) fail(path, "expected a 1024-byte header (256 int32), the file has " + std::to_string(size) + " bytes");
    int32_t header[256];
    f.read(reinterpret_cast<char *>(header), 1024);
    if (header[0] != GOLF_SHARD_MAGIC)
        fail(path, "header[0]: expected magic 20240520, got " + std::to_string(header[0]) + " (not a token shard)");
    if (header[1] != GOLF_SHARD_VERSION)
        fail(path, "header[1]: expected version 1, got " + std::to_string(header[1]));
    int64_t n = header[2];
    if (n < 0) fail(path, "header[2]: negative token count " + std::to_string(n));
    if (size != 1024 + 2 * n)
        fail(path, "size: expected 1024 + 2 * " + std::to_string(n) + " = " + std::to_string(1024 + 2 * n) +
                       " bytes for the header's token count, got " + std::to_string(size));
    std::vector<uint16_t> raw(n);
    f.read(reinterpret_cast<char *>(raw.data()), 2 * n);
    if (!f) fail(path, "read error");
    at::Tensor out = at::empty({n}, at::kLong);
    int64_t * p = out.data_ptr<int64_t>();
    for (int64_t i = 0; i < n; i++) p[i] = raw[i];
    return out;
}

// -- the King James Bible ----------------------------------------------------------------------

std::string data_kjv_path(const std::string & cache_dir) {
    fs::path out = fs::path(cache_dir) / "kjv.txt";
    std::error_code ec;
    if (fs::exists(out, ec) && fs::file_size(out, ec) > 0) return out.string();
    FILE * p = popen("bible -f 'Gen1:1-Rev22:21' 2>/dev/null", "r");
    if (!p) fail(out.string(), "cannot run the `bible` CLI");
    std::string text, line;
    char buf[1 << 16];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) line.append(buf, n);
    int rc = pclose(p);
    if (rc != 0 || line.size() < 1000000)
        fail(out.string(), "the KJV text needs the Debian package bible-kjv (`apt-get install bible-kjv`; "
                           "tools/setup.sh installs it): `bible -f Gen1:1-Rev22:21` failed");
    // Drop the "Ge1:1 " reference at the start of each verse line.
    text.reserve(line.size());
    std::istringstream ss(line);
    std::string l;
    while (std::getline(ss, l)) {
        size_t sp = l.find(' ');
        if (sp != std::string::npos && sp < 16 && l.find(':') < sp) l = l.substr(sp + 1);
        if (l.empty()) continue;
        text += l;
        text += '\n';
    }
    file_write_atomic(out.string(), text.data(), text.size());
    return out.string();
}

} // namespace qatlab
