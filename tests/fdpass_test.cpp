// Descriptors as arguments between a frontend and its backend: handlers
// take them, replies and sendOut__ return them, and neither side keeps one
// it was not asked to keep.
#include <gtest/gtest.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <deque>

#include "forklift/process.hpp"
#include "support.hpp"

namespace forklift {
namespace {

using namespace std::chrono_literals;
const auto errorOf = [](auto&& fn) { return test::thrown(fn); };

// A memfd holding `n` doubles 0.5, 1.5, ...: an array made on demand.
detail::UniqueFd makeArray(std::size_t n) {
  detail::UniqueFd mem(::memfd_create("fk-array", MFD_CLOEXEC));
  if (!mem) throw SystemError(errno, "cannot create a memfd");
  std::vector<double> data(n);
  for (std::size_t i = 0; i < n; ++i) data[i] = static_cast<double>(i) + 0.5;
  const auto bytes = static_cast<ssize_t>(n * sizeof(double));
  if (::write(mem.get(), data.data(), n * sizeof(double)) != bytes) throw Error("short write to a memfd");
  return mem;
}

double expectedSum(std::size_t n) { return static_cast<double>(n) * static_cast<double>(n) / 2.0; }

// Maps the array and sums it; -1 when it is not one.
double sumArray(int fd) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) return -1;
  const auto size = static_cast<std::size_t>(st.st_size);
  if (size == 0) return 0;
  void* p = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) return -1;
  double sum = 0;
  for (std::size_t i = 0; i < size / sizeof(double); ++i) sum += static_cast<const double*>(p)[i];
  ::munmap(p, size);
  return sum;
}

std::uint64_t counterValue(int fd) {
  std::uint64_t v = 0;
  return ::read(fd, &v, sizeof v) == static_cast<ssize_t>(sizeof v) ? v : ~std::uint64_t{0};
}

class FdProcess : public MessageProcess {
 public:
  explicit FdProcess(ProcessOptions o = {}) : MessageProcess("fds", std::move(o)) {
    command("sum", &FdProcess::c__sum, {"array"});
    command("open_fds", &FdProcess::c__openFds);
    command("make", &FdProcess::c__make, {"n"});
    command("emit", &FdProcess::c__emit, {"count", "pad"});
    command("empty", &FdProcess::c__empty);
  }

 private:
  // Opens (maps) the array it was sent and closes it again.
  double c__sum(Fd array) {
    detail::UniqueFd mine = array.take();  // closed on return, whoever else held it
    return sumArray(mine.get());
  }
  int c__openFds() { return test::openFdCount(); }
  Fd c__make(int n) { return Fd(makeArray(static_cast<std::size_t>(n))); }
  void c__emit(int count, int pad) {
    for (int i = 0; i < count; ++i) {
      detail::UniqueFd c(::eventfd(static_cast<unsigned>(i) + 1, EFD_CLOEXEC));
      if (!c) throw SystemError(errno, "cannot create an eventfd");
      sendOut__(Message("counter", {{"i", i}, {"fd", std::move(c)}, {"pad", std::string(static_cast<std::size_t>(pad), 'p')}}));
    }
  }
  Fd c__empty() { return Fd(); }
};

// The test: 1,000 arrays created on demand, each sent to the
// backend, opened (mapped and summed) there and closed again; half one call
// at a time, half pipelined 50 at once. Descriptor counts on both sides end
// where they started.
void thousandArrays(ProcessOptions o) {
  FdProcess p(std::move(o));
  p.start();
  const int frontStart = test::openFdCount();
  const int backStart = p.call("open_fds", {}, test::slow(5s)).as<int>();
  for (std::size_t i = 0; i < 500; ++i) {
    const std::size_t n = 1 + i % 300;
    ASSERT_EQ(p.call("sum", {{"array", makeArray(n)}}, test::slow(5s)).as<double>(), expectedSum(n)) << i;
  }
  for (std::size_t round = 0; round < 10; ++round) {
    std::deque<std::pair<std::size_t, CallFuture>> calls;
    for (std::size_t k = 0; k < 50; ++k) {
      const std::size_t n = 1 + (round * 50 + k) % 1000;
      calls.emplace_back(n, p.callAsync("sum", {{"array", makeArray(n)}}, test::slow(5s)));
    }
    for (auto& [n, f] : calls) ASSERT_EQ(f.get().as<double>(), expectedSum(n));
  }
  EXPECT_EQ(test::openFdCount(), frontStart);
  EXPECT_EQ(p.call("open_fds", {}, test::slow(5s)).as<int>(), backStart);
  EXPECT_TRUE(p.stop(test::slow(5s)).ok());
}

