// logging: spdlog set-up and the plain functions behind the `log` Lua module and the host.
// Compiled without LibTorch's include path (see logging.h).
#include "lib/logging.h"

#include <cstdlib>
#include <spdlog/sinks/basic_file_sink.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

namespace qatlab {

static const spdlog::level::level_enum levels[] = {
    spdlog::level::trace, spdlog::level::debug, spdlog::level::info, spdlog::level::warn,
    spdlog::level::err, spdlog::level::critical, spdlog::level::off,
};
static const char * names[] = {"trace", "debug", "info", "warn", "error", "critical", "off"};

static std::shared_ptr<spdlog::sinks::sink> file_sink;

void log_setup(const std::string & file) {
    std::vector<spdlog::sink_ptr> sinks;
    if (getenv("NO_COLOR") || !isatty(2)) sinks.push_back(std::make_shared<spdlog::sinks::stderr_sink_mt>());
    else sinks.push_back(std::make_shared<spdlog::sinks::stderr_color_sink_mt>());
    sinks[0]->set_pattern("[%H:%M:%S.%e] [%^%l%$] %v");
    if (!file.empty()) {
        auto f = std::make_shared<spdlog::sinks::basic_file_sink_mt>(file, false);
        f->set_pattern("%Y-%m-%dT%H:%M:%S.%e %l %v");
        sinks.push_back(f);
        file_sink = f;
    }
    auto logger = std::make_shared<spdlog::logger>("qatlab", sinks.begin(), sinks.end());
    logger->set_level(spdlog::get_level());
    spdlog::set_default_logger(logger);
    spdlog::flush_on(spdlog::level::info);  // a killed run keeps its log
}

bool log_level_parse(const std::string & name, LogLevel & out) {
    for (int i = 0; i <= LOG_OFF; i++)
        if (name == names[i] || (i == LOG_WARN && name == "warning")) {
            out = (LogLevel)i;
            return true;
        }
    return false;
}

const char * log_level_name(LogLevel lv) { return names[lv]; }
void log_set_level(LogLevel lv) { spdlog::set_level(levels[lv]); }

LogLevel log_get_level() {
    auto lv = spdlog::get_level();
    for (int i = 0; i <= LOG_OFF; i++)
        if (levels[i] == lv) return (LogLevel)i;
    return LOG_INFO;
}

bool log_enabled(LogLevel lv) { return spdlog::should_log(levels[lv]); }
void log_write(LogLevel lv, const std::string & msg) { spdlog::log(levels[lv], "{}", msg); }
void log_write_file(LogLevel lv, const std::string & msg) {
    if (!file_sink) return;
    file_sink->log(spdlog::details::log_msg("qatlab", levels[lv], msg));
    file_sink->flush();
}

void log_flush() { spdlog::default_logger()->flush(); }
void log_shutdown() { spdlog::shutdown(); }

} // namespace qatlab
