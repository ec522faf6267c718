// bind: the one boundary mechanism between Lua and C++: the error trampoline, argument
// readers (positional or a trailing options table), tensor userdata and memory accounting.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/Scalar.h>
#include <lua.hpp>
#include <memory>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace qatlab {

// A failed precondition: becomes a Lua error "<fn>: <message>". A message that starts with
// "argument #n (name): ..." is an argument error (see ArgError); n counts as Args does: from 1
// at the first stack slot in functions named "mod.f" / "Tensor.f", and after self in methods
// named "Type:f".
struct BindError : std::runtime_error {
    using std::runtime_error::runtime_error;
};
[[noreturn]] void bind_fail(const char * fmt, ...) __attribute__((format(printf, 1, 2)));

// A wrong argument at stack slot `index`. The trampoline words it as Lua's luaL_argerror does:
// "bad argument #n to 'fn' (<message>)", n counting self only when the call was not written
// with ':' ("calling 'fn' on bad self (...)" for a bad self).
struct ArgError : BindError {
    ArgError(int index_, const std::string & msg) : BindError(msg), index(index_) {}
    int index;
};
[[noreturn]] void arg_fail(int index, const char * fmt, ...) __attribute__((format(printf, 2, 3)));

// Every metatable the bindings register, named once.
#define QATLAB_TENSOR_MT "qatlab.Tensor"
#define QATLAB_MODEL_MT "qatlab.Model"
#define QATLAB_OPTIM_MT "qatlab.Optimizer"
#define QATLAB_DDP_MT "qatlab.DDP"
#define QATLAB_TOKENIZER_MT "qatlab.Tokenizer"
#define QATLAB_KD_READER_MT "qatlab.KdCacheReader"
#define QATLAB_HOOK_MT "qatlab.HookHandle"
#define QATLAB_INTN_QAT_MT "qatlab.IntNQat"
#define QATLAB_INTN_SCHEDULE_MT "qatlab.IntNSchedule"
#define QATLAB_FUNCTION_MT "qatlab.autograd.Function"
#define QATLAB_CTX_MT "qatlab.autograd.ctx"
#define QATLAB_GRAD_HOOK_MT "qatlab.autograd.RemovableHandle"
#define QATLAB_SIZE_MT "qatlab.Size"
#define QATLAB_DIST_SENTINEL "qatlab.dist.sentinel"   // a registry key, not a metatable

// -- functions -----------------------------------------------------------------------
// Every bound function is a plain `int f(lua_State*)` registered through bind_register,
// which wraps it in the trampoline: C++ exceptions become Lua errors prefixed with the
// Lua-visible name, raised after every C++ object of the call is destroyed; a CUDA
// out-of-memory error triggers a full GC + cache flush and one retry.
struct BindFn {
    const char * name;   // Lua key in the module table
    lua_CFunction fn;
};
// Sets t[name] = trampoline(fn) for each entry; `prefix` ("torch.", "Tensor.") names errors.
void bind_register(lua_State * L, int table_idx, const char * prefix, const BindFn * fns);
void bind_push_function(lua_State * L, const char * full_name, lua_CFunction fn);
// How many bound calls are running C++ now (0: the VM is in Lua code or a Lua library function,
// perhaps called back by a bound function). Async-signal-safe.
int bind_call_depth();
// lua_pcall(L, nargs, nresults, 0) for a bound function calling back into Lua (no_grad(fn),
// progress callbacks): while it runs, the Ctrl-C watchdog counts the VM as running Lua.
int bind_pcall(lua_State * L, int nargs, int nresults);

// -- Lua values held by C++ -------------------------------------------------------------
// The Lua state of the innermost bound call now running (nullptr outside any): callbacks kept
// by C++ objects (module hooks, Lua layers, autograd Functions, tensor hooks) run on it, so a
// model called from a coroutine calls back into that coroutine. Backward passes started by a
// bound call (t:backward()) run their callbacks on that call's state.
lua_State * bind_current_state();
// The number of arguments the innermost bound call was given: stack slots above it hold
// values the call pushed (options read out of a table), not arguments.
int bind_call_nargs();

