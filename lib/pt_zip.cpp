// pt_zip: the memory-mapped reader of the stored-entry zip archives torch.save writes (ZIP64 too).
// Hostile archives end in a std::runtime_error naming the file and the entry, never a crash.
#include "lib/pt_zip.h"
#include "lib/file_map.h"

#include <cstdio>
#include <cstring>
#include <stdexcept>

namespace qatlab {

void pt_fail(const std::string & path, const std::string & key, const std::string & what) {
    throw std::runtime_error(path + ": " + key + ": " + what);
}


namespace {

uint16_t rd16(const uint8_t * p) { uint16_t v; std::memcpy(&v, p, 2); return v; }
uint32_t rd32(const uint8_t * p) { uint32_t v; std::memcpy(&v, p, 4); return v; }
uint64_t rd64(const uint8_t * p) { uint64_t v; std::memcpy(&v, p, 8); return v; }

constexpr uint32_t sig_local = 0x04034b50, sig_central = 0x02014b50, sig_eocd = 0x06054b50,
                   sig_eocd64 = 0x06064b50, sig_locator64 = 0x07064b50;

std::string hex32(uint32_t v) {
    char b[16];
    std::snprintf(b, sizeof b, "0x%08x", v);
    return b;
}

std::shared_ptr<FileMap> file_map(const std::string & path, uint64_t & size) {
    std::shared_ptr<FileMap> map = file_map_open(path);
    size = map->size;
    if (size < 22)
        pt_fail(path, "zip", "expected a zip archive (torch.save format) of at least 22 bytes, found " +
                  std::to_string(size) + " bytes");
    return map;
}

// Reads the ZIP64 extended-information extra field: values present only for saturated fields.
void zip64_extra(const PtZipArchive & z, const std::string & name, const uint8_t * p, uint64_t n,
                 uint64_t & usize, uint64_t & csize, uint64_t & offset) {
    const bool want_u = usize == 0xffffffffu, want_c = csize == 0xffffffffu, want_o = offset == 0xffffffffu;
    uint64_t i = 0;
    while (i + 4 <= n) {
        const uint16_t id = rd16(p + i), len = rd16(p + i + 2);
        if (!pt_span_ok(i + 4, len, n))
            pt_fail(z.path, "zip entry '" + name + "'", "extra field " + hex32(id) +
                      " of " + std::to_string(len) + " bytes runs past the extra area of " +
                      std::to_string(n) + " bytes");
        if (id == 0x0001) {
            const uint8_t * f = p + i + 4;
            uint64_t k = 0;
            auto take = [&](uint64_t & v, const char * what) {
                if (k + 8 > len)
                    pt_fail(z.path, "zip entry '" + name + "'", std::string("ZIP64 extra field: expected ") +
                              what + ", found only " + std::to_string(len) + " bytes");
                v = rd64(f + k);
                k += 8;
            };
            if (want_u) take(usize, "the uncompressed size");
            if (want_c) take(csize, "the compressed size");
            if (want_o) take(offset, "the local header offset");
            return;
        }
        i += 4 + uint64_t(len);
    }
    if (want_u || want_c || want_o)
        pt_fail(z.path, "zip entry '" + name + "'", "expected a ZIP64 extra field for its saturated "
                  "size or offset, found none");
}

} // namespace

PtZipArchive pt_zip_open(const std::string & path) {
    PtZipArchive z;
    z.path = path;
    z.mapping = file_map(path, z.size);
    z.base = z.mapping->data;
    const uint8_t * b = z.base;

    if (z.size >= 4 && b[0] == 0x80 && b[1] == 0x02 && b[2] == 0x8a && b[3] == 0x0a)
        pt_fail(path, "file", "expected the zip format of torch.save, found the legacy format (PyTorch "
                  "< 1.6 or _use_new_zipfile_serialization=False); re-save it with a current PyTorch");

    // The end record sits in the last 22 bytes plus at most a 64 KiB comment.
    uint64_t eocd = UINT64_MAX;
    const uint64_t lowest = z.size > 22 + 0xffff ? z.size - 22 - 0xffff : 0;
    for (uint64_t p = z.size - 22 + 1; p-- > lowest;) {
        if (rd32(b + p) == sig_eocd && p + 22 + rd16(b + p + 20) <= z.size) {
            eocd = p;
            break;
        }
    }
    if (eocd == UINT64_MAX)
        pt_fail(path, "zip", "expected an end-of-central-directory record (a torch.save file is a zip "
                  "archive), found none: the file is truncated or not a zip archive");
    if (rd16(b + eocd + 4) != 0 || rd16(b + eocd + 6) != 0)
        pt_fail(path, "zip", "expected a single-disk archive, found a multi-disk one");
    uint64_t count = rd16(b + eocd + 10), cd_size = rd32(b + eocd + 12), cd_off = rd32(b + eocd + 16);
    uint64_t cd_limit = eocd;   // the central directory must end before the end records

    // torch.save always writes ZIP64 end records; they are required when a field is saturated.
    const bool saturated = count == 0xffff || cd_size == 0xffffffffu || cd_off == 0xffffffffu;
    if (eocd >= 20 && rd32(b + eocd - 20) == sig_locator64) {
        const uint64_t loc = eocd - 20;
        const uint64_t e64 = rd64(b + loc + 8);
        if (!pt_span_ok(e64, 56, loc))
            pt_fail(path, "zip", "ZIP64 end record offset " + std::to_string(e64) +
                      " is outside the file (expected at most " + std::to_string(loc >= 56 ? loc - 56 : 0) + ")");
        if (rd32(b + e64) != sig_eocd64)
            pt_fail(path, "zip", "expected the ZIP64 end record signature at offset " + std::to_string(e64) +
                      ", found " + hex32(rd32(b + e64)));
        count = rd64(b + e64 + 32);
        cd_size = rd64(b + e64 + 40);
        cd_off = rd64(b + e64 + 48);
        cd_limit = e64;
    } else if (saturated) {
        pt_fail(path, "zip", "expected a ZIP64 end-of-central-directory locator (the end record's "
                  "fields are saturated), found none");
    }
    if (!pt_span_ok(cd_off, cd_size, cd_limit))
        pt_fail(path, "zip", "central directory [" + std::to_string(cd_off) + ", +" + std::to_string(cd_size) +
                  ") lies outside the file before its end records (at " + std::to_string(cd_limit) + ")");
    if (count > cd_size / 46)
        pt_fail(path, "zip", "central directory of " + std::to_string(cd_size) + " bytes cannot hold " +
                  std::to_string(count) + " entries (46 bytes each at least)");

    z.entries.reserve(size_t(count));
    uint64_t p = cd_off;
    const uint64_t cd_end = cd_off + cd_size;
    for (uint64_t i = 0; i < count; ++i) {
        const std::string where = "zip central directory entry " + std::to_string(i);
        if (!pt_span_ok(p, 46, cd_end)) pt_fail(path, where, "runs past the end of the central directory");
        if (rd32(b + p) != sig_central)
            pt_fail(path, where, "expected signature " + hex32(sig_central) + ", found " + hex32(rd32(b + p)));
        const uint16_t flags = rd16(b + p + 8), method = rd16(b + p + 10);
        uint64_t csize = rd32(b + p + 20), usize = rd32(b + p + 24);
        const uint16_t nlen = rd16(b + p + 28), xlen = rd16(b + p + 30), clen = rd16(b + p + 32);
        uint64_t local = rd32(b + p + 42);
        if (!pt_span_ok(p + 46, uint64_t(nlen) + xlen + clen, cd_end))
            pt_fail(path, where, "name and extra fields run past the end of the central directory");
        PtZipEntry e;
        e.name.assign(reinterpret_cast<const char *>(b + p + 46), nlen);
        const std::string key = "zip entry '" + e.name + "'";
        zip64_extra(z, e.name, b + p + 46 + nlen, xlen, usize, csize, local);
        p += 46 + uint64_t(nlen) + xlen + clen;

        if (flags & 1) pt_fail(path, key, "expected an unencrypted entry, found an encrypted one");
        if (method != 0)
            pt_fail(path, key, "expected a stored (uncompressed) entry as torch.save writes, found "
                      "compression method " + std::to_string(method) + (method == 8 ? " (deflate)" : "") +
                      "; re-save the file with torch.save");
        if (csize != usize)
            pt_fail(path, key, "stored entry: expected equal compressed and uncompressed sizes, found " +
                      std::to_string(csize) + " and " + std::to_string(usize));
        if (!pt_span_ok(local, 30, z.size))
            pt_fail(path, key, "local header offset " + std::to_string(local) + " is outside the file of " +
                      std::to_string(z.size) + " bytes");
        if (rd32(b + local) != sig_local)
            pt_fail(path, key, "expected a local header signature at offset " + std::to_string(local) +
                      ", found " + hex32(rd32(b + local)));
        const uint64_t lnlen = rd16(b + local + 26), lxlen = rd16(b + local + 28);
        if (!pt_span_ok(local + 30, lnlen + lxlen, z.size))
            pt_fail(path, key, "local header runs past the end of the file");
        if (lnlen != nlen || std::memcmp(b + local + 30, e.name.data(), nlen) != 0)
            pt_fail(path, key, "local header names '" +
                      std::string(reinterpret_cast<const char *>(b + local + 30), lnlen) +
                      "', expected the central directory's name");
        e.data = local + 30 + lnlen + lxlen;
        e.size = usize;
        if (!pt_span_ok(e.data, e.size, z.size))
            pt_fail(path, key, "data [" + std::to_string(e.data) + ", +" + std::to_string(e.size) +
                      ") runs past the end of the file of " + std::to_string(z.size) + " bytes (truncated?)");
        if (!z.by_name.emplace(e.name, z.entries.size()).second)
            pt_fail(path, key, "expected unique entry names, found a duplicate");
        z.entries.push_back(std::move(e));
    }
    return z;
}

} // namespace qatlab
