// Tests for lib/pt_reader: files written by real PyTorch (dicts, state dicts, views, KD shards,
// CUDA tags, protocols 2-5), hand-built zips and pickles, and hostile input (truncation, flips, fuzz).
#include "lib/pt_reader.h"
#include "test_util.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <unistd.h>

namespace fs = std::filesystem;
using namespace std::string_literals;
using qatlab::NamedTensors;
using qatlab::pt_load;
using qatlab::pt_state_dict;
using qatlab::PtValue;
using Kind = qatlab::PtValue::Kind;

namespace {

// --- bytes and files ----------------------------------------------------------------------

void file_write(const std::string & path, const std::string & bytes) {
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    f.write(bytes.data(), std::streamsize(bytes.size()));
    ASSERT_TRUE(f.good()) << path;
}

std::string file_read(const std::string & path) {
    std::ifstream f(path, std::ios::binary);
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
}

// Overwrites one byte in place: cheaper than rewriting the file for each of thousands of flips.
void byte_patch(const std::string & path, size_t offset, char byte) {
    std::fstream f(path, std::ios::binary | std::ios::in | std::ios::out);
    f.seekp(std::streamoff(offset));
    f.put(byte);
    ASSERT_TRUE(f.good()) << path;
}

std::string le(uint64_t v, int n) {
    std::string s(size_t(n), '\0');
    for (int i = 0; i < n; ++i) s[size_t(i)] = char((v >> (8 * i)) & 0xff);
    return s;
}

std::string tensor_bytes(const at::Tensor & t) {
    at::Tensor c = t.contiguous();
    return std::string(static_cast<const char *>(c.const_data_ptr()), c.nbytes());
}

std::string hex_decode(const std::string & h) {
    std::string out;
    for (size_t i = 0; i + 1 < h.size(); i += 2) out += char(std::stoi(h.substr(i, 2), nullptr, 16));
    return out;
}

// --- an independent zip writer ------------------------------------------------------------

struct ZipOpts {
    bool zip64 = false;          // saturate every size/offset/count and write ZIP64 records
    bool locator = true;         // with zip64: the ZIP64 locator (dropping it must be an error)
    int misalign = 0;            // data lands at 64k + misalign
    uint64_t hole = 0;           // a gap of this many bytes before the last entry (a sparse file)
    size_t * hole_at = nullptr;  // receives where in the returned bytes the gap goes
    std::map<std::string, uint16_t> method, flags;  // per entry
};

std::string zip_build(const std::vector<std::pair<std::string, std::string>> & entries, const ZipOpts & o = {}) {
    std::string out, cd;
    uint64_t skew = 0;  // file offset minus position in `out`: the hole, once passed
    for (const auto & [name, data] : entries) {
        if (o.hole && &name == &entries.back().first) {
            *o.hole_at = out.size();
            skew = o.hole;
        }
        const uint64_t local = out.size() + skew;
        const uint16_t method = o.method.count(name) ? o.method.at(name) : 0;
        const uint16_t flags = o.flags.count(name) ? o.flags.at(name) : 0;
        std::string extra;
        if (o.zip64) extra += le(1, 2) + le(16, 2) + le(data.size(), 8) + le(data.size(), 8);
        // Pad with an extra field, as PyTorch's writer does, so the data starts aligned.
        uint64_t at = local + 30 + name.size() + extra.size() + 4;
        uint64_t pad = (64 - at % 64) % 64 + uint64_t(o.misalign);
        extra += le(0x4246, 2) + le(pad, 2) + std::string(pad, 'Z');
        const uint64_t sz = o.zip64 ? 0xffffffffu : data.size();
        out += le(0x04034b50, 4) + le(o.zip64 ? 45 : 20, 2) + le(flags, 2) + le(method, 2) + le(0, 4) +
               le(0, 4) + le(sz, 4) + le(sz, 4) + le(name.size(), 2) + le(extra.size(), 2) + name + extra + data;
        std::string cextra = o.zip64 ? le(1, 2) + le(24, 2) + le(data.size(), 8) + le(data.size(), 8) + le(local, 8) : "";
        cd += le(0x02014b50, 4) + le(45, 2) + le(o.zip64 ? 45 : 20, 2) + le(flags, 2) + le(method, 2) +
              le(0, 4) + le(0, 4) + le(sz, 4) + le(sz, 4) + le(name.size(), 2) + le(cextra.size(), 2) +
              le(0, 2) + le(0, 2) + le(0, 2) + le(0, 4) + le(o.zip64 ? 0xffffffffu : local, 4) + name + cextra;
    }
    const uint64_t cd_off = out.size() + skew, n = entries.size();
    out += cd;
    if (o.zip64) {
        const uint64_t e64 = out.size() + skew;
        out += le(0x06064b50, 4) + le(44, 8) + le(45, 2) + le(45, 2) + le(0, 4) + le(0, 4) + le(n, 8) + le(n, 8) +
               le(cd.size(), 8) + le(cd_off, 8);
        if (o.locator) out += le(0x07064b50, 4) + le(0, 4) + le(e64, 8) + le(1, 4);
    }
    out += le(0x06054b50, 4) + le(0, 2) + le(0, 2) + le(o.zip64 ? 0xffff : n, 2) + le(o.zip64 ? 0xffff : n, 2) +
           le(o.zip64 ? 0xffffffffu : cd.size(), 4) + le(o.zip64 ? 0xffffffffu : cd_off, 4) + le(0, 2);
    return out;
}

// --- a pickle writer, for hand-built and hostile pickles ------------------------------------

struct Pkl {
    std::string b;
    Pkl() { b = "\x80\x02"; }
    Pkl & op(char c) { b += c; return *this; }
    Pkl & raw(const std::string & s) { b += s; return *this; }
    Pkl & str(const std::string & s) { return op('X').raw(le(s.size(), 4) + s); }
    Pkl & i32(int32_t v) { return op('J').raw(le(uint32_t(v), 4)); }
    Pkl & i64(int64_t v) { return op('\x8a').raw(le(8, 1) + le(uint64_t(v), 8)); }
    Pkl & global(const std::string & m, const std::string & n) { return op('c').raw(m + "\n" + n + "\n"); }
    Pkl & mark() { return op('('); }
    Pkl & tuple() { return op('t'); }
    Pkl & ints(const std::vector<int64_t> & v) {
        mark();
        for (int64_t x : v) i64(x);
        return tuple();
    }
    // _rebuild_tensor_v2((storage, type, key, 'cpu', numel), offset, sizes, strides, False, OrderedDict())
    Pkl & tensor(const std::string & type, const std::string & key, int64_t numel, int64_t offset,
                 const std::vector<int64_t> & sizes, const std::vector<int64_t> & strides) {
        global("torch._utils", "_rebuild_tensor_v2").mark();
        mark().str("storage").global("torch", type).str(key).str("cpu").i64(numel).tuple().op('Q');
        i64(offset).ints(sizes).ints(strides).op('\x89');
        global("collections", "OrderedDict").op(')').op('R');
        return tuple().op('R');
    }
    Pkl & put(uint8_t i) { return op('q').raw(std::string(1, char(i))); }   // BINPUT
    Pkl & get(uint8_t i) { return op('h').raw(std::string(1, char(i))); }   // BINGET
    Pkl & stop() { return op('.'); }
};

// A torch.save-shaped archive: archive/data.pkl, archive/data/<key>..., archive/version.
std::string pt_build(const std::string & pickle, const std::vector<std::pair<std::string, std::string>> & storages,
                     const ZipOpts & o = {}) {
    std::vector<std::pair<std::string, std::string>> e{{"archive/data.pkl", pickle}};
    for (const auto & [k, v] : storages) e.emplace_back("archive/data/" + k, v);
    e.emplace_back("archive/version", "3\n");
    return zip_build(e, o);
}

std::string floats_bytes(int n) {
    std::string s;
    for (int i = 0; i < n; ++i) {
        float f = float(i);
        s.append(reinterpret_cast<const char *>(&f), 4);
    }
    return s;
}

// --- checks -------------------------------------------------------------------------------

const char * dtype_py(at::ScalarType t) {
    switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    case at::kComplexFloat: return "torch.complex64";
    case at::ScalarType::UInt16: return "torch.uint16";
    case at::ScalarType::Float8_e4m3fn: return "torch.float8_e4m3fn";
    default: return "?";
    }
}

