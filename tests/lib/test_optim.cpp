// test_optim: AdamW/SGD trajectories and clip_grad_norm against Python torch.optim, Muon against an
// explicit double-loop implementation and SVD bands, bf16 masters, state-dict round trips, accumulation.
#include "lib/optim.h"
#include "lib/safetensors.h"
#include "test_util.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <unistd.h>
#include <vector>

using namespace qatlab;

namespace {

const std::vector<std::vector<int64_t>> shapes = {{3, 4}, {5}, {2, 3}};

// Deterministic start values, computed identically by the Python side.
std::vector<at::Tensor> params_make(at::ScalarType dt) {
    std::vector<at::Tensor> ps;
    for (size_t k = 0; k < shapes.size(); k++) {
        int64_t n = 1;
        for (auto s : shapes[k]) n *= s;
        at::Tensor p = ((at::arange(n, at::kDouble) * 0.37 + (double)k).sin() * 0.5).reshape(shapes[k]).to(dt);
        ps.push_back(p.requires_grad_());
    }
    return ps;
}

// grad = sin(p·(k+1) + t), in the parameter's dtype.
void grads_set(std::vector<at::Tensor> & ps, int t) {
    for (size_t k = 0; k < ps.size(); k++) ps[k].mutable_grad() = at::sin(ps[k].detach() * (int64_t)(k + 1) + t);
}

const char * py_prelude =
    "import torch\n"
    "shapes = [[3, 4], [5], [2, 3]]\n"
    "def make(dt):\n"
    "    out = []\n"
    "    for k, s in enumerate(shapes):\n"
    "        n = 1\n"
    "        for d in s: n *= d\n"
    "        p = ((torch.arange(n, dtype=torch.float64) * 0.37 + k).sin() * 0.5).reshape(s).to(dt)\n"
    "        out.append(p.requires_grad_())\n"
    "    return out\n"
    "def grads(ps, t):\n"
    "    for k, p in enumerate(ps): p.grad = torch.sin(p.detach() * (k + 1) + t)\n"
    "def dump(ts):\n"
    "    print(' '.join(repr(x) for p in ts for x in p.detach().double().flatten().tolist()))\n";

// Runs Python code after the prelude; returns each output line as numbers. Skips without Python.
std::vector<std::vector<double>> py_run(const std::string & body) {
    if (!test_python()) return {};
    std::string script = "/tmp/qatlab_test_optim_" + std::to_string(getpid()) + ".py";
    std::ofstream(script) << py_prelude << body;
    std::vector<std::vector<double>> rows;
    std::string text;
    int rc = test_python_file(script, {}, &text, false);  // stdout only: stderr stays the test's
    std::remove(script.c_str());
    EXPECT_EQ(rc, 0) << "python failed on:\n" << body;
    std::istringstream lines(text);
    std::string line;
    while (std::getline(lines, line)) {
        std::vector<double> row;
        std::istringstream ss(line);
        std::string tok;
        while (ss >> tok) row.push_back(std::strtod(tok.c_str(), nullptr));
        rows.push_back(row);
    }
    return rows;
}

std::vector<double> flat(const std::vector<at::Tensor> & ts) {
    std::vector<double> out;
    for (auto & t : ts) {
        at::Tensor d = t.detach().to(at::kDouble).contiguous().flatten();
        for (int64_t i = 0; i < d.numel(); i++) out.push_back(d[i].item<double>());
    }
    return out;
}

void rows_expect_near(const std::vector<double> & got, const std::vector<double> & want, double tol, const std::string & what) {
    ASSERT_EQ(got.size(), want.size()) << what;
    double worst = 0;
    for (size_t i = 0; i < got.size(); i++) worst = std::max(worst, std::abs(got[i] - want[i]) / (1.0 + std::abs(want[i])));
    EXPECT_LE(worst, tol) << what;
}

// One trajectory case: the C++ optimizer, the same in Python, a mid-run hyper-parameter change.
struct Traj {
    std::string name;
    std::function<Optimizer(std::vector<at::Tensor> &)> make;
    std::string py_make;                            // expression using `ps`
    std::function<void(Optimizer &)> change;        // after step 5
    std::string py_change;                          // statement using `opt`
};

// All cases in one Python run (importing torch dominates the time), 10 rows each.
void traj_check(const std::vector<Traj> & cs, at::ScalarType dt, double tol) {
    const char * dts = dt == at::kDouble ? "torch.float64" : "torch.float32";
    std::string body;
    for (auto & c : cs)
        body += std::string("ps = make(") + dts + ")\nopt = " + c.py_make + "\n" +
                "for t in range(1, 11):\n"
                "    grads(ps, t)\n"
                "    opt.step()\n"
                "    if t == 5:\n"
                "        " + c.py_change + "\n"
                "    dump(ps)\n";
    auto want = py_run(body);
    ASSERT_EQ(want.size(), 10 * cs.size());
    for (size_t ci = 0; ci < cs.size(); ci++) {
        const Traj & c = cs[ci];
        auto ps = params_make(dt);
        Optimizer opt = c.make(ps);
        for (int t = 1; t <= 10; t++) {
            grads_set(ps, t);
            opt.step();
            if (t == 5) c.change(opt);
            rows_expect_near(flat(ps), want[10 * ci + t - 1], tol, c.name + " step " + std::to_string(t));
        }
    }
}

std::vector<Traj> cases_make() {
    std::vector<Traj> cs;
    cs.push_back({"AdamW two groups",
                  [](std::vector<at::Tensor> & ps) {
                      ParamGroup a, b;
                      a.params = {ps[0], ps[1]};
                      a.lr = 0.01, a.weight_decay = 0.1, a.beta1 = 0.9, a.beta2 = 0.95;
                      b.params = {ps[2]};
                      b.lr = 0.003, b.weight_decay = 0.0, b.beta1 = 0.9, b.beta2 = 0.95;
                      return Optimizer(OptimKind::adamw, {a, b});
                  },
                  "torch.optim.AdamW([{'params': ps[:2], 'lr': 0.01, 'weight_decay': 0.1}, "
                  "{'params': ps[2:], 'lr': 0.003, 'weight_decay': 0.0}], betas=(0.9, 0.95), eps=1e-8, foreach=False)",
                  [](Optimizer & o) { o.set_lr(0.02, 0); o.set_momentum(0.8, 1); },
                  "opt.param_groups[0]['lr'] = 0.02; opt.param_groups[1]['betas'] = (0.8, 0.95)"});
    cs.push_back({"AdamW defaults",
                  [](std::vector<at::Tensor> & ps) {
                      ParamGroup a;
                      a.params = ps;
                      a.lr = 1e-3, a.weight_decay = 1e-2;
                      return Optimizer(OptimKind::adamw, {a});
                  },
                  "torch.optim.AdamW(ps, foreach=False)", [](Optimizer & o) { o.set_lr(0.05); },
                  "opt.param_groups[0]['lr'] = 0.05"});
    cs.push_back({"SGD plain",
                  [](std::vector<at::Tensor> & ps) {
                      ParamGroup a;
                      a.params = ps;
                      a.lr = 0.1;
                      return Optimizer(OptimKind::sgd, {a});
                  },
                  "torch.optim.SGD(ps, lr=0.1, foreach=False)", [](Optimizer & o) { o.set_lr(0.05); },
                  "opt.param_groups[0]['lr'] = 0.05"});
    cs.push_back({"SGD momentum",
                  [](std::vector<at::Tensor> & ps) {
                      ParamGroup a;
                      a.params = ps;
                      a.lr = 0.05, a.momentum = 0.9;
                      return Optimizer(OptimKind::sgd, {a});
                  },
                  "torch.optim.SGD(ps, lr=0.05, momentum=0.9, foreach=False)", [](Optimizer & o) { o.set_momentum(0.5); },
                  "opt.param_groups[0]['momentum'] = 0.5"});
    cs.push_back({"SGD nesterov + weight decay",
                  [](std::vector<at::Tensor> & ps) {
                      ParamGroup a, b;
                      a.params = {ps[0]};
                      a.lr = 0.05, a.momentum = 0.9, a.nesterov = true, a.weight_decay = 0.01;
                      b.params = {ps[1], ps[2]};
                      b.lr = 0.02, b.momentum = 0.9, b.nesterov = true, b.weight_decay = 0.1;
                      return Optimizer(OptimKind::sgd, {a, b});
                  },
                  "torch.optim.SGD([{'params': ps[:1], 'lr': 0.05, 'weight_decay': 0.01}, "
                  "{'params': ps[1:], 'lr': 0.02, 'weight_decay': 0.1}], momentum=0.9, nesterov=True, foreach=False)",
                  [](Optimizer & o) { o.set_lr(0.01, 1); }, "opt.param_groups[1]['lr'] = 0.01"});
    return cs;
}

// -- Muon: an explicit implementation with plain loops in double ---------------------------------

using Mat = std::vector<std::vector<double>>;

Mat mat_of(const at::Tensor & t) {
    at::Tensor d = t.detach().to(at::kDouble).contiguous();
    Mat m(d.size(0), std::vector<double>(d.size(1)));
    for (int64_t i = 0; i < d.size(0); i++)
        for (int64_t j = 0; j < d.size(1); j++) m[i][j] = d[i][j].item<double>();
    return m;
}

Mat mat_mul(const Mat & a, const Mat & b) {
    Mat c(a.size(), std::vector<double>(b[0].size(), 0.0));
    for (size_t i = 0; i < a.size(); i++)
        for (size_t k = 0; k < b.size(); k++)
            for (size_t j = 0; j < b[0].size(); j++) c[i][j] += a[i][k] * b[k][j];
    return c;
}

Mat mat_t(const Mat & a) {
    Mat c(a[0].size(), std::vector<double>(a.size()));
    for (size_t i = 0; i < a.size(); i++)
        for (size_t j = 0; j < a[0].size(); j++) c[j][i] = a[i][j];
    return c;
}

Mat ns5_explicit(Mat X, int steps) {
    double nrm = 0;
    for (auto & r : X)
        for (double v : r) nrm += v * v;
    nrm = std::sqrt(nrm) + 1e-7;
    for (auto & r : X)
        for (double & v : r) v /= nrm;
    bool tall = X.size() > X[0].size();
    if (tall) X = mat_t(X);
    for (int s = 0; s < steps; s++) {
        Mat A = mat_mul(X, mat_t(X));
        Mat AA = mat_mul(A, A);
        Mat B = A;
        for (size_t i = 0; i < A.size(); i++)
            for (size_t j = 0; j < A.size(); j++) B[i][j] = -4.7750 * A[i][j] + 2.0315 * AA[i][j];
        Mat BX = mat_mul(B, X);
        for (size_t i = 0; i < X.size(); i++)
            for (size_t j = 0; j < X[0].size(); j++) X[i][j] = 3.4445 * X[i][j] + BX[i][j];
    }
    return tall ? mat_t(X) : X;
}

at::Tensor svals(const at::Tensor & t) {
    return at::linalg_svdvals(t.to(at::kDouble));
}

std::string tmp_path(const char * name) {
    return "/tmp/qatlab_test_optim_" + std::to_string(getpid()) + "_" + name;
}

} // namespace

