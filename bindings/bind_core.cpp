// bind_core: the error trampoline, argument readers, tensor userdata and the accounting of
// tensor memory that Lua's GC cannot see.
#include "bindings/bind.h"

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <mutex>
#include <cstdarg>
#include <csignal>
#include <cstring>
#include <unordered_map>
#ifdef QATLAB_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

namespace qatlab {

void bind_fail(const char * fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    throw BindError(buf);
}

void arg_fail(int index, const char * fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    throw ArgError(index, buf);
}

// -- trampoline -------------------------------------------------------------------------

static void msg_copy(char * dst, size_t cap, const char * src) {
    // c10 messages may end with newlines or carry a context block: keep it, trimmed.
    size_t n = strlen(src);
    while (n > 0 && (src[n - 1] == '\n' || src[n - 1] == ' ')) n--;
    if (n >= cap) n = cap - 1;
    memcpy(dst, src, n);
    dst[n] = 0;
}

// Bound calls nested inside one another (torch.no_grad(f) where f calls torch.no_grad...,
// log.info of a value whose __tostring logs) each take C stack, and LuaJIT does not count
// them: past a limit the call fails with a Lua error instead of overflowing the C stack.
// Also read by the host's Ctrl-C watchdog from a signal handler, hence sig_atomic_t.
static volatile sig_atomic_t bind_depth = 0;
static const int bind_depth_max = 200;
// Bound calls that are waiting on a Lua function they called (bind_pcall): the VM runs Lua then.
static volatile sig_atomic_t bind_callbacks = 0;

int bind_call_depth() { return bind_depth - bind_callbacks; }

int bind_pcall(lua_State * L, int nargs, int nresults) {
    bind_callbacks = bind_callbacks + 1;
    int status = lua_pcall(L, nargs, nresults, 0);
    bind_callbacks = bind_callbacks - 1;
    return status;
}
// The innermost bound call's state (see bind_current_state); not thread_local, because
// autograd may run a CUDA backward on its own thread while the bound call waits for it.
static lua_State * bind_state = nullptr;
static int bind_nargs = 0;
lua_State * bind_current_state() { return bind_state; }
int bind_call_nargs() { return bind_nargs; }

namespace {
struct DepthGuard {  // also undone when a Lua error unwinds through the frame
    lua_State * prev;
    int prev_nargs;
    DepthGuard(lua_State * L, int nargs) : prev(bind_state), prev_nargs(bind_nargs) {
        bind_depth = bind_depth + 1;
        bind_state = L;
        bind_nargs = nargs;
    }
    ~DepthGuard() {
        bind_depth = bind_depth - 1;
        bind_state = prev;
        bind_nargs = prev_nargs;
    }
};

// References whose LuaRef was destroyed, waiting for the VM's thread.
std::mutex & dead_refs_mutex() {
    static std::mutex m;
    return m;
}
std::vector<int> & dead_refs() {
    static std::vector<int> v;
    return v;
}
std::atomic<bool> dead_refs_pending{false};

void dead_refs_drain(lua_State * L) {
    std::vector<int> refs;
    {
        std::lock_guard<std::mutex> g(dead_refs_mutex());
        refs.swap(dead_refs());
        dead_refs_pending = false;
    }
    for (int r : refs) luaL_unref(L, LUA_REGISTRYINDEX, r);
}
} // namespace

LuaRef::LuaRef(lua_State * L, int idx) {
    lua_pushvalue(L, idx);
    ref_ = luaL_ref(L, LUA_REGISTRYINDEX);
}

LuaRef::~LuaRef() {
    if (ref_ == LUA_NOREF || ref_ == LUA_REFNIL) return;
    std::lock_guard<std::mutex> g(dead_refs_mutex());
    dead_refs().push_back(ref_);
    dead_refs_pending = true;
}

void LuaRef::push(lua_State * L) const { lua_rawgeti(L, LUA_REGISTRYINDEX, ref_); }

// Message handler of bind_callback: the message with the callback's own traceback.
static int callback_traceback(lua_State * L) {
    const char * msg = lua_tostring(L, 1);
    if (!msg) msg = luaL_typename(L, 1);
    lua_getglobal(L, "debug");
    if (lua_istable(L, -1)) {
        lua_getfield(L, -1, "traceback");
        if (lua_isfunction(L, -1)) {
            lua_pushstring(L, msg);
            lua_pushinteger(L, 2);
            lua_call(L, 2, 1);
            return 1;
        }
    }
    lua_pushstring(L, msg);
    return 1;
}

void bind_callback(lua_State * L, int nargs, int nresults, const std::string & what) {
    const int fn = lua_gettop(L) - nargs;
    lua_pushcfunction(L, callback_traceback);
    lua_insert(L, fn);
    bind_callbacks = bind_callbacks + 1;
    int status = lua_pcall(L, nargs, nresults, fn);
    bind_callbacks = bind_callbacks - 1;
    lua_remove(L, fn);
    if (status != 0) {
        std::string msg = lua_tostring(L, -1) ? lua_tostring(L, -1) : "error object is not a string";
        lua_pop(L, 1);
        // Keep the callback's own frames, up to the bound call that ran it: the uncaught-error
        // handler prints the caller's traceback after the message.
        // Leading [C] frames (error(), a failing op) belong to the callback.
        size_t pos = msg.find("\nstack traceback:");
        bool lua_seen = false;
        while (pos != std::string::npos) {
            size_t next = msg.find('\n', pos + 1);
            std::string line = msg.substr(pos + 1, next == std::string::npos ? std::string::npos : next - pos - 1);
            if (line.rfind("\t[C]:", 0) == 0) {
                if (lua_seen) {
                    msg.resize(pos);
                    break;
                }
            } else if (line.rfind("\t", 0) == 0) {
                lua_seen = true;
            }
            pos = next;
        }
        throw std::runtime_error(what + ": " + msg);
    }
}

// Lua's own wording for a bad argument at stack slot `index` (luaL_argerror): self is not
// counted when the call was written with ':' (ar.namewhat "method"), as in Lua itself.
// Pushes the message; holds no C++ object across the lua_error that follows.
static void arg_message_push(lua_State * L, const char * fname, int index, const char * param, const char * msg) {
    lua_Debug ar;
    bool method = lua_getstack(L, 0, &ar) && lua_getinfo(L, "n", &ar) && ar.namewhat && strcmp(ar.namewhat, "method") == 0;
    int n = index - (method ? 1 : 0);
    const char * sep = param[0] ? ": " : "";
    if (n <= 0) lua_pushfstring(L, "calling '%s' on bad self (%s%s%s)", fname, param, sep, msg);
    else lua_pushfstring(L, "bad argument #%d to '%s' (%s%s%s)", n, fname, param, sep, msg);
}

static int bind_trampoline(lua_State * L) {
    lua_CFunction fn = (lua_CFunction)lua_touserdata(L, lua_upvalueindex(2));
    if (bind_depth >= bind_depth_max)
        return luaL_error(L, "%s: C stack overflow (more than %d bound calls nested inside each other)",
                          lua_tostring(L, lua_upvalueindex(1)), bind_depth_max);
    char msg[2048];
    msg[0] = 0;
    int arg_index = 0;        // an argument error at this stack slot
    bool bind_error = false;  // a BindError: "argument #n ..." messages are argument errors
    const int base = lua_gettop(L);
    bool retried = false;
again:
    {
        bool oom = false;
        DepthGuard depth(L, base);
        if (dead_refs_pending) dead_refs_drain(L);
        try {
            return fn(L);
        } catch (const ArgError & e) {
            arg_index = e.index;
            msg_copy(msg, sizeof(msg), e.what());
        } catch (const BindError & e) {
            bind_error = true;
            msg_copy(msg, sizeof(msg), e.what());
        } catch (const c10::OutOfMemoryError & e) {
            oom = !retried;
            msg_copy(msg, sizeof(msg), e.what_without_backtrace());
        } catch (const c10::Error & e) {
            msg_copy(msg, sizeof(msg), e.what_without_backtrace());
        } catch (const std::exception & e) {
            msg_copy(msg, sizeof(msg), e.what());
        } catch (...) {
            throw;  // a Lua error unwinding through us: let it pass
        }
        if (oom) {
            // Tensors that Lua no longer references may still hold device memory.
            lua_settop(L, base);
            mem_collect(L);
            retried = true;
            goto again;
        }
    }
    // Every C++ object of the call is gone: raising a Lua error now is safe.
    const char * fname = lua_tostring(L, lua_upvalueindex(1));
    const char * inner = msg;
    char param[128];
    param[0] = 0;
    if (bind_error && strncmp(msg, "argument #", 10) == 0) {
        // "argument #n (name): rest" or "argument #n: rest", n counted as Args counts it.
        char * end = nullptr;
        long n = strtol(msg + 10, &end, 10);
        if (end && end != msg + 10 && n > 0) {
            const char * p = end;
            if (strncmp(p, " (", 2) == 0) {
                const char * close = strchr(p + 2, ')');
                if (close && close[1] == ':' && (size_t)(close - p - 2) < sizeof(param)) {
                    memcpy(param, p + 2, close - p - 2);
                    param[close - p - 2] = 0;
                    p = close + 1;
                }
            }
            if (*p == ':') {
                p++;
                while (*p == ' ') p++;
                arg_index = (int)n + (strchr(fname, ':') ? 1 : 0);
                inner = p;
                if (arg_index > base && base > 0 && lua_type(L, base) == LUA_TTABLE && param[0] &&
                    strlen(param) + 10 < sizeof(param)) {
                    // past the arguments given, with options last: the value came out of the options
                    char tmp[128];
                    snprintf(tmp, sizeof tmp, "option '%s'", param);
                    memcpy(param, tmp, sizeof tmp);
                    arg_index = base;
                }
            } else {
                param[0] = 0;
            }
        }
    }
    if (bind_error && !arg_index && strncmp(msg, "option '", 8) == 0 && base > 0 && lua_type(L, base) == LUA_TTABLE) {
        // "option 'name': rest": the trailing options table is the bad argument.
        const char * close = strstr(msg + 8, "':");
        if (close && (size_t)(close + 1 - msg) < sizeof(param)) {
            memcpy(param, msg, close + 1 - msg);
            param[close + 1 - msg] = 0;
            inner = close + 2;
            while (*inner == ' ') inner++;
            arg_index = base;
        }
    }
    if (bind_error && !arg_index && strncmp(msg, "unknown option '", 16) == 0 && base > 0 && lua_type(L, base) == LUA_TTABLE)
        arg_index = base;
    if (arg_index > 0) {
        arg_message_push(L, fname, arg_index, param, inner);
        return lua_error(L);
    }
    lua_pushstring(L, fname);
    lua_pushstring(L, ": ");
    lua_pushstring(L, msg);
    lua_concat(L, 3);
    return lua_error(L);
}

void bind_push_function(lua_State * L, const char * full_name, lua_CFunction fn) {
    lua_pushstring(L, full_name);
    lua_pushlightuserdata(L, (void *)fn);
    lua_pushcclosure(L, bind_trampoline, 2);
}

void bind_register(lua_State * L, int table_idx, const char * prefix, const BindFn * fns) {
    table_idx = table_idx < 0 ? lua_gettop(L) + table_idx + 1 : table_idx;
    std::string full;
    for (const BindFn * f = fns; f->name; f++) {
        full.assign(prefix).append(f->name);
        bind_push_function(L, full.c_str(), f->fn);
        lua_setfield(L, table_idx, f->name);
    }
}

void udata_open_metatable(lua_State * L, const char * mt, const char * name, lua_CFunction gc,
                          const BindFn * methods, lua_CFunction tostring) {
    luaL_newmetatable(L, mt);
    lua_pushstring(L, mt);
    lua_pushcclosure(L, gc, 1);
    lua_setfield(L, -2, "__gc");
    lua_pushstring(L, name);
    lua_setfield(L, -2, "__name");
    if (tostring) {
        lua_pushcfunction(L, tostring);
        lua_setfield(L, -2, "__tostring");
    }
    if (methods) {
        lua_newtable(L);
        bind_register(L, -1, (std::string(name) + ":").c_str(), methods);
        lua_setfield(L, -2, "__index");
    }
}

// -- conversions ------------------------------------------------------------------------

at::ScalarType dtype_parse(const char * s) {
    if (strncmp(s, "torch.", 6) == 0) s += 6;
    struct { const char * name; at::ScalarType t; } static const names[] = {
        {"float32", at::kFloat}, {"float", at::kFloat}, {"float16", at::kHalf}, {"half", at::kHalf},
        {"bfloat16", at::kBFloat16}, {"bf16", at::kBFloat16}, {"float64", at::kDouble},
        {"double", at::kDouble}, {"int8", at::kChar}, {"uint8", at::kByte}, {"byte", at::kByte},
        {"int16", at::kShort}, {"short", at::kShort}, {"int32", at::kInt}, {"int", at::kInt},
        {"int64", at::kLong}, {"long", at::kLong}, {"bool", at::kBool},
    };
    for (auto & n : names)
        if (strcmp(s, n.name) == 0) return n.t;
    bind_fail("unknown dtype '%s' (expected float32, float16, bfloat16, float64, int8, uint8, "
              "int16, int32, int64 or bool)", s);
}

c10::Device device_parse(const char * s) {
    c10::Device d(at::kCPU);
    try {
        d = c10::Device(std::string(s));
    } catch (const c10::Error &) {
        bind_fail("unknown device '%s' (expected 'cpu', 'cuda' or 'cuda:N')", s);
    }
    device_check_available(d);
    return d;
}

void device_check_available(const c10::Device & d) {
    if (!d.is_cuda()) return;
    int n = (int)at::detail::getCUDAHooks().getNumGPUs();
    if (n == 0)
        bind_fail("device '%s' is not available: no CUDA GPU is visible (or this is a CPU-only build)",
                  d.str().c_str());
    if (d.has_index() && d.index() >= n)
        bind_fail("device '%s' is not available: %d CUDA device(s) visible", d.str().c_str(), n);
}

int64_t dim_wrap(int64_t d, int64_t ndim) {
    int64_t n = ndim == 0 ? 1 : ndim;  // a 0-dim tensor accepts dim 1 or -1, as PyTorch's 0/-1
    if (d >= 1 && d <= n) return d - 1;
    if (d < 0 && d >= -n) return n + d;
    if (d == 0) bind_fail("dim 0 is invalid: dims are 1-based in qatlab (1..%lld, or -1 for the last)",
                          (long long)n);
    bind_fail("dim %lld out of range for a tensor of %lld dims (expected 1..%lld or -%lld..-1)",
              (long long)d, (long long)ndim, (long long)n, (long long)n);
}

c10::Scalar scalar_from_lua(lua_State * L, int idx) {
    int t = lua_type(L, idx);
    if (t == LUA_TNUMBER) {
        double v = lua_tonumber(L, idx);
        // Integral values act as Python ints; -0.0 stays a float, as Python's -0.0 does.
        if (std::floor(v) == v && std::fabs(v) < 9.2e18 && !(v == 0 && std::signbit(v)))
            return c10::Scalar((int64_t)v);
        return c10::Scalar(v);
    }
    if (t == LUA_TBOOLEAN) return c10::Scalar((bool)lua_toboolean(L, idx));
    bind_fail("expected a number or boolean, got %s", lua_typename(L, t));
}

bool is_options_table(lua_State * L, int idx) {
    if (lua_type(L, idx) != LUA_TTABLE || lua_objlen(L, idx) > 0) return false;
    if (lua_getmetatable(L, idx)) {  // size tables and other typed tables are values
        lua_pop(L, 1);
        return false;
    }
    idx = idx < 0 ? lua_gettop(L) + idx + 1 : idx;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        bool str = lua_type(L, -2) == LUA_TSTRING;
        lua_pop(L, 1);
        if (str) {
            lua_pop(L, 1);
            return true;
        }
    }
    return false;
}

