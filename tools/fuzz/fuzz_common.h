// fuzz_common: what every libFuzzer target of tools/fuzz/ shares: the input written to a file in a
// per-process scratch directory (the readers take paths), and the rule that a rejection names the file.
#pragma once
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <unistd.h>

namespace fuzz {

// /dev/shm when present (no disk traffic), one directory per process.
inline const std::string & scratch_dir() {
    static std::string dir = [] {
        const char * base = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
        std::string d = std::string(base) + "/qatlab-fuzz-" + std::to_string(getpid());
        std::string cmd = "mkdir -p '" + d + "'";
        if (std::system(cmd.c_str()) != 0) std::abort();
        // Removed at exit; the command is kept in a plain buffer: the string is destroyed first.
        static char rm[512];
        std::snprintf(rm, sizeof rm, "rm -rf '%s'", d.c_str());
        std::atexit([] { if (std::system(rm) != 0) {} });
        return d;
    }();
    return dir;
}

inline std::string write_file(const std::string & name, const uint8_t * data, size_t n) {
    std::string path = scratch_dir() + "/" + name;
    FILE * f = std::fopen(path.c_str(), "wb");
    if (!f) std::abort();
    if (n && std::fwrite(data, 1, n, f) != n) std::abort();
    std::fclose(f);
    return path;
}

// QATLAB_FUZZ_NAMES=1: a rejection whose message does not name `what` (the file) is a finding (abort);
// =2: such messages are printed ("unnamed: <message>") and the run goes on, to survey a corpus with -runs=0.
// Off by default: the wording of messages is checked by the specs, memory safety here.
inline void rejected(const std::exception & e, const std::string & what) {
    static const int mode = std::getenv("QATLAB_FUZZ_NAMES") ? std::atoi(std::getenv("QATLAB_FUZZ_NAMES")) : 0;
    if (mode && std::strstr(e.what(), what.c_str()) == nullptr) {
        std::fprintf(stderr, "unnamed: %s\n", e.what());
        if (mode == 1) std::abort();
    }
}

// Splits "a\0SPLIT\0b" style inputs: part k of the data cut at a 4-byte marker (for multi-file targets).
inline bool split(const uint8_t * data, size_t n, const char marker[4], size_t & cut) {
    for (size_t i = 0; i + 4 <= n; i++)
        if (std::memcmp(data + i, marker, 4) == 0) { cut = i; return true; }
    return false;
}

} // namespace fuzz
