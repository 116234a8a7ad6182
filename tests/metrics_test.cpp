// The metrics page: counts on both sides, one page per process, and a page
// that an outside reader finds through /proc/<pid>/fd.
#include <gtest/gtest.h>
#include <dirent.h>
#include <fcntl.h>
#include <unistd.h>

#include <memory>

#include "forklift/process.hpp"
#include "metrics.hpp"
#include "support.hpp"

namespace forklift {
namespace {

class Counted : public MessageProcess {
 public:
  Counted() : MessageProcess("counted") {
    command("echo", &Counted::c__echo, {"x"});
    command("fail", &Counted::c__fail);
    command("mine", &Counted::c__mine);
  }

 private:
  int c__echo(int x) { return x; }
  void c__fail() { throw Error("on purpose"); }
  // This backend's page: pid, messages in, errors, role.
  List c__mine() {
    const auto& m = detail::metrics();
    return List{m.pid, static_cast<std::int64_t>(m.messagesIn.load()), static_cast<std::int64_t>(m.errors.load()),
                std::string(m.role), std::string(m.name)};
  }
};

// The metrics page of `pid` as an outside reader sees it, found by its label.
std::unique_ptr<detail::MetricsPage> pageOf(pid_t pid) {
  const std::string dir = "/proc/" + std::to_string(pid) + "/fd/";
  DIR* d = ::opendir(dir.c_str());
  if (!d) return nullptr;
  std::unique_ptr<detail::MetricsPage> out;
  while (const dirent* e = ::readdir(d)) {
    char link[256] = {};
    if (::readlink((dir + e->d_name).c_str(), link, sizeof link - 1) <= 0) continue;
    if (std::string(link).rfind("/memfd:forklift-metrics", 0) != 0) continue;
    const int fd = ::open((dir + e->d_name).c_str(), O_RDONLY | O_CLOEXEC);
    out = std::make_unique<detail::MetricsPage>();
    if (::pread(fd, static_cast<void*>(out.get()), sizeof *out, 0) != static_cast<ssize_t>(sizeof *out)) out.reset();
    ::close(fd);
  }
  ::closedir(d);
  return out;
}

TEST(Metrics, BothSidesCountIntoPagesOfTheirOwn) {
  Counted p;
  p.start();
  auto& mine = detail::metrics();
  const auto calls0 = mine.calls.load();
  const auto out0 = mine.messagesOut.load();
  const auto in0 = mine.messagesIn.load();
  const auto errors0 = mine.errors.load();
  const List before = p.call("mine").as<List>();
  for (int i = 0; i < 10; ++i) EXPECT_EQ(p.call("echo", {{"x", i}}).as<int>(), i);
  EXPECT_THROW(p.call("fail"), RemoteError);
  const List after = p.call("mine").as<List>();

  EXPECT_EQ(mine.pid, ::getpid());
  EXPECT_EQ(mine.calls.load() - calls0, 13u);
  EXPECT_GE(mine.messagesOut.load() - out0, 13u);
  EXPECT_GE(mine.messagesIn.load() - in0, 13u);
  EXPECT_EQ(mine.errors.load() - errors0, 1u);  // the error reply

  // The backend's own page: its pid, 12 commands in between the two looks
  // (10 echo, 1 fail, 1 mine), the failed handler, its role and title.
  EXPECT_EQ(after[0].as<std::int64_t>(), p.pid());
  EXPECT_EQ(after[1].as<std::int64_t>() - before[1].as<std::int64_t>(), 12);
  EXPECT_EQ(after[2].as<std::int64_t>() - before[2].as<std::int64_t>(), 1);
  EXPECT_EQ(after[3].as<std::string>(), "backend");
  EXPECT_EQ(after[4].as<std::string>(), "forklift: Counted.counted");

  // An outside reader finds both pages.
  const auto front = pageOf(::getpid());
  ASSERT_TRUE(front);
  EXPECT_EQ(front->magic, detail::kMetricsMagic);
  EXPECT_EQ(front->pid, ::getpid());
  const auto back = pageOf(p.pid());
  ASSERT_TRUE(back);
  EXPECT_EQ(back->pid, p.pid());
  EXPECT_GE(back->messagesIn.load(), 13u);  // mine, 10 echo, fail, mine
  p.stop();
}

}  // namespace
}  // namespace forklift