// -- JSON ----------------------------------------------------------------------------------

static nlohmann::json json_read(lua_State * L, int idx, const char * what, bool empty_is_array, int depth) {
    using nlohmann::json;
    if (depth > 32) bind_fail("%s: nested too deeply (more than 32 levels)", what);
    idx = idx < 0 ? lua_gettop(L) + idx + 1 : idx;
    lua_checkstack(L, 4);
    switch (lua_type(L, idx)) {
    case LUA_TBOOLEAN: return json(lua_toboolean(L, idx) != 0);
    case LUA_TSTRING: return json(std::string(lua_tostring(L, idx)));
    case LUA_TNUMBER: {
        double d = lua_tonumber(L, idx);
        if (std::floor(d) == d && std::fabs(d) < 9e15) return json((int64_t)d);
        return json(d);
    }
    case LUA_TTABLE: {
        size_t n = lua_objlen(L, idx);
        if (n > 0) {
            json out = json::array();
            for (size_t i = 1; i <= n; i++) {
                lua_rawgeti(L, idx, (int)i);
                out.push_back(json_read(L, -1, what, empty_is_array, depth + 1));
                lua_pop(L, 1);
            }
            return out;
        }
        json out = json::object();
        lua_pushnil(L);
        while (lua_next(L, idx)) {
            if (lua_type(L, -2) != LUA_TSTRING) bind_fail("%s: table keys must be strings", what);
            out[lua_tostring(L, -2)] = json_read(L, -1, what, empty_is_array, depth + 1);
            lua_pop(L, 1);
        }
        return out.empty() && empty_is_array ? json::array() : out;
    }
    default: bind_fail("%s: cannot hold a %s value", what, luaL_typename(L, idx));
    }
}