// -- AdamW / SGD against torch.optim ---------------------------------------------------------------

TEST(Optim, TrajectoriesMatchTorchFloat64) {
    if (!test_python()) GTEST_SKIP() << "QATLAB_PYTHON not set";
    traj_check(cases_make(), at::kDouble, 1e-13);
}

TEST(Optim, TrajectoriesMatchTorchFloat32) {
    if (!test_python()) GTEST_SKIP() << "QATLAB_PYTHON not set";
    traj_check(cases_make(), at::kFloat, 2e-6);
}

TEST(Optim, ParamsWithoutGradAreSkipped) {
    if (!test_python()) GTEST_SKIP() << "QATLAB_PYTHON not set";
    // ps[1] has no gradient on odd steps: its step count (bias correction) lags, as in torch.
    auto want = py_run("ps = make(torch.float64)\nopt = torch.optim.AdamW(ps, lr=0.01, foreach=False)\n"
                       "for t in range(1, 7):\n"
                       "    grads(ps, t)\n"
                       "    if t % 2: ps[1].grad = None\n"
                       "    opt.step()\n"
                       "    dump(ps)\n");
    ASSERT_EQ(want.size(), 6u);
    auto ps = params_make(at::kDouble);
    ParamGroup g;
    g.params = ps;
    g.lr = 0.01, g.weight_decay = 0.01;   // torch's AdamW default
    Optimizer opt(OptimKind::adamw, {g});
    for (int t = 1; t <= 6; t++) {
        grads_set(ps, t);
        if (t % 2) ps[1].mutable_grad() = at::Tensor();
        opt.step();
        rows_expect_near(flat(ps), want[t - 1], 1e-13, "step " + std::to_string(t));
    }
}

