// tokenizer_sp_check: a protobuf wire walk over a SentencePiece ModelProto and a bounds proof of
// its precompiled charsmaps (darts-clone double array + NUL-terminated replacement strings).
#include "lib/tokenizer_sp_check.h"

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

namespace qatlab {

namespace {

// The library keeps at most this many prefix matches per position but loops over all it counts
// (kMaxTrieResultsSize in its normalizer), so no path may hold more leaves.
constexpr int kMaxLeavesOnPath = 32;

struct Wire {
    std::string_view b;
    size_t i = 0;
    const char * what;

    [[noreturn]] void fail(const std::string & why) const {
        throw std::runtime_error(std::string(what) + ": " + why + " at byte " + std::to_string(i));
    }
    uint64_t varint() {
        uint64_t r = 0;
        for (int s = 0; s < 64; s += 7) {
            if (i >= b.size()) fail("truncated varint");
            uint8_t c = uint8_t(b[i++]);
            r |= uint64_t(c & 0x7f) << s;
            if (c < 0x80) return r;
        }
        fail("varint longer than 10 bytes");
    }
    // Next field: number, wire type, and for length-delimited fields the payload.
    bool next(uint32_t & field, int & type, std::string_view & payload) {
        if (i >= b.size()) return false;
        uint64_t key = varint();
        field = uint32_t(key >> 3);
        type = int(key & 7);
        if (field == 0) fail("field number 0");
        switch (type) {
        case 0: varint(); break;
        case 1: if (b.size() - i < 8) fail("truncated fixed64"); i += 8; break;
        case 5: if (b.size() - i < 4) fail("truncated fixed32"); i += 4; break;
        case 2: {
            uint64_t n = varint();
            if (n > b.size() - i) fail("length " + std::to_string(n) + " runs past the end");
            payload = b.substr(i, size_t(n));
            i += size_t(n);
            break;
        }
        default: fail("unsupported wire type " + std::to_string(type));
        }
        return true;
    }
};

uint32_t unit_at(std::string_view trie, uint32_t id) {
    uint32_t u;
    std::memcpy(&u, trie.data() + size_t(id) * 4, 4);  // little-endian, as the library reads it
    return u;
}
bool unit_has_leaf(uint32_t u) { return (u >> 8) & 1; }
uint32_t unit_value(uint32_t u) { return u & 0x7fffffffu; }
uint32_t unit_label(uint32_t u) { return u & (0x80000000u | 0xffu); }
uint32_t unit_offset(uint32_t u) { return (u >> 10) << ((u & (1u << 9)) >> 6); }

[[noreturn]] void charsmap_fail(const char * what, const std::string & why) {
    throw std::runtime_error(std::string(what) + ": precompiled charsmap is corrupt: " + why);
}

} // namespace

// The walk mirrors darts-clone's commonPrefixSearch as the normalizer calls it: from a base b,
// input byte c reads unit b^c (any c, so the whole 256-unit block of b must exist); a unit whose
// label is c moves to base (b^c)^offset, and when it has a leaf the value unit at that base
// indexes the string blob. Bases reachable from the root are proved in bounds, acyclic, and with
// at most kMaxLeavesOnPath leaves on any path.
void sentencepiece_charsmap_check(std::string_view blob, const char * what) {
    if (blob.empty()) return;  // no trie: the library skips normalization
    if (blob.size() <= 4) charsmap_fail(what, std::to_string(blob.size()) + " bytes, too short for its header");
    uint32_t trie_size;
    std::memcpy(&trie_size, blob.data(), 4);
    if (trie_size > blob.size() - 4)
        charsmap_fail(what, "trie size " + std::to_string(trie_size) + " exceeds the " + std::to_string(blob.size() - 4) +
                                " bytes that follow");
    std::string_view trie = blob.substr(4, trie_size);
    std::string_view strings = blob.substr(4 + size_t(trie_size));
    const uint32_t n = trie_size / 4;
    if (n == 0) charsmap_fail(what, "empty trie");

    // Children of each base: a unit p with a byte label c is the child of base p^c only.
    std::vector<uint32_t> first(size_t(n) + 1, 0), child(n);
    for (uint32_t p = 0; p < n; p++) {
        uint32_t l = unit_label(unit_at(trie, p));
        if (l <= 0xff && (p ^ l) < n) first[(p ^ l) + 1]++;  // a base past the end is never reached
    }
    for (uint32_t b = 0; b < n; b++) first[b + 1] += first[b];
    {
        std::vector<uint32_t> fill(first.begin(), first.end() - 1);
        for (uint32_t p = 0; p < n; p++) {
            uint32_t l = unit_label(unit_at(trie, p));
            if (l <= 0xff && (p ^ l) < n) child[fill[p ^ l]++] = p;
        }
    }

    auto base_check = [&](uint64_t b, uint32_t from) {
        if ((b | 0xff) >= n)
            charsmap_fail(what, "node " + std::to_string(from) + " points to base " + std::to_string(b) +
                                    ", whose 256-unit block is outside the " + std::to_string(n) + "-unit trie");
    };
    uint32_t root_base = 0 ^ unit_offset(unit_at(trie, 0));
    base_check(root_base, 0);

    // Replacement strings are read with strlen: the value must start before a NUL of the blob.
    size_t last_nul = strings.find_last_of('\0');
    auto leaf_check = [&](uint32_t u, uint32_t nb, uint32_t p) {
        if (!unit_has_leaf(u)) return;
        uint32_t v = unit_value(unit_at(trie, nb));
        if (last_nul == std::string_view::npos || v > last_nul)
            charsmap_fail(what, "node " + std::to_string(p) + " maps to string offset " + std::to_string(v) +
                                    ", outside the " + std::to_string(strings.size()) +
                                    "-byte replacement table or unterminated");
    };

    // Iterative depth-first walk; depth[b] = most leaves on a path starting at base b.
    enum : uint8_t { kNew, kOpen, kDone };
    std::vector<uint8_t> state(n, kNew);
    std::vector<uint8_t> depth(n, 0);
    struct Frame { uint32_t base, k; };
    std::vector<Frame> stack{{root_base, first[root_base]}};
    state[root_base] = kOpen;
    while (!stack.empty()) {
        Frame & f = stack.back();
        if (f.k == first[f.base + 1]) {
            state[f.base] = kDone;
            stack.pop_back();
            continue;
        }
        uint32_t p = child[f.k];
        uint32_t u = unit_at(trie, p);
        uint32_t nb = p ^ unit_offset(u);
        base_check(nb, p);
        if (state[nb] == kOpen) charsmap_fail(what, "the trie has a cycle through node " + std::to_string(p));
        if (state[nb] == kNew) {  // walk the target first, fold its depth in when it is done
            leaf_check(u, nb, p);
            state[nb] = kOpen;
            stack.push_back({nb, first[nb]});
            continue;
        }
        leaf_check(u, nb, p);  // again after the walk, or a DAWG target shared with another parent
        int d = depth[nb] + (unit_has_leaf(u) ? 1 : 0);
        if (d > kMaxLeavesOnPath)
            charsmap_fail(what, "a path holds more than " + std::to_string(kMaxLeavesOnPath) + " matches");
        if (d > depth[f.base]) depth[f.base] = uint8_t(d);
        f.k++;
    }
}

void sentencepiece_model_check(std::string_view bytes, const std::string & path) {
    auto fail = [&](const std::string & why) { throw std::runtime_error(path + ": not a SentencePiece model: " + why); };
    if (bytes.empty()) fail("the file is empty");
    Wire top{bytes, 0, "model"};
    std::string_view charsmap[2];  // normalizer_spec (3), denormalizer_spec (5): the last wins, as protobuf merges
    int64_t pieces = 0;
    try {
        uint32_t field;
        int type;
        std::string_view payload;
        while (top.next(field, type, payload)) {
            if (field == 1) {  // pieces
                if (type != 2) top.fail("piece " + std::to_string(pieces) + " is not a message");
                Wire w{payload, 0, "piece"};
                uint32_t f2;
                int t2;
                std::string_view p2;
                bool named = false;
                while (w.next(f2, t2, p2))
                    if (f2 == 1 && t2 == 2) named = !p2.empty();
                if (!named) fail("piece " + std::to_string(pieces) + " has an empty or missing name");
                pieces++;
            } else if (field == 3 || field == 5) {
                if (type != 2) top.fail("normalizer spec is not a message");
                Wire w{payload, 0, field == 3 ? "normalizer spec" : "denormalizer spec"};
                uint32_t f2;
                int t2;
                std::string_view p2;
                while (w.next(f2, t2, p2))
                    if (f2 == 2 && t2 == 2) charsmap[field == 5] = p2;
            } else if (field == 2 || field == 4) {
                if (type != 2) top.fail("trainer spec or self-test data is not a message");
                Wire w{payload, 0, field == 2 ? "trainer spec" : "self-test data"};
                uint32_t f2;
                int t2;
                std::string_view p2;
                while (w.next(f2, t2, p2)) {}
            }
        }
    } catch (const std::runtime_error & e) {
        if (std::string(e.what()).rfind(path, 0) == 0) throw;
        fail(std::string("the protobuf encoding is broken (") + e.what() + ")");
    }
    if (pieces == 0) fail("it has no pieces");
    try {
        sentencepiece_charsmap_check(charsmap[0], "normalizer");
        sentencepiece_charsmap_check(charsmap[1], "denormalizer");
    } catch (const std::runtime_error & e) {
        fail(e.what());
    }
}

} // namespace qatlab