nlohmann::json json_from_lua(lua_State * L, int idx, const char * what, bool empty_is_array) {
    return json_read(L, idx, what, empty_is_array, 0);
}

// -- Args -----------------------------------------------------------------------------

Args::Args(lua_State * L_, int first) : L(L_), first_(first) {
    int top = lua_gettop(L);
    npos_ = top - first + 1;
    if (npos_ > 0 && lua_type(L, top) == LUA_TTABLE) {
        if (is_options_table(L, top)) {
            opts_ = top;
            npos_--;
        } else if (lua_objlen(L, top) == 0 && !lua_getmetatable(L, top)) {
            lua_pushnil(L);
            if (lua_next(L, top)) {
                lua_pop(L, 2);   // keys, but none a string: a value, not options
            } else {
                opts_ = top;     // {}: options, unless read as a table argument
                opts_empty_ = true;
                npos_--;
            }
        } else if (lua_gettop(L) > top) {
            lua_pop(L, 1);       // the metatable lua_getmetatable pushed
        }
    }
    if (npos_ < 0) npos_ = 0;
}

int Args::find(int pos, const char * name, bool table_ok) {
    if (pos > max_pos_) max_pos_ = pos;
    if (pos <= 0 && name) named_ = true;
    if (pos > 0 && pos <= npos_) {
        int idx = first_ + pos - 1;
        if (!lua_isnil(L, idx)) return idx;
    }
    if (opts_empty_ && table_ok && pos == npos_ + 1) {
        // the trailing {} is this table argument, not options
        opts_empty_ = false;
        opts_ = 0;
        npos_++;
        return first_ + pos - 1;
    }
    if (opts_ && name) {
        lua_checkstack(L, 4);
        lua_getfield(L, opts_, name);
        used_.push_back(name);
        named_ = true;
        if (lua_isnil(L, -1)) {
            lua_pop(L, 1);
            return 0;
        }
        return lua_gettop(L);
    }
    return 0;
}

