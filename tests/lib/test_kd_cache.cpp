// Tests for lib/kd_cache: a cache from a tiny random teacher equals the teacher's own top-k, resume gives
// identical bytes, a seed .pt cache written by PyTorch reads back, reader shuffles and errors.
#include "lib/kd_cache.h"
#include "lib/data.h"
#include "lib/model.h"
#include "lib/safetensors.h"
#include "test_util.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <set>
#include <string>
#include <vector>

#include <unistd.h>

namespace fs = std::filesystem;
using namespace qatlab;

namespace {

std::shared_ptr<DecoderModel> tiny_teacher(uint64_t seed = 0) {
    nlohmann::json j = {{"model_type", "qwen3"},        {"vocab_size", 97},         {"hidden_size", 32},
                        {"intermediate_size", 48},      {"num_hidden_layers", 2},   {"num_attention_heads", 4},
                        {"num_key_value_heads", 2},     {"head_dim", 16},           {"rms_norm_eps", 1e-6},
                        {"max_position_embeddings", 64}, {"tie_word_embeddings", true}, {"initializer_range", 0.5}};
    at::manual_seed(seed);
    return std::make_shared<DecoderModel>(decoder_config_parse(j.dump(), "test:teacher"));
}

at::Tensor tiny_ids(int64_t N, int64_t L) {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(123);
    return at::randint(97, {N, L}, gen, at::TensorOptions().dtype(at::kLong));
}

std::string file_bytes(const fs::path & p) {
    std::ifstream f(p, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(f), {});
}

std::string error_of(const std::function<void()> & f) {
    try {
        f();
    } catch (const std::exception & e) {
        return e.what();
    }
    return "";
}

CacheBuildOptions opts_for(const fs::path & dir) {
    CacheBuildOptions o;
    o.out_dir = dir.string();
    o.K = 5;
    o.R = 3;
    o.shard_size = 4;
    o.batch_size = 3;   // does not divide the shard size: batches never cross shards
    o.seed = 11;
    return o;
}

std::vector<CacheBatch> read_all(CacheReader & r) {
    std::vector<CacheBatch> out;
    while (auto b = r.next()) out.push_back(*b);
    return out;
}

} // namespace

