// Tests for lib/tokenizer: the Qwen3 golden sample, GPT-2 known ids, round trips, cross-checks
// against Python's `tokenizers` and the spm_encode CLI, GGUF-style vocab lists, the chat format.
#include "lib/tokenizer.h"
#include "test_util.h"

#include <ATen/ATen.h>
#include <c10/util/Logging.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <unistd.h>

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace qatlab;

namespace {

// The real tokenizers tools/fetch_test_data.sh puts in the checkout (not in the repository).
std::string data_dir() { return std::string(QATLAB_SOURCE_DIR) + "/.cache/data"; }
std::string qwen_dir() { return data_dir() + "/qwen3-tokenizer"; }
std::string gpt2_enc() { return data_dir() + "/gpt2-bpe/encoder.json"; }
std::string gpt2_bpe() { return data_dir() + "/gpt2-bpe/vocab.bpe"; }

// Loaded once: the Qwen3 vocabulary takes a moment to parse.
const BpeTokenizer & qwen() {
    static auto tk = BpeTokenizer::from_json(qwen_dir());
    return *tk;
}
const BpeTokenizer & gpt2() {
    static auto tk = BpeTokenizer::from_gpt2_files(gpt2_enc(), gpt2_bpe());
    return *tk;
}

std::string file_read(const std::string & path) {
    std::ifstream f(path, std::ios::binary);
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
}

void file_write(const std::string & path, const std::string & s) {
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    f << s;
}

// Runs Python's `tokenizers` on {"texts": [...], "ids": [[...]]}: encodes the texts and
// decodes the id lists. Returns false (test skipped) when the package is missing.
const char * kPyScript = R"PY(
import json, sys
try:
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
except ImportError:
    sys.exit(3)
d = json.load(open(sys.argv[1], encoding='utf-8'))
if d['kind'] == 'gpt2':
    tk = Tokenizer(models.BPE.from_file(d['encoder'], d['merges']))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(['<|endoftext|>'])
else:
    tk = Tokenizer.from_file(d['path'])
enc = [tk.encode(t, add_special_tokens=False).ids for t in d['texts']]
dec = [tk.decode(ids, skip_special_tokens=False) for ids in d.get('ids', [])]
encs = [[Tokenizer.from_file(p).encode(t, add_special_tokens=False).ids for t in d['texts']]
        for p in d.get('paths', [])]
json.dump({'enc': enc, 'dec': dec, 'encs': encs}, open(sys.argv[2], 'w', encoding='utf-8'))
)PY";

bool python_tokenizers(const json & request, json & reply) {
    if (!test_python()) return false;
    TestTempDir t{"qatlab_tok_"};
    file_write(t.path("run.py"), kPyScript);
    file_write(t.path("in.json"), request.dump());
    std::string cmd = test_python_command({t.path("run.py"), t.path("in.json"), t.path("out.json")});
    int rc = test_shell_run(cmd);
    if (rc == 3) return false;
    EXPECT_EQ(rc, 0) << cmd;
    reply = json::parse(file_read(t.path("out.json")));
    return true;
}

// Random text from pieces that stress the pre-tokenizer: contractions, digits, whitespace
// runs and Unicode spaces, NFD accents, CJK, emoji, added tokens and fragments of them.
std::vector<std::string> random_texts(int count, uint32_t seed, bool with_added) {
    static const std::vector<std::string> pieces = {
        "Hello", "world", " the", " The", "quick", " brown", "fox", "'s", "'T", "'ll", "'RE", "'d", "n't", "I'm",
        "0", "7", "12345", "3.14", "1,000", "2024-01-31", " ", "  ", "   ", "\t", "\n", "\r\n", "\n\n", " \n ",
        "    ", "!", "?!", "...", "—", "(", ")", "[x]", "{}", "\"", "'", "`", "#", "@", "$5", "%", "&&", "||",
        "def f(x):\n    return x**2", "é", "e\xCC\x81", "A\xCC\x8A", "na\xC3\xAFve", "caf\xC3\xA9", "\xC3\x86r\xC3\xB8",
        "中文", "测试", "日本語", "のテキスト", "한국어", "\xF0\x9F\x98\x80", "\xF0\x9F\x9A\x80", "\xF0\x9F\x91\x8D\xF0\x9F\x8F\xBD",
        "привет", "мир", "مرحبا", "שלום", "∑", "×", "ﬁ", "\xC2\xA0", "\xE2\x80\x83", "\xE3\x80\x80",
        "\xE2\x80\x8B", "\x0b", "\x0c", "\xC2\x85", "_", "-", "--", "\\n", "ǅ", "ß", "İ",
        "\xE1\xA0\x8E" /* U+180E: not a space for Oniguruma */, "\x1c", "'\xC5\xBF" /* 'ſ */, "\xE2\x84\xAA",
    };
    static const std::vector<std::string> added = {"<|im_start|>", "<|im_end|>", "<think>", "</think>",
                                                   "<|endoftext|>", "<|im_", "<|", "|>"};
    std::mt19937 rng(seed);
    std::vector<std::string> out;
    for (int i = 0; i < count; i++) {
        std::string s;
        int n = 1 + int(rng() % 16);
        for (int k = 0; k < n; k++) {
            if (with_added && rng() % 12 == 0) s += added[rng() % added.size()];
            else s += pieces[rng() % pieces.size()];
        }
        out.push_back(s);
    }
    return out;
}