const at::Tensor & named(const NamedTensors & ts, const std::string & name) {
    for (const auto & [n, t] : ts)
        if (n == name) return t;
    throw std::runtime_error("no tensor " + name);
}

// The load must throw std::runtime_error mentioning every needle; returns the message.
std::string load_error(const std::string & path, std::initializer_list<std::string> needles) {
    try {
        pt_load(path);
    } catch (const std::runtime_error & e) {
        std::string msg = e.what();
        for (const auto & n : needles) EXPECT_NE(msg.find(n), std::string::npos) << "'" << n << "' not in: " << msg;
        EXPECT_NE(msg.find(path), std::string::npos) << "no path in: " << msg;
        return msg;
    } catch (const std::exception & e) {
        ADD_FAILURE() << "wrong exception type for " << path << ": " << e.what();
        return {};
    }
    ADD_FAILURE() << "no error loading " << path;
    return {};
}

// A load that may fail but only with std::runtime_error; a success is walked fully.
bool load_survives(const std::string & path) {
    try {
        PtValue v = pt_load(path);
        if (v.kind == Kind::Dict || v.kind == Kind::List || v.kind == Kind::Tuple) {
            try {
                for (auto & [n, t] : pt_state_dict(v)) (void)t.sum().item<double>();
            } catch (const std::runtime_error &) {
            }
        }
        return true;
    } catch (const std::runtime_error &) {
        return false;
    } catch (const std::exception & e) {
        ADD_FAILURE() << "wrong exception type: " << e.what();
        return false;
    }
}

// Where data.pkl's bytes start in a zip whose first entry it is (as torch.save writes).
size_t pickle_offset(const std::string & zip) {
    auto u16 = [&](size_t p) { return size_t(uint8_t(zip[p])) | size_t(uint8_t(zip[p + 1])) << 8; };
    return 30 + u16(26) + u16(28);
}

// --- the Python fixtures ----------------------------------------------------------------------

const char * fixtures_py = R"PY(
import sys, os, json, collections, pickle, types, torch
out = sys.argv[1]
manifest = {}

def flat(obj, name, acc):
    if isinstance(obj, torch.Tensor): acc[name] = obj; return
    if isinstance(obj, dict): items = [(str(k), v) for k, v in obj.items() if isinstance(k, (str, int))]
    elif isinstance(obj, (list, tuple)): items = [(str(i), v) for i, v in enumerate(obj)]
    else: return
    for k, v in items: flat(v, name + '.' + k if name else k, acc)

def save(stem, obj, **kw):
    torch.save(obj, os.path.join(out, stem + '.pt'), **kw)
    acc = {}
    flat(obj, '', acc)
    m = {}
    for n, t in acc.items():
        c = t.detach().contiguous().reshape(-1)
        m[n] = {'dtype': str(t.dtype), 'shape': list(t.shape), 'stride': list(t.stride()),
                'offset': t.storage_offset(), 'hex': bytes(c.view(torch.uint8).tolist()).hex()}
    manifest[stem] = m

