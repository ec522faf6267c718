// host: the Lua VM lifecycle of the qatlab executable: module paths, the script environment
// (args, arg), tracebacks, Ctrl-C, the REPL. main.cpp owns the command line.
#pragma once
#include <lua.hpp>
#include <string>
#include <vector>

namespace qatlab {

// One --set key=value, already split and typed.
struct SetValue {
    std::vector<std::string> path;  // "model.width" → {"model", "width"}
    enum Kind { NUMBER, BOOLEAN, STRING } kind;
    double number = 0;
    bool boolean = false;
    std::string string;
};
// Parses "key=value"; on malformed input returns false and fills err.
bool set_value_parse(const std::string & text, SetValue & out, std::string & err);

struct HostOptions {
    std::string script;                 // empty for -e / repl
    std::vector<SetValue> sets;
    std::vector<std::string> script_args;
    std::string device = "cpu";         // resolved (never "auto")
    long long seed = -1;
    int threads = 0;
    std::string out_dir;
    std::vector<std::string> argv;      // the process's command line as given, argv[0] first
};

// Owns one lua_State; closing it runs every __gc before LibTorch is torn down.
class HostVm {
public:
    explicit HostVm(const HostOptions & opt);
    ~HostVm();
    lua_State * L() { return L_; }
    // Each returns the process exit status: 0, or 1 after printing the error and traceback.
    int run_file(const std::string & path);
    int run_string(const std::string & code, const char * chunkname);
    int repl();

private:
    int call_chunk(int nargs_pushed_env);
    void push_env();
    lua_State * L_;
    HostOptions opt_;
};

std::string host_exe_dir();
std::string host_scripts_dir();

} // namespace qatlab
