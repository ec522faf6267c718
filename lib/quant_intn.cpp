// quant_intn: per-row / row-group symmetric int-N quantization, STE fake quant, the QAT switch
// and the bit-packed zstd artifact (see quant_intn.h for the rules and the file layout).
#include "lib/quant_intn.h"

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>
#include <zstd.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <regex>
#include <set>
#include <stdexcept>

#include <unistd.h>

namespace qatlab {

using json = nlohmann::json;

// -- the quantizer ---------------------------------------------------------------------------

int64_t intn_qmax(int bits) {
    if (bits < 2 || bits > 8) throw std::runtime_error("bits must be 2..8, got " + std::to_string(bits));
    return (int64_t(1) << (bits - 1)) - 1;
}

void intn_check(const at::Tensor & w, const IntNOptions & opt, const std::string & what) {
    auto fail = [&](const std::string & m) { throw std::runtime_error(what + ": " + m); };
    if (!w.defined()) fail("undefined tensor");
    if (!at::isFloatingType(w.scalar_type())) fail(std::string("expected a floating tensor, got ") + c10::toString(w.scalar_type()));
    if (w.dim() < 1 || w.numel() == 0) fail("expected a non-empty tensor with at least one dimension");
    if (opt.bits < 2 || opt.bits > 8) fail("bits must be 2..8, got " + std::to_string(opt.bits));
    if (!(opt.clip_k >= 0) || !std::isfinite(opt.clip_k)) fail("clip must be >= 0 (0 = max-abs), got " + std::to_string(opt.clip_k));
    if (opt.group_rows < 1 || w.size(0) % opt.group_rows != 0)
        fail("group_rows " + std::to_string(opt.group_rows) + " must be >= 1 and divide the " + std::to_string(w.size(0)) + " rows");
    if (opt.clip_k > 0 && w.numel() / (w.size(0) / opt.group_rows) < 2)
        fail("a std clip needs at least 2 values per group");
}

namespace {
// The weight as (groups, values per group) in float32.
at::Tensor groups_view(const at::Tensor & w, int64_t group_rows) {
    return w.detach().to(at::kFloat).reshape({w.size(0) / group_rows, -1});
}
} // namespace

at::Tensor intn_scale(const at::Tensor & w, const IntNOptions & opt) {
    intn_check(w, opt);
    at::NoGradGuard ng;
    at::Tensor g = groups_view(w, opt.group_rows);
    at::Tensor c = opt.clip_k > 0 ? g.std({1}, /*unbiased=*/true, false) * opt.clip_k : g.abs().amax({1});
    // fp16 range: a scale that rounds to 0 (or a zero group) becomes 1; huge ones saturate.
    at::Tensor s = (c / double(intn_qmax(opt.bits))).clamp_max(65504.0).to(at::kHalf).to(at::kFloat);
    return at::where(s > 0, s, at::ones_like(s));
}

IntNQuantized intn_quantize(const at::Tensor & w, const IntNOptions & opt) {
    at::Tensor s = intn_scale(w, opt);
    at::NoGradGuard ng;
    const double qmax = double(intn_qmax(opt.bits));
    at::Tensor q = (groups_view(w, opt.group_rows) / s.unsqueeze(1)).round().clamp(-qmax, qmax);
    return {q.to(at::kChar).reshape(w.sizes()), s};
}

at::Tensor intn_dequantize(const at::Tensor & q, const at::Tensor & scale, int64_t group_rows, at::ScalarType dtype) {
    if (!q.defined() || !scale.defined()) throw std::runtime_error("undefined tensor");
    if (q.dim() < 1 || scale.dim() != 1 || group_rows < 1 || q.size(0) != scale.size(0) * group_rows)
        throw std::runtime_error("" + std::to_string(q.dim() ? q.size(0) : 0) + " rows do not match " +
                                 std::to_string(scale.numel()) + " scales x group_rows " + std::to_string(group_rows));
    at::Tensor g = q.to(at::kFloat).reshape({scale.size(0), -1}) * scale.to(q.device(), at::kFloat).unsqueeze(1);
    return g.reshape(q.sizes()).to(dtype);
}

at::Tensor intn_fake_quant(const at::Tensor & w, const IntNOptions & opt) {
    at::Tensor dq;
    {
        at::NoGradGuard ng;
        IntNQuantized r = intn_quantize(w, opt);
        dq = intn_dequantize(r.q, r.scale, opt.group_rows, w.scalar_type());
    }
    if (!w.requires_grad() || !at::GradMode::is_enabled()) return dq;
    return dq + (w - w.detach());
}

// -- QAT layers and the switch ---------------------------------------------------------------

at::Tensor IntNLinear::forward(const at::Tensor & x) {
    std::optional<at::Tensor> bias = b.defined() ? std::optional<at::Tensor>(b) : std::nullopt;
    return at::linear(x, enabled ? intn_fake_quant(w, opt) : w, bias);
}

std::vector<std::pair<std::string, at::Tensor *>> IntNLinear::parameter_slots() {
    std::vector<std::pair<std::string, at::Tensor *>> s{{"weight", &w}};
    if (b.defined()) s.push_back({"bias", &b});
    return s;
}

std::vector<std::pair<std::string, std::shared_ptr<IntNLinear>>>
intn_apply(DecoderModel & m, const IntNOptions & opt, const std::string & filter) {
    std::regex re;
    try {
        re = std::regex(filter.empty() ? std::string(".*") : filter);
    } catch (const std::regex_error & e) {
        throw std::runtime_error("filter '" + filter + "' is not a valid C++ std::regex (ECMAScript syntax, not a Lua pattern): " + e.what());
    }
    std::vector<std::pair<std::string, std::shared_ptr<IntNLinear>>> out;
    for (const auto & name : m.linear_names()) {
        if (!std::regex_search(name, re)) continue;
        auto l = m.get_linear(name);
        if (auto q = std::dynamic_pointer_cast<IntNLinear>(l)) {
            intn_check(q->w, opt, name);
            q->opt = opt;
            out.push_back({name, q});
            continue;
        }
        at::Tensor w, b;
        for (auto & [slot, p] : l->parameter_slots()) {
            if (slot == "weight") w = *p;
            else if (slot == "bias") b = *p;
            else throw std::runtime_error("" + name + ": cannot wrap a layer with a '" + slot + "' parameter (only weight + bias)");
        }
        if (!w.defined() || w.dim() != 2) throw std::runtime_error("" + name + ": expected a 2-D weight");
        intn_check(w, opt, name);
        auto q = std::make_shared<IntNLinear>(w, b, opt);
        m.set_linear(name, q);
        out.push_back({name, q});
    }
    if (out.empty()) throw std::runtime_error("filter '" + filter + "' matches no linear layer (see linear_names()); the filter is a C++ std::regex "
                                               "(ECMAScript syntax, not a Lua pattern)");
    return out;
}

bool IntNSchedule::update(const Input & in) {
    if (on) return true;
    bool hit = !start_step && !lr_below && !time_fraction;
    if (start_step && in.step && *in.step >= *start_step) hit = true;
    if (lr_below && in.lr_mult && *in.lr_mult < *lr_below) hit = true;
    if (time_fraction && in.elapsed && in.budget && *in.budget > 0 && *in.elapsed / *in.budget >= *time_fraction) hit = true;
    if (hit) {
        on = true;
        switched_step = in.step.value_or(-1);
    }
    return on;
}

// -- bit packing -----------------------------------------------------------------------------

std::vector<uint8_t> intn_pack(const at::Tensor & codes, int bits) {
    at::Tensor c = codes.to(at::kCPU, at::kLong).contiguous();
    const int64_t n = c.numel();
    const int64_t * v = c.data_ptr<int64_t>();
    std::vector<uint8_t> out(size_t((n * bits + 7) / 8), 0);
    const uint64_t mask = (uint64_t(1) << bits) - 1;
    uint64_t acc = 0;
    int nacc = 0;
    size_t o = 0;
    for (int64_t i = 0; i < n; i++) {
        acc |= (uint64_t(v[i]) & mask) << nacc;
        nacc += bits;
        while (nacc >= 8) {
            out[o++] = uint8_t(acc & 0xff);
            acc >>= 8;
            nacc -= 8;
        }
    }
    if (nacc > 0) out[o++] = uint8_t(acc & 0xff);
    return out;
}

at::Tensor intn_unpack(const uint8_t * data, size_t bytes, int64_t n, int bits) {
    if (size_t((n * bits + 7) / 8) != bytes) throw std::runtime_error("intn_unpack: size mismatch");
    at::Tensor out = at::empty({n}, at::kLong);
    int64_t * v = out.data_ptr<int64_t>();
    const uint64_t mask = (uint64_t(1) << bits) - 1;
    uint64_t acc = 0;
    int nacc = 0;
    size_t o = 0;
    for (int64_t i = 0; i < n; i++) {
        while (nacc < bits) {
            acc |= uint64_t(data[o++]) << nacc;
            nacc += 8;
        }
        v[i] = int64_t(acc & mask);
        acc >>= bits;
        nacc -= bits;
    }
    return out;
}

// -- the artifact ----------------------------------------------------------------------------

namespace {

const char kMagic[8] = {'Q', 'I', 'N', 'T', 'N', 0, 0, 1};
const uint32_t kVersion = 1;
const size_t kHeader = 32;

const char * dtype_name(at::ScalarType t) {
    switch (t) {
    case at::kFloat: return "float32";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kDouble: return "float64";
    default: return nullptr;
    }
}

bool dtype_from_name(const std::string & s, at::ScalarType & out) {
    for (at::ScalarType t : {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble})
        if (s == dtype_name(t)) {
            out = t;
            return true;
        }
    return false;
}

void put_u32(std::string & s, uint32_t v) {
    for (int i = 0; i < 4; i++) s.push_back(char((v >> (8 * i)) & 0xff));
}
void put_u64(std::string & s, uint64_t v) {
    for (int i = 0; i < 8; i++) s.push_back(char((v >> (8 * i)) & 0xff));
}
uint64_t get_u64(const char * p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v |= uint64_t(uint8_t(p[i])) << (8 * i);
    return v;
}
uint32_t get_u32(const char * p) {
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) v |= uint32_t(uint8_t(p[i])) << (8 * i);
    return v;
}

void write_atomic(const std::string & path, const std::string & data) {
    std::string tmp = path + ".tmp." + std::to_string(getpid());
    FILE * f = fopen(tmp.c_str(), "wb");
    if (!f) throw std::runtime_error(path + ": cannot write: " + strerror(errno));
    bool ok = fwrite(data.data(), 1, data.size(), f) == data.size();
    ok = fflush(f) == 0 && ok;
    ok = fsync(fileno(f)) == 0 && ok;
    int err = errno;
    ok = fclose(f) == 0 && ok;
    if (!ok || rename(tmp.c_str(), path.c_str()) != 0) {
        if (ok) err = errno;
        std::remove(tmp.c_str());
        throw std::runtime_error(path + ": cannot write: " + strerror(err));
    }
}

// The stored form of one tensor: which rule applies.
struct Plan {
    bool intn = false;
    IntNOptions q;
    at::ScalarType store = at::kHalf;
};

Plan plan_for(const std::string & name, const at::Tensor & t, const IntNExportOptions & opt) {
    Plan p;
    for (const auto & r : opt.rules) {
        bool match = false;
        try {
            match = std::regex_search(name, std::regex(r.pattern));
        } catch (const std::regex_error & e) {
            throw std::runtime_error("rule '" + r.pattern + "': bad regular expression: " + e.what());
        }
        if (!match) continue;
        if (r.bits == 16 || r.bits == 32) {
            p.store = r.bits == 16 ? at::kHalf : at::kFloat;
            return p;
        }
        p.intn = true;
        p.q = opt.quant;
        p.q.bits = r.bits;
        if (r.clip_k) p.q.clip_k = *r.clip_k;
        if (r.group_rows) p.q.group_rows = *r.group_rows;
        return p;
    }
    if (t.dim() == 2 && t.numel() > opt.keep_numel) {
        p.intn = true;
        p.q = opt.quant;
    }
    return p;
}

} // namespace

