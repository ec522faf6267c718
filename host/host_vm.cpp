// host_vm: creating the Lua state, module search paths, the per-script environment holding
// `args` and `arg`, running chunks under a traceback handler, Ctrl-C, and the REPL.
#include "host/host.h"
#include "bindings/bind.h"
#include "lib/logging.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <climits>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <unistd.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>

namespace qatlab {

// -- --set parsing ------------------------------------------------------------------------

static bool key_segment_ok(const std::string & s) {
    if (s.empty() || !(isalpha((unsigned char)s[0]) || s[0] == '_')) return false;
    for (char c : s)
        if (!(isalnum((unsigned char)c) || c == '_')) return false;
    return true;
}

bool set_value_parse(const std::string & text, SetValue & out, std::string & err) {
    size_t eq = text.find('=');
    if (eq == std::string::npos || eq == 0) {
        err = "malformed --set '" + text + "': expected key=value (for example --set lr=3e-4)";
        return false;
    }
    std::string key = text.substr(0, eq), val = text.substr(eq + 1);
    out.path.clear();
    size_t start = 0;
    for (;;) {
        size_t dot = key.find('.', start);
        std::string seg = key.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
        if (!key_segment_ok(seg)) {
            err = "malformed --set '" + text + "': key '" + key +
                  "' must be names of letters, digits and _ joined by dots";
            return false;
        }
        out.path.push_back(seg);
        if (dot == std::string::npos) break;
        start = dot + 1;
    }
    // Typed like a literal: true/false, numbers, quoted strings; anything else is a string.
    if (val == "true" || val == "false") {
        out.kind = SetValue::BOOLEAN;
        out.boolean = val == "true";
        return true;
    }
    if (val.size() >= 2 && (val[0] == '"' || val[0] == '\'') && val.back() == val[0]) {
        out.kind = SetValue::STRING;
        out.string = val.substr(1, val.size() - 2);
        return true;
    }
    if (!val.empty()) {
        char * end = nullptr;
        double d = strtod(val.c_str(), &end);
        if (end && *end == 0 && !isspace((unsigned char)val[0])) {
            out.kind = SetValue::NUMBER;
            out.number = d;
            return true;
        }
    }
    out.kind = SetValue::STRING;
    out.string = val;
    return true;
}

// -- paths ------------------------------------------------------------------------------

static bool dir_exists(const std::string & p) {
    struct stat st;
    return stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

std::string host_exe_dir() {
    char buf[4096];
    ssize_t n = readlink("/proc/self/exe", buf, sizeof(buf) - 1);
    if (n <= 0) return ".";
    buf[n] = 0;
    std::string p(buf);
    return p.substr(0, p.rfind('/'));
}

// The Lua toolkit shipped with the host: next to the build tree, an install, or the sources.
std::string host_scripts_dir() {
    std::string exe = host_exe_dir();
    for (const std::string & c : {exe + "/../scripts", exe + "/../share/qatlab/scripts", exe + "/scripts",
                                  std::string(QATLAB_SOURCE_DIR) + "/scripts"})
        if (dir_exists(c)) {
            char real[PATH_MAX];
            return realpath(c.c_str(), real) ? std::string(real) : c;
        }
    return std::string(QATLAB_SOURCE_DIR) + "/scripts";
}

static std::string dir_of(const std::string & path) {
    size_t s = path.rfind('/');
    return s == std::string::npos ? "." : path.substr(0, s);
}

// package.path: QATLAB_PATH entries, the script's folder, the toolkit, then LuaJIT's default
// (which holds Debian's /usr/share/lua/5.1, where busted lives).
static void paths_set(lua_State * L, const std::string & script_dir) {
    std::string prefix;
    auto add = [&](const std::string & d) { prefix += d + "/?.lua;" + d + "/?/init.lua;"; };
    if (const char * qp = getenv("QATLAB_PATH")) {
        std::string s(qp);
        size_t start = 0;
        while (start <= s.size()) {
            size_t c = s.find(':', start);
            std::string d = s.substr(start, c == std::string::npos ? std::string::npos : c - start);
            if (!d.empty()) add(d);
            if (c == std::string::npos) break;
            start = c + 1;
        }
    }
    if (!script_dir.empty()) add(script_dir);
    add(host_scripts_dir());
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "path");
    std::string path = prefix + lua_tostring(L, -1);
    lua_pop(L, 1);
    lua_pushstring(L, path.c_str());
    lua_setfield(L, -2, "path");
    lua_pop(L, 1);
}

// -- errors and Ctrl-C ---------------------------------------------------------------------

static int traceback_handler(lua_State * L) {
    if (!lua_isstring(L, 1)) {  // a non-string error object: show what tostring gives
        if (lua_isnoneornil(L, 1)) return 1;  // error() exits quietly with status 1 (busted's exit)
        if (luaL_callmeta(L, 1, "__tostring") && lua_isstring(L, -1)) lua_replace(L, 1);
        else lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1)), lua_replace(L, 1);
    }
    luaL_traceback(L, L, lua_tostring(L, 1), 1);
    return 1;
}

