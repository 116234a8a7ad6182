#include "forklift/shm.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <mutex>

#include "forklift/detail/fd.hpp"
#include "posix.hpp"
#include "seams.hpp"

namespace forklift {

using detail::ShmHeader;

namespace detail {
ShmFallocateFn shmFallocate = &::posix_fallocate;
}  // namespace detail

namespace {

constexpr const char* kShmDir = "/dev/shm";
constexpr mode_t kShmMode = 0600;

std::atomic<std::uint64_t> nameCounter{0};
std::atomic<std::uint64_t> generationCounter{0};

bool isNameChar(char c) noexcept {
  return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' ||
         c == '_' || c == '-';
}

// Like checkShmName, without the message: for code that must not throw.
bool nameValid(std::string_view name) noexcept {
  if (name.empty() || name.size() > kShmMaxNameLength || name == "." || name == "..") return false;
  return std::all_of(name.begin(), name.end(), isNameChar);
}

std::string segmentWhat(const std::string& name) { return "shared memory segment '" + name + "'"; }

std::string humanBytes(std::uint64_t n) {
  const char* units[] = {"bytes", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(n);
  int u = 0;
  while (v >= 1024.0 && u < 4) {
    v /= 1024.0;
    ++u;
  }
  char buf[32];
  if (u == 0) std::snprintf(buf, sizeof buf, "%llu bytes", static_cast<unsigned long long>(n));
  else std::snprintf(buf, sizeof buf, "%.1f %s", v, units[u]);
  return buf;
}

// Boost reports OS failures with the errno in get_native_error(); keep it.
std::optional<std::uint64_t> availableMemory();

// `where` is kShmDir for a named segment, "memory" for an anonymous one.
[[noreturn]] void throwNoSpace(const std::string& name, std::uint64_t total, std::string_view where) {
  std::string free = "an unknown amount";
  if (where == kShmDir) {
    struct statvfs st {};
    if (::statvfs(kShmDir, &st) == 0) free = humanBytes(static_cast<std::uint64_t>(st.f_bavail) * st.f_frsize);
  } else if (const auto avail = availableMemory()) {
    free = humanBytes(*avail);
  }
  const std::string place = where == kShmDir ? std::string(kShmDir) + " has " : "the machine has ";
  throw SystemError(ENOSPC, "cannot reserve " + std::to_string(total) + " bytes (" + humanBytes(total) + ") for " +
                                segmentWhat(name) + ", " + place + free + (where == kShmDir ? " free" : " available"));
}

// Bytes of `shape` elements of `elemSize` bytes; nullopt when a dimension is
// negative or the product overflows what an off_t can address.
std::optional<std::uint64_t> payloadFor(std::size_t elemSize, const std::int64_t* shape, std::size_t rank) {
  constexpr std::uint64_t kMax = static_cast<std::uint64_t>(std::numeric_limits<off_t>::max()) - 4096;
  std::uint64_t n = elemSize;
  for (std::size_t i = 0; i < rank; ++i) {
    if (shape[i] < 0) return std::nullopt;
    const auto d = static_cast<std::uint64_t>(shape[i]);
    if (d != 0 && n > kMax / d) return std::nullopt;
    n *= d;
  }
  return n;
}

std::size_t elemSizeOf(std::uint8_t dtype) noexcept {
  return dtype == 0 ? 1 : dtypeSize(static_cast<DType>(dtype));
}

// The dense strides of `shape` in `layout`, in elements. Unsigned, so a
// shape with a zero dimension beside huge ones wraps instead of overflowing;
// such strides address nothing, as the payload is empty.
void contiguousStrides(const std::int64_t* shape, std::size_t rank, Layout layout, std::int64_t* out) noexcept {
  std::uint64_t step = 1;
  for (std::size_t k = 0; k < rank; ++k) {
    const std::size_t axis = layout == Layout::RowMajor ? rank - 1 - k : k;
    out[axis] = static_cast<std::int64_t>(step);
    step *= static_cast<std::uint64_t>(shape[axis]);
  }
}

bool kindValid(std::uint8_t kind) noexcept { return kind <= static_cast<std::uint8_t>(ShmKind::Ring); }

std::string shapeText(const std::vector<std::int64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? "x" : "") + std::to_string(shape[i]);
  return s + "]";
}

std::string stridesText(const std::int64_t* strides, std::size_t rank) {
  std::string s = "[";
  for (std::size_t i = 0; i < rank; ++i) s += (i ? ", " : "") + std::to_string(strides[i]);
  return s + "]";
}

std::string describeFormat(std::optional<DType> dtype, const std::vector<std::int64_t>& shape, Layout layout) {
  std::string s = (dtype ? dtypeName(*dtype) : "bytes") + shapeText(shape);
  if (dtype && shape.size() >= 2) s += std::string(" ") + layoutName(layout);
  return s;
}

// Checks everything an opener relies on; `magic` is passed apart because
// the mapped copy must be read with acquire ordering.
void validateHeader(const ShmHeader& h, std::uint64_t magic, std::uint64_t fileBytes, const std::string& name) {
  const std::string seg = segmentWhat(name);
  if (magic != detail::kShmMagic) throw ShmFormatError(seg + " is not a forklift segment (bad magic)");
  if (h.version != detail::kShmVersion)
    throw ShmFormatError(seg + " has format version " + std::to_string(h.version) + ", this forklift reads version " +
                         std::to_string(detail::kShmVersion));
  const auto corrupt = [&](const std::string& why) { throw ShmFormatError(seg + " has a corrupt header: " + why); };
  if (h.headerBytes < sizeof(ShmHeader) || h.headerBytes % detail::kShmPayloadAlign != 0)
    corrupt("payload offset " + std::to_string(h.headerBytes));
  if (h.dtype != 0 && !dtypeValid(h.dtype)) corrupt("element type " + std::to_string(h.dtype));
  if (h.rank > detail::kShmMaxRank) corrupt("rank " + std::to_string(h.rank));
  if (h.layout > static_cast<std::uint8_t>(Layout::ColMajor)) corrupt("layout " + std::to_string(h.layout));
  if (!kindValid(h.kind)) corrupt("kind " + std::to_string(h.kind));
  if ((h.kind == static_cast<std::uint8_t>(ShmKind::Array)) != (h.dtype != 0))
    corrupt(std::string("a segment of kind ") + shmKindName(static_cast<ShmKind>(h.kind)) +
            (h.dtype != 0 ? " with" : " without") + " an element type");
  if (h.creatorPid <= 0) corrupt("creator pid " + std::to_string(h.creatorPid));
  const auto payload = payloadFor(elemSizeOf(h.dtype), h.shape, h.rank);
  if (!payload || *payload != h.payloadBytes)
    corrupt("its shape does not match its payload of " + std::to_string(h.payloadBytes) + " bytes");
  std::int64_t dense[detail::kShmMaxRank];
  contiguousStrides(h.shape, h.rank, static_cast<Layout>(h.layout), dense);
  if (!std::equal(h.strides, h.strides + h.rank, dense))
    corrupt("strides " + stridesText(h.strides, h.rank) + " are not those of a dense " +
            layoutName(static_cast<Layout>(h.layout)) + " " + shapeText({h.shape, h.shape + h.rank}) + " (" +
            stridesText(dense, h.rank) + ")");
  if (h.payloadBytes > fileBytes || h.headerBytes > fileBytes - h.payloadBytes)
    corrupt("a payload of " + std::to_string(h.payloadBytes) + " bytes does not fit in " +
            std::to_string(fileBytes) + " bytes");
}

// Reads the header of /dev/shm/<name> without mapping it (a file truncated
// under us cannot SIGBUS a read). nullopt for anything not forklift's.
std::optional<SegmentInfo> readSegment(const std::string& name) {
  const std::string path = std::string(kShmDir) + "/" + name;
  detail::UniqueFd fd(::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK));
  if (!fd) return std::nullopt;
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0 || !S_ISREG(st.st_mode) || st.st_size < static_cast<off_t>(sizeof(ShmHeader)))
    return std::nullopt;
  ShmHeader h{};
  const ssize_t r = detail::retryEintr([&] { return ::pread(fd.get(), &h, sizeof h, 0); });
  if (r != static_cast<ssize_t>(sizeof h)) return std::nullopt;
  try {
    validateHeader(h, h.magic, static_cast<std::uint64_t>(st.st_size), name);
  } catch (const ShmFormatError&) {
    return std::nullopt;
  }
  SegmentInfo s;
  s.name = name;
  s.fileBytes = static_cast<std::uint64_t>(st.st_size);
  s.kind = static_cast<ShmKind>(h.kind);
  if (h.dtype != 0) s.dtype = static_cast<DType>(h.dtype);
  s.shape.assign(h.shape, h.shape + h.rank);
  s.layout = static_cast<Layout>(h.layout);
  s.payloadBytes = h.payloadBytes;
  s.creatorPid = static_cast<pid_t>(h.creatorPid);
  s.generation = h.generation;
  s.creatorAlive = !detail::processDead(s.creatorPid, [](pid_t p) { return detail::syscalls.pidfdOpen(p, 0); });
  return s;
}

