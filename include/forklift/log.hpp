// forklift - one logger per process, the pid in every line
//
// Every MessageProcess logs through a spdlog logger named `Class.name`
// (`MyProcess.my-process`), on both sides of the fork. Lines carry the pid,
// so the frontend's and the backend's lines can be told apart in one
// terminal:
//   [12:00:01.123] [MyProcess.my-process] [pid 4242] [info] c__ping: gotcha!
//
// `formatLogger(level)` is the one-call setup (valkka-multiprocess's
// `formatLogger`): pattern and level for spdlog's default logger and for
// every forklift logger made afterwards. Call it at the top of main; a
// MessageProcess makes its logger in start().
//
// A logger can also write to a file of its own; a backend opens its file
// after the fork (a file sink made before fork would be shared by both sides).
#pragma once

#include <spdlog/spdlog.h>

#include <memory>
#include <string>

namespace forklift {

// Sets the level (and the pid-carrying pattern) of spdlog's default logger
// and of every forklift logger made from now on.
void formatLogger(spdlog::level::level_enum level = spdlog::level::info);

// A logger writing to stderr and, when `file` is not empty, appending to
// that file too. Not registered in spdlog's registry, so two processes may
// share a name. Throws spdlog::spdlog_ex when the file cannot be opened.
void checkLogFile(const std::string& path);  // STUB
std::shared_ptr<spdlog::logger> makeLogger(const std::string& name, const std::string& file = "");

}  // namespace forklift
