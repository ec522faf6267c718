// Shared helpers for the GoogleTest files (see test_util.h): QATLAB_PYTHON, shell runs with
// captured output, and TestTempDir.
#include "test_util.h"

#include <gtest/gtest.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <stdexcept>

#include <sys/wait.h>

const char * test_python() {
    const char * py = std::getenv("QATLAB_PYTHON");
    return py && *py ? py : nullptr;
}

std::string test_shell_quote(const std::string & s) {
    std::string q = "'";
    for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
    return q + "'";
}

std::string test_python_command(const std::vector<std::string> & args) {
    const char * py = test_python();
    if (!py) return {};
    std::string cmd = test_shell_quote(py);
    for (const auto & a : args) cmd += " " + test_shell_quote(a);
    return cmd;
}

int test_shell_run(const std::string & cmd, std::string * out, bool merge_stderr) {
    int status;
    if (!out) {
        status = std::system(cmd.c_str());
    } else {
        FILE * p = ::popen((merge_stderr ? cmd + " 2>&1" : cmd).c_str(), "r");
        if (!p) return -1;
        char buf[4096];
        size_t n;
        while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) out->append(buf, n);
        status = ::pclose(p);
    }
    return status != -1 && WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

namespace {

// Both runners: the interpreter check, then the quoted command.
int python_exec(const std::vector<std::string> & args, std::string * out, bool merge_stderr) {
    if (!test_python()) {
        if (out) *out += "QATLAB_PYTHON is not set: it must name a python3 (CTest sets it)";
        return -1;
    }
    return test_shell_run(test_python_command(args), out, merge_stderr);
}

} // namespace

int test_python_run(const std::string & script, const std::vector<std::string> & args, std::string * out,
                    bool merge_stderr) {
    std::vector<std::string> all = {"-c", script};
    all.insert(all.end(), args.begin(), args.end());
    return python_exec(all, out, merge_stderr);
}

int test_python_file(const std::string & path, const std::vector<std::string> & args, std::string * out,
                     bool merge_stderr) {
    std::vector<std::string> all = {path};
    all.insert(all.end(), args.begin(), args.end());
    return python_exec(all, out, merge_stderr);
}

TestTempDir::TestTempDir(const std::string & prefix) : dir_(::testing::TempDir() + prefix + "XXXXXX") {
    if (!::mkdtemp(dir_.data())) throw std::runtime_error("mkdtemp " + dir_ + ": " + std::strerror(errno));
}

TestTempDir::~TestTempDir() {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
}