g = torch.arange(12, dtype=torch.float32).reshape(3, 4)
plain = {'f32': g * 0.25 - 1, 'f64': torch.arange(5, dtype=torch.float64) / 3, 'f16': (g * 0.5 - 2).half(),
         'bf16': torch.tensor([1.0, -2.5, 3.140625, 1e-3]).bfloat16(), 'i8': torch.tensor([-128, -1, 0, 127], dtype=torch.int8),
         'u8': torch.tensor([0, 1, 128, 255], dtype=torch.uint8), 'i16': torch.tensor([-32768, 0, 32767], dtype=torch.int16),
         'i32': torch.tensor([-2**31, 0, 2**31 - 1], dtype=torch.int32), 'i64': torch.tensor([-2**40, 0, 2**62]),
         'bool': torch.tensor([True, False, False, True]), 'scalar': torch.tensor(3.5), 'empty': torch.empty(0, 3),
         'c64': torch.tensor([1 + 2j, -3.5j])}
save('plain', plain)

torch.manual_seed(0)
m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.BatchNorm1d(3), torch.nn.Embedding(5, 2))
sd = m.state_dict()
save('module', sd)

nested = {'model_state_dict': {k: v.clone() for k, v in sd.items()},
          'config': {'hidden': 64, 'names': ('a', 'b'), 'ratio': 0.5, 'dtype': torch.float16, 'device': torch.device('cuda', 0)},
          'step': 12, 'lr': 1e-3, 'name': 'x', 'flags': [True, None], 'big': 2**40, 'neg': -70000, 'huge': 2**70,
          'bytes': b'\x00\xffab', 'unicode': 'h\u00e9llo \u2603', 'intkeys': {0: 'zero', 7: torch.arange(3)},
          'empty_list': [], 'tuple': (1, 2.5, 'three')}
for p in (2, 4, 5):
    save('nested' if p == 2 else 'nested_p%d' % p, nested, pickle_protocol=p)

base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
views = {'base': base, 't': base.t(), 'narrow': base.narrow(1, 2, 3), 'row': base[2], 'strided': base[::2, ::3],
         'tail': base.view(-1)[5:], 'empty_slice': base[:, 3:3], 'scalar_view': base[1, 1]}
save('views', views)

N, L, K, R = 3, 8, 4, 2
ar = lambda *s: torch.arange(int(torch.tensor(s).prod())).reshape(*s)
shard = {'input_ids': (ar(N, L) * 7 % 151936).int(), 'attention_mask': torch.ones(N, L, dtype=torch.uint8),
         'topk_idx': (ar(N, L - 1, K) * 13 % 151936).int(), 'topk_logits': (ar(N, L - 1, K) * 0.125 - 5).half(),
         'rand_idx': (ar(N, L - 1, R) * 31 % 151936).int(), 'rand_logits': (ar(N, L - 1, R) * -0.5).half()}
save('shard_00000', shard)
save('shard_int64', {'input_ids': ar(N, L) * 7 % 151936, 'topk_idx': ar(N, L - 1, K) * 13 % 151936,
                     'topk_logits': (ar(N, L - 1, K) * 0.125 - 5).half()})

save('v3', {'u16': torch.tensor([1, 2, 65535], dtype=torch.int32).view(torch.uint16),
            'f8': torch.tensor([0.5, -2.0, 448.0]).to(torch.float8_e4m3fn),
            'param': torch.nn.Parameter(torch.arange(4.0))})

class CudaPickler(pickle._Pickler):
    def save_pers(self, pid):
        if isinstance(pid, tuple) and pid[0] == 'storage': pid = pid[:3] + ('cuda:0',) + pid[4:]
        super().save_pers(pid)
save('cuda', views, pickle_module=types.SimpleNamespace(Pickler=CudaPickler, __name__='cudapickle'))

torch.save({'a': torch.ones(2)}, os.path.join(out, 'legacy.pt'), _use_new_zipfile_serialization=False)
json.dump(manifest, open(os.path.join(out, 'manifest.json'), 'w'))
print('ok')
)PY";

// The fixtures, written once per script version and python and shared by the test processes
// CTest starts (one per case): torch's import is slow. Built in a fresh folder, then renamed.
std::string fixtures_dir() {
    static std::string dir;
    static bool tried = false;
    if (tried) return dir;
    tried = true;
    const char * py = test_python();
    if (!py) return dir;
    const std::string final_dir = ::testing::TempDir() + "qatlab_pt_fixtures_" +
                                  std::to_string(std::hash<std::string>{}(std::string(fixtures_py) + py));
    if (fs::exists(final_dir + "/manifest.json")) return dir = final_dir;
    std::string tmpl = final_dir + ".tmp_XXXXXX";
    if (!::mkdtemp(tmpl.data())) return dir;
    std::string out;
    if (test_python_run(fixtures_py, {tmpl}, &out) != 0) {
        std::fprintf(stderr, "fixture script failed:\n%s\n", out.c_str());
        return dir;
    }
    std::error_code ec;
    fs::rename(tmpl, final_dir, ec);
    if (ec) fs::remove_all(tmpl, ec);  // another process got there first
    if (fs::exists(final_dir + "/manifest.json")) dir = final_dir;
    return dir;
}

class PtReader : public ::testing::Test {
protected:
    TestTempDir tmp{"qatlab_pt_"};
    nlohmann::json manifest;