std::uint64_t newGeneration() noexcept {
  timespec ts{};
  ::clock_gettime(CLOCK_REALTIME, &ts);
  const auto ns = static_cast<std::uint64_t>(ts.tv_sec) * 1000000000u + static_cast<std::uint64_t>(ts.tv_nsec);
  // Below 2^63 so it travels as a Value int in a descriptor.
  return (ns + generationCounter.fetch_add(1, std::memory_order_relaxed)) &
         static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max());
}


// The anonymous segments this process holds, by label, so that a backend
// forked after their creation opens them by label as it would a name. Each
// SharedMemory object registers its own descriptor while it holds it; a
// forked child inherits both the descriptors and this table.
class AnonymousSegments {
 public:
  static AnonymousSegments& instance() {
    static AnonymousSegments* table = [] {
      auto* t = new AnonymousSegments;  // never destroyed: destructors of other statics may still use it
      // The table's lock must not be held by another thread across a fork,
      // or the child could never open a segment.
      ::pthread_atfork([] { instance().mutex_.lock(); }, [] { instance().mutex_.unlock(); },
                       [] { instance().mutex_.unlock(); });
      return t;
    }();
    return *table;
  }

  void add(const std::string& label, int fd) {
    std::lock_guard lock(mutex_);
    fds_.emplace(label, fd);
  }
  void remove(const std::string& label, int fd) noexcept {
    std::lock_guard lock(mutex_);
    auto [first, last] = fds_.equal_range(label);
    for (auto it = first; it != last; ++it)
      if (it->second == fd) {
        fds_.erase(it);
        return;
      }
  }
  // A descriptor of its own for `label`, or an empty one. Duplicated under
  // the lock, so the registered one cannot be closed in between.
  detail::UniqueFd duplicate(const std::string& label) const noexcept {
    std::lock_guard lock(mutex_);
    auto it = fds_.find(label);
    if (it == fds_.end()) return {};
    return detail::UniqueFd(::fcntl(it->second, F_DUPFD_CLOEXEC, 0));
  }