TEST(FdPass, AThousandArraysOpenedByTheBackendLeaveNoDescriptorOnEitherSide) { thousandArrays({}); }

TEST(FdPass, TheSameInProcess) {
  ProcessOptions o;
  o.inProcess = true;
  thousandArrays(o);
}

TEST(FdPass, ACallCanReturnADescriptor) {
  FdProcess p;
  p.start();
  const int frontStart = test::openFdCount();
  const int backStart = p.call("open_fds", {}, test::slow(5s)).as<int>();
  for (int i = 1; i <= 100; ++i) {
    const Value v = p.call("make", {{"n", i}}, test::slow(5s));
    ASSERT_EQ(v.kind(), Value::Kind::Fd);
    EXPECT_EQ(sumArray(v.as<Fd>().get()), expectedSum(static_cast<std::size_t>(i)));
  }
  // Kept by the caller: it outlives the reply.
  detail::UniqueFd kept = p.call("make", {{"n", 4}}, test::slow(5s)).takeFd();
  EXPECT_EQ(sumArray(kept.get()), expectedSum(4));
  EXPECT_EQ(test::openFdCount(), frontStart + 1);
  kept.reset();
  EXPECT_EQ(test::openFdCount(), frontStart);
  EXPECT_EQ(p.call("open_fds", {}, test::slow(5s)).as<int>(), backStart);
  EXPECT_TRUE(p.stop(test::slow(5s)).ok());
}

// More than the socket holds: the backend queues frames with their
// descriptors, and each still arrives with its own message.
TEST(FdPass, SendOutCarriesDescriptorsAlsoWhenItsQueueFills) {
  FdProcess p;
  p.start();
  const int frontStart = test::openFdCount();
  const int backStart = p.call("open_fds", {}, test::slow(5s)).as<int>();
  constexpr int kCount = 300;
  p.send("emit", {{"count", kCount}, {"pad", 16 << 10}});  // ~5 MB: most of it waits in the queue
  ::usleep(100000);
  for (int i = 0; i < kCount; ++i) {
    auto m = p.recv(test::slow(5s));
    ASSERT_TRUE(m) << i;
    ASSERT_EQ(m->get<int>("i"), i);
    EXPECT_EQ(counterValue(m->get<Fd>("fd").get()), static_cast<std::uint64_t>(i) + 1) << i;
  }
  EXPECT_EQ(test::openFdCount(), frontStart);
  EXPECT_EQ(p.call("open_fds", {}, test::slow(5s)).as<int>(), backStart);
  EXPECT_TRUE(p.stop(test::slow(5s)).ok());
}

TEST(FdPass, BadDescriptorArgumentsAreClearErrors) {
  ProcessOptions o;
  o.limits.maxFds = 4;
  FdProcess p(o);
  p.start();
  EXPECT_EQ(errorOf([&] { p.call("sum", {{"array", 3}}, test::slow(5s)); }),
            "FdProcess.fds: command 'sum': argument 'array': int found, fd wanted");
  const Fd f(makeArray(1));
  EXPECT_EQ(errorOf([&] { p.call("sum", {{"array", List(5, Value(f))}}, test::slow(5s)); }),
            "cannot send 'sum': argument 'array' carries more than 4 descriptors");
  EXPECT_THROW(p.send("sum", {{"array", Fd()}}), TypeError);
  EXPECT_EQ(errorOf([&] { p.call("empty", {}, test::slow(5s)); }),
            "cannot send '__ok': argument 'value' is an empty descriptor (never set, or taken)");
  EXPECT_EQ(p.call("sum", {{"array", f}}, test::slow(5s)).as<double>(), expectedSum(1));
  EXPECT_TRUE(p.stop(test::slow(5s)).ok());
}

}  // namespace
}  // namespace forklift