TEST(Optim, ClipGradNormMatchesTorch) {
    if (!test_python()) GTEST_SKIP() << "QATLAB_PYTHON not set";
    const std::vector<std::pair<double, at::ScalarType>> cs = {
        {0.5, at::kDouble}, {100.0, at::kDouble}, {0.5, at::kFloat}, {100.0, at::kFloat}};
    std::string body;
    for (auto & [max_norm, dt] : cs)
        body += std::string("ps = make(") + (dt == at::kDouble ? "torch.float64" : "torch.float32") + ")\ngrads(ps, 3)\n" +
                "n = torch.nn.utils.clip_grad_norm_(ps, " + std::to_string(max_norm) + ")\n"
                "print(repr(n.item()))\ndump([p.grad for p in ps])\n";
    auto want = py_run(body);
    ASSERT_EQ(want.size(), 2 * cs.size());
    for (size_t i = 0; i < cs.size(); i++) {
        auto [max_norm, dt] = cs[i];
        auto ps = params_make(dt);
        grads_set(ps, 3);
        double n = clip_grad_norm(ps, max_norm).item<double>();
        double tol = dt == at::kDouble ? 1e-14 : 1e-6;
        EXPECT_NEAR(n, want[2 * i][0], tol * (1 + n)) << i;
        std::vector<at::Tensor> gs;
        for (auto & p : ps) gs.push_back(p.grad());
        rows_expect_near(flat(gs), want[2 * i + 1], tol, "clipped grads " + std::to_string(i));
    }
}