 private:
  mutable std::mutex mutex_;
  std::multimap<std::string, int> fds_;
};

constexpr int kSizeSeals = F_SEAL_SHRINK | F_SEAL_GROW;

// MemAvailable from /proc/meminfo, in bytes; nullopt if it cannot be read.
std::optional<std::uint64_t> availableMemory() {
  std::ifstream in("/proc/meminfo");
  std::string key;
  std::uint64_t kib = 0;
  std::string unit;
  while (in >> key >> kib >> unit)
    if (key == "MemAvailable:") return kib * 1024;
  return std::nullopt;
}

}  // namespace

const char* layoutName(Layout l) noexcept {
  return l == Layout::RowMajor ? "row-major" : "column-major";
}

const char* shmKindName(ShmKind k) noexcept {
  switch (k) {
    case ShmKind::Bytes: return "bytes";
    case ShmKind::Array: return "array";
    case ShmKind::Ring: return "ring";
  }
  return "unknown";
}

std::string makeShmName(std::string_view hint, std::string_view prefix) {
  // A prefix of at most 5 characters, a 7-digit pid (Linux's limit) and a
  // counter kept under 10^15 leave the name within 30 characters even
  // before the hint.
  const std::uint64_t n = nameCounter.fetch_add(1, std::memory_order_relaxed) % 1000000000000000ull;
  std::string name = std::string(prefix.substr(0, 5)) + std::to_string(::getpid()) + "." + std::to_string(n);
  if (!hint.empty() && name.size() + 1 < kShmMaxNameLength) {
    name += '.';
    const std::size_t room = kShmMaxNameLength - name.size();
    for (char c : hint.substr(0, room)) name += isNameChar(c) ? c : '_';
  }
  return name;
}

