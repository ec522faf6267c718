// safetensors: memory-mapped, fully validated reader and atomic writer for the safetensors format.
// Hostile files must end in a std::runtime_error naming the file and the offending key, never a crash.
#include "lib/safetensors.h"
#include "lib/file_map.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <memory>
#include <set>
#include <stdexcept>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "safetensors data is little-endian; this reader maps it as host memory"
#endif

namespace qatlab {

namespace {

using json = nlohmann::json;

// Same bound as the official loader: a larger header is an attack, not a model.
constexpr uint64_t header_size_max = 100'000'000;
// Far above any real tensor; stops a header of a million 1s from building a million-dim tensor.
constexpr size_t rank_max = 64;

struct DtypeInfo {
    const char * name;
    at::ScalarType type;
    int64_t size;
};

// The official dtype strings. C64, F8_E8M0 and the sub-byte F4/F6 types are left out: nothing
// here uses them, and sub-byte sizes break the numel * size rule.
const DtypeInfo dtype_table[] = {
    {"F64", at::kDouble, 8},
    {"F32", at::kFloat, 4},
    {"F16", at::kHalf, 2},
    {"BF16", at::kBFloat16, 2},
    {"F8_E4M3", at::ScalarType::Float8_e4m3fn, 1},
    {"F8_E5M2", at::ScalarType::Float8_e5m2, 1},
    {"I64", at::kLong, 8},
    {"I32", at::kInt, 4},
    {"I16", at::kShort, 2},
    {"I8", at::kChar, 1},
    {"U64", at::ScalarType::UInt64, 8},
    {"U32", at::ScalarType::UInt32, 4},
    {"U16", at::ScalarType::UInt16, 2},
    {"U8", at::kByte, 1},
    {"BOOL", at::kBool, 1},
};

const DtypeInfo * dtype_find(const std::string & name) {
    for (const auto & d : dtype_table)
        if (name == d.name) return &d;
    return nullptr;
}

const DtypeInfo * dtype_find(at::ScalarType t) {
    for (const auto & d : dtype_table)
        if (t == d.type) return &d;
    return nullptr;
}

std::string dtype_list() {
    std::string s;
    for (const auto & d : dtype_table) {
        if (!s.empty()) s += ", ";
        s += d.name;
    }
    return s;
}

// Writes v as JSON, stopping past `limit` characters; hand-rolled because dump() recurses
// without bound and a hostile header can nest a million arrays.
void excerpt_append(const json & v, std::string & out, size_t limit) {
    if (out.size() > limit) return;
    if (v.is_array() || v.is_object()) {
        out += v.is_array() ? '[' : '{';
        bool first = true;
        for (auto it = v.begin(); it != v.end() && out.size() <= limit; ++it) {
            if (!first) out += ", ";
            first = false;
            if (v.is_object()) out += json(it.key()).dump(-1, ' ', false, json::error_handler_t::replace) + ": ";
            excerpt_append(*it, out, limit);
        }
        out += v.is_array() ? ']' : '}';
    } else {
        out += v.dump(-1, ' ', false, json::error_handler_t::replace);
    }
}

// A JSON value as it appears in the file, cut short so a hostile header cannot flood the message.
std::string json_excerpt(const json & v) {
    std::string s;
    excerpt_append(v, s, 80);
    if (s.size() > 80) s = s.substr(0, 77) + "...";
    return s;
}

std::string ints_format(const std::vector<int64_t> & v) {
    std::string s = "[";
    for (size_t i = 0; i < v.size(); ++i) {
        if (i) s += ", ";
        s += std::to_string(v[i]);
    }
    return s + "]";
}

std::string offsets_format(uint64_t begin, uint64_t end) {
    return "[" + std::to_string(begin) + ", " + std::to_string(end) + "]";
}

[[noreturn]] void load_fail(const std::string & path, const std::string & key, const std::string & what) {
    throw std::runtime_error(path + ": " + key + ": " + what);
}

std::string tensor_key(const std::string & name) {
    return "tensor '" + name + "'";
}

struct TensorEntry {
    std::string name;
    const DtypeInfo * dtype;
    std::vector<int64_t> shape;
    uint64_t begin;
    uint64_t end;
};

// A non-negative integer that fits int64; nlohmann keeps large positives unsigned and the rest signed.
bool index_parse(const json & v, uint64_t & out) {
    if (v.is_number_unsigned()) {
        out = v.get<uint64_t>();
        return out <= uint64_t(INT64_MAX);
    }
    if (v.is_number_integer()) {
        int64_t x = v.get<int64_t>();
        if (x < 0) return false;
        out = uint64_t(x);
        return true;
    }
    return false;
}

TensorEntry entry_parse(const std::string & path, const std::string & name, const json & v) {
    const std::string key = tensor_key(name);
    if (!v.is_object())
        load_fail(path, key, "expected an object with dtype, shape and data_offsets, found " +
                  json_excerpt(v));
    TensorEntry e;
    e.name = name;

    auto dt = v.find("dtype");
    if (dt == v.end()) load_fail(path, key, "expected a dtype, found none");
    if (!dt->is_string() || !(e.dtype = dtype_find(dt->get<std::string>())))
        load_fail(path, key, "dtype: expected one of " + dtype_list() + ", found " + json_excerpt(*dt));

    auto sh = v.find("shape");
    if (sh == v.end()) load_fail(path, key, "expected a shape, found none");
    const std::string shape_expect = "shape: expected an array of non-negative integers, found ";
    if (!sh->is_array()) load_fail(path, key, shape_expect + json_excerpt(*sh));
    if (sh->size() > rank_max)
        load_fail(path, key, "shape: expected at most " + std::to_string(rank_max) + " dimensions, found " +
                  std::to_string(sh->size()));
    int64_t numel = 1;
    for (const auto & d : *sh) {
        uint64_t n;
        if (!index_parse(d, n)) load_fail(path, key, shape_expect + json_excerpt(*sh));
        e.shape.push_back(int64_t(n));
        if (__builtin_mul_overflow(numel, int64_t(n), &numel))
            load_fail(path, key, "shape: expected an element count that fits in 64 bits, found " +
                      json_excerpt(*sh));
    }
    // LibTorch computes contiguous strides even for an empty tensor: the product of the sizes
    // (zeros counted as ones) must fit too, or [0, 2^62, 2^62] overflows inside at::empty.
    int64_t span = e.dtype->size;
    for (int64_t d : e.shape)
        if (__builtin_mul_overflow(span, std::max<int64_t>(d, 1), &span))
            load_fail(path, key, "shape: expected sizes whose product (zeros counted as ones) fits in 64 bits, found " +
                      json_excerpt(*sh));
    int64_t nbytes;
    if (__builtin_mul_overflow(numel, e.dtype->size, &nbytes))
        load_fail(path, key, "shape: expected a byte size that fits in 64 bits, found " +
                  json_excerpt(*sh) + " of " + e.dtype->name);

    auto off = v.find("data_offsets");
    if (off == v.end()) load_fail(path, key, "expected data_offsets, found none");
    const std::string off_expect = "data_offsets: expected [begin, end] with 0 <= begin <= end, found ";
    if (!off->is_array() || off->size() != 2 || !index_parse((*off)[0], e.begin) ||
        !index_parse((*off)[1], e.end) || e.end < e.begin)
        load_fail(path, key, off_expect + json_excerpt(*off));

    if (e.end - e.begin != uint64_t(nbytes))
        load_fail(path, key, "data_offsets " + offsets_format(e.begin, e.end) + " do not match dtype " +
                  e.dtype->name + " and shape " + ints_format(e.shape) + " (expected " +
                  std::to_string(nbytes) + " bytes, found " + std::to_string(e.end - e.begin) + ")");
    return e;
}

std::map<std::string, std::string> metadata_parse(const std::string & path, const json & v) {
    if (!v.is_object())
        load_fail(path, "__metadata__", "expected an object of strings, found " + json_excerpt(v));
    std::map<std::string, std::string> out;
    for (auto it = v.begin(); it != v.end(); ++it) {
        if (!it->is_string())
            load_fail(path, "__metadata__", "key '" + it.key() + "': expected a string value, found " +
                      json_excerpt(*it));
        out[it.key()] = it->get<std::string>();
    }
    return out;
}

// Unlinks the temporary file unless the save reached its rename.
struct TempFile {
    std::string path;
    int fd = -1;
    bool keep = false;
    ~TempFile() {
        if (fd >= 0) ::close(fd);
        if (!keep) ::unlink(path.c_str());
    }
};

[[noreturn]] void save_fail(const std::string & path, const std::string & what) {
    throw std::runtime_error(path + ": " + what);
}

void bytes_write(const std::string & path, const TempFile & tmp, const char * data, size_t n) {
    while (n > 0) {
        // Linux caps one write at ~2 GiB; chunking also keeps EINTR retries cheap.
        ssize_t w = ::write(tmp.fd, data, std::min<size_t>(n, size_t(1) << 30));
        if (w < 0) {
            const int err = errno;
            if (err == EINTR) continue;
            save_fail(path, "cannot write '" + tmp.path + "': " + std::strerror(err));
        }
        data += w;
        n -= size_t(w);
    }
}

} // namespace

const char * safetensors_dtype_name(at::ScalarType t) {
    const DtypeInfo * d = dtype_find(t);
    if (!d)
        throw std::runtime_error(std::string("safetensors: dtype ") + c10::toString(t) +
                                 " is not supported (expected one of " + dtype_list() + ")");
    return d->name;
}

namespace {

SafetensorsFile safetensors_read(const std::string & path) {
    std::shared_ptr<FileMap> mapping = file_map_open(path);
    const uint64_t file_size = mapping->size;
    if (file_size < 8)
        load_fail(path, "header length", "expected an 8-byte length, found a file of " +
                  std::to_string(file_size) + " bytes");
    void * addr = mapping->data;
    const char * base = static_cast<const char *>(addr);

    uint64_t header_size;
    std::memcpy(&header_size, base, 8);
    if (header_size > header_size_max)
        load_fail(path, "header length", "expected at most " + std::to_string(header_size_max) +
                  " bytes, found " + std::to_string(header_size));
    if (header_size > file_size - 8)
        load_fail(path, "header length", "expected at most " + std::to_string(file_size - 8) +
                  " bytes (the rest of the file), found " + std::to_string(header_size));

    json header;
    try {
        header = json::parse(base + 8, base + 8 + header_size);
    } catch (const std::exception & e) {
        load_fail(path, "header", std::string("expected JSON, found a parse error (") + e.what() + ")");
    }
    if (!header.is_object()) load_fail(path, "header", "expected a JSON object, found " + json_excerpt(header));

    SafetensorsFile out;
    std::vector<TensorEntry> entries;
    for (auto it = header.begin(); it != header.end(); ++it) {
        if (it.key() == "__metadata__") {
            out.metadata = metadata_parse(path, *it);
            continue;
        }
        if (it.key().empty()) load_fail(path, tensor_key(""), "expected a non-empty name, found an empty one");
        entries.push_back(entry_parse(path, it.key(), *it));
    }

    // The official loader demands the tensors tile the buffer exactly: no overlap, no hole.
    std::stable_sort(entries.begin(), entries.end(), [](const TensorEntry & a, const TensorEntry & b) {
        return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
    });
    const uint64_t data_start = 8 + header_size;
    const uint64_t data_size = file_size - data_start;
    uint64_t pos = 0;
    const TensorEntry * prev = nullptr;
    for (const auto & e : entries) {
        if (e.begin != pos) {
            std::string after = prev ? "tensor '" + prev->name + "'" : "the start of the buffer";
            std::string what = e.begin < pos ? "overlap " + after : "leave a hole after " + after;
            load_fail(path, tensor_key(e.name), "data_offsets " + offsets_format(e.begin, e.end) + " " +
                      what + " (expected begin " + std::to_string(pos) + ", found " +
                      std::to_string(e.begin) + ")");
        }
        if (e.end > data_size)
            load_fail(path, tensor_key(e.name), "data_offsets " + offsets_format(e.begin, e.end) +
                      " exceed the data buffer (expected end <= " + std::to_string(data_size) +
                      ", found " + std::to_string(e.end) + ")");
        pos = e.end;
        prev = &e;
    }
    if (pos != data_size)
        load_fail(path, "data buffer", "expected " + std::to_string(data_size) +
                  " bytes covered by tensors, found " + std::to_string(pos) + " (" +
                  std::to_string(data_size - pos) + " trailing bytes)");

    for (const auto & e : entries) {
        const auto options = at::TensorOptions().dtype(e.dtype->type).device(at::kCPU);
        char * ptr = static_cast<char *>(addr) + data_start + e.begin;
        const size_t nbytes = size_t(e.end - e.begin);
        if (e.dtype->type == at::kBool) {
            // A bool byte other than 0/1 is undefined behaviour in every kernel that reads it.
            for (size_t i = 0; i < nbytes; ++i)
                if (uint8_t(ptr[i]) > 1)
                    load_fail(path, tensor_key(e.name), "expected BOOL bytes 0 or 1, found " +
                              std::to_string(uint8_t(ptr[i])) + " at element " + std::to_string(i));
        }
        at::Tensor t;
        if (nbytes == 0) {
            t = at::empty(e.shape, options);
        } else if (reinterpret_cast<uintptr_t>(ptr) % uintptr_t(e.dtype->size) != 0) {
            // Only the header is padded, so foreign writers can leave data misaligned: copy it.
            t = at::empty(e.shape, options);
            std::memcpy(t.data_ptr(), ptr, nbytes);
        } else {
            t = at::from_blob(ptr, e.shape, [mapping](void *) {}, options);
        }
        out.tensors.emplace_back(e.name, std::move(t));
    }
    return out;
}

} // namespace

// What the checks above cannot foresee (LibTorch's own limits, memory) still names the file.
SafetensorsFile safetensors_load(const std::string & path) {
    try {
        return safetensors_read(path);
    } catch (const c10::Error & e) {
        throw std::runtime_error(path + ": cannot build its tensors: " + e.what_without_backtrace());
    } catch (const std::bad_alloc &) {
        throw std::runtime_error(path + ": out of memory while reading it");
    } catch (const std::length_error & e) {
        throw std::runtime_error(path + ": a table it describes is too large (" + e.what() + ")");
    }
}

void safetensors_save(const std::string & path, const NamedTensors & tensors,
                      const std::map<std::string, std::string> & metadata) {
    // Validate and lay out everything before touching the disk.
    nlohmann::ordered_json header = nlohmann::ordered_json::object();
    if (!metadata.empty()) {
        auto & m = header["__metadata__"] = nlohmann::ordered_json::object();
        for (const auto & [k, v] : metadata) m[k] = v;
    }
    std::set<std::string> seen;
    uint64_t pos = 0;
    for (const auto & [name, t] : tensors) {
        const std::string key = tensor_key(name);
        if (name.empty()) save_fail(path, key + ": expected a non-empty name, found an empty one");
        if (name == "__metadata__") save_fail(path, key + ": expected a tensor name, found the reserved key");
        if (!seen.insert(name).second) save_fail(path, key + ": expected a unique name, found a duplicate");
        if (!t.defined()) save_fail(path, key + ": expected a tensor, found an undefined one");
        if (t.layout() != at::kStrided)
            save_fail(path, key + ": expected a strided (dense) tensor, found layout " + c10::toString(t.layout()));
        const DtypeInfo * d = dtype_find(t.scalar_type());
        if (!d)
            save_fail(path, key + ": expected dtype one of " + dtype_list() + ", found " +
                      c10::toString(t.scalar_type()));
        if (size_t(t.dim()) > rank_max)
            save_fail(path, key + ": expected at most " + std::to_string(rank_max) +
                      " dimensions (the loader's limit), found " + std::to_string(t.dim()));
        const uint64_t nbytes = uint64_t(t.numel()) * uint64_t(d->size);
        nlohmann::ordered_json entry;
        entry["dtype"] = d->name;
        entry["shape"] = t.sizes().vec();
        entry["data_offsets"] = {pos, pos + nbytes};
        header[name] = std::move(entry);
        pos += nbytes;
    }
    std::string header_text;
    try {
        header_text = header.dump();
    } catch (const std::exception & e) {
        save_fail(path, std::string("header: expected UTF-8 names and metadata, found invalid text (") +
                  e.what() + ")");
    }
    // Padded with spaces to a multiple of 8 so the data starts aligned, as the official writer does.
    header_text.append((8 - header_text.size() % 8) % 8, ' ');
    const uint64_t header_size = header_text.size();

    TempFile tmp;
    tmp.path = path + ".tmp." + std::to_string(::getpid());
    tmp.fd = ::open(tmp.path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (tmp.fd < 0) {
        const int err = errno;
        tmp.keep = true;  // never created; do not unlink a file someone else may own
        save_fail(path, "cannot create '" + tmp.path + "': " + std::strerror(err));
    }
    char len_bytes[8];
    std::memcpy(len_bytes, &header_size, 8);
    bytes_write(path, tmp, len_bytes, 8);
    bytes_write(path, tmp, header_text.data(), header_text.size());
    for (const auto & [name, t] : tensors) {
        // One tensor on the host at a time keeps peak memory at the largest tensor, not the model.
        at::Tensor c;
        try {
            c = t.resolve_conj().resolve_neg().cpu().contiguous();
        } catch (const c10::Error & e) {
            save_fail(path, tensor_key(name) + ": cannot copy to CPU: " + e.what_without_backtrace());
        }
        bytes_write(path, tmp, static_cast<const char *>(c.const_data_ptr()), c.nbytes());
    }
    if (::fsync(tmp.fd) != 0) {
        const int err = errno;
        save_fail(path, "cannot fsync '" + tmp.path + "': " + std::strerror(err));
    }
    const int fd = tmp.fd;
    tmp.fd = -1;
    if (::close(fd) != 0) {
        const int err = errno;
        save_fail(path, "cannot close '" + tmp.path + "': " + std::strerror(err));
    }
    if (::rename(tmp.path.c_str(), path.c_str()) != 0) {
        const int err = errno;
        save_fail(path, "cannot rename '" + tmp.path + "' into place: " + std::strerror(err));
    }
    tmp.keep = true;

    // Make the rename itself durable; best effort, the data is already safe under the new name.
    const size_t slash = path.find_last_of('/');
    const std::string dir = slash == std::string::npos ? "." : slash == 0 ? "/" : path.substr(0, slash);
    int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
        ::fsync(dfd);
        ::close(dfd);
    }
}

} // namespace qatlab
