// dist: lib/dist as the Lua module `dist`: init from the launch environment, rank/world queries,
// all_reduce/broadcast/barrier, and dist.ddp(params) (c10d's bucketed, overlapped gradient all-reduce).
#include "bindings/bind.h"
#include "lib/dist.h"
#include "lib/model.h"

#include <ATen/ATen.h>

#include <memory>
#include <string>

namespace qatlab {

namespace {


struct DdpUD {
    std::unique_ptr<DistDdp> d;
};

DistDdp & ddp_check(lua_State * L, int idx) {
    DdpUD & u = udata_check<DdpUD>(L, idx, QATLAB_DDP_MT, "a DDP");
    if (!u.d) bind_fail("the DDP was released");
    return *u.d;
}

// The process group goes away when the Lua state closes, before LibTorch's statics do.
int sentinel_gc(lua_State *) {
    dist_destroy();
    return 0;
}

void dist_require_init(const char * fn) {
    if (!dist_initialized()) bind_fail("call dist.init() before %s", fn);
}

// dist.init{backend='auto'|'gloo'|'nccl', timeout=1800}: joins the world the environment describes
// (torchrun, srun, qatlab --nproc); without one, a world of 1. Returns rank, world_size.
int l_init(lua_State * L) {
    Args a(L);
    DistInitOptions o;
    o.backend = a.opt_string(1, "backend", "auto");
    o.timeout_s = a.opt_number(2, "timeout", 1800);
    a.finish();
    o.cuda = default_device().is_cuda();
    dist_init(o);
    // Each rank drives its own GPU: cuda:LOCAL_RANK becomes the default device.
    if (o.cuda && dist_env().world > 1) default_device() = c10::Device(c10::DeviceType::CUDA, (c10::DeviceIndex)dist_env().local_rank);
    lua_pushinteger(L, dist_env().rank);
    lua_pushinteger(L, dist_env().world);
    return 2;
}

int l_rank(lua_State * L) { lua_pushinteger(L, dist_initialized() ? dist_env().rank : 0); return 1; }
int l_world_size(lua_State * L) { lua_pushinteger(L, dist_initialized() ? dist_env().world : 1); return 1; }
int l_local_rank(lua_State * L) { lua_pushinteger(L, dist_initialized() ? dist_env().local_rank : 0); return 1; }
int l_is_main(lua_State * L) { lua_pushboolean(L, !dist_initialized() || dist_env().rank == 0); return 1; }
int l_is_initialized(lua_State * L) { lua_pushboolean(L, dist_initialized()); return 1; }

// dist.info() -> {rank=, world_size=, local_rank=, local_world_size=, backend=, source=, master_addr=, master_port=}
int l_info(lua_State * L) {
    const DistEnv & e = dist_env();
    lua_createtable(L, 0, 8);
    lua_pushinteger(L, e.rank); lua_setfield(L, -2, "rank");
    lua_pushinteger(L, e.world); lua_setfield(L, -2, "world_size");
    lua_pushinteger(L, e.local_rank); lua_setfield(L, -2, "local_rank");
    lua_pushinteger(L, e.local_world); lua_setfield(L, -2, "local_world_size");
    lua_pushstring(L, dist_backend().c_str()); lua_setfield(L, -2, "backend");
    lua_pushstring(L, e.source.c_str()); lua_setfield(L, -2, "source");
    lua_pushstring(L, e.master_addr.c_str()); lua_setfield(L, -2, "master_addr");
    lua_pushinteger(L, e.master_port); lua_setfield(L, -2, "master_port");
    lua_pushboolean(L, dist_nccl_compiled()); lua_setfield(L, -2, "nccl_compiled");
    return 1;
}

// dist.all_reduce(t, op='sum'): in place over all ranks (sum, mean, max, min, product); returns t.
int l_all_reduce(lua_State * L) {
    Args a(L);
    at::Tensor & t = a.tensor(1, "tensor");
    std::string op = a.opt_string(2, "op", "sum");
    a.finish();
    dist_all_reduce(t, op);
    lua_pushvalue(L, 1);
    return 1;
}

// dist.broadcast(t, src=0): t takes rank src's values (ranks count from 0, as RANK does); returns t.
int l_broadcast(lua_State * L) {
    Args a(L);
    at::Tensor & t = a.tensor(1, "tensor");
    int64_t src = a.opt_integer(2, "src", 0);
    a.finish();
    dist_broadcast(t, (int)src);
    lua_pushvalue(L, 1);
    return 1;
}

int l_barrier(lua_State * L) {
    dist_barrier();
    return 0;
}

int l_destroy(lua_State * L) {
    dist_destroy();
    return 0;
}

// Tensors from an array of tensors (or {name, tensor} pairs) or a Model's trainable parameters.
std::vector<at::Tensor> params_from_lua(lua_State * L, int idx) {
    std::vector<at::Tensor> out;
    if (luaL_testudata(L, idx, QATLAB_MODEL_MT)) {
        for (auto & [name, t] : nn_model_check(L, idx).named_parameters())
            if (t.requires_grad()) out.push_back(t);
        return out;
    }
    if (!lua_istable(L, idx)) bind_fail("expected an array of tensors or a Model, got %s", luaL_typename(L, idx));
    int n = (int)lua_objlen(L, idx);
    for (int i = 1; i <= n; i++) {
        lua_rawgeti(L, idx, i);
        at::Tensor * t = tensor_test(L, -1);
        if (!t && lua_istable(L, -1)) {
            lua_rawgeti(L, -1, 2);
            t = tensor_test(L, -1);
            lua_pop(L, 1);
        }
        if (!t) bind_fail("parameter %d is a %s, expected a Tensor", i, luaL_typename(L, -1));
        out.push_back(*t);
        lua_pop(L, 1);
    }
    return out;
}

// dist.ddp(params | model, {bucket_mb=25, find_unused=false, broadcast=true}) -> DDP
int l_ddp(lua_State * L) {
    dist_require_init("dist.ddp");
    Args a(L);
    if (!a.has(1, "params")) bind_fail("expected the parameters (an array of tensors or a Model)");
    std::vector<at::Tensor> params = params_from_lua(L, a.find(1, "params"));
    double mb = a.opt_number(2, "bucket_mb", 25);
    bool find_unused = a.opt_bool(3, "find_unused", false);
    bool broadcast = a.opt_bool(4, "broadcast", true);
    a.finish();
    if (!(mb > 0)) bind_fail("bucket_mb must be positive, got %g", mb);
    auto d = std::make_unique<DistDdp>(std::move(params), (int64_t)(mb * 1024 * 1024), find_unused, broadcast);
    udata_new<DdpUD>(L, QATLAB_DDP_MT, std::move(d));
    return 1;
}

// ddp:prepare_forward(): once per optimizer step, before the forward whose backward reduces.
int m_prepare_forward(lua_State * L) {
    ddp_check(L, 1).prepare_forward();
    return 0;
}

std::vector<at::Tensor> outputs_from_lua(lua_State * L, int idx) {
    std::vector<at::Tensor> out;
    if (lua_isnoneornil(L, idx)) return out;
    if (at::Tensor * t = tensor_test(L, idx)) return {*t};
    if (!lua_istable(L, idx)) bind_fail("expected the loss (a Tensor) or a table of outputs, got %s", luaL_typename(L, idx));
    for (int i = 1, n = (int)lua_objlen(L, idx); i <= n; i++) {
        lua_rawgeti(L, idx, i);
        if (at::Tensor * t = tensor_test(L, -1)) out.push_back(*t);
        lua_pop(L, 1);
    }
    return out;
}

// ddp:prepare_backward(loss | outputs): arms the reduction for the next backward.
int m_prepare_backward(lua_State * L) {
    DistDdp & d = ddp_check(L, 1);
    d.prepare_backward(outputs_from_lua(L, 2));
    return 0;
}

// ddp:backward(loss): prepare_backward(loss) then loss:backward(); .grad holds the world's mean.
int m_backward(lua_State * L) {
    DistDdp & d = ddp_check(L, 1);
    at::Tensor * loss = tensor_test(L, 2);
    if (!loss || !loss->defined()) bind_fail("expected the loss (a scalar Tensor), got %s", luaL_typename(L, 2));
    if (loss->numel() != 1) bind_fail("the loss must have one element, got %lld", (long long)loss->numel());
    d.prepare_backward({*loss});
    loss->backward();
    return 0;
}

int m_num_buckets(lua_State * L) {
    lua_pushinteger(L, (lua_Integer)ddp_check(L, 1).num_buckets());
    return 1;
}

int m_tostring(lua_State * L) {
    auto * u = udata_test<DdpUD>(L, 1, QATLAB_DDP_MT);
    lua_pushfstring(L, "DDP(world=%d, buckets=%d)", dist_initialized() ? dist_env().world : 1,
                    u && u->d ? (int)u->d->num_buckets() : 0);
    return 1;
}

const BindFn methods[] = {
    {"prepare_forward", m_prepare_forward},
    {"prepare_backward", m_prepare_backward},
    {"backward", m_backward},
    {"num_buckets", m_num_buckets},
    {nullptr, nullptr},
};

const BindFn functions[] = {
    {"init", l_init},
    {"rank", l_rank},
    {"world_size", l_world_size},
    {"local_rank", l_local_rank},
    {"is_main", l_is_main},
    {"is_initialized", l_is_initialized},
    {"info", l_info},
    {"all_reduce", l_all_reduce},
    {"broadcast", l_broadcast},
    {"barrier", l_barrier},
    {"destroy", l_destroy},
    {"ddp", l_ddp},
    {nullptr, nullptr},
};

} // namespace

int luaopen_dist(lua_State * L) {
    if (!dist_compiled()) return luaL_error(L, "require 'dist': %s", dist_missing_hint());
    udata_open_metatable<DdpUD>(L, QATLAB_DDP_MT, "DDP", methods, m_tostring);
    lua_pop(L, 1);
    // A registry-held userdata whose __gc leaves the group when the state closes.
    lua_newuserdata(L, 1);
    lua_newtable(L);
    lua_pushcfunction(L, sentinel_gc);
    lua_setfield(L, -2, "__gc");
    lua_setmetatable(L, -2);
    lua_setfield(L, LUA_REGISTRYINDEX, QATLAB_DIST_SENTINEL);
    lua_newtable(L);
    bind_register(L, -1, "dist.", functions);
    return 1;
}

} // namespace qatlab