std::vector<std::vector<int64_t>> random_ids(int count, uint32_t seed, int64_t vocab, const BpeTokenizer & tk) {
    std::mt19937 rng(seed);
    std::vector<std::vector<int64_t>> out;
    for (int i = 0; i < count; i++) {
        std::vector<int64_t> ids;
        int n = 1 + int(rng() % 12);
        for (int k = 0; k < n; k++) {
            if (rng() % 3 == 0) {
                // a single byte token, spelled in GPT-2's alphabet: bytes 0xE4, 0xE9, 0xF0, 0xF4
                // (lead bytes, invalid alone), 0x80 (a continuation byte), "!" and "\n"
                static const char * bytes[] = {"\xC3\xA4", "\xC3\xA9", "\xC3\xB0", "\xC3\xB4", "\xC4\xA2", "!", "\xC4\x8A"};
                ids.push_back(tk.token_to_id(bytes[rng() % 7]));
            } else
                ids.push_back(int64_t(rng() % uint32_t(vocab)));
        }
        out.push_back(ids);
    }
    return out;
}

void cross_check(const BpeTokenizer & tk, json request, uint32_t seed) {
    std::vector<std::string> texts = random_texts(300, seed, true);
    auto ids = random_ids(100, seed + 1, tk.vocab_size(), tk);
    request["texts"] = texts;
    request["ids"] = ids;
    json reply;
    if (!python_tokenizers(request, reply)) GTEST_SKIP() << "QATLAB_PYTHON with the `tokenizers` package not available";
    ASSERT_EQ(reply["enc"].size(), texts.size());
    int bad = 0;
    for (size_t i = 0; i < texts.size() && bad < 5; i++) {
        auto want = reply["enc"][i].get<std::vector<int64_t>>();
        auto got = tk.encode(texts[i]);
        if (got != want) bad++;
        EXPECT_EQ(got, want) << "text #" << i << ": " << json(texts[i]).dump();
    }
    for (size_t i = 0; i < ids.size() && bad < 5; i++) {
        std::string want = reply["dec"][i].get<std::string>();
        std::string got = tk.decode(ids[i]);
        if (got != want) bad++;
        EXPECT_EQ(got, want) << "ids #" << i << ": " << json(ids[i]).dump();
    }
}

template <class F>
std::string error_of(F && f) {
    try {
        f();
    } catch (const std::exception & e) {
        return e.what();
    }
    return "(no error)";
}

} // namespace

// -- Qwen3 ------------------------------------------------------------------------------------

TEST(TokenizerQwen3, GoldenSample) {
    json g = json::parse(file_read(qwen_dir() + "/golden_sample.json"));
    ASSERT_EQ(g.size(), 9u);
    for (const json & e : g) {
        std::string text = e["text"];
        EXPECT_EQ(qwen().encode(text), e["ids"].get<std::vector<int64_t>>()) << text;
    }
}

TEST(TokenizerQwen3, VocabularyAndSpecialTokens) {
    const BpeTokenizer & tk = qwen();
    EXPECT_EQ(tk.vocab_size(), 151669);
    EXPECT_EQ(tk.eos_token_id(), 151645);  // <|im_end|>, from tokenizer_config.json
    EXPECT_EQ(tk.pad_token_id(), 151643);  // <|endoftext|>
    EXPECT_EQ(tk.bos_token_id(), -1);
    EXPECT_EQ(tk.token_to_id("<|im_start|>"), 151644);
    EXPECT_EQ(tk.token_to_id("Hello"), 9707);
    EXPECT_EQ(tk.token_to_id("Ġworld"), 1879);
    EXPECT_EQ(tk.token_to_id("no such token here"), -1);
    EXPECT_EQ(tk.id_to_token(151667), "<think>");
    EXPECT_EQ(tk.token_bytes(1879), " world");
    EXPECT_EQ(tk.token_bytes(198), "\n");
    EXPECT_TRUE(tk.is_special(151645));
    EXPECT_FALSE(tk.is_special(151667));  // <think> is an added token, not a special one
    EXPECT_FALSE(tk.is_special(9707));
    EXPECT_THROW(tk.id_to_token(151669), std::runtime_error);
    EXPECT_THROW(tk.id_to_token(-1), std::runtime_error);
    // Qwen3 adds nothing around a sequence.
    EXPECT_EQ(tk.encode("Hello", true), tk.encode("Hello", false));
}

TEST(TokenizerQwen3, RoundTripMixedText) {
    // NFD input comes back composed (NFC), the normalizer's doing.
    struct Case { std::string in, nfc; };
    std::vector<Case> cases = {
        {"The quick brown fox jumps over the lazy dog.", ""},
        {"中文测试：我爱自然语言处理。日本語のテキストも。한국어 문장.", ""},
        {"emoji \xF0\x9F\x98\x80\xF0\x9F\x9A\x80 and skin tone \xF0\x9F\x91\x8D\xF0\x9F\x8F\xBD!", ""},
        {"cafe\xCC\x81 nai\xCC\x88ve A\xCC\x8Angstro\xCC\x88m", "caf\xC3\xA9 na\xC3\xAFve \xC3\x85ngstr\xC3\xB6m"},
        {"def f(x):\n\tif x > 0:\n\t\treturn x ** 2  # square\n    \n\n", ""},
        {"   leading and trailing   \r\n\r\n", ""},
        {"<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nOK<|im_end|>", ""},
        {"numbers 1234567890 3.14159 -42 1e-9", ""},
        {"mixed\xC2\xA0nbsp\xE2\x80\x83" "em\xE3\x80\x80ideographic", ""},
        {"", ""},
    };
    for (const Case & c : cases) {
        std::string want = c.nfc.empty() ? c.in : c.nfc;
        EXPECT_EQ(qwen().decode(qwen().encode(c.in)), want) << c.in;
    }
}