void checkShmName(std::string_view name) {
  const std::string bad = "invalid shared memory name '" + std::string(name) + "': ";
  if (name.empty()) throw ShmNameError(bad + "empty");
  if (name.front() == '/') throw ShmNameError(bad + "give it without the leading '/'");
  if (name.size() > kShmMaxNameLength)
    throw ShmNameError(bad + std::to_string(name.size()) + " characters, at most " +
                       std::to_string(kShmMaxNameLength) + " allowed (" + std::to_string(kShmMaxNameLength + 1) +
                       " with the leading '/')");
  if (name == "." || name == "..") throw ShmNameError(bad + "not a file name");
  for (std::size_t i = 0; i < name.size(); ++i) {
    if (!isNameChar(name[i])) {
      char shown[8];
      const auto c = static_cast<unsigned char>(name[i]);
      if (c >= 0x20 && c < 0x7f) std::snprintf(shown, sizeof shown, "'%c'", c);
      else std::snprintf(shown, sizeof shown, "0x%02x", c);
      throw ShmNameError(bad + "character " + shown + " at position " + std::to_string(i) +
                         "; allowed are A-Z a-z 0-9 . _ -");
    }
  }
}

// ---------------------------------------------------------------- SharedMemory

SharedMemory::SharedMemory(create_only_t, const ShmName& name, std::size_t bytes)
    : SharedMemory(create_only, name, ShmKind::Bytes, bytes) {}

SharedMemory::SharedMemory(create_only_t, const ShmName& name, ShmKind kind, std::size_t bytes) {
  if (kind == ShmKind::Array || !kindValid(static_cast<std::uint8_t>(kind)))
    throw TypeError(std::string("shared memory: raw segments cannot be of kind ") + shmKindName(kind) +
                    " (an array takes an element type and a shape)");
  create(name, kind, 0, {static_cast<std::int64_t>(bytes)}, Layout::RowMajor);
}

SharedMemory::SharedMemory(create_only_t, const ShmName& name, DType dtype, const std::vector<std::int64_t>& shape,
                           Layout layout) {
  if (!dtypeValid(static_cast<std::uint8_t>(dtype)))
    throw TypeError("shared memory: invalid element type " + std::to_string(static_cast<int>(dtype)));
  create(name, ShmKind::Array, static_cast<std::uint8_t>(dtype), shape, layout);
}