    // The fixture's path; fails the test clearly when Python is not available.
    std::string fixture(const std::string & stem) {
        if (!test_python()) {
            ADD_FAILURE() << "QATLAB_PYTHON is not set: it must name a python3 with torch (CTest sets it)";
            return {};
        }
        const std::string fx = fixtures_dir();
        if (fx.empty()) {
            ADD_FAILURE() << "the Python fixture script failed (see stderr)";
            return {};
        }
        if (manifest.is_null()) manifest = nlohmann::json::parse(file_read(fx + "/manifest.json"));
        return fx + "/" + stem + ".pt";
    }

    // Every tensor Python recorded: dtype, shape, strides, offset and bytes, exactly.
    void expect_manifest(const std::string & stem, const NamedTensors & got, const std::string & manifest_stem = "") {
        const auto & m = manifest[manifest_stem.empty() ? stem : manifest_stem];
        ASSERT_EQ(got.size(), m.size()) << stem;
        for (auto it = m.begin(); it != m.end(); ++it) {
            SCOPED_TRACE(stem + ": " + it.key());
            const at::Tensor & t = named(got, it.key());
            EXPECT_EQ(dtype_py(t.scalar_type()), (*it)["dtype"].get<std::string>());
            EXPECT_EQ(t.sizes().vec(), (*it)["shape"].get<std::vector<int64_t>>());
            if (t.numel() > 0) {
                EXPECT_EQ(t.strides().vec(), (*it)["stride"].get<std::vector<int64_t>>());
                EXPECT_EQ(t.storage_offset(), (*it)["offset"].get<int64_t>());
            }
            EXPECT_EQ(tensor_bytes(t), hex_decode((*it)["hex"].get<std::string>()));
            EXPECT_FALSE(t.requires_grad());
            EXPECT_TRUE(t.device().is_cpu());
        }
    }
};

} // namespace

// --- files written by PyTorch ---------------------------------------------------------------

TEST_F(PtReader, LoadsPlainDictOfEveryDtype) {
    const std::string f = fixture("plain");
    if (f.empty()) return;
    PtValue v = pt_load(f);
    ASSERT_EQ(v.kind, Kind::Dict);
    EXPECT_EQ(v.entries().size(), 13u);
    EXPECT_EQ(v.entries()[0].first.str, "f32");  // file order
    auto sd = pt_state_dict(v);
    expect_manifest("plain", sd);
    // Values we compute here, independently of Python's bytes.
    EXPECT_TRUE(at::equal(named(sd, "f32"), at::arange(12, at::kFloat).reshape({3, 4}) * 0.25 - 1));
    EXPECT_EQ(named(sd, "i64")[2].item<int64_t>(), int64_t(1) << 62);
    EXPECT_EQ(named(sd, "scalar").dim(), 0);
    EXPECT_EQ(named(sd, "scalar").item<float>(), 3.5f);
    EXPECT_EQ(named(sd, "empty").sizes(), (std::vector<int64_t>{0, 3}));
    EXPECT_EQ(named(sd, "bool").sum().item<int64_t>(), 2);
}

TEST_F(PtReader, LoadsModuleStateDictWithMetadata) {
    const std::string f = fixture("module");
    if (f.empty()) return;
    PtValue v = pt_load(f);
    ASSERT_EQ(v.kind, Kind::Dict);
    auto sd = pt_state_dict(v);
    expect_manifest("module", sd);
    EXPECT_EQ(sd[0].first, "0.weight");
    EXPECT_EQ(named(sd, "2.num_batches_tracked").scalar_type(), at::kLong);
    EXPECT_EQ(named(sd, "2.num_batches_tracked").dim(), 0);
    ASSERT_NE(v.state(), nullptr);  // OrderedDict's _metadata arrives through BUILD
    const PtValue * meta = v.state()->get("_metadata");
    ASSERT_NE(meta, nullptr);
    ASSERT_EQ(meta->kind, Kind::Dict);
    ASSERT_NE(meta->get("0"), nullptr);
    EXPECT_EQ(meta->get("0")->get("version")->integer, 1);
    // Prefixing, as a caller that nests the state dict would.
    EXPECT_EQ(pt_state_dict(v, "model.")[0].first, "model.0.weight");
}

TEST_F(PtReader, LoadsNestedCheckpointValues) {
    for (const std::string stem : {"nested", "nested_p4", "nested_p5"}) {
        SCOPED_TRACE(stem);
        const std::string f = fixture(stem);
        if (f.empty()) return;
        PtValue v = pt_load(f);
        ASSERT_EQ(v.kind, Kind::Dict);
        expect_manifest(stem, pt_state_dict(v));
        EXPECT_EQ(v.get("step")->kind, Kind::Int);
        EXPECT_EQ(v.get("step")->integer, 12);
        EXPECT_EQ(v.get("lr")->kind, Kind::Float);
        EXPECT_EQ(v.get("lr")->number, 1e-3);
        EXPECT_EQ(v.get("name")->str, "x");
        const auto & flags = v.get("flags")->items();
        ASSERT_EQ(flags.size(), 2u);
        EXPECT_EQ(v.get("flags")->kind, Kind::List);
        EXPECT_EQ(flags[0].kind, Kind::Bool);
        EXPECT_TRUE(flags[0].boolean);
        EXPECT_EQ(flags[1].kind, Kind::None);
        EXPECT_EQ(v.get("big")->integer, int64_t(1) << 40);
        EXPECT_EQ(v.get("neg")->integer, -70000);
        EXPECT_EQ(v.get("huge")->kind, Kind::Float);
        EXPECT_EQ(v.get("huge")->number, std::ldexp(1.0, 70));
        EXPECT_EQ(v.get("bytes")->kind, Kind::Bytes);
        EXPECT_EQ(v.get("bytes")->str, std::string("\x00\xff" "ab", 4));
        EXPECT_EQ(v.get("unicode")->str, "h\xc3\xa9llo \xe2\x98\x83");
        const PtValue * cfg = v.get("config");
        ASSERT_NE(cfg, nullptr);
        EXPECT_EQ(cfg->get("hidden")->integer, 64);
        EXPECT_EQ(cfg->get("ratio")->number, 0.5);
        EXPECT_EQ(cfg->get("names")->kind, Kind::Tuple);
        EXPECT_EQ(cfg->get("names")->items()[1].str, "b");
        EXPECT_EQ(cfg->get("dtype")->kind, Kind::Global);
        EXPECT_EQ(cfg->get("dtype")->str, "torch.float16");
        EXPECT_EQ(cfg->get("device")->str, "cuda:0");
        const PtValue * ik = v.get("intkeys");
        ASSERT_EQ(ik->entries().size(), 2u);
        EXPECT_EQ(ik->entries()[0].first.kind, Kind::Int);
        EXPECT_EQ(ik->entries()[0].first.integer, 0);
        EXPECT_EQ(ik->entries()[0].second.str, "zero");
        EXPECT_TRUE(at::equal(ik->entries()[1].second.tensor, at::arange(3, at::kLong)));
        EXPECT_TRUE(v.get("empty_list")->items().empty());
        EXPECT_EQ(v.get("tuple")->items()[1].number, 2.5);
        EXPECT_EQ(v.get("missing"), nullptr);
    }
}