TEST(TokenizerQwen3, DecodeReplacesInvalidUtf8AndSkipsSpecials) {
    const BpeTokenizer & tk = qwen();
    int64_t e4 = tk.token_to_id("\xC3\xA4");  // the byte 0xE4, a lead byte alone
    ASSERT_GE(e4, 0);
    EXPECT_EQ(tk.decode({e4}), "\xEF\xBF\xBD");
    EXPECT_EQ(tk.decode({9707, e4, 0}), "Hello\xEF\xBF\xBD!");
    // A valid sequence split over tokens is joined before the check.
    auto ids = tk.encode("中");
    EXPECT_EQ(tk.decode(ids), "中");
    std::vector<int64_t> chat = {151644, 872, 198, 13048, 1052, 151645, 198, 151644, 77091, 198,
                                 151667, 271, 151668, 271, 9707, 0, 151645};
    EXPECT_EQ(tk.decode(chat, true), "user\nHi there\nassistant\n<think>\n\n</think>\n\nHello!");
    EXPECT_EQ(tk.decode(chat, false),
              "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nHello!<|im_end|>");
    EXPECT_THROW(tk.decode({151669}), std::runtime_error);
}

TEST(TokenizerQwen3, InvalidUtf8InputEncodesAllBytes) {
    std::string s = "ok \xFF\xFE bad \xE4\xB8 end";
    auto ids = qwen().encode(s);
    std::string bytes;
    for (int64_t id : ids) bytes += qwen().token_bytes(id);
    EXPECT_EQ(bytes, s);
    // Random bytes: GPT-2 has no normalizer, so its tokens give the bytes back exactly.
    std::mt19937 rng(3);
    for (int i = 0; i < 300; i++) {
        std::string r(rng() % 64, '\0');
        for (char & c : r) c = char(rng() % 256);
        std::string back;
        for (int64_t id : gpt2().encode(r)) back += gpt2().token_bytes(id);
        EXPECT_EQ(back, r);
        EXPECT_NO_THROW(qwen().decode(qwen().encode(r)));
    }
}

TEST(TokenizerQwen3, LongRunsAndThreads) {
    std::string spaces(20000, ' ');
    auto ids = qwen().encode("a" + spaces + "b");
    EXPECT_EQ(qwen().decode(ids), "a" + spaces + "b");
    std::string text = "x";
    for (int i = 0; i < 2000; i++) text += " word" + std::to_string(i % 97) + (i % 13 == 0 ? "\n" : "");
    auto want = qwen().encode(text);
    std::vector<std::vector<int64_t>> got(4);
    std::vector<std::thread> th;
    for (int t = 0; t < 4; t++)
        th.emplace_back([&, t] {
            for (int r = 0; r < 5; r++) got[t] = qwen().encode(text);
        });
    for (auto & x : th) x.join();
    for (auto & g : got) EXPECT_EQ(g, want);
}

TEST(TokenizerQwen3, CrossCheckPythonTokenizers) {
    cross_check(qwen(), json{{"kind", "json"}, {"path", qwen_dir() + "/tokenizer.json"}}, 1234);
}

// -- GPT-2 ------------------------------------------------------------------------------------

TEST(TokenizerGpt2, KnownEncodings) {
    const BpeTokenizer & tk = gpt2();
    EXPECT_EQ(tk.vocab_size(), 50257);
    EXPECT_EQ(tk.eos_token_id(), 50256);
    EXPECT_EQ(tk.bos_token_id(), 50256);
    EXPECT_EQ(tk.encode("Hello world"), (std::vector<int64_t>{15496, 995}));
    EXPECT_EQ(tk.encode(" Hello"), (std::vector<int64_t>{18435}));
    // Checked with Python's `tokenizers` (BPE.from_file + ByteLevel): spaces before a word
    // stay apart except the last one, and GPT-2 does not merge "\n\n".
    EXPECT_EQ(tk.encode("  Hello world!!  \n\nfoo"),
              (std::vector<int64_t>{220, 18435, 995, 3228, 220, 220, 198, 198, 21943}));
    EXPECT_EQ(tk.encode("<|endoftext|>"), (std::vector<int64_t>{50256}));
    EXPECT_EQ(tk.decode({15496, 995, 50256}, true), "Hello world");
    EXPECT_EQ(tk.id_to_token(995), "Ġworld");
}

TEST(TokenizerGpt2, CrossCheckPythonTokenizers) {
    cross_check(gpt2(), json{{"kind", "gpt2"}, {"encoder", gpt2_enc()}, {"merges", gpt2_bpe()}}, 777);
}

// -- vocab lists (GGUF) -------------------------------------------------------------------------

TEST(TokenizerVocab, QwenListsMatchTokenizerJson) {
    json j = json::parse(file_read(qwen_dir() + "/tokenizer.json"));
    BpeVocab v;
    v.tokens.resize(151669);
    v.token_types.assign(151669, 1);
    for (auto it = j["model"]["vocab"].begin(); it != j["model"]["vocab"].end(); ++it) v.tokens[it.value()] = it.key();
    for (const json & m : j["model"]["merges"]) v.merges.push_back(m[0].get<std::string>() + " " + m[1].get<std::string>());
    for (const json & a : j["added_tokens"]) {
        v.tokens[a["id"]] = a["content"];
        v.token_types[a["id"]] = a["special"].get<bool>() ? 3 : 4;
    }
    v.pre = "qwen2";
    v.eos_id = 151645;
    v.source = "qwen.gguf";
    auto tk = BpeTokenizer::from_vocab(v);
    EXPECT_EQ(tk->vocab_size(), 151669);
    EXPECT_EQ(tk->eos_token_id(), 151645);
    json g = json::parse(file_read(qwen_dir() + "/golden_sample.json"));
    for (const json & e : g) EXPECT_EQ(tk->encode(e["text"].get<std::string>()), e["ids"].get<std::vector<int64_t>>());
    for (const std::string & s : random_texts(100, 99, true)) EXPECT_EQ(tk->encode(s), qwen().encode(s)) << s;

    v.pre = "no-such-pre";
    std::string err = error_of([&] { BpeTokenizer::from_vocab(v); });
    EXPECT_NE(err.find("qwen.gguf: tokenizer.ggml.pre"), std::string::npos) << err;
    EXPECT_NE(err.find("no-such-pre"), std::string::npos) << err;
}

