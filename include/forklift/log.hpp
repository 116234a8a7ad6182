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
// MessageProcess makes each side's logger when that side first writes a
// line its level lets through (a start that logs nothing makes none).
//
// A logger can also write to a file of its own; a backend opens its file
// after the fork (a file sink made before fork would be shared by both sides).
// Logging never takes a process down: `checkLogFile` lets the frontend
// refuse a bad path up front, with an error, before anything is forked;
// `makeLogger` falls back to stderr (saying so) when the file cannot be
// opened after all; and a sink that fails later (disk full, file gone bad)
// is reported on stderr, never thrown out of a log call.
#pragma once

#include <spdlog/spdlog.h>

#include <memory>
#include <string>

namespace forklift {

// Sets the level (and the pid-carrying pattern) of spdlog's default logger
// and of every forklift logger made from now on.
void formatLogger(spdlog::level::level_enum level = spdlog::level::info);

// Throws forklift::SystemError ("cannot open log file '<path>': <strerror>")
// when `path` cannot be opened for appending. Does what the file sink would:
// creates missing parent directories and the file itself (empty), and
// leaves an existing file's contents alone. An empty path passes.
void checkLogFile(const std::string& path);

// A logger writing to stderr and, when `file` is not empty, appending to
// that file too. Not registered in spdlog's registry, so two processes may
// share a name. Does not throw over the file: when it cannot be opened the
// logger writes one warning ("cannot open log file ...; logging to stderr
// only") and logs to stderr alone. A sink that fails later is reported on
// stderr (at most once a second per logger, with a count of the failures
// not shown); the log call returns normally.
std::shared_ptr<spdlog::logger> makeLogger(const std::string& name, const std::string& file = "");

}  // namespace forklift
