// logging: the process log (spdlog behind a plain interface). It is its own small target
// because LibTorch ships a newer {fmt} whose headers must not meet Debian's spdlog.
#pragma once
#include <string>

namespace qatlab {

enum LogLevel { LOG_TRACE, LOG_DEBUG, LOG_INFO, LOG_WARN, LOG_ERROR, LOG_CRITICAL, LOG_OFF };

// Sinks: stderr (coloured on a terminal unless NO_COLOR), and `file` when not empty.
void log_setup(const std::string & file);
bool log_level_parse(const std::string & name, LogLevel & out);
const char * log_level_name(LogLevel lv);
void log_set_level(LogLevel lv);
LogLevel log_get_level();
bool log_enabled(LogLevel lv);
void log_write(LogLevel lv, const std::string & msg);
// Only to the log file (when there is one): for text already printed to stderr another way,
// such as an uncaught script error and its traceback.
void log_write_file(LogLevel lv, const std::string & msg);
void log_flush();
void log_shutdown();

} // namespace qatlab
