// pt_reader: the pickle VM for torch.save files, over the zip entries of lib/pt_zip.cpp.
// Hostile files must end in a std::runtime_error naming the file and the entry or key, never a crash.
#include "lib/pt_reader.h"
#include "lib/pt_zip.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <ATen/ops/from_blob.h>
#include <c10/core/ScalarType.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <unordered_set>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "torch.save storages are little-endian; this reader maps them as host memory"
#endif

namespace qatlab {

// -- PtValue accessors ----------------------------------------------------------------------

namespace {
const std::vector<PtValue> no_items;
const std::vector<std::pair<PtValue, PtValue>> no_entries;
} // namespace

const std::vector<PtValue> & PtValue::items() const {
    bool has = kind == Kind::List || kind == Kind::Tuple || kind == Kind::Object;
    return has && node ? node->items : no_items;
}

const std::vector<std::pair<PtValue, PtValue>> & PtValue::entries() const {
    return kind == Kind::Dict && node ? node->entries : no_entries;
}

const PtValue * PtValue::get(const std::string & key) const {
    if (kind != Kind::Dict || !node) return nullptr;
    auto it = node->index.find("s" + key);
    return it == node->index.end() ? nullptr : &node->entries[it->second].second;
}

const PtValue * PtValue::state() const {
    return node && !node->state.empty() ? &node->state[0] : nullptr;
}

const char * PtValue::kind_name() const {
    static const char * names[] = {"none", "bool", "int", "float", "string", "bytes", "list",
                                   "tuple", "dict", "tensor", "global", "object"};
    return names[size_t(kind)];
}

namespace {

// Real pickles nest a dozen levels; the bound keeps every recursive walk (and destructor) shallow.
constexpr size_t depth_max = 256;
// Far above any real tensor; stops a size tuple of a million entries.
constexpr size_t rank_max = 64;



struct FdGuard {
    int fd = -1;
    explicit FdGuard(int f) : fd(f) {}
    ~FdGuard() { if (fd >= 0) ::close(fd); }
};


// -- dtypes ----------------------------------------------------------------------------------

struct StorageType {
    const char * name;
    at::ScalarType type;
};

const StorageType storage_types[] = {
    {"FloatStorage", at::kFloat}, {"DoubleStorage", at::kDouble}, {"HalfStorage", at::kHalf},
    {"BFloat16Storage", at::kBFloat16}, {"LongStorage", at::kLong}, {"IntStorage", at::kInt},
    {"ShortStorage", at::kShort}, {"CharStorage", at::kChar}, {"ByteStorage", at::kByte},
    {"BoolStorage", at::kBool}, {"ComplexFloatStorage", at::kComplexFloat},
    {"ComplexDoubleStorage", at::kComplexDouble}, {"UntypedStorage", at::kByte},
};

// torch.<dtype> globals, as dtypes pickle themselves (for _rebuild_tensor_v3).
const StorageType dtype_names[] = {
    {"float32", at::kFloat}, {"float", at::kFloat}, {"float64", at::kDouble}, {"double", at::kDouble},
    {"float16", at::kHalf}, {"half", at::kHalf}, {"bfloat16", at::kBFloat16}, {"int64", at::kLong},
    {"long", at::kLong}, {"int32", at::kInt}, {"int", at::kInt}, {"int16", at::kShort},
    {"short", at::kShort}, {"int8", at::kChar}, {"uint8", at::kByte}, {"bool", at::kBool},
    {"uint16", at::ScalarType::UInt16}, {"uint32", at::ScalarType::UInt32},
    {"uint64", at::ScalarType::UInt64}, {"float8_e4m3fn", at::ScalarType::Float8_e4m3fn},
    {"float8_e5m2", at::ScalarType::Float8_e5m2}, {"float8_e4m3fnuz", at::ScalarType::Float8_e4m3fnuz},
    {"float8_e5m2fnuz", at::ScalarType::Float8_e5m2fnuz}, {"complex64", at::kComplexFloat},
    {"cfloat", at::kComplexFloat}, {"complex128", at::kComplexDouble}, {"cdouble", at::kComplexDouble},
};

// The name after the last '.', or the whole name.
std::string base_name(const std::string & qualified) {
    size_t dot = qualified.rfind('.');
    return dot == std::string::npos ? qualified : qualified.substr(dot + 1);
}

// -- the pickle VM ---------------------------------------------------------------------------

using Kind = PtValue::Kind;

struct StorageRec {
    at::Tensor bytes;       // 1-D uint8 over the whole entry; its storage is shared by every view
    bool bool_checked = false;
};

class Unpickler {
public:
    Unpickler(const PtZipArchive & z, const std::string & prefix, const PtZipEntry & pkl)
        : z_(z), prefix_(prefix), pkl_name_(pkl.name), data_(z.base + pkl.data), size_(pkl.size) {
        // Hostile pickles may copy one long string many times (BINGET); real ones copy little.
        copy_budget_ = (uint64_t(256) << 20) + 16 * size_;
    }

    // Drops every container's contents first: breaks cycles and deep chains a failed or
    // partially unreachable pickle left behind, so nothing leaks or recurses on destruction.
    ~Unpickler() {
        for (auto & n : nodes_) {
            if (keep_.count(n.get())) continue;
            n->items.clear();
            n->entries.clear();
            n->state.clear();
        }
    }