TEST(TokenizerVocab, Gpt2ListsAndSmollmDigits) {
    json enc = json::parse(file_read(gpt2_enc()));
    BpeVocab v;
    v.tokens.resize(enc.size());
    for (auto it = enc.begin(); it != enc.end(); ++it) v.tokens[it.value()] = it.key();
    std::istringstream merges(file_read(gpt2_bpe()));
    std::string line;
    std::getline(merges, line);  // #version
    while (std::getline(merges, line))
        if (!line.empty()) v.merges.push_back(line);
    v.pre = "gpt2";
    auto tk = BpeTokenizer::from_vocab(v);
    for (const std::string & s : random_texts(100, 5, false)) EXPECT_EQ(tk->encode(s), gpt2().encode(s)) << s;
    // smollm: digits one by one, then GPT-2's regex.
    v.pre = "smollm";
    auto sm = BpeTokenizer::from_vocab(v);
    auto ids = sm->encode("year 2024");
    std::vector<std::string> toks;
    for (int64_t id : ids) toks.push_back(sm->id_to_token(id));
    EXPECT_EQ(toks, (std::vector<std::string>{"year", "Ġ", "2", "0", "2", "4"}));
    v.merges.push_back("Ġ nosuchtoken");
    std::string err = error_of([&] { BpeTokenizer::from_vocab(v); });
    EXPECT_NE(err.find("nosuchtoken"), std::string::npos) << err;
}

// -- tokenizer.json variants and errors ------------------------------------------------------------

namespace {

json byte_level(bool prefix, bool regex) {
    return json{{"type", "ByteLevel"}, {"add_prefix_space", prefix}, {"trim_offsets", true}, {"use_regex", regex}};
}

// A tiny byte-level BPE: all 256 bytes, a few merges, and the given pre-tokenizer.
json tiny_tokenizer(const json & pre_tokenizer, const json & normalizer = nullptr) {
    json vocab = json::object();
    json full = json::parse(file_read(gpt2_enc()));
    for (auto it = full.begin(); it != full.end(); ++it)
        if (it.value().get<int>() < 256) vocab[it.key()] = it.value();
    std::vector<std::pair<std::string, std::string>> merges = {{"Ġ", "t"}, {"h", "e"}, {"Ġt", "he"}, {"1", "2"}, {"a", "b"}};
    json jm = json::array();
    int next = 256;
    for (auto & m : merges) {
        jm.push_back(m.first + " " + m.second);
        if (!vocab.contains(m.first + m.second)) vocab[m.first + m.second] = next++;
    }
    return json{{"version", "1.0"},
                {"truncation", nullptr},
                {"padding", nullptr},
                {"added_tokens", json::array({json{{"id", next}, {"content", "<sep>"}, {"special", true},
                                                   {"normalized", false}, {"lstrip", true}, {"rstrip", false},
                                                   {"single_word", false}}})},
                {"normalizer", normalizer},
                {"pre_tokenizer", pre_tokenizer},
                {"post_processor", nullptr},
                {"decoder", byte_level(true, true)},
                {"model", json{{"type", "BPE"}, {"vocab", vocab}, {"merges", jm}}}};
}

json split(const std::string & re, const std::string & behavior, bool invert = false) {
    return json{{"type", "Split"}, {"pattern", {{"Regex", re}}}, {"behavior", behavior}, {"invert", invert}};
}
json seq(std::vector<json> l) {
    json a = json::array();
    for (auto & x : l) a.push_back(x);
    return json{{"type", "Sequence"}, {"pretokenizers", a}};
}

} // namespace

TEST(TokenizerJson, PreTokenizerVariantsMatchPython) {
    std::vector<json> pres = {
        byte_level(false, true),
        byte_level(true, true),
        seq({json{{"type", "Digits"}, {"individual_digits", true}}, byte_level(true, false)}),
        seq({json{{"type", "Digits"}, {"individual_digits", false}}, byte_level(false, true)}),
        seq({split("\\s+", "Removed"), byte_level(false, false)}),
        seq({split("\\s+", "MergedWithPrevious"), byte_level(false, false)}),
        seq({split("\\s+", "MergedWithNext"), byte_level(false, false)}),
        seq({split("[a-z]", "Contiguous"), byte_level(false, false)}),
        seq({split("\\p{L}+", "Isolated", true), byte_level(false, false)}),
        seq({split("\\p{L}+", "Removed", true), byte_level(false, false)}),
    };
    std::vector<std::string> texts = random_texts(60, 42, false);
    texts.push_back("the 12 abab  the<sep>the   <sep> 1212x");
    texts.push_back("  lead, the 123 and  the\n\nend  ");
    TestTempDir t{"qatlab_tok_"};
    std::vector<std::string> paths;
    for (size_t k = 0; k < pres.size(); k++) {
        paths.push_back(t.path("tok" + std::to_string(k) + ".json"));
        file_write(paths.back(), tiny_tokenizer(pres[k], k % 2 ? json{{"type", "NFC"}} : json(nullptr)).dump());
    }
    json reply;
    if (!python_tokenizers(json{{"kind", "json"}, {"path", paths[0]}, {"paths", paths}, {"texts", texts}}, reply))
        GTEST_SKIP() << "QATLAB_PYTHON with the `tokenizers` package not available";
    for (size_t k = 0; k < pres.size(); k++) {
        auto tk = BpeTokenizer::from_json(paths[k]);
        for (size_t i = 0; i < texts.size(); i++)
            ASSERT_EQ(tk->encode(texts[i]), reply["encs"][k][i].get<std::vector<int64_t>>())
                << "pre_tokenizer " << pres[k].dump() << "\ntext " << json(texts[i]).dump();
    }
}

