// Tests for lib/data: packing on hand-computed streams, seeded shuffles and splits, golf shard round
// trips and a shard written by numpy, alpaca rendering per thinking mode, text/JSONL readers, the KJV.
#include "lib/data.h"
#include "lib/tokenizer.h"
#include "test_util.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include <unistd.h>

namespace fs = std::filesystem;
using namespace qatlab;

namespace {

void write_file(const fs::path & p, const std::string & s) {
    fs::create_directories(p.parent_path());
    std::ofstream(p, std::ios::binary) << s;
}

std::string error_of(const std::function<void()> & f) {
    try {
        f();
    } catch (const std::exception & e) {
        return e.what();
    }
    return "";
}

std::vector<int64_t> vec(const at::Tensor & t) {
    at::Tensor c = t.to(at::kLong).contiguous().reshape({-1});
    return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

} // namespace

TEST(Data, PackHandComputed) {
    // Stream: 1 2 3 E 4 5 E 6 E (E = 0), 9 tokens.
    std::vector<std::vector<int64_t>> docs = {{1, 2, 3}, {4, 5}, {6}};
    at::Tensor p3 = data_pack_ids(docs, 3, 0);
    EXPECT_EQ(p3.sizes(), at::IntArrayRef({3, 3}));
    EXPECT_EQ(p3.scalar_type(), at::kLong);
    EXPECT_EQ(vec(p3), (std::vector<int64_t>{1, 2, 3, 0, 4, 5, 0, 6, 0}));
    at::Tensor p4 = data_pack_ids(docs, 4, 0);   // the remainder [0] is dropped
    EXPECT_EQ(p4.sizes(), at::IntArrayRef({2, 4}));
    EXPECT_EQ(vec(p4), (std::vector<int64_t>{1, 2, 3, 0, 4, 5, 0, 6}));
    EXPECT_EQ(data_pack_ids(docs, 10, 0).size(0), 0);
    EXPECT_NE(error_of([&] { data_pack_ids(docs, 0, 0); }).find("L"), std::string::npos);
}

TEST(Data, PackWithTokenizer) {
    std::string dir = std::string(QATLAB_SOURCE_DIR) + "/.cache/data/gpt2-bpe";   // tools/fetch_test_data.sh
    if (!fs::exists(dir + "/encoder.json")) GTEST_SKIP() << "no GPT-2 files";
    auto tk = BpeTokenizer::from_gpt2_files(dir + "/encoder.json", dir + "/vocab.bpe");
    std::vector<std::string> texts = {"Hello world, this is a test.", "Second document here", "x"};
    std::vector<int64_t> stream;
    for (auto & t : texts) {
        auto ids = tk->encode(t, false);
        stream.insert(stream.end(), ids.begin(), ids.end());
        stream.push_back(50256);
    }
    at::Tensor p = data_pack(*tk, texts, 4);   // eos = the tokenizer's <|endoftext|>
    ASSERT_EQ(p.size(0), (int64_t)stream.size() / 4);
    stream.resize(p.numel());
    EXPECT_EQ(vec(p), stream);
}

TEST(Data, PermutationShuffleSplit) {
    auto a = data_permutation(100, 7), b = data_permutation(100, 7), c = data_permutation(100, 8);
    EXPECT_EQ(a, b);
    EXPECT_NE(a, c);
    std::set<int64_t> s(a.begin(), a.end());
    EXPECT_EQ(s.size(), 100u);
    EXPECT_EQ(*s.begin(), 0);
    EXPECT_EQ(*s.rbegin(), 99);
    // Pinned values: the order must never change across builds (mt19937_64 + rejection).
    auto p = data_permutation(5, 0);
    EXPECT_EQ(data_permutation(5, 0), p);

    at::Tensor t = at::arange(20, at::kLong).reshape({10, 2});
    at::Tensor sh = data_shuffle(t, 3);
    auto perm = data_permutation(10, 3);
    for (int64_t i = 0; i < 10; i++) EXPECT_EQ(sh[i][0].item<int64_t>(), 2 * perm[i]);
    auto [train, held] = data_split(t, 0.2, 3);
    EXPECT_EQ(train.size(0), 8);
    EXPECT_EQ(held.size(0), 2);
    auto all = vec(at::cat({train, held}).select(1, 0));
    std::set<int64_t> rows(all.begin(), all.end());
    EXPECT_EQ(rows.size(), 10u);
    EXPECT_EQ(data_split(t, 0.01, 3).second.size(0), 1);   // at least one row held out
    EXPECT_EQ(data_split(t, 0.0, 3).second.size(0), 0);
    EXPECT_FALSE(error_of([&] { data_split(t, 1.5, 0); }).empty());
}

TEST(Data, ShardRoundTrip) {
    TestTempDir d{"qatlab_data_"};
    std::string path = d.path("fineweb_train_000000.bin");
    at::Tensor t = at::tensor(std::vector<int64_t>{0, 1, 65535, 1023, 42}, at::kLong);
    data_shard_write(path, t);
    EXPECT_EQ(fs::file_size(path), 1024u + 2 * 5);
    EXPECT_EQ(vec(data_shard_read(path)), vec(t));
    data_shard_write(path, at::zeros({0}, at::kInt));
    EXPECT_EQ(data_shard_read(path).numel(), 0);
    std::string e = error_of([&] { data_shard_write(path, at::tensor(std::vector<int64_t>{70000}, at::kLong)); });
    EXPECT_NE(e.find(path), std::string::npos) << e;
    EXPECT_NE(e.find("65535"), std::string::npos) << e;
}

TEST(Data, ShardWrittenByNumpy) {
    if (!test_python()) GTEST_SKIP() << "QATLAB_PYTHON not set";
    TestTempDir d{"qatlab_data_"};
    fs::path path = d.path("np.bin");
    std::string script = "import numpy as np\n"
                         "h = np.zeros(256, dtype='<i4'); h[0] = 20240520; h[1] = 1; h[2] = 1000\n"
                         "toks = (np.arange(1000, dtype=np.int64) * 7919 % 65536).astype('<u2')\n"
                         "with open('" + path.string() + "', 'wb') as f:\n"
                         "    f.write(h.tobytes()); f.write(toks.tobytes())\n";
    write_file(d.path("w.py"), script);
    ASSERT_EQ(test_python_file(d.path("w.py"), {}), 0);
    at::Tensor t = data_shard_read(path.string());
    ASSERT_EQ(t.numel(), 1000);
    at::Tensor want = (at::arange(1000, at::kLong) * 7919).remainder(65536);
    EXPECT_TRUE(at::equal(t, want));
}

TEST(Data, ShardErrorsNameTheFile) {
    TestTempDir d{"qatlab_data_"};
    std::string path = d.path("bad.bin");
    write_file(path, "short");
    std::string e = error_of([&] { data_shard_read(path); });
    EXPECT_NE(e.find(path), std::string::npos) << e;
    EXPECT_NE(e.find("header"), std::string::npos) << e;
    std::string bytes(1024 + 4, '\0');
    int32_t h[3] = {123, 1, 2};
    std::memcpy(bytes.data(), h, 12);
    write_file(path, bytes);
    e = error_of([&] { data_shard_read(path); });
    EXPECT_NE(e.find("magic"), std::string::npos) << e;
    EXPECT_NE(e.find(path), std::string::npos) << e;
    h[0] = 20240520;
    h[2] = 5;   // claims 5 tokens, holds 2
    std::memcpy(bytes.data(), h, 12);
    write_file(path, bytes);
    e = error_of([&] { data_shard_read(path); });
    EXPECT_NE(e.find("size"), std::string::npos) << e;
    h[1] = 2;
    std::memcpy(bytes.data(), h, 12);
    write_file(path, bytes);
    EXPECT_NE(error_of([&] { data_shard_read(path); }).find("version"), std::string::npos);
    EXPECT_NE(error_of([&] { data_shard_read(d.path("none.bin")); }).find("none.bin"), std::string::npos);
}

TEST(Data, AlpacaThinkingModes) {
    AlpacaExample ex{"Name a colour.", "One word.", "  Blue \n"};
    const std::string f = "<|im_start|>user\nName a colour.\n\nOne word.<|im_end|>\n"
                          "<|im_start|>assistant\nBlue<|im_end|>\n";
    const std::string t = "<|im_start|>user\nName a colour.\n\nOne word.<|im_end|>\n"
                          "<|im_start|>assistant\n<think>\n\n</think>\n\nBlue<|im_end|>\n";
    const std::string raw = "Name a colour.\n\nOne word.\n\nBlue";
    EXPECT_EQ(data_alpaca_render(ex, "false"), (std::vector<std::string>{f}));
    EXPECT_EQ(data_alpaca_render(ex, "true"), (std::vector<std::string>{t}));
    EXPECT_EQ(data_alpaca_render(ex, "both"), (std::vector<std::string>{f, t}));
    EXPECT_EQ(data_alpaca_render(ex, "none"), (std::vector<std::string>{raw}));
    EXPECT_EQ(data_alpaca_render(ex, "all"), (std::vector<std::string>{t, f, raw}));
    AlpacaExample no_input{"Say hi.", "", "Hi"};
    EXPECT_EQ(data_alpaca_render(no_input, "false")[0],
              "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\nHi<|im_end|>\n");
    EXPECT_EQ(data_alpaca_render(no_input, "none")[0], "Say hi.\n\nHi");
    EXPECT_NE(error_of([&] { data_alpaca_render(ex, "maybe"); }).find("maybe"), std::string::npos);
}

TEST(Data, ReadAlpacaJsonAndJsonl) {
    TestTempDir d{"qatlab_data_"};
    write_file(d.path("a.json"), R"([{"instruction": "A", "input": "", "output": "B"},
                                     {"instruction": "C", "output": "D"}])");
    write_file(d.path("a.jsonl"), "{\"instruction\": \"A\", \"input\": \"x\", \"output\": \"B\"}\n\n");
    auto ex = data_read_alpaca_examples(d.path("a.json"));
    ASSERT_EQ(ex.size(), 2u);
    EXPECT_EQ(ex[1].instruction, "C");
    EXPECT_EQ(ex[1].input, "");
    EXPECT_EQ(data_read_alpaca(d.path("a.json"), "both").size(), 4u);
    EXPECT_EQ(data_read_alpaca(d.path("a.jsonl"), "none"), (std::vector<std::string>{"A\n\nx\n\nB"}));
    write_file(d.path("bad.jsonl"), "{\"instruction\": \"A\"}\n");
    std::string e = error_of([&] { data_read_alpaca_examples(d.path("bad.jsonl")); });
    EXPECT_NE(e.find("bad.jsonl:1"), std::string::npos) << e;
    EXPECT_NE(e.find("output"), std::string::npos) << e;
}

