// libFuzzer target: opening a shared-memory segment whose bytes are
// arbitrary (a header written by a buggy or hostile peer, a truncated file).
//
// The input becomes the whole content of /dev/shm/fk.<pid>.fuzz; opening
// it goes through the header validation of lib/shm.cpp, unchanged. It must
// either open, with a payload that lies inside the file (its first and last
// bytes are read here: a payload past the end would fault), or throw
// forklift::Error.
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "forklift/shm.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static const std::string name = "fk." + std::to_string(::getpid()) + ".fuzz";
  const int fd = ::shm_open(name.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) std::abort();
  std::size_t off = 0;
  while (off < size) {
    const ssize_t w = ::write(fd, data + off, size - off);
    if (w <= 0) std::abort();
    off += static_cast<std::size_t>(w);
  }
  ::close(fd);
  try {
    forklift::SharedMemory shm(forklift::open_only, name);
    volatile std::uint8_t sink = 0;
    const auto* p = static_cast<const std::uint8_t*>(shm.data());
    if (shm.bytes() > 0) sink = static_cast<std::uint8_t>(p[0] + p[shm.bytes() - 1]);
    (void)sink;
    (void)shm.describe();
  } catch (const forklift::Error&) {
  }
  ::shm_unlink(name.c_str());
  return 0;
}