// The stack slot an argument error points at, and the label of the value in the message:
// the positional slot when the value came from there (or nothing was given), else the
// options table with "option 'name'".
void Args::fail(int pos, const char * name, const char * fmt, ...) {
    char body[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(body, sizeof(body), fmt, ap);
    va_end(ap);
    bool positional = pos > 0 && pos <= npos_ && !lua_isnil(L, first_ + pos - 1);
    bool from_opts = !positional && opts_ && name;
    if (from_opts) {
        lua_getfield(L, opts_, name);
        from_opts = !lua_isnil(L, -1);
        lua_pop(L, 1);
    }
    int slot;
    char label[128];
    if (from_opts || (pos <= 0 && name)) {
        slot = opts_ ? opts_ : first_ + npos_;
        snprintf(label, sizeof label, "option '%s': ", name);
    } else {
        slot = first_ + (pos > 0 ? pos : 1) - 1;
        snprintf(label, sizeof label, "%s%s", name ? name : "", name ? ": " : "");
    }
    throw ArgError(slot, std::string(label) + body);
}

at::Tensor & Args::tensor(int pos, const char * name) {
    int idx = find(pos, name);
    at::Tensor * t = idx ? tensor_test(L, idx) : nullptr;
    if (!t) fail(pos, name, "expected a Tensor, got %s", idx ? luaL_typename(L, idx) : "nothing");
    if (!t->defined()) fail(pos, name, "the tensor was freed (t:free() was called on it)");
    return *t;
}

at::Tensor * Args::opt_tensor(int pos, const char * name) {
    int idx = find(pos, name);
    if (!idx) return nullptr;
    at::Tensor * t = tensor_test(L, idx);
    if (!t) fail(pos, name, "expected a Tensor, got %s", luaL_typename(L, idx));
    if (!t->defined()) fail(pos, name, "the tensor was freed (t:free() was called on it)");
    return t;
}

double Args::number(int pos, const char * name) {
    int idx = find(pos, name);
    if (!idx || lua_type(L, idx) != LUA_TNUMBER)
        fail(pos, name, "expected a number, got %s", idx ? luaL_typename(L, idx) : "nothing");
    return lua_tonumber(L, idx);
}

double Args::opt_number(int pos, const char * name, double def) {
    return has(pos, name) ? number(pos, name) : def;
}

int64_t Args::integer(int pos, const char * name) {
    double v = number(pos, name);
    if (std::floor(v) != v || std::fabs(v) >= 9.2e18)  // also NaN, inf and beyond int64
        fail(pos, name, "expected an integer, got %g", v);
    return (int64_t)v;
}

int64_t Args::opt_integer(int pos, const char * name, int64_t def) {
    return has(pos, name) ? integer(pos, name) : def;
}

bool Args::opt_bool(int pos, const char * name, bool def) {
    int idx = find(pos, name);
    if (!idx) return def;
    if (lua_type(L, idx) != LUA_TBOOLEAN) fail(pos, name, "expected a boolean, got %s", luaL_typename(L, idx));
    return lua_toboolean(L, idx);
}

std::string Args::opt_string(int pos, const char * name, const char * def) {
    int idx = find(pos, name);
    if (!idx) return def ? def : "";
    if (lua_type(L, idx) != LUA_TSTRING) fail(pos, name, "expected a string, got %s", luaL_typename(L, idx));
    return lua_tostring(L, idx);
}

int64_t Args::dim(int pos, const char * name, int64_t ndim) {
    int64_t d = integer(pos, name);
    try {
        return dim_wrap(d, ndim);
    } catch (const BindError & e) {
        fail(pos, name, "%s", e.what());
    }
}

int64_t Args::opt_dim(int pos, const char * name, int64_t ndim, int64_t def) {
    return has(pos, name) ? dim(pos, name, ndim) : def;
}

bool Args::opt_dtype(int pos, const char * name, at::ScalarType & out) {
    int idx = find(pos, name);
    if (!idx) return false;
    if (lua_type(L, idx) != LUA_TSTRING)
        fail(pos, name, "expected a dtype name such as 'float32', got %s", luaL_typename(L, idx));
    try {
        out = dtype_parse(lua_tostring(L, idx));
    } catch (const BindError & e) {
        fail(pos, name, "%s", e.what());
    }
    return true;
}

bool Args::opt_device(int pos, const char * name, c10::Device & out) {
    int idx = find(pos, name);
    if (!idx) return false;
    if (lua_type(L, idx) != LUA_TSTRING)
        fail(pos, name, "expected a device name such as 'cuda:0', got %s", luaL_typename(L, idx));
    out = device_parse(lua_tostring(L, idx));
    return true;
}

static int64_t size_at(lua_State * L, int idx, int i) {
    if (lua_type(L, idx) != LUA_TNUMBER)
        bind_fail("size #%d: expected a number, got %s", i, luaL_typename(L, idx));
    double v = lua_tonumber(L, idx);
    if (std::floor(v) != v || v < -1 || v >= 9.2e18) bind_fail("size #%d: expected a non-negative integer, got %g", i, v);
    return (int64_t)v;
}

std::vector<int64_t> Args::sizes(int pos, const char * name) {
    std::vector<int64_t> out;
    int idx = find(pos, name, true);
    if (!idx) return out;
    if (lua_type(L, idx) == LUA_TTABLE) {
        int n = (int)lua_objlen(L, idx);
        for (int i = 1; i <= n; i++) {
            lua_rawgeti(L, idx, i);
            out.push_back(size_at(L, -1, i));
            lua_pop(L, 1);
        }
        return out;
    }
    take(npos_);
    for (int p = pos; p <= npos_; p++) out.push_back(size_at(L, first_ + p - 1, p - pos + 1));
    return out;
}

std::vector<int64_t> Args::dims(int pos, const char * name, int64_t ndim) {
    std::vector<int64_t> out;
    int idx = find(pos, name, true);
    if (!idx) return out;
    if (lua_type(L, idx) == LUA_TTABLE) {
        int n = (int)lua_objlen(L, idx);
        for (int i = 1; i <= n; i++) {
            lua_rawgeti(L, idx, i);
            double v = lua_tonumber(L, -1);
            if (lua_type(L, -1) != LUA_TNUMBER || std::floor(v) != v || std::fabs(v) >= 9.2e18)
                fail(pos, name, "entry %d is not an integer", i);
            out.push_back(dim_wrap((int64_t)v, ndim));
            lua_pop(L, 1);
        }
        return out;
    }
    out.push_back(dim(pos, name, ndim));
    return out;
}

c10::Scalar Args::scalar(int pos, const char * name) {
    int idx = find(pos, name);
    int ty = idx ? lua_type(L, idx) : LUA_TNONE;
    if (ty != LUA_TNUMBER && ty != LUA_TBOOLEAN)
        fail(pos, name, "expected a number, got %s", idx ? luaL_typename(L, idx) : "nothing");
    return scalar_from_lua(L, idx);
}

size_t edit_distance(const std::string & a, const std::string & b) {
    std::vector<size_t> row(b.size() + 1);
    for (size_t j = 0; j <= b.size(); j++) row[j] = j;
    for (size_t i = 1; i <= a.size(); i++) {
        size_t diag = row[0];
        row[0] = i;
        for (size_t j = 1; j <= b.size(); j++) {
            size_t up = row[j];
            row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] == b[j - 1] ? 0 : 1)});
            diag = up;
        }
    }
    return row[b.size()];
}

