// forklift - SharedMemory: one typed shared-memory segment, anonymous or named
//
// A `SharedMemory` owns the mapping of one shared-memory segment. The
// segment starts with a small header (magic, format version, kind, element
// type, shape, strides, layout, exact payload size, creator pid,
// generation, see detail/shm_header.hpp); the payload that follows starts
// 64-byte aligned. Most code wants the typed views `ShmArray<T>`
// (shm_array.hpp, a matrix) or `ShmTensor<T, Rank>` (shm_tensor.hpp, any
// rank); this class is the layer underneath.
//
// Anonymous segments (the default): a plain string given as the name is a
// hint, and the segment is a memfd (memfd_create, close-on-exec) labelled
// "anon.<pid>.<n>.<hint>", with no name in /dev/shm. Nothing can leak:
// when the last process holding it exits, however it exits (kill -9
// included), the kernel frees it. Inside one forklift tree it still opens
// by its label: a segment created before `start()` reaches the backend
// through the fork, and `SharedMemory(open_only, label)` there finds it
// among the segments this process holds. A segment created later travels
// as a descriptor: `descriptor()` (or ShmArray/ShmTensor::describe())
// carries the memfd itself as an `Fd`, and opening that Value maps it. An
// anonymous label that this process does not hold opens with SystemError
// (ENOENT) saying so. Its size is sealed (F_SEAL_SHRINK, F_SEAL_GROW,
// F_SEAL_SEAL): no holder can truncate it under another and turn a read
// into SIGBUS; an opener refuses a descriptor without those seals.
//
// Named segments, for processes outside the tree (unrelated programs, a
// Python reader, tools): `ShmName::named("hint")` creates
// /dev/shm/fk.<pid>.<n>.<hint>, `ShmName::exact("name")` uses the name as
// given (1-30 characters of [A-Za-z0-9._-] without the leading '/', or
// `ShmNameError`). They are created exclusively, with mode 0600 whatever
// the umask. Only names starting with "fk." are seen by `forklift-shm`,
// which finds the ones a crashed creator left behind. Named segments cannot
// be sealed (Linux seals memfds only).
//
// Every segment's pages are reserved at once, so a full /dev/shm (named) or
// too little memory (anonymous) is a `SystemError` (ENOSPC) here, naming
// the segment, its size and the free space, instead of a SIGBUS at the
// first write.
//
// Ownership: the object that created a named segment owns the name and
// removes it (shm_unlink) when destroyed; an object that only opened it
// never removes it. `release()` gives ownership up, a move hands it over. A
// process forked from the owner inherits the object but not the ownership:
// `owns()` also compares the creator's pid with getpid(), so the child's
// copy never removes the name. Removing the name never invalidates a
// mapping: both sides keep their pages until they unmap. An anonymous
// segment has no name to remove; each object holds its own descriptor.
//
// Errors: a name that does not exist, or a create that finds the name taken,
// is a `SystemError` (ENOENT, EEXIST). A segment that is too short for the
// header, is not forklift's (bad magic), has another format version, a
// corrupt header or (anonymous) no size seals is a `ShmFormatError` naming
// the segment.
//
// A SharedMemory is used from one thread at a time; the memory it maps has
// no synchronisation of its own (see shm_array.hpp for the ordering rule).
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "forklift/detail/fd.hpp"
#include "forklift/detail/shm_header.hpp"
#include "forklift/error.hpp"
#include "forklift/value.hpp"