TEST(Optim, ClipGradNormByHand) {
    at::Tensor a = at::zeros({2}, at::kFloat).requires_grad_(), b = at::zeros({1}, at::kFloat).requires_grad_();
    at::Tensor c = at::zeros({3}, at::kFloat).requires_grad_();   // no gradient: ignored
    a.mutable_grad() = at::tensor({3.0f, 0.0f});
    b.mutable_grad() = at::tensor({4.0f});
    EXPECT_NEAR(clip_grad_norm({a, b, c}, 1.0).item<double>(), 5.0, 1e-6);
    EXPECT_NEAR(a.grad()[0].item<double>(), 3.0 / (5.0 + 1e-6), 1e-6);
    EXPECT_NEAR(b.grad()[0].item<double>(), 4.0 / (5.0 + 1e-6), 1e-6);
    EXPECT_NEAR(clip_grad_norm({a, b}, 10.0).item<double>(), 1.0, 1e-5);   // below the limit: unchanged
    EXPECT_NEAR(b.grad()[0].item<double>(), 0.8, 1e-5);
    EXPECT_EQ(clip_grad_norm({c}, 1.0).item<double>(), 0.0);
}

TEST(Optim, ZeroGradSetsNone) {
    auto ps = params_make(at::kFloat);
    grads_set(ps, 1);
    ParamGroup g;
    g.params = ps;
    Optimizer opt(OptimKind::sgd, {g});
    opt.zero_grad();
    for (auto & p : ps) EXPECT_FALSE(p.grad().defined());
    opt.step();   // nothing to do: no error, no change
    rows_expect_near(flat(ps), flat(params_make(at::kFloat)), 0, "unchanged");
}