std::string Args::string(int pos, const char * name) {
    int idx = find(pos, name);
    if (!idx || lua_type(L, idx) != LUA_TSTRING)
        fail(pos, name, "expected a string, got %s", idx ? luaL_typename(L, idx) : "nothing");
    size_t n;
    const char * s = lua_tolstring(L, idx, &n);
    return std::string(s, n);
}

int Args::table(int pos, const char * name) {
    int idx = opt_table(pos, name);
    if (!idx) fail(pos, name, "expected a table, got nothing");
    return idx;
}

int Args::opt_table(int pos, const char * name) {
    int idx = find(pos, name, true);
    if (idx && lua_type(L, idx) != LUA_TTABLE) fail(pos, name, "expected a table, got %s", luaL_typename(L, idx));
    return idx;
}

int Args::opt_function(int pos, const char * name) {
    int idx = find(pos, name);
    if (idx && lua_type(L, idx) != LUA_TFUNCTION) fail(pos, name, "expected a function, got %s", luaL_typename(L, idx));
    return idx;
}

std::string closest_hint(const std::string & key, const std::vector<std::string> & known) {
    std::string best;
    size_t best_d = SIZE_MAX;
    for (auto & k : known) {
        size_t d = edit_distance(key, k);
        if (d < best_d) best_d = d, best = k;
    }
    if (best.empty() || best_d > std::max<size_t>(2, key.size() / 3)) return "";
    return " (did you mean '" + best + "'?)";
}