TEST(TokenizerJson, TemplateProcessingAddsSpecialTokens) {
    TestTempDir t{"qatlab_tok_"};
    json j = tiny_tokenizer(byte_level(false, true));
    j["added_tokens"].push_back(json{{"id", 300}, {"content", "<s>"}, {"special", true}, {"normalized", false}});
    j["post_processor"] = json{{"type", "Sequence"},
                               {"processors", json::array({byte_level(false, true),
                                                           json{{"type", "TemplateProcessing"},
                                                                {"single", json::array({json{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}},
                                                                                        json{{"Sequence", {{"id", "A"}, {"type_id", 0}}}}})},
                                                                {"pair", json::array()},
                                                                {"special_tokens", {{"<s>", {{"id", "<s>"}, {"ids", {300}}, {"tokens", {"<s>"}}}}}}}})}};
    file_write(t.path("tokenizer.json"), j.dump());
    file_write(t.path("tokenizer_config.json"), json{{"bos_token", "<s>"}, {"eos_token", {{"content", "<sep>"}}}}.dump());
    auto tk = BpeTokenizer::from_json(t.dir());
    EXPECT_EQ(tk->bos_token_id(), 300);
    EXPECT_EQ(tk->eos_token_id(), tk->token_to_id("<sep>"));
    auto ids = tk->encode(" the", true);
    ASSERT_EQ(ids.size(), 2u);
    EXPECT_EQ(ids[0], 300);
    EXPECT_EQ(tk->encode(" the", false).size(), 1u);
}

TEST(TokenizerJson, IgnoreMergesTakesWholeWords) {
    // "abab" is in the vocabulary but no merge builds it: only ignore_merges (Llama-3) finds it.
    TestTempDir t{"qatlab_tok_"};
    json j = tiny_tokenizer(byte_level(false, true));
    j["model"]["vocab"]["abab"] = 400;
    file_write(t.path("merges.json"), j.dump());
    j["model"]["ignore_merges"] = true;
    file_write(t.path("ignore.json"), j.dump());
    auto with_merges = BpeTokenizer::from_json(t.path("merges.json"));
    auto ignoring = BpeTokenizer::from_json(t.path("ignore.json"));
    int64_t ab = with_merges->token_to_id("ab");
    EXPECT_EQ(with_merges->encode("abab"), (std::vector<int64_t>{ab, ab}));
    EXPECT_EQ(ignoring->encode("abab"), (std::vector<int64_t>{400}));
    EXPECT_EQ(ignoring->encode("ababab"), (std::vector<int64_t>{ab, ab, ab}));
}

TEST(TokenizerJson, ErrorsNameFileAndKey) {
    TestTempDir t{"qatlab_tok_"};
    std::string err = error_of([&] { BpeTokenizer::from_json(t.path("missing.json")); });
    EXPECT_NE(err.find("missing.json"), std::string::npos) << err;
    EXPECT_NE(err.find("cannot open"), std::string::npos) << err;

    file_write(t.path("bad.json"), "{\"model\": ");
    err = error_of([&] { BpeTokenizer::from_json(t.path("bad.json")); });
    EXPECT_NE(err.find("bad.json: not valid JSON"), std::string::npos) << err;

    json j = tiny_tokenizer(byte_level(false, true));
    j["model"]["type"] = "WordPiece";
    file_write(t.path("wp.json"), j.dump());
    err = error_of([&] { BpeTokenizer::from_json(t.path("wp.json")); });
    EXPECT_NE(err.find("wp.json: model.type: expected 'BPE', found 'WordPiece'"), std::string::npos) << err;

    j = tiny_tokenizer(seq({byte_level(false, true), json{{"type", "Metaspace"}}}));
    file_write(t.path("ms.json"), j.dump());
    err = error_of([&] { BpeTokenizer::from_json(t.path("ms.json")); });
    EXPECT_NE(err.find("ms.json: pre_tokenizer.pretokenizers[1].type"), std::string::npos) << err;
    EXPECT_NE(err.find("found 'Metaspace'"), std::string::npos) << err;

    j = tiny_tokenizer(split("\\s+", "Isolated"));
    file_write(t.path("nobl.json"), j.dump());
    err = error_of([&] { BpeTokenizer::from_json(t.path("nobl.json")); });
    EXPECT_NE(err.find("nobl.json: pre_tokenizer: expected a ByteLevel"), std::string::npos) << err;

    j = tiny_tokenizer(byte_level(false, true), json{{"type", "Lowercase"}});
    file_write(t.path("lc.json"), j.dump());
    err = error_of([&] { BpeTokenizer::from_json(t.path("lc.json")); });
    EXPECT_NE(err.find("lc.json: normalizer.type: expected NFC"), std::string::npos) << err;

    j = tiny_tokenizer(split("([", "Isolated"));
    file_write(t.path("re.json"), j.dump());
    err = error_of([&] { BpeTokenizer::from_json(t.path("re.json")); });
    EXPECT_NE(err.find("re.json: pre_tokenizer.pattern.Regex: cannot compile"), std::string::npos) << err;

    j = tiny_tokenizer(byte_level(false, true));
    j["model"]["merges"].push_back("x nosuch");
    file_write(t.path("mg.json"), j.dump());
    err = error_of([&] { BpeTokenizer::from_json(t.path("mg.json")); });
    EXPECT_NE(err.find("mg.json: model.merges[5]"), std::string::npos) << err;

    fs::create_directory(t.path("cfg"));
    file_write(t.path("cfg/tokenizer.json"), tiny_tokenizer(byte_level(false, true)).dump());
    file_write(t.path("cfg/tokenizer_config.json"), json{{"eos_token", "<nope>"}}.dump());
    err = error_of([&] { BpeTokenizer::from_json(t.path("cfg")); });
    EXPECT_NE(err.find("tokenizer_config.json: eos_token: token '<nope>'"), std::string::npos) << err;

    err = error_of([&] { tokenizer_load(t.dir()); });
    EXPECT_NE(err.find("expected a directory holding tokenizer.json"), std::string::npos) << err;
}

