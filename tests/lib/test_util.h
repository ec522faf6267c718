// Shared helpers for the GoogleTest files: the QATLAB_PYTHON interpreter, running it (or any shell
// command) with quoted arguments and the output captured, and scratch directories. No torch headers.
#pragma once

#include <string>
#include <vector>

// $QATLAB_PYTHON, or nullptr when it is unset or empty.
const char * test_python();

// s in single quotes, safe as one /bin/sh word.
std::string test_shell_quote(const std::string & s);

// `$QATLAB_PYTHON args...` as a shell command, every word quoted ("" when QATLAB_PYTHON is unset).
std::string test_python_command(const std::vector<std::string> & args);

// Runs cmd through /bin/sh; returns its exit code, or -1 when it could not start or did not exit.
// With out, its stdout is appended there (stderr too when merge_stderr); without, both stay the test's.
int test_shell_run(const std::string & cmd, std::string * out = nullptr, bool merge_stderr = true);

// Runs `$QATLAB_PYTHON -c script args...` as test_shell_run does; -1 (and a note in *out) when unset.
int test_python_run(const std::string & script, const std::vector<std::string> & args, std::string * out = nullptr,
                    bool merge_stderr = true);

// Runs `$QATLAB_PYTHON path args...` likewise.
int test_python_file(const std::string & path, const std::vector<std::string> & args, std::string * out = nullptr,
                     bool merge_stderr = true);

// A fresh directory ::testing::TempDir() + prefix + 6 random characters, removed with everything in it
// on destruction. Throws, naming the path, when mkdtemp fails (gtest then fails the test).
struct TestTempDir {
    explicit TestTempDir(const std::string & prefix);
    ~TestTempDir();
    TestTempDir(const TestTempDir &) = delete;
    TestTempDir & operator=(const TestTempDir &) = delete;

    const std::string & dir() const { return dir_; }
    std::string path(const std::string & name) const { return dir_ + "/" + name; }

private:
    std::string dir_;
};
