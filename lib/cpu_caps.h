// cpu_caps: what the CPU can do for bf16 training (AMX, AVX512-BF16) and which vector ISA LibTorch
// dispatches to, so the trainer's precision='auto' picks bf16 autocast only where it is fast.
#pragma once
#include <string>
#include <vector>

namespace qatlab {

struct CpuCaps {
    std::string capability;   // LibTorch's kernel ISA: "AVX512", "AVX2", "DEFAULT", ... (at::get_cpu_capability)
    std::string cpu_name;     // "model name" of /proc/cpuinfo, or "" when unknown
    bool avx2 = false, avx512f = false, avx512_bf16 = false, amx_tile = false, amx_bf16 = false;
    std::string source;       // where the flags came from: "/proc/cpuinfo" or "none"
    std::vector<std::string> flags;   // every flag of the first processor (sorted as the kernel lists them)
};

// Detects once per call (cheap: one read of /proc/cpuinfo).
CpuCaps cpu_caps_detect();
// Flags parsed from the text of a /proc/cpuinfo ("flags : a b c" of the first processor).
CpuCaps cpu_caps_parse(const std::string & cpuinfo_text);
// bf16 matmuls are fast here: AMX-BF16 (tile units) or AVX512-BF16 (vdpbf16ps). `why` says which,
// or what is missing.
bool cpu_caps_fast_bf16(const CpuCaps & c, std::string * why = nullptr);

} // namespace qatlab