TEST_F(PtReader, ViewsShareOneStorage) {
    for (const std::string stem : {"views", "cuda"}) {  // 'cuda': every storage tagged cuda:0
        SCOPED_TRACE(stem);
        const std::string f = fixture(stem);
        if (f.empty()) return;
        auto sd = pt_state_dict(pt_load(f));
        expect_manifest(stem, sd, "views");
        const at::Tensor & base = named(sd, "base");
        for (const char * n : {"t", "narrow", "row", "strided", "tail", "scalar_view"})
            EXPECT_TRUE(named(sd, n).storage().is_alias_of(base.storage())) << n;
        EXPECT_FALSE(named(sd, "t").is_contiguous());
        EXPECT_TRUE(at::equal(named(sd, "t"), at::arange(24, at::kFloat).reshape({4, 6}).t()));
        // One write shows through every view of the storage.
        at::Tensor b = base;
        b.index_put_({1, 3}, -1.0f);
        EXPECT_EQ(named(sd, "t")[3][1].item<float>(), -1.0f);
        EXPECT_EQ(named(sd, "narrow")[1][1].item<float>(), -1.0f);
        EXPECT_EQ(named(sd, "tail")[4].item<float>(), -1.0f);
        // Copy-on-write: the file is untouched.
        auto again = pt_state_dict(pt_load(f));
        EXPECT_EQ(named(again, "base")[1][3].item<float>(), 9.0f);
    }
}

TEST_F(PtReader, LoadsKdCacheShards) {
    const std::string f = fixture("shard_00000");
    if (f.empty()) return;
    PtValue v = pt_load(f);
    auto sd = pt_state_dict(v);
    expect_manifest("shard_00000", sd);
    const int64_t N = 3, L = 8, K = 4, R = 2;
    auto ar = [](std::vector<int64_t> s) {
        int64_t n = 1;
        for (auto x : s) n *= x;
        return at::arange(n, at::kLong).reshape(s);
    };
    EXPECT_TRUE(at::equal(named(sd, "input_ids"), (ar({N, L}) * 7).remainder(151936).to(at::kInt)));
    EXPECT_TRUE(at::equal(named(sd, "attention_mask"), at::ones({N, L}, at::kByte)));
    EXPECT_TRUE(at::equal(named(sd, "topk_idx"), (ar({N, L - 1, K}) * 13).remainder(151936).to(at::kInt)));
    EXPECT_TRUE(at::equal(named(sd, "topk_logits"), (ar({N, L - 1, K}).to(at::kDouble) * 0.125 - 5).to(at::kHalf)));
    EXPECT_TRUE(at::equal(named(sd, "rand_idx"), (ar({N, L - 1, R}) * 31).remainder(151936).to(at::kInt)));
    EXPECT_TRUE(at::equal(named(sd, "rand_logits"), (ar({N, L - 1, R}).to(at::kDouble) * -0.5).to(at::kHalf)));
    for (const auto & [n, t] : sd) EXPECT_TRUE(t.is_contiguous()) << n;

    const std::string f64 = fixture("shard_int64");
    auto sd64 = pt_state_dict(pt_load(f64));
    expect_manifest("shard_int64", sd64);
    EXPECT_EQ(named(sd64, "input_ids").scalar_type(), at::kLong);
    EXPECT_TRUE(at::equal(named(sd64, "input_ids"), (ar({N, L}) * 7).remainder(151936)));
}

TEST_F(PtReader, LoadsNewDtypesAndParameters) {
    const std::string f = fixture("v3");
    if (f.empty()) return;
    auto sd = pt_state_dict(pt_load(f));
    expect_manifest("v3", sd);
    EXPECT_EQ(named(sd, "u16").scalar_type(), at::ScalarType::UInt16);
    EXPECT_TRUE(at::equal(named(sd, "param"), at::arange(4, at::kFloat)));
}

TEST_F(PtReader, RejectsLegacyFormat) {
    const std::string f = fixture("legacy");
    if (f.empty()) return;
    EXPECT_TRUE(qatlab::pt_file_is_torch(f));
    load_error(f, {"legacy"});
}

TEST_F(PtReader, TensorsOutliveTheFile) {
    const std::string f = fixture("plain");
    if (f.empty()) return;
    fs::copy_file(f, tmp.path("copy.pt"));
    at::Tensor t = pt_state_dict(pt_load(tmp.path("copy.pt")))[0].second;
    fs::remove(tmp.path("copy.pt"));
    EXPECT_TRUE(at::equal(t, at::arange(12, at::kFloat).reshape({3, 4}) * 0.25 - 1));
}