void strings_push(lua_State * L, const std::vector<std::string> & v) {
    lua_createtable(L, (int)v.size(), 0);
    for (size_t i = 0; i < v.size(); i++) {
        lua_pushlstring(L, v[i].data(), v[i].size());
        lua_rawseti(L, -2, (int)i + 1);
    }
}

void Args::finish() {
    for (int p = max_pos_ + 1; p <= npos_; p++) {
        int idx = first_ + p - 1;
        if (lua_isnil(L, idx)) continue;
        const char * shown = lua_type(L, idx) == LUA_TSTRING ? lua_tostring(L, idx) : nullptr;
        char what[96];
        if (shown) snprintf(what, sizeof what, "string '%.60s'", shown);
        else snprintf(what, sizeof what, "%s", luaL_typename(L, idx));
        if (max_pos_ == 0 && named_) arg_fail(idx, "expected options {...} or nothing, got %s", what);
        arg_fail(idx, "unexpected extra argument (%s): the call takes %d positional argument%s%s", what, max_pos_,
                 max_pos_ == 1 ? "" : "s", named_ ? ", then an options table" : "");
    }
    if (!opts_) return;
    lua_pushnil(L);
    while (lua_next(L, opts_)) {
        lua_pop(L, 1);
        const char * key = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : nullptr;
        bool known = false;
        for (const char * u : used_)
            if (key && strcmp(u, key) == 0) known = true;
        if (!known) {
            std::string list;
            std::vector<std::string> seen;
            std::string k = key ? key : "(non-string key)";
            for (const char * u : used_) {
                if (std::find(seen.begin(), seen.end(), u) != seen.end()) continue;
                seen.push_back(u);
                list.append(list.empty() ? "" : ", ").append(u);
            }
            lua_pop(L, 1);
            std::string hint = closest_hint(k, seen);
            arg_fail(opts_, "unknown option '%s'%s; this call takes: %s", k.c_str(), hint.c_str(),
                     list.empty() ? "no options" : list.c_str());
        }
    }
}

// -- memory accounting -----------------------------------------------------------------
// Each storage is counted once however many userdata (views) hold it. A full GC runs when
// live bytes pass max(floor, 2 x live after the last GC), per device kind.