namespace forklift {

namespace detail {
// One shared mapping, unmapped when destroyed or reset (shm.cpp).
class Mapping {
 public:
  Mapping() = default;
  Mapping(void* addr, std::size_t bytes) noexcept : addr_(addr), bytes_(bytes) {}
  Mapping(Mapping&& o) noexcept : addr_(std::exchange(o.addr_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
  Mapping& operator=(Mapping&& o) noexcept {
    if (this != &o) {
      reset();
      addr_ = std::exchange(o.addr_, nullptr);
      bytes_ = std::exchange(o.bytes_, 0);
    }
    return *this;
  }
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping() { reset(); }
  void reset() noexcept;
  void* get() const noexcept { return addr_; }

 private:
  void* addr_ = nullptr;
  std::size_t bytes_ = 0;
};
}  // namespace detail

// Creation intent, spelled at the call site as in Boost.Interprocess.
//   create_only: the name must not exist yet (else SystemError, EEXIST).
//   open_only:   the name must exist (else SystemError, ENOENT).
struct create_only_t {
  explicit create_only_t() = default;
};
struct open_only_t {
  explicit open_only_t() = default;
};
inline constexpr create_only_t create_only{};
inline constexpr open_only_t open_only{};

// Storage order of a payload of rank 2 or more. RowMajor (numpy's default,
// C order) puts the last index fastest; ColMajor (Eigen's default, Fortran
// order) the first. Rank 1 has no order: either layout opens it.
enum class Layout : std::uint8_t { RowMajor = 0, ColMajor = 1 };
const char* layoutName(Layout l) noexcept;  // "row-major", "column-major"

// What a segment holds, recorded in its header for openers and tools.
// The numbering is part of the segment format.
enum class ShmKind : std::uint8_t { Bytes = 0, Array = 1, Ring = 2 };
const char* shmKindName(ShmKind k) noexcept;  // "bytes", "array", "ring", "unknown"

// A name is not a valid shared-memory name.
class ShmNameError : public Error {
 public:
  using Error::Error;
};

// A segment exists but is not what the caller can use: too short, not
// forklift's, another format version, corrupt, or another type or shape.
class ShmFormatError : public Error {
 public:
  using Error::Error;
};

// The longest name, without the leading '/' (31 with it, the limit of some
// platforms).
inline constexpr std::size_t kShmMaxNameLength = 30;
// Generated names in /dev/shm, and the only ones `forklift-shm` looks at,
// start with this.
inline constexpr std::string_view kShmNamePrefix = "fk.";
// Labels of anonymous segments start with this.
inline constexpr std::string_view kShmAnonymousPrefix = "anon.";

// How a segment to be created is named. A hint (the default, from any
// string) labels an anonymous segment; `ShmName::named` makes a generated
// name in /dev/shm; `ShmName::exact` is used in /dev/shm as it is.
class ShmName {
 public:
  enum class Mode : std::uint8_t { Anonymous, Named, Exact };

  ShmName(std::string hint) : text_(std::move(hint)) {}  // NOLINT: implicit on purpose
  ShmName(const char* hint) : text_(hint) {}             // NOLINT
  static ShmName named(std::string hint = {}) { return ShmName(std::move(hint), Mode::Named); }
  static ShmName exact(std::string name) { return ShmName(std::move(name), Mode::Exact); }

  Mode mode() const noexcept { return mode_; }
  bool isAnonymous() const noexcept { return mode_ == Mode::Anonymous; }
  bool isExact() const noexcept { return mode_ == Mode::Exact; }
  const std::string& text() const noexcept { return text_; }

 private:
  ShmName(std::string text, Mode mode) : text_(std::move(text)), mode_(mode) {}

  std::string text_;
  Mode mode_ = Mode::Anonymous;
};

// A new unique name "fk.<pid>.<n>.<hint>", never longer than
// kShmMaxNameLength: the hint is cut and sanitised to fit. With
// kShmAnonymousPrefix as `prefix`, the label of an anonymous segment.
std::string makeShmName(std::string_view hint, std::string_view prefix = kShmNamePrefix);
// Throws ShmNameError saying what is wrong with `name`.
void checkShmName(std::string_view name);

class SharedMemory {
 public:
  // An empty object: valid() is false, data() is nullptr, nothing is owned.
  // A moved-from SharedMemory is empty too.
  SharedMemory() noexcept = default;

  // Creates a segment of `bytes` raw bytes (kind Bytes, or `kind` for a
  // structure of its own such as a ring; dtype() nullopt, shape {bytes}).
  SharedMemory(create_only_t, const ShmName& name, std::size_t bytes);
  SharedMemory(create_only_t, const ShmName& name, ShmKind kind, std::size_t bytes);
  // Creates a segment holding a `dtype` array of `shape` (rank at most 8;
  // kind Array), stored densely in `layout`. The payload is zero-filled.
  // Throws ShmNameError, SystemError (EEXIST for a taken exact name, ENOSPC
  // when /dev/shm or memory cannot hold it), LimitError (a shape whose size
  // overflows).
  SharedMemory(create_only_t, const ShmName& name, DType dtype, const std::vector<std::int64_t>& shape,
               Layout layout = Layout::RowMajor);
  // Opens an existing segment: an anonymous one this process holds (its
  // label), else a name in /dev/shm. Throws ShmNameError, SystemError
  // (ENOENT, EACCES), ShmFormatError.
  SharedMemory(open_only_t, const std::string& name);
  // Opens the segment a `descriptor()` Value describes: by its descriptor
  // when it carries one, else by name; and checks that it is the segment
  // described (its generation). Throws TypeError for a malformed Value, and
  // what opening by name throws.
  SharedMemory(open_only_t, const Value& descriptor);

