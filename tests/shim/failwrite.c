/* failwrite: an LD_PRELOAD shim that makes writes to chosen files fail as on a full or failing disk,
 * for the full-disk specs (tests/lua/full_disk_spec.lua). Inert unless QATLAB_FAIL_PATH is set.
 *   QATLAB_FAIL_PATH   fnmatch pattern ('*' also matches '/') of the paths affected (files opened
 *                      for writing; for op=rename, either name of the rename)
 *   QATLAB_FAIL_OP     write (default): writes past the byte budget fail; fsync, close, rename: that
 *                      call fails on an affected file (close and fclose still release it)
 *   QATLAB_FAIL_AFTER  bytes the process may write to affected files before op=write fails (default 0)
 *   QATLAB_FAIL_ERRNO  ENOSPC (default) or EIO
 * A full disk is made real rather than imitated: past the budget an affected descriptor is replaced
 * (dup2) by one of /dev/full, so the kernel itself answers ENOSPC, and stdio's buffered flushes inside
 * fclose fail as they would on a full disk. EIO is returned by the wrappers of write, pwrite, writev
 * and fwrite (stdio's own flushes cannot be reached: they stay ENOSPC). Each injected failure is
 * reported once per file on stderr as "failwrite: <op> <path>: <error>". */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <fnmatch.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#define MAX_FD 4096

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static char * tracked[MAX_FD];      /* path of an affected fd open for writing, else NULL */
static unsigned char doomed[MAX_FD];/* 1: writes fail (budget spent), 2: the failure was reported */
static const char * pattern;
static enum { OP_WRITE, OP_FSYNC, OP_CLOSE, OP_RENAME } op = OP_WRITE;
static long long budget;
static int fail_errno = ENOSPC;
static int ready;

static void setup(void) {
    if (ready) return;
    ready = 1;
    pattern = getenv("QATLAB_FAIL_PATH");
    if (pattern && !*pattern) pattern = NULL;
    const char * o = getenv("QATLAB_FAIL_OP");
    if (o && !strcmp(o, "fsync")) op = OP_FSYNC;
    else if (o && !strcmp(o, "close")) op = OP_CLOSE;
    else if (o && !strcmp(o, "rename")) op = OP_RENAME;
    const char * a = getenv("QATLAB_FAIL_AFTER");
    budget = a ? atoll(a) : 0;
    const char * e = getenv("QATLAB_FAIL_ERRNO");
    if (e && !strcmp(e, "EIO")) fail_errno = EIO;
}