void SharedMemory::create(const ShmName& hintOrName, ShmKind kind, std::uint8_t dtype,
                          const std::vector<std::int64_t>& shape, Layout layout) {
  if (hintOrName.isExact()) checkShmName(hintOrName.text());
  if (shape.size() > detail::kShmMaxRank)
    throw LimitError("shared memory: rank " + std::to_string(shape.size()) + " exceeds the maximum " +
                     std::to_string(detail::kShmMaxRank));
  const auto payload = payloadFor(elemSizeOf(dtype), shape.data(), shape.size());
  if (!payload)
    throw LimitError("shared memory: shape " + shapeText(shape) + " has a negative dimension or is too large to map");
  const std::uint64_t total = sizeof(ShmHeader) + *payload;

  if (hintOrName.isAnonymous()) {
    name_ = makeShmName(hintOrName.text(), kShmAnonymousPrefix);
    createAnonymous(total);
  } else {
    createNamed(hintOrName, total);
  }

  // Fresh pages read as zero, so only the used fields need writing.
  ShmHeader& h = header_;
  h = ShmHeader{};
  h.version = detail::kShmVersion;
  h.headerBytes = sizeof(ShmHeader);
  h.dtype = dtype;
  h.rank = static_cast<std::uint8_t>(shape.size());
  h.layout = static_cast<std::uint8_t>(layout);
  h.kind = static_cast<std::uint8_t>(kind);
  h.payloadBytes = *payload;
  h.creatorPid = ::getpid();
  h.generation = newGeneration();
  std::copy(shape.begin(), shape.end(), h.shape);
  contiguousStrides(h.shape, h.rank, layout, h.strides);

  base_ = map_.get();
  auto* mapped = static_cast<ShmHeader*>(base_);
  std::memcpy(reinterpret_cast<char*>(mapped) + sizeof h.magic, reinterpret_cast<const char*>(&h) + sizeof h.magic,
              sizeof h - sizeof h.magic);
  // Magic last, with release: an opener that sees it sees the whole header.
  std::atomic_ref<std::uint64_t>(mapped->magic).store(detail::kShmMagic, std::memory_order_release);
  h.magic = detail::kShmMagic;

  payload_ = static_cast<char*>(base_) + h.headerBytes;
  owner_ = static_cast<pid_t>(h.creatorPid);
  if (fd_) AnonymousSegments::instance().add(name_, fd_.get());
}

// Reserves every page of `fd` now: after a plain ftruncate a full tmpfs
// shows up as SIGBUS at the first write to a missing page.
void SharedMemory::reserve(int fd, std::uint64_t total, const std::string& where) {
  int err;
  do {
    err = detail::shmFallocate(fd, 0, static_cast<off_t>(total));
  } while (err == EINTR);
  if (err == ENOSPC) throwNoSpace(name_, total, where);
  if (err != 0) throw SystemError(err, "cannot reserve " + std::to_string(total) + " bytes for " + segmentWhat(name_));
}

