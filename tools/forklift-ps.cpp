// forklift-ps - this user's forklift processes as a tree, with live counters
//
//   forklift-ps                 one table and exit
//   forklift-ps --watch [S]     redraw every S seconds (default 1) until Ctrl-C
//
// A process is forklift's when it publishes a metrics page (lib/metrics.hpp:
// a memfd labelled "forklift-metrics", found through /proc/<pid>/fd) or its
// title starts with "forklift: ". For each: pid, role (manager, frontend,
// backend, ...), name (its title), state, RSS and PSS (smaps_rollup), the
// counters of its page (messages in and out, calls, errors, ring drops,
// seconds since the last message), and below it the segments it holds:
// anonymous ones through its descriptors, named ones through its mappings,
// with kind, content and size when their header can be read. Children are
// indented under their parent. Other users' processes are not shown.
//
// Exit status: 0 (also when no forklift process runs), 2 for a usage error.
#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "forklift/detail/shm_header.hpp"
#include "forklift/value.hpp"
#include "metrics.hpp"

namespace {

using forklift::detail::MetricsPage;

struct Counters {
  std::uint64_t in = 0, out = 0, calls = 0, errors = 0, drops = 0;
  std::int64_t lastMs = 0;
};

struct Segment {
  std::string label;
  std::uint64_t bytes = 0;
  std::string content;  // "array float64[480x640]", or "" when unreadable
};

struct Proc {
  pid_t pid = 0;
  pid_t ppid = 0;
  char state = '?';
  std::string title;
  std::string role;
  std::uint64_t rssKiB = 0;
  std::optional<std::uint64_t> pssKiB;
  std::optional<Counters> counters;
  std::vector<Segment> segments;
};

std::string readAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

// "Key:   123 kB" from a /proc status-like file.
std::optional<std::uint64_t> kibField(const std::string& text, const std::string& key) {
  const auto at = text.find("\n" + key + ":");
  const auto pos = text.rfind(key + ":", 0) == 0 ? 0 : (at == std::string::npos ? at : at + 1);
  if (pos == std::string::npos) return std::nullopt;
  return std::strtoull(text.c_str() + pos + key.size() + 1, nullptr, 10);
}

std::string linkOf(const std::string& path) {
  char buf[512];
  const ssize_t n = ::readlink(path.c_str(), buf, sizeof buf - 1);
  return n > 0 ? std::string(buf, static_cast<std::size_t>(n)) : std::string();
}

// Kind and content of a forklift segment from its first bytes.
std::string describeHeader(int fd) {
  forklift::detail::ShmHeader h{};
  if (::pread(fd, &h, sizeof h, 0) != static_cast<ssize_t>(sizeof h)) return "";
  if (h.magic != forklift::detail::kShmMagic || h.version != forklift::detail::kShmVersion) return "";
  static const char* kinds[] = {"bytes", "array", "ring"};
  std::string s = h.kind < 3 ? kinds[h.kind] : "?";
  if (h.dtype != 0 && forklift::dtypeValid(h.dtype) && h.rank <= forklift::detail::kShmMaxRank) {
    s += std::string(" ") + forklift::dtypeName(static_cast<forklift::DType>(h.dtype)) + "[";
    for (unsigned i = 0; i < h.rank; ++i) s += std::string(i ? "x" : "") + std::to_string(h.shape[i]);
    s += "]";
  }
  return s;
}

// Opens what another process holds or names, for reading: never blocks
// (O_NONBLOCK: a FIFO put where a segment was would block an open for
// good), and only a regular file is read (-1 for anything else).
int openRegular(const std::string& path, int flags, struct stat& fs) {
  const int fd = ::open(path.c_str(), flags | O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
  if (fd < 0) return -1;
  if (::fstat(fd, &fs) != 0 || !S_ISREG(fs.st_mode)) {
    ::close(fd);
    return -1;
  }
  return fd;
}

// Size and content of a segment, opened through `path`.
Segment readSegment(Segment s, const std::string& path, int flags) {
  struct stat fs {};
  const int fd = openRegular(path, flags, fs);
  if (fd < 0) return s;
  s.bytes = static_cast<std::uint64_t>(fs.st_size);
  s.content = describeHeader(fd);
  ::close(fd);
  return s;
}

std::optional<Counters> readCounters(const std::string& fdPath, std::string& role) {
  struct stat fs {};
  const int fd = openRegular(fdPath, 0, fs);
  if (fd < 0) return std::nullopt;
  alignas(64) unsigned char raw[sizeof(MetricsPage)];
  const ssize_t n = ::pread(fd, raw, sizeof raw, 0);
  ::close(fd);
  if (n != static_cast<ssize_t>(sizeof raw)) return std::nullopt;
  // Read field by field from the bytes: the page is only a snapshot here.
  auto field = [&](auto member, auto& out) { std::memcpy(&out, raw + member, sizeof out); };
  std::uint64_t magic = 0;
  std::uint32_t version = 0;
  field(offsetof(MetricsPage, magic), magic);
  field(offsetof(MetricsPage, version), version);
  if (magic != forklift::detail::kMetricsMagic || version != forklift::detail::kMetricsVersion) return std::nullopt;
  char roleText[sizeof(MetricsPage::role)];
  std::memcpy(roleText, raw + offsetof(MetricsPage, role), sizeof roleText);
  roleText[sizeof roleText - 1] = '\0';
  role = roleText;
  Counters c;
  field(offsetof(MetricsPage, messagesIn), c.in);
  field(offsetof(MetricsPage, messagesOut), c.out);
  field(offsetof(MetricsPage, calls), c.calls);
  field(offsetof(MetricsPage, errors), c.errors);
  field(offsetof(MetricsPage, ringDrops), c.drops);
  field(offsetof(MetricsPage, lastActivityMs), c.lastMs);
  return c;
}

std::optional<Proc> inspect(pid_t pid) {
  const std::string dir = "/proc/" + std::to_string(pid);
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0 || st.st_uid != ::getuid()) return std::nullopt;
  Proc p;
  p.pid = pid;
  std::string cmdline = readAll(dir + "/cmdline");
  std::replace(cmdline.begin(), cmdline.end(), '\0', ' ');
  while (!cmdline.empty() && cmdline.back() == ' ') cmdline.pop_back();
  p.title = cmdline;

  std::set<std::string> seen;
  if (DIR* d = ::opendir((dir + "/fd").c_str())) {
    while (const dirent* e = ::readdir(d)) {
      if (e->d_name[0] == '.') continue;
      const std::string path = dir + "/fd/" + e->d_name;
      const std::string target = linkOf(path);
      if (target.rfind(std::string("/memfd:") + forklift::detail::kMetricsLabel, 0) == 0) {
        p.counters = readCounters(path, p.role);
      } else if (target.rfind("/memfd:anon.", 0) == 0) {
        Segment s;
        s.label = target.substr(7, target.find(' ') == std::string::npos ? std::string::npos : target.find(' ') - 7);
        if (!seen.insert(s.label).second) continue;
        p.segments.push_back(readSegment(std::move(s), path, 0));
      }
    }
    ::closedir(d);
  }
  if (!p.counters && p.title.rfind("forklift: ", 0) != 0) return std::nullopt;

  // Named segments show only as mappings.
  std::istringstream maps(readAll(dir + "/maps"));
  for (std::string line; std::getline(maps, line);) {
    const auto at = line.find("/dev/shm/fk.");
    if (at == std::string::npos) continue;
    Segment s;
    s.label = line.substr(at + 9);
    if (const auto sp = s.label.find(' '); sp != std::string::npos) s.label.resize(sp);
    if (!seen.insert(s.label).second) continue;
    const std::string path = "/dev/shm/" + s.label;
    p.segments.push_back(readSegment(std::move(s), path, O_NOFOLLOW));
  }

  // "pid (comm) S ppid ...": comm may hold spaces and parentheses.
  const std::string stat = readAll(dir + "/stat");
  const auto close = stat.rfind(')');
  if (close != std::string::npos && close + 4 < stat.size()) {
    p.state = stat[close + 2];
    p.ppid = static_cast<pid_t>(std::strtol(stat.c_str() + close + 4, nullptr, 10));
  }
  p.rssKiB = kibField(readAll(dir + "/status"), "VmRSS").value_or(0);
  p.pssKiB = kibField(readAll(dir + "/smaps_rollup"), "Pss");
  if (p.role.empty()) p.role = "?";
  return p;
}

std::vector<Proc> scan() {
  std::vector<Proc> out;
  DIR* d = ::opendir("/proc");
  if (!d) return out;
  while (const dirent* e = ::readdir(d)) {
    char* end = nullptr;
    const long pid = std::strtol(e->d_name, &end, 10);
    if (*end != '\0' || pid <= 0 || pid == ::getpid()) continue;  // not itself: it links forklift too
    if (auto p = inspect(static_cast<pid_t>(pid))) out.push_back(std::move(*p));
  }
  ::closedir(d);
  std::sort(out.begin(), out.end(), [](const Proc& a, const Proc& b) { return a.pid < b.pid; });
  return out;
}

std::string human(std::uint64_t bytes) {
  const char* units[] = {"B", "K", "M", "G", "T"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024.0 && u < 4) {
    v /= 1024.0;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, u == 0 ? "%.0f%s" : "%.1f%s", v, units[u]);
  return buf;
}

std::int64_t nowMs() {
  timespec ts{};
  ::clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<std::int64_t>(ts.tv_sec) * 1000 + ts.tv_nsec / 1000000;
}

void printTree(const std::vector<Proc>& procs) {
  std::map<pid_t, std::vector<const Proc*>> children;
  std::set<pid_t> ours;
  for (const auto& p : procs) ours.insert(p.pid);
  std::vector<const Proc*> roots;
  for (const auto& p : procs) {
    if (ours.count(p.ppid)) children[p.ppid].push_back(&p);
    else roots.push_back(&p);
  }
  std::printf("%-9s %-9s %-5s %8s %8s %9s %9s %8s %5s %6s %6s  %s\n", "PID", "ROLE", "STATE", "RSS", "PSS", "MSG-IN",
              "MSG-OUT", "CALLS", "ERR", "DROPS", "IDLE", "NAME");
  const std::int64_t now = nowMs();
  auto print = [&](auto&& self, const Proc& p, int depth) -> void {
    const std::string pid = std::string(static_cast<std::size_t>(depth * 2), ' ') + std::to_string(p.pid);
    char idle[16] = "-";
    std::string in = "-", out = "-", calls = "-", errors = "-", drops = "-";
    if (p.counters) {
      const auto& c = *p.counters;
      in = std::to_string(c.in);
      out = std::to_string(c.out);
      calls = std::to_string(c.calls);
      errors = std::to_string(c.errors);
      drops = std::to_string(c.drops);
      std::snprintf(idle, sizeof idle, "%.1fs", static_cast<double>(std::max<std::int64_t>(0, now - c.lastMs)) / 1e3);
    }
    std::printf("%-9s %-9s %-5c %8s %8s %9s %9s %8s %5s %6s %6s  %s\n", pid.c_str(), p.role.c_str(), p.state,
                human(p.rssKiB * 1024).c_str(), p.pssKiB ? human(*p.pssKiB * 1024).c_str() : "-", in.c_str(),
                out.c_str(), calls.c_str(), errors.c_str(), drops.c_str(), idle, p.title.c_str());
    for (const auto& s : p.segments)
      std::printf("%-*s   segment %s  %s%s%s\n", depth * 2 + 9, "", s.label.c_str(), human(s.bytes).c_str(),
                  s.content.empty() ? "" : "  ", s.content.c_str());
    for (const Proc* c : children[p.pid]) self(self, *c, depth + 1);
  };
  for (const Proc* r : roots) print(print, *r, 0);
  if (procs.empty()) std::printf("(no forklift processes of this user)\n");
}

volatile sig_atomic_t g_stop = 0;

int usage() {
  std::fputs(
      "usage: forklift-ps [--watch [SECONDS]]\n"
      "Shows this user's forklift processes as a tree, with their memory, counters\n"
      "and shared-memory segments; --watch redraws it every SECONDS (default 1).\n",
      stderr);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  double every = 0;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--watch") == 0) {
      every = 1;
      if (i + 1 < argc && argv[i + 1][0] != '-') {
        char* end = nullptr;
        every = std::strtod(argv[++i], &end);
        if (*end != '\0' || !(every > 0)) return usage();
      }
    } else {
      return usage();
    }
  }
  if (every == 0) {
    printTree(scan());
    return 0;
  }
  ::signal(SIGINT, [](int) { g_stop = 1; });
  ::signal(SIGTERM, [](int) { g_stop = 1; });
  while (!g_stop) {
    const auto procs = scan();
    std::printf("\x1b[H\x1b[2J");  // home, clear
    printTree(procs);
    std::fflush(stdout);
    for (double slept = 0; slept < every && !g_stop; slept += 0.1)
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  return 0;
}
