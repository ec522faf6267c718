// dist: the process group (TCPStore rendezvous, Gloo/NCCL backends), collectives and DDP on c10d's
// Reducer. The only translation unit that sees <gloo/...> (Debian's libgloo-dev headers; no libgloo link).
#include "lib/dist.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <stdexcept>
#include <type_traits>
#include <unordered_map>

#ifdef QATLAB_WITH_DIST
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/reducer.hpp>
#endif
// NCCL needs a CUDA LibTorch and nccl.h (CMake defines QATLAB_WITH_NCCL). Not tested: the
// development machines have no GPU; the path follows PyTorch's own cpu:gloo,cuda:nccl default.
#ifdef QATLAB_WITH_NCCL
#ifndef USE_C10D_NCCL
#define USE_C10D_NCCL
#endif
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif
#ifdef QATLAB_WITH_CUDA
#include <c10/cuda/CUDAFunctions.h>
#endif

namespace qatlab {

using std::runtime_error;

// -- environment ------------------------------------------------------------------------------

namespace {

bool env_has(const std::map<std::string, std::string> & env, const char * k) {
    auto it = env.find(k);
    return it != env.end() && !it->second.empty();
}

const std::string & env_get(const std::map<std::string, std::string> & env, const char * k) {
    static const std::string empty;
    auto it = env.find(k);
    return it == env.end() ? empty : it->second;
}

long env_int(const std::map<std::string, std::string> & env, const char * k, long min, long max) {
    const std::string & s = env_get(env, k);
    char * end = nullptr;
    errno = 0;
    long v = std::strtol(s.c_str(), &end, 10);
    if (s.empty() || *end != '\0' || errno != 0 || v < min || v > max)
        throw runtime_error(std::string(k) + "='" + s + "': expected an integer in [" + std::to_string(min) + ", " +
                            std::to_string(max) + "]");
    return v;
}

} // namespace

std::string dist_slurm_first_host(const std::string & nodelist) {
    size_t comma = nodelist.find(','), bracket = nodelist.find('[');
    if (bracket == std::string::npos || (comma != std::string::npos && comma < bracket))
        return nodelist.substr(0, comma);
    // "gpu[03-05,9]": the prefix and the first number of the range, zero padding kept.
    size_t stop = nodelist.find_first_of("-,]", bracket + 1);
    if (stop == std::string::npos || stop == bracket + 1)
        throw runtime_error("SLURM_JOB_NODELIST='" + nodelist + "': expected host or prefix[ranges]");
    return nodelist.substr(0, bracket) + nodelist.substr(bracket + 1, stop - bracket - 1);
}

DistEnv dist_env_read(const std::map<std::string, std::string> & env) {
    DistEnv d;
    constexpr long kMaxWorld = 1 << 20;
    if (env_has(env, "RANK") || env_has(env, "WORLD_SIZE")) {
        if (!env_has(env, "RANK") || !env_has(env, "WORLD_SIZE"))
            throw runtime_error("RANK and WORLD_SIZE must be set together (torchrun sets both)");
        d.source = "env";
        d.world = (int)env_int(env, "WORLD_SIZE", 1, kMaxWorld);
        d.rank = (int)env_int(env, "RANK", 0, kMaxWorld);
        d.local_rank = env_has(env, "LOCAL_RANK") ? (int)env_int(env, "LOCAL_RANK", 0, kMaxWorld) : d.rank;
        d.local_world = env_has(env, "LOCAL_WORLD_SIZE") ? (int)env_int(env, "LOCAL_WORLD_SIZE", 1, kMaxWorld) : d.world;
        d.master_addr = env_get(env, "MASTER_ADDR");
        if (env_has(env, "MASTER_PORT")) d.master_port = (int)env_int(env, "MASTER_PORT", 1, 65535);
    } else if (env_has(env, "SLURM_PROCID") && env_has(env, "SLURM_NTASKS")) {
        d.source = "slurm";
        d.world = (int)env_int(env, "SLURM_NTASKS", 1, kMaxWorld);
        d.rank = (int)env_int(env, "SLURM_PROCID", 0, kMaxWorld);
        d.local_rank = env_has(env, "SLURM_LOCALID") ? (int)env_int(env, "SLURM_LOCALID", 0, kMaxWorld) : 0;
        // SLURM_TASKS_PER_NODE reads "4(x2)" or "4,3": the first count is this node's on even layouts.
        const std::string & tpn = env_get(env, "SLURM_TASKS_PER_NODE");
        d.local_world = tpn.empty() ? 1 : std::max(1, std::atoi(tpn.c_str()));
        if (env_has(env, "MASTER_ADDR"))
            d.master_addr = env_get(env, "MASTER_ADDR");
        else if (env_has(env, "SLURM_JOB_NODELIST"))
            d.master_addr = dist_slurm_first_host(env_get(env, "SLURM_JOB_NODELIST"));
        else
            d.master_addr = env_get(env, "SLURM_LAUNCH_NODE_IPADDR");
        if (env_has(env, "MASTER_PORT"))
            d.master_port = (int)env_int(env, "MASTER_PORT", 1, 65535);
        else if (env_has(env, "SLURM_JOB_ID"))  // the same on every task of the job, rarely shared
            d.master_port = 20000 + (int)(env_int(env, "SLURM_JOB_ID", 0, 0x7fffffffL) % 20000);
    } else {
        return d;
    }
    if (d.rank >= d.world)
        throw runtime_error((d.source == "slurm" ? "SLURM_PROCID=" : "RANK=") + std::to_string(d.rank) +
                            (d.source == "slurm" ? " with SLURM_NTASKS=" : " with WORLD_SIZE=") + std::to_string(d.world) +
                            ": expected 0 <= rank < world size");
    if (d.local_rank >= d.local_world && d.source == "env")
        throw runtime_error("LOCAL_RANK=" + std::to_string(d.local_rank) + " with LOCAL_WORLD_SIZE=" +
                            std::to_string(d.local_world) + ": expected 0 <= LOCAL_RANK < LOCAL_WORLD_SIZE");
    if (d.world > 1 && d.master_addr.empty())
        throw runtime_error(d.source == "slurm" ? "no master address: set MASTER_ADDR (SLURM_JOB_NODELIST and "
                                                  "SLURM_LAUNCH_NODE_IPADDR are unset)"
                                                : "MASTER_ADDR is unset (expected the address of rank 0)");
    if (d.world > 1 && d.master_port == 0)
        throw runtime_error(d.source == "slurm" ? "no master port: set MASTER_PORT (SLURM_JOB_ID is unset)"
                                                : "MASTER_PORT is unset (expected the TCP port rank 0 listens on)");
    return d;
}

DistEnv dist_env_read() {
    std::map<std::string, std::string> env;
    for (const char * k : {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                           "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_TASKS_PER_NODE",
                           "SLURM_JOB_NODELIST", "SLURM_LAUNCH_NODE_IPADDR", "SLURM_JOB_ID"})
        if (const char * v = std::getenv(k)) env[k] = v;
    return dist_env_read(env);
}

// -- the process group ---------------------------------------------------------------------------

namespace {

struct DistState {
    bool initialized = false;
    DistEnv env;
    std::string backend = "none";
#ifdef QATLAB_WITH_DIST
    c10::intrusive_ptr<c10d::ProcessGroup> pg;
#endif
};

// Never destroyed: an os.exit() must not close the sockets in static destructors while the process
// lingers, or the peers fail ("connection reset") before the launcher sees this rank exit. The
// Lua state's close (dist_destroy) releases the group on the ordinary paths.
DistState & state() {
    static DistState * s = new DistState;
    return *s;
}

#ifdef QATLAB_WITH_DIST
bool is_loopback(const std::string & addr) {
    return addr == "localhost" || addr.rfind("127.", 0) == 0 || addr == "::1";
}

// Loopback launches (qatlab --nproc) bind Gloo to 127.0.0.1: the host name may resolve to an
// address other ranks cannot reach in containers. GLOO_SOCKET_IFNAME wins, as in PyTorch.
std::shared_ptr<::gloo::transport::Device> gloo_device(const DistEnv & env) {
    if (const char * ifname = std::getenv("GLOO_SOCKET_IFNAME"); ifname && *ifname)
        return c10d::ProcessGroupGloo::createDeviceForInterface(ifname);
    if (is_loopback(env.master_addr)) return c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1");
    return c10d::ProcessGroupGloo::createDefaultDevice();
}

c10d::ReduceOp reduce_op_parse(const std::string & op) {
    if (op == "sum" || op == "mean" || op == "avg") return c10d::ReduceOp::SUM;  // Gloo has no AVG
    if (op == "max") return c10d::ReduceOp::MAX;
    if (op == "min") return c10d::ReduceOp::MIN;
    if (op == "product" || op == "prod") return c10d::ReduceOp::PRODUCT;
    throw runtime_error("op '" + op + "': expected sum, mean, max, min or product");
}
#endif

} // namespace

bool dist_compiled() {
#ifdef QATLAB_WITH_DIST
    return true;
#else
    return false;
#endif
}

bool dist_nccl_compiled() {
#ifdef QATLAB_WITH_NCCL
    return true;
#else
    return false;
#endif
}

const char * dist_missing_hint() {
    return "this qatlab was built without distributed support: install the Gloo headers "
           "(apt-get install libgloo-dev, or bash tools/setup.sh build) and re-run cmake";
}

bool dist_initialized() { return state().initialized; }
const DistEnv & dist_env() { return state().env; }
std::string dist_backend() { return state().backend; }

void dist_init(const DistInitOptions & opt) {
    DistState & s = state();
    if (s.initialized) throw runtime_error("already initialised (call it once per process)");
    if (opt.backend != "auto" && opt.backend != "gloo" && opt.backend != "nccl")
        throw runtime_error("backend '" + opt.backend + "': expected auto, gloo or nccl");
    if (!(opt.timeout_s > 0)) throw runtime_error("timeout must be positive (seconds)");
    DistEnv env = dist_env_read();
    if (env.world == 1) {  // no launcher, or a world of one: every collective is the identity
        s.env = env;
        s.initialized = true;
        return;
    }
#ifndef QATLAB_WITH_DIST
    throw runtime_error(dist_missing_hint());
#else
    std::string backend = opt.backend == "auto" ? (opt.cuda && dist_nccl_compiled() ? "nccl" : "gloo") : opt.backend;
    if (backend == "nccl" && !dist_nccl_compiled())
        throw runtime_error("backend 'nccl': this qatlab was built without NCCL (needs a CUDA LibTorch and nccl.h)");
#ifdef QATLAB_WITH_CUDA
    if (opt.cuda) c10::cuda::set_device((c10::DeviceIndex)env.local_rank);
#endif
    auto timeout = std::chrono::milliseconds((int64_t)(opt.timeout_s * 1000));
    c10d::TCPStoreOptions so;
    so.port = (uint16_t)env.master_port;
    so.isServer = env.rank == 0;
    so.numWorkers = (size_t)env.world;
    so.waitWorkers = true;
    so.timeout = timeout;
    c10::intrusive_ptr<c10d::Store> store;
    try {
        store = c10::make_intrusive<c10d::TCPStore>(env.master_addr, so);
    } catch (const c10::Error & e) {
        throw runtime_error("rendezvous at " + env.master_addr + ":" + std::to_string(env.master_port) + " (rank " +
                            std::to_string(env.rank) + "/" + std::to_string(env.world) +
                            ") failed: " + e.what_without_backtrace());
    }
    auto pg = c10::make_intrusive<c10d::ProcessGroup>(store, env.rank, env.world);
    // Gloo serves CPU tensors always (the logged loss, checkpoints' counters), and CUDA ones
    // unless NCCL does: PyTorch's "cpu:gloo,cuda:nccl".
    auto gopts = c10d::ProcessGroupGloo::Options::create(timeout);
    gopts->devices.push_back(gloo_device(env));
    auto gloo = c10::make_intrusive<c10d::ProcessGroupGloo>(
        c10::make_intrusive<c10d::PrefixStore>("qatlab/gloo", store), env.rank, env.world, gopts);
    pg->setBackend(c10::DeviceType::CPU, c10d::ProcessGroup::BackendType::GLOO, gloo);
    if (backend == "gloo") {
        pg->setBackend(c10::DeviceType::CUDA, c10d::ProcessGroup::BackendType::GLOO, gloo);
        pg->setDefaultBackend(c10d::ProcessGroup::BackendType::GLOO);
    }
#ifdef QATLAB_WITH_NCCL
    if (backend == "nccl") {
        auto nopts = c10d::ProcessGroupNCCL::Options::create();
        nopts->timeout = timeout;
        auto nccl = c10::make_intrusive<c10d::ProcessGroupNCCL>(
            c10::make_intrusive<c10d::PrefixStore>("qatlab/nccl", store), env.rank, env.world, nopts);
        pg->setBackend(c10::DeviceType::CUDA, c10d::ProcessGroup::BackendType::NCCL, nccl);
        pg->setDefaultBackend(c10d::ProcessGroup::BackendType::NCCL);
    }
#endif
    s.pg = pg;
    s.env = env;
    s.backend = backend;
    s.initialized = true;
#endif
}

void dist_destroy() {
    DistState & s = state();
#ifdef QATLAB_WITH_DIST
    s.pg.reset();
#endif
    s.backend = "none";
    s.initialized = false;
}

// -- collectives -----------------------------------------------------------------------------------

void dist_all_reduce(at::Tensor & t, const std::string & op) {
    bool mean = op == "mean" || op == "avg";
    if (mean && !at::isFloatingType(t.scalar_type()))
        throw runtime_error("op 'mean' needs a floating-point tensor, got " + std::string(c10::toString(t.scalar_type())));
#ifdef QATLAB_WITH_DIST
    c10d::AllreduceOptions o;
    o.reduceOp = reduce_op_parse(op);
    DistState & s = state();
    if (!s.pg) return;
    at::NoGradGuard no_grad;
    at::Tensor buf = t.is_contiguous() ? t.detach() : t.contiguous();
    std::vector<at::Tensor> ts{buf};
    s.pg->allreduce(ts, o)->wait();
    if (mean) buf.div_(s.env.world);
    if (buf.data_ptr() != t.data_ptr()) t.detach().copy_(buf);  // t was not contiguous
#else
    if (op != "sum" && !mean && op != "max" && op != "min" && op != "product" && op != "prod")
        throw runtime_error("op '" + op + "': expected sum, mean, max, min or product");
#endif
}

void dist_broadcast(at::Tensor & t, int src) {
    DistState & s = state();
    if (src < 0 || src >= s.env.world)
        throw runtime_error("src " + std::to_string(src) + ": expected a rank in [0, " + std::to_string(s.env.world) + ")");
#ifdef QATLAB_WITH_DIST
    if (!s.pg) return;
    at::NoGradGuard no_grad;
    at::Tensor buf = t.is_contiguous() ? t.detach() : t.contiguous();
    std::vector<at::Tensor> ts{buf};
    c10d::BroadcastOptions o;
    o.rootRank = src;
    s.pg->broadcast(ts, o)->wait();
    if (buf.data_ptr() != t.data_ptr()) t.detach().copy_(buf);
#endif
}

void dist_barrier() {
#ifdef QATLAB_WITH_DIST
    DistState & s = state();
    if (!s.pg) return;
    s.pg->barrier()->wait();
#endif
}

// -- DDP -------------------------------------------------------------------------------------------

#ifdef QATLAB_WITH_DIST
namespace {

// The Reducer's constructor grew per-bucket caps (2.13 has them; older LibTorch, e.g. a GPU box's
// 2.11, may not): pick the form this LibTorch offers. A template so the unused branch is discarded.
template <class R>
std::unique_ptr<R> reducer_make(std::vector<at::Tensor> params, std::vector<std::vector<size_t>> buckets,
                                std::vector<int64_t> caps, c10::intrusive_ptr<c10d::ProcessGroup> pg,
                                int64_t bucket_bytes, int64_t first_bytes, bool find_unused) {
    std::vector<bool> sparse(params.size(), false);
    using Names = std::unordered_map<size_t, std::string>;
    constexpr bool with_caps =
        std::is_constructible_v<R, std::vector<at::Tensor>, std::vector<std::vector<size_t>>,
                                c10::intrusive_ptr<c10d::ProcessGroup>, std::vector<bool>, int64_t, bool, bool, Names,
                                int64_t, bool, bool, std::vector<int64_t>>;
    if constexpr (with_caps)
        return std::make_unique<R>(std::move(params), std::move(buckets), std::move(pg), std::move(sparse), bucket_bytes,
                                   find_unused, /*gradient_as_bucket_view*/ false, Names{},
                                   first_bytes, /*skip_all_reduce_unused_params*/ false,
                                   /*use_python_reducer*/ false, std::move(caps));
    else
        return std::make_unique<R>(std::move(params), std::move(buckets), std::move(pg), std::move(sparse), bucket_bytes,
                                   find_unused, false, Names{}, first_bytes, false, false);
}

} // namespace
#endif

struct DistDdp::Impl {
#ifdef QATLAB_WITH_DIST
    std::unique_ptr<c10d::Reducer> reducer;
#endif
    size_t buckets = 0;
};

DistDdp::DistDdp(std::vector<at::Tensor> params, int64_t bucket_bytes, bool find_unused, bool broadcast_params)
    : impl_(std::make_unique<Impl>()) {
    if (params.empty()) throw runtime_error("expected at least one parameter");
    if (bucket_bytes < 1) throw runtime_error("bucket size must be positive, got " + std::to_string(bucket_bytes) + " bytes");
    for (size_t i = 0; i < params.size(); i++) {
        if (!params[i].defined()) throw runtime_error("parameter " + std::to_string(i + 1) + " is undefined (freed?)");
        if (!params[i].requires_grad() || !params[i].is_leaf())
            throw runtime_error("parameter " + std::to_string(i + 1) + " must be a leaf tensor that requires grad");
    }
#ifdef QATLAB_WITH_DIST
    auto pg = state().pg;
    if (!pg) return;  // a world of one: nothing to reduce
    c10d::verify_params_across_processes(pg, params, std::nullopt);
    if (broadcast_params)
        for (auto & p : params) {
            at::Tensor d = p.detach();
            dist_broadcast(d, 0);
        }
    // A small first bucket (1 MiB, as PyTorch) starts communication early; never above the asked size.
    size_t first = std::min((size_t)c10d::kDefaultFirstBucketBytes, (size_t)bucket_bytes);
    std::vector<size_t> limits{first, (size_t)bucket_bytes};
    auto [indices, per_limits] =
        c10d::compute_bucket_assignment_by_size(params, limits, std::vector<bool>(params.size(), false));
    // Gradients arrive roughly in reverse parameter order: reduce the last parameters' bucket first.
    std::reverse(indices.begin(), indices.end());
    std::vector<int64_t> caps(per_limits.rbegin(), per_limits.rend());
    impl_->buckets = indices.size();
    impl_->reducer = reducer_make<c10d::Reducer>(std::move(params), std::move(indices), std::move(caps), pg,
                                                 bucket_bytes, (int64_t)first, find_unused);
#endif
}

DistDdp::~DistDdp() = default;

void DistDdp::prepare_forward() {
#ifdef QATLAB_WITH_DIST
    if (!impl_->reducer) return;
    impl_->reducer->prepare_for_forward();
    // After the first step the buckets follow the order gradients really arrived in (once).
    impl_->reducer->rebuild_buckets();
#endif
}

void DistDdp::prepare_backward(const std::vector<at::Tensor> & outputs) {
#ifdef QATLAB_WITH_DIST
    if (impl_->reducer) impl_->reducer->prepare_for_backward(outputs);
#endif
}

size_t DistDdp::num_buckets() const { return impl_->buckets; }

} // namespace qatlab