// -- Muon ------------------------------------------------------------------------------------------

TEST(Optim, MuonSingularValuesInBand) {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(7);
    for (bool bf16 : {true, false}) {
        for (auto shape : std::vector<std::vector<int64_t>>{{16, 64}, {64, 16}, {32, 48}}) {
            at::Tensor G = at::randn(shape, gen, at::TensorOptions().dtype(at::kFloat));
            at::Tensor U = muon_orthogonalize(G, 5, bf16);
            EXPECT_EQ(U.scalar_type(), bf16 ? at::kBFloat16 : at::kFloat);
            EXPECT_EQ(U.sizes(), G.sizes());
            at::Tensor s = svals(U);
            EXPECT_GT(s.min().item<double>(), 0.6) << shape[0] << "x" << shape[1] << " bf16=" << bf16;
            EXPECT_LT(s.max().item<double>(), 1.3) << shape[0] << "x" << shape[1] << " bf16=" << bf16;
        }
    }
}

TEST(Optim, MuonSquareUpdateIsNearlyOrthogonal) {
    // G = Q1 diag(s) Q2ᵀ with a bounded spread: the update must be near the polar factor Q1 Q2ᵀ.
    auto gen = at::make_generator<at::CPUGeneratorImpl>(11);
    auto f64 = at::TensorOptions().dtype(at::kDouble);
    at::Tensor Q1 = std::get<0>(at::linalg_qr(at::randn({24, 24}, gen, f64)));
    at::Tensor Q2 = std::get<0>(at::linalg_qr(at::randn({24, 24}, gen, f64)));
    at::Tensor s = at::linspace(0.05, 1.0, 24, f64);
    at::Tensor G = at::matmul(Q1 * s, Q2.t()).to(at::kFloat);
    for (bool bf16 : {false, true}) {
        at::Tensor U = muon_orthogonalize(G, 5, bf16).to(at::kDouble);
        at::Tensor sv = svals(U);
        EXPECT_GT(sv.min().item<double>(), 0.65);
        EXPECT_LT(sv.max().item<double>(), 1.25);
        at::Tensor polar = at::matmul(Q1, Q2.t());
        EXPECT_LT(at::linalg_matrix_norm(U - polar, 2).item<double>(), 0.35) << "bf16=" << bf16;
        at::Tensor UUt = at::matmul(U, U.t());
        at::Tensor ev = at::linalg_eigvalsh(UUt);
        EXPECT_GT(ev.min().item<double>(), 0.4);
        EXPECT_LT(ev.max().item<double>(), 1.6);
    }
}