void SharedMemory::createAnonymous(std::uint64_t total) {
  // The memfd lives on the kernel's internal tmpfs, which has no size
  // limit: without this check a huge segment would take every free page
  // (and wake the OOM killer) before fallocate failed.
  if (const auto avail = availableMemory(); avail && total > *avail) throwNoSpace(name_, total, "memory");
  detail::UniqueFd fd(detail::syscalls.memfdCreate(name_.c_str(), MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (!fd) detail::throwErrno("cannot create " + segmentWhat(name_) + " (memfd_create)");
  if (::fchmod(fd.get(), kShmMode) != 0) detail::throwErrno("cannot set the mode of " + segmentWhat(name_));
  reserve(fd.get(), total, "memory");
  // Sealed before anyone else can see it, so no holder can ever resize it.
  if (::fcntl(fd.get(), F_ADD_SEALS, kSizeSeals | F_SEAL_SEAL) != 0)
    detail::throwErrno("cannot seal " + segmentWhat(name_));
  mapFd(fd.get(), total, name_);
  fd_ = std::move(fd);
}

void SharedMemory::createNamed(const ShmName& hintOrName, std::uint64_t total) {
  std::string name = hintOrName.isExact() ? hintOrName.text() : makeShmName(hintOrName.text());
  name_ = name;

  // Refuse at once what cannot fit: posix_fallocate would first take the
  // free pages one by one, squeezing every other user of /dev/shm, before
  // failing. f_blocks == 0 means a tmpfs without a size limit.
  struct statvfs vfs {};
  if (::statvfs(kShmDir, &vfs) == 0 && vfs.f_blocks > 0 &&
      total > static_cast<std::uint64_t>(vfs.f_bavail) * vfs.f_frsize)
    throwNoSpace(name_, total, kShmDir);

  detail::UniqueFd fd;
  for (int attempt = 0;; ++attempt) {
    fd = detail::UniqueFd(
        detail::syscalls.shmOpen(("/" + name).c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, kShmMode));
    if (fd) break;
    // A generated name is taken only by a dead process that had our pid:
    // a stale segment for `forklift-shm clean`. Take the next number.
    if (!hintOrName.isExact() && errno == EEXIST && attempt < 100) {
      name = makeShmName(hintOrName.text());
      name_ = name;
      continue;
    }
    detail::throwErrno("cannot create " + segmentWhat(name));
  }

  // From here on a failure must not leave the name behind.
  struct RemoveUnlessDone {
    const std::string& name;
    bool done = false;
    ~RemoveUnlessDone() {
      if (!done) SharedMemory::remove(name);
    }
  } guard{name};

  // shm_open applied the umask; mode 0600 is part of our contract.
  if (::fchmod(fd.get(), kShmMode) != 0) detail::throwErrno("cannot set the mode of " + segmentWhat(name));
  reserve(fd.get(), total, kShmDir);
  mapFd(fd.get(), total, name);
  guard.done = true;
}

SharedMemory::SharedMemory(open_only_t, const std::string& name) {
  checkShmName(name);
  if (auto fd = AnonymousSegments::instance().duplicate(name)) {
    openFd(std::move(fd), name);
    return;
  }
  if (name.rfind(kShmAnonymousPrefix, 0) == 0)
    throw SystemError(ENOENT, "cannot open " + segmentWhat(name) +
                                  ": it is anonymous, and this process does not hold it (only processes forked "
                                  "from its creator after it was made do); send its descriptor() or describe() in "
                                  "a message instead, or create it with ShmName::named for processes outside the tree");
  const detail::UniqueFd fd(detail::syscalls.shmOpen(("/" + name).c_str(), O_RDWR | O_CLOEXEC, 0));
  if (!fd) detail::throwErrno("cannot open " + segmentWhat(name));
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) detail::throwErrno("cannot read the size of " + segmentWhat(name));
  const auto size = static_cast<std::uint64_t>(st.st_size);
  checkSize(size, name);
  mapFd(fd.get(), size, name);
  adoptMapping(size, name);
}

SharedMemory::SharedMemory(open_only_t, const Value& descriptor) {
  const Map* m = descriptor.getIf<Map>();
  if (!m) throw TypeError("shared memory descriptor: " + descriptor.typeName() + " found, map wanted");
  const auto field = [&](const char* key) -> const Value* {
    for (const auto& [k, v] : *m)
      if (k == key) return &v;
    return nullptr;
  };
  const Value* nameField = field("name");
  const std::string* nameText = nameField ? nameField->getIf<std::string>() : nullptr;
  if (!nameText) throw TypeError("shared memory descriptor: no string field 'name'");
  const std::string name = *nameText;
  const std::string where = "shared memory descriptor of '" + name + "'";
  std::optional<std::uint64_t> generation;
  if (const Value* g = field("generation")) {
    try {
      generation = static_cast<std::uint64_t>(g->as<std::int64_t>());
    } catch (const TypeError& e) {
      throw TypeError(where + ": field 'generation': " + e.what());
    }
  }
  if (const Value* f = field("fd")) {
    const Fd* carried = f->getIf<Fd>();
    if (!carried) throw TypeError(where + ": field 'fd' is " + f->typeName() + ", not a descriptor");
    if (!carried->valid())
      throw TypeError(where + ": its descriptor is empty (taken already, or the message could not carry it)");
    detail::UniqueFd own(::fcntl(carried->get(), F_DUPFD_CLOEXEC, 0));
    if (!own) detail::throwErrno("cannot duplicate the descriptor of " + segmentWhat(name));
    openFd(std::move(own), name);
  } else {
    *this = SharedMemory(open_only, name);
  }
  // A re-created name may differ in anything else.
  if (generation && *generation != header_.generation)
    throw ShmFormatError(segmentWhat(name) + " was re-created after the descriptor was made (generation " +
                         std::to_string(header_.generation) + ", the descriptor says " + std::to_string(*generation) +
                         ")");
}

// Maps an anonymous segment from a descriptor of its own.
void SharedMemory::openFd(detail::UniqueFd fd, const std::string& name) {
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) detail::throwErrno("cannot read the size of " + segmentWhat(name));
  if (!S_ISREG(st.st_mode)) throw ShmFormatError(segmentWhat(name) + ": its descriptor is not a memory file");
  const int seals = ::fcntl(fd.get(), F_GET_SEALS);
  // Checked before mapping: an unsealed file could shrink under us later.
  if (seals < 0 || (seals & kSizeSeals) != kSizeSeals)
    throw ShmFormatError(segmentWhat(name) +
                         " is not sealed against resizing (F_SEAL_SHRINK | F_SEAL_GROW): a holder could truncate it "
                         "and turn a read into SIGBUS");
  const auto size = static_cast<std::uint64_t>(st.st_size);
  checkSize(size, name);
  mapFd(fd.get(), size, name);
  adoptMapping(size, name);
  fd_ = std::move(fd);
  AnonymousSegments::instance().add(name_, fd_.get());
}

