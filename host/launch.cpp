// launch: `qatlab run --nproc N`: one node's data-parallel launcher. Spawns N copies of qatlab with
// torchrun's variables on 127.0.0.1 and a free port, forwards signals, ends all when one fails.
#include "host/host.h"

#include <arpa/inet.h>
#include <csignal>
#include <cstring>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdexcept>
#include <string>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <vector>

namespace qatlab {

namespace {

volatile sig_atomic_t g_signal = 0;

void on_signal(int sig) { g_signal = sig; }
// Wakes poll() the moment a rank exits, so the first failure is told apart from its echoes.
void on_child(int) {}

double now_s() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// A port the kernel just handed out on 127.0.0.1 (rank 0's TCPStore binds it a moment later).
int port_free() {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) throw std::runtime_error(std::string("--nproc: socket: ") + strerror(errno));
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    if (bind(fd, (sockaddr *)&a, sizeof a) != 0 || getsockname(fd, (sockaddr *)&a, &len) != 0) {
        close(fd);
        throw std::runtime_error(std::string("--nproc: cannot find a free port: ") + strerror(errno));
    }
    close(fd);
    return ntohs(a.sin_port);
}

void write_all(int fd, const char * p, size_t n) {
    while (n > 0) {
        ssize_t k = write(fd, p, n);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) return;
        p += k;
        n -= (size_t)k;
    }
}

// One output stream of a rank > 0: complete lines go out as "[rank r] line".
struct Stream {
    int fd = -1, out_fd = 1, rank = 0;
    std::string partial;
    void emit(const std::string & line) {
        std::string s = "[rank " + std::to_string(rank) + "] " + line + "\n";
        write_all(out_fd, s.data(), s.size());
    }
    // false at end of file.
    bool pump() {
        char buf[4096];
        ssize_t k = read(fd, buf, sizeof buf);
        if (k < 0 && (errno == EINTR || errno == EAGAIN)) return true;
        if (k <= 0) {
            if (!partial.empty()) emit(partial);
            partial.clear();
            close(fd);
            fd = -1;
            return false;
        }
        partial.append(buf, (size_t)k);
        size_t nl;
        while ((nl = partial.find('\n')) != std::string::npos) {
            emit(partial.substr(0, nl));
            partial.erase(0, nl + 1);
        }
        return true;
    }
};

struct Child {
    pid_t pid = -1;
    bool done = false;
    int code = 0;
};

std::string exe_path() {
    char buf[4096];
    ssize_t n = readlink("/proc/self/exe", buf, sizeof buf - 1);
    if (n <= 0) throw std::runtime_error("--nproc: cannot read /proc/self/exe");
    return std::string(buf, (size_t)n);
}

int exit_code(int status) {
    if (WIFEXITED(status)) return WEXITSTATUS(status);
    if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
    return 1;
}

} // namespace

// A rank whose script failed says so before it tears down its process group: the peers' errors
// ("connection reset") come later, so the launcher names the rank that failed first.
void launch_report_failure(int code) {
    const char * fd = getenv("QATLAB_NPROC_FAIL_FD");
    const char * rank = getenv("RANK");
    if (!fd || !rank) return;
    std::string msg = std::string(rank) + " " + std::to_string(code) + "\n";
    write_all(atoi(fd), msg.data(), msg.size());
}

