#include "proc_title.hpp"

#include <fcntl.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <atomic>
#include <mutex>
#include <optional>

#include "forklift/detail/fd.hpp"
#include "posix.hpp"

namespace forklift::detail {

namespace {

// The strings the kernel placed at exec: argv in [begin, argEnd), environ
// right after it in [argEnd, envEnd) (envEnd == argEnd when they are not
// adjacent, or not known).
struct Area {
  char* begin = nullptr;
  char* argEnd = nullptr;
  char* envEnd = nullptr;
  std::uintptr_t startStack = 0;  // where the kernel put argc; 0 if unknown
};

// The area once claimed (everything that pointed into it redirected). A
// forked child inherits it, so its own call reuses it.
struct Claimed {
  char* begin = nullptr;
  char* argEnd = nullptr;
  char* envEnd = nullptr;
  bool envMoved = false;
};
Claimed g_claimed;

// Address comparisons between unrelated objects go through integers.
std::uintptr_t addr(const void* p) { return reinterpret_cast<std::uintptr_t>(p); }
bool inside(const void* p, const void* begin, const void* end) {
  return addr(p) >= addr(begin) && addr(p) < addr(end);
}

// The whole file, or an empty string if it cannot be read.
std::string readFile(const char* path) {
  std::string out;
  UniqueFd fd(::open(path, O_RDONLY | O_CLOEXEC));
  if (!fd) return out;
  char buf[4096];
  for (;;) {
    const ssize_t n = retryEintr([&] { return ::read(fd.get(), buf, sizeof buf); });
    if (n <= 0) break;
    out.append(buf, static_cast<std::size_t>(n));
  }
  return out;
}

struct StatFields {
  std::uintptr_t startStack, argStart, argEnd, envStart, envEnd;
};

// Fields 28 (startstack) and 48-51 (arg_start .. env_end) of
// /proc/self/stat, or nullopt when the kernel does not show them (before
// Linux 3.5 they do not exist; they read 0 when not permitted).
std::optional<StatFields> readStat() {
  const std::string s = readFile("/proc/self/stat");
  const auto paren = s.rfind(')');  // comm may itself hold ')' and spaces
  if (paren == std::string::npos) return std::nullopt;
  std::uintptr_t field[52] = {};
  // ") S 1234 ...": field 3 is the state letter; the numbers start at 4.
  if (s.size() < paren + 3 || s[paren + 1] != ' ') return std::nullopt;
  const char* p = s.c_str() + paren + 3;
  for (int i = 4; i <= 51; ++i) {
    char* end = nullptr;
    field[i] = static_cast<std::uintptr_t>(std::strtoull(p, &end, 10));  // signed fields wrap: unused here
    if (end == p) return std::nullopt;
    p = end;
  }
  StatFields f{field[28], field[48], field[49], field[50], field[51]};
  if (f.argStart == 0 || f.argEnd <= f.argStart) return std::nullopt;
  return f;
}

// The kernel's bounds, read once by the frontend before its first fork
// (prepareProcessTitle): they are fixed at exec, so every backend forked
// later finds its area without opening /proc. Reading /proc/self/cmdline
// and /proc/self/stat in each child was two opens, four reads and the
// kernel's formatting of 52 fields: +100 us of a fork until ready on the
// test machine (a fork whose child only set its title, against a bare one).
std::once_flag g_statOnce;
std::optional<StatFields> g_stat;     // written once, under g_statOnce
std::atomic<bool> g_statKnown{false}; // g_stat may be read (set after it is written)

// The area from the kernel's bounds alone, checked without reading outside
// them: program_invocation_name must be where the kernel put argv[0], and
// [arg_start, arg_end) must be whole strings, the last one ending with its
// NUL exactly at arg_end (a title rewritten without one is refused, as
// findArea refuses it in /proc/self/cmdline).
std::optional<Area> areaFromStat(const StatFields& st) {
  char* const base = program_invocation_name;
  if (base == nullptr || addr(base) != st.argStart) return std::nullopt;
  char* const end = reinterpret_cast<char*>(st.argEnd);
  for (char* p = base; p < end;) {
    const std::size_t n = ::strnlen(p, static_cast<std::size_t>(end - p));
    if (n == static_cast<std::size_t>(end - p)) return std::nullopt;  // no NUL before arg_end
    p += n + 1;
  }
  Area a;
  a.begin = base;
  a.argEnd = end;
  a.envEnd = st.envStart == st.argEnd && st.envEnd > st.envStart ? reinterpret_cast<char*>(st.envEnd) : end;
  a.startStack = st.startStack;
  return a;
}

// Finds the area and checks that program_invocation_name, /proc/self/cmdline
// and the kernel's bounds agree. Reads nothing outside a string until the
// bounds are confirmed.
std::optional<Area> findArea(TitleAreaSource source) {
  if (source == TitleAreaSource::procStat && g_statKnown.load(std::memory_order_acquire))
    return g_stat ? areaFromStat(*g_stat) : std::nullopt;
  const std::string cmdline = readFile("/proc/self/cmdline");
  char* const base = program_invocation_name;
  if (base == nullptr || cmdline.empty() || cmdline.back() != '\0') return std::nullopt;
  // argv[0] as glibc saw it at startup, and as the kernel shows it now.
  if (std::strcmp(base, cmdline.c_str()) != 0) return std::nullopt;

  Area a;
  a.begin = base;
  a.argEnd = base + cmdline.size();
  a.envEnd = a.argEnd;
  std::optional<StatFields> st;
  if (source == TitleAreaSource::procStat) st = readStat();
  if (st) {
    if (st->argStart != addr(a.begin) || st->argEnd != addr(a.argEnd)) return std::nullopt;
    if (st->envStart == st->argEnd && st->envEnd > st->envStart) a.envEnd = reinterpret_cast<char*>(st->envEnd);
    a.startStack = st->startStack;
  } else {
    // No bounds from the kernel: trust the layout only if the environ
    // strings start where cmdline ends, and follow them while adjacent.
    if (environ == nullptr || environ[0] != a.argEnd) return std::nullopt;
    char* p = a.argEnd;
    for (char** e = environ; *e == p; ++e) p += std::strlen(p) + 1;
    a.envEnd = p;
  }
  if (std::memcmp(a.begin, cmdline.data(), cmdline.size()) != 0) return std::nullopt;
  return a;
}

// program_invocation_name and _short_name point into argv[0]: heap copies.
bool copyInvocationNames(const Area& a) {
  char* const name = program_invocation_name;
  char* const shortName = program_invocation_short_name;
  char* const newName = ::strdup(name);
  if (newName == nullptr) return false;
  char* newShort = shortName;
  if (inside(shortName, name, name + std::strlen(name) + 1)) {
    newShort = newName + (shortName - name);
  } else if (inside(shortName, a.begin, a.envEnd)) {
    newShort = ::strdup(shortName);
    if (newShort == nullptr) {
      std::free(newName);
      return false;
    }
  }
  program_invocation_name = newName;
  program_invocation_short_name = newShort;
  return true;
}

// main's argv array (on the stack, after argc at startstack): its entries
// that point into the area get heap copies, so main's argv stays readable.
// False only when a copy could not be made; an array that does not look as
// the kernel left it is left alone.
bool redirectMainArgv(const Area& a) {
  const std::uintptr_t top = addr(a.begin);
  if (a.startStack == 0 || a.startStack % alignof(char*) != 0 || a.startStack >= top) return true;
  // Everything from startstack up to the strings was written by the kernel
  // at exec, in the one stack mapping: readable.
  const std::uintptr_t slots = (top - a.startStack) / sizeof(char*);
  const long argc = *reinterpret_cast<const long*>(a.startStack);
  if (argc < 1 || static_cast<std::uintptr_t>(argc) + 2 > slots) return true;
  char** const argv = reinterpret_cast<char**>(a.startStack + sizeof(long));
  if (argv[0] != a.begin || argv[argc] != nullptr) return true;
  for (long i = 0; i < argc; ++i) {
    if (!inside(argv[i], a.begin, a.envEnd)) continue;  // getopt may permute; a program may repoint
    char* copy = ::strdup(argv[i]);
    if (copy == nullptr) return false;
    argv[i] = copy;
  }
  return true;
}

// A heap `environ` whose strings that lay in [from, to) are heap copies.
// Strings placed by setenv/putenv stay where they are.
bool moveEnviron(char* from, char* to) {
  if (environ == nullptr) return true;
  std::size_t count = 0;
  while (environ[count] != nullptr) ++count;
  auto** fresh = static_cast<char**>(std::malloc((count + 1) * sizeof(char*)));
  if (fresh == nullptr) return false;
  for (std::size_t i = 0; i < count; ++i) {
    fresh[i] = environ[i];
    if (!inside(environ[i], from, to)) continue;
    fresh[i] = ::strdup(environ[i]);
    if (fresh[i] == nullptr) {
      for (std::size_t j = 0; j < i; ++j)
        if (inside(environ[j], from, to)) std::free(fresh[j]);
      std::free(fresh);
      return false;
    }
  }
  fresh[count] = nullptr;
  environ = fresh;  // the old array (kernel's or setenv's) may still hold pointers into the area: unused from now
  return true;
}

void writeTitle(const std::string& title, TitleAreaSource source) {
  if (g_claimed.begin == nullptr) {
    const std::optional<Area> a = findArea(source);
    if (!a || !copyInvocationNames(*a) || !redirectMainArgv(*a)) return;
    g_claimed = Claimed{a->begin, a->argEnd, a->envEnd, false};
  }
  Claimed& c = g_claimed;
  const auto argLen = static_cast<std::size_t>(c.argEnd - c.begin);
  if (title.size() >= argLen && !c.envMoved && c.envEnd > c.argEnd) c.envMoved = moveEnviron(c.argEnd, c.envEnd);
  char* const end = c.envMoved ? c.envEnd : c.argEnd;
  const long page = ::sysconf(_SC_PAGESIZE);
  // The kernel shows at most one page of a rewritten title.
  const std::size_t room = std::min(static_cast<std::size_t>(end - c.begin), page > 0 ? static_cast<std::size_t>(page) : 4096);
  const std::size_t n = std::min(title.size(), room - 1);
  std::memcpy(c.begin, title.data(), n);
  std::memset(c.begin + n, 0, static_cast<std::size_t>(end - c.begin) - n);
  // While the last byte of the argv area is NUL, the kernel shows all of
  // [arg_start, arg_end), the NUL padding included (ps would print it as
  // trailing blanks). When that byte is not NUL it takes the area for a
  // rewritten title and shows the one string at arg_start, up to its NUL
  // (reading on into the environ area if needed).
  if (c.begin + n + 1 < c.argEnd) c.argEnd[-1] = ' ';
}

}  // namespace

void prepareProcessTitle() noexcept {
  if (g_claimed.begin != nullptr || g_statKnown.load(std::memory_order_acquire)) return;
  try {
    std::call_once(g_statOnce, [] {
      g_stat = readStat();
      g_statKnown.store(true, std::memory_order_release);
    });
  } catch (...) {
    // Out of memory: each backend reads /proc itself, as before.
  }
}

void setProcessTitle(const std::string& comm, const std::string& title, TitleAreaSource source) noexcept {
  char name[16] = {};  // comm holds 15 characters and a NUL
  std::strncpy(name, comm.c_str(), sizeof name - 1);
  ::prctl(PR_SET_NAME, name);
  try {
    writeTitle(title, source);
  } catch (...) {
    // Only an allocation can throw here, before anything was written: the
    // process keeps its old title.
  }
}

void setProcessTitle(const std::string& comm, const std::string& title) noexcept {
  setProcessTitle(comm, title, TitleAreaSource::procStat);
}

}  // namespace forklift::detail
