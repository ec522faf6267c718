// tensor_print: PyTorch-style text for tensors, following repr(t) of torch/_tensor_str.py.
// Values match PyTorch character for character; the suffix always names size and dtype.
#include "lib/tensor_print.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/function.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

namespace qatlab {

namespace {

constexpr int64_t kPrefixLen = 7;  // strlen("tensor(")

std::string printf_double(const char * fmt, int precision, double v) {
    char buf[64];
    int n = std::snprintf(buf, sizeof buf, fmt, precision, v);
    if (n < static_cast<int>(sizeof buf)) return std::string(buf, n);
    std::string s(n + 1, '\0');  // %f of a huge value: hundreds of digits
    std::snprintf(s.data(), s.size(), fmt, precision, v);
    s.resize(n);
    return s;
}

// PyTorch's _Formatter for one real-valued tensor: mode and common width of the cells.
struct CellFormatter {
    bool floating = false;
    bool int_mode = true;
    bool sci_mode = false;
    size_t width = 1;
    int precision = 4;

    // Python's float formatting of the same double; nan never carries a sign there.
    std::string float_text(double v) const {
        if (std::isnan(v)) return "nan";
        if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
        if (sci_mode) return printf_double("%.*e", precision, v);
        if (int_mode) return printf_double("%.*f", 0, v) + ".";
        return printf_double("%.*f", precision, v);
    }

    std::string pad(std::string s) const {
        if (s.size() < width) s.insert(0, width - s.size(), ' ');
        return s;
    }

    // Width and mode from the printed elements only, as PyTorch does on summarized data.
    void fit_floats(const std::vector<double> & vals, int sci_option) {
        floating = true;
        std::vector<double> nz;
        for (double v : vals)
            if (std::isfinite(v) && v != 0.0) nz.push_back(v);
        if (nz.empty()) return;  // PyTorch keeps int mode, fixed, width 1
        double lo = INFINITY, hi = 0.0;
        for (double v : nz) {
            lo = std::min(lo, std::fabs(v));
            hi = std::max(hi, std::fabs(v));
            if (v != std::ceil(v)) int_mode = false;
        }
        sci_mode = sci_option < 0 ? (hi / lo > 1000.0 || hi > 1.0e8 || lo < 1.0e-4)
                                  : sci_option != 0;
        for (double v : nz) width = std::max(width, float_text(v).size());
    }

    void fit_texts(const std::vector<std::string> & texts) {
        for (const auto & s : texts) width = std::max(width, s.size());
    }
};

// Summarized data and cell texts in row-major order, laid out like _tensor_str_with_formatter.
struct CellLayout {
    std::vector<std::string> cells;
    std::vector<int64_t> sizes, strides;
    std::vector<bool> cut;     // dim was summarized: " ..." / "..." after edgeitems entries
    int64_t edge = 3;
    int64_t linewidth = 80;
    size_t cell_len = 1;       // formatted width used for line packing

    void put_vector(std::string & out, int64_t offset, int64_t indent) const {
        const int64_t n = sizes.back();
        const bool summarized = cut.back();
        const int64_t per_line = std::max<int64_t>(1, (linewidth - indent) / int64_t(cell_len + 2));
        const std::string line_sep = ",\n" + std::string(indent + 1, ' ');
        out += '[';
        int64_t k = 0;
        auto put_item = [&](const std::string & item) {
            if (k > 0) out += (k % per_line == 0) ? line_sep : std::string(", ");
            out += item;
            ++k;
        };
        for (int64_t i = 0; i < n; ++i) {
            if (summarized && i == edge) put_item(" ...");
            put_item(cells[offset + i * strides.back()]);
        }
        out += ']';
    }

