// A segment is readable and writable by its owner only (0600), whatever the
// creating process's umask: one that lets everyone in (0) and one that
// shuts everyone out, the owner included for group/other bits (0077, and
// 0777 which would leave no bit at all).
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <string>

#include "forklift/shm.hpp"
#include "support.hpp"

namespace forklift {
namespace {

class UmaskGuard {
 public:
  explicit UmaskGuard(mode_t m) : old_(::umask(m)) {}
  ~UmaskGuard() { ::umask(old_); }
  UmaskGuard(const UmaskGuard&) = delete;
  UmaskGuard& operator=(const UmaskGuard&) = delete;

 private:
  mode_t old_;
};

mode_t modeOf(const std::string& name) {
  struct stat st {};
  if (::stat(("/dev/shm/" + name).c_str(), &st) != 0) return static_cast<mode_t>(-1);
  return st.st_mode & 07777;
}

TEST(ShmMode, NamedSegmentsAre0600UnderAnyUmask) {
  for (const mode_t mask : {mode_t{0}, mode_t{0022}, mode_t{0077}, mode_t{0777}}) {
    SCOPED_TRACE("umask " + std::to_string(mask));
    const std::string name = "fk." + std::to_string(::getpid()) + ".umask-" + std::to_string(mask);
    {
      UmaskGuard guard(mask);
      SharedMemory bytes(create_only, ShmName::exact(name), 4096);
      EXPECT_EQ(modeOf(name), mode_t{0600});
      SharedMemory array(create_only, ShmName::exact(name + "-a"), DType::F64, {3, 4});
      EXPECT_EQ(modeOf(name + "-a"), mode_t{0600});
    }
    EXPECT_EQ(modeOf(name), static_cast<mode_t>(-1)) << "the segment outlived its owner";
  }
}

}  // namespace
}  // namespace forklift
