#include "forklift/error.hpp"

#include <cerrno>
#include <cstring>

#include "posix.hpp"

namespace forklift {

SystemError::SystemError(int errnum, const std::string& what)
    : Error(what + ": " + std::strerror(errnum)),
      code_(errnum, std::generic_category()) {}

namespace detail {

void throwErrno(const std::string& what) {
  const int saved = errno;
  throw SystemError(saved, what);
}

}  // namespace detail
}  // namespace forklift
