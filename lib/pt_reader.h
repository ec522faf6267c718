// pt_reader: a reader of PyTorch `torch.save` files (the zip format) that needs no Python and
// no LibTorch pickle_load: a stored-entry zip reader plus a pickle VM for what torch.save emits.
#pragma once
#include "lib/safetensors.h"

#include <ATen/core/Tensor.h>
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace qatlab {

struct PtNode;

// One unpickled value. Containers (list, tuple, dict, object) live in a shared node, so copies
// of a PtValue share them, as Python references do; the loader rejects cyclic structures.
struct PtValue {
    enum class Kind : uint8_t {
        None, Bool, Int, Float, String, Bytes, List, Tuple, Dict, Tensor,
        Global,   // a class, function or dtype by qualified name ("torch.float16")
        Object,   // an unknown global called: name, args (items) and BUILD state
    };
    Kind kind = Kind::None;
    bool boolean = false;
    int64_t integer = 0;   // Int (a Python int beyond int64 loads as a Float)
    double number = 0;     // Float
    std::string str;       // String (UTF-8), Bytes; Global and Object: the qualified name
    at::Tensor tensor;     // Tensor, on the CPU
    std::shared_ptr<PtNode> node;  // List, Tuple, Dict, Object

    bool is_dict() const { return kind == Kind::Dict; }
    bool is_tensor() const { return kind == Kind::Tensor; }
    // Elements of a list or tuple, or an object's args; empty for every other kind.
    const std::vector<PtValue> & items() const;
    // (key, value) pairs of a dict in insertion order; empty for every other kind.
    const std::vector<std::pair<PtValue, PtValue>> & entries() const;
    // The value under a string key of a dict, or nullptr.
    const PtValue * get(const std::string & key) const;
    // What BUILD set on a dict or object (an OrderedDict's {'_metadata': ...}), or nullptr.
    const PtValue * state() const;
    // "none", "bool", ..., "object" (for messages).
    const char * kind_name() const;
};

struct PtNode {
    std::vector<PtValue> items;                        // list/tuple elements, object args
    std::vector<std::pair<PtValue, PtValue>> entries;  // dict, in insertion order
    std::vector<PtValue> state;                        // 0 or 1 value: BUILD's argument
    std::unordered_map<std::string, size_t> index;     // hashable dict key -> entry position
};

// Loads a torch.save zip file. Tensors are CPU views of one read-only, copy-on-write memory
// mapping of the file, kept alive by the tensors; tensors that viewed one storage when saved
// share one storage here. CUDA-tagged storages load to the CPU; requires_grad is not restored.
// Throws std::runtime_error "<path>: <entry or key>: <what was expected, what was found>".
PtValue pt_load(const std::string & path);

// Flattens nested dicts (and lists/tuples) of tensors into ("<prefix>a.b.c", tensor) pairs in
// file order; values that are neither tensors nor containers are skipped. Throws for a value
// that is not a dict, list or tuple, and for a name produced twice.
NamedTensors pt_state_dict(const PtValue & v, const std::string & prefix = "");

// True when the file starts like a torch.save file: the zip magic "PK\3\4", or the pickle
// opcode PROTO of the legacy (pre-1.6) format, which pt_load rejects with a clear message.
bool pt_file_is_torch(const std::string & path);

} // namespace qatlab