TEST(Optim, MuonStepsMatchExplicitImplementation) {
    // Tall 6x4 (transpose path, scale sqrt(6/4)), Nesterov momentum, decoupled weight decay, fp32 NS.
    auto gen = at::make_generator<at::CPUGeneratorImpl>(3);
    at::Tensor p = at::randn({6, 4}, gen, at::TensorOptions().dtype(at::kFloat)).requires_grad_();
    Mat P = mat_of(p), buf(6, std::vector<double>(4, 0.0));
    ParamGroup g;
    g.params = {p};
    g.lr = 0.02, g.momentum = 0.95, g.nesterov = true, g.weight_decay = 0.1, g.ns_steps = 5, g.ns_bf16 = false;
    Optimizer opt(OptimKind::muon, {g});
    for (int t = 1; t <= 3; t++) {
        at::Tensor grad = at::randn({6, 4}, gen, at::TensorOptions().dtype(at::kFloat));
        p.mutable_grad() = grad;
        opt.step();
        Mat G = mat_of(grad), u(6, std::vector<double>(4));
        for (int i = 0; i < 6; i++)
            for (int j = 0; j < 4; j++) {
                buf[i][j] = 0.95 * buf[i][j] + G[i][j];
                u[i][j] = G[i][j] + 0.95 * buf[i][j];
            }
        Mat O = ns5_explicit(u, 5);
        double scale = std::sqrt(6.0 / 4.0);
        for (int i = 0; i < 6; i++)
            for (int j = 0; j < 4; j++) P[i][j] = P[i][j] * (1 - 0.02 * 0.1) - 0.02 * scale * O[i][j];
        Mat got = mat_of(p);
        double worst = 0;
        for (int i = 0; i < 6; i++)
            for (int j = 0; j < 4; j++) worst = std::max(worst, std::abs(got[i][j] - P[i][j]));
        EXPECT_LT(worst, 2e-6) << "step " << t;
    }
    // Wide matrices get no extra scale; bf16 NS stays close to the fp32 one.
    at::Tensor G = at::randn({4, 6}, gen, at::TensorOptions().dtype(at::kFloat));
    Mat O = ns5_explicit(mat_of(G), 5);
    at::Tensor ref = at::empty({4, 6}, at::kDouble);
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 6; j++) ref[i][j] = O[i][j];
    EXPECT_LT((muon_orthogonalize(G, 5, false).to(at::kDouble) - ref).abs().max().item<double>(), 1e-5);
    EXPECT_LT((muon_orthogonalize(G, 5, true).to(at::kDouble) - ref).abs().max().item<double>(), 0.1);
}

TEST(Optim, DuplicateParamsAreRejected) {
    at::Tensor p = at::zeros({2, 2}).requires_grad_();
    ParamGroup a, b;
    a.params = {p};
    b.params = {p};
    EXPECT_THROW(Optimizer(OptimKind::adamw, {a, b}), std::runtime_error);
    EXPECT_THROW(Optimizer(OptimKind::sgd, {ParamGroup{}}), std::runtime_error);   // empty
}

TEST(Optim, MuonRejectsNonMatrices) {
    ParamGroup g;
    g.params = {at::zeros({5}).requires_grad_()};
    try {
        Optimizer opt(OptimKind::muon, {g});
        FAIL() << "expected an error";
    } catch (const std::exception & e) {
        EXPECT_NE(std::string(e.what()).find("2-D"), std::string::npos) << e.what();
    }
}

// -- half precision: fp32 master copies -----------------------------------------------------------

TEST(Optim, Bf16ParamsFollowTheFp32Trajectory) {
    // Gradients do not depend on the parameter, so bf16 params must equal the fp32 run rounded.
    for (OptimKind kind : {OptimKind::adamw, OptimKind::sgd, OptimKind::muon}) {
        at::Tensor pf = (at::arange(12, at::kFloat) * 0.1).reshape({3, 4}).sin().to(at::kBFloat16).to(at::kFloat);
        at::Tensor pb = pf.to(at::kBFloat16).requires_grad_();
        pf.requires_grad_();
        ParamGroup gf, gb;
        gf.params = {pf};
        gf.lr = 1e-4, gf.momentum = 0.9;   // updates below a bf16 ulp: only a master accumulates them
        gb = gf;
        gb.params = {pb};
        Optimizer of(kind, {gf}), ob(kind, {gb});
        for (int t = 1; t <= 8; t++) {
            at::Tensor g = (at::arange(12, at::kFloat) * 0.7 + t).sin().reshape({3, 4}).to(at::kBFloat16);
            pb.mutable_grad() = g;
            pf.mutable_grad() = g.to(at::kFloat);
            of.step();
            ob.step();
            EXPECT_TRUE(at::equal(pb.detach(), pf.detach().to(at::kBFloat16))) << optim_kind_name(kind) << " step " << t;
        }
        EXPECT_GT((pf.detach() - pf.detach().to(at::kBFloat16).to(at::kFloat)).abs().max().item<double>(), 0.0);
        EXPECT_EQ(ob.state_dict().tensors.size(), of.state_dict().tensors.size() + 1);   // + master
        // Written from outside: the master re-seeds from the new value.
        {
            at::NoGradGuard ng;
            pb.fill_(0.5);
        }
        ob.set_lr(0.0);
        ob.step();
        EXPECT_TRUE(at::equal(pb.detach(), at::full({3, 4}, 0.5, at::kBFloat16))) << optim_kind_name(kind);
    }
}