    PtValue run();

private:
    const PtZipArchive & z_;
    std::string prefix_, pkl_name_;
    const uint8_t * data_;
    uint64_t size_;
    uint64_t pos_ = 0, op_pos_ = 0;
    uint8_t op_ = 0;
    std::vector<std::string> near_;  // the last short string per MARK depth: the keys being built
    uint64_t copied_ = 0, copy_budget_;
    std::vector<PtValue> stack_;
    std::vector<size_t> marks_;
    std::unordered_map<uint64_t, PtValue> memo_;
    std::vector<std::shared_ptr<PtNode>> nodes_;
    std::unordered_set<const PtNode *> keep_;
    std::unordered_map<std::string, StorageRec> storages_;
    // The tensors persistent_load made, held so that their addresses stay unique.
    std::unordered_map<const void *, at::Tensor> storage_views_;

    [[noreturn]] void fail(const std::string & what) const;
    const uint8_t * take(uint64_t n);
    uint64_t arg_uint(int n);
    std::string arg_line();
    size_t frame_base() const { return marks_.empty() ? 0 : marks_.back(); }
    PtValue pop();
    PtValue & top();
    std::vector<PtValue> pop_mark();
    void push(PtValue v) { stack_.push_back(std::move(v)); }
    void copy_charge(const PtValue & v);
    PtValue container(Kind k);
    void dict_set(PtValue & d, PtValue k, PtValue v);
    PtValue call(const PtValue & fn, const PtValue & args);
    PtValue persistent_load(const PtValue & pid);
    PtValue tensor_rebuild(const std::string & fn, const std::vector<PtValue> & a, bool v3);
    at::Tensor tensor_view(const at::Tensor & storage, at::ScalarType dtype, int64_t offset,
                           const std::vector<int64_t> & sizes, const std::vector<int64_t> & strides,
                           const std::string & fn);
    int64_t as_int(const PtValue & v, const std::string & what) const;
    std::vector<int64_t> as_ints(const PtValue & v, const std::string & what) const;
    void graph_check(const PtValue & root);
    static const char * op_name(uint8_t op);
};

const char * Unpickler::op_name(uint8_t op) {
    switch (op) {
    case 0x80: return "PROTO"; case 0x95: return "FRAME"; case '.': return "STOP"; case '(': return "MARK";
    case '}': return "EMPTY_DICT"; case ']': return "EMPTY_LIST"; case ')': return "EMPTY_TUPLE";
    case 't': return "TUPLE"; case 0x85: return "TUPLE1"; case 0x86: return "TUPLE2"; case 0x87: return "TUPLE3";
    case 's': return "SETITEM"; case 'u': return "SETITEMS"; case 'a': return "APPEND"; case 'e': return "APPENDS";
    case 'J': return "BININT"; case 'K': return "BININT1"; case 'M': return "BININT2"; case 0x8a: return "LONG1";
    case 0x8b: return "LONG4"; case 'G': return "BINFLOAT"; case 'X': return "BINUNICODE";
    case 0x8c: return "SHORT_BINUNICODE"; case 0x8d: return "BINUNICODE8"; case 'T': return "BINSTRING";
    case 'U': return "SHORT_BINSTRING"; case 'B': return "BINBYTES"; case 'C': return "SHORT_BINBYTES";
    case 0x8e: return "BINBYTES8"; case 0x96: return "BYTEARRAY8"; case 'N': return "NONE";
    case 0x88: return "NEWTRUE"; case 0x89: return "NEWFALSE"; case 'q': return "BINPUT";
    case 'r': return "LONG_BINPUT"; case 0x94: return "MEMOIZE"; case 'h': return "BINGET";
    case 'j': return "LONG_BINGET"; case 'c': return "GLOBAL"; case 0x93: return "STACK_GLOBAL";
    case 'R': return "REDUCE"; case 'b': return "BUILD"; case 0x81: return "NEWOBJ"; case 0x92: return "NEWOBJ_EX";
    case 'Q': return "BINPERSID"; case 'P': return "PERSID"; case '0': return "POP"; case '2': return "DUP";
    case '1': return "POP_MARK"; case 0x8f: return "EMPTY_SET"; case 0x90: return "ADDITEMS";
    case 0x91: return "FROZENSET"; case 'l': return "LIST"; case 'd': return "DICT";
    default: return nullptr;
    }
}

void Unpickler::fail(const std::string & what) const {
    const char * name = op_name(op_);
    char op[32];
    if (name) std::snprintf(op, sizeof op, "%s", name);
    else std::snprintf(op, sizeof op, "opcode 0x%02x", op_);
    std::string where = pkl_name_ + " at byte " + std::to_string(op_pos_) + " (" + op, keys;
    for (size_t d = 0; d < near_.size() && d <= marks_.size(); ++d)
        if (!near_[d].empty()) keys += (keys.empty() ? "'" : ", '") + near_[d] + "'";
    if (!keys.empty()) where += ", near " + keys;
    pt_fail(z_.path, where + ")", what);
}

const uint8_t * Unpickler::take(uint64_t n) {
    if (!pt_span_ok(pos_, n, size_))
        fail("expected " + std::to_string(n) + " bytes of argument, found " + std::to_string(size_ - pos_) +
             " before the end of the pickle (truncated or corrupt)");
    const uint8_t * p = data_ + pos_;
    pos_ += n;
    return p;
}

uint64_t Unpickler::arg_uint(int n) {
    const uint8_t * p = take(uint64_t(n));
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; --i) v = (v << 8) | p[i];
    return v;
}

std::string Unpickler::arg_line() {
    const void * nl = std::memchr(data_ + pos_, '\n', size_t(size_ - pos_));
    if (!nl) fail("expected a newline-terminated name, found the end of the pickle");
    const uint8_t * end = static_cast<const uint8_t *>(nl);
    std::string s(reinterpret_cast<const char *>(data_ + pos_), size_t(end - (data_ + pos_)));
    pos_ = uint64_t(end - data_) + 1;
    return s;
}

PtValue Unpickler::pop() {
    if (stack_.size() <= frame_base()) fail("stack underflow: expected a value, found none");
    PtValue v = std::move(stack_.back());
    stack_.pop_back();
    return v;
}

PtValue & Unpickler::top() {
    if (stack_.size() <= frame_base()) fail("stack underflow: expected a value, found none");
    return stack_.back();
}

std::vector<PtValue> Unpickler::pop_mark() {
    if (marks_.empty()) fail("expected a MARK on the stack, found none");
    const size_t m = marks_.back();
    marks_.pop_back();
    std::vector<PtValue> items(std::make_move_iterator(stack_.begin() + ptrdiff_t(m)),
                               std::make_move_iterator(stack_.end()));
    stack_.resize(m);
    if (near_.size() > marks_.size() + 1) near_.resize(marks_.size() + 1);
    return items;
}

void Unpickler::copy_charge(const PtValue & v) {
    copied_ += v.str.size();
    if (copied_ > copy_budget_)
        fail("expected the pickle to copy at most " + std::to_string(copy_budget_) +
             " bytes of strings, found more (a hostile file?)");
}

PtValue Unpickler::container(Kind k) {
    PtValue v;
    v.kind = k;
    v.node = std::make_shared<PtNode>();
    nodes_.push_back(v.node);
    return v;
}

// Python's dict keys compare by value; strings and numbers cover every real key.
bool key_hash(const PtValue & k, std::string & out) {
    switch (k.kind) {
    case Kind::None: out = "n"; return true;
    case Kind::Bool: out = "i" + std::to_string(int(k.boolean)); return true;
    case Kind::Int: out = "i" + std::to_string(k.integer); return true;
    case Kind::Float:
        if (std::floor(k.number) == k.number && std::fabs(k.number) < 9e18) {
            out = "i" + std::to_string(int64_t(k.number));
        } else {
            char b[40];
            std::snprintf(b, sizeof b, "f%.17g", k.number);
            out = b;
        }
        return true;
    case Kind::String: out = "s" + k.str; return true;
    case Kind::Bytes: out = "b" + k.str; return true;
    case Kind::Global: out = "g" + k.str; return true;
    default: return false;
    }
}

void Unpickler::dict_set(PtValue & d, PtValue k, PtValue v) {
    if (d.kind != Kind::Dict && d.kind != Kind::Object)
        fail(std::string("expected a dict to set an item in, found a ") + d.kind_name());
    PtNode & n = *d.node;
    std::string h;
    if (key_hash(k, h)) {
        auto it = n.index.find(h);
        if (it != n.index.end()) {
            n.entries[it->second].second = std::move(v);
            return;
        }
        n.index.emplace(std::move(h), n.entries.size());
    }
    n.entries.emplace_back(std::move(k), std::move(v));
}

int64_t Unpickler::as_int(const PtValue & v, const std::string & what) const {
    if (v.kind == Kind::Int) return v.integer;
    if (v.kind == Kind::Bool) return v.boolean;
    fail(what + ": expected an int, found a " + v.kind_name());
}

std::vector<int64_t> Unpickler::as_ints(const PtValue & v, const std::string & what) const {
    if (v.kind != Kind::Tuple && v.kind != Kind::List)
        fail(what + ": expected a tuple of ints, found a " + v.kind_name());
    if (v.items().size() > rank_max)
        fail(what + ": expected at most " + std::to_string(rank_max) + " entries, found " +
             std::to_string(v.items().size()));
    std::vector<int64_t> out;
    for (const auto & x : v.items()) out.push_back(as_int(x, what));
    return out;
}

std::string dtype_text(at::ScalarType t) { return c10::toString(t); }

// storage (persistent_load's 1-D tensor at offset 0), offset, sizes and strides in `dtype` elements.
at::Tensor Unpickler::tensor_view(const at::Tensor & storage, at::ScalarType dtype, int64_t offset,
                                  const std::vector<int64_t> & sizes, const std::vector<int64_t> & strides,
                                  const std::string & fn) {
    auto bad = [&](const std::string & what) { fail(fn + ": " + what); };
    if (sizes.size() != strides.size())
        bad("expected as many strides as sizes, found " + std::to_string(strides.size()) + " strides for " +
            std::to_string(sizes.size()) + " sizes");
    if (offset < 0) bad("expected a non-negative storage offset, found " + std::to_string(offset));
    int64_t numel = 1;
    for (size_t i = 0; i < sizes.size(); ++i) {
        if (sizes[i] < 0) bad("expected non-negative sizes, found " + std::to_string(sizes[i]));
        if (strides[i] < 0) bad("expected non-negative strides, found " + std::to_string(strides[i]));
        if (__builtin_mul_overflow(numel, sizes[i], &numel))
            bad("expected an element count that fits in 64 bits, found an overflowing size");
    }
    const auto options = at::TensorOptions().dtype(dtype).device(at::kCPU);
    if (numel == 0) return at::empty_strided(sizes, strides, options);
    const int64_t esize = int64_t(c10::elementSize(dtype));
    const int64_t avail = int64_t(std::min<uint64_t>(uint64_t(storage.numel()) * storage.element_size(),
                                                     storage.storage().nbytes())) / esize;
    int64_t last = offset;
    for (size_t i = 0; i < sizes.size(); ++i) {
        int64_t step;
        if (__builtin_mul_overflow(sizes[i] - 1, strides[i], &step) || __builtin_add_overflow(last, step, &last))
            bad("size * stride overflows 64 bits");
    }
    if (last >= avail)
        bad("the view (offset " + std::to_string(offset) + ", last element " + std::to_string(last) +
            ") exceeds its storage of " + std::to_string(avail) + " " + dtype_text(dtype) + " elements");
    at::Tensor t = at::empty({0}, options);
    t.set_(storage.storage(), offset, sizes, strides);
    return t;
}

PtValue Unpickler::persistent_load(const PtValue & pid) {
    if (pid.kind != Kind::Tuple || pid.items().size() < 5 || pid.items()[0].kind != Kind::String ||
        pid.items()[0].str != "storage")
        fail(std::string("expected a persistent id ('storage', type, key, location, numel), found a ") +
             pid.kind_name() + (pid.kind == Kind::Tuple ? " of " + std::to_string(pid.items().size()) : ""));
    const auto & a = pid.items();
    if (a[1].kind != Kind::Global) fail(std::string("storage type: expected a class, found a ") + a[1].kind_name());
    const std::string tname = base_name(a[1].str);
    const StorageType * st = nullptr;
    for (const auto & s : storage_types)
        if (tname == s.name) st = &s;
    if (!st)
        fail("storage type: expected one of FloatStorage, HalfStorage, BFloat16Storage, ... or "
             "UntypedStorage, found " + a[1].str + (tname.rfind("Q", 0) == 0 ? " (quantized storages are "
             "not supported)" : ""));
    std::string key;
    if (a[2].kind == Kind::String) key = a[2].str;
    else if (a[2].kind == Kind::Int) key = std::to_string(a[2].integer);
    else fail(std::string("storage key: expected a string, found a ") + a[2].kind_name());
    // a[3] is the location ('cpu', 'cuda:0'): everything loads to the CPU.
    const int64_t numel = as_int(a[4], "storage '" + key + "' numel");
    if (numel < 0) fail("storage '" + key + "': expected a non-negative numel, found " + std::to_string(numel));
    const int64_t esize = int64_t(c10::elementSize(st->type));
    int64_t nbytes;
    if (__builtin_mul_overflow(numel, esize, &nbytes))
        fail("storage '" + key + "': numel " + std::to_string(numel) + " overflows 64 bits in bytes");

    auto it = storages_.find(key);
    if (it == storages_.end()) {
        const std::string ename = prefix_ + "data/" + key;
        const PtZipEntry * e = z_.find(ename);
        if (!e) fail("storage '" + key + "': expected a zip entry '" + ename + "', found none");
        const uint8_t * ptr = z_.base + e->data;
        StorageRec rec;
        if (e->size == 0) {
            rec.bytes = at::empty({0}, at::kByte);
        } else if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) {
            // torch.save aligns data to 64 bytes; a foreign writer may not: copy, never misalign.
            rec.bytes = at::empty({int64_t(e->size)}, at::kByte);
            std::memcpy(rec.bytes.data_ptr(), ptr, size_t(e->size));
        } else {
            auto mapping = z_.mapping;
            rec.bytes = at::from_blob(const_cast<uint8_t *>(ptr), {int64_t(e->size)}, [mapping](void *) {},
                                      at::TensorOptions().dtype(at::kByte));
        }
        it = storages_.emplace(key, std::move(rec)).first;
    }
    StorageRec & rec = it->second;
    if (rec.bytes.numel() < nbytes)
        fail("storage '" + key + "' (entry '" + prefix_ + "data/" + key + "'): expected at least " +
             std::to_string(nbytes) + " bytes for " + std::to_string(numel) + " " + dtype_text(st->type) +
             " elements, found " + std::to_string(rec.bytes.numel()));
    if (st->type == at::kBool && !rec.bool_checked) {
        // A bool byte other than 0/1 is undefined behaviour in every kernel that reads it.
        const uint8_t * p = rec.bytes.data_ptr<uint8_t>();
        for (int64_t i = 0; i < rec.bytes.numel(); ++i)
            if (p[i] > 1)
                fail("storage '" + key + "': expected bool bytes 0 or 1, found " + std::to_string(p[i]) +
                     " at byte " + std::to_string(i));
        rec.bool_checked = true;
    }
    PtValue v;
    v.kind = Kind::Tensor;
    v.tensor = at::empty({0}, at::TensorOptions().dtype(st->type));
    v.tensor.set_(rec.bytes.storage(), 0, {numel}, {1});
    storage_views_.emplace(v.tensor.unsafeGetTensorImpl(), v.tensor);
    return v;
}