#define REAL(name) static __typeof__(name) * real_##name; \
    if (!real_##name) real_##name = (__typeof__(name) *)dlsym(RTLD_NEXT, #name)

static int matches(const char * path) {
    setup();
    return pattern && path && fnmatch(pattern, path, 0) == 0;
}

static void report(const char * what, const char * path, int err) {
    char buf[4096];
    int n = snprintf(buf, sizeof buf, "failwrite: %s %s: %s\n", what, path ? path : "?", strerror(err));
    if (n > 0) {
        REAL(write);
        (void)!real_write(2, buf, (size_t)n < sizeof buf ? (size_t)n : sizeof buf - 1);
    }
}

static void track(int fd, const char * path) {
    if (fd < 0 || fd >= MAX_FD) return;
    pthread_mutex_lock(&mu);
    free(tracked[fd]);
    tracked[fd] = strdup(path);
    doomed[fd] = 0;
    pthread_mutex_unlock(&mu);
}

static void untrack(int fd) {
    if (fd < 0 || fd >= MAX_FD) return;
    pthread_mutex_lock(&mu);
    free(tracked[fd]);
    tracked[fd] = NULL;
    doomed[fd] = 0;
    pthread_mutex_unlock(&mu);
}

static int is_tracked(int fd) { return fd >= 0 && fd < MAX_FD && tracked[fd] != NULL; }

/* Past the budget: the fd now writes to /dev/full (ENOSPC from the kernel), or fails with EIO here. */
static void doom(int fd) {
    if (doomed[fd]) return;
    doomed[fd] = 1;
    if (fail_errno == ENOSPC) {
        REAL(open);
        int full = real_open("/dev/full", O_WRONLY | O_CLOEXEC);
        if (full >= 0) {
            dup2(full, fd);
            REAL(close);
            real_close(full);
        }
    }
}

static void reported(int fd) {
    if (doomed[fd] == 1) {
        doomed[fd] = 2;
        report("write", tracked[fd], fail_errno);
    }
}

/* Bytes of an n-byte write on fd that may still succeed; dooms fd when the budget runs out. */
static size_t allow(int fd, size_t n) {
    if (!is_tracked(fd) || op != OP_WRITE) return n;
    if (doomed[fd]) return 0;
    size_t ok = budget >= (long long)n ? n : (size_t)(budget > 0 ? budget : 0);
    budget -= (long long)ok;
    return ok;
}

static int opened_for_write(int flags) { return (flags & O_ACCMODE) != O_RDONLY; }

static void opened(int fd, const char * path) {
    track(fd, path);
    if (op == OP_WRITE && budget <= 0) doom(fd);
}

#define OPEN_WRAPPER(name)                                                         \
    int name(const char * path, int flags, ...) {                                  \
        mode_t mode = 0;                                                           \
        if (flags & (O_CREAT | O_TMPFILE)) {                                       \
            va_list ap;                                                            \
            va_start(ap, flags);                                                   \
            mode = va_arg(ap, mode_t);                                             \
            va_end(ap);                                                            \
        }                                                                          \
        REAL(name);                               \
        int fd = real_##name(path, flags, mode);                                   \
        if (fd >= 0 && opened_for_write(flags) && matches(path)) opened(fd, path); \
        return fd;                                                                 \
    }
OPEN_WRAPPER(open)
OPEN_WRAPPER(open64)

#define OPENAT_WRAPPER(name)                                                       \
    int name(int dirfd, const char * path, int flags, ...) {                       \
        mode_t mode = 0;                                                           \
        if (flags & (O_CREAT | O_TMPFILE)) {                                       \
            va_list ap;                                                            \
            va_start(ap, flags);                                                   \
            mode = va_arg(ap, mode_t);                                             \
            va_end(ap);                                                            \
        }                                                                          \
        REAL(name);                          \
        int fd = real_##name(dirfd, path, flags, mode);                            \
        if (fd >= 0 && opened_for_write(flags) && matches(path)) opened(fd, path); \
        return fd;                                                                 \
    }
OPENAT_WRAPPER(openat)
OPENAT_WRAPPER(openat64)

int creat(const char * path, mode_t mode) { return open(path, O_WRONLY | O_CREAT | O_TRUNC, mode); }
int creat64(const char * path, mode_t mode) { return open(path, O_WRONLY | O_CREAT | O_TRUNC, mode); }

#define FOPEN_WRAPPER(name)                                                                   \
    FILE * name(const char * path, const char * mode) {                                       \
        REAL(name);                                   \
        FILE * f = real_##name(path, mode);                                                   \
        if (f && mode && (strchr(mode, 'w') || strchr(mode, 'a') || strchr(mode, '+')) &&     \
            matches(path))                                                                    \
            opened(fileno(f), path);                                                          \
        return f;                                                                             \
    }
FOPEN_WRAPPER(fopen)
FOPEN_WRAPPER(fopen64)

ssize_t write(int fd, const void * buf, size_t n) {
    REAL(write);
    size_t ok = allow(fd, n);
    if (ok < n && ok == 0) {
        doom(fd);
        reported(fd);
        if (fail_errno == EIO) { errno = EIO; return -1; }
    }
    return real_write(fd, buf, ok < n && ok > 0 ? ok : n);
}

ssize_t pwrite(int fd, const void * buf, size_t n, off_t off) {
    REAL(pwrite);
    size_t ok = allow(fd, n);
    if (ok < n && ok == 0) {
        doom(fd);
        reported(fd);
        if (fail_errno == EIO) { errno = EIO; return -1; }
    }
    return real_pwrite(fd, buf, ok < n && ok > 0 ? ok : n, off);
}

ssize_t pwrite64(int fd, const void * buf, size_t n, off64_t off) { return pwrite(fd, buf, n, (off_t)off); }

ssize_t writev(int fd, const struct iovec * iov, int cnt) {
    REAL(writev);
    size_t total = 0;
    for (int i = 0; i < cnt; i++) total += iov[i].iov_len;
    size_t ok = allow(fd, total);
    if (ok < total) {
        if (ok > 0) {   /* a short write of the first `ok` bytes, as a filling disk gives */
            size_t done = 0;
            for (int i = 0; i < cnt && done < ok; i++) {
                size_t k = iov[i].iov_len < ok - done ? iov[i].iov_len : ok - done;
                ssize_t w = write(fd, iov[i].iov_base, k);   /* budget already taken: bypass it */
                if (w < 0) return done ? (ssize_t)done : -1;
                done += (size_t)w;
            }
            return (ssize_t)done;
        }
        doom(fd);
        reported(fd);
        if (fail_errno == EIO) { errno = EIO; return -1; }
    }
    return real_writev(fd, iov, cnt);
}

/* stdio: the part within the budget is written and flushed; then the descriptor turns into
 * /dev/full and the rest goes through stdio as usual (buffered: failing at fflush/fclose). */
size_t fwrite(const void * ptr, size_t size, size_t n, FILE * f) {
    REAL(fwrite);
    REAL(fflush);
    int fd = fileno(f);
    if (!is_tracked(fd) || op != OP_WRITE || size == 0 || doomed[fd]) {
        if (is_tracked(fd) && doomed[fd] && fail_errno == EIO) { reported(fd); errno = EIO; return 0; }
        if (is_tracked(fd) && doomed[fd]) reported(fd);
        return real_fwrite(ptr, size, n, f);
    }
    size_t bytes = size * n, ok = allow(fd, bytes);
    if (ok == bytes) return real_fwrite(ptr, size, n, f);
    size_t items = ok / size;
    if (items > 0) {
        budget += (long long)(ok - items * size);   /* whole items only */
        real_fwrite(ptr, size, items, f);
        /* The budget was charged here: let the flush's write through uncounted. */
        long long b = budget;
        budget = (long long)1 << 62;
        real_fflush(f);
        budget = b;
    }
    doom(fd);
    reported(fd);
    if (fail_errno == EIO) { errno = EIO; return items; }
    return items + real_fwrite((const char *)ptr + items * size, size, n - items, f);
}

int fsync(int fd) {
    REAL(fsync);
    if (op == OP_FSYNC && is_tracked(fd)) {
        report("fsync", tracked[fd], fail_errno);
        errno = fail_errno;
        return -1;
    }
    return real_fsync(fd);
}

int fdatasync(int fd) {
    REAL(fdatasync);
    if (op == OP_FSYNC && is_tracked(fd)) {
        report("fdatasync", tracked[fd], fail_errno);
        errno = fail_errno;
        return -1;
    }
    return real_fdatasync(fd);
}

int close(int fd) {
    REAL(close);
    int fail = op == OP_CLOSE && is_tracked(fd);
    if (fail) report("close", tracked[fd], fail_errno);
    untrack(fd);
    int rc = real_close(fd);
    if (fail) { errno = fail_errno; return -1; }
    return rc;
}

int fclose(FILE * f) {
    REAL(fclose);
    int fd = f ? fileno(f) : -1;
    int fail = op == OP_CLOSE && is_tracked(fd);
    if (fail) report("fclose", tracked[fd], fail_errno);
    if (is_tracked(fd) && doomed[fd]) reported(fd);
    untrack(fd);
    int rc = real_fclose(f);
    if (fail) { errno = fail_errno; return EOF; }
    return rc;
}

int rename(const char * from, const char * to) {
    REAL(rename);
    if (op == OP_RENAME && (matches(from) || matches(to))) {
        report("rename", to, fail_errno);
        errno = fail_errno;
        return -1;
    }
    return real_rename(from, to);
}

int renameat(int fromfd, const char * from, int tofd, const char * to) {
    REAL(renameat);
    if (op == OP_RENAME && (matches(from) || matches(to))) {
        report("rename", to, fail_errno);
        errno = fail_errno;
        return -1;
    }
    return real_renameat(fromfd, from, tofd, to);
}
