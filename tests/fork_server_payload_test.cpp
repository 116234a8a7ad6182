// The fork server's payloads: one recipe registered before the server
// started makes, in the served child, an object the server has no copy of,
// from the bytes the start carried (lib/fork_server.hpp, "Payloads").
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <memory>
#include <string>

#include "forklift/fork_server.hpp"
#include "forklift/process.hpp"
#include "fork_server.hpp"
#include "support.hpp"

namespace forklift {
namespace {

using namespace std::chrono_literals;

// What the served child makes from the payload.
class Made : public MessageProcess {
 public:
  Made(std::string name, std::string payload) : MessageProcess(std::move(name)), payload_(std::move(payload)) {
    command("payload", &Made::c__payload);
    command("name", &Made::c__name);
  }

 private:
  std::string c__payload() { return payload_; }
  std::string c__name() { return name(); }
  std::string payload_;
};

// The frontend's handle: it has no commands of its own, so a reply proves
// the child ran the object made from the payload.
class Shell : public MessageProcess {
 public:
  explicit Shell(std::string name) : MessageProcess(std::move(name)) {}
  ~Shell() override { stop(); }
};

// The recipe every test binds its Shell to, registered before any server.
std::uint64_t makeFromPayload() {
  static const std::uint64_t key = detail::recipes::add([](detail::ServedCall& c) {
    auto* made = new Made("made", c.payload);  // the child leaves with _exit: never destroyed
    return detail::runServed(*made, c);
  });
  return key;
}

using test::BusyThread;

void expectNothingLeft() {
  EXPECT_FALSE(ForkServer::running()) << "the fork server outlived its handles";
  EXPECT_TRUE(test::eventually([] { return !test::hasChildren(); }, 2000ms)) << "a process was left behind";
}

TEST(ForkServerPayload, TheServedChildGetsTheBindingsBytes) {
  const std::uint64_t key = makeFromPayload();
  {
    Shell a("a");
    Shell b("b");
    detail::recipes::bind(&a, key, 0, "first");
    detail::recipes::bind(&b, key, 0, std::string("sec\0nd", 6));  // bytes, not a C string
    ForkServer server;
    BusyThread busy;  // a fork of this process is refused from here on
    a.start();
    b.start();
    EXPECT_EQ(a.call("payload").as<std::string>(), "first");
    EXPECT_EQ(b.call("payload").as<std::string>(), std::string("sec\0nd", 6));
    EXPECT_EQ(a.call("name").as<std::string>(), "made");
    EXPECT_TRUE(a.stop().ok());
    // A restart carries the payload of the binding as it is then.
    detail::recipes::bind(&a, key, 0, "again");
    a.start();
    EXPECT_EQ(a.call("payload").as<std::string>(), "again");
    EXPECT_TRUE(a.stop().ok());
    EXPECT_TRUE(b.stop().ok());
  }
  expectNothingLeft();
}

TEST(ForkServerPayload, APayloadAtTheLimitArrivesWholeOnePastItIsRefused) {
  const std::uint64_t key = makeFromPayload();
  {
    Shell a("a");
    std::string big(detail::kMaxRecipePayload, '\0');
    for (std::size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>(i * 131 + 7);
    detail::recipes::bind(&a, key, 0, big);
    const std::string over(detail::kMaxRecipePayload + 1, 'x');
    const std::string what = test::thrown<LimitError>([&] { detail::recipes::bind(&a, key, 0, over); });
    EXPECT_TRUE(test::contains(what, "over the fork server's limit of " + std::to_string(detail::kMaxRecipePayload)));
    ASSERT_TRUE(detail::recipes::bound(&a).has_value());
    EXPECT_EQ(detail::recipes::bound(&a)->payload, big) << "a refused payload changed the binding";
    ForkServer server;
    BusyThread busy;
    a.start();
    EXPECT_EQ(a.call("payload").as<std::string>(), big);
    EXPECT_TRUE(a.stop().ok());
  }
  expectNothingLeft();
}

}  // namespace
}  // namespace forklift
