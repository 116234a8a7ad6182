// forklift - SharedMemory: one named, typed shared-memory segment
//
// A `SharedMemory` owns the mapping of one POSIX shared-memory segment
// (/dev/shm/<name>) made with Boost.Interprocess. The segment starts with a
// small header (magic, format version, kind, element type, shape, strides,
// layout, exact payload size, creator pid, generation, see
// detail/shm_header.hpp); the payload that follows starts 64-byte aligned.
// Most code wants the typed views `ShmArray<T>` (shm_array.hpp, a matrix) or
// `ShmTensor<T, Rank>` (shm_tensor.hpp, any rank); this class is the layer
// underneath.
//
// Server side and client side: the frontend creates (`create_only`) before
// fork; the backend opens the same name (`open_only`). The segment is
// created exclusively, with mode 0600 whatever the umask, and its pages are
// reserved at once, so a full /dev/shm is a `SystemError` (ENOSPC) here,
// naming the segment, its size and the free space, instead of a SIGBUS at
// the first write.
//
// Names: by default forklift generates a unique one, `fk.<pid>.<n>.<hint>`
// (the hint is shortened, and characters outside [A-Za-z0-9._-] become '_',
// to fit). `ShmName::exact("...")` uses the caller's name as given: it must
// be 1-30 characters of [A-Za-z0-9._-] without the leading '/', or
// `ShmNameError` is thrown. Only names starting with "fk." are seen by the
// `forklift-shm` tool.
//
// Ownership: the object that created a name owns it and removes the name
// (shm_unlink) when destroyed; an object that only opened it never removes
// it. `release()` gives ownership up, a move hands it over. A process forked
// from the owner inherits the object but not the ownership: `owns()` also
// compares the creator's pid with getpid(), so the child's copy never removes
// the name. Removing the name never invalidates a mapping: both sides keep
// their pages until they unmap.
//
// Errors: a name that does not exist, or a create that finds the name taken,
// is a `SystemError` (ENOENT, EEXIST). A segment that is too short for the
// header, is not forklift's (bad magic), has another format version or a
// corrupt header is a `ShmFormatError` naming the segment.
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

#include <boost/interprocess/mapped_region.hpp>

#include "forklift/detail/shm_header.hpp"
#include "forklift/error.hpp"
#include "forklift/value.hpp"

namespace forklift {

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
// The numbering is part of the segment format; 2 is kept for the ring buffer.
enum class ShmKind : std::uint8_t { Bytes = 0, Array = 1 };
const char* shmKindName(ShmKind k) noexcept;  // "bytes", "array", "unknown"

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
// Generated names, and the only ones `forklift-shm` looks at, start with this.
inline constexpr std::string_view kShmNamePrefix = "fk.";

// How a segment to be created is named: a hint (the default, from any
// string) becomes part of a generated unique name; `ShmName::exact` is used
// as it is.
class ShmName {
 public:
  ShmName(std::string hint) : text_(std::move(hint)) {}  // NOLINT: implicit on purpose
  ShmName(const char* hint) : text_(hint) {}             // NOLINT
  static ShmName exact(std::string name) {
    ShmName n(std::move(name));
    n.exact_ = true;
    return n;
  }

  bool isExact() const noexcept { return exact_; }
  const std::string& text() const noexcept { return text_; }

 private:
  std::string text_;
  bool exact_ = false;
};

// A new unique name "fk.<pid>.<n>.<hint>", never longer than
// kShmMaxNameLength: the hint is cut and sanitised to fit.
std::string makeShmName(std::string_view hint);
// Throws ShmNameError saying what is wrong with `name`.
void checkShmName(std::string_view name);

class SharedMemory {
 public:
  // An empty object: valid() is false, data() is nullptr, nothing is owned.
  // A moved-from SharedMemory is empty too.
  SharedMemory() noexcept = default;

  // Creates a segment of `bytes` raw bytes (kind Bytes, dtype() nullopt,
  // shape {bytes}).
  SharedMemory(create_only_t, const ShmName& name, std::size_t bytes);
  // Creates a segment holding a `dtype` array of `shape` (rank at most 8;
  // kind Array), stored densely in `layout`. The payload is zero-filled. Throws ShmNameError, SystemError (EEXIST
  // for a taken exact name, ENOSPC when /dev/shm cannot hold it), LimitError
  // (a shape whose size overflows).
  SharedMemory(create_only_t, const ShmName& name, DType dtype, const std::vector<std::int64_t>& shape,
               Layout layout = Layout::RowMajor);
  // Opens an existing segment. Throws ShmNameError, SystemError (ENOENT,
  // EACCES), ShmFormatError.
  SharedMemory(open_only_t, const std::string& name);

  SharedMemory(SharedMemory&& o) noexcept;
  SharedMemory& operator=(SharedMemory&& o) noexcept;
  SharedMemory(const SharedMemory&) = delete;
  SharedMemory& operator=(const SharedMemory&) = delete;
  ~SharedMemory();  // unmaps; removes the name if owns()

  // Unmaps now (and removes the name if owns()); the object becomes empty.
  void reset() noexcept;

  bool valid() const noexcept { return base_ != nullptr; }
  explicit operator bool() const noexcept { return valid(); }
  const std::string& name() const noexcept { return name_; }

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
  // is invalid or could not be removed (errno tells why). Never throws.
  static bool remove(const std::string& name) noexcept;

 private:
  void create(const ShmName& name, std::uint8_t dtype, const std::vector<std::int64_t>& shape, Layout layout);
  static pid_t currentPid() noexcept;

  std::string name_;
  boost::interprocess::mapped_region region_;
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