static lua_State * g_signal_L = nullptr;
static volatile sig_atomic_t g_interrupt_pending = 0;

// Ctrl-C sets a hook that raises a Lua error at the next call, return or instruction count.
// Compiled (JIT) loops that call nothing never run hooks: a watchdog counting the process's CPU
// time (not wall time, so a loaded machine that leaves the process waiting cannot trip it) fires
// after 1 s of CPU and, when the hook has not fired and no bound C++ call is running (which runs
// the hook when it returns), exits 130 with a message instead of leaving the script deaf.
// SIGINT does not restart system calls, so a blocking read returns and the hook then runs.
static void watchdog_set(int seconds) {
    struct itimerval t = {};
    t.it_value.tv_sec = seconds;
    setitimer(ITIMER_PROF, &t, nullptr);
}

static void interrupt_hook(lua_State * L, lua_Debug *) {
    lua_sethook(L, nullptr, 0, 0);
    g_interrupt_pending = 0;
    watchdog_set(0);
    luaL_error(L, "interrupted (Ctrl-C)");
}

static void interrupt_watchdog(int) {
    if (!g_interrupt_pending) return;
    if (bind_call_depth() > 0) {   // a long C++ call: its return will run the hook
        watchdog_set(1);
        return;
    }
    static const char msg[] = "qatlab: interrupted (Ctrl-C) while the script ran a compiled Lua loop that calls "
                              "nothing (1 s of CPU without a point where Lua can stop); exiting without a traceback\n";
    ssize_t n = write(2, msg, sizeof(msg) - 1);
    (void)n;
    _exit(130);
}

static void signal_set(int sig, void (*handler)(int)) {
    struct sigaction sa = {};
    sa.sa_handler = handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0;   // no SA_RESTART: a blocking read is interrupted
    sigaction(sig, &sa, nullptr);
}

static void interrupt_signal(int sig) {
    signal_set(sig, SIG_DFL);  // a second Ctrl-C kills the process
    if (!g_signal_L) return;
    g_interrupt_pending = 1;
    lua_sethook(g_signal_L, interrupt_hook, LUA_MASKCALL | LUA_MASKRET | LUA_MASKCOUNT, 1);
    signal_set(SIGPROF, interrupt_watchdog);
    watchdog_set(1);
}

// Ctrl-C raises a Lua error in L from now on (run: the whole script; repl: each evaluation).
static void interrupt_arm(lua_State * L) {
    g_signal_L = L;
    g_interrupt_pending = 0;
    signal_set(SIGINT, interrupt_signal);
}

// Back to the default (Ctrl-C ends the process), with no hook or watchdog left pending.
static void interrupt_disarm() {
    signal_set(SIGINT, SIG_DFL);
    watchdog_set(0);
    g_interrupt_pending = 0;
    if (g_signal_L) lua_sethook(g_signal_L, nullptr, 0, 0);
    g_signal_L = nullptr;
}

// qatlab.time(): monotonic wall-clock seconds, for timing runs (os.clock is CPU time).
static int host_time(lua_State * L) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    lua_pushnumber(L, (lua_Number)ts.tv_sec + 1e-9 * (lua_Number)ts.tv_nsec);
    return 1;
}

// qatlab.isatty(fd): whether a file descriptor (2 = stderr) is a terminal, for progress bars.
static int host_isatty(lua_State * L) {
    lua_pushboolean(L, isatty((int)luaL_checkinteger(L, 1)) == 1);
    return 1;
}

// -- the VM -------------------------------------------------------------------------------

// The trial a sweep worker was started for (scripts/sweep_workers.lua): this process's alone, so it is taken
// out of the environment before anything else runs; the qatlab processes a trial starts are not workers.
static const char * SWEEP_WORKER_ENV = "QATLAB_SWEEP_WORKER";

static std::string env_take(const char * name) {
    const char * v = getenv(name);
    std::string s = v ? v : "";
    if (v) unsetenv(name);
    return s;
}