// -- SentencePiece ------------------------------------------------------------------------------

TEST(TokenizerSentencePiece, TrainLoadAndMatchSpmEncode) {
    TestTempDir t{"qatlab_tok_"};
    std::string corpus = "/usr/share/common-licenses/GPL-3";
    ASSERT_TRUE(fs::exists(corpus));
    SentencePieceTrainOptions o;
    o.input = corpus;
    o.model_prefix = t.path("gpl");
    o.vocab_size = 500;
    o.model_type = "bpe";
    o.extra["character_coverage"] = "1.0";
    std::string model = sentencepiece_train(o);
    EXPECT_EQ(model, t.path("gpl.model"));
    std::vector<std::string> files;
    for (auto & e : fs::directory_iterator(t.dir())) files.push_back(e.path().filename().string());
    std::sort(files.begin(), files.end());
    EXPECT_EQ(files, (std::vector<std::string>{"gpl.model", "gpl.vocab"}));  // no temporary left

    auto tk = tokenizer_load(model);
    EXPECT_STREQ(tk->kind(), "sentencepiece");
    EXPECT_EQ(tk->vocab_size(), 500);
    EXPECT_EQ(tk->unk_token_id(), 0);
    EXPECT_EQ(tk->bos_token_id(), 1);
    EXPECT_EQ(tk->eos_token_id(), 2);
    EXPECT_EQ(tk->token_to_id("<unk>"), 0);
    EXPECT_EQ(tk->token_to_id("no such piece"), -1);
    EXPECT_EQ(tk->token_to_id(tk->id_to_token(100)), 100);
    EXPECT_TRUE(tk->is_special(1));

    // Our encode against the spm_encode CLI, line by line.
    std::string ids_path = t.path("ids.txt");
    std::string cmd = "spm_encode --model=" + test_shell_quote(model) + " --output_format=id < " +
                      test_shell_quote(corpus) + " > " + test_shell_quote(ids_path);
    ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
    std::istringstream text(file_read(corpus)), ids(file_read(ids_path));
    std::string line, id_line;
    int lines = 0;
    while (std::getline(text, line) && std::getline(ids, id_line)) {
        std::vector<int64_t> want;
        std::istringstream is(id_line);
        int64_t x;
        while (is >> x) want.push_back(x);
        auto got = tk->encode(line);
        ASSERT_EQ(got, want) << "line " << lines + 1 << ": " << line;
        // Default normalization (nmt_nfkc) drops leading, trailing and repeated spaces.
        std::string collapsed;
        for (char c : line)
            if (c != ' ' || (!collapsed.empty() && collapsed.back() != ' ')) collapsed += c;
        while (!collapsed.empty() && collapsed.back() == ' ') collapsed.pop_back();
        EXPECT_EQ(tk->decode(got), collapsed);
        std::string bytes;
        for (int64_t id : got) bytes += tk->token_bytes(id);
        EXPECT_EQ(bytes, collapsed.empty() ? "" : " " + collapsed);  // "▁" as the dummy prefix
        lines++;
    }
    EXPECT_GT(lines, 600);
    std::string s = "This program is free software: you can redistribute it.";
    EXPECT_EQ(tk->decode(tk->encode(s)), s);
    auto with_bos = tk->encode(s, true);
    EXPECT_EQ(with_bos.front(), 1);
    EXPECT_EQ(tk->decode(with_bos), s);
}

TEST(TokenizerSentencePiece, GolfOptionsByteFallback) {
    TestTempDir t{"qatlab_tok_"};
    SentencePieceTrainOptions o;
    o.input = "/usr/share/common-licenses/Apache-2.0";
    o.model_prefix = t.path("golf");
    o.vocab_size = 400;
    o.extra = sentencepiece_golf_options();
    auto tk = SentencePieceTokenizer::from_file(sentencepiece_train(o));
    EXPECT_EQ(tk->pad_token_id(), 0);
    EXPECT_EQ(tk->bos_token_id(), 1);
    EXPECT_EQ(tk->eos_token_id(), 2);
    EXPECT_EQ(tk->unk_token_id(), 3);
    // Characters never seen in training come back through byte pieces.
    std::string s = "Licensed 2024 — 中文 \xF0\x9F\x98\x80";
    auto ids = tk->encode(s);
    EXPECT_EQ(tk->decode(ids), s);
    std::string bytes;
    for (int64_t id : ids) bytes += tk->token_bytes(id);
    EXPECT_EQ(bytes, s);  // no dummy prefix: the bytes are the text exactly
    // split_digits: every digit its own piece
    int digits = 0;
    for (int64_t id : tk->encode("2024")) digits += tk->token_bytes(id).size() == 1;
    EXPECT_EQ(digits, 4);
}