PtValue Unpickler::tensor_rebuild(const std::string & fn, const std::vector<PtValue> & a, bool v3) {
    // (storage, offset, size, stride, requires_grad, hooks[, metadata]); v3 has dtype 7th.
    const size_t need = v3 ? 7 : 4;
    if (a.size() < need)
        fail(fn + ": expected at least " + std::to_string(need) + " arguments, found " + std::to_string(a.size()));
    if (a[0].kind != Kind::Tensor || !storage_views_.count(a[0].tensor.unsafeGetTensorImpl()))
        fail(fn + ": expected a storage (a persistent id), found a " +
             (a[0].kind == Kind::Tensor ? std::string("tensor") : a[0].kind_name()));
    at::ScalarType dtype = a[0].tensor.scalar_type();
    if (v3) {
        const PtValue & d = a[6];
        const StorageType * found = nullptr;
        if (d.kind == Kind::Global)
            for (const auto & n : dtype_names)
                if (d.str == std::string("torch.") + n.name) found = &n;
        if (!found) fail(fn + ": expected a torch dtype, found " + (d.kind == Kind::Global ? d.str : d.kind_name()));
        dtype = found->type;
        if (dtype == at::kBool) {
            const uint8_t * p = static_cast<const uint8_t *>(a[0].tensor.data_ptr());
            for (size_t k = 0; k < a[0].tensor.nbytes(); ++k)
                if (p[k] > 1) fail(fn + ": expected bool bytes 0 or 1, found " + std::to_string(p[k]));
        }
    }
    const int64_t offset = as_int(a[1], fn + " storage offset");
    const auto sizes = as_ints(a[2], fn + " size");
    const auto strides = as_ints(a[3], fn + " stride");
    PtValue v;
    v.kind = Kind::Tensor;
    v.tensor = tensor_view(a[0].tensor, dtype, offset, sizes, strides, fn);
    return v;
}