namespace {
// Open addressing keyed by StorageImpl address: one probe per push and per __gc, and no
// allocation per tensor (a node-based map's malloc/free showed up in small-op profiles).
struct StorageRef {
    const void * key;   // nullptr: empty slot
    int64_t users;
    int64_t bytes;
    bool cuda;
};
struct StorageTable {
    std::vector<StorageRef> slots = std::vector<StorageRef>(1024);
    size_t count = 0;
    size_t home(const void * k) const {
        uint64_t h = (uint64_t)(uintptr_t)k * 0x9E3779B97F4A7C15ull;
        return (size_t)(h >> 20) & (slots.size() - 1);
    }
    StorageRef * find(const void * k) {
        for (size_t i = home(k);; i = (i + 1) & (slots.size() - 1)) {
            if (slots[i].key == k) return &slots[i];
            if (!slots[i].key) return nullptr;
        }
    }
    void insert(const StorageRef & r) {
        if ((count + 1) * 2 > slots.size()) grow();
        size_t i = home(r.key);
        while (slots[i].key) i = (i + 1) & (slots.size() - 1);
        slots[i] = r;
        count++;
    }
    void erase(StorageRef * r) {  // backward-shift deletion keeps probe chains intact
        size_t mask = slots.size() - 1, i = (size_t)(r - slots.data()), j = i;
        for (;;) {
            j = (j + 1) & mask;
            if (!slots[j].key) break;
            size_t h = home(slots[j].key);
            if (((j - h) & mask) >= ((j - i) & mask)) {
                slots[i] = slots[j];
                i = j;
            }
        }
        slots[i].key = nullptr;
        count--;
    }
    void grow() {
        std::vector<StorageRef> old(slots.size() * 2);
        old.swap(slots);
        count = 0;
        for (const StorageRef & r : old)
            if (r.key) insert(r);
    }
};
StorageTable & storage_refs() {
    static StorageTable t;
    return t;
}
int64_t mem_floor = 64ll << 20;
} // namespace

MemStats & mem_stats() {
    static MemStats s{0, 0, 0, 0, 64ll << 20, 64ll << 20, 0};
    return s;
}

void mem_set_floor(int64_t bytes) {
    mem_floor = bytes;
    MemStats & s = mem_stats();
    s.cpu_threshold = std::max(bytes, 2 * s.cpu_live);
    s.cuda_threshold = std::max(bytes, 2 * s.cuda_live);
}

void mem_collect(lua_State * L) {
    lua_gc(L, LUA_GCCOLLECT, 0);
    MemStats & s = mem_stats();
    s.collections++;
    s.cpu_threshold = std::max(mem_floor, 2 * s.cpu_live);
    s.cuda_threshold = std::max(mem_floor, 2 * s.cuda_live);
#ifdef QATLAB_WITH_CUDA
    c10::cuda::CUDACachingAllocator::emptyCache();
#endif
}

static void mem_track(const at::Tensor & t, lua_State * L) {
    if (!t.has_storage()) return;
    const void * key = t.storage().unsafeGetStorageImpl();
    StorageTable & refs = storage_refs();
    if (StorageRef * r = refs.find(key)) {
        r->users++;
        return;
    }
    bool cuda = t.is_cuda();
    int64_t bytes = (int64_t)t.storage().nbytes();
    refs.insert(StorageRef{key, 1, bytes, cuda});
    MemStats & s = mem_stats();
    if (cuda) {
        s.cuda_live += bytes;
        s.cuda_peak = std::max(s.cuda_peak, s.cuda_live);
        if (s.cuda_live > s.cuda_threshold) mem_collect(L);
    } else {
        s.cpu_live += bytes;
        s.cpu_peak = std::max(s.cpu_peak, s.cpu_live);
        if (s.cpu_live > s.cpu_threshold) mem_collect(L);
    }
}

static void mem_untrack(const at::Tensor & t) {
    if (!t.defined() || !t.has_storage()) return;
    StorageTable & refs = storage_refs();
    StorageRef * r = refs.find(t.storage().unsafeGetStorageImpl());
    if (!r) return;
    if (--r->users > 0) return;
    MemStats & s = mem_stats();
    (r->cuda ? s.cuda_live : s.cpu_live) -= r->bytes;
    refs.erase(r);
}

// -- tensor userdata --------------------------------------------------------------------

// The metatable, kept in the registry under an integer key and by address: both checks
// below run on every call, and a string-keyed registry lookup costs more than the op.
static int tensor_mt_ref = LUA_NOREF;
static const void * tensor_mt_ptr = nullptr;

void tensor_push(lua_State * L, at::Tensor t) {
    if (!t.defined()) {
        lua_pushnil(L);
        return;
    }
    void * p = lua_newuserdata(L, sizeof(at::Tensor));
    at::Tensor * ud = new (p) at::Tensor(std::move(t));
    lua_rawgeti(L, LUA_REGISTRYINDEX, tensor_mt_ref);
    lua_setmetatable(L, -2);
    // The new userdata is on the stack, so a collection here cannot free it.
    mem_track(*ud, L);
}

at::Tensor * tensor_test(lua_State * L, int idx) {
    void * p = lua_touserdata(L, idx);
    if (!p || !lua_getmetatable(L, idx)) return nullptr;
    bool same = lua_topointer(L, -1) == tensor_mt_ptr;
    lua_pop(L, 1);
    return same ? (at::Tensor *)p : nullptr;
}