TEST(KdCache, BuildMatchesTeacherTopK) {
    TestTempDir d{"qatlab_kd_"};
    auto teacher = tiny_teacher();
    at::Tensor ids = tiny_ids(10, 9);   // (N, L)
    int64_t calls = 0, last_done = 0;
    auto o = opts_for(d.dir());
    o.meta["teacher_model"] = "tiny";
    o.on_progress = [&](int64_t done, int64_t total, double sps) {
        calls++;
        EXPECT_EQ(total, 10);
        EXPECT_GT(done, last_done);
        EXPECT_GE(sps, 0);
        last_done = done;
    };
    CacheBuildResult r = cache_build(*teacher, ids, o);
    EXPECT_TRUE(r.done);
    EXPECT_EQ(r.n_written, 10);
    EXPECT_EQ(r.num_shards, 3);
    EXPECT_EQ(calls, 3);

    at::Tensor logits;
    {
        at::NoGradGuard ng;
        logits = teacher->forward(ids).narrow(1, 0, 8);   // (N, S, V)
    }
    auto [vals, idx] = logits.topk(5, -1);
    // Shards: 4 + 4 + 2 sequences, the seed's names, dtypes and shapes.
    std::vector<at::Tensor> ti, tl, ri, rl, in;
    for (int s = 0; s < 3; s++) {
        char name[64];
        std::snprintf(name, sizeof name, "shard_%05d.safetensors", s);
        auto f = safetensors_load(d.path(name));
        std::vector<std::string> names;
        for (auto & [k, t] : f.tensors) names.push_back(k);
        std::set<std::string> got(names.begin(), names.end());
        EXPECT_EQ(got, (std::set<std::string>{"input_ids", "attention_mask", "topk_idx", "topk_logits", "rand_idx",
                                              "rand_logits"}));
        std::map<std::string, at::Tensor> m(f.tensors.begin(), f.tensors.end());
        int64_t n = s < 2 ? 4 : 2;
        EXPECT_EQ(m["input_ids"].scalar_type(), at::kInt);
        EXPECT_EQ(m["attention_mask"].scalar_type(), at::kByte);
        EXPECT_EQ(m["topk_idx"].scalar_type(), at::kInt);
        EXPECT_EQ(m["topk_logits"].scalar_type(), at::kHalf);
        EXPECT_EQ(m["rand_idx"].scalar_type(), at::kInt);
        EXPECT_EQ(m["rand_logits"].scalar_type(), at::kHalf);
        EXPECT_EQ(m["topk_idx"].sizes(), at::IntArrayRef({n, 8, 5}));
        EXPECT_EQ(m["rand_idx"].sizes(), at::IntArrayRef({n, 8, 3}));
        EXPECT_TRUE(at::equal(m["attention_mask"], at::ones({n, 9}, at::kByte)));
        in.push_back(m["input_ids"]);
        ti.push_back(m["topk_idx"]);
        tl.push_back(m["topk_logits"]);
        ri.push_back(m["rand_idx"]);
        rl.push_back(m["rand_logits"]);
    }
    EXPECT_TRUE(at::equal(at::cat(in).to(at::kLong), ids));
    EXPECT_TRUE(at::equal(at::cat(ti).to(at::kLong), idx));
    EXPECT_TRUE(at::equal(at::cat(tl), vals.to(at::kHalf)));
    at::Tensor rand_idx = at::cat(ri).to(at::kLong);
    EXPECT_GE(rand_idx.min().item<int64_t>(), 0);
    EXPECT_LT(rand_idx.max().item<int64_t>(), 97);
    EXPECT_TRUE(at::equal(at::cat(rl), logits.gather(-1, rand_idx).to(at::kHalf)));
    // Sorted descending: index 0 is the argmax.
    EXPECT_TRUE(at::equal(at::cat(ti).select(2, 0).to(at::kLong), logits.argmax(-1)));

    nlohmann::json meta = nlohmann::json::parse(file_bytes(d.path("meta.json")));
    for (const char * k : {"format", "teacher_model", "tokenizer", "dataset_name", "dataset_config_name",
                           "dataset_split", "dataset_format", "dataset_text_field", "chat_thinking", "max_length",
                           "topk", "top_k", "rand_neg", "random_negatives", "num_sequences", "total_sequences",
                           "vocab_size", "transformers_version", "created_utc"})
        EXPECT_TRUE(meta.contains(k)) << k;
    EXPECT_EQ(meta["format"], "qwen_kd_topk_cache_v1");
    EXPECT_EQ(meta["max_length"], 9);
    EXPECT_EQ(meta["top_k"], 5);
    EXPECT_EQ(meta["vocab_size"], 97);
    EXPECT_EQ(meta["teacher_model"], "tiny");
    nlohmann::json prog = nlohmann::json::parse(file_bytes(d.path("progress.json")));
    EXPECT_EQ(prog, (nlohmann::json{{"n_written", 10}, {"next_shard_id", 3}, {"done", true}}));
}

TEST(KdCache, ResumeGivesIdenticalShards) {
    TestTempDir a{"qatlab_kd_"}, b{"qatlab_kd_"};
    auto teacher = tiny_teacher();
    at::Tensor ids = tiny_ids(10, 9);
    cache_build(*teacher, ids, opts_for(a.dir()));

    auto o = opts_for(b.dir());
    o.stop_after_shards = 1;   // the interruption
    CacheBuildResult r1 = cache_build(*teacher, ids, o);
    EXPECT_FALSE(r1.done);
    EXPECT_EQ(r1.n_written, 4);
    EXPECT_FALSE(fs::exists(b.path("shard_00001.safetensors")));
    nlohmann::json prog = nlohmann::json::parse(file_bytes(b.path("progress.json")));
    EXPECT_EQ(prog["next_shard_id"], 1);
    EXPECT_EQ(prog["done"], false);
    o.stop_after_shards = -1;
    CacheBuildResult r2 = cache_build(*teacher, ids, o);
    EXPECT_TRUE(r2.done);
    EXPECT_EQ(r2.shards_written, 2);
    for (int s = 0; s < 3; s++) {
        char name[64];
        std::snprintf(name, sizeof name, "shard_%05d.safetensors", s);
        EXPECT_EQ(file_bytes(a.path(name)), file_bytes(b.path(name))) << name;
    }
    EXPECT_EQ(file_bytes(a.path("progress.json")), file_bytes(b.path("progress.json")));
    // A finished cache: nothing more to do.
    EXPECT_EQ(cache_build(*teacher, ids, o).shards_written, 0);
    // Different data, or no resume: refused, naming meta.json.
    std::string e = error_of([&] { cache_build(*teacher, tiny_ids(10, 9) * 0, o); });
    EXPECT_NE(e.find("meta.json"), std::string::npos) << e;
    o.resume = false;
    e = error_of([&] { cache_build(*teacher, ids, o); });
    EXPECT_NE(e.find("meta.json"), std::string::npos) << e;
    o.overwrite = true;
    o.resume = true;
    EXPECT_EQ(cache_build(*teacher, ids, o).shards_written, 3);
}