TEST(TokenizerSentencePiece, Errors) {
    TestTempDir t{"qatlab_tok_"};
    SentencePieceTrainOptions o;
    o.input = t.path("missing.txt");
    o.model_prefix = t.path("m");
    std::string err = error_of([&] { sentencepiece_train(o); });
    EXPECT_NE(err.find("input: " + t.path("missing.txt") + ": no such file"), std::string::npos) << err;
    o.input = "/usr/share/common-licenses/GPL-3";
    o.extra["no_such_flag"] = "1";
    err = error_of([&] { sentencepiece_train(o); });
    EXPECT_NE(err.find("no_such_flag"), std::string::npos) << err;
    EXPECT_TRUE(fs::is_empty(t.dir()));  // nothing half-written
    o.extra.clear();
    o.model_prefix = t.path("nodir/m");
    err = error_of([&] { sentencepiece_train(o); });
    EXPECT_NE(err.find("does not exist"), std::string::npos) << err;
    file_write(t.path("junk.model"), "not a model");
    err = error_of([&] { SentencePieceTokenizer::from_file(t.path("junk.model")); });
    EXPECT_NE(err.find("junk.model: not a SentencePiece model"), std::string::npos) << err;
    err = error_of([&] { SentencePieceTokenizer::from_file(t.path("none.model")); });
    EXPECT_NE(err.find("none.model: cannot open"), std::string::npos) << err;
}

// libsentencepiece exports FLAGS_minloglevel too (a 32-byte flag object); in-process it must
// stay in its dlopened module, or its constructor overwrites c10's int and the flags after it.
C10_DECLARE_int(minloglevel);  // c10's, declared in no header

TEST(TokenizerSentencePiece, LeavesC10FlagsAlone) {
    int minloglevel = FLAGS_minloglevel, log_level = FLAGS_caffe2_log_level;
    TestTempDir t{"qatlab_tok_"};
    SentencePieceTrainOptions o;
    o.input = "/usr/share/common-licenses/Apache-2.0";
    o.model_prefix = t.path("m");
    o.vocab_size = 300;
    auto tk = SentencePieceTokenizer::from_file(sentencepiece_train(o));
    EXPECT_FALSE(tk->encode("License").empty());
    EXPECT_FALSE(FLAGS_caffe2_use_fatal_for_enforce);
    EXPECT_EQ(FLAGS_minloglevel, minloglevel);
    EXPECT_EQ(FLAGS_caffe2_log_level, log_level);
    // With use_fatal_for_enforce on, this failed allocation would abort instead of throwing.
    EXPECT_THROW(at::empty({int64_t(1) << 50}, at::kFloat), c10::Error);
}

// -- chat format --------------------------------------------------------------------------------

TEST(ChatFormat, Qwen3UserAssistant) {
    std::vector<ChatMessage> m = {{"user", "Hi there", {}}, {"assistant", "Hello!", {}}};
    ChatFormatOptions on;
    on.enable_thinking = true;
    EXPECT_EQ(chat_format_qwen3(m, on),
              "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nHello!<|im_end|>\n");
    ChatFormatOptions off;  // the seed's default: thinking off, the empty block removed
    EXPECT_EQ(chat_format_qwen3(m, off), "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n");
    off.strip_think = false;  // Hugging Face's template alone keeps it for the last turn
    EXPECT_EQ(chat_format_qwen3(m, off), chat_format_qwen3(m, on));

    // The golden chat sample tokenizes the "on" rendering (minus the final newline).
    std::string on_text = chat_format_qwen3(m, on);
    EXPECT_EQ(qwen().encode(on_text.substr(0, on_text.size() - 1)),
              (std::vector<int64_t>{151644, 872, 198, 13048, 1052, 151645, 198, 151644, 77091, 198, 151667, 271,
                                    151668, 271, 9707, 0, 151645}));

    std::vector<ChatMessage> q = {{"system", "Be brief.", {}}, {"user", "What is 2+2?", {}}};
    ChatFormatOptions gen;
    gen.add_generation_prompt = true;
    EXPECT_EQ(chat_format_qwen3(q, gen), "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                                         "<|im_start|>assistant\n<think>\n\n</think>\n\n");
    gen.enable_thinking = true;
    EXPECT_EQ(chat_format_qwen3(q, gen),
              "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n");
    EXPECT_THROW(chat_format_qwen3({{"narrator", "x", {}}}), std::runtime_error);
}

TEST(ChatFormat, Qwen3MatchesJinjaTemplate) {
    if (!test_python()) GTEST_SKIP() << "QATLAB_PYTHON not set";
    std::vector<std::vector<ChatMessage>> convs = {
        {{"user", "Hi", {}}, {"assistant", "Hello!", {}}},
        {{"system", "S", {}}, {"user", "Q1", {}}, {"assistant", "A1", {}}, {"user", "Q2", {}}, {"assistant", "A2", {}}},
        {{"user", "Q", {}}, {"assistant", "<think>\nreason\n</think>\n\nanswer", {}}},
        {{"user", "Q", {}}, {"assistant", "answer", std::string("\nhidden thoughts\n")}},
        {{"user", "Q1", {}}, {"assistant", "<think>r1</think>A1", {}}, {"user", "Q2", {}}},
        {{"user", "Q", {}}, {"assistant", "call", {}}, {"tool", "r1", {}}, {"tool", "r2", {}}, {"assistant", "done", {}}},
        {{"user", "Instruction\n\nInput", {}}, {"assistant", " spaced output\u3000", {}}},
    };
    json cases = json::array();
    for (auto & c : convs) {
        json msgs = json::array();
        for (auto & m : c) {
            json x{{"role", m.role}, {"content", m.content}};
            if (m.reasoning_content) x["reasoning_content"] = *m.reasoning_content;
            msgs.push_back(x);
        }
        cases.push_back(msgs);
    }
    // Jinja renders the template; the seed's regexes strip the "off" variant (docs/formulas.md §10).
    const char * script = R"PY(
import json, re, sys
try:
    import jinja2
except ImportError:
    sys.exit(3)
cfg = json.load(open(sys.argv[1], encoding='utf-8'))
env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, extensions=['jinja2.ext.loopcontrols'])
tpl = env.from_string(cfg['chat_template'])
out = []
for msgs in json.load(open(sys.argv[2], encoding='utf-8')):
    row = []
    for think in (True, False):
        for gen in (False, True):
            t = tpl.render(messages=msgs, add_generation_prompt=gen, enable_thinking=think)
            if not think:
                head = tpl.render(messages=msgs, add_generation_prompt=False, enable_thinking=think)
                tail = t[len(head):]
                head = re.sub(r'<think>\s*</think>\s*', '', head)
                head = re.sub(r'<think>.*?</think>\s*', '', head, flags=re.DOTALL)
                row.append([t, head + tail])
            else:
                row.append([t, t])
    out.append(row)
json.dump(out, open(sys.argv[3], 'w', encoding='utf-8'))
)PY";
    TestTempDir t{"qatlab_tok_"};
    file_write(t.path("run.py"), script);
    file_write(t.path("in.json"), cases.dump());
    int rc = test_python_file(t.path("run.py"),
                              {qwen_dir() + "/tokenizer_config.json", t.path("in.json"), t.path("out.json")});
    if (rc == 3) GTEST_SKIP() << "jinja2 not installed";
    ASSERT_EQ(rc, 0);
    json out = json::parse(file_read(t.path("out.json")));
    for (size_t i = 0; i < convs.size(); i++) {
        int k = 0;
        for (bool think : {true, false})
            for (bool gen : {false, true}) {
                ChatFormatOptions o;
                o.enable_thinking = think;
                o.add_generation_prompt = gen;
                o.strip_think = false;
                EXPECT_EQ(chat_format_qwen3(convs[i], o), out[i][k][0].get<std::string>()) << "conv " << i << " k " << k;
                o.strip_think = true;
                EXPECT_EQ(chat_format_qwen3(convs[i], o), out[i][k][1].get<std::string>()) << "conv " << i << " k " << k;
                k++;
            }
    }
}

