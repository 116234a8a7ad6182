// forklift - the control messages between the two sides (internal)
//
// Commands whose names start with "__" are forklift's own; a user command
// cannot have such a name. They are defined here and nowhere else.
//
// A stop request is not a message: it is an eventfd (the stop bell) the
// backend loop watches, so a cut or corrupt frame cannot swallow it.
//
// On the command channel:
//   backend -> frontend   __ready                     preRun__ done, the loop runs
//                         __failed {error}            preRun__ threw; the backend exits
//                         __ok {value} (id)           a call's result
//                         __error {error} (id)        a call's failure
// On the output channel (with the sendOut__ messages):
//   backend -> frontend   __command_error {command, error}
//                         a command sent with send() failed (unknown, bad
//                         arguments, handler threw, refused); the frontend's
//                         recv() throws CommandError for it
#pragma once

#include <string_view>

namespace forklift::detail::control {

inline constexpr std::string_view kReady = "__ready";
inline constexpr std::string_view kFailed = "__failed";
inline constexpr std::string_view kOk = "__ok";
inline constexpr std::string_view kError = "__error";
inline constexpr std::string_view kCommandError = "__command_error";

// True for the names reserved to forklift.
inline bool reserved(std::string_view command) { return command.substr(0, 2) == "__"; }

}  // namespace forklift::detail::control
