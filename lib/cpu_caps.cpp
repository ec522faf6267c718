// cpu_caps: CPU feature detection for the bf16 decision: /proc/cpuinfo flags (the kernel's view of
// CPUID, AMX included only when the OS enabled its tile state) and LibTorch's dispatch ISA.
#include "lib/cpu_caps.h"

#include <ATen/Version.h>

#include <fstream>
#include <sstream>

namespace qatlab {

CpuCaps cpu_caps_parse(const std::string & text) {
    CpuCaps c;
    c.source = "none";
    std::istringstream in(text);
    std::string line;
    bool got_flags = false, got_name = false;
    while (std::getline(in, line) && !(got_flags && got_name)) {
        auto colon = line.find(':');
        if (colon == std::string::npos) continue;
        std::string key = line.substr(0, colon);
        while (!key.empty() && (key.back() == ' ' || key.back() == '\t')) key.pop_back();
        std::string value = line.substr(colon + 1);
        if (!value.empty() && value[0] == ' ') value.erase(0, 1);
        if (key == "model name" && !got_name) {
            c.cpu_name = value;
            got_name = true;
        } else if (key == "flags" && !got_flags) {   // x86; the first processor speaks for all
            std::istringstream fs(value);
            std::string f;
            while (fs >> f) c.flags.push_back(f);
            got_flags = true;
            c.source = "/proc/cpuinfo";
        }
    }
    for (const auto & f : c.flags) {
        if (f == "avx2") c.avx2 = true;
        else if (f == "avx512f") c.avx512f = true;
        else if (f == "avx512_bf16") c.avx512_bf16 = true;
        else if (f == "amx_tile") c.amx_tile = true;
        else if (f == "amx_bf16") c.amx_bf16 = true;
    }
    return c;
}

CpuCaps cpu_caps_detect() {
    std::ifstream f("/proc/cpuinfo");
    std::stringstream ss;
    if (f) ss << f.rdbuf();
    CpuCaps c = cpu_caps_parse(ss.str());
    c.capability = at::get_cpu_capability();
    return c;
}

bool cpu_caps_fast_bf16(const CpuCaps & c, std::string * why) {
    std::string w;
    bool ok = false;
    if (c.amx_bf16 && c.amx_tile) ok = true, w = "amx_bf16";
    else if (c.avx512_bf16) ok = true, w = "avx512_bf16";
    else if (c.source == "none") w = "CPU flags unknown (no /proc/cpuinfo)";
    else w = "no amx_bf16 or avx512_bf16 in the CPU flags";
    if (why) *why = w;
    return ok;
}

} // namespace qatlab