HostVm::HostVm(const HostOptions & opt) : opt_(opt) {
    const std::string sweep_worker = env_take(SWEEP_WORKER_ENV);
    L_ = luaL_newstate();
    if (!L_) throw std::runtime_error("cannot create a Lua state (out of memory)");
    luaL_openlibs(L_);
    bind_open_all(L_);
    paths_set(L_, opt.script.empty() ? std::string(".") : dir_of(opt.script));

    default_device() = c10::Device(opt.device);
    if (opt.threads > 0) at::set_num_threads(opt.threads);
    if (opt.seed >= 0) {
        at::manual_seed((uint64_t)opt.seed);
        lua_getglobal(L_, "math");
        lua_getfield(L_, -1, "randomseed");
        lua_pushnumber(L_, (lua_Number)opt.seed);
        lua_call(L_, 1, 0);
        lua_pop(L_, 1);
    }

    // require 'qatlab': what the host was asked to do (device, out, seed, version...).
    lua_getglobal(L_, "package");
    lua_getfield(L_, -1, "loaded");
    lua_newtable(L_);
    auto setstr = [&](const char * k, const std::string & v) { lua_pushstring(L_, v.c_str()); lua_setfield(L_, -2, k); };
    setstr("version", QATLAB_VERSION);
    lua_pushcfunction(L_, host_time);
    lua_setfield(L_, -2, "time");
    lua_pushcfunction(L_, host_isatty);
    lua_setfield(L_, -2, "isatty");
    setstr("device", opt.device);
    setstr("scripts_dir", host_scripts_dir());
    {
        char exe[PATH_MAX];
        ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
        if (n > 0) setstr("executable", std::string(exe, size_t(n)));
    }
    if (!opt.out_dir.empty()) setstr("out", opt.out_dir);
    if (!opt.script.empty()) {
        setstr("script", opt.script);
        setstr("script_dir", dir_of(opt.script));
    }
    if (opt.seed >= 0) {
        lua_pushnumber(L_, (lua_Number)opt.seed);
        lua_setfield(L_, -2, "seed");
    }
    if (!sweep_worker.empty()) setstr("sweep_worker", sweep_worker);
    lua_newtable(L_);  // argv: the command line as given (argv[0] at 1), for rerunning it
    for (size_t i = 0; i < opt.argv.size(); i++) {
        lua_pushlstring(L_, opt.argv[i].data(), opt.argv[i].size());
        lua_rawseti(L_, -2, (int)i + 1);
    }
    lua_setfield(L_, -2, "argv");
    lua_setfield(L_, -2, "qatlab");
    lua_pop(L_, 2);

    interrupt_arm(L_);
}

HostVm::~HostVm() {
    interrupt_disarm();
    lua_close(L_);  // runs every __gc: tensors are released before LibTorch shuts down
}

// The script's environment: a table holding args and arg, reading through to _G, so that
// nothing is added to the globals shared with modules.
void HostVm::push_env() {
    lua_State * L = L_;
    lua_newtable(L);                       // env
    lua_newtable(L);                       // args
    for (const SetValue & s : opt_.sets) {
        int t = lua_gettop(L);
        lua_pushvalue(L, t);
        for (size_t i = 0; i + 1 < s.path.size(); i++) {
            lua_getfield(L, -1, s.path[i].c_str());
            if (lua_isnil(L, -1)) {
                lua_pop(L, 1);
                lua_newtable(L);
                lua_pushvalue(L, -1);
                lua_setfield(L, -3, s.path[i].c_str());
            }
            lua_remove(L, -2);
        }
        if (s.kind == SetValue::NUMBER) lua_pushnumber(L, s.number);
        else if (s.kind == SetValue::BOOLEAN) lua_pushboolean(L, s.boolean);
        else lua_pushlstring(L, s.string.data(), s.string.size());
        lua_setfield(L, -2, s.path.back().c_str());
        lua_settop(L, t);
    }
    lua_setfield(L, -2, "args");
    lua_newtable(L);                       // arg, as the lua/luajit executables set it
    lua_pushstring(L, opt_.script.c_str());
    lua_rawseti(L, -2, 0);
    for (size_t i = 0; i < opt_.script_args.size(); i++) {
        lua_pushstring(L, opt_.script_args[i].c_str());
        lua_rawseti(L, -2, (int)i + 1);
    }
    lua_setfield(L, -2, "arg");
    lua_newtable(L);                       // metatable: reads fall through to _G
    lua_pushvalue(L, LUA_GLOBALSINDEX);
    lua_setfield(L, -2, "__index");
    lua_setmetatable(L, -2);
}