    void put_block(std::string & out, size_t d, int64_t offset, int64_t indent) const {
        if (d + 1 == sizes.size()) return put_vector(out, offset, indent);
        const size_t sub_dims = sizes.size() - d;
        const std::string sep = "," + std::string(sub_dims - 1, '\n') + std::string(indent + 1, ' ');
        out += '[';
        for (int64_t i = 0; i < sizes[d]; ++i) {
            if (i > 0) out += sep;
            if (cut[d] && i == edge) out += "..." + sep;
            put_block(out, d + 1, offset + i * strides[d], indent + 1);
        }
        out += ']';
    }
};

// The printed elements of t (PyTorch's get_summarized_data) in one gather, then on the CPU.
at::Tensor gather_printed(const at::Tensor & t, bool summarize, int64_t edge, std::vector<bool> & cut) {
    cut.assign(t.dim(), false);
    if (!summarize) return t.to(at::kCPU);
    c10::List<std::optional<at::Tensor>> index;
    bool any_cut = false;
    for (int64_t d = 0; d < t.dim(); ++d) {
        const int64_t n = t.size(d);
        std::vector<int64_t> shape(t.dim(), 1);
        at::Tensor idx;
        if (n > 2 * edge) {
            cut[d] = any_cut = true;
            idx = at::cat({at::arange(edge, at::kLong), at::arange(n - edge, n, at::kLong)});
        } else {
            idx = at::arange(n, at::kLong);
        }
        shape[d] = idx.numel();
        index.push_back(std::optional<at::Tensor>(idx.view(shape).to(t.device())));
    }
    if (!any_cut) return t.to(at::kCPU);
    return at::index(t, index).to(at::kCPU);
}

std::vector<double> doubles_of(const at::Tensor & cpu) {
    at::Tensor d = cpu.to(at::kDouble).contiguous();
    const double * p = d.data_ptr<double>();
    return std::vector<double>(p, p + d.numel());
}

std::vector<std::string> integer_texts(const at::Tensor & cpu) {
    std::vector<std::string> out;
    out.reserve(cpu.numel());
    if (cpu.scalar_type() == at::kBool) {
        at::Tensor b = cpu.contiguous();
        const bool * p = b.data_ptr<bool>();
        for (int64_t i = 0; i < b.numel(); ++i) out.push_back(p[i] ? "True" : "False");
    } else if (cpu.scalar_type() == at::kUInt64) {
        at::Tensor u = cpu.contiguous();
        const uint64_t * p = static_cast<const uint64_t *>(u.const_data_ptr());
        for (int64_t i = 0; i < u.numel(); ++i) out.push_back(std::to_string(p[i]));
    } else {
        at::Tensor l = cpu.to(at::kLong).contiguous();
        const int64_t * p = l.data_ptr<int64_t>();
        for (int64_t i = 0; i < l.numel(); ++i) out.push_back(std::to_string(p[i]));
    }
    return out;
}

std::vector<std::string> real_cells(const at::Tensor & cpu, const PrintOptions & opt, size_t & width) {
    CellFormatter f;
    f.precision = opt.precision;
    std::vector<std::string> cells;
    if (at::isFloatingType(cpu.scalar_type())) {
        std::vector<double> vals = doubles_of(cpu);
        f.fit_floats(vals, opt.sci_mode);
        cells.reserve(vals.size());
        for (double v : vals) cells.push_back(f.pad(f.float_text(v)));
    } else {
        cells = integer_texts(cpu);
        f.fit_texts(cells);
        for (auto & s : cells) s = f.pad(std::move(s));
    }
    width = f.width;
    return cells;
}

// Complex cells: "re+imj" from two formatters, as PyTorch's _val_formatter.
std::vector<std::string> complex_cells(const at::Tensor & cpu, const PrintOptions & opt, size_t & width) {
    size_t re_width = 1, im_width = 1;
    std::vector<std::string> re = real_cells(at::real(cpu), opt, re_width);
    std::vector<std::string> im = real_cells(at::imag(cpu), opt, im_width);
    for (size_t i = 0; i < re.size(); ++i) {
        std::string imag = im[i] + "j";
        imag.erase(0, imag.find_first_not_of(' '));
        re[i] += (imag[0] == '+' || imag[0] == '-') ? imag : "+" + imag;
    }
    width = re_width + im_width + 1;  // PyTorch packs lines by w_re + 2 + w_im + 1 per cell
    return re;
}

std::string values_text(const at::Tensor & t, const PrintOptions & opt) {
    if (t.numel() == 0) return "[]";
    const bool summarize = t.numel() > opt.threshold;
    if (t.dim() > 0 && summarize && opt.edgeitems <= 0) return "[...]";

    CellLayout lay;
    lay.edge = opt.edgeitems;
    lay.linewidth = opt.linewidth;
    at::Tensor cpu = gather_printed(t, summarize, opt.edgeitems, lay.cut);
    cpu = cpu.resolve_conj().resolve_neg().contiguous();
    lay.cells = at::isComplexType(cpu.scalar_type()) ? complex_cells(cpu, opt, lay.cell_len)
                                                     : real_cells(cpu, opt, lay.cell_len);
    if (t.dim() == 0) return lay.cells[0];

    lay.sizes = cpu.sizes().vec();
    lay.strides = cpu.strides().vec();
    std::string out;
    out.reserve(lay.cells.size() * (lay.cell_len + 2) + 64);
    lay.put_block(out, 0, 0, kPrefixLen);
    return out;
}

std::string size_text(at::IntArrayRef sizes) {
    std::string s = "(";
    for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
    return s + (sizes.size() == 1 ? ",)" : ")");
}

// PyTorch's _add_suffixes: same line while it fits linewidth, else a new indented line.
std::string suffixes_add(std::string text, const std::vector<std::string> & suffixes,
                         const PrintOptions & opt) {
    const size_t nl = text.rfind('\n');
    // Same arithmetic as PyTorch (len - rfind + 1), including its rfind == -1 case.
    int64_t last_len = int64_t(text.size()) - (nl == std::string::npos ? -1 : int64_t(nl)) + 1;
    for (const auto & s : suffixes) {
        const int64_t len = int64_t(s.size());
        if (last_len + len + 2 > opt.linewidth) {
            text += ",\n" + std::string(kPrefixLen, ' ') + s;
            last_len = kPrefixLen + len;
        } else {
            text += ", " + s;
            last_len += len + 2;
        }
    }
    return text + ")";
}

std::string layout_name(at::Layout l) {
    switch (l) {
    case at::kSparse: return "torch.sparse_coo";
    case at::kSparseCsr: return "torch.sparse_csr";
    case at::kSparseCsc: return "torch.sparse_csc";
    case at::kSparseBsr: return "torch.sparse_bsr";
    case at::kSparseBsc: return "torch.sparse_bsc";
    case at::kMkldnn: return "torch._mkldnn";
    default: return "torch.strided";
    }
}

std::string grad_fn_name(const at::Tensor & t) {
    std::string name = t.grad_fn()->name();
    const size_t colons = name.rfind("::");
    return colons == std::string::npos ? name : name.substr(colons + 2);
}

} // namespace

PrintOptions & print_options() {
    static PrintOptions opts;
    return opts;
}

std::string dtype_name(at::ScalarType t, bool short_name) {
    const char * name = nullptr;
    switch (t) {
    case at::kFloat: name = "float32"; break;
    case at::kHalf: name = "float16"; break;
    case at::kBFloat16: name = "bfloat16"; break;
    case at::kDouble: name = "float64"; break;
    case at::kChar: name = "int8"; break;
    case at::kByte: name = "uint8"; break;
    case at::kShort: name = "int16"; break;
    case at::kInt: name = "int32"; break;
    case at::kLong: name = "int64"; break;
    case at::kBool: name = "bool"; break;
    case at::kUInt16: name = "uint16"; break;
    case at::kUInt32: name = "uint32"; break;
    case at::kUInt64: name = "uint64"; break;
    case at::kComplexHalf: name = "complex32"; break;
    case at::kComplexFloat: name = "complex64"; break;
    case at::kComplexDouble: name = "complex128"; break;
    case at::kFloat8_e4m3fn: name = "float8_e4m3fn"; break;
    case at::kFloat8_e5m2: name = "float8_e5m2"; break;
    case at::kQInt8: name = "qint8"; break;
    case at::kQUInt8: name = "quint8"; break;
    case at::kQInt32: name = "qint32"; break;
    default: break;
    }
    std::string s = name ? name : c10::toString(t);
    return short_name ? s : "torch." + s;
}

std::string tensor_repr(const at::Tensor & t, const PrintOptions & opt) {
    if (!t.defined()) return "tensor(undefined)";
    at::NoGradGuard no_grad;
    const at::Tensor v = t.detach();

    std::string values;
    if (v.is_meta() || v.layout() != at::kStrided || v.is_quantized())
        values = "...";  // no readable values here: size/dtype/device still say what it is
    else
        values = values_text(v, opt);

    std::vector<std::string> suffixes;
    if (t.dim() > 0) suffixes.push_back("size=" + size_text(t.sizes()));
    suffixes.push_back("dtype=" + dtype_name(t.scalar_type()));
    if (!t.device().is_cpu()) suffixes.push_back("device='" + t.device().str() + "'");
    if (t.layout() != at::kStrided) suffixes.push_back("layout=" + layout_name(t.layout()));
    if (t.grad_fn())
        suffixes.push_back("grad_fn=<" + grad_fn_name(t) + ">");
    else if (t.requires_grad())
        suffixes.push_back("requires_grad=True");
    return suffixes_add("tensor(" + values, suffixes, opt);
}

} // namespace qatlab