// -- state dicts --------------------------------------------------------------------------------------

TEST(Optim, StateDictRoundTripContinuesTheTrajectory) {
    for (OptimKind kind : {OptimKind::adamw, OptimKind::sgd, OptimKind::muon}) {
        auto make_params = [&] {
            auto ps = params_make(at::kFloat);
            ps[1] = at::zeros({3, 5}, at::kFloat).add_(0.25).to(at::kBFloat16).requires_grad_();   // a bf16 matrix
            if (kind == OptimKind::muon) ps[0] = ps[0].detach().clone().requires_grad_(), ps[2] = ps[2].detach().clone().requires_grad_();
            return ps;
        };
        auto make_opt = [&](std::vector<at::Tensor> & ps) {
            ParamGroup a, b;
            a.params = {ps[0], ps[1]};
            b.params = {ps[2]};
            a.lr = 0.01, b.lr = 0.02;
            a.momentum = b.momentum = 0.9;
            a.nesterov = true;
            a.weight_decay = 0.05;
            a.ns_bf16 = false;
            return Optimizer(kind, {a, b});
        };
        auto ref = make_params();
        Optimizer oref = make_opt(ref);
        auto ps = make_params();
        Optimizer o1 = make_opt(ps);
        for (int t = 1; t <= 10; t++) {
            grads_set(ref, t);
            oref.step();
            if (t == 5) oref.set_lr(0.005, 0);
        }
        for (int t = 1; t <= 5; t++) {
            grads_set(ps, t);
            o1.step();
            if (t == 5) o1.set_lr(0.005, 0);
        }
        // Through a safetensors file, into a fresh optimizer over fresh parameter copies.
        OptimStateDict sd = o1.state_dict();
        std::string path = tmp_path("sd.safetensors");
        safetensors_save(path, sd.tensors, {{"optim", sd.meta}});
        std::vector<at::Tensor> ps2;
        for (auto & p : ps) ps2.push_back(p.detach().clone().requires_grad_());
        Optimizer o2 = make_opt(ps2);
        SafetensorsFile f = safetensors_load(path);
        std::remove(path.c_str());
        o2.load_state_dict({f.tensors, f.metadata.at("optim")});
        EXPECT_EQ(o2.param_groups()[0].lr, 0.005);
        for (int t = 6; t <= 10; t++) {
            grads_set(ps2, t);
            o2.step();
        }
        for (size_t k = 0; k < ref.size(); k++)
            EXPECT_TRUE(at::equal(ref[k].detach(), ps2[k].detach())) << optim_kind_name(kind) << " param " << k;
        auto meta = nlohmann::json::parse(sd.meta);
        EXPECT_EQ(meta["kind"], optim_kind_name(kind));
        EXPECT_EQ(meta["state"][0]["step"], 5);
    }
}

TEST(Optim, LoadStateDictErrors) {
    auto ps = params_make(at::kFloat);
    ParamGroup g;
    g.params = ps;
    Optimizer a(OptimKind::adamw, {g});
    grads_set(ps, 1);
    a.step();
    OptimStateDict sd = a.state_dict();
    auto err = [](const std::function<void()> & f) {
        try {
            f();
        } catch (const std::exception & e) {
            return std::string(e.what());
        }
        return std::string("no error");
    };
    Optimizer s(OptimKind::sgd, {g});
    EXPECT_NE(err([&] { s.load_state_dict(sd); }).find("AdamW"), std::string::npos);
    ParamGroup h;
    h.params = {params_make(at::kFloat)[0]};
    Optimizer two(OptimKind::adamw, {h, g});
    EXPECT_NE(err([&] { two.load_state_dict(sd); }).find("groups"), std::string::npos);
    OptimStateDict bad = sd;
    bad.tensors[0].second = at::zeros({7});
    std::string e = err([&] { a.load_state_dict(bad); });
    EXPECT_NE(e.find("state.0.exp_avg"), std::string::npos) << e;
    EXPECT_NE(err([&] { a.load_state_dict({sd.tensors, "{"}); }).find("JSON"), std::string::npos);
}