// Latin-1 text (as protocol 2 pickles bytes: _codecs.encode(str, 'latin1')) back to bytes.
bool latin1_bytes(const std::string & utf8, std::string & out) {
    out.clear();
    for (size_t i = 0; i < utf8.size(); ++i) {
        const uint8_t c = uint8_t(utf8[i]);
        if (c < 0x80) {
            out += char(c);
        } else if ((c & 0xfe) == 0xc2 && i + 1 < utf8.size() && (uint8_t(utf8[i + 1]) & 0xc0) == 0x80) {
            out += char(((c & 0x03) << 6) | (uint8_t(utf8[i + 1]) & 0x3f));
            ++i;
        } else {
            return false;
        }
    }
    return true;
}

PtValue Unpickler::call(const PtValue & fn, const PtValue & args) {
    if (fn.kind != Kind::Global)
        fail(std::string("expected a class or function to call, found a ") + fn.kind_name());
    if (args.kind != Kind::Tuple && args.kind != Kind::List)
        fail(std::string("expected a tuple of arguments, found a ") + args.kind_name());
    const std::string & name = fn.str;
    const std::vector<PtValue> & a = args.items();

    if (name == "torch._utils._rebuild_tensor_v2" || name == "torch._utils._rebuild_tensor")
        return tensor_rebuild(base_name(name), a, false);
    if (name == "torch._utils._rebuild_tensor_v3") return tensor_rebuild("_rebuild_tensor_v3", a, true);
    if (name == "torch._utils._rebuild_parameter" || name == "torch._utils._rebuild_parameter_with_state") {
        if (a.empty() || a[0].kind != Kind::Tensor)
            fail(base_name(name) + ": expected a tensor as the first argument, found " +
                 (a.empty() ? std::string("none") : a[0].kind_name()));
        return a[0];
    }
    if (name == "torch._tensor._rebuild_from_type_v2") {
        // (func, type, args, state): a tensor subclass; rebuild the plain tensor.
        if (a.size() < 3) fail("_rebuild_from_type_v2: expected (func, type, args, state)");
        return call(a[0], a[2]);
    }
    if (name == "collections.OrderedDict" || name == "builtins.dict") {
        PtValue d = container(Kind::Dict);
        if (!a.empty()) {
            if (a[0].kind == Kind::Dict) {
                for (const auto & [k, v] : a[0].entries()) dict_set(d, k, v);
            } else {
                for (const auto & pair : a[0].items()) {
                    if ((pair.kind != Kind::Tuple && pair.kind != Kind::List) || pair.items().size() != 2)
                        fail(name + ": expected (key, value) pairs, found a " + pair.kind_name());
                    dict_set(d, pair.items()[0], pair.items()[1]);
                }
            }
        }
        return d;
    }
    if (name == "torch.Size" || name == "builtins.set" || name == "builtins.frozenset" ||
        name == "builtins.list" || name == "builtins.tuple") {
        PtValue out = container(name == "torch.Size" || name == "builtins.tuple" ? Kind::Tuple : Kind::List);
        if (!a.empty()) out.node->items = a[0].items();
        return out;
    }
    if (name == "torch.device" && !a.empty() && a[0].kind == Kind::String) {
        PtValue s;
        s.kind = Kind::String;
        s.str = a[0].str;
        if (a.size() > 1 && a[1].kind == Kind::Int) s.str += ":" + std::to_string(a[1].integer);
        return s;
    }
    if ((name == "_codecs.encode" || name == "builtins.bytearray" || name == "builtins.bytes") &&
        (a.empty() || a[0].kind == Kind::Bytes ||
         (a[0].kind == Kind::String && a.size() > 1 && a[1].kind == Kind::String))) {
        PtValue b;
        b.kind = Kind::Bytes;
        if (a.empty()) return b;
        if (a[0].kind == Kind::Bytes) {
            b.str = a[0].str;
            return b;
        }
        const std::string & enc = a[1].str;
        if (enc == "latin1" || enc == "latin-1" || enc == "iso-8859-1") {
            if (!latin1_bytes(a[0].str, b.str)) fail(name + ": expected latin-1 text, found other characters");
            return b;
        }
        if (enc == "utf-8" || enc == "utf8") {
            b.str = a[0].str;
            return b;
        }
    }
    // Anything else stays an opaque object: a dict holding one still loads.
    PtValue o = container(Kind::Object);
    o.str = name;
    o.node->items = a;
    return o;
}