// A Lua value kept alive by a C++ object: a registry reference. Its destructor may run on any
// thread and at any time (autograd frees graphs on its own threads and inside collections),
// so the reference is released at the next bound call, on the VM's thread.
class LuaRef {
public:
    LuaRef(lua_State * L, int idx);   // references the value at idx
    ~LuaRef();
    LuaRef(const LuaRef &) = delete;
    LuaRef & operator=(const LuaRef &) = delete;
    void push(lua_State * L) const;   // pushes the value
    int ref() const { return ref_; }
private:
    int ref_;
};

// Calls the function below nargs arguments on L's stack (bind_pcall with a traceback handler);
// on error pops it and throws std::runtime_error("<what>: <message and traceback>"), so the
// error reaches Lua through the trampoline of the bound call that started it.
void bind_callback(lua_State * L, int nargs, int nresults, const std::string & what);

// -- arguments -----------------------------------------------------------------------
// PyTorch-style calls: positional arguments, then optionally one trailing options table
// (a table with string keys, or an empty table `{}`), e.g. t:sum(2, {keepdim = true}) or
// torch.sum(t, {dim = 2}). Every bound function reads its arguments here and ends with
// finish(), which rejects positional arguments nobody read and unknown option keys.
// Positions are 1-based from stack slot `first` (1 in functions and Tensor methods, 2 after
// self in object methods); errors name the stack slot (see ArgError).
class Args {
public:
    explicit Args(lua_State * L, int first = 1);
    // Stack index of argument `pos` (1-based among positional) or option `name`; 0 if absent.
    // A trailing `{}` is the options table, unless a reader that accepts a table
    // (table_ok) asks for exactly its position.
    int find(int pos, const char * name, bool table_ok = false);
    int npos() const { return npos_; }
    // Marks positions up to `pos` as read by hand (lua_to* on the stack), for finish().
    void take(int pos) { if (pos > max_pos_) max_pos_ = pos; }
    // Stack slot of position `pos`, or of the options table when pos is 0.
    int slot(int pos) const { return pos > 0 ? first_ + pos - 1 : opts_; }
    [[noreturn]] void fail(int pos, const char * name, const char * fmt, ...) __attribute__((format(printf, 4, 5)));
    lua_State * L;

    at::Tensor & tensor(int pos, const char * name);
    at::Tensor * opt_tensor(int pos, const char * name);
    double number(int pos, const char * name);
    double opt_number(int pos, const char * name, double def);
    int64_t integer(int pos, const char * name);
    int64_t opt_integer(int pos, const char * name, int64_t def);
    bool opt_bool(int pos, const char * name, bool def);
    std::string opt_string(int pos, const char * name, const char * def);
    // A 1-based (negative from the end) dimension of a tensor with `ndim` dims → 0-based.
    int64_t dim(int pos, const char * name, int64_t ndim);
    int64_t opt_dim(int pos, const char * name, int64_t ndim, int64_t def);
    bool has(int pos, const char * name) { return find(pos, name) != 0; }
    // Options: dtype, device (strings or userdata-free names: "float32", "cuda:0").
    bool opt_dtype(int pos, const char * name, at::ScalarType & out);
    bool opt_device(int pos, const char * name, c10::Device & out);
    // Sizes: varargs numbers from `pos` on, or one table at `pos`.
    std::vector<int64_t> sizes(int pos, const char * name);
    // Dims list: one number or a table of numbers → 0-based.
    std::vector<int64_t> dims(int pos, const char * name, int64_t ndim);
    c10::Scalar scalar(int pos, const char * name);
    // A required string (bytes kept, embedded zeros too) / an optional one.
    std::string string(int pos, const char * name);
    // Stack index of a required table (a trailing {} counts), of an optional table (0 when
    // absent), of an optional function (0 when absent).
    int table(int pos, const char * name);
    int opt_table(int pos, const char * name);
    int opt_function(int pos, const char * name);
    // Error if a non-nil positional argument was never read, or the options table holds keys
    // no reader asked for (naming the closest known key).
    void finish();

private:
    int first_, npos_, opts_ = 0, max_pos_ = 0;
    bool opts_empty_ = false;   // the options table is a trailing {}, maybe a positional table
    bool named_ = false;        // an option was asked for (finish: "expected options" wording)
    std::vector<const char *> used_;
};

// Levenshtein distance, and " (did you mean 'x'?)" naming the closest of `known` to `key`
// ("" when none is close).
size_t edit_distance(const std::string & a, const std::string & b);
std::string closest_hint(const std::string & key, const std::vector<std::string> & known);