IntNExportStats intn_export(const std::string & path, const NamedTensors & tensors, const IntNExportOptions & opt) {
    if (opt.level < 1 || opt.level > ZSTD_maxCLevel())
        throw std::runtime_error("zstd level must be 1.." + std::to_string(ZSTD_maxCLevel()));
    IntNExportStats st;
    json index = json::array();
    std::string blob;
    std::set<std::string> seen;
    for (const auto & [name, t0] : tensors) {
        if (name.empty() || !seen.insert(name).second) throw std::runtime_error("empty or duplicate name '" + name + "'");
        if (!t0.defined() || !dtype_name(t0.scalar_type()))
            throw std::runtime_error("" + name + ": expected a floating tensor (float32/16, bfloat16, float64)");
        at::Tensor t = t0.detach().to(at::kCPU).contiguous();
        Plan p = plan_for(name, t, opt);
        json e = {{"name", name}, {"shape", t.sizes().vec()}, {"dtype", dtype_name(t.scalar_type())}, {"offset", blob.size()}};
        if (p.intn) {
            intn_check(t, p.q, "" + name);
            IntNQuantized r = intn_quantize(t, p.q);
            auto packed = intn_pack(r.q.to(at::kLong) + intn_qmax(p.q.bits), p.q.bits);
            at::Tensor s16 = r.scale.to(at::kHalf).contiguous();
            blob.append((const char *)packed.data(), packed.size());
            blob.append((const char *)s16.data_ptr(), size_t(s16.numel()) * 2);
            e["kind"] = "intn";
            e["bits"] = p.q.bits;
            e["group_rows"] = p.q.group_rows;
            e["clip_k"] = p.q.clip_k;
            e["bytes"] = packed.size() + size_t(s16.numel()) * 2;
            st.quantized++;
        } else {
            at::Tensor v = t.to(p.store).contiguous();
            blob.append((const char *)v.data_ptr(), size_t(v.nbytes()));
            e["kind"] = "raw";
            e["store"] = dtype_name(p.store);
            e["bytes"] = v.nbytes();
            st.kept++;
        }
        index.push_back(std::move(e));
    }
    std::string idx = json{{"format", "qatlab_intn_v1"}, {"tensors", index}}.dump();
    std::string payload;
    payload.reserve(8 + idx.size() + blob.size());
    put_u64(payload, idx.size());
    payload += idx;
    payload += blob;

    std::string frame(ZSTD_compressBound(payload.size()), '\0');
    ZSTD_CCtx * cc = ZSTD_createCCtx();
    if (!cc) throw std::runtime_error("out of memory (zstd context)");
    ZSTD_CCtx_setParameter(cc, ZSTD_c_compressionLevel, opt.level);
    ZSTD_CCtx_setParameter(cc, ZSTD_c_checksumFlag, 1);
    ZSTD_CCtx_setParameter(cc, ZSTD_c_contentSizeFlag, 1);
    size_t n = ZSTD_compress2(cc, frame.data(), frame.size(), payload.data(), payload.size());
    ZSTD_freeCCtx(cc);
    if (ZSTD_isError(n)) throw std::runtime_error(path + ": zstd: " + ZSTD_getErrorName(n));
    frame.resize(n);

    std::string file(kMagic, sizeof kMagic);
    put_u32(file, kVersion);
    put_u32(file, 0);
    put_u64(file, payload.size());
    put_u64(file, frame.size());
    file += frame;
    write_atomic(path, file);
    st.file_bytes = int64_t(file.size());
    st.payload_bytes = int64_t(payload.size());
    st.index_bytes = int64_t(idx.size());
    return st;
}

