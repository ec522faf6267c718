// tensor_print: PyTorch-style text for tensors (values, then shape, dtype and device).
// Used by tostring()/print() in Lua and by log lines.
#pragma once
#include <ATen/core/Tensor.h>
#include <string>

namespace qatlab {

struct PrintOptions {
    int precision = 4;          // digits after the point, as torch.set_printoptions
    int64_t threshold = 1000;   // summarize when numel exceeds this
    int64_t edgeitems = 3;      // items kept at each edge when summarizing
    int64_t linewidth = 80;
    int sci_mode = -1;          // -1 auto (PyTorch's rule), 0 never, 1 always
};

PrintOptions & print_options();  // process-wide, as torch.set_printoptions

// PyTorch's repr(t) body and value formatting, with a suffix that always shows the size and
// dtype:  tensor([[1., 2.],
//                 [3., 4.]], size=(2, 2), dtype=torch.float32)
// plus device='cuda:0' when not on the CPU and requires_grad=True / grad_fn=<...> as PyTorch.
std::string tensor_repr(const at::Tensor & t, const PrintOptions & opt = print_options());

// "torch.float32" style name of a dtype; "float32" when short is true.
std::string dtype_name(at::ScalarType t, bool short_name = false);

} // namespace qatlab