// -- shared pushers ------------------------------------------------------------------------
void strings_push(lua_State * L, const std::vector<std::string> & v);   // an array of strings

// -- conversions ---------------------------------------------------------------------
at::ScalarType dtype_parse(const char * s);         // "float32", "torch.float32", "float", ...
c10::Device device_parse(const char * s);           // "cpu", "cuda", "cuda:1"; must be available
void device_check_available(const c10::Device & d); // error for a CUDA device with no GPU behind it
int64_t dim_wrap(int64_t d, int64_t ndim);          // 1-based/negative Lua dim → 0-based
c10::Scalar scalar_from_lua(lua_State * L, int idx);// integral doubles stay integral
bool is_options_table(lua_State * L, int idx);

// -- JSON ------------------------------------------------------------------------------------
// A JSON value as Lua values: objects → tables with string keys (null members left out),
// arrays → arrays, numbers → numbers, null → nil. For nlohmann::json and ordered_json alike.
template <class Json>
void json_push(lua_State * L, const Json & j) {
    lua_checkstack(L, 4);
    if (j.is_object()) {
        lua_createtable(L, 0, int(j.size()));
        for (auto it = j.begin(); it != j.end(); ++it) {
            if (it->is_null()) continue;
            json_push(L, *it);
            lua_setfield(L, -2, it.key().c_str());
        }
    } else if (j.is_array()) {
        lua_createtable(L, int(j.size()), 0);
        for (size_t k = 0; k < j.size(); ++k) {
            json_push(L, j[k]);
            lua_rawseti(L, -2, int(k + 1));
        }
    } else if (j.is_boolean()) {
        lua_pushboolean(L, j.template get<bool>());
    } else if (j.is_number()) {
        lua_pushnumber(L, j.template get<double>());
    } else if (j.is_string()) {
        const std::string & str = j.template get_ref<const std::string &>();
        lua_pushlstring(L, str.data(), str.size());
    } else {
        lua_pushnil(L);
    }
}

// A Lua value as JSON (the inverse of json_push): integral numbers stay integers, tables with
// an array part become arrays (read by index), others objects with string keys. An empty table
// becomes `[]` when empty_is_array, else `{}`. `what` names the value in errors.
nlohmann::json json_from_lua(lua_State * L, int idx, const char * what, bool empty_is_array = false);

// -- objects in userdata ------------------------------------------------------------
// A C++ object held by value in a full userdata whose metatable is registered as `mt`
// (models, optimizers, readers...). Its __gc destroys it exactly once, also when a script
// calls __gc by hand; after that udata_test returns nullptr and udata_check fails.
template <class T> struct Udata {
    T value;
    bool alive;
};

// Constructs T{args...} in a new userdata pushed on the stack and sets its metatable. A
// throwing constructor leaves a userdata with no metatable, so nothing is destroyed later.
template <class T, class... A> T & udata_new(lua_State * L, const char * mt, A &&... args) {
    auto * u = static_cast<Udata<T> *>(lua_newuserdata(L, sizeof(Udata<T>)));
    new (&u->value) T{std::forward<A>(args)...};
    u->alive = true;
    luaL_getmetatable(L, mt);
    lua_setmetatable(L, -2);
    return u->value;
}

// The live object at `idx`, or nullptr (another type, or already destroyed).
template <class T> T * udata_test(lua_State * L, int idx, const char * mt) {
    auto * u = static_cast<Udata<T> *>(luaL_testudata(L, idx, mt));
    return u && u->alive ? &u->value : nullptr;
}

// The live object at `idx`, or an ArgError "expected <what>, got <type>" / "<what> was freed".
template <class T> T & udata_check(lua_State * L, int idx, const char * mt, const char * what) {
    auto * u = static_cast<Udata<T> *>(luaL_testudata(L, idx, mt));
    if (idx > bind_call_nargs()) {   // a value read out of an options table: the caller labels it
        if (!u) bind_fail("expected %s, got %s", what, luaL_typename(L, idx));
        if (!u->alive) bind_fail("%s was freed", what);
    }
    if (!u) arg_fail(idx, "expected %s%s, got %s", what, idx == 1 ? " (call methods with ':')" : "", luaL_typename(L, idx));
    if (!u->alive) arg_fail(idx, "%s was freed", what);
    return u->value;
}

