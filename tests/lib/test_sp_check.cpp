// test_sp_check: the SentencePiece model validator on hand-built double arrays (darts-clone units)
// and ModelProto bytes: what the library would follow out of bounds is refused, a sound trie passes.
#include "lib/tokenizer_sp_check.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

using qatlab::sentencepiece_charsmap_check;
using qatlab::sentencepiece_model_check;

namespace {

// Unit fields as darts-clone packs them: label in bits 0-7, has_leaf bit 8, offset from bit 10.
uint32_t unit(uint32_t label, bool leaf, uint32_t offset) { return (offset << 10) | (leaf ? 0x100u : 0u) | label; }
const uint32_t kValue = 0x80000000u;  // a value unit (its label never matches a byte)

// One 256-unit block: root base 1; 'a' leads to base 0x80, whose value unit points at string 0.
std::vector<uint32_t> units_sound() {
    std::vector<uint32_t> u(256, kValue);  // unused units match no byte
    u[0] = unit(0, false, 1);              // root: base 0 ^ 1 = 1
    u[1 ^ 'a'] = unit('a', true, (1 ^ 'a') ^ 0x80);
    u[0x80] = kValue | 0;
    return u;
}

std::string blob(const std::vector<uint32_t> & units, const std::string & strings) {
    std::string b(4 + units.size() * 4, '\0');
    uint32_t n = uint32_t(units.size() * 4);
    for (int k = 0; k < 4; k++) b[k] = char(n >> (8 * k));
    for (size_t i = 0; i < units.size(); i++)
        for (int k = 0; k < 4; k++) b[4 + 4 * i + k] = char(units[i] >> (8 * k));
    return b + strings;
}

std::string error_of(const std::string & b) {
    try {
        sentencepiece_charsmap_check(b, "normalizer");
    } catch (const std::runtime_error & e) {
        return e.what();
    }
    return "";
}

std::string varint(uint64_t v) {
    std::string s;
    while (v >= 0x80) {
        s += char(0x80 | (v & 0x7f));
        v >>= 7;
    }
    return s + char(v);
}
std::string field(int number, const std::string & payload) { return varint(uint64_t(number) << 3 | 2) + varint(payload.size()) + payload; }

// A ModelProto with one piece and the given normalizer charsmap.
std::string model(const std::string & charsmap) { return field(1, field(1, "a")) + field(3, field(2, charsmap)); }

} // namespace

TEST(SpCheck, SoundTriePasses) {
    EXPECT_EQ(error_of(blob(units_sound(), std::string("x\0", 2))), "");
    EXPECT_EQ(error_of(""), "");  // no charsmap: the library does not normalize
    EXPECT_NO_THROW(sentencepiece_model_check(model(blob(units_sound(), std::string("x\0", 2))), "m.model"));
}

TEST(SpCheck, RootBaseOutsideTheTrie) {
    auto u = units_sound();
    u[0] = unit(0, false, 0x3fffff);
    EXPECT_NE(error_of(blob(u, std::string("x\0", 2))).find("outside the 256-unit trie"), std::string::npos);
}

TEST(SpCheck, ChildBaseOutsideTheTrie) {
    auto u = units_sound();
    u[1 ^ 'a'] = unit('a', true, 0x1000);  // base 0x60 ^ 0x1000, past the one block
    EXPECT_NE(error_of(blob(u, std::string("x\0", 2))).find("points to base"), std::string::npos);
}

TEST(SpCheck, StringOffsetOutsideOrUnterminated) {
    auto u = units_sound();
    u[0x80] = kValue | 7;
    EXPECT_NE(error_of(blob(u, std::string("x\0", 2))).find("string offset 7"), std::string::npos);
    EXPECT_NE(error_of(blob(units_sound(), "xy")).find("unterminated"), std::string::npos);
}

TEST(SpCheck, CycleThroughALeaf) {
    auto u = units_sound();
    u[1 ^ 'a'] = unit('a', true, (1 ^ 'a') ^ 1);  // 'a' leads back to the root base: "aaaa..." never ends
    u[1] = kValue | 0;
    EXPECT_NE(error_of(blob(u, std::string("x\0", 2))).find("cycle"), std::string::npos);
}

TEST(SpCheck, HeaderSizes) {
    EXPECT_NE(error_of("abc").find("too short"), std::string::npos);
    std::string b = blob(units_sound(), std::string("x\0", 2));
    b[0] = char(0xff), b[1] = char(0xff);  // trie size 65535 + ...: past the blob
    EXPECT_NE(error_of(b).find("exceeds"), std::string::npos);
}

TEST(SpCheck, ModelProtoErrorsNameTheFile) {
    auto msg = [](const std::string & bytes) {
        try {
            sentencepiece_model_check(bytes, "dir/m.model");
        } catch (const std::runtime_error & e) {
            return std::string(e.what());
        }
        return std::string();
    };
    EXPECT_EQ(msg(""), "dir/m.model: not a SentencePiece model: the file is empty");
    EXPECT_NE(msg(field(3, field(2, ""))).find("no pieces"), std::string::npos);
    EXPECT_NE(msg(field(1, field(1, ""))).find("empty or missing name"), std::string::npos);
    EXPECT_NE(msg(std::string("\x0a\xff", 2)).find("protobuf encoding is broken"), std::string::npos);
    auto u = units_sound();
    u[0] = unit(0, false, 0x3fffff);
    std::string e = msg(model(blob(u, std::string("x\0", 2))));
    EXPECT_EQ(e.rfind("dir/m.model: not a SentencePiece model: normalizer: precompiled charsmap is corrupt", 0), 0u) << e;
}
