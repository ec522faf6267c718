// data: text corpora (files, folders, JSONL, alpaca instruction data in the seed's thinking modes),
// the seed's packing, seeded shuffles and splits, parameter-golf token shards, the KJV corpus.
#pragma once
#include <ATen/core/Tensor.h>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace qatlab {

class Tokenizer;

// -- text sources ----------------------------------------------------------------------------
// A file gives one text (its bytes as they are); a folder gives one text per regular file,
// recursively, in sorted path order. Throws "<path>: ..." when missing or unreadable.
std::vector<std::string> data_read_text(const std::string & path);

// JSONL, one object per line (blank lines skipped): the string under `field`, stripped of
// surrounding whitespace as the seed's "plain" format does. Errors name "<path>:<line>: <field>".
std::vector<std::string> data_read_jsonl(const std::string & path, const std::string & field = "text");

// -- alpaca instruction data -------------------------------------------------------------------
struct AlpacaExample {
    std::string instruction, input, output;
};
// A JSON array of objects (the alpaca_data.json layout) or JSONL; `input` may be absent.
std::vector<AlpacaExample> data_read_alpaca_examples(const std::string & path);

// The seed's texts for one example (docs/formulas.md §10, build_alpaca_messages + _chat_text_variants):
// user = instruction (+ "\n\n" + input when the input is non-empty), assistant = output stripped,
// rendered with the Qwen3 chat format, no generation prompt. thinking:
//   "false": enable_thinking=False, then <think>…</think> blocks and the whitespace after
//            them removed (so no think block at all);
//   "true":  enable_thinking=True, Hugging Face's output (an empty "<think>\n\n</think>\n\n"
//            before the answer);
//   "both":  the false variant, then the true one;
//   "none":  the raw contents (instruction, non-empty input, output) joined with "\n\n";
//   "all":   true, false, then raw.
// Throws for any other mode.
std::vector<std::string> data_alpaca_render(const AlpacaExample & ex, const std::string & thinking);
std::vector<std::string> data_read_alpaca(const std::string & path, const std::string & thinking = "false");

// -- packing ---------------------------------------------------------------------------------
// The seed's PackedTokenStream: each text tokenized without special tokens, `eos` appended,
// everything concatenated, cut into consecutive blocks of L tokens; the final partial block
// is dropped (documents straddle blocks, no attention reset). Returns int64 (N, L).
// eos < 0 takes the tokenizer's eos id (an error when it has none).
at::Tensor data_pack(const Tokenizer & tk, const std::vector<std::string> & texts, int64_t L, int64_t eos = -1);
// The same over already-tokenized documents.
at::Tensor data_pack_ids(const std::vector<std::vector<int64_t>> & docs, int64_t L, int64_t eos);

// -- shuffling and splits ----------------------------------------------------------------------
// A permutation of 0..n-1 by Fisher-Yates over std::mt19937_64(seed) with unbiased rejection
// sampling (not std::uniform_int_distribution, whose output differs between libraries), so the
// order is the same on every platform and build.
std::vector<int64_t> data_permutation(int64_t n, uint64_t seed);
// Rows of t (dim 0) in data_permutation(t.size(0), seed) order.
at::Tensor data_shuffle(const at::Tensor & t, uint64_t seed);
// (train, held_out): a seeded shuffle of the rows, the last round(fraction * N) rows held out
// (at least one row when fraction > 0 and N > 1; never all rows).
std::pair<at::Tensor, at::Tensor> data_split(const at::Tensor & t, double fraction, uint64_t seed);

// -- parameter-golf token shards (docs/formulas.md §10) ------------------------------------------
// Header: 256 little-endian int32, [0] = 20240520 (magic), [1] = 1 (version), [2] = token count;
// then the tokens as little-endian uint16. File size = 1024 + 2 * count.
constexpr int32_t GOLF_SHARD_MAGIC = 20240520;
constexpr int32_t GOLF_SHARD_VERSION = 1;
// Writes any integer tensor (flattened) atomically (temp name, rename); every id must lie in
// [0, 65535]. Throws "<path>: ..." otherwise.
void data_shard_write(const std::string & path, const at::Tensor & tokens);
// Reads and validates (size, magic, version, count); returns int64 (count). Errors name the file.
at::Tensor data_shard_read(const std::string & path);

// -- the King James Bible ----------------------------------------------------------------------
// The default real corpus: the Debian package `bible-kjv` (public domain text; installed by
// tools/setup.sh). Its `bible` CLI prints every verse with `bible -f "Gen1:1-Rev22:21"`, one
// verse per line as "Ge1:1 In the beginning ..."; the reference is removed here, leaving one
// verse per line (~4.3 MB, 31,102 lines). The text is cached at <cache_dir>/kjv.txt (written to
// a temporary name and renamed) and read from there afterwards. Returns the path of the text.
std::string data_kjv_path(const std::string & cache_dir = ".cache/corpora");

} // namespace qatlab