TEST(KdCache, ReaderShufflesDeterministicallyAndCoversEpoch) {
    TestTempDir d{"qatlab_kd_"};
    auto teacher = tiny_teacher();
    at::Tensor ids = tiny_ids(10, 9);
    cache_build(*teacher, ids, opts_for(d.dir()));

    CacheReaderOptions ro;
    ro.batch_size = 3;
    ro.seed = 5;
    ro.prefetch = 2;
    CacheReader r1(d.dir(), ro), r2(d.dir(), ro);
    EXPECT_EQ(r1.meta().total_rows, 10);
    EXPECT_EQ(r1.batches_per_epoch(), 4);
    auto b1 = read_all(r1), b2 = read_all(r2);
    ASSERT_EQ(b1.size(), 4u);
    EXPECT_FALSE(r1.next().has_value());   // stays at the end until reset
    std::vector<at::Tensor> rows;
    for (size_t i = 0; i < b1.size(); i++) {
        EXPECT_EQ(b1[i].input_ids.size(0), i < 3 ? 3 : 1);
        EXPECT_TRUE(at::equal(b1[i].input_ids, b2[i].input_ids));
        EXPECT_TRUE(at::equal(b1[i].topk_logits, b2[i].topk_logits));
        EXPECT_EQ(b1[i].topk_idx.sizes(), at::IntArrayRef({b1[i].input_ids.size(0), 8, 5}));
        EXPECT_TRUE(b1[i].rand_idx.defined());
        rows.push_back(b1[i].input_ids);
    }
    // Every example exactly once: the shuffled rows are a permutation of the data's rows.
    at::Tensor got = at::cat(rows).to(at::kLong);
    auto order = r1.epoch_order(0);
    ASSERT_EQ(order.size(), 10u);
    std::set<std::pair<int64_t, int64_t>> uniq(order.begin(), order.end());
    EXPECT_EQ(uniq.size(), 10u);
    for (int64_t i = 0; i < 10; i++)
        EXPECT_TRUE(at::equal(got[i], ids[order[i].first * 4 + order[i].second])) << i;
    EXPECT_FALSE(at::equal(got, ids));   // actually shuffled

    // Another epoch: another order, again complete; reset(0) repeats epoch 0.
    r1.reset();
    EXPECT_EQ(r1.epoch(), 1);
    auto e1 = read_all(r1);
    std::vector<at::Tensor> rows1;
    for (auto & b : e1) rows1.push_back(b.input_ids);
    at::Tensor got1 = at::cat(rows1).to(at::kLong);
    EXPECT_FALSE(at::equal(got1, got));
    EXPECT_TRUE(at::equal(std::get<0>(got1.sum(1).sort()), std::get<0>(got.sum(1).sort())));
    r1.reset(0);
    EXPECT_TRUE(at::equal(r1.next()->input_ids, b1[0].input_ids));

    // Another seed: another order.
    ro.seed = 6;
    CacheReader r3(d.dir(), ro);
    EXPECT_FALSE(at::equal(r3.next()->input_ids, b1[0].input_ids) && at::equal(r3.next()->input_ids, b1[1].input_ids));

    // Unshuffled, drop_last, no negatives: the data in order.
    ro.shuffle = false;
    ro.drop_last = true;
    ro.with_rand = false;
    ro.batch_size = 4;
    CacheReader r4(d.dir(), ro);
    auto b4 = read_all(r4);
    ASSERT_EQ(b4.size(), 2u);
    EXPECT_FALSE(b4[0].rand_idx.defined());
    EXPECT_TRUE(at::equal(at::cat({b4[0].input_ids, b4[1].input_ids}).to(at::kLong), ids.narrow(0, 0, 8)));
}