  SharedMemory(SharedMemory&& o) noexcept;
  SharedMemory& operator=(SharedMemory&& o) noexcept;
  SharedMemory(const SharedMemory&) = delete;
  SharedMemory& operator=(const SharedMemory&) = delete;
  ~SharedMemory();  // unmaps; removes the name if owns()

  // Unmaps now (and removes the name if owns()); the object becomes empty.
  void reset() noexcept;

  bool valid() const noexcept { return base_ != nullptr; }
  explicit operator bool() const noexcept { return valid(); }
  // The name in /dev/shm, or the label of an anonymous segment.
  const std::string& name() const noexcept { return name_; }
  bool anonymous() const noexcept { return fd_.valid(); }
  // The memfd of an anonymous segment (owned by this object), -1 if named.
  int fd() const noexcept { return fd_.get(); }

  // A Map Value that fits in a Message: {name, kind, generation} and, for an
  // anonymous segment, "fd": a duplicate of its descriptor.
  Value descriptor() const;

  // The payload: 64-byte aligned, bytes() long.
  void* data() noexcept { return payload_; }
  const void* data() const noexcept { return payload_; }
  std::size_t bytes() const noexcept;

  ShmKind kind() const noexcept;
  std::optional<DType> dtype() const noexcept;  // nullopt: raw bytes
  std::vector<std::int64_t> shape() const;
  std::vector<std::int64_t> strides() const;  // in elements, one per axis
  Layout layout() const noexcept;
  pid_t creatorPid() const noexcept;
  std::uint64_t generation() const noexcept;  // below 2^63, fits a Value
  // "float64[480x640] row-major" or "bytes[1024]".
  std::string describe() const;

  // True in the process that created the segment, until release() or a move.
  bool owns() const noexcept { return owner_ != 0 && owner_ == currentPid(); }
  // Gives up ownership: the name stays when this object is destroyed.
  void release() noexcept { owner_ = 0; }

  // Removes a name (shm_unlink). Mappings stay valid. False when the name
  // is invalid, an anonymous label (EINVAL), or could not be removed (errno
  // tells why). Never throws.
  static bool remove(const std::string& name) noexcept;

 private:
  void create(const ShmName& name, ShmKind kind, std::uint8_t dtype, const std::vector<std::int64_t>& shape,
              Layout layout);
  void createAnonymous(std::uint64_t total);
  void createNamed(const ShmName& name, std::uint64_t total);
  void reserve(int fd, std::uint64_t total, const std::string& where);
  void openFd(detail::UniqueFd fd, const std::string& name);
  static void checkSize(std::uint64_t size, const std::string& name);
  void adoptMapping(std::uint64_t size, const std::string& name);
  static pid_t currentPid() noexcept;

  // Maps `len` bytes of `fd` shared, read-write, into map_ (through the
  // mmap seam, lib/seams.hpp); SystemError naming `name` on failure.
  void mapFd(int fd, std::uint64_t len, const std::string& name);

  std::string name_;
  detail::UniqueFd fd_;  // anonymous segments only
  detail::Mapping map_;  // the whole segment, header included
  detail::ShmHeader header_{};  // validated copy; accessors read this, not the mapping
  void* base_ = nullptr;        // the mapped header
  void* payload_ = nullptr;  // base_ + headerBytes
  pid_t owner_ = 0;          // creator pid while this object owns the name
};

// One forklift segment found in /dev/shm, for tools and cleanup.
struct SegmentInfo {
  std::string name;
  std::uint64_t fileBytes = 0;  // size of the segment, header included
  ShmKind kind = ShmKind::Bytes;
  std::optional<DType> dtype;   // nullopt: raw bytes
  std::vector<std::int64_t> shape;
  Layout layout = Layout::RowMajor;
  std::uint64_t payloadBytes = 0;
  pid_t creatorPid = 0;
  std::uint64_t generation = 0;
  bool creatorAlive = false;  // kill(pid, 0) did not say ESRCH

  std::string describe() const;  // as SharedMemory::describe()
};

// The segments in /dev/shm whose name starts with "fk." and whose header is
// a valid forklift header, sorted by name. Anything else there (foreign
// names, bad magic, other users' segments we cannot read) is left out.
// "Creator alive" is judged by pid in this pid namespace: a reused pid, or a
// creator that exited but is not reaped yet (a zombie), looks alive, which
// errs on the side of keeping a segment.
std::vector<SegmentInfo> listSegments();

// Removes `s` if it is still there with the same generation and its creator
// is still dead; true when removed. Never throws. For `forklift-shm clean`.
bool removeStaleSegment(const SegmentInfo& s) noexcept;

}  // namespace forklift