// __gc of Udata<T>; upvalue 1 is the metatable name, so a script passing another value is a no-op.
template <class T> int udata_gc(lua_State * L) {
    auto * u = static_cast<Udata<T> *>(luaL_testudata(L, 1, lua_tostring(L, lua_upvalueindex(1))));
    if (u && u->alive) {
        u->alive = false;
        u->value.~T();
    }
    return 0;
}

// Creates (or refreshes) metatable `mt` with __gc = gc, __name = name, and when given an
// __index table of `methods` (errors prefixed "<name>:") and __tostring. Leaves it on the stack.
void udata_open_metatable(lua_State * L, const char * mt, const char * name, lua_CFunction gc,
                          const BindFn * methods = nullptr, lua_CFunction tostring = nullptr);
template <class T>
void udata_open_metatable(lua_State * L, const char * mt, const char * name, const BindFn * methods = nullptr,
                          lua_CFunction tostring = nullptr) {
    udata_open_metatable(L, mt, name, udata_gc<T>, methods, tostring);
}

// -- tensors -------------------------------------------------------------------------
void tensor_push(lua_State * L, at::Tensor t);       // undefined → nil
at::Tensor * tensor_test(lua_State * L, int idx);    // nullptr when not a tensor
at::Tensor & tensor_check(lua_State * L, int idx, const char * what);
// A tensor argument, or a number/bool converted to a 0-dim tensor like `like`.
at::Tensor tensor_or_scalar(lua_State * L, int idx, const at::Tensor * like);
void tensor_release(at::Tensor & t);                 // drop storage accounting, reset
// Rebinds the tensor held by a userdata (a Lua layer's parameter moved by model:to()),
// moving the accounting to the new storage.
void tensor_assign(lua_State * L, at::Tensor & held, at::Tensor value);

// Live bytes held by tensor userdata (each storage once), per device kind, and GC control.
struct MemStats {
    int64_t cpu_live = 0, cuda_live = 0;
    int64_t cpu_peak = 0, cuda_peak = 0;
    int64_t cpu_threshold = 0, cuda_threshold = 0;
    int64_t collections = 0;
};
MemStats & mem_stats();
void mem_set_floor(int64_t bytes);
void mem_collect(lua_State * L);                     // full GC now (and CUDA cache flush)

// -- defaults set by the host (--device, set_default_dtype) ---------------------------
c10::Device & default_device();
at::ScalarType & default_dtype();
at::TensorOptions default_options();

// -- modules -------------------------------------------------------------------------
// package.preload registrations for every built-in module (torch, log, ...).
void bind_open_all(lua_State * L);
int luaopen_torch(lua_State * L);
int luaopen_log(lua_State * L);
void tensor_open_metatable(lua_State * L);           // the Tensor metatable with __gc
void tensor_open_methods(lua_State * L, int torch_table); // methods, operators, slicing
void torch_open_functions(lua_State * L, int t);     // torch.* functions into table t
void torch_open_ops(lua_State * L, int t, int methods); // shared ops: torch.f and t:f

// The model held by the nn Model userdata at stack index `idx` (bindings/nn.cpp); a Lua error
// for anything else, or a freed model.
class DecoderModel;
DecoderModel & nn_model_check(lua_State * L, int idx);
// The same model's shared owner (hook handles keep a weak reference to it).
std::shared_ptr<DecoderModel> nn_model_shared(lua_State * L, int idx);
// Lua layers (bindings/nn_lua.cpp): a Linear whose forward, parameters, weight() and train()
// call the Lua object at `idx` (a table or userdata with forward(self, x)); what = the name used
// in errors. The object's in_features/out_features fields (or methods) give its shape.
struct Linear;
std::shared_ptr<Linear> lua_linear_new(lua_State * L, int idx, const std::string & what);
// Pushes the Lua object of a Lua layer and returns true; pushes nothing and returns false for
// a C++ layer.
bool lua_linear_push(lua_State * L, const std::shared_ptr<Linear> & layer);
// The tokenizer held by the Tokenizer userdata at `idx` (bindings/tokenizers.cpp).
class Tokenizer;
Tokenizer & tokenizer_check(lua_State * L, int idx);
// Adds build_cache and open_cache to the `kd` module table at `t` (bindings/kd_cache.cpp).
void kd_open_cache(lua_State * L, int t);

} // namespace qatlab