// --- hand-built archives ----------------------------------------------------------------------

TEST_F(PtReader, LoadsHandBuiltArchivesIncludingZip64AndMisaligned) {
    Pkl p;
    p.op('}').mark().str("w").tensor("FloatStorage", "0", 6, 1, {2, 2}, {1, 2});
    p.str("n").op('N').op('u').stop();
    for (int variant = 0; variant < 3; ++variant) {
        SCOPED_TRACE(variant);
        ZipOpts o;
        o.zip64 = variant == 1;
        o.misalign = variant == 2 ? 3 : 0;  // unaligned data: must be copied, not mapped misaligned
        file_write(tmp.path("hand.pt"), pt_build(p.b, {{"0", floats_bytes(6)}}, o));
        PtValue v = pt_load(tmp.path("hand.pt"));
        const at::Tensor & w = v.get("w")->tensor;
        EXPECT_TRUE(at::equal(w, at::tensor({1.0f, 3.0f, 2.0f, 4.0f}).reshape({2, 2})));
        EXPECT_EQ(v.get("n")->kind, Kind::None);
        EXPECT_TRUE(qatlab::pt_file_is_torch(tmp.path("hand.pt")));
    }
}

TEST_F(PtReader, UnknownGlobalsBecomeObjects) {
    Pkl p;
    p.op('}').mark().str("obj").global("numpy.core.multiarray", "scalar").mark().i32(5).tuple().op('R');
    p.put(1).str("state").op('b');  // BUILD on the object
    p.str("again").get(1).str("s").global("builtins", "set").op(']').i32(3).op('a');
    p.op('\x85').op('R').op('u').stop();
    file_write(tmp.path("obj.pt"), pt_build(p.b, {}));
    PtValue v = pt_load(tmp.path("obj.pt"));
    const PtValue * o = v.get("obj");
    ASSERT_EQ(o->kind, Kind::Object);
    EXPECT_EQ(o->str, "numpy.core.multiarray.scalar");
    EXPECT_EQ(o->items()[0].integer, 5);
    EXPECT_EQ(o->state()->str, "state");
    EXPECT_EQ(v.get("again")->node, o->node);  // memo: the same object, shared
    EXPECT_EQ(v.get("s")->kind, Kind::List);
    EXPECT_EQ(v.get("s")->items()[0].integer, 3);
    EXPECT_TRUE(pt_state_dict(v).empty());
    EXPECT_THROW(pt_state_dict(*v.get("obj")), std::runtime_error);
}

TEST_F(PtReader, LoadsStoragesBeyondFourGiB) {
    // A sparse file: the last storage starts past 5 GiB, so every offset needs ZIP64 for real.
    Pkl p;
    p.op('}').mark().str("near").tensor("FloatStorage", "0", 4, 0, {4}, {1});
    p.str("far").tensor("FloatStorage", "1", 6, 2, {2, 2}, {2, 1}).op('u').stop();
    size_t hole_at = 0;
    ZipOpts o;
    o.zip64 = true;
    o.hole = uint64_t(5) << 30;
    o.hole_at = &hole_at;
    const std::string bytes = zip_build({{"big/data.pkl", p.b}, {"big/data/0", floats_bytes(4)},
                                         {"big/data/1", floats_bytes(6)}}, o);
    {
        std::ofstream f(tmp.path("big.pt"), std::ios::binary | std::ios::trunc);
        f.write(bytes.data(), std::streamsize(hole_at));
        f.seekp(std::streamoff(hole_at + o.hole));
        f.write(bytes.data() + hole_at, std::streamsize(bytes.size() - hole_at));
        ASSERT_TRUE(f.good());
    }
    ASSERT_GT(fs::file_size(tmp.path("big.pt")), uint64_t(5) << 30);
    PtValue v = pt_load(tmp.path("big.pt"));
    EXPECT_TRUE(at::equal(v.get("near")->tensor, at::arange(4, at::kFloat)));
    EXPECT_TRUE(at::equal(v.get("far")->tensor, at::tensor({2.0f, 3.0f, 4.0f, 5.0f}).reshape({2, 2})));
}

// --- hostile input -----------------------------------------------------------------------------