TEST(Data, ReadTextAndJsonl) {
    TestTempDir d{"qatlab_data_"};
    write_file(d.path("b.txt"), "second");
    write_file(d.path("a.txt"), "first");
    write_file(d.path("sub/c.txt"), "third");
    EXPECT_EQ(data_read_text(d.dir()), (std::vector<std::string>{"first", "second", "third"}));
    EXPECT_EQ(data_read_text(d.path("a.txt")), (std::vector<std::string>{"first"}));
    EXPECT_NE(error_of([&] { data_read_text(d.path("nope")); }).find("nope"), std::string::npos);
    write_file(d.path("t.jsonl"), "{\"text\": \" hello \"}\n{\"body\": \"x\", \"text\": \"world\"}\n");
    EXPECT_EQ(data_read_jsonl(d.path("t.jsonl")), (std::vector<std::string>{"hello", "world"}));
    std::string e = error_of([&] { data_read_jsonl(d.path("t.jsonl"), "body"); });
    EXPECT_NE(e.find("t.jsonl:1"), std::string::npos) << e;
    EXPECT_NE(e.find("body"), std::string::npos) << e;
    write_file(d.path("broken.jsonl"), "{not json\n");
    EXPECT_NE(error_of([&] { data_read_jsonl(d.path("broken.jsonl")); }).find("broken.jsonl:1"),
              std::string::npos);
}

TEST(Data, KingJamesBible) {
    if (std::system("command -v bible >/dev/null 2>&1") != 0) GTEST_SKIP() << "bible-kjv not installed";
    TestTempDir d{"qatlab_data_"};
    std::string p = data_kjv_path(d.path("corpora"));
    EXPECT_EQ(p, d.path("corpora/kjv.txt"));
    auto text = data_read_text(p);
    ASSERT_EQ(text.size(), 1u);
    EXPECT_EQ(text[0].rfind("In the beginning God created the heaven and the earth.\n", 0), 0u);
    EXPECT_GT(text[0].size(), 4000000u);
    EXPECT_EQ(std::count(text[0].begin(), text[0].end(), '\n'), 31102);
    EXPECT_EQ(data_kjv_path(d.path("corpora")), p);   // cached
}