TEST(ChatTemplate, FamiliesFromMarkers) {
    // ChatML with a default system message (the shape of SmolLM2's template, our own words).
    const std::string chatml = "{% for m in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                               "{{ '<|im_start|>system\\nBe kind.\\tOK<|im_end|>\\n' }}{% endif %}"
                               "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}";
    ChatTemplate t = chat_template_parse(chatml, "test");
    EXPECT_EQ(t.family, "chatml");
    ASSERT_TRUE(t.has_default_system);
    EXPECT_EQ(t.default_system, "Be kind.\tOK");
    std::vector<ChatMessage> m = {{"user", "Hi", {}}, {"assistant", "Yo", {}}};
    ChatFormatOptions gen;
    gen.add_generation_prompt = true;
    EXPECT_EQ(chat_template_render(t, m, gen), "<|im_start|>system\nBe kind.\tOK<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                                               "<|im_start|>assistant\nYo<|im_end|>\n<|im_start|>assistant\n");
    std::vector<ChatMessage> sys = {{"system", "S", {}}, {"user", "Hi", {}}};
    EXPECT_EQ(chat_template_render(t, sys), "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n");
    EXPECT_EQ(chat_template_render(t, {}), "");
    // Llama-3: content trimmed of Python whitespace (U+3000 and U+0085 included), bos once.
    ChatTemplate l = chat_template_named("llama3");
    std::vector<ChatMessage> lm = {{"user", "\u3000 a b\n\u0085", {}}, {"assistant", "c", {}}};
    EXPECT_EQ(chat_template_render(l, lm), "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\na b<|eot_id|>"
                                           "<|start_header_id|>assistant<|end_header_id|>\n\nc<|eot_id|>");
    // Qwen3 by name is the seed's renderer.
    EXPECT_EQ(chat_template_render(chat_template_named("qwen3"), m, gen), chat_format_qwen3(m, gen));
    std::string cfg = file_read(qwen_dir() + "/tokenizer_config.json");
    EXPECT_EQ(chat_template_parse(json::parse(cfg)["chat_template"].get<std::string>(), "q").family, "qwen3");
    // Unknown: the source and the known families are named.
    try {
        chat_template_parse("{{ messages }}", "some/dir/tokenizer_config.json: chat_template");
        FAIL() << "expected an error";
    } catch (const std::runtime_error & e) {
        std::string w = e.what();
        EXPECT_NE(w.find("some/dir/tokenizer_config.json: chat_template: chat template not recognised"), std::string::npos) << w;
        EXPECT_NE(w.find("qwen3, chatml, llama3"), std::string::npos) << w;
    }
    EXPECT_THROW(chat_template_parse("<|start_header_id|><|end_header_id|><|eot_id|> Cutting Knowledge Date", "x"),
                 std::runtime_error);
    auto found = chat_template_find(qwen_dir());
    ASSERT_TRUE(found.has_value());
    EXPECT_EQ(found->second, qwen_dir() + "/tokenizer_config.json: chat_template");
}