TEST_F(PtReader, RejectsBadPickles) {
    const std::string store = floats_bytes(12);
    struct Case {
        std::string name, pickle;
        std::vector<std::string> needles;
    };
    auto tensor_pkl = [](int64_t numel, int64_t off, std::vector<int64_t> s, std::vector<int64_t> st,
                         const std::string & type = "FloatStorage", const std::string & key = "0") {
        Pkl p;
        p.op('}').str("bad_key").tensor(type, key, numel, off, s, st).op('s').stop();
        return p.b;
    };
    std::string deep = "\x80\x02";
    for (int i = 0; i < 300; ++i) deep += ']';
    for (int i = 0; i < 299; ++i) deep += 'a';
    deep += '.';
    const std::vector<Case> cases = {
        {"unknown opcode", "\x80\x02\xff.", {"unknown", "0xff", "data.pkl at byte 2"}},
        {"stack underflow", "\x80\x02R.", {"stack underflow"}},
        {"underflow past mark", "\x80\x02N(s.", {"stack underflow"}},
        {"memo miss", "\x80\x02h\x05.", {"memo entry 5"}},
        {"no stop", "\x80\x02N", {"expected STOP"}},
        {"empty pickle", "", {"expected STOP"}},
        {"string past end", "\x80\x02X\xff\xff\x00\x00" "ab."s, {"bytes of argument"}},
        {"global without newline", "\x80\x02" "ctorch", {"newline"}},
        {"bad protocol", "\x80\x09N.", {"protocol"}},
        {"setitem on list", "\x80\x02]NNs.", {"expected a dict"}},
        {"offset out of range", tensor_pkl(12, 10, {3}, {1}), {"exceeds its storage", "bad_key", "_rebuild_tensor_v2"}},
        {"size past storage", tensor_pkl(12, 0, {4, 4}, {4, 1}), {"exceeds its storage"}},
        {"size*stride overflow", tensor_pkl(12, 0, {int64_t(1) << 40, 2}, {int64_t(1) << 40, 1}), {"overflow"}},
        {"numel overflow", tensor_pkl(12, 0, {int64_t(1) << 40, int64_t(1) << 40}, {0, 0}), {"64 bits"}},
        {"negative stride", tensor_pkl(12, 5, {3}, {-1}), {"non-negative strides"}},
        {"negative size", tensor_pkl(12, 0, {-3}, {1}), {"non-negative sizes"}},
        {"negative offset", tensor_pkl(12, -1, {3}, {1}), {"non-negative storage offset"}},
        {"rank mismatch", tensor_pkl(12, 0, {3, 4}, {1}), {"as many strides"}},
        {"missing storage", tensor_pkl(12, 0, {3}, {1}, "FloatStorage", "9"), {"archive/data/9"}},
        {"storage too small", tensor_pkl(13, 0, {3}, {1}), {"expected at least 52 bytes", "found 48"}},
        {"storage numel overflow", tensor_pkl(int64_t(1) << 62, 0, {3}, {1}), {"overflows"}},
        {"quantized storage", tensor_pkl(12, 0, {3}, {1}, "QInt8Storage"), {"quantized"}},
        {"unknown storage", tensor_pkl(12, 0, {3}, {1}, "FooStorage"), {"FooStorage"}},
        {"bad persistent id", "\x80\x02NQ.", {"persistent id"}},
        {"call a non-callable", "\x80\x02N)R.", {"expected a class or function"}},
        {"deep nesting", deep, {"nested at most 256"}},
        {"list contains itself", "\x80\x02]q\x00h\x00" "a."s, {"contains itself"}},
        {"dict contains itself", "\x80\x02}q\x00X\x01\x00\x00\x00kh\x00s."s, {"contains itself"}},
    };
    for (const auto & c : cases) {
        SCOPED_TRACE(c.name);
        file_write(tmp.path("bad.pt"), pt_build(c.pickle, {{"0", store}}));
        std::vector<std::string> needles = c.needles;
        std::string msg = load_error(tmp.path("bad.pt"), {});
        for (const auto & n : needles) EXPECT_NE(msg.find(n), std::string::npos) << "'" << n << "' not in: " << msg;
    }
    // Cycles left unreachable must not leak either (LeakSanitizer checks this one).
    file_write(tmp.path("cycle.pt"), pt_build("\x80\x02]q\x00h\x00" "a0N."s, {}));
    EXPECT_EQ(pt_load(tmp.path("cycle.pt")).kind, Kind::None);
}

TEST_F(PtReader, RejectsBadBoolBytesAndByteOrder) {
    Pkl p;
    p.op('}').str("b").tensor("BoolStorage", "0", 3, 0, {3}, {1}).op('s').stop();
    file_write(tmp.path("bool.pt"), pt_build(p.b, {{"0", std::string("\x01\x00\x02", 3)}}));
    load_error(tmp.path("bool.pt"), {"bool bytes", "found 2"});

    Pkl q;
    q.op('N').stop();
    file_write(tmp.path("big.pt"), zip_build({{"a/data.pkl", q.b}, {"a/byteorder", "big"}}));
    load_error(tmp.path("big.pt"), {"byte order", "big"});
}

TEST_F(PtReader, RejectsBadZips) {
    Pkl p;
    p.op('N').stop();
    const std::string good = pt_build(p.b, {});
    file_write(tmp.path("good.pt"), good);
    EXPECT_EQ(pt_load(tmp.path("good.pt")).kind, Kind::None);

    file_write(tmp.path("empty.pt"), "");
    load_error(tmp.path("empty.pt"), {"zip"});
    file_write(tmp.path("junk.pt"), std::string(4096, 'x'));
    load_error(tmp.path("junk.pt"), {"end-of-central-directory"});
    load_error(tmp.path("missing.pt"), {"cannot open"});
    load_error(tmp.dir(), {"regular file"});

    ZipOpts deflate;
    deflate.method["archive/data.pkl"] = 8;
    file_write(tmp.path("deflate.pt"), pt_build(p.b, {}, deflate));
    load_error(tmp.path("deflate.pt"), {"archive/data.pkl", "compression method 8", "stored"});

    ZipOpts enc;
    enc.flags["archive/data.pkl"] = 1;
    file_write(tmp.path("enc.pt"), pt_build(p.b, {}, enc));
    load_error(tmp.path("enc.pt"), {"encrypted"});

    ZipOpts noloc;
    noloc.zip64 = true;
    noloc.locator = false;
    file_write(tmp.path("noloc.pt"), pt_build(p.b, {}, noloc));
    load_error(tmp.path("noloc.pt"), {"ZIP64"});

    file_write(tmp.path("nopkl.pt"), zip_build({{"a/other", "x"}}));
    load_error(tmp.path("nopkl.pt"), {"data.pkl", "'a/other'"});

    file_write(tmp.path("dup.pt"), zip_build({{"a/data.pkl", p.b}, {"a/data.pkl", p.b}}));
    load_error(tmp.path("dup.pt"), {"duplicate"});

    // The central directory pointing past the file, and a local header that lies.
    std::string bad_cd = good;
    bad_cd.replace(bad_cd.size() - 6, 4, le(0x7fffffff, 4));
    file_write(tmp.path("badcd.pt"), bad_cd);
    load_error(tmp.path("badcd.pt"), {"central directory"});
    std::string bad_local = good;
    bad_local[0] = 'Q';
    file_write(tmp.path("badlocal.pt"), bad_local);
    load_error(tmp.path("badlocal.pt"), {"local header"});
}