void SharedMemory::mapFd(int fd, std::uint64_t len, const std::string& name) {
  void* p = detail::syscalls.mmap(nullptr, static_cast<std::size_t>(len), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED)
    detail::throwErrno("cannot map " + segmentWhat(name) + " (mmap of " + std::to_string(len) + " bytes)");
  map_ = detail::Mapping(p, static_cast<std::size_t>(len));
}

void detail::Mapping::reset() noexcept {
  if (addr_) ::munmap(addr_, bytes_);
  addr_ = nullptr;
  bytes_ = 0;
}

void SharedMemory::checkSize(std::uint64_t size, const std::string& name) {
  if (size < sizeof(ShmHeader))
    throw ShmFormatError(segmentWhat(name) + " is " + std::to_string(size) +
                         " bytes, too short for a forklift header (" + std::to_string(sizeof(ShmHeader)) +
                         " bytes)");
}

// Validates the header of the segment just mapped into map_.
void SharedMemory::adoptMapping(std::uint64_t size, const std::string& name) {
  auto* mapped = static_cast<ShmHeader*>(map_.get());
  const std::uint64_t magic = std::atomic_ref<std::uint64_t>(mapped->magic).load(std::memory_order_acquire);
  // Validate a private copy: the peer could scribble on the mapped header
  // later, and every size we derive must stay the one we checked.
  std::memcpy(&header_, mapped, sizeof header_);
  validateHeader(header_, magic, size, name);
  base_ = mapped;
  payload_ = static_cast<char*>(base_) + header_.headerBytes;
  name_ = name;
}

Value SharedMemory::descriptor() const {
  if (!valid()) throw Error("cannot describe an empty SharedMemory");
  Map m{{"name", name_},
        {"kind", shmKindName(kind())},
        {"generation", static_cast<std::int64_t>(header_.generation)}};
  if (fd_) m.emplace_back("fd", Fd::dup(fd_.get()));
  return m;
}

SharedMemory::SharedMemory(SharedMemory&& o) noexcept
    : name_(std::move(o.name_)),
      fd_(std::move(o.fd_)),
      map_(std::move(o.map_)),
      header_(o.header_),
      base_(std::exchange(o.base_, nullptr)),
      payload_(std::exchange(o.payload_, nullptr)),
      owner_(std::exchange(o.owner_, 0)) {
  o.name_.clear();
  o.header_ = ShmHeader{};
}

