// forklift-shm - list forklift's shared-memory segments and clean stale ones
//
//   forklift-shm list               every forklift segment in /dev/shm: name,
//                                   bytes, kind (bytes, array), content,
//                                   creator pid, alive or dead
//   forklift-shm clean [--dry-run]  removes the segments whose creator is dead
//                                   (--dry-run: only says what it would remove)
//
// Only names starting with "fk." that carry a valid forklift header are
// considered; any other file in /dev/shm is never touched, and other users'
// segments (mode 0600) are not shown. A segment whose creator is alive is
// never removed, even if nobody uses it any more.
//
// Exit status: 0 on success, 1 when a stale segment could not be removed,
// 2 for a usage error.
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>

#include "forklift/shm.hpp"

namespace {

int usage() {
  std::fputs(
      "usage: forklift-shm list\n"
      "       forklift-shm clean [--dry-run]\n"
      "Lists forklift's shared-memory segments in /dev/shm, or removes those whose\n"
      "creator process is dead.\n",
      stderr);
  return 2;
}

int list() {
  const auto segments = forklift::listSegments();
  std::printf("%-30s %12s  %-5s  %-28s %8s  %s\n", "NAME", "BYTES", "KIND", "CONTENT", "PID", "CREATOR");
  for (const auto& s : segments)
    std::printf("%-30s %12llu  %-5s  %-28s %8d  %s\n", s.name.c_str(), static_cast<unsigned long long>(s.fileBytes),
                forklift::shmKindName(s.kind), s.describe().c_str(), static_cast<int>(s.creatorPid),
                s.creatorAlive ? "alive" : "dead");
  return 0;
}

int clean(bool dryRun) {
  int stale = 0;
  int failed = 0;
  for (const auto& s : forklift::listSegments()) {
    if (s.creatorAlive) continue;
    ++stale;
    const unsigned long long bytes = s.fileBytes;
    if (dryRun) {
      std::printf("would remove %s (%llu bytes, creator %d dead)\n", s.name.c_str(), bytes,
                  static_cast<int>(s.creatorPid));
    } else if (errno = 0; forklift::removeStaleSegment(s)) {
      std::printf("removed %s (%llu bytes, creator %d dead)\n", s.name.c_str(), bytes, static_cast<int>(s.creatorPid));
    } else {
      const int err = errno;
      std::fprintf(stderr, "forklift-shm: cannot remove %s: %s\n", s.name.c_str(),
                   err ? std::strerror(err) : "changed since it was listed");
      ++failed;
    }
  }
  if (dryRun) std::printf("%d stale segment(s) would be removed\n", stale);
  else std::printf("%d stale segment(s) removed\n", stale - failed);
  return failed ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const std::string cmd = argc > 1 ? argv[1] : "";
    if (cmd == "list" && argc == 2) return list();
    if (cmd == "clean" && argc == 2) return clean(false);
    if (cmd == "clean" && argc == 3 && std::strcmp(argv[2], "--dry-run") == 0) return clean(true);
    return usage();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "forklift-shm: %s\n", e.what());
    return 1;
  }
}