TEST_F(PtReader, SurvivesEveryTruncation) {
    const std::string f = fixture("nested");
    if (f.empty()) return;
    const std::string bytes = file_read(f);
    file_write(tmp.path("cut.pt"), bytes);
    for (size_t n = bytes.size(); n-- > 0;) {
        ASSERT_EQ(::truncate(tmp.path("cut.pt").c_str(), off_t(n)), 0);
        try {
            pt_load(tmp.path("cut.pt"));
            ADD_FAILURE() << "a file cut to " << n << " bytes loaded";
        } catch (const std::runtime_error &) {
        }
    }
}

TEST_F(PtReader, SurvivesFlippedPickleAndDirectoryBytes) {
    for (const std::string stem : {"nested", "views"}) {
        const std::string f = fixture(stem);
        if (f.empty()) return;
        const std::string bytes = file_read(f);
        const size_t start = pickle_offset(bytes);
        const size_t pkl_size = bytes.find("PK\x03\x04", start) - start;
        int ok = 0, failed = 0;
        file_write(tmp.path("flip.pt"), bytes);
        for (size_t i = start; i < start + pkl_size; ++i) {
            for (uint8_t mask : {0x01, 0x10, 0x80, 0xff}) {
                byte_patch(tmp.path("flip.pt"), i, char(uint8_t(bytes[i]) ^ mask));
                (load_survives(tmp.path("flip.pt")) ? ok : failed)++;
            }
            byte_patch(tmp.path("flip.pt"), i, bytes[i]);
        }
        // The zip's own structure: the central directory and end records.
        const size_t first_cd = bytes.find("PK\x01\x02");
        ASSERT_NE(first_cd, std::string::npos);
        for (size_t i = first_cd; i < bytes.size(); ++i) {
            byte_patch(tmp.path("flip.pt"), i, char(uint8_t(bytes[i]) ^ 0xff));
            (load_survives(tmp.path("flip.pt")) ? ok : failed)++;
            byte_patch(tmp.path("flip.pt"), i, bytes[i]);
        }
        EXPECT_GT(ok, 0) << stem;
        EXPECT_GT(failed, 0) << stem;
    }
}

TEST_F(PtReader, SurvivesRandomPickles) {
    // Random opcode streams with plausible arguments, around one real storage.
    std::mt19937 rng(1234);
    const char ops[] = "()}]tuesaNKJqhR0b2\x85\x86\x87\x88\x89\x8a\x93\x94QXcG\x81";
    const std::string store = floats_bytes(12);
    for (int iter = 0; iter < 1500; ++iter) {
        Pkl p;
        const int n = 1 + int(rng() % 40);
        for (int i = 0; i < n; ++i) {
            const char c = ops[rng() % (sizeof ops - 1)];
            switch (c) {
            case 'K': p.op('K').raw(le(rng() % 256, 1)); break;
            case 'J': p.i32(int32_t(rng() % 64) - 8); break;
            case 'q': case 'h': p.op(c).raw(le(rng() % 4, 1)); break;
            case '\x8a': p.i64(int64_t(rng() % 32)); break;
            case 'X': p.str(rng() % 2 ? "storage" : rng() % 2 ? "0" : "cpu"); break;
            case 'G': p.op('G').raw(std::string(8, char(rng() % 256))); break;
            case 'c': {
                static const char * g[][2] = {{"torch._utils", "_rebuild_tensor_v2"}, {"torch", "FloatStorage"},
                                              {"collections", "OrderedDict"}, {"torch", "BoolStorage"},
                                              {"torch._utils", "_rebuild_tensor_v3"}, {"torch", "float16"},
                                              {"torch._utils", "_rebuild_parameter"}, {"x", "y"}};
                auto & e = g[rng() % 8];
                p.global(e[0], e[1]);
                break;
            }
            default: p.op(c);
            }
        }
        p.stop();
        const std::string name = tmp.path("rand" + std::to_string(iter) + ".pt");
        file_write(name, pt_build(p.b, {{"0", store}}));
        load_survives(name);
        fs::remove(name);
    }
}

TEST_F(PtReader, BoundsHostileCopyingAndExpansion) {
    // One long string copied by BINGET hundreds of times: stopped by the copy budget.
    Pkl big;
    big.op(']').str(std::string(1 << 20, 's')).put(0).op('a');
    for (int i = 0; i < 300; ++i) big.get(0).op('0');
    big.stop();
    file_write(tmp.path("copies.pt"), pt_build(big.b, {}));
    load_error(tmp.path("copies.pt"), {"copy at most"});

    // A DAG of dicts whose flattening doubles per level: loads, but cannot expand to 2^30 names.
    Pkl dag;
    dag.op('N').put(0);
    for (int i = 0; i < 30; ++i) dag.op('0').op('}').mark().str("a").get(0).str("b").get(0).op('u').put(0);
    dag.stop();
    file_write(tmp.path("dag.pt"), pt_build(dag.b, {}));
    PtValue v = pt_load(tmp.path("dag.pt"));
    ASSERT_EQ(v.kind, Kind::Dict);
    EXPECT_THROW(pt_state_dict(v), std::runtime_error);
}