at::Tensor & tensor_check(lua_State * L, int idx, const char * what) {
    at::Tensor * t = tensor_test(L, idx);
    if (!t) bind_fail("%s: expected a Tensor, got %s", what, luaL_typename(L, idx));
    if (!t->defined()) bind_fail("%s: the tensor was freed (t:free() was called on it)", what);
    return *t;
}

at::Tensor tensor_or_scalar(lua_State * L, int idx, const at::Tensor * like) {
    if (at::Tensor * t = tensor_test(L, idx)) {
        if (!t->defined()) bind_fail("the tensor was freed (t:free() was called on it)");
        return *t;
    }
    int ty = lua_type(L, idx);
    if (ty != LUA_TNUMBER && ty != LUA_TBOOLEAN)
        bind_fail("expected a Tensor or a number, got %s", luaL_typename(L, idx));
    c10::Scalar s = scalar_from_lua(L, idx);
    // A wrapped number takes part in type promotion as a Python scalar does; it stays on the
    // CPU (ATen accepts 0-dim CPU operands with CUDA tensors, with no copy to the device).
    at::Tensor w = at::scalar_to_tensor(s);
    w.unsafeGetTensorImpl()->set_wrapped_number(true);
    return w;
}

// The number operand of add, sub, mul or div with a float32/float64 CPU tensor `like`: wrapped
// directly in like's dtype. Promotion gives like's dtype for any number there, and ATen would
// otherwise copy the wrapped int64/double into a temporary of that dtype before the op (a cast
// that costs more than a small op); the value it computes with, (float)v, is the same. Not for
// ops that read scalars in their own dtype (logical, comparison) or with a third operand (where).
// Anything else: tensor_or_scalar. (Declared where used, to keep bind.h unchanged.)
at::Tensor arith_operand(lua_State * L, int idx, const at::Tensor & like) {
    if (lua_type(L, idx) == LUA_TNUMBER && like.defined() && like.device().is_cpu()) {
        at::ScalarType st = like.scalar_type();
        double v = lua_tonumber(L, idx);
        // As scalar_from_lua: an integral number is an int64 (-0.0 stays -0.0).
        if (std::floor(v) == v && std::fabs(v) < 9.2e18 && !(v == 0 && std::signbit(v))) v = (double)(int64_t)v;
        // Out-of-range finite values keep the generic path and its exact behaviour.
        if (st == at::kDouble || (st == at::kFloat && (std::fabs(v) <= 3.4028234663852886e38 || !std::isfinite(v)))) {
            // One 0-dim tensor per dtype is reused while nothing else holds it or its storage
            // (autograd saving it for backward keeps a reference: then a fresh one is made).
            // It never reaches Lua: these ops return new tensors. Kept for the thread's life.
            // Not made or used under InferenceMode (an inference tensor cannot be saved later).
            static thread_local at::Tensor * cache[2] = {nullptr, nullptr};
            at::Tensor *& c = cache[st == at::kFloat ? 0 : 1];
            const bool cacheable = !c10::InferenceMode::is_enabled();
            at::Tensor w;
            if (cacheable && c && c->use_count() == 1 && c->storage().use_count() == 1) {
                w = *c;
            } else {
                w = at::Tensor(at::detail::empty_cpu({}, st));
                if (cacheable && !c) c = new at::Tensor(w);
            }
            if (st == at::kFloat) *static_cast<float *>(w.data_ptr()) = (float)v;
            else *static_cast<double *>(w.data_ptr()) = v;
            w.unsafeGetTensorImpl()->set_wrapped_number(true);
            return w;
        }
    }
    return tensor_or_scalar(L, idx, &like);
}

// t.data = x: the userdata now holds x's storage; the accounting follows it.
void tensor_set_data(lua_State * L, at::Tensor & t, const at::Tensor & data) {
    mem_untrack(t);
    t.set_data(data);
    mem_track(t, L);
}

void tensor_assign(lua_State * L, at::Tensor & held, at::Tensor value) {
    mem_untrack(held);
    held = std::move(value);
    mem_track(held, L);
}

void tensor_release(at::Tensor & t) {
    mem_untrack(t);
    t.reset();
}

// __gc: must never raise; runs once per userdata.
// Scripts can reach it (getmetatable(t).__gc(t)), so it checks the type and leaves an
// undefined tensor behind: a second call, or a later use, finds a freed tensor, never a
// destroyed one. An undefined at::Tensor holds no reference, so Lua may drop its bytes as is.
static int tensor_gc(lua_State * L) {
    if (at::Tensor * t = tensor_test(L, 1)) tensor_release(*t);
    return 0;
}

void tensor_open_metatable(lua_State * L) {
    luaL_newmetatable(L, QATLAB_TENSOR_MT);
    lua_pushcfunction(L, tensor_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushliteral(L, "Tensor");
    lua_setfield(L, -2, "__name");
    tensor_mt_ptr = lua_topointer(L, -1);
    tensor_mt_ref = luaL_ref(L, LUA_REGISTRYINDEX);
}

// -- defaults -----------------------------------------------------------------------------

c10::Device & default_device() {
    static c10::Device d(at::kCPU);
    return d;
}

at::ScalarType & default_dtype() {
    static at::ScalarType t = at::kFloat;
    return t;
}

at::TensorOptions default_options() {
    return at::TensorOptions().dtype(default_dtype()).device(default_device());
}

} // namespace qatlab