PtValue Unpickler::run() {
    auto scalar = [](Kind k) { PtValue v; v.kind = k; return v; };
    while (pos_ < size_) {
        op_pos_ = pos_;
        op_ = data_[pos_++];
        switch (op_) {
        case 0x80: {  // PROTO
            const uint64_t p = arg_uint(1);
            if (p > 5) fail("expected pickle protocol 2 to 5, found " + std::to_string(p));
            break;
        }
        case 0x95: arg_uint(8); break;  // FRAME: a read-ahead hint only
        case '.': {  // STOP
            PtValue v = pop();
            graph_check(v);
            return v;
        }
        case '(': marks_.push_back(stack_.size()); break;
        case '}': push(container(Kind::Dict)); break;
        case ']': case 0x8f: push(container(Kind::List)); break;
        case ')': push(container(Kind::Tuple)); break;
        case 't': case 0x85: case 0x86: case 0x87: case 'l': case 0x91: {
            PtValue t = container(op_ == 'l' || op_ == 0x91 ? Kind::List : Kind::Tuple);
            if (op_ == 't' || op_ == 'l' || op_ == 0x91) {
                t.node->items = pop_mark();
            } else {
                const size_t n = size_t(op_ - 0x84);
                if (stack_.size() < frame_base() + n)
                    fail("stack underflow: expected " + std::to_string(n) + " values, found " +
                         std::to_string(stack_.size() - frame_base()));
                t.node->items.assign(std::make_move_iterator(stack_.end() - ptrdiff_t(n)),
                                     std::make_move_iterator(stack_.end()));
                stack_.resize(stack_.size() - n);
            }
            push(std::move(t));
            break;
        }
        case 'd': {  // DICT
            auto items = pop_mark();
            if (items.size() % 2) fail("expected key/value pairs, found an odd number of values");
            PtValue d = container(Kind::Dict);
            for (size_t i = 0; i < items.size(); i += 2) dict_set(d, std::move(items[i]), std::move(items[i + 1]));
            push(std::move(d));
            break;
        }
        case 's': {
            PtValue v = pop(), k = pop();
            dict_set(top(), std::move(k), std::move(v));
            break;
        }
        case 'u': {
            auto items = pop_mark();
            if (items.size() % 2) fail("expected key/value pairs, found an odd number of values");
            PtValue & d = top();
            for (size_t i = 0; i < items.size(); i += 2) dict_set(d, std::move(items[i]), std::move(items[i + 1]));
            break;
        }
        case 'a': case 'e': case 0x90: {  // APPEND, APPENDS, ADDITEMS
            std::vector<PtValue> items;
            if (op_ == 'a') items.push_back(pop());
            else items = pop_mark();
            PtValue & l = top();
            if (l.kind == Kind::Object) break;  // opaque: its appended values are dropped
            if (l.kind != Kind::List) fail(std::string("expected a list to append to, found a ") + l.kind_name());
            for (auto & x : items) l.node->items.push_back(std::move(x));
            break;
        }
        case 'J': { PtValue v = scalar(Kind::Int); v.integer = int32_t(uint32_t(arg_uint(4))); push(v); break; }
        case 'K': { PtValue v = scalar(Kind::Int); v.integer = int64_t(arg_uint(1)); push(v); break; }
        case 'M': { PtValue v = scalar(Kind::Int); v.integer = int64_t(arg_uint(2)); push(v); break; }
        case 0x8a: case 0x8b: {  // LONG1, LONG4: little-endian two's complement
            const uint64_t n = arg_uint(op_ == 0x8a ? 1 : 4);
            const uint8_t * p = take(n);
            const bool neg = n > 0 && (p[n - 1] & 0x80);
            bool fits = true;
            for (uint64_t i = 8; i < n; ++i) fits = fits && p[i] == (neg ? 0xff : 0x00);
            if (n > 8) fits = fits && bool(p[7] & 0x80) == neg;
            PtValue v;
            if (fits) {
                uint64_t u = neg ? ~uint64_t(0) : 0;
                for (uint64_t i = 0; i < std::min<uint64_t>(n, 8); ++i) {
                    u &= ~(uint64_t(0xff) << (8 * i));
                    u |= uint64_t(p[i]) << (8 * i);
                }
                v.kind = Kind::Int;
                v.integer = int64_t(u);
            } else {
                // Beyond int64: a float, as close as a double gets.
                double mag = 0;
                for (uint64_t i = n; i-- > 0;) mag = mag * 256 + (neg ? 255 - p[i] : p[i]);
                v.kind = Kind::Float;
                v.number = neg ? -(mag + 1) : mag;
            }
            push(v);
            break;
        }
        case 'G': {  // BINFLOAT: big-endian
            const uint64_t be = __builtin_bswap64(arg_uint(8));
            PtValue v = scalar(Kind::Float);
            std::memcpy(&v.number, &be, 8);
            push(v);
            break;
        }
        case 'X': case 0x8c: case 0x8d: case 'T': case 'U':
        case 'B': case 'C': case 0x8e: case 0x96: {
            int width = 4;
            if (op_ == 0x8c || op_ == 'U' || op_ == 'C') width = 1;
            else if (op_ == 0x8d || op_ == 0x8e || op_ == 0x96) width = 8;
            uint64_t n = arg_uint(width);
            if (op_ == 'T' && n > 0x7fffffffu) fail("expected a non-negative string length, found a negative one");
            const uint8_t * p = take(n);
            const bool text = op_ == 'X' || op_ == 0x8c || op_ == 0x8d || op_ == 'T' || op_ == 'U';
            PtValue v = scalar(text ? Kind::String : Kind::Bytes);
            v.str.assign(reinterpret_cast<const char *>(p), size_t(n));
            if (text && n <= 200) {
                near_.resize(marks_.size() + 1);
                near_.back() = v.str;
            }
            push(std::move(v));
            break;
        }
        case 'N': push(PtValue{}); break;
        case 0x88: case 0x89: { PtValue v = scalar(Kind::Bool); v.boolean = op_ == 0x88; push(v); break; }
        case 'q': case 'r': case 0x94: {
            const uint64_t idx = op_ == 0x94 ? memo_.size() : arg_uint(op_ == 'q' ? 1 : 4);
            copy_charge(top());
            memo_[idx] = top();
            break;
        }
        case 'h': case 'j': {
            const uint64_t idx = arg_uint(op_ == 'h' ? 1 : 4);
            auto it = memo_.find(idx);
            if (it == memo_.end()) fail("memo entry " + std::to_string(idx) + " was never stored (no BINPUT for it)");
            copy_charge(it->second);
            push(it->second);
            break;
        }
        case 'c': {
            std::string module = arg_line();
            std::string name = arg_line();
            if (module == "__builtin__") module = "builtins";  // protocol 2 writes Python 2 names
            PtValue g = scalar(Kind::Global);
            g.str = module + "." + name;
            push(std::move(g));
            break;
        }
        case 0x93: {
            PtValue name = pop(), module = pop();
            if (name.kind != Kind::String || module.kind != Kind::String)
                fail("expected module and name strings, found a " + std::string(module.kind_name()) + " and a " +
                     name.kind_name());
            PtValue g = scalar(Kind::Global);
            g.str = module.str + "." + name.str;
            push(std::move(g));
            break;
        }
        case 'R': case 0x81: case 0x92: {  // REDUCE, NEWOBJ, NEWOBJ_EX (whose kwargs are dropped)
            if (op_ == 0x92) pop();
            PtValue args = pop();
            PtValue fn = pop();
            push(call(fn, args));
            break;
        }
        case 'b': {
            PtValue state = pop();
            PtValue & obj = top();
            if (obj.kind == Kind::Tensor) break;  // subclass attributes: not kept
            if (!obj.node) fail(std::string("expected an object to set state on, found a ") + obj.kind_name());
            obj.node->state.assign(1, std::move(state));
            break;
        }
        case 'Q': { PtValue pid = pop(); push(persistent_load(pid)); break; }
        case '0':
            if (stack_.size() > frame_base()) stack_.pop_back();
            else pop_mark();
            break;
        case '2': copy_charge(top()); push(top()); break;
        case '1': pop_mark(); break;
        default: {
            char b[64];
            std::snprintf(b, sizeof b, "0x%02x", op_);
            fail(std::string("unknown or unsupported pickle opcode ") + b +
                 " (expected the protocol 2-5 subset that torch.save emits)");
        }
        }
    }
    op_pos_ = pos_;
    op_ = '.';
    fail("expected STOP, found the end of the pickle (truncated?)");
}

