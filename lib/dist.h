// dist: data-parallel training across processes on LibTorch's c10d: the launch environment
// (torchrun, Slurm, qatlab --nproc), one process group (Gloo on CPU, NCCL on CUDA), collectives, DDP.
#pragma once
#include <ATen/core/Tensor.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

namespace qatlab {

// Where this process sits, read from the environment. world == 1 and source "none" without one.
struct DistEnv {
    int rank = 0, world = 1, local_rank = 0, local_world = 1;
    std::string master_addr;
    int master_port = 0;
    std::string source = "none";  // "env" (torchrun, qatlab --nproc), "slurm" or "none"
};

// torchrun's RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT win over Slurm's SLURM_PROCID/
// SLURM_NTASKS/SLURM_LOCALID (address: MASTER_ADDR, else the first host of SLURM_JOB_NODELIST, else
// SLURM_LAUNCH_NODE_IPADDR; port: MASTER_PORT, else derived from SLURM_JOB_ID). Throws on bad values.
DistEnv dist_env_read(const std::map<std::string, std::string> & env);
DistEnv dist_env_read();                       // from the process environment
std::string dist_slurm_first_host(const std::string & nodelist);  // "gpu[03-05,9],cpu1" → "gpu03"

struct DistInitOptions {
    std::string backend = "auto";  // auto (NCCL when CUDA is the default device, else Gloo), gloo, nccl
    double timeout_s = 1800;
    bool cuda = false;             // the default device is CUDA (auto picks NCCL, cuda:LOCAL_RANK is set)
};

bool dist_compiled();                          // built with Gloo headers
bool dist_nccl_compiled();                     // built with ProcessGroupNCCL
const char * dist_missing_hint();              // how to get distributed support
// Joins the process group described by the environment; a world of 1 makes no group. Once only.
void dist_init(const DistInitOptions & opt);
bool dist_initialized();
const DistEnv & dist_env();                    // valid after dist_init
std::string dist_backend();                    // "gloo", "nccl" or "none" (world of 1)
void dist_destroy();                           // leaves the group (also at exit)

// Collectives over the whole world; in place; identity for a world of 1 or before dist_init.
// op: sum, mean (avg), max, min, product.
void dist_all_reduce(at::Tensor & t, const std::string & op);
void dist_broadcast(at::Tensor & t, int src);
void dist_barrier();

// DDP over a list of parameters: c10d::Reducer buckets the gradients (first bucket min(1 MiB, bucket_bytes), the
// others bucket_bytes) and all-reduces each bucket as soon as its gradients are ready during
// backward; the averaged gradients are in .grad when backward returns. The constructor checks the
// shapes agree across ranks and broadcasts rank 0's values. A world of 1 makes a no-op wrapper.
// Protocol per optimizer step: prepare_forward(); forward; prepare_backward({loss}); loss.backward().
// Micro-batches that only accumulate skip both calls (PyTorch's no_sync) and are reduced with the last.
class DistDdp {
public:
    DistDdp(std::vector<at::Tensor> params, int64_t bucket_bytes, bool find_unused, bool broadcast_params);
    ~DistDdp();
    void prepare_forward();
    void prepare_backward(const std::vector<at::Tensor> & outputs);
    size_t num_buckets() const;

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

} // namespace qatlab