TEST(KdCache, ReadsSeedPtCacheWrittenByPyTorch) {
    if (!test_python()) GTEST_SKIP() << "QATLAB_PYTHON not set";
    TestTempDir d{"qatlab_kd_"};
    // The seed's flush_shard layout: a plain dict, int32/uint8/int32/fp16/int32/fp16, values that are
    // exact in fp16 and recomputable here.
    std::string script = R"(import json, sys, torch
d = sys.argv[1]
L, K, R = 6, 4, 2
S = L - 1
for s, n in enumerate([5, 3]):
    base = s * 5
    rows = torch.arange(base, base + n).view(n, 1, 1)
    torch.save({
        'input_ids': (torch.arange(n * L).view(n, L) + base * L).to(torch.int32),
        'attention_mask': torch.ones(n, L, dtype=torch.uint8),
        'topk_idx': (rows * 100 + torch.arange(S * K).view(1, S, K)).to(torch.int32),
        'topk_logits': (rows + torch.arange(S * K).view(1, S, K) / 8).to(torch.float16),
        'rand_idx': (rows * 7 + torch.arange(S * R).view(1, S, R)).to(torch.int32),
        'rand_logits': (-rows - torch.arange(S * R).view(1, S, R) / 4).to(torch.float16),
    }, f'{d}/shard_{s:05d}.pt')
json.dump({'format': 'qwen_kd_topk_cache_v1', 'max_length': L, 'topk': K, 'top_k': K, 'rand_neg': R,
           'random_negatives': R, 'num_sequences': 8, 'vocab_size': 151936}, open(f'{d}/meta.json', 'w'))
)";
    std::ofstream(d.path("w.py")) << script;
    ASSERT_EQ(test_python_file(d.path("w.py"), {d.dir()}), 0);
    CacheReaderOptions ro;
    ro.batch_size = 8;
    ro.shuffle = false;
    CacheReader r(d.dir(), ro);
    EXPECT_EQ(r.meta().shards.size(), 2u);
    EXPECT_EQ(r.meta().R, 2);
    auto b = r.next();
    ASSERT_TRUE(b.has_value());
    EXPECT_FALSE(r.next().has_value());
    at::Tensor rows = at::cat({at::arange(0, 5), at::arange(5, 8)}).view({8, 1, 1});
    at::Tensor ids = at::cat({at::arange(30).view({5, 6}), at::arange(30, 48).view({3, 6})});
    EXPECT_EQ(b->input_ids.scalar_type(), at::kInt);
    EXPECT_EQ(b->topk_logits.scalar_type(), at::kHalf);
    EXPECT_TRUE(at::equal(b->input_ids.to(at::kLong), ids));
    EXPECT_TRUE(at::equal(b->attention_mask, at::ones({8, 6}, at::kByte)));
    EXPECT_TRUE(at::equal(b->topk_idx.to(at::kLong), rows * 100 + at::arange(20).view({1, 5, 4})));
    EXPECT_TRUE(at::equal(b->topk_logits, (rows + at::arange(20).view({1, 5, 4}) / 8.0).to(at::kHalf)));
    EXPECT_TRUE(at::equal(b->rand_idx.to(at::kLong), rows * 7 + at::arange(10).view({1, 5, 2})));
    EXPECT_TRUE(at::equal(b->rand_logits, (-rows - at::arange(10).view({1, 5, 2}) / 4.0).to(at::kHalf)));
}

