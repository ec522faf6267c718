// file_map: open, fstat and mmap a file once for every reader, with the same error wording.
// The mapping is MAP_PRIVATE and writable so tensors may be changed in place, never the file.
#include "lib/file_map.h"

#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <stdexcept>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace qatlab {

FileMap::~FileMap() {
    if (data) ::munmap(data, size);
}

std::shared_ptr<FileMap> file_map_open(const std::string & path) {
    auto fail = [&](const std::string & what) { throw std::runtime_error(path + ": file: " + what); };
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) fail(std::string("cannot open: ") + std::strerror(errno));
    struct Closer {
        int fd;
        ~Closer() { ::close(fd); }
    } closer{fd};
    struct stat st;
    if (::fstat(fd, &st) != 0) fail(std::string("cannot stat: ") + std::strerror(errno));
    if (!S_ISREG(st.st_mode))
        fail(std::string("expected a regular file, found ") + (S_ISDIR(st.st_mode) ? "a directory" : "a special file"));
    auto map = std::make_shared<FileMap>();
    map->size = size_t(st.st_size);
    if (map->size == 0) return map;
    void * addr = ::mmap(nullptr, map->size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    if (addr == MAP_FAILED) {
        map->size = 0;
        fail(std::string("cannot mmap: ") + std::strerror(errno));
    }
    map->data = static_cast<unsigned char *>(addr);
    return map;
}

} // namespace qatlab
