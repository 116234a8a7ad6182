// forklift - the header at the start of every shared-memory segment (internal)
//
// A forklift segment begins with `ShmHeader`, then padding up to
// `headerBytes` (a multiple of 64), then the payload. The header says what
// the segment is (its kind: raw bytes, an array, ...), what the payload is
// (element type, shape, strides, layout, exact byte count) and who made it
// (creator pid, generation), so an opener can refuse a segment that is not
// what it expects and `forklift-shm` can find segments whose creator died.
//
// Strides are in elements, not bytes (Eigen's unit; numpy's strides are
// these times the element size), one per used shape entry. Version 2 writes
// only the contiguous strides of `layout`: row-major puts the last index
// fastest (C, numpy), column-major the first (Fortran, Eigen). Openers check
// that they are exactly that, so every view can assume a dense payload; they
// are stored so that a reader that knows nothing of forklift's layouts (a
// numpy wrapper, a tool) can address the payload from the header alone.
//
// The creator writes every field first and `magic` last, with a release
// store; readers load `magic` with acquire. A reader that sees the magic sees
// a complete header, and one that races with creation sees "bad magic"
// rather than half-written fields.
//
// The layout is part of the format: changing it means a new `kShmVersion`.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace forklift::detail {

// "FKSHMSEG" read as a little-endian 64-bit word.
inline constexpr std::uint64_t kShmMagic = 0x4745534d48534b46ull;
// Version 1 (128 bytes, no kind, no strides) is refused by name.
inline constexpr std::uint32_t kShmVersion = 2;
inline constexpr std::size_t kShmMaxRank = 8;
inline constexpr std::size_t kShmPayloadAlign = 64;

struct ShmHeader {
  std::uint64_t magic;         // kShmMagic once the header is complete
  std::uint32_t version;       // kShmVersion
  std::uint32_t headerBytes;   // offset of the payload; a multiple of 64
  std::uint8_t dtype;          // forklift::DType, or 0 for raw bytes
  std::uint8_t rank;           // number of used entries in `shape`
  std::uint8_t layout;         // forklift::Layout
  std::uint8_t kind;           // forklift::ShmKind
  std::uint8_t reserved0[4];
  std::uint64_t payloadBytes;  // exact payload size, without padding
  std::int64_t creatorPid;
  std::uint64_t generation;    // differs between two creations of one name
  std::int64_t shape[kShmMaxRank];
  std::int64_t strides[kShmMaxRank];  // in elements; see above
  std::uint8_t reserved1[16];
};

static_assert(std::is_standard_layout_v<ShmHeader> && std::is_trivially_copyable_v<ShmHeader>);
static_assert(sizeof(ShmHeader) == 192, "the header layout is part of the segment format");
static_assert(sizeof(ShmHeader) % kShmPayloadAlign == 0);

}  // namespace forklift::detail