// Rejects cycles and nesting deeper than depth_max, iteratively; marks what the result keeps.
void Unpickler::graph_check(const PtValue & root) {
    if (!root.node) return;
    // The i-th value a node holds: items, then entry keys and values, then BUILD state.
    auto child_at = [](const PtNode * n, size_t i) -> const PtValue * {
        const size_t ni = n->items.size(), ne = n->entries.size();
        if (i < ni) return &n->items[i];
        if (i < ni + 2 * ne) return (i - ni) % 2 ? &n->entries[(i - ni) / 2].second : &n->entries[(i - ni) / 2].first;
        return i < ni + 2 * ne + n->state.size() ? &n->state[i - ni - 2 * ne] : nullptr;
    };
    const std::string too_deep = "expected containers nested at most " + std::to_string(depth_max) +
                                 " levels deep, found deeper";
    std::unordered_map<const PtNode *, size_t> height;  // finished nodes
    std::unordered_set<const PtNode *> open;
    std::vector<std::pair<const PtNode *, size_t>> st{{root.node.get(), 0}};  // node, next child
    open.insert(root.node.get());
    while (!st.empty()) {
        auto & [n, next] = st.back();
        const PtValue * c;
        while ((c = child_at(n, next)) && !c->node) ++next;
        if (!c) {
            size_t h = 0;
            for (size_t i = 0; (c = child_at(n, i)); ++i)
                if (c->node) h = std::max(h, height[c->node.get()]);
            if (h + 1 > depth_max) fail(too_deep);
            height[n] = h + 1;
            open.erase(n);
            st.pop_back();
            continue;
        }
        ++next;
        const PtNode * cn = c->node.get();
        if (open.count(cn)) fail("a container contains itself (recursive structures are not supported)");
        if (height.count(cn)) continue;
        if (st.size() >= depth_max) fail(too_deep);
        open.insert(cn);
        st.emplace_back(cn, 0);
    }
    for (const auto & [n, h] : height) keep_.insert(n);
}