int launch_nproc(int nproc, const std::vector<std::string> & args) {
    const std::string exe = exe_path(), port = std::to_string(port_free());
    std::vector<std::string> argv_s{exe};
    argv_s.insert(argv_s.end(), args.begin(), args.end());
    std::vector<char *> argv;
    for (auto & a : argv_s) argv.push_back(const_cast<char *>(a.c_str()));
    argv.push_back(nullptr);

    struct sigaction sa{};
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    for (int sig : {SIGINT, SIGTERM, SIGHUP}) sigaction(sig, &sa, nullptr);
    sa.sa_handler = on_child;
    sigaction(SIGCHLD, &sa, nullptr);

    std::vector<Child> kids(nproc);
    std::vector<Stream> streams;
    int fail_pipe[2];
    if (pipe2(fail_pipe, 0) != 0) throw std::runtime_error(std::string("--nproc: pipe: ") + strerror(errno));
    fcntl(fail_pipe[0], F_SETFD, FD_CLOEXEC);
    const std::string fail_fd = std::to_string(fail_pipe[1]);
    for (int r = 0; r < nproc; r++) {
        int out[2] = {-1, -1}, err[2] = {-1, -1};
        if (r > 0 && (pipe2(out, O_CLOEXEC) != 0 || pipe2(err, O_CLOEXEC) != 0))
            throw std::runtime_error(std::string("--nproc: pipe: ") + strerror(errno));
        pid_t pid = fork();
        if (pid < 0) throw std::runtime_error(std::string("--nproc: fork: ") + strerror(errno));
        if (pid == 0) {
            // Own process group: a terminal's Ctrl-C reaches the launcher only, which forwards it once.
            setpgid(0, 0);
            prctl(PR_SET_PDEATHSIG, SIGTERM);
            setenv("RANK", std::to_string(r).c_str(), 1);
            setenv("LOCAL_RANK", std::to_string(r).c_str(), 1);
            setenv("WORLD_SIZE", std::to_string(nproc).c_str(), 1);
            setenv("LOCAL_WORLD_SIZE", std::to_string(nproc).c_str(), 1);
            setenv("MASTER_ADDR", "127.0.0.1", 1);
            setenv("MASTER_PORT", port.c_str(), 1);
            setenv("QATLAB_NPROC_FAIL_FD", fail_fd.c_str(), 1);
            if (r > 0) {
                int devnull = open("/dev/null", O_RDONLY);
                if (devnull >= 0) dup2(devnull, 0);
                dup2(out[1], 1);
                dup2(err[1], 2);
            }
            execv(exe.c_str(), argv.data());
            fprintf(stderr, "qatlab: --nproc: cannot run %s: %s\n", exe.c_str(), strerror(errno));
            _exit(127);
        }
        kids[r].pid = pid;
        if (r > 0) {
            close(out[1]);
            close(err[1]);
            streams.push_back(Stream{out[0], 1, r, {}});
            streams.push_back(Stream{err[0], 2, r, {}});
        }
    }

    close(fail_pipe[1]);
    int first_fail = -1, fail_code = 0, live = nproc, stopped_by = 0;
    std::string fail_text;
    double kill_at = 0;
    auto signal_all = [&](int sig) {
        for (auto & k : kids)
            if (!k.done) kill(k.pid, sig);
    };
    // Failures seen within a short window are ranked before one is named: a rank that died outright
    // (os.exit, a crash) closes its sockets before the launcher can reap it, so its peers' errors may
    // arrive first; a script error is reported before its rank tears anything down.
    struct Failure {
        int rank, code;
        bool outright;
    };
    std::vector<Failure> failures;
    std::vector<bool> reported(nproc, false);
    double decide_at = 0;
    auto fail = [&](int r, int code, bool outright) {
        for (auto & f : failures)
            if (f.rank == r) return;
        failures.push_back({r, code, outright});
        if (!decide_at) decide_at = now_s() + 0.3;
    };
    auto decide = [&]() {
        if (first_fail >= 0 || failures.empty()) return;
        const Failure * pick = &failures[0];
        for (auto & f : failures)
            if (f.outright) {
                pick = &f;
                break;
            }
        first_fail = pick->rank;
        fail_code = pick->code;
        // The others would wait on a collective for ever: stop them.
        signal_all(SIGTERM);
        kill_at = now_s() + 5;
    };
    while (live > 0 || !streams.empty()) {
        std::vector<pollfd> fds;
        for (auto & s : streams) fds.push_back({s.fd, POLLIN, 0});
        fds.push_back({fail_pipe[0], POLLIN, 0});
        int n = poll(fds.data(), fds.size(), 100);
        // Exits first: a rank that died outright comes before the failures it caused in the others.
        int status;
        pid_t pid;
        while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
            for (int r = 0; r < nproc; r++) {
                if (kids[r].pid != pid) continue;
                kids[r].done = true;
                kids[r].code = exit_code(status);
                live--;
                if (kids[r].code != 0) fail(r, kids[r].code, !reported[r]);
            }
        }
        if (n > 0 && (fds.back().revents & POLLIN)) {
            char buf[256];
            ssize_t k = read(fail_pipe[0], buf, sizeof buf);
            if (k > 0) fail_text.append(buf, (size_t)k);
            for (size_t nl; (nl = fail_text.find('\n')) != std::string::npos; fail_text.erase(0, nl + 1)) {
                int r = -1, code = 1;
                if (sscanf(fail_text.c_str(), "%d %d", &r, &code) == 2 && r >= 0 && r < nproc) {
                    reported[r] = true;
                    fail(r, code, false);
                }
            }
        }
        if (n > 0) {
            std::vector<Stream> keep;
            for (size_t i = 0; i < streams.size(); i++)
                if (!(fds[i].revents & (POLLIN | POLLHUP | POLLERR)) || streams[i].pump()) keep.push_back(streams[i]);
            streams.swap(keep);
        }
        if (g_signal) {
            int sig = g_signal;
            g_signal = 0;
            stopped_by = sig;
            signal_all(sig);
            if (!kill_at) kill_at = now_s() + 10;
        }
        if (decide_at && now_s() >= decide_at) decide();
        if (kill_at && live > 0 && now_s() > kill_at) {
            signal_all(SIGKILL);
            kill_at = 0;
        }
    }
    close(fail_pipe[0]);
    if (stopped_by) {
        fprintf(stderr, "qatlab: --nproc: stopped by signal %d (forwarded to every rank)\n", stopped_by);
        return 128 + stopped_by;
    }
    decide();
    if (first_fail >= 0) {
        fprintf(stderr, "qatlab: --nproc: rank %d failed first (status %d); the others were stopped\n", first_fail, fail_code);
        return fail_code;
    }
    return 0;
}

} // namespace qatlab
