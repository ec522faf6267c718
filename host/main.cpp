// main: the qatlab command line: run (and run --nproc N, see launch.cpp), -e, repl, version, and --help
// for each; logging set-up. Exit status: 0 ok, 1 script error (message + traceback), 2 bad command line.
#include "host/host.h"
#include "bindings/bind.h"

#include <ATen/ATen.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <cxxopts.hpp>
#include <luajit.h>
#include "lib/logging.h"
#include <torch/version.h>
#include <dlfcn.h>
#include <cerrno>
#include <climits>
#include <cstring>
#include <iostream>
#include <sys/stat.h>
#include <unistd.h>
#ifdef QATLAB_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#endif

using namespace qatlab;

namespace qatlab {
int launch_nproc(int nproc, const std::vector<std::string> & args);  // host/launch.cpp
void launch_report_failure(int code);                                // before the VM closes
}

namespace {

const char * USAGE =
    "qatlab — quantization-aware training experiments in Lua on LibTorch\n"
    "\n"
    "usage:\n"
    "  qatlab run SCRIPT.lua [options] [-- script args]   run a script\n"
    "  qatlab SCRIPT.lua [options] [-- script args]       same as run\n"
    "  qatlab run --nproc N SCRIPT.lua [...]              N data-parallel ranks on this machine\n"
    "  qatlab -e 'lua code' [options]                     run a chunk of code\n"
    "  qatlab repl [options]                              interactive prompt\n"
    "  qatlab version                                     versions and CUDA devices\n"
    "  qatlab COMMAND --help                              help on a command\n"
    "\n"
    "Scripts read --set values from `args` (local args = ...) and require modules:\n"
    "torch, log, qatlab, and the Lua toolkit in scripts/.\n";

struct UsageError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// The command line as given, before any option is taken out: require('qatlab').argv.
std::vector<std::string> g_argv;

// The whole number given to --NAME, within [lo, hi]; else a usage error naming the option and what it expects.
long long int_option(const std::string & name, const std::string & v, long long lo, long long hi,
                     const char * expected) {
    char * end = nullptr;
    errno = 0;
    long long k = strtoll(v.c_str(), &end, 10);
    if (v.empty() || isspace((unsigned char)v[0]) || *end || errno == ERANGE || k < lo || k > hi)
        throw UsageError("--" + name + " expects " + expected + ", got '" + v + "'");
    return k;
}

int print_version() {
    std::cout << "qatlab " << QATLAB_VERSION << "\n";
    std::cout << "LibTorch " << TORCH_VERSION << "\n";
    std::cout << LUAJIT_VERSION << "\n";
    // The allocator that really runs: mimalloc exports mi_version when it is loaded.
    if (auto mi_version = (int (*)())dlsym(RTLD_DEFAULT, "mi_version")) {
        int v = mi_version();
        std::cout << "allocator: mimalloc " << v / 100 << "." << (v / 10) % 10 << "." << v % 10 << "\n";
    } else {
        std::cout << "allocator: glibc malloc\n";
    }
    int n = at::detail::getCUDAHooks().getNumGPUs();
    std::cout << "CUDA devices: " << n << "\n";
#ifdef QATLAB_WITH_CUDA
    for (int i = 0; i < n; i++) {
        auto * p = at::cuda::getDeviceProperties(i);
        std::cout << "  cuda:" << i << " " << p->name << ", " << (p->totalGlobalMem >> 20) << " MiB, sm_"
                  << p->major << p->minor << "\n";
    }
#endif
    return 0;
}

std::string device_resolve(const std::string & d) {
    int n = at::detail::getCUDAHooks().getNumGPUs();
    if (d == "auto") return n > 0 ? "cuda:0" : "cpu";
    if (d == "cpu") return d;
    if (d == "cuda" || d.rfind("cuda:", 0) == 0) {
        int idx = d == "cuda" ? 0 : atoi(d.c_str() + 5);
        if (d != "cuda" && (d.size() == 5 || strspn(d.c_str() + 5, "0123456789") != d.size() - 5))
            throw UsageError("--device '" + d + "': expected auto, cpu, cuda or cuda:N");
        if (idx >= n)
            throw UsageError("--device " + d + ": " + std::to_string(n) +
                             " CUDA device(s) seen (this LibTorch " +
                             (at::hasCUDA() ? "has CUDA" : "is a CPU build") + "); use --device cpu or auto");
        return "cuda:" + std::to_string(idx);
    }
    throw UsageError("--device '" + d + "': expected auto, cpu, cuda or cuda:N");
}

// The rank a launcher gave this process (torchrun, srun, --nproc); 0 when launched alone.
int launch_rank() {
    const char * r = getenv("RANK");
    if (!r || !*r) r = getenv("SLURM_PROCID");
    return r && *r ? atoi(r) : 0;
}

void logging_setup(const std::string & level, const std::string & out_dir) {
    LogLevel lv;
    if (!log_level_parse(level, lv))
        throw UsageError("--log-level '" + level + "': expected trace, debug, info, warn, error, critical or off");
    log_set_level(lv);
    // Only rank 0 owns OUT/qatlab.log; the others would interleave their lines into it.
    log_setup(out_dir.empty() || launch_rank() != 0 ? "" : out_dir + "/qatlab.log");
}

void mkdir_p(const std::string & dir) {
    std::string cur;
    for (size_t i = 0; i <= dir.size(); i++) {
        if (i == dir.size() || dir[i] == '/') {
            if (!cur.empty() && mkdir(cur.c_str(), 0755) != 0 && errno != EEXIST)
                throw UsageError("--out " + dir + ": cannot create '" + cur + "': " + strerror(errno));
        }
        if (i < dir.size()) cur += dir[i];
    }
    struct stat st;
    if (stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
        throw UsageError("--out " + dir + ": exists and is not a directory");
}

// Options shared by run, -e and repl.
void options_add_common(cxxopts::Options & o) {
    o.add_options()
        ("set", "set args.KEY = VALUE (typed: number, true/false, string; KEY may be dotted)",
         cxxopts::value<std::vector<std::string>>())
        ("device", "default device: auto, cpu, cuda, cuda:N", cxxopts::value<std::string>()->default_value("auto"))
        // Numbers are taken as text and checked here, so that a bad one is reported with its option's name.
        ("seed", "seed torch and math.random (an integer >= 0)", cxxopts::value<std::string>())
        ("threads", "intra-op CPU threads (an integer >= 1)", cxxopts::value<std::string>())
        ("out", "output directory (created; log copied to OUT/qatlab.log)", cxxopts::value<std::string>())
        ("log-level", "trace, debug, info, warn, error, critical, off",
         cxxopts::value<std::string>()->default_value("info"))
        ("h,help", "show this help");
}

// --set values may hold commas, which cxxopts would split: take them out first.
std::vector<std::string> take_sets(std::vector<std::string> & args) {
    std::vector<std::string> sets, rest;
    for (size_t i = 0; i < args.size(); i++) {
        if (args[i] == "--set") {
            if (i + 1 >= args.size()) throw UsageError("--set needs a key=value after it");
            sets.push_back(args[++i]);
        } else if (args[i].rfind("--set=", 0) == 0) {
            sets.push_back(args[i].substr(6));
        } else {
            rest.push_back(args[i]);
        }
    }
    args = rest;
    return sets;
}

int run_command(const std::string & cmd, std::vector<std::string> args) {
    // Everything after "--" belongs to the script.
    std::vector<std::string> script_args;
    for (size_t i = 0; i < args.size(); i++)
        if (args[i] == "--") {
            script_args.assign(args.begin() + i + 1, args.end());
            args.resize(i);
            break;
        }
    std::vector<std::string> sets = take_sets(args);

    cxxopts::Options o("qatlab " + cmd,
                       cmd == "run"    ? "Run a Lua script: qatlab run SCRIPT.lua [options] [-- script args]"
                       : cmd == "repl" ? "Interactive Lua prompt with torch loaded on require"
                                       : "Run a chunk of Lua code: qatlab -e 'code' [options]");
    options_add_common(o);
    if (cmd == "run") {
        o.add_options()("nproc",
                        "run N data-parallel copies on this machine (ranks 0..N-1 on 127.0.0.1, torchrun's "
                        "variables; ranks > 0 print with a '[rank r] ' prefix; exits with the first failing "
                        "rank's status after stopping the others)",
                        cxxopts::value<int>());
        o.add_options()("script", "the Lua script", cxxopts::value<std::string>());
        o.parse_positional({"script"});
        o.positional_help("SCRIPT.lua");
    } else if (cmd == "-e") {
        o.add_options()("e", "Lua code", cxxopts::value<std::string>());
        o.parse_positional({"e"});
    }
    std::vector<const char *> argv{"qatlab"};
    for (auto & a : args) argv.push_back(a.c_str());
    cxxopts::ParseResult r;
    try {
        r = o.parse((int)argv.size(), argv.data());
    } catch (const cxxopts::exceptions::exception & e) {
        throw UsageError(std::string(e.what()) + " (see qatlab " + cmd + " --help)");
    }
    if (r.count("help")) {
        std::cout << o.help() << std::endl;
        return 0;
    }
    for (const auto & u : r.unmatched()) throw UsageError("unexpected argument '" + u + "'");

    HostOptions ho;
    if (r.count("set")) {
        auto extra = r["set"].as<std::vector<std::string>>();
        sets.insert(sets.end(), extra.begin(), extra.end());
    }
    for (const std::string & s : sets) {
        SetValue v;
        std::string err;
        if (!set_value_parse(s, v, err)) throw UsageError(err);
        ho.sets.push_back(v);
    }
    ho.script_args = script_args;
    ho.device = device_resolve(r["device"].as<std::string>());
    ho.argv = g_argv;
    if (r.count("seed"))
        ho.seed = int_option("seed", r["seed"].as<std::string>(), 0, LLONG_MAX, "a non-negative integer");
    if (r.count("threads"))
        ho.threads = (int)int_option("threads", r["threads"].as<std::string>(), 1, INT_MAX, "a positive integer");
    if (r.count("out")) {
        ho.out_dir = r["out"].as<std::string>();
        mkdir_p(ho.out_dir);
    }
    logging_setup(r["log-level"].as<std::string>(), ho.out_dir);

    if (cmd == "run") {
        if (!r.count("script")) throw UsageError("run needs a script: qatlab run SCRIPT.lua");
        ho.script = r["script"].as<std::string>();
        if (access(ho.script.c_str(), R_OK) != 0)
            throw UsageError("cannot read script '" + ho.script + "': " + strerror(errno));
        HostVm vm(ho);
        int rc = vm.run_file(ho.script);
        if (rc != 0) launch_report_failure(rc);
        return rc;
    }
    if (cmd == "-e") {
        if (!r.count("e")) throw UsageError("-e needs Lua code: qatlab -e 'print(1)'");
        HostVm vm(ho);
        return vm.run_string(r["e"].as<std::string>(), "=(command line)");
    }
    HostVm vm(ho);
    return vm.repl();
}

// Takes "--nproc N" / "--nproc=N" out of the options before "--"; 0 when absent.
int take_nproc(std::vector<std::string> & args) {
    int n = 0;
    for (size_t i = 0; i < args.size() && args[i] != "--";) {
        std::string v;
        if (args[i] == "--nproc") {
            if (i + 1 >= args.size()) throw UsageError("--nproc needs a number of processes");
            v = args[i + 1];
            args.erase(args.begin() + i, args.begin() + i + 2);
        } else if (args[i].rfind("--nproc=", 0) == 0) {
            v = args[i].substr(8);
            args.erase(args.begin() + i);
        } else {
            i++;
            continue;
        }
        char * end = nullptr;
        long k = strtol(v.c_str(), &end, 10);
        if (v.empty() || *end || k < 1 || k > 1024) throw UsageError("--nproc '" + v + "': expected a number from 1 to 1024");
        n = (int)k;
    }
    return n;
}

bool wants_help(const std::vector<std::string> & args) {
    for (auto & a : args) {
        if (a == "--") return false;
        if (a == "-h" || a == "--help") return true;
    }
    return false;
}

int dispatch(int argc, char ** argv) {
    g_argv.assign(argv, argv + argc);
    std::vector<std::string> args(argv + 1, argv + argc);
    if (args.empty() || args[0] == "-h" || args[0] == "--help" || args[0] == "help") {
        std::cout << USAGE;
        return args.empty() ? 2 : 0;
    }
    std::string cmd = args[0];
    if (cmd == "version" || cmd == "--version") {
        if (args.size() > 1 && (args[1] == "--help" || args[1] == "-h")) {
            std::cout << "usage: qatlab version\nPrints the versions of qatlab, LibTorch and LuaJIT and the CUDA devices seen.\n";
            return 0;
        }
        if (args.size() > 1) throw UsageError("version takes no arguments");
        return print_version();
    }
    bool is_run = cmd == "run" || (cmd.size() > 4 && cmd.compare(cmd.size() - 4, 4, ".lua") == 0);
    if (is_run) {
        std::vector<std::string> rest(args.begin() + (cmd == "run" ? 1 : 0), args.end());
        int nproc = take_nproc(rest);
        if (nproc > 1 && !wants_help(rest)) {
            rest.insert(rest.begin(), "run");
            return launch_nproc(nproc, rest);
        }
        return run_command("run", rest);
    }
    if (cmd == "repl") return run_command(cmd, {args.begin() + 1, args.end()});
    if (cmd == "-e" || cmd.rfind("-e", 0) == 0) {
        std::vector<std::string> rest(args.begin() + 1, args.end());
        if (cmd.size() > 2) rest.insert(rest.begin(), cmd.substr(2));
        return run_command("-e", rest);
    }
    throw UsageError("unknown command '" + cmd + "' (expected run, repl, version, -e; see qatlab --help)");
}

} // namespace

int main(int argc, char ** argv) {
    try {
        int rc = dispatch(argc, argv);
        log_shutdown();
        return rc;
    } catch (const UsageError & e) {
        std::cerr << "qatlab: " << e.what() << std::endl;
        return 2;
    } catch (const std::exception & e) {  // the host itself failed (never a script error)
        std::cerr << "qatlab: " << e.what() << std::endl;
        return 1;
    }
}