// -- flattening --------------------------------------------------------------------------------

constexpr uint64_t flatten_visits_max = uint64_t(1) << 22;

void flatten(const PtValue & v, const std::string & name, NamedTensors & out,
             std::unordered_set<std::string> & seen, uint64_t & visits);

// The tensors under a dict's, list's or tuple's values, named <base><key or index>.
void flatten_children(const PtValue & v, const std::string & base, NamedTensors & out,
                      std::unordered_set<std::string> & seen, uint64_t & visits) {
    if (v.kind == Kind::Dict) {
        for (const auto & [k, x] : v.entries()) {
            if (k.kind == Kind::String) flatten(x, base + k.str, out, seen, visits);
            else if (k.kind == Kind::Int) flatten(x, base + std::to_string(k.integer), out, seen, visits);
        }
    } else if (v.kind == Kind::List || v.kind == Kind::Tuple) {
        for (size_t i = 0; i < v.items().size(); ++i)
            flatten(v.items()[i], base + std::to_string(i), out, seen, visits);
    }
}

void flatten(const PtValue & v, const std::string & name, NamedTensors & out,
             std::unordered_set<std::string> & seen, uint64_t & visits) {
    if (++visits > flatten_visits_max)
        throw std::runtime_error("state dict: expected at most " + std::to_string(flatten_visits_max) +
                                 " values, found more (shared sub-dicts expanding?)");
    if (v.kind != Kind::Tensor) return flatten_children(v, name + ".", out, seen, visits);
    if (!seen.insert(name).second)
        throw std::runtime_error("state dict: tensor name '" + name + "' is produced twice");
    out.emplace_back(name, v.tensor);
}

} // namespace

