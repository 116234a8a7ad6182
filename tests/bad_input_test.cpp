// Hostile bytes on a real backend's command channel: raw frames written
// straight to the socket (MessageProcess::replyFd()), bypassing every check
// the frontend makes. A frame that is whole but wrong (unknown command, wrong
// types, deep nesting, huge declared counts, malformed or truncated msgpack,
// descriptors that do not match) must come back as a clear error, and the
// backend must go on serving. A stream that cannot be trusted any more
// (garbage, a bad version, a lying length, descriptors no frame claims)
// must end the backend with kExitCorruptStream after telling the frontend
// why. Nothing may leak: the backend's descriptors return to their count.
#include <gtest/gtest.h>
#include <dirent.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <string>
#include <vector>

#include "forklift/channel.hpp"
#include "forklift/process.hpp"
#include "support.hpp"

namespace forklift {
namespace {

using namespace std::chrono_literals;
using test::contains;

class Target : public MessageProcess {
 public:
  Target() : MessageProcess("bad-input") {
    command("square", &Target::c__square, {"x"});
    command("repeat", &Target::c__repeat, {"text", "times"});
    command("fdOk", &Target::c__fdOk, {"fd"});
  }
  ~Target() override { stop(); }

 private:
  double c__square(double x) { return x * x; }
  std::string c__repeat(std::string text, int times) {
    std::string s;
    for (int i = 0; i < times; ++i) s += text;
    return s;
  }
  bool c__fdOk(Fd fd) { return fd.valid(); }
};

// ---- msgpack and frame bytes, written by hand -----------------------------

std::string str(const std::string& s) {  // fixstr (< 32 bytes)
  return std::string(1, static_cast<char>(0xa0 | s.size())) + s;
}

std::string be32(std::uint32_t n) {
  std::string s;
  for (int i = 3; i >= 0; --i) s += static_cast<char>((n >> (8 * i)) & 0xff);
  return s;
}

// [command, 0, args] with `args` already msgpack (a map, normally).
std::string body(const std::string& command, const std::string& args) {
  return "\x93" + str(command) + std::string(1, '\0') + args;
}

std::string frame(const std::string& body, unsigned nfds = 0, long declared = -1) {
  const auto len = declared >= 0 ? static_cast<std::uint32_t>(declared) : static_cast<std::uint32_t>(body.size());
  std::string f = {'F', 'K', 2, static_cast<char>(nfds)};
  for (int i = 0; i < 4; ++i) f += static_cast<char>((len >> (8 * i)) & 0xff);
  return f + body;
}

// One sendmsg: `bytes`, with `fds` attached to its first byte.
void writeRaw(int sock, const std::string& bytes, const std::vector<int>& fds = {}) {
  msghdr msg{};
  iovec iov{const_cast<char*>(bytes.data()), bytes.size()};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  std::vector<char> control(CMSG_SPACE(sizeof(int) * fds.size()));
  if (!fds.empty()) {
    msg.msg_control = control.data();
    msg.msg_controllen = control.size();
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
  }
  ASSERT_EQ(::sendmsg(sock, &msg, MSG_NOSIGNAL), static_cast<ssize_t>(bytes.size())) << std::strerror(errno);
}

// What recv() reports for a sent command that failed in the backend.
std::string commandError(Target& p) {
  try {
    auto m = p.recv(test::slow(5s));
    return m ? "(a message instead of an error: " + m->toString() + ")" : "(no error within 5 s)";
  } catch (const CommandError& e) {
    return "[" + e.command() + "] " + e.what();
  }
}

int fdCount(pid_t pid) {
  int n = 0;
  if (DIR* d = ::opendir(("/proc/" + std::to_string(pid) + "/fd").c_str())) {
    while (const dirent* e = ::readdir(d)) n += e->d_name[0] != '.';
    ::closedir(d);
  }
  return n;
}

void servesNext(Target& p) {
  EXPECT_EQ(p.call("square", {{"x", 3.0}}).as<double>(), 9.0) << "the backend no longer serves";
}

// ---- whole frames that are wrong: a clear error, and the next call served

struct Refused {
  const char* what;
  std::string bytes;
  const char* error;  // part of the error text
};

TEST(BadInput, WholeButWrongFramesAreAnsweredAndTheBackendGoesOn) {
  const std::string deep = "\x81" + str("x") + std::string(40, '\x91') + "\xc0";
  const std::vector<Refused> cases = {
      {"unknown command", frame(body("nope", "\x80")), "unknown command 'nope'"},
      {"reserved command", frame(body("__ready", "\x80")), "unknown command '__ready'"},
      {"wrong type", frame(body("square", "\x81" + str("x") + str("seven"))),
       "argument 'x': string found, double wanted"},
      {"missing argument", frame(body("square", "\x80")), "argument 'x' is missing"},
      {"int out of range", frame(body("repeat", "\x82" + str("text") + str("a") + str("times") + "\xcf" +
                                                   std::string(8, '\x7f'))),
       "argument 'times'"},
      {"args not a map", frame(body("square", "\x91\x01")), "not a [command, id, args] triple"},
      {"not a triple", frame("\x92" + str("square") + std::string(1, '\0')), "not a [command, id, args] triple"},
      {"negative id", frame("\x93" + str("square") + "\xff\x80"), "not a [command, id, args] triple"},
      {"deep nesting", frame(body("square", deep)), "nests deeper than 32 levels"},
      {"huge array count", frame(body("square", "\x81" + str("x") + "\xdd" + be32(0xffffffff))),
       "claims 4294967295 elements"},
      {"huge map count", frame(body("square", "\xdf" + be32(0xfffffff0))), "claims 4294967280 elements"},
      {"huge string length", frame(body("square", "\x81" + str("x") + "\xdb" + be32(0xfffffff0) + "abc")),
       "truncated message"},
      {"huge binary length", frame(body("square", "\x81" + str("x") + "\xc6" + be32(0x7ffffff0))),
       "truncated message"},
      {"huge ext length", frame(body("square", "\x81" + str("x") + "\xc9" + be32(0x7ffffff0) + "\x01")),
       "truncated message"},
      {"unknown ext", frame(body("square", "\x81" + str("x") + std::string("\xd4\x07\x00", 3))), "unknown msgpack extension"},
      {"malformed msgpack", frame(body("square", "\xc1")), "malformed msgpack"},
      {"truncated body", frame(body("square", "\x81" + str("x") + "\xcb\x40\x08")), "truncated message"},
      {"trailing bytes", frame(body("square", "\x81" + str("x") + "\x03") + "\xc0\xc0"), "2 trailing bytes"},
      {"non-string key", frame(body("square", "\x81\x01\x02")), "map key is not a string"},
      {"array ext with a lying shape",
       frame(body("square", "\x81" + str("x") + "\xc7\x12\x01\x0a\x01" + std::string("\xff\xff\xff\xff\xff\xff\xff\x7f", 8) +
                                std::string(8, '\0'))),
       "array dimension larger than the message"},
      {"descriptor index, none attached", frame(body("fdOk", "\x81" + str("fd") + "\xd6\x02" + std::string(4, '\0'))),
       "refers to descriptor 0 but came with 0 descriptors"},
      {"empty", frame(""), "truncated message"},
  };
  Target p;
  p.start();
  for (const auto& c : cases) {
    SCOPED_TRACE(c.what);
    writeRaw(p.replyFd(), c.bytes);
    const std::string e = commandError(p);
    EXPECT_TRUE(contains(e, c.error));
    EXPECT_TRUE(contains(e, "bad-input")) << "the error names the process";
    servesNext(p);
  }
  EXPECT_TRUE(p.stop().ok());
}

TEST(BadInput, TheErrorNamesTheCommandWhenItWasRead) {
  Target p;
  p.start();
  writeRaw(p.replyFd(), frame(body("repeat", "\x81" + str("text") + "\xc1")));
  const std::string e = commandError(p);
  EXPECT_TRUE(contains(e, "[repeat]"));
  EXPECT_TRUE(contains(e, "'repeat'"));
  servesNext(p);
}

TEST(BadInput, BadDescriptorsAreClosedAndAnswered) {
  Target p;
  p.start();
  servesNext(p);
  const int before = fdCount(p.pid());
  int pipeFds[2];
  ASSERT_EQ(::pipe(pipeFds), 0);
  const std::string fdArg = "\x81" + str("fd") + "\xd6\x02" + std::string(4, '\0');  // descriptor 0
  struct FdCase {
    const char* what;
    std::string bytes;
    std::vector<int> fds;
    const char* error;
  };
  const std::vector<FdCase> cases = {
      {"declares 2, 1 attached", frame(body("fdOk", fdArg), 2), {pipeFds[0]}, "declares 2 descriptors but 1 came"},
      {"attached but never referred to", frame(body("square", "\x81" + str("x") + "\x02"), 1), {pipeFds[0]},
       "came with 1 descriptors but refers to only 0"},
      {"referred to twice", frame(body("fdOk", "\x82" + str("fd") + "\xd6\x02" + std::string(4, '\0') + str("f2") +
                                                   "\xd6\x02" + std::string(4, '\0')),
                                  1),
       {pipeFds[0]}, "refers to descriptor 0 twice"},
      {"index past the list", frame(body("fdOk", "\x81" + str("fd") + std::string("\xd6\x02\x05\x00\x00\x00", 6)), 1), {pipeFds[0]},
       "refers to descriptor 5 but came with 1 descriptor"},
      {"descriptor where a double is wanted", frame(body("square", "\x81" + str("x") + "\xd6\x02" + std::string(4, '\0')), 1),
       {pipeFds[1]}, "argument 'x': fd found, double wanted"},
      {"short descriptor ext", frame(body("fdOk", "\x81" + str("fd") + std::string("\xd5\x02\x00\x00", 4)), 1), {pipeFds[0]},
       "descriptor extension of 2 bytes"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.what);
    writeRaw(p.replyFd(), c.bytes, c.fds);
    EXPECT_TRUE(contains(commandError(p), c.error));
    servesNext(p);
  }
  // A good descriptor still goes through, and every refused one was closed.
  EXPECT_TRUE(p.call("fdOk", {{"fd", Fd::dup(pipeFds[0])}}).as<bool>());
  EXPECT_TRUE(test::eventually([&] { return fdCount(p.pid()) == before; }, 2s))
      << "the backend holds " << fdCount(p.pid()) - before << " descriptors more than before";
  ::close(pipeFds[0]);
  ::close(pipeFds[1]);
  EXPECT_TRUE(p.stop().ok());
}

// ---- a stream that cannot be trusted: the backend says why and ends ------

struct Corrupt {
  const char* what;
  std::string bytes;
  const char* error;
  // With a descriptor attached to `bytes`, whose (whole, wrong) frame is
  // answered first; then `after` is written.
  bool attachFd = false;
  std::string after = {};
};

TEST(BadInput, ACorruptStreamEndsTheBackendWithItsOwnStatus) {
  const std::string good = frame(body("square", "\x81" + str("x") + "\x02"));
  const std::vector<Corrupt> cases = {
      {"garbage", "hello, backend\n", "bad magic bytes 68 65 6c"},
      {"garbage after a good frame", good + std::string("\x00\x01\x02\x03\x04\x05\x06\x07", 8),
       "bad magic bytes 00 01 02"},
      {"old version", "FK\x01" + good.substr(3), "frame version 1; this side speaks version 2"},
      {"lying length over the limit", frame(body("square", "\x80"), 0, 0x7ffffff0),
       "declares a body of 2147483632 bytes, over the limit"},
      // The first 4 bytes are refused as a truncated message, the rest of
      // the body is where the next header should be.
      {"length shorter than the body", frame(body("square", "\x81" + str("x") + "\x02"), 0, 4), "bad magic bytes"},
      {"too many descriptors declared", frame(body("square", "\x80"), 254), "declares 254 descriptors"},
      {"descriptors no frame claims", frame(body("nope", "\x80")), "no frame declaring descriptors", true, good},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.what);
    Target p;
    p.start();
    const int devnull = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
    ASSERT_GE(devnull, 0);
    writeRaw(p.replyFd(), c.bytes, c.attachFd ? std::vector<int>{devnull} : std::vector<int>{});
    ::close(devnull);
    // A whole frame before the corruption is handled first.
    std::string e = commandError(p);
    if (contains(e, "truncated message") || contains(e, "unknown command")) {
      if (!c.after.empty()) writeRaw(p.replyFd(), c.after);
      e = commandError(p);
    }
    EXPECT_TRUE(contains(e, "the command stream is corrupt"));
    EXPECT_TRUE(contains(e, c.error));
    const ExitStatus s = p.stop(test::slow(5s));
    EXPECT_EQ(s.how, ExitStatus::How::Exited) << s.describe();
    EXPECT_EQ(s.code, kExitCorruptStream) << s.describe();
    EXPECT_TRUE(contains(s.describe(), "corrupt"));
  }
}

// A frame cut short by its writer is not an error while more may come; the
// backend keeps waiting for it and still stops in order when asked.
TEST(BadInput, AFrameCutShortDoesNotBlockTheStop) {
  Target p;
  p.start();
  servesNext(p);
  const std::string f = frame(body("square", "\x81" + str("x") + "\x02"));
  writeRaw(p.replyFd(), f.substr(0, f.size() - 3));
  const ExitStatus s = p.stop(test::slow(5s));
  EXPECT_TRUE(s.ok()) << s.describe();
  EXPECT_EQ(s.escalation, 0) << "stop had to escalate: " << s.describe();
}

}  // namespace
}  // namespace forklift
