// Tests for lib/tensor_print: tensor_repr against real PyTorch's repr (one python run for the
// whole table, via QATLAB_PYTHON), plus hand-written cases for suffixes and dtype names.
#include "lib/tensor_print.h"
#include "test_util.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>
#include <unistd.h>

namespace qatlab {
namespace {

PrintOptions make_opts(int precision = 4, int64_t threshold = 1000, int64_t edgeitems = 3,
                       int64_t linewidth = 80, int sci_mode = -1) {
    PrintOptions o;
    o.precision = precision;
    o.threshold = threshold;
    o.edgeitems = edgeitems;
    o.linewidth = linewidth;
    o.sci_mode = sci_mode;
    return o;
}

struct PyCase {
    std::string name;
    std::string expr;                   // Python; torch, math and g(seed) (a Generator) in scope
    PrintOptions opt;
    std::function<at::Tensor()> build;  // C++ twin of expr for big tensors; else PyTorch's bytes
};

std::vector<PyCase> py_cases() {
    const PrintOptions d = make_opts();
    return {
        {"arange_2d", "torch.arange(12.).reshape(3, 4)", d, {}},
        {"fractions", "torch.tensor([1.5, -2.25, 3.125])", d, {}},
        {"rounding", "torch.tensor([1.23456789, 0.5, 12.5])", d, {}},
        {"sci_small_and_big", "torch.tensor([1e-5, 1., 1e9])", d, {}},
        {"sci_ratio", "torch.tensor([123456.789, 0.001])", d, {}},
        {"sci_int_mode", "torch.tensor([1e8, 2e8, 3.])", d, {}},
        {"sci_huge", "torch.tensor([1e20, 1.])", d, {}},
        {"sci_tiny_only", "torch.tensor([1e-6, 2e-6])", d, {}},
        {"int_mode_padded", "torch.tensor([100., 20000., -7.])", d, {}},
        {"ratio_1000", "torch.tensor([0.5, 500.])", d, {}},
        {"randn_small", "torch.randn(4, 6, generator=g(1))", d, {}},
        {"randn_50x50", "torch.randn(50, 50, generator=g(0))", d, {}},
        {"randn_wide_rows", "torch.randn(3, 25, generator=g(2))", d, {}},
        {"negatives", "-torch.arange(10.).reshape(2, 5) / 3", d, {}},
        {"linspace_wrap", "torch.linspace(-1, 1, 30)", d, {}},
        {"suffix_fits", "torch.tensor([1.5, 2.5, 3.5])", d, {}},
        {"suffix_wraps_9", "torch.linspace(0, 1, 9)", d, {}},
        {"suffix_wraps_8", "torch.linspace(0, 1, 8) * 100", d, {}},
        {"suffix_wraps_6", "torch.linspace(0, 1, 6) * 1e5", d, {}},
        {"single", "torch.tensor([5.])", d, {}},
        {"nan_inf", "torch.tensor([math.nan, 1.25, math.inf, -math.inf, 2.5])", d, {}},
        {"nan_inf_int", "torch.tensor([math.nan, 1., math.inf, -2.])", d, {}},
        {"nan_inf_sci", "torch.tensor([math.nan, 1e-7, math.inf])", d, {}},
        {"all_zero", "torch.zeros(3)", d, {}},
        {"neg_zero", "torch.tensor([-0., 0., 1.])", d, {}},
        {"neg_zero_frac", "torch.tensor([-0., 0.5])", d, {}},
        {"all_nan", "torch.full((2, 2), math.nan)", d, {}},
        {"float64", "torch.tensor([1/3, 2/3, 7.], dtype=torch.float64)", d, {}},
        {"bfloat16", "torch.randn(3, 5, generator=g(3)).bfloat16()", d, {}},
        {"float16", "(torch.randn(3, 5, generator=g(4)) * 100).half()", d, {}},
        {"float16_big", "torch.tensor([65504., 1., 0.001], dtype=torch.float16)", d, {}},
        {"float8_e4m3fn", "torch.tensor([0.5, 1.5, -2., 448.]).to(torch.float8_e4m3fn)", d, {}},
        {"complex64", "torch.complex(torch.tensor([1., -2.5, 0.]), torch.tensor([0.5, -3., -0.]))", d, {}},
        {"int64", "torch.arange(-5, 20).reshape(5, 5)", d, {}},
        {"int64_big", "torch.tensor([1, -1234567890123, 42])", d, {}},
        {"int32", "torch.arange(-3, 3, dtype=torch.int32)", d, {}},
        {"int16", "torch.tensor([[300, -2], [7, 0]], dtype=torch.int16)", d, {}},
        {"int8", "torch.arange(-128, 128, 17, dtype=torch.int8)", d, {}},
        {"uint8", "torch.arange(0, 256, 15, dtype=torch.uint8)", d, {}},
        {"uint8_summarized", "(torch.arange(2000) % 256).to(torch.uint8)", d, {}},
        {"bool", "torch.tensor([[True, False], [False, True]])", d, {}},
        {"bool_all_true", "torch.ones(4, dtype=torch.bool)", d, {}},
        {"bool_summarized", "torch.arange(1500) % 3 == 0", d, {}},
        {"scalar", "torch.tensor(3.5)", d, {}},
        {"scalar_int_valued", "torch.tensor(2.)", d, {}},
        {"scalar_int", "torch.tensor(7)", d, {}},
        {"scalar_nan", "torch.tensor(math.nan)", d, {}},
        {"scalar_sci", "torch.tensor(1e-9)", d, {}},
        {"scalar_bool", "torch.tensor(False)", d, {}},
        {"empty", "torch.tensor([])", d, {}},
        {"empty_2d", "torch.zeros(2, 0)", d, {}},
        {"empty_int", "torch.zeros(0, dtype=torch.int64)", d, {}},
        {"vec_2000", "torch.arange(2000.) * 0.5", d, {}},
        {"vec_1001_int", "torch.arange(1001)", d, {}},
        {"vec_1000_not_summarized", "torch.arange(1000.)", d, {}},
        {"tall_summarized", "torch.arange(3000.).reshape(1000, 3)", d, {}},
        {"wide_summarized", "torch.arange(3000).reshape(3, 1000)", d, {}},
        {"thin_3d", "torch.arange(1100.).reshape(1100, 1, 1)", d, {}},
        {"cube_summarized", "torch.arange(8000.).reshape(20, 20, 20) / 7", d, {}},
        {"cube_small", "torch.arange(24.).reshape(2, 3, 4)", d, {}},
        {"four_d", "torch.arange(120).reshape(2, 3, 4, 5)", d, {}},
        {"four_d_summarized", "torch.randn(8, 2, 9, 10, generator=g(5))", d, {}},
        {"transposed", "torch.arange(12.).reshape(3, 4).t()", d,
         [] { return at::arange(12., at::kFloat).reshape({3, 4}).t(); }},
        {"transposed_summarized", "torch.arange(3000.).reshape(3, 1000).t()", d,
         [] { return at::arange(3000., at::kFloat).reshape({3, 1000}).t(); }},
        {"big_2d", "torch.arange(4_000_000.).reshape(2000, 2000)", d,
         [] { return at::arange(4000000., at::kFloat).reshape({2000, 2000}); }},
        {"big_3d_int", "torch.arange(1_000_000).reshape(100, 100, 100)", d,
         [] { return at::arange(1000000, at::kLong).reshape({100, 100, 100}); }},
        {"opt_precision_2", "torch.tensor([1.12345, 2.5, -0.005])", make_opts(2), {}},
        {"opt_precision_0_sci", "torch.tensor([1e-5, 1., 1e9])", make_opts(0), {}},
        {"opt_sci_on", "torch.tensor([1.5, 2.25])", make_opts(4, 1000, 3, 80, 1), {}},
        {"opt_sci_on_ints", "torch.tensor([1., 20.])", make_opts(4, 1000, 3, 80, 1), {}},
        {"opt_sci_on_zeros", "torch.zeros(2)", make_opts(4, 1000, 3, 80, 1), {}},
        {"opt_sci_off", "torch.tensor([1e-5, 1., 1e9])", make_opts(4, 1000, 3, 80, 0), {}},
        {"opt_threshold_5", "torch.arange(10)", make_opts(4, 5, 2), {}},
        {"opt_threshold_2d", "torch.arange(36.).reshape(6, 6)", make_opts(4, 10, 1), {}},
        {"opt_linewidth_40", "torch.randn(4, 10, generator=g(6))", make_opts(4, 1000, 3, 40), {}},
        {"opt_linewidth_tiny", "torch.arange(5.) * 1000", make_opts(4, 1000, 3, 10), {}},
        {"opt_edgeitems_0_1d", "torch.arange(10.)", make_opts(4, 5, 0), {}},
        {"opt_edgeitems_0_2d", "torch.arange(36.).reshape(6, 6)", make_opts(4, 5, 0), {}},
    };
}

// Writes each case's dtype, shape, raw bytes and expected text; expected = PyTorch's own
// _tensor_str values and _add_suffixes with our suffix list (size, dtype).
const char * kPyScript = R"PY(
import math, sys, torch
from torch._tensor_str import _tensor_str, _add_suffixes, set_printoptions

def g(seed):
    return torch.Generator().manual_seed(seed)

with open(sys.argv[1], 'rb') as f:
    cases = f.read().decode().split('\n\x1e\n')[:-1]
with open(sys.argv[2], 'wb') as out:
    for case in cases:
        name, expr, precision, threshold, edgeitems, linewidth, sci, want_data = case.split('\n')
        t = eval(expr)
        set_printoptions(precision=int(precision), threshold=int(threshold),
                         edgeitems=int(edgeitems), linewidth=int(linewidth),
                         sci_mode=None if sci == '-1' else sci == '1')
        with torch.no_grad():
            body = _tensor_str(t, len('tensor('))
        suffixes = (['size=' + str(tuple(t.shape))] if t.dim() else []) + ['dtype=' + str(t.dtype)]
        want = _add_suffixes('tensor(' + body, suffixes, len('tensor('), False).encode()
        raw = b''
        if want_data == '1':
            raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        dims = ' '.join(str(n) for n in [t.dim(), *t.shape])
        head = f'{name}\n{t.dtype}\n{dims}\n{len(raw)} {len(want)}\n'
        out.write(head.encode() + raw + want)
)PY";

struct PyResult {
    std::string name, dtype, raw, want;
    std::vector<int64_t> shape;
};

std::string file_read(const std::filesystem::path & p) {
    std::ifstream f(p, std::ios::binary);
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
}

void file_write(const std::filesystem::path & p, const std::string & s) {
    std::ofstream f(p, std::ios::binary);
    f << s;
}

std::vector<PyResult> results_parse(const std::string & data) {
    std::vector<PyResult> out;
    size_t pos = 0;
    auto line = [&] {
        size_t nl = data.find('\n', pos);
        if (nl == std::string::npos) throw std::runtime_error("truncated python output");
        std::string s = data.substr(pos, nl - pos);
        pos = nl + 1;
        return s;
    };
    while (pos < data.size()) {
        PyResult r;
        r.name = line();
        r.dtype = line();
        std::istringstream dims(line());
        int64_t ndim = 0, n = 0;
        dims >> ndim;
        for (int64_t i = 0; i < ndim && dims >> n; ++i) r.shape.push_back(n);
        std::istringstream lens(line());
        size_t raw_len = 0, want_len = 0;
        lens >> raw_len >> want_len;
        if (pos + raw_len + want_len > data.size()) throw std::runtime_error("truncated python output");
        r.raw = data.substr(pos, raw_len);
        r.want = data.substr(pos + raw_len, want_len);
        pos += raw_len + want_len;
        out.push_back(std::move(r));
    }
    return out;
}

at::ScalarType dtype_parse(const std::string & name) {
    for (at::ScalarType t : {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble, at::kChar, at::kByte,
                             at::kShort, at::kInt, at::kLong, at::kBool, at::kComplexFloat,
                             at::kFloat8_e4m3fn})
        if (dtype_name(t) == name) return t;
    throw std::runtime_error("test does not know dtype " + name);
}

at::Tensor tensor_from_bytes(const PyResult & r) {
    at::Tensor t = at::empty(r.shape, at::TensorOptions().dtype(dtype_parse(r.dtype)));
    if (size_t(t.nbytes()) != r.raw.size()) throw std::runtime_error("byte count mismatch for " + r.name);
    if (!r.raw.empty()) std::memcpy(t.data_ptr(), r.raw.data(), r.raw.size());
    return t;
}

TEST(TensorPrint, matches_pytorch_repr) {
    ASSERT_TRUE(test_python())
        << "QATLAB_PYTHON is not set: it must name a python3 with torch installed";

    const std::vector<PyCase> cases = py_cases();
    namespace fs = std::filesystem;
    const fs::path dir = fs::temp_directory_path() / ("qatlab_tensor_print_" + std::to_string(getpid()));
    fs::create_directories(dir);
    std::string table;
    for (const auto & c : cases) {
        const PrintOptions & o = c.opt;
        table += c.name + "\n" + c.expr + "\n" + std::to_string(o.precision) + "\n" +
                 std::to_string(o.threshold) + "\n" + std::to_string(o.edgeitems) + "\n" +
                 std::to_string(o.linewidth) + "\n" + std::to_string(o.sci_mode) + "\n" +
                 (c.build ? "0" : "1") + "\n\x1e\n";
    }
    file_write(dir / "cases.txt", table);
    file_write(dir / "cases.py", kPyScript);
    const std::string cmd = test_python_command(
        {(dir / "cases.py").string(), (dir / "cases.txt").string(), (dir / "out.bin").string()});
    std::string err;
    const int rc = test_shell_run(cmd, &err);
    const std::string output = file_read(dir / "out.bin");
    fs::remove_all(dir);
    ASSERT_EQ(rc, 0) << "python failed: " << cmd << "\n" << err;

    const std::vector<PyResult> results = results_parse(output);
    ASSERT_EQ(results.size(), cases.size());
    for (size_t i = 0; i < cases.size(); ++i) {
        const PyCase & c = cases[i];
        const PyResult & r = results[i];
        SCOPED_TRACE("case " + c.name + ": " + c.expr);
        ASSERT_EQ(r.name, c.name);
        const at::Tensor t = c.build ? c.build() : tensor_from_bytes(r);
        EXPECT_EQ(dtype_name(t.scalar_type()), r.dtype);
        EXPECT_EQ(tensor_repr(t, c.opt), r.want);
    }
}

TEST(TensorPrint, dtype_names) {
    EXPECT_EQ(dtype_name(at::kFloat), "torch.float32");
    EXPECT_EQ(dtype_name(at::kFloat, true), "float32");
    EXPECT_EQ(dtype_name(at::kHalf), "torch.float16");
    EXPECT_EQ(dtype_name(at::kBFloat16), "torch.bfloat16");
    EXPECT_EQ(dtype_name(at::kDouble, true), "float64");
    EXPECT_EQ(dtype_name(at::kChar), "torch.int8");
    EXPECT_EQ(dtype_name(at::kByte), "torch.uint8");
    EXPECT_EQ(dtype_name(at::kShort), "torch.int16");
    EXPECT_EQ(dtype_name(at::kInt), "torch.int32");
    EXPECT_EQ(dtype_name(at::kLong), "torch.int64");
    EXPECT_EQ(dtype_name(at::kBool), "torch.bool");
    EXPECT_EQ(dtype_name(at::kBool, true), "bool");
}

TEST(TensorPrint, requires_grad_suffix) {
    at::Tensor t = at::ones({2}).set_requires_grad(true);
    EXPECT_EQ(tensor_repr(t), "tensor([1., 1.], size=(2,), dtype=torch.float32, requires_grad=True)");
}

TEST(TensorPrint, grad_fn_suffix) {
    at::Tensor x = at::ones({2, 2}).set_requires_grad(true);
    EXPECT_EQ(tensor_repr(x * (x + 1)),
              "tensor([[2., 2.],\n"
              "        [2., 2.]], size=(2, 2), dtype=torch.float32, grad_fn=<MulBackward0>)");
    EXPECT_EQ(tensor_repr((x + 1).sum()), "tensor(8., dtype=torch.float32, grad_fn=<SumBackward0>)");
}

TEST(TensorPrint, undefined_tensor) {
    EXPECT_EQ(tensor_repr(at::Tensor()), "tensor(undefined)");
}

TEST(TensorPrint, meta_device_shows_no_values) {
    at::Tensor t = at::empty({2, 3}, at::TensorOptions().device(at::kMeta));
    EXPECT_EQ(tensor_repr(t), "tensor(..., size=(2, 3), dtype=torch.float32, device='meta')");
}

TEST(TensorPrint, cuda_device_suffix) {
    if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA";
    at::Tensor c = at::arange(6., at::kFloat).reshape({2, 3});
    std::string cpu = tensor_repr(c);
    cpu.pop_back();
    EXPECT_EQ(tensor_repr(c.to(at::kCUDA)), cpu + ", device='cuda:0')");
}

TEST(TensorPrint, suffix_on_new_line_when_too_long) {
    // the values line is 73 chars: ", size=(6,)" would pass column 80, so it starts a new line
    at::Tensor t = at::full({6}, 1234.5, at::kFloat);
    EXPECT_EQ(tensor_repr(t),
              "tensor([1234.5000, 1234.5000, 1234.5000, 1234.5000, 1234.5000, 1234.5000],\n"
              "       size=(6,), dtype=torch.float32)");
}

TEST(TensorPrint, global_print_options) {
    PrintOptions saved = print_options();
    print_options().precision = 2;
    const std::string s = tensor_repr(at::full({1}, 1.23456, at::kDouble));
    print_options() = saved;
    EXPECT_EQ(s, "tensor([1.23], size=(1,), dtype=torch.float64)");
    EXPECT_EQ(tensor_repr(at::full({1}, 1.23456, at::kDouble)),
              "tensor([1.2346], size=(1,), dtype=torch.float64)");
}

} // namespace
} // namespace qatlab
