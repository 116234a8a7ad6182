#include "forklift/shm.hpp"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "seams.hpp"
#include "support.hpp"

namespace forklift {
namespace {

using namespace std::chrono_literals;
using test::exitCodeOf;
using test::forkChild;
using test::waitChild;

// A per-process, per-call-site exact name that the leak check watches.
std::string testName(const char* what, int line) {
  return "fk." + std::to_string(::getpid()) + "." + what + std::to_string(line);
}
#define TEST_NAME(what) testName(what, __LINE__)

bool exists(const std::string& name) {
  struct stat st {};
  return ::stat(("/dev/shm/" + name).c_str(), &st) == 0;
}

using test::contains;
using test::thrown;

// The errno carried by the SystemError fn throws, or -1.
template <class Fn>
int errnoOf(Fn&& fn) {
  try {
    fn();
  } catch (const SystemError& e) {
    return e.code().value();
  } catch (...) {
    return -2;
  }
  return -1;
}

// Removes names at the end of a test whatever happened in it.
struct RemoveAtEnd {
  std::vector<std::string> names;
  ~RemoveAtEnd() {
    for (const auto& n : names) SharedMemory::remove(n);
  }
};

// A file in /dev/shm made without forklift, holding `bytes`.
void plant(const std::string& name, const std::string& bytes) {
  const int fd = ::shm_open(("/" + name).c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
  ASSERT_GE(fd, 0) << std::strerror(errno);
  ASSERT_EQ(::write(fd, bytes.data(), bytes.size()), static_cast<ssize_t>(bytes.size()));
  ::close(fd);
}

detail::ShmHeader* mappedHeader(SharedMemory& shm) {
  return reinterpret_cast<detail::ShmHeader*>(static_cast<char*>(shm.data()) - sizeof(detail::ShmHeader));
}

class UmaskGuard {
 public:
  explicit UmaskGuard(mode_t m) : old_(::umask(m)) {}
  ~UmaskGuard() { ::umask(old_); }

 private:
  mode_t old_;
};

class FallocateSeam {
 public:
  explicit FallocateSeam(detail::ShmFallocateFn f) : old_(std::exchange(detail::shmFallocate, f)) {}
  ~FallocateSeam() { detail::shmFallocate = old_; }

 private:
  detail::ShmFallocateFn old_;
};

// ---------------------------------------------------------------- names

TEST(ShmName, GeneratedNamesCarryPrefixPidCounterAndHint) {
  const std::string pid = std::to_string(::getpid());
  const std::string a = makeShmName("frames");
  const std::string b = makeShmName("frames");
  EXPECT_EQ(a.rfind("fk." + pid + ".", 0), 0u) << a;
  EXPECT_EQ(a.substr(a.size() - 7), ".frames");
  EXPECT_NE(a, b);
  EXPECT_NO_THROW(checkShmName(a));
  const std::string bare = makeShmName("");
  EXPECT_EQ(std::count(bare.begin(), bare.end(), '.'), 2) << bare;
}

TEST(ShmName, LongHintIsCutAndBadCharactersReplaced) {
  const std::string longName = makeShmName(std::string(100, 'h'));
  EXPECT_EQ(longName.size(), kShmMaxNameLength);
  EXPECT_NO_THROW(checkShmName(longName));
  const std::string odd = makeShmName("cam/0 left");
  EXPECT_EQ(odd.substr(odd.size() - 10), "cam_0_left") << odd;
  EXPECT_NO_THROW(checkShmName(odd));
}

TEST(ShmName, InvalidNamesAreRejectedWithTheReason) {
  const std::string thirty(30, 'a');
  EXPECT_NO_THROW(checkShmName(thirty));
  const struct {
    std::string name;
    std::string why;
  } cases[] = {
      {"", "empty"},
      {"/fk.1", "give it without the leading '/'"},
      {thirty + "b", "31 characters, at most 30 allowed (31 with the leading '/')"},
      {"a/b", "character '/' at position 1; allowed are A-Z a-z 0-9 . _ -"},
      {"sp ace", "character ' ' at position 2"},
      {"caf\xc3\xa9", "character 0xc3 at position 3"},
      {".", "not a file name"},
      {"..", "not a file name"},
  };
  for (const auto& c : cases) {
    const std::string want = "invalid shared memory name '" + c.name + "': " + c.why;
    EXPECT_TRUE(contains(thrown<ShmNameError>([&] { checkShmName(c.name); }), want));
    EXPECT_TRUE(contains(thrown<ShmNameError>([&] { SharedMemory(open_only, c.name); }), want));
    EXPECT_TRUE(contains(thrown<ShmNameError>([&] { SharedMemory(create_only, ShmName::exact(c.name), 8); }), want));
    EXPECT_FALSE(SharedMemory::remove(c.name));
  }
}

// ---------------------------------------------------------------- creation

TEST(SharedMemory, CreateMakesA0600SegmentWithHeaderAndAlignedPayload) {
  SharedMemory shm(create_only, ShmName::named("raw"), 1000);
  ASSERT_TRUE(shm.valid());
  EXPECT_TRUE(contains(shm.name(), "fk." + std::to_string(::getpid()) + "."));
  struct stat st {};
  ASSERT_EQ(::stat(("/dev/shm/" + shm.name()).c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0600u);
  EXPECT_EQ(st.st_size, static_cast<off_t>(sizeof(detail::ShmHeader) + 1000));
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(shm.data()) % 64, 0u);
  EXPECT_EQ(shm.bytes(), 1000u);
  EXPECT_FALSE(shm.dtype());
  EXPECT_EQ(shm.kind(), ShmKind::Bytes);
  EXPECT_EQ(shm.shape(), std::vector<std::int64_t>{1000});
  EXPECT_EQ(shm.strides(), std::vector<std::int64_t>{1});
  EXPECT_EQ(shm.creatorPid(), ::getpid());
  EXPECT_EQ(shm.describe(), "bytes[1000]");
  EXPECT_TRUE(shm.owns());
  const auto* p = static_cast<const unsigned char*>(shm.data());
  EXPECT_TRUE(std::all_of(p, p + 1000, [](unsigned char c) { return c == 0; }));
}

// Reserved, not sparse: every page is allocated at creation, so a full
// /dev/shm cannot surface later as SIGBUS.
TEST(SharedMemory, CreateReservesEveryPage) {
  SharedMemory shm(create_only, ShmName::named("reserved"), 1u << 20);
  struct stat st {};
  ASSERT_EQ(::stat(("/dev/shm/" + shm.name()).c_str(), &st), 0);
  EXPECT_EQ(st.st_size, static_cast<off_t>(sizeof(detail::ShmHeader) + (1u << 20)));
  EXPECT_GE(static_cast<std::uint64_t>(st.st_blocks) * 512, static_cast<std::uint64_t>(st.st_size));
}

TEST(SharedMemory, TypedSegmentRecordsKindTypeShapeStridesAndLayout) {
  SharedMemory shm(create_only, ShmName::named("typed"), DType::I16, {2, 3, 4}, Layout::ColMajor);
  EXPECT_EQ(shm.bytes(), 2u * 3 * 4 * 2);
  EXPECT_EQ(shm.kind(), ShmKind::Array);
  EXPECT_EQ(shm.dtype(), DType::I16);
  EXPECT_EQ(shm.shape(), (std::vector<std::int64_t>{2, 3, 4}));
  EXPECT_EQ(shm.strides(), (std::vector<std::int64_t>{1, 2, 6}));  // the first index fastest
  EXPECT_EQ(shm.layout(), Layout::ColMajor);
  EXPECT_EQ(shm.describe(), "int16[2x3x4] column-major");
  SharedMemory other(open_only, shm.name());
  EXPECT_EQ(other.kind(), ShmKind::Array);
  EXPECT_EQ(other.dtype(), DType::I16);
  EXPECT_EQ(other.shape(), shm.shape());
  EXPECT_EQ(other.strides(), shm.strides());
  EXPECT_EQ(other.layout(), Layout::ColMajor);
  EXPECT_EQ(other.generation(), shm.generation());
  EXPECT_EQ(other.creatorPid(), ::getpid());
  EXPECT_NE(other.data(), shm.data());  // a mapping of its own
}

TEST(SharedMemory, RowMajorStridesPutTheLastIndexFastest) {
  SharedMemory shm(create_only, ShmName::named("strides"), DType::F16, {5, 2, 3, 4});
  EXPECT_EQ(shm.strides(), (std::vector<std::int64_t>{24, 12, 4, 1}));
  EXPECT_EQ(shm.bytes(), 5u * 2 * 3 * 4 * 2);
  EXPECT_EQ(shm.describe(), "float16[5x2x3x4] row-major");
  // The header in the mapping says the same, for readers without forklift.
  const auto* h = reinterpret_cast<const detail::ShmHeader*>(static_cast<const char*>(shm.data()) -
                                                            sizeof(detail::ShmHeader));
  EXPECT_EQ(h->version, 2u);
  EXPECT_EQ(h->kind, static_cast<std::uint8_t>(ShmKind::Array));
  EXPECT_EQ(std::vector<std::int64_t>(h->strides, h->strides + h->rank), shm.strides());
}

TEST(SharedMemory, ModeIs0600WhateverTheUmask) {
  for (const mode_t mask : {mode_t{0777}, mode_t{0000}}) {
    UmaskGuard guard(mask);
    SharedMemory shm(create_only, ShmName::named("umask"), 64);
    struct stat st {};
    ASSERT_EQ(::stat(("/dev/shm/" + shm.name()).c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 07777, 0600u) << "umask " << std::oct << mask;
  }
}

TEST(SharedMemory, BadShapesAreRefused) {
  EXPECT_TRUE(contains(thrown<LimitError>([] { SharedMemory(create_only, ShmName::named("neg"), DType::F64, {3, -1}); }),
                       "shape [3x-1] has a negative dimension or is too large"));
  EXPECT_TRUE(contains(thrown<LimitError>([] {
                         SharedMemory(create_only, ShmName::named("huge"), DType::F64, {std::int64_t{1} << 40, std::int64_t{1} << 40});
                       }),
                       "too large to map"));
  EXPECT_TRUE(contains(thrown<LimitError>([] {
                         SharedMemory(create_only, ShmName::named("rank"), DType::U8, std::vector<std::int64_t>(9, 1));
                       }),
                       "rank 9 exceeds the maximum 8"));
}

TEST(SharedMemory, TakenExactNameIsEEXIST) {
  const std::string name = TEST_NAME("taken");
  SharedMemory first(create_only, ShmName::exact(name), 16);
  EXPECT_EQ(first.name(), name);
  auto again = [&] { SharedMemory(create_only, ShmName::exact(name), 16); };
  EXPECT_EQ(errnoOf(again), EEXIST);
  EXPECT_EQ(thrown<SystemError>(again), "cannot create shared memory segment '" + name + "': File exists");
  EXPECT_TRUE(exists(name));  // the failed create did not remove the first one's name
}

TEST(SharedMemory, GeneratedNameSkipsAStaleLeftover) {
  // The next generated name is predictable: plant a file there, as a dead
  // process with our pid would have left it.
  const std::string probe = makeShmName("skip");
  const auto dot = probe.rfind('.');
  const auto counterStart = probe.rfind('.', dot - 1) + 1;
  const auto next = std::stoull(probe.substr(counterStart, dot - counterStart)) + 1;
  const std::string planted = probe.substr(0, counterStart) + std::to_string(next) + ".skip";
  RemoveAtEnd cleanup{{planted}};
  plant(planted, "left over");
  SharedMemory shm(create_only, ShmName::named("skip"), 8);
  EXPECT_NE(shm.name(), planted);
  EXPECT_TRUE(contains(shm.name(), ".skip"));
  EXPECT_TRUE(exists(planted));
}

// ---------------------------------------------------------------- full /dev/shm

int fakeNoSpace(int, off_t, off_t) { return ENOSPC; }
int fakeIoError(int, off_t, off_t) { return EIO; }
int fallocateCalls = 0;
int countingFallocate(int fd, off_t off, off_t len) {
  ++fallocateCalls;
  return ::posix_fallocate(fd, off, len);
}

TEST(SharedMemory, FullShmIsENOSPCNamingSegmentSizeAndFreeSpace) {
  FallocateSeam seam(&fakeNoSpace);
  const std::string name = TEST_NAME("full");
  auto create = [&] { SharedMemory(create_only, ShmName::exact(name), 1u << 20); };
  EXPECT_EQ(errnoOf(create), ENOSPC);
  const std::string msg = thrown<SystemError>(create);
  EXPECT_TRUE(contains(msg, "cannot reserve " + std::to_string(sizeof(detail::ShmHeader) + (1u << 20)) +
                                " bytes (1.0 MiB) for shared memory segment '" + name + "', /dev/shm has "));
  EXPECT_TRUE(contains(msg, " free: No space left on device"));
  EXPECT_FALSE(exists(name)) << "a failed create left its name behind";
}

TEST(SharedMemory, OtherReserveFailureIsReportedAndCleanedUp) {
  FallocateSeam seam(&fakeIoError);
  const std::string name = TEST_NAME("eio");
  auto create = [&] { SharedMemory(create_only, ShmName::exact(name), 4096); };
  EXPECT_EQ(errnoOf(create), EIO);
  EXPECT_EQ(thrown<SystemError>(create),
            "cannot reserve " + std::to_string(sizeof(detail::ShmHeader) + 4096) + " bytes for shared memory segment '" +
                name + "': Input/output error");
  EXPECT_FALSE(exists(name));
}

// Asking for more than statvfs says is free fails at once, before the
// kernel is asked to allocate anything.
TEST(SharedMemory, MoreThanTheFreeSpaceFailsAtOnce) {
  struct statvfs vfs {};
  ASSERT_EQ(::statvfs("/dev/shm", &vfs), 0);
  if (vfs.f_blocks == 0) GTEST_SKIP() << "/dev/shm has no size limit";
  fallocateCalls = 0;
  FallocateSeam seam(&countingFallocate);
  const std::uint64_t tooMuch = static_cast<std::uint64_t>(vfs.f_bavail) * vfs.f_frsize + (1ull << 30);
  const std::string name = TEST_NAME("toobig");
  auto create = [&] { SharedMemory(create_only, ShmName::exact(name), tooMuch); };
  EXPECT_EQ(errnoOf(create), ENOSPC);
  EXPECT_TRUE(contains(thrown<SystemError>(create), "for shared memory segment '" + name + "', /dev/shm has "));
  EXPECT_EQ(fallocateCalls, 0);
  EXPECT_FALSE(exists(name));
}

// ---------------------------------------------------------------- open errors

TEST(SharedMemory, OpeningAMissingNameIsENOENT) {
  const std::string name = TEST_NAME("missing");
  auto open = [&] { SharedMemory(open_only, name); };
  EXPECT_EQ(errnoOf(open), ENOENT);
  EXPECT_EQ(thrown<SystemError>(open),
            "cannot open shared memory segment '" + name + "': No such file or directory");
}

TEST(SharedMemory, OpeningASegmentTooShortForTheHeaderFails) {
  const std::string name = TEST_NAME("short");
  RemoveAtEnd cleanup{{name}};
  plant(name, "0123456789");
  EXPECT_EQ(thrown<ShmFormatError>([&] { SharedMemory(open_only, name); }),
            "shared memory segment '" + name + "' is 10 bytes, too short for a forklift header (192 bytes)");
}

TEST(SharedMemory, OpeningAForeignSegmentFails) {
  const std::string name = TEST_NAME("foreign");
  RemoveAtEnd cleanup{{name}};
  plant(name, std::string(4096, 'x'));
  EXPECT_EQ(thrown<ShmFormatError>([&] { SharedMemory(open_only, name); }),
            "shared memory segment '" + name + "' is not a forklift segment (bad magic)");
}

TEST(SharedMemory, OpeningAnotherFormatVersionFails) {
  SharedMemory shm(create_only, ShmName::named("version"), 64);
  mappedHeader(shm)->version = 7;
  EXPECT_EQ(thrown<ShmFormatError>([&] { SharedMemory(open_only, shm.name()); }),
            "shared memory segment '" + shm.name() + "' has format version 7, this forklift reads version 2");
}

TEST(SharedMemory, OpeningACorruptHeaderFails) {
  SharedMemory shm(create_only, ShmName::named("corrupt"), DType::F32, {4, 4});
  detail::ShmHeader* h = mappedHeader(shm);
  h->payloadBytes = 1u << 30;
  EXPECT_TRUE(contains(thrown<ShmFormatError>([&] { SharedMemory(open_only, shm.name()); }),
                       "' has a corrupt header: its shape does not match its payload of 1073741824 bytes"));
  h->payloadBytes = 64;
  h->shape[0] = 1 << 20;
  h->shape[1] = 1 << 20;
  EXPECT_TRUE(contains(thrown<ShmFormatError>([&] { SharedMemory(open_only, shm.name()); }),
                       "its shape does not match its payload of 64 bytes"));
  h->shape[0] = h->shape[1] = 4;
  h->dtype = 42;
  EXPECT_TRUE(contains(thrown<ShmFormatError>([&] { SharedMemory(open_only, shm.name()); }),
                       "has a corrupt header: element type 42"));
  h->dtype = static_cast<std::uint8_t>(DType::F32);
  EXPECT_NO_THROW(SharedMemory(open_only, shm.name()));

  h->strides[0] = 1;
  EXPECT_TRUE(contains(thrown<ShmFormatError>([&] { SharedMemory(open_only, shm.name()); }),
                       "has a corrupt header: strides [1, 1] are not those of a dense row-major [4x4] ([4, 1])"));
  h->strides[0] = 4;
  h->kind = 9;
  EXPECT_TRUE(contains(thrown<ShmFormatError>([&] { SharedMemory(open_only, shm.name()); }),
                       "has a corrupt header: kind 9"));
  h->kind = static_cast<std::uint8_t>(ShmKind::Bytes);
  EXPECT_TRUE(contains(thrown<ShmFormatError>([&] { SharedMemory(open_only, shm.name()); }),
                       "has a corrupt header: a segment of kind bytes with an element type"));
  h->kind = static_cast<std::uint8_t>(ShmKind::Array);
  EXPECT_NO_THROW(SharedMemory(open_only, shm.name()));
}

// ---------------------------------------------------------------- ownership

TEST(SharedMemory, CreatorRemovesTheNameAndAnOpenerDoesNot) {
  std::string name;
  {
    SharedMemory creator(create_only, ShmName::named("owner"), 32);
    name = creator.name();
    {
      SharedMemory opener(open_only, name);
      EXPECT_FALSE(opener.owns());
      EXPECT_TRUE(creator.owns());
    }
    EXPECT_TRUE(exists(name)) << "an opener removed the name";
  }
  EXPECT_FALSE(exists(name)) << "the creator did not remove the name";
}

TEST(SharedMemory, OpenerInAnotherProcessNeverRemoves) {
  SharedMemory creator(create_only, ShmName::named("xopen"), 32);
  const std::string name = creator.name();
  const pid_t pid = forkChild([&] {
    {
      SharedMemory opener(open_only, name);
      if (opener.owns()) return 3;
      static_cast<char*>(opener.data())[0] = 'k';
    }  // destroyed here, before _exit
    return 0;
  });
  EXPECT_EQ(exitCodeOf(waitChild(pid, 10s)), 0);
  EXPECT_TRUE(exists(name));
  EXPECT_EQ(static_cast<const char*>(creator.data())[0], 'k');
}

TEST(SharedMemory, ForkedChildThatInheritedTheOwnerDoesNotRemove) {
  SharedMemory shm(create_only, ShmName::named("inherit"), 32);
  const pid_t pid = forkChild([&] {
    if (shm.owns()) return 3;
    { SharedMemory inherited(std::move(shm)); }  // its destructor runs in the child
    return 0;
  });
  EXPECT_EQ(exitCodeOf(waitChild(pid, 10s)), 0);
  EXPECT_TRUE(exists(shm.name())) << "the child removed its parent's segment";
  EXPECT_TRUE(shm.owns());
}

TEST(SharedMemory, ReleaseKeepsTheNameAndRemoveRemovesIt) {
  std::string name;
  {
    SharedMemory shm(create_only, ShmName::named("release"), 32);
    name = shm.name();
    shm.release();
    EXPECT_FALSE(shm.owns());
  }
  EXPECT_TRUE(exists(name));
  EXPECT_TRUE(SharedMemory::remove(name));
  EXPECT_FALSE(exists(name));
  errno = 0;
  EXPECT_FALSE(SharedMemory::remove(name));
  EXPECT_EQ(errno, ENOENT);
}

TEST(SharedMemory, MoveHandsOwnershipOverAndLeavesAnEmptyObject) {
  SharedMemory a(create_only, ShmName::named("movea"), 32);
  const std::string name = a.name();
  SharedMemory b(std::move(a));
  EXPECT_FALSE(a.valid());  // NOLINT(bugprone-use-after-move): the empty state is documented
  EXPECT_FALSE(a.owns());
  EXPECT_EQ(a.data(), nullptr);
  EXPECT_EQ(a.bytes(), 0u);
  EXPECT_TRUE(a.name().empty());
  EXPECT_TRUE(b.owns());
  a.reset();
  EXPECT_TRUE(exists(name));

  SharedMemory c(create_only, ShmName::named("movec"), 32);
  const std::string cName = c.name();
  c = std::move(b);  // c's own segment goes, b's arrives
  EXPECT_FALSE(exists(cName));
  EXPECT_TRUE(c.owns());
  EXPECT_EQ(c.name(), name);
  c.reset();
  EXPECT_FALSE(c.valid());
  EXPECT_FALSE(exists(name));
}

TEST(SharedMemory, RemovedNameLeavesMappingsIntact) {
  SharedMemory creator(create_only, ShmName::named("unlinked"), 64);
  SharedMemory opener(open_only, creator.name());
  ASSERT_TRUE(SharedMemory::remove(creator.name()));
  static_cast<char*>(creator.data())[5] = 'z';
  EXPECT_EQ(static_cast<const char*>(opener.data())[5], 'z');
}

TEST(SharedMemory, BytesWrittenOnOneSideAreReadOnTheOther) {
  SharedMemory shm(create_only, ShmName::named("bytes"), 1u << 20);
  auto* p = static_cast<unsigned char*>(shm.data());
  for (std::size_t i = 0; i < shm.bytes(); ++i) p[i] = static_cast<unsigned char>(i * 7);
  const std::string name = shm.name();
  const pid_t pid = forkChild([&] {
    SharedMemory peer(open_only, name);
    auto* q = static_cast<unsigned char*>(peer.data());
    for (std::size_t i = 0; i < peer.bytes(); ++i)
      if (q[i] != static_cast<unsigned char>(i * 7)) return 4;
    std::fill(q, q + peer.bytes(), 0xab);
    return 0;
  });
  ASSERT_EQ(exitCodeOf(waitChild(pid, 10s)), 0);
  EXPECT_TRUE(std::all_of(p, p + shm.bytes(), [](unsigned char c) { return c == 0xab; }));
}

// ---------------------------------------------------------------- listing and the tool

struct ToolRun {
  int exitCode = -1;
  std::string output;
};

// Runs forklift-shm with `args`; stdout and stderr together, bounded waits.
ToolRun runTool(const std::vector<std::string>& args) {
  ToolRun run;
  // meson passes the path; a run by hand from the build tree finds it too.
  std::string toolPath;
  if (const char* env = std::getenv("FORKLIFT_SHM_TOOL")) {
    toolPath = env;
  } else {
    char self[4096];
    const ssize_t n = ::readlink("/proc/self/exe", self, sizeof self - 1);
    if (n > 0) {
      const std::string exe(self, static_cast<std::size_t>(n));
      toolPath = exe.substr(0, exe.rfind('/')) + "/../tools/forklift-shm";
    }
  }
  if (::access(toolPath.c_str(), X_OK) != 0) {
    ADD_FAILURE() << "forklift-shm not found (set FORKLIFT_SHM_TOOL)";
    return run;
  }
  const char* tool = toolPath.c_str();
  int out[2];
  if (::pipe2(out, O_CLOEXEC) != 0) {
    ADD_FAILURE() << "pipe2: " << std::strerror(errno);
    return run;
  }
  const pid_t pid = forkChild([&] {
    ::dup2(out[1], 1);
    ::dup2(out[1], 2);
    std::vector<char*> argv{const_cast<char*>(tool)};
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    ::execv(tool, argv.data());
    return 127;
  });
  ::close(out[1]);
  const auto end = std::chrono::steady_clock::now() + test::slow(10s);
  char buf[4096];
  for (;;) {
    pollfd p{out[0], POLLIN, 0};
    if (::poll(&p, 1, 100) > 0) {
      const ssize_t n = ::read(out[0], buf, sizeof buf);
      if (n <= 0) break;
      run.output.append(buf, static_cast<std::size_t>(n));
    }
    if (std::chrono::steady_clock::now() > end) {
      ADD_FAILURE() << "forklift-shm did not finish in time";
      break;
    }
  }
  ::close(out[0]);
  run.exitCode = exitCodeOf(waitChild(pid, 10s));
  return run;
}

// The line of `output` that mentions `name`, or "".
std::string lineOf(const std::string& output, const std::string& name) {
  std::size_t start = 0;
  while (start < output.size()) {
    const std::size_t end = std::min(output.find('\n', start), output.size());
    const std::string line = output.substr(start, end - start);
    if (line.find(name) != std::string::npos) return line;
    start = end + 1;
  }
  return "";
}

const SegmentInfo* findSegment(const std::vector<SegmentInfo>& all, const std::string& name) {
  for (const auto& s : all)
    if (s.name == name) return &s;
  return nullptr;
}

TEST(ShmListing, ListsLiveSegmentsAndSkipsForeignFiles) {
  SharedMemory live(create_only, ShmName::named("listed"), DType::U32, {6, 7});
  const std::string foreign = TEST_NAME("foreign");
  RemoveAtEnd cleanup{{foreign}};
  plant(foreign, std::string(256, '?'));

  const auto all = listSegments();
  const SegmentInfo* s = findSegment(all, live.name());
  ASSERT_NE(s, nullptr);
  EXPECT_TRUE(s->creatorAlive);
  EXPECT_EQ(s->creatorPid, ::getpid());
  EXPECT_EQ(s->kind, ShmKind::Array);
  EXPECT_EQ(s->dtype, DType::U32);
  EXPECT_EQ(s->shape, (std::vector<std::int64_t>{6, 7}));
  EXPECT_EQ(s->payloadBytes, 6u * 7 * 4);
  EXPECT_EQ(s->fileBytes, sizeof(detail::ShmHeader) + 6 * 7 * 4);
  EXPECT_EQ(s->generation, live.generation());
  EXPECT_EQ(s->describe(), "uint32[6x7] row-major");
  EXPECT_EQ(findSegment(all, foreign), nullptr);
  EXPECT_FALSE(removeStaleSegment(*s)) << "a live creator's segment counted as stale";
  EXPECT_TRUE(exists(live.name()));
}

TEST(ShmTool, FindsAndCleansTheSegmentOfAKilledCreatorOnly) {
  // A child creates a segment, says its name, and is killed before its
  // destructor can run: exactly a crashed frontend.
  int ready[2];
  ASSERT_EQ(::pipe2(ready, O_CLOEXEC), 0);
  const pid_t creator = forkChild([&] {
    ::close(ready[0]);
    SharedMemory shm(create_only, ShmName::named("stale"), DType::F64, {3, 4});
    const std::string line = shm.name() + "\n";
    if (::write(ready[1], line.data(), line.size()) != static_cast<ssize_t>(line.size())) return 2;
    std::this_thread::sleep_for(30s);  // killed long before
    return 5;
  });
  ::close(ready[1]);
  std::string staleName;
  char c;
  pollfd p{ready[0], POLLIN, 0};
  while (::poll(&p, 1, static_cast<int>(test::slowMs(10000))) > 0 && ::read(ready[0], &c, 1) == 1 && c != '\n') staleName += c;
  ::close(ready[0]);
  ::kill(creator, SIGKILL);
  const auto status = waitChild(creator, 10s);
  ASSERT_TRUE(status && WIFSIGNALED(*status) && WTERMSIG(*status) == SIGKILL);
  ASSERT_FALSE(staleName.empty()) << "the creator did not report its segment";
  RemoveAtEnd cleanup{{staleName}};
  ASSERT_TRUE(exists(staleName));

  SharedMemory live(create_only, ShmName::named("alive"), 100);
  const std::string foreignPlain = "not-forklift-" + std::to_string(::getpid());
  const std::string foreignFk = TEST_NAME("badmagic");
  cleanup.names.push_back(foreignPlain);
  cleanup.names.push_back(foreignFk);
  plant(foreignPlain, "someone else's");
  plant(foreignFk, std::string(512, '\0'));

  const auto all = listSegments();
  const SegmentInfo* s = findSegment(all, staleName);
  ASSERT_NE(s, nullptr);
  EXPECT_FALSE(s->creatorAlive);
  EXPECT_EQ(s->creatorPid, creator);
  EXPECT_EQ(s->describe(), "float64[3x4] row-major");

  const ToolRun list = runTool({"list"});
  EXPECT_EQ(list.exitCode, 0) << list.output;
  EXPECT_TRUE(contains(list.output, "NAME"));
  const std::string staleLine = lineOf(list.output, staleName);
  EXPECT_TRUE(contains(staleLine, "array  float64[3x4] row-major"));
  EXPECT_TRUE(contains(staleLine, std::to_string(creator)));
  EXPECT_TRUE(contains(staleLine, std::to_string(sizeof(detail::ShmHeader) + 96)));
  EXPECT_TRUE(contains(staleLine, "dead"));
  EXPECT_TRUE(contains(lineOf(list.output, live.name()), "alive"));
  EXPECT_TRUE(contains(lineOf(list.output, live.name()), "bytes  bytes[100]"));
  EXPECT_EQ(lineOf(list.output, foreignPlain), "");
  EXPECT_EQ(lineOf(list.output, foreignFk), "");

  const ToolRun dry = runTool({"clean", "--dry-run"});
  EXPECT_EQ(dry.exitCode, 0) << dry.output;
  EXPECT_TRUE(contains(dry.output, "would remove " + staleName + " (" + std::to_string(sizeof(detail::ShmHeader) + 96) +
                                       " bytes, creator " +
                                       std::to_string(creator) + " dead)"));
  EXPECT_TRUE(exists(staleName)) << "--dry-run removed something";

  const ToolRun clean = runTool({"clean"});
  EXPECT_EQ(clean.exitCode, 0) << clean.output;
  EXPECT_TRUE(contains(clean.output, "removed " + staleName));
  EXPECT_FALSE(exists(staleName));
  EXPECT_TRUE(exists(live.name())) << "clean removed a live creator's segment";
  EXPECT_TRUE(exists(foreignPlain)) << "clean touched a foreign file";
  EXPECT_TRUE(exists(foreignFk)) << "clean touched a foreign fk. file";

  const ToolRun bad = runTool({"scrub"});
  EXPECT_EQ(bad.exitCode, 2);
  EXPECT_TRUE(contains(bad.output, "usage: forklift-shm list"));
}

}  // namespace
}  // namespace forklift