namespace {

PtValue pt_read(const std::string & path) {
    PtZipArchive z = pt_zip_open(path);
    const PtZipEntry * pkl = nullptr;
    std::string prefix;
    for (const auto & e : z.entries) {
        const size_t slash = e.name.find('/');
        // "<archive>/data.pkl" one folder down (the folder is the file's stem at save time).
        if (e.name == "data.pkl" ||
            (slash != std::string::npos && e.name.compare(slash, e.name.npos, "/data.pkl") == 0)) {
            pkl = &e;
            prefix = e.name.substr(0, e.name.size() - 8);
            break;
        }
    }
    if (!pkl) {
        std::string names;
        for (size_t i = 0; i < z.entries.size() && i < 5; ++i) names += (i ? ", '" : "'") + z.entries[i].name + "'";
        pt_fail(path, "zip", "expected an entry '<archive>/data.pkl' (a torch.save file), found " +
                  std::to_string(z.entries.size()) + " entries" + (names.empty() ? "" : ": " + names));
    }
    if (const PtZipEntry * bo = z.find(prefix + "byteorder")) {
        std::string order(reinterpret_cast<const char *>(z.base + bo->data), size_t(std::min<uint64_t>(bo->size, 16)));
        if (order != "little")
            pt_fail(path, "zip entry '" + bo->name + "'", "expected byte order 'little', found '" + order + "'");
    }
    Unpickler u(z, prefix, *pkl);
    return u.run();
}

} // namespace

// LibTorch's own limits (stride or storage overflow) and memory failures still name the file.
PtValue pt_load(const std::string & path) {
    try {
        return pt_read(path);
    } catch (const c10::Error & e) {
        throw std::runtime_error(path + ": cannot build its tensors: " + e.what_without_backtrace());
    } catch (const std::bad_alloc &) {
        throw std::runtime_error(path + ": out of memory while reading it");
    } catch (const std::length_error & e) {
        throw std::runtime_error(path + ": a table it describes is too large (" + e.what() + ")");
    }
}

NamedTensors pt_state_dict(const PtValue & v, const std::string & prefix) {
    if (v.kind != Kind::Dict && v.kind != Kind::List && v.kind != Kind::Tuple)
        throw std::runtime_error(std::string("state dict: expected a dict of tensors, found a ") + v.kind_name());
    NamedTensors out;
    std::unordered_set<std::string> seen;
    uint64_t visits = 0;
    flatten_children(v, prefix, out, seen, visits);
    return out;
}

bool pt_file_is_torch(const std::string & path) {
    FdGuard fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    if (fd.fd < 0) return false;
    unsigned char b[4];
    if (::read(fd.fd, b, 4) != 4) return false;
    return (b[0] == 'P' && b[1] == 'K' && b[2] == 3 && b[3] == 4) ||
           (b[0] == 0x80 && b[1] == 0x02 && b[2] == 0x8a && b[3] == 0x0a);
}

} // namespace qatlab