SharedMemory& SharedMemory::operator=(SharedMemory&& o) noexcept {
  if (this != &o) {
    reset();
    name_ = std::move(o.name_);
    o.name_.clear();
    fd_ = std::move(o.fd_);
    header_ = std::exchange(o.header_, ShmHeader{});
    map_ = std::move(o.map_);
    base_ = std::exchange(o.base_, nullptr);
    payload_ = std::exchange(o.payload_, nullptr);
    owner_ = std::exchange(o.owner_, 0);
  }
  return *this;
}

SharedMemory::~SharedMemory() { reset(); }

void SharedMemory::reset() noexcept {
  // A failed remove leaves a stale name that `forklift-shm clean` finds; a
  // destructor has no better way to report it.
  if (fd_) {
    AnonymousSegments::instance().remove(name_, fd_.get());
    fd_.reset();
  } else if (owns()) {
    remove(name_);
  }
  map_.reset();
  name_.clear();
  header_ = ShmHeader{};
  base_ = nullptr;
  payload_ = nullptr;
  owner_ = 0;
}

std::size_t SharedMemory::bytes() const noexcept { return static_cast<std::size_t>(header_.payloadBytes); }

std::optional<DType> SharedMemory::dtype() const noexcept {
  if (header_.dtype == 0) return std::nullopt;
  return static_cast<DType>(header_.dtype);
}

std::vector<std::int64_t> SharedMemory::shape() const {
  return std::vector<std::int64_t>(header_.shape, header_.shape + header_.rank);
}

std::vector<std::int64_t> SharedMemory::strides() const {
  return std::vector<std::int64_t>(header_.strides, header_.strides + header_.rank);
}

ShmKind SharedMemory::kind() const noexcept { return static_cast<ShmKind>(header_.kind); }

Layout SharedMemory::layout() const noexcept { return static_cast<Layout>(header_.layout); }
pid_t SharedMemory::creatorPid() const noexcept { return static_cast<pid_t>(header_.creatorPid); }
std::uint64_t SharedMemory::generation() const noexcept { return header_.generation; }

std::string SharedMemory::describe() const { return describeFormat(dtype(), shape(), layout()); }

pid_t SharedMemory::currentPid() noexcept { return ::getpid(); }

bool SharedMemory::remove(const std::string& name) noexcept {
  if (!nameValid(name) || name.rfind(kShmAnonymousPrefix, 0) == 0) {
    errno = EINVAL;
    return false;
  }
  return ::shm_unlink(("/" + name).c_str()) == 0;
}

// ---------------------------------------------------------------- listing

std::string SegmentInfo::describe() const { return describeFormat(dtype, shape, layout); }

std::vector<SegmentInfo> listSegments() {
  std::unique_ptr<DIR, int (*)(DIR*)> dir(::opendir(kShmDir), &::closedir);
  if (!dir) detail::throwErrno(std::string("cannot list ") + kShmDir);
  std::vector<SegmentInfo> out;
  while (const dirent* e = ::readdir(dir.get())) {
    const std::string name = e->d_name;
    if (name.rfind(kShmNamePrefix, 0) != 0 || !nameValid(name)) continue;
    if (auto s = readSegment(name)) out.push_back(std::move(*s));
  }
  std::sort(out.begin(), out.end(), [](const SegmentInfo& a, const SegmentInfo& b) { return a.name < b.name; });
  return out;
}

bool removeStaleSegment(const SegmentInfo& s) noexcept {
  try {
    // Look again right before removing: the name may have been re-created
    // by a live process since the listing.
    const auto now = readSegment(s.name);
    if (!now || now->generation != s.generation || now->creatorPid != s.creatorPid || now->creatorAlive)
      return false;
    return SharedMemory::remove(s.name);
  } catch (...) {
    return false;
  }
}

}  // namespace forklift