// -- gradient accumulation -------------------------------------------------------------------------

TEST(Optim, AccumulatedMicroBatchesEqualOneBatch) {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(5);
    auto f64 = at::TensorOptions().dtype(at::kDouble);
    at::Tensor X = at::randn({8, 3}, gen, f64), Y = at::randn({8, 2}, gen, f64);
    at::Tensor W0 = at::randn({2, 3}, gen, f64), b0 = at::randn({2}, gen, f64);
    for (OptimKind kind : {OptimKind::adamw, OptimKind::sgd}) {
        auto run = [&](bool accumulate) {
            at::Tensor W = W0.clone().requires_grad_(), b = b0.clone().requires_grad_();
            ParamGroup g;
            g.params = {W, b};
            g.lr = 0.01, g.momentum = 0.9, g.weight_decay = 0.01;
            Optimizer opt(kind, {g});
            for (int s = 0; s < 3; s++) {
                opt.zero_grad();
                if (accumulate) {
                    for (int m = 0; m < 4; m++) {
                        at::Tensor x = X.narrow(0, 2 * m, 2), y = Y.narrow(0, 2 * m, 2);
                        at::Tensor loss = (at::linear(x, W, b) - y).pow(2).mean() / 4.0;
                        loss.backward();
                    }
                } else {
                    (at::linear(X, W, b) - Y).pow(2).mean().backward();
                }
                opt.step();
            }
            return std::vector<at::Tensor>{W.detach(), b.detach()};
        };
        auto a = run(true), c = run(false);
        for (int k = 0; k < 2; k++)
            EXPECT_LT((a[k] - c[k]).abs().max().item<double>(), 1e-12) << optim_kind_name(kind);
    }
}

// -- CUDA: the same updates as on the CPU (skipped without a GPU) ----------------------------------

TEST(Optim, CudaMatchesCpu) {
    if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
    for (OptimKind kind : {OptimKind::adamw, OptimKind::sgd, OptimKind::muon}) {
        for (at::ScalarType dt : {at::kFloat, at::kBFloat16}) {
            auto gen = at::make_generator<at::CPUGeneratorImpl>(9);
            at::Tensor init = at::randn({16, 8}, gen, at::TensorOptions().dtype(at::kFloat)).to(dt);
            at::Tensor pc = init.clone().requires_grad_(), pg = init.to(at::kCUDA).requires_grad_();
            ParamGroup a;
            a.lr = 0.01, a.momentum = 0.9, a.nesterov = true, a.weight_decay = 0.1, a.ns_bf16 = false;
            ParamGroup b = a;
            a.params = {pc};
            b.params = {pg};
            Optimizer oc(kind, {a}), og(kind, {b});
            for (int t = 1; t <= 5; t++) {
                at::Tensor g = at::randn({16, 8}, gen, at::TensorOptions().dtype(at::kFloat)).to(dt);
                pc.mutable_grad() = g;
                pg.mutable_grad() = g.to(at::kCUDA);
                oc.step();
                og.step();
            }
            double tol = dt == at::kFloat ? 1e-5 : 3e-2;   // bf16: one ulp at |p| < 4
            EXPECT_LT((pg.detach().cpu().to(at::kDouble) - pc.detach().to(at::kDouble)).abs().max().item<double>(), tol)
                << optim_kind_name(kind) << " " << c10::toString(dt);
            std::vector<at::Tensor> gs = {pg};
            pg.mutable_grad() = at::ones_like(pg);
            EXPECT_NEAR(clip_grad_norm(gs, 1.0).item<double>(), std::sqrt(128.0), 1e-3);
        }
    }
}
