// fuzz_pt: libFuzzer target for lib/pt_zip.cpp and lib/pt_reader.cpp: any bytes as a torch.save
// file; loaded, flattened as a state dict, every tensor read whole.
#include "tools/fuzz/fuzz_common.h"
#include "lib/pt_reader.h"

#include <ATen/Parallel.h>

extern "C" int LLVMFuzzerInitialize(int *, char ***) { at::set_num_threads(1); return 0; }

extern "C" int LLVMFuzzerTestOneInput(const uint8_t * data, size_t n) {
    const std::string path = fuzz::write_file("in.pt", data, n);
    try {
        (void)qatlab::pt_file_is_torch(path);
        qatlab::PtValue v = qatlab::pt_load(path);
        (void)v.kind_name();
        if (v.is_dict() || v.kind == qatlab::PtValue::Kind::List || v.kind == qatlab::PtValue::Kind::Tuple) {
            qatlab::NamedTensors sd = qatlab::pt_state_dict(v);
            for (auto & [name, t] : sd)
                if (t.numel() > 0 && !t.is_complex()) (void)t.to(at::kDouble).sum().item<double>();
        }
    } catch (const std::exception & e) {
        fuzz::rejected(e, path);
    }
    return 0;
}
