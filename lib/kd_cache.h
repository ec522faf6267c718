// kd_cache: the seed's KD top-k cache (docs/formulas.md §5): a resumable builder writing safetensors shards
// with the seed's tensor names, dtypes and meta.json, and a prefetching reader of ours and the seed's .pt.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

namespace qatlab {

class DecoderModel;
class Tokenizer;

// -- builder ---------------------------------------------------------------------------------
struct CacheBuildOptions {
    std::string out_dir;
    int64_t K = 32;            // top-k per position
    int64_t R = 0;             // uniform random negatives per position (with replacement)
    int64_t shard_size = 1024; // sequences per shard (the last shard holds the remainder)
    int64_t batch_size = 8;    // teacher forward batch
    uint64_t seed = 0;         // random negatives of shard i come from a CPU generator seeded
                               // with cache_shard_seed(seed, i): resuming changes nothing
    bool resume = true;        // continue after progress.json; false with an existing cache: error
    bool overwrite = false;    // remove an existing cache first
    int64_t stop_after_shards = -1;   // >= 0: return after writing this many shards (tests)
    // meta.json strings the seed records (teacher_model, tokenizer, dataset_name, dataset_format,
    // chat_thinking, ...); missing ones are written as null (or "" for strings the seed always has).
    std::map<std::string, std::string> meta;
    // What the cache was built from, recorded in meta.json: teacher_model (meta's, else a summary
    // of the teacher's config), teacher_fingerprint, and with a tokenizer: tokenizer (tokenizer_name,
    // else its kind), tokenizer_vocab_size, tokenizer_fingerprint. Resume refuses another teacher.
    const Tokenizer * tokenizer = nullptr;
    std::string tokenizer_name;
    // Called after each shard: sequences done (cumulative), total, sequences/s of this run.
    std::function<void(int64_t, int64_t, double)> on_progress;
};

struct CacheBuildResult {
    int64_t n_written = 0;     // sequences in the cache
    int64_t shards_written = 0;// by this run
    int64_t num_shards = 0;    // in the cache so far
    bool done = false;
    double seconds = 0, seq_per_s = 0;   // this run
};

// Teacher forward over ids (N, L) integer: logits (B, L, V) sliced to positions 0..L-2
// (S = L-1; position t predicts token t+1), top-K sorted descending (index 0 = argmax), raw
// logits stored fp16. Dtype: the teacher's own when it is half/bf16; an fp32 teacher runs under
// bf16 autocast on CUDA and in fp32 on the CPU. Files: shard_00000.safetensors ... (input_ids
// int32 [n,L], attention_mask uint8 [n,L] all ones, topk_idx int32 [n,S,K], topk_logits fp16
// [n,S,K], rand_idx int32 [n,S,R], rand_logits fp16 [n,S,R] when R > 0), meta.json (written first,
// atomically) and progress.json {n_written, next_shard_id, done} replaced atomically per shard.
CacheBuildResult cache_build(DecoderModel & teacher, const at::Tensor & ids, const CacheBuildOptions & opts);

// The generator seed of shard i (splitmix64 of seed and i).
uint64_t cache_shard_seed(uint64_t seed, int64_t shard);

// "<model_type> L<layers> H<hidden> V<vocab> fnv1a:<hash of the architecture and the first
// embedding rows>": tells teachers apart (another checkpoint of one architecture too), cheaply.
std::string model_fingerprint(DecoderModel & m);
// "V<vocab size> fnv1a:<hash of every token's bytes and special flag, in id order>".
std::string tokenizer_fingerprint(const Tokenizer & tk);

// -- meta ------------------------------------------------------------------------------------
struct CacheMeta {
    std::string dir;
    int64_t L = 0, K = 0, R = 0, vocab_size = 0, num_sequences = 0;
    // What it was built from ("" / 0 when an older cache does not say).
    std::string teacher_model, teacher_fingerprint, tokenizer, tokenizer_fingerprint;
    int64_t tokenizer_vocab_size = 0;
    std::string json;                   // meta.json text
    std::vector<std::string> shards;    // sorted shard_*.safetensors, else sorted *.pt
    std::vector<int64_t> shard_rows;    // sequences per shard
    int64_t total_rows = 0;
};
// Reads meta.json (max_length, topk, rand_neg; format qwen_kd_topk_cache_v1) and validates every
// shard's tensor names, dtypes and shapes against it. Errors: "<file>: <tensor>: expected ..., got ...".
CacheMeta cache_meta_load(const std::string & dir);

// Refuse to read a cache with a model whose vocabulary size differs from the teacher's (meta.json
// vocab_size), or with a tokenizer whose size or fingerprint differs from the one recorded:
// "<dir>/meta.json: vocab_size: the cache's teacher has 49152 tokens, <what> has 151936". A
// cache that records nothing passes.
void cache_check_model(const CacheMeta & meta, const DecoderModel & m, const std::string & what = "the model");
void cache_check_tokenizer(const CacheMeta & meta, const Tokenizer & tk, const std::string & what = "the tokenizer");

// One shard's tensors: input_ids, attention_mask, topk_idx, topk_logits [, rand_idx, rand_logits],
// CPU, views of a memory mapping. Validated against meta (rows = 0 when unknown).
std::map<std::string, at::Tensor> cache_shard_load(const std::string & path, const CacheMeta & meta);

// -- reader ----------------------------------------------------------------------------------
struct CacheBatch {
    // The seed's dtypes: int32 [B,L], uint8 [B,L], int32 [B,S,K], fp16 [B,S,K], int32/fp16 [B,S,R].
    at::Tensor input_ids, attention_mask, topk_idx, topk_logits, rand_idx, rand_logits;
};

struct CacheReaderOptions {
    int64_t batch_size = 8;
    bool shuffle = true;        // shard order and rows within a shard, per epoch
    uint64_t seed = 0;          // epoch e uses data_permutation seeds derived from (seed, e)
    c10::Device device = c10::kCPU;   // CUDA: pinned staging and non_blocking copies
    int64_t prefetch = 2;       // batches queued ahead by the loader thread
    bool drop_last = false;     // drop the epoch's final short batch
    bool with_rand = true;      // yield rand_idx / rand_logits when the cache has them
};

// A stream of batches over every row once per epoch. A background thread loads shards (only the
// current one is mapped; its rows are gathered into fresh batch tensors), and keeps at most
// `prefetch` batches queued. Batches span shard boundaries, so every batch but the last of an
// epoch has batch_size rows.
class CacheReader {
public:
    CacheReader(const std::string & dir, const CacheReaderOptions & opts);
    ~CacheReader();
    CacheReader(const CacheReader &) = delete;
    CacheReader & operator=(const CacheReader &) = delete;
    // The next batch, or nullopt at the end of the epoch (until reset). Loader errors rethrow here.
    std::optional<CacheBatch> next();
    // Starts epoch `epoch` (default: the next one) from its beginning.
    void reset(std::optional<int64_t> epoch = std::nullopt);
    const CacheMeta & meta() const { return meta_; }
    int64_t epoch() const { return epoch_; }
    int64_t batches_per_epoch() const;
    // The shard order and (shard, row) order of epoch e (what the loader follows; for tests).
    std::vector<std::pair<int64_t, int64_t>> epoch_order(int64_t epoch) const;

private:
    struct Item {
        std::optional<CacheBatch> batch;   // nullopt: end of epoch
        std::exception_ptr error;
    };
    void start();
    void stop();
    void loader_run(int64_t epoch);
    bool queue_push(Item item);

    CacheMeta meta_;
    CacheReaderOptions opts_;
    int64_t epoch_ = 0;
    bool ended_ = false;
    std::thread thread_;
    std::mutex mu_;
    std::condition_variable cv_;
    std::deque<Item> queue_;
    bool stopping_ = false;
};

} // namespace qatlab
