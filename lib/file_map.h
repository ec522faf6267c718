// file_map: a whole file memory-mapped private and writable (copy-on-write), owned by a shared
// pointer that every tensor aliasing it holds. Used by the safetensors, GGUF and .pt readers.
#pragma once
#include <cstddef>
#include <memory>
#include <string>

namespace qatlab {

struct FileMap {
    unsigned char * data = nullptr;   // nullptr for an empty file
    size_t size = 0;
    FileMap() = default;
    FileMap(const FileMap &) = delete;
    FileMap & operator=(const FileMap &) = delete;
    ~FileMap();
};

// Maps a regular file. Throws std::runtime_error "<path>: file: cannot open: <reason>" (or cannot
// stat / expected a regular file / cannot mmap); size checks are the caller's, which knows the format.
std::shared_ptr<FileMap> file_map_open(const std::string & path);

} // namespace qatlab