TEST(KdCache, ErrorsNameTheFile) {
    TestTempDir d{"qatlab_kd_"};
    auto teacher = tiny_teacher();
    cache_build(*teacher, tiny_ids(10, 9), opts_for(d.dir()));
    CacheReaderOptions ro;
    // No meta.json.
    TestTempDir empty{"qatlab_kd_"};
    std::string e = error_of([&] { CacheReader r(empty.dir(), ro); });
    EXPECT_NE(e.find("meta.json"), std::string::npos) << e;
    // meta.json disagrees with the shards: names the shard and the tensor.
    std::string meta = file_bytes(d.path("meta.json"));
    nlohmann::json m = nlohmann::json::parse(meta);
    m["topk"] = 6;
    std::ofstream(d.path("meta.json")) << m.dump();
    e = error_of([&] { CacheReader r(d.dir(), ro); });
    EXPECT_NE(e.find("shard_00000.safetensors"), std::string::npos) << e;
    EXPECT_NE(e.find("topk_idx"), std::string::npos) << e;
    // Broken meta.json.
    std::ofstream(d.path("meta.json")) << "{broken";
    e = error_of([&] { CacheReader r(d.dir(), ro); });
    EXPECT_NE(e.find("meta.json"), std::string::npos) << e;
    // A shard that vanishes after open: the loader thread's error reaches next(), naming the file.
    std::ofstream(d.path("meta.json")) << meta;
    {
        CacheReaderOptions o1;
        o1.shuffle = false;
        o1.batch_size = 1;
        o1.prefetch = 1;
        CacheReader r(d.dir(), o1);
        fs::path moved = d.path("moved.bin");
        fs::rename(d.path("shard_00002.safetensors"), moved);
        e = error_of([&] { while (r.next()) {} });
        EXPECT_NE(e.find("shard_00002.safetensors"), std::string::npos) << e;
        EXPECT_FALSE(r.next().has_value());
        fs::rename(moved, d.path("shard_00002.safetensors"));
    }
    // A corrupt (truncated) shard.
    std::string bytes = file_bytes(d.path("shard_00001.safetensors"));
    std::ofstream(d.path("shard_00001.safetensors"), std::ios::binary) << bytes.substr(0, bytes.size() / 2);
    e = error_of([&] { CacheReader r(d.dir(), ro); });
    EXPECT_NE(e.find("shard_00001.safetensors"), std::string::npos) << e;
}

TEST(KdCache, MetaRecordsTeacherAndRefusesOtherVocabulary) {
    TestTempDir t{"qatlab_kdmeta_"};
    auto teacher = tiny_teacher();
    CacheBuildOptions o = opts_for(t.path("c"));
    ASSERT_TRUE(cache_build(*teacher, tiny_ids(6, 5), o).done);
    CacheMeta m = cache_meta_load(t.path("c"));
    EXPECT_EQ(m.teacher_model, "qwen3 (2 layers, hidden 32, vocab 97)");
    EXPECT_EQ(m.teacher_fingerprint, model_fingerprint(*teacher));
    EXPECT_EQ(m.teacher_fingerprint.rfind("qwen3 L2 H32 V97 fnv1a:", 0), 0u) << m.teacher_fingerprint;
    EXPECT_NE(model_fingerprint(*tiny_teacher(1)), m.teacher_fingerprint);   // same shape, other weights
    cache_check_model(m, *teacher);
    nlohmann::json j = {{"model_type", "qwen3"},   {"vocab_size", 101},       {"hidden_size", 32},
                        {"intermediate_size", 48}, {"num_hidden_layers", 1},  {"num_attention_heads", 4},
                        {"num_key_value_heads", 2}, {"head_dim", 16}};
    DecoderModel other(decoder_config_parse(j.dump(), "test:other"));
    std::string e = error_of([&] { cache_check_model(m, other, "the student"); });
    EXPECT_NE(e.find("meta.json: vocab_size: the cache's teacher (qwen3 (2 layers, hidden 32, vocab 97)) has 97 tokens, "
                     "the student has 101"),
              std::string::npos) << e;
    // Resume with another teacher of the same shape: refused by the fingerprint.
    e = error_of([&] { cache_build(*tiny_teacher(1), tiny_ids(6, 5), o); });
    EXPECT_NE(e.find("teacher_fingerprint"), std::string::npos) << e;
    m.vocab_size = 0;   // an older cache that records nothing: every check passes
    cache_check_model(m, other);
}
