// safetensors: read and write the Hugging Face safetensors format (one file, no sharding).
// Reads are memory-mapped and validated; writes go to a temporary name and are renamed.
#pragma once
#include <ATen/core/Tensor.h>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace qatlab {

using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;

struct SafetensorsFile {
    NamedTensors tensors;                          // in file-offset order, CPU
    std::map<std::string, std::string> metadata;   // the "__metadata__" entry, if any
};

// Loads every tensor. Tensors share one read-only memory mapping of the file (copy-on-write
// private mapping), kept alive until the last tensor is freed. Throws std::runtime_error with
// "<path>: <tensor or key>: <what was expected, what was found>" on any malformed input.
SafetensorsFile safetensors_load(const std::string & path);

// Writes tensors (any device; copied to CPU, made contiguous) atomically: <path>.tmp.<pid>,
// fsync, rename. Names must be unique and non-empty.
void safetensors_save(const std::string & path, const NamedTensors & tensors,
                      const std::map<std::string, std::string> & metadata = {});

// The safetensors dtype string ("F32", "BF16", ...) for a scalar type; throws if unsupported.
const char * safetensors_dtype_name(at::ScalarType t);

} // namespace qatlab
