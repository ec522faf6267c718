// pt_zip: the stored-entry zip archives torch.save writes (ZIP64 included), memory-mapped; the
// container layer under lib/pt_reader.cpp. Errors are std::runtime_error "<path>: <key>: <what>".
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

namespace qatlab {

struct FileMap;

struct PtZipEntry {
    std::string name;
    uint64_t data;   // offset of the first data byte in the file
    uint64_t size;
};

struct PtZipArchive {
    std::string path;
    std::shared_ptr<FileMap> mapping;   // keeps base valid
    const uint8_t * base = nullptr;
    uint64_t size = 0;
    std::vector<PtZipEntry> entries;
    std::unordered_map<std::string, size_t> by_name;

    const PtZipEntry * find(const std::string & name) const {
        auto it = by_name.find(name);
        return it == by_name.end() ? nullptr : &entries[it->second];
    }
};

// Maps the file and reads its central directory; every entry must be stored (uncompressed),
// unencrypted and lie inside the file. Rejects the legacy (pre-1.6) pickle format by name.
PtZipArchive pt_zip_open(const std::string & path);

// Throws std::runtime_error(path + ": " + key + ": " + what).
[[noreturn]] void pt_fail(const std::string & path, const std::string & key, const std::string & what);

// True when [off, off + n) lies inside [0, size); overflow-safe.
inline bool pt_span_ok(uint64_t off, uint64_t n, uint64_t size) { return off <= size && n <= size - off; }

} // namespace qatlab