std::vector<IntNEntry> intn_load(const std::string & path) {
    auto fail = [&](const std::string & m) -> void { throw std::runtime_error(path + ": " + m); };
    std::ifstream f(path, std::ios::binary);
    if (!f) fail(std::string("cannot open: ") + strerror(errno));
    std::string file((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    if (file.size() < kHeader)
        fail("truncated: " + std::to_string(file.size()) + " bytes, expected at least a " + std::to_string(kHeader) + "-byte header");
    if (memcmp(file.data(), kMagic, sizeof kMagic) != 0) fail("not a qatlab int-N artifact (bad magic)");
    if (uint32_t v = get_u32(file.data() + 8); v != kVersion) fail("unsupported version " + std::to_string(v) + " (expected 1)");
    const uint64_t payload_bytes = get_u64(file.data() + 16), frame_bytes = get_u64(file.data() + 24);
    if (frame_bytes != file.size() - kHeader)
        fail("truncated or padded: the header says a " + std::to_string(frame_bytes) + "-byte zstd frame, the file holds " +
             std::to_string(file.size() - kHeader));
    const char * frame = file.data() + kHeader;
    unsigned long long content = ZSTD_getFrameContentSize(frame, frame_bytes);
    if (content == ZSTD_CONTENTSIZE_ERROR || content == ZSTD_CONTENTSIZE_UNKNOWN || content != payload_bytes)
        fail("corrupt zstd frame (content size does not match the header's " + std::to_string(payload_bytes) + " bytes)");
    if (payload_bytes < 8 || payload_bytes > (uint64_t(1) << 40)) fail("implausible payload size " + std::to_string(payload_bytes));
    std::string payload(payload_bytes, '\0');
    size_t n = ZSTD_decompress(payload.data(), payload.size(), frame, frame_bytes);
    if (ZSTD_isError(n)) fail(std::string("corrupt zstd frame: ") + ZSTD_getErrorName(n));
    if (n != payload_bytes) fail("corrupt zstd frame: " + std::to_string(n) + " bytes, expected " + std::to_string(payload_bytes));
    const uint64_t idx_bytes = get_u64(payload.data());
    if (idx_bytes > payload_bytes - 8) fail("index size " + std::to_string(idx_bytes) + " beyond the payload");
    const char * blob = payload.data() + 8 + idx_bytes;
    const uint64_t blob_bytes = payload_bytes - 8 - idx_bytes;

    std::vector<IntNEntry> out;
    json j;
    try {
        j = json::parse(payload.begin() + 8, payload.begin() + 8 + long(idx_bytes));
    } catch (const json::exception & e) {
        fail(std::string("index: bad JSON: ") + e.what());
    }
    if (!j.is_object() || j.value("format", "") != "qatlab_intn_v1" || !j.contains("tensors") || !j["tensors"].is_array())
        fail("index: expected {\"format\": \"qatlab_intn_v1\", \"tensors\": [...]}");
    std::set<std::string> seen;
    for (const auto & e : j["tensors"]) {
        IntNEntry r;
        std::string where = "index";
        try {
            r.name = e.at("name").get<std::string>();
            where = r.name;
            r.kind = e.at("kind").get<std::string>();
            r.shape = e.at("shape").get<std::vector<int64_t>>();
            std::string dt = e.at("dtype").get<std::string>();
            if (!dtype_from_name(dt, r.dtype)) fail(r.name + ": unknown dtype '" + dt + "'");
            uint64_t off = e.at("offset").get<uint64_t>(), bytes = e.at("bytes").get<uint64_t>();
            if (!seen.insert(r.name).second) fail(r.name + ": duplicate name");
            if (off > blob_bytes || bytes > blob_bytes - off)
                fail(r.name + ": data [" + std::to_string(off) + ", +" + std::to_string(bytes) + ") beyond the " +
                     std::to_string(blob_bytes) + "-byte blob");
            int64_t numel = 1;
            for (int64_t d : r.shape) {
                if (d < 0 || (d > 0 && numel > (int64_t(1) << 40) / d)) fail(r.name + ": bad shape");
                numel *= d;
            }
            const char * p = blob + off;
            if (r.kind == "intn") {
                r.bits = e.at("bits").get<int>();
                r.group_rows = e.at("group_rows").get<int64_t>();
                r.clip_k = e.at("clip_k").get<double>();
                if (r.bits < 2 || r.bits > 8) fail(r.name + ": bits " + std::to_string(r.bits) + " not in 2..8");
                if (r.shape.empty() || numel == 0 || r.group_rows < 1 || r.shape[0] % r.group_rows != 0)
                    fail(r.name + ": shape and group_rows " + std::to_string(r.group_rows) + " do not fit");
                const int64_t ns = r.shape[0] / r.group_rows;
                const uint64_t qb = uint64_t((numel * r.bits + 7) / 8);
                if (bytes != qb + uint64_t(ns) * 2)
                    fail(r.name + ": " + std::to_string(bytes) + " bytes, expected " + std::to_string(qb + ns * 2));
                const int64_t qmax = intn_qmax(r.bits);
                at::Tensor codes = intn_unpack((const uint8_t *)p, qb, numel, r.bits);
                if (codes.max().item<int64_t>() > 2 * qmax) fail(r.name + ": code out of range");
                r.q = (codes - qmax).to(at::kChar).reshape(r.shape);
                at::Tensor s16 = at::empty({ns}, at::kHalf);
                memcpy(s16.data_ptr(), p + qb, size_t(ns) * 2);
                r.scale = s16.to(at::kFloat);
                if (!(r.scale > 0).logical_and(r.scale.isfinite()).all().item<bool>()) fail(r.name + ": scales must be positive and finite");
                r.value = intn_dequantize(r.q, r.scale, r.group_rows, r.dtype);
            } else if (r.kind == "raw") {
                at::ScalarType st;
                std::string s = e.at("store").get<std::string>();
                if (!dtype_from_name(s, st)) fail(r.name + ": unknown store dtype '" + s + "'");
                if (bytes != uint64_t(numel) * c10::elementSize(st))
                    fail(r.name + ": " + std::to_string(bytes) + " bytes, expected " + std::to_string(numel * c10::elementSize(st)));
                at::Tensor v = at::empty(r.shape, st);
                if (bytes) memcpy(v.data_ptr(), p, bytes);
                r.value = v.to(r.dtype);
            } else {
                fail(r.name + ": unknown kind '" + r.kind + "' (expected intn or raw)");
            }
        } catch (const json::exception & ex) {
            fail("index: " + where + ": " + ex.what());
        }
        out.push_back(std::move(r));
    }
    return out;
}

} // namespace qatlab