// Stack: chunk. Sets its env, passes (args, arg) as ..., runs under the traceback handler.
int HostVm::call_chunk(int) {
    lua_State * L = L_;
    int chunk = lua_gettop(L);
    push_env();
    lua_pushvalue(L, -1);
    lua_setfenv(L, chunk);
    lua_getfield(L, -1, "args");
    lua_getfield(L, -2, "arg");
    lua_remove(L, -3);                     // chunk, args, arg
    lua_pushcfunction(L, traceback_handler);
    lua_insert(L, chunk);                  // handler, chunk, args, arg
    int status = lua_pcall(L, 2, 0, chunk);
    if (status != 0) {
        const char * msg = lua_tostring(L, -1);
        if (msg) {
            std::cerr << "qatlab: " << msg << std::endl;
            log_write_file(LOG_ERROR, std::string("uncaught error: ") + msg);  // headless runs keep why
        }
        lua_settop(L, chunk - 1);
        return 1;
    }
    lua_settop(L, chunk - 1);
    return 0;
}

int HostVm::run_file(const std::string & path) {
    if (luaL_loadfilex(L_, path.c_str(), "t") != 0) {
        std::cerr << "qatlab: " << lua_tostring(L_, -1) << std::endl;
        lua_pop(L_, 1);
        return 1;
    }
    return call_chunk(0);
}

int HostVm::run_string(const std::string & code, const char * chunkname) {
    if (luaL_loadbufferx(L_, code.data(), code.size(), chunkname, "t") != 0) {
        std::cerr << "qatlab: " << lua_tostring(L_, -1) << std::endl;
        lua_pop(L_, 1);
        return 1;
    }
    return call_chunk(0);
}

// -- REPL ---------------------------------------------------------------------------------
// Expressions are tried first ("return <line>") and their values printed; an incomplete
// statement (error at <eof>) asks for more lines.

static bool incomplete(lua_State * L, int status) {
    if (status != LUA_ERRSYNTAX) return false;
    size_t len;
    const char * msg = lua_tolstring(L, -1, &len);
    return len >= 5 && strstr(msg, "<eof>") != nullptr;
}

int HostVm::repl() {
    lua_State * L = L_;
    bool tty = isatty(0);
    push_env();
    int env = lua_gettop(L);
    interrupt_disarm();   // as lua.c: Ctrl-C at the prompt quits, during an evaluation it interrupts it
    if (tty) std::cout << "qatlab " << QATLAB_VERSION << " (LuaJIT, LibTorch) — Ctrl-D to quit\n";
    std::string buffer, line;
    for (;;) {
        if (tty) std::cout << (buffer.empty() ? "> " : ">> ") << std::flush;
        if (!std::getline(std::cin, line)) break;
        if (buffer.empty() && !line.empty() && line[0] == '=') line = "return " + line.substr(1);
        buffer += (buffer.empty() ? "" : "\n") + line;
        std::string expr = "return " + buffer;
        int status = luaL_loadbufferx(L, expr.data(), expr.size(), "=stdin", "t");
        if (status != 0) {
            lua_pop(L, 1);
            status = luaL_loadbufferx(L, buffer.data(), buffer.size(), "=stdin", "t");
            if (incomplete(L, status)) {
                lua_pop(L, 1);
                continue;
            }
        }
        buffer.clear();
        if (status != 0) {
            std::cerr << lua_tostring(L, -1) << std::endl;
            lua_pop(L, 1);
            continue;
        }
        lua_pushvalue(L, env);
        lua_setfenv(L, -2);
        int chunk = lua_gettop(L);
        lua_pushcfunction(L, traceback_handler);
        lua_insert(L, chunk);
        interrupt_arm(L);
        status = lua_pcall(L, 0, LUA_MULTRET, chunk);
        interrupt_disarm();
        if (status != 0) {
            const char * msg = lua_tostring(L, -1);  // NULL after error(nil)
            std::cerr << (msg ? msg : "(error object is a nil value)") << std::endl;
        } else {
            int n = lua_gettop(L) - chunk;
            for (int i = 1; i <= n; i++) {
                lua_getglobal(L, "tostring");
                lua_pushvalue(L, chunk + i);
                lua_call(L, 1, 1);
                std::cout << (i > 1 ? "\t" : "") << lua_tostring(L, -1);
                lua_pop(L, 1);
            }
            if (n > 0) std::cout << std::endl;
        }
        lua_settop(L, env);
    }
    if (tty) std::cout << std::endl;
    lua_settop(L, env - 1);
    return 0;
}

} // namespace qatlab
