// kd_cache: the KD cache part of the `kd` Lua module (kd.cpp creates the table and calls kd_open_cache):
// kd.build_cache{...} over lib/kd_cache's builder, kd.open_cache(dir, {...}) returning a batch iterator.
#include "bindings/bind.h"

#include "lib/kd_cache.h"
#include "lib/model.h"
#include "lib/tokenizer.h"

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <memory>

namespace qatlab {

std::string tokenizer_source(lua_State * L, int idx);   // bindings/tokenizers.cpp

namespace {


struct ReaderUd {
    std::unique_ptr<CacheReader> r;   // reset by __gc and :close()
};

CacheReader & reader_check(lua_State * L) {
    ReaderUd & ud = udata_check<ReaderUd>(L, 1, QATLAB_KD_READER_MT, "a KD cache reader");
    if (!ud.r) bind_fail("self: the reader was closed");
    return *ud.r;
}

// kd.build_cache{teacher=, data=(N,L), K=32, R=0, shard_size=1024, batch_size=8, out=, seed=0,
//                resume=true, overwrite=false, meta={teacher_model=...}, tokenizer=tk,
//                on_progress=fn(done, total, seq_per_s)}
// meta.json records the teacher (meta.teacher_model, else a summary of its config; a fingerprint)
// and, given tokenizer=, the tokenizer (its path, vocabulary size and fingerprint).
// -> {n_written, shards_written, num_shards, done, seconds, seq_per_s}
int f_build_cache(lua_State * L) {
    if (!is_options_table(L, 1)) bind_fail("argument #1: expected a table {teacher=, data=, out=, ...}");
    Args a(L);
    int ti = a.find(0, "teacher");
    if (!ti) bind_fail("option 'teacher': expected an nn model");
    DecoderModel & teacher = nn_model_check(L, ti);
    at::Tensor ids = a.tensor(0, "data");
    CacheBuildOptions o;
    o.out_dir = a.opt_string(0, "out", "");
    if (o.out_dir.empty()) bind_fail("option 'out': expected the output folder");
    o.K = a.opt_integer(0, "K", 32);
    o.R = a.opt_integer(0, "R", 0);
    o.shard_size = a.opt_integer(0, "shard_size", 1024);
    o.batch_size = a.opt_integer(0, "batch_size", 8);
    int64_t seed = a.opt_integer(0, "seed", 0);
    if (seed < 0) bind_fail("option 'seed': expected >= 0");
    o.seed = uint64_t(seed);
    o.resume = a.opt_bool(0, "resume", true);
    o.overwrite = a.opt_bool(0, "overwrite", false);
    o.stop_after_shards = a.opt_integer(0, "stop_after_shards", -1);
    if (int mi = a.find(0, "meta")) {
        if (lua_type(L, mi) != LUA_TTABLE) bind_fail("option 'meta': expected a table of strings");
        lua_pushnil(L);
        while (lua_next(L, mi)) {
            if (lua_type(L, -2) != LUA_TSTRING || lua_type(L, -1) != LUA_TSTRING)
                bind_fail("option 'meta': expected string keys and string values");
            o.meta[lua_tostring(L, -2)] = lua_tostring(L, -1);
            lua_pop(L, 1);
        }
    }
    if (int ki = a.find(0, "tokenizer")) {
        o.tokenizer = &tokenizer_check(L, ki);
        o.tokenizer_name = tokenizer_source(L, ki);
    }
    int pi = a.find(0, "on_progress");
    if (pi && lua_type(L, pi) != LUA_TFUNCTION) bind_fail("option 'on_progress': expected a function");
    a.finish();
    std::string cb_error;
    if (pi) {
        o.on_progress = [L, pi, &cb_error](int64_t done, int64_t total, double sps) {
            lua_pushvalue(L, pi);
            lua_pushnumber(L, lua_Number(done));
            lua_pushnumber(L, lua_Number(total));
            lua_pushnumber(L, sps);
            if (bind_pcall(L, 3, 0) != 0) {
                cb_error = lua_tostring(L, -1) ? lua_tostring(L, -1) : "error in on_progress";
                lua_pop(L, 1);
                throw std::runtime_error("on_progress: " + cb_error);
            }
        };
    }
    CacheBuildResult r = cache_build(teacher, ids, o);
    lua_createtable(L, 0, 6);
    lua_pushnumber(L, lua_Number(r.n_written));
    lua_setfield(L, -2, "n_written");
    lua_pushnumber(L, lua_Number(r.shards_written));
    lua_setfield(L, -2, "shards_written");
    lua_pushnumber(L, lua_Number(r.num_shards));
    lua_setfield(L, -2, "num_shards");
    lua_pushboolean(L, r.done);
    lua_setfield(L, -2, "done");
    lua_pushnumber(L, r.seconds);
    lua_setfield(L, -2, "seconds");
    lua_pushnumber(L, r.seq_per_s);
    lua_setfield(L, -2, "seq_per_s");
    return 1;
}

// The model= and tokenizer= options of open_cache and reader:check: errors when they do not
// match what meta.json records (vocabulary size; tokenizer fingerprint).
void check_against(lua_State * L, Args & a, const CacheMeta & meta) {
    if (int mi = a.find(0, "model")) cache_check_model(meta, nn_model_check(L, mi), "option 'model'");
    if (int ki = a.find(0, "tokenizer")) cache_check_tokenizer(meta, tokenizer_check(L, ki), "option 'tokenizer'");
}

// kd.open_cache(dir, {batch_size=8, shuffle=true, seed=0, device=, prefetch=2, drop_last=false,
//                     with_rand=true, model=, tokenizer=}) -> reader; model / tokenizer: checked
//                     against the teacher and tokenizer the cache records
int f_open_cache(lua_State * L) {
    Args a(L);
    int di = a.find(1, "dir");
    if (!di || lua_type(L, di) != LUA_TSTRING) bind_fail("argument #1 (dir): expected the cache folder");
    std::string dir = lua_tostring(L, di);
    CacheReaderOptions o;
    o.batch_size = a.opt_integer(0, "batch_size", 8);
    o.shuffle = a.opt_bool(0, "shuffle", true);
    int64_t seed = a.opt_integer(0, "seed", 0);
    if (seed < 0) bind_fail("option 'seed': expected >= 0");
    o.seed = uint64_t(seed);
    o.device = default_device();
    a.opt_device(0, "device", o.device);
    o.prefetch = a.opt_integer(0, "prefetch", 2);
    o.drop_last = a.opt_bool(0, "drop_last", false);
    o.with_rand = a.opt_bool(0, "with_rand", true);
    int mi = a.find(0, "model"), ki = a.find(0, "tokenizer");
    a.finish();
    if (o.batch_size < 1) bind_fail("option 'batch_size': expected >= 1");
    if (mi || ki) {   // before the loader thread starts
        CacheMeta meta = cache_meta_load(dir);
        if (mi) cache_check_model(meta, nn_model_check(L, mi), "option 'model'");
        if (ki) cache_check_tokenizer(meta, tokenizer_check(L, ki), "option 'tokenizer'");
    }
    auto r = std::make_unique<CacheReader>(dir, o);
    udata_new<ReaderUd>(L, QATLAB_KD_READER_MT, std::move(r));
    return 1;
}

// reader:next() -> {input_ids=, attention_mask=, topk_idx=, topk_logits=[, rand_idx=, rand_logits=]} or nil
int m_next(lua_State * L) {
    CacheReader & r = reader_check(L);
    std::optional<CacheBatch> b = r.next();
    if (!b) {
        lua_pushnil(L);
        return 1;
    }
    lua_createtable(L, 0, 6);
    tensor_push(L, b->input_ids);
    lua_setfield(L, -2, "input_ids");
    tensor_push(L, b->attention_mask);
    lua_setfield(L, -2, "attention_mask");
    tensor_push(L, b->topk_idx);
    lua_setfield(L, -2, "topk_idx");
    tensor_push(L, b->topk_logits);
    lua_setfield(L, -2, "topk_logits");
    if (b->rand_idx.defined()) {
        tensor_push(L, b->rand_idx);
        lua_setfield(L, -2, "rand_idx");
        tensor_push(L, b->rand_logits);
        lua_setfield(L, -2, "rand_logits");
    }
    return 1;
}

// reader:reset([epoch]): the next epoch (or the given one, 0-based) from its start
int m_reset(lua_State * L) {
    CacheReader & r = reader_check(L);
    Args a(L, 2);
    const bool given = a.has(1, "epoch");
    int64_t epoch = a.opt_integer(1, "epoch", 0);
    a.finish();
    if (given && epoch < 0) a.fail(1, "epoch", "expected >= 0 (0-based), got %lld", (long long)epoch);
    if (given) r.reset(epoch);
    else r.reset();
    return 0;
}

// reader:meta() -> meta.json as a table, plus shards, shard_rows, total_rows, epoch, batches_per_epoch
int m_meta(lua_State * L) {
    CacheReader & r = reader_check(L);
    const CacheMeta & m = r.meta();
    json_push(L, nlohmann::json::parse(m.json));
    lua_createtable(L, int(m.shards.size()), 0);
    for (size_t i = 0; i < m.shards.size(); i++) {
        lua_pushstring(L, m.shards[i].c_str());
        lua_rawseti(L, -2, int(i) + 1);
    }
    lua_setfield(L, -2, "shards");
    lua_createtable(L, int(m.shard_rows.size()), 0);
    for (size_t i = 0; i < m.shard_rows.size(); i++) {
        lua_pushnumber(L, lua_Number(m.shard_rows[i]));
        lua_rawseti(L, -2, int(i) + 1);
    }
    lua_setfield(L, -2, "shard_rows");
    lua_pushnumber(L, lua_Number(m.total_rows));
    lua_setfield(L, -2, "total_rows");
    lua_pushnumber(L, lua_Number(r.epoch()));
    lua_setfield(L, -2, "epoch");
    lua_pushnumber(L, lua_Number(r.batches_per_epoch()));
    lua_setfield(L, -2, "batches_per_epoch");
    return 1;
}

// reader:check{model=, tokenizer=}: errors when they do not match the cache's teacher/tokenizer
int m_check(lua_State * L) {
    CacheReader & r = reader_check(L);
    Args a(L, 2);
    check_against(L, a, r.meta());
    a.finish();
    return 0;
}

// reader:close(): stops the loader thread and unmaps the shard now
int m_close(lua_State * L) {
    udata_check<ReaderUd>(L, 1, QATLAB_KD_READER_MT, "a KD cache reader").r.reset();
    return 0;
}

int reader_tostring(lua_State * L) {
    auto * ud = udata_test<ReaderUd>(L, 1, QATLAB_KD_READER_MT);
    if (!ud || !ud->r) {
        lua_pushliteral(L, "KdCacheReader (closed)");
    } else {
        const CacheMeta & m = ud->r->meta();
        lua_pushfstring(L, "KdCacheReader(%s: %d sequences, L=%d, K=%d, R=%d)", m.dir.c_str(), int(m.total_rows),
                        int(m.L), int(m.K), int(m.R));
    }
    return 1;
}

const BindFn reader_methods[] = {
    {"next", m_next}, {"reset", m_reset}, {"meta", m_meta}, {"check", m_check}, {"close", m_close}, {nullptr, nullptr},
};

const BindFn cache_functions[] = {
    {"build_cache", f_build_cache},
    {"open_cache", f_open_cache},
    {nullptr, nullptr},
};

} // namespace

// For kd.cpp: when the value at `idx` is a KD cache reader, refuse a model whose vocabulary size
// differs from the cache's teacher (no-op for other values: arrays of batches, iterators).
void kd_cache_check_reader(lua_State * L, int idx, const DecoderModel & m) {
    auto * ud = udata_test<ReaderUd>(L, idx, QATLAB_KD_READER_MT);
    if (ud && ud->r) cache_check_model(ud->r->meta(), m, "the model");
}

void kd_open_cache(lua_State * L, int t) {
    t = t < 0 ? lua_gettop(L) + t + 1 : t;
    udata_open_metatable<ReaderUd>(L, QATLAB_KD_READER_MT, "KdCacheReader", reader_methods, reader_tostring);
    lua_pop(L, 1);
    bind_register(L, t, "kd.", cache_functions);
}

} // namespace qatlab
