// STUB until the proc-title branch lands.
#pragma once
#include <sys/prctl.h>
#include <string>
namespace forklift::detail {
inline void setProcessTitle(const std::string& comm, const std::string&) noexcept {
  ::prctl(PR_SET_NAME, comm.substr(0, 15).c_str());
}
}  // namespace forklift::detail
