// forklift::cluster - how forklift arrays travel in a World's messages (internal)
//
// No MPI here: this file turns a Message holding array descriptors into a
// header and the segments whose pages follow it (the sender), and reads and
// checks such a header (the receiver). world.cpp moves the bytes.
//
// A message that carries arrays is one header on forklift's tag:
//
//   "FKA1"  seq (u64, little endian)  table length (u32 LE)  table  body
//
// `seq` counts the array messages from one rank to another (0, 1, ...); the
// MPI thread writes it when it posts the send, and the receiver takes only
// the next one, so a header no World sent (a forged or stale one) never
// claims payload that belongs to another. `table` is an encoded forklift
// Message "arrays" {chunk, arrays: [{name, dtype, shape, layout, bytes,
// chunks}, ...]}; `body` is the user's message encoded with a descriptor
// (msgpack ext) where each array's describe() map stood: the i-th descriptor
// the body refers to is the table's i-th array. Then every array's bytes
// follow on the data tag, array by array, in chunks of `chunk` bytes (the
// last one shorter; an empty array has none).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "forklift/cluster/world.hpp"
#include "forklift/message.hpp"
#include "forklift/shm.hpp"

namespace forklift::cluster::detail {

inline constexpr char kArrayMagic[4] = {'F', 'K', 'A', '1'};
inline constexpr std::size_t kArrayPrefixBytes = 16;  // magic, seq, table length
inline constexpr std::size_t kMinArrayChunk = 4096;
inline constexpr std::size_t kMaxArrayChunk = std::size_t{64} << 20;

// True when `bytes` start like an array header (the receiver then reads it
// with readArrayHeader; anything else is a plain encoded Message).
bool isArrayHeader(const char* bytes, std::size_t size) noexcept;

// True when some Value of `m`, at any depth, is a descriptor.
bool holdsDescriptor(const Message& m) noexcept;

// The sender's side of a message holding descriptors.
struct PackedArrays {
  std::vector<char> header;          // seq still 0: setArraySeq before sending
  std::vector<SharedMemory> arrays;  // in table order; they keep the pages mapped
  std::size_t chunk = 0;
};
// Every Map with an "fd" descriptor is opened as a forklift array segment
// (it must be one: TypeError naming the command and the argument
// otherwise, as for a descriptor anywhere else); LimitError past `arrays`'
// limits or `limits`.
PackedArrays packArrays(const Message& m, const Limits& limits, const ArrayLimits& arrays);
void setArraySeq(std::vector<char>& header, std::uint64_t seq) noexcept;

// One array a header announces, checked.
struct ArraySpec {
  std::string hint;  // the name hint for the receiver's new segment
  DType dtype = DType::U8;
  std::vector<std::int64_t> shape;
  Layout layout = Layout::RowMajor;
  std::uint64_t bytes = 0;
  std::uint64_t chunks = 0;
};

// What the receiver reads from a header.
//
// `error`: the header is not what a World sends (it does not frame or
// decode, a size does not match dtype x shape, a dimension is negative or
// absurd, the rank is not 1..8, a chunk size or count does not fit, more
// arrays than Limits::maxFds): no chunks can belong to it. Otherwise it is
// `wellFormed`, `chunks` is the number of payload messages that follow it,
// and `refusal` says when this rank will not take it (over
// WorldOptions::arrays' limits): its chunks are then drained. Everything is
// checked before anything is allocated.
struct ArrayHeader {
  bool wellFormed = false;
  std::string error;
  std::string refusal;
  std::uint64_t seq = 0;
  std::uint64_t chunk = 0;
  std::uint64_t chunks = 0;
  std::vector<ArraySpec> arrays;
  const char* body = nullptr;
  std::size_t bodySize = 0;
};
ArrayHeader readArrayHeader(const char* bytes, std::size_t size, const Limits& limits, const ArrayLimits& arrays);

// The receiver's new segments for `h`, then the body decoded with each
// array's describe() Value where its placeholder stood. Throws what
// SharedMemory's create throws (SystemError ENOSPC), DecodeError,
// LimitError, TypeError.
std::vector<SharedMemory> makeArrays(const ArrayHeader& h);
Message decodeWithArrays(const ArrayHeader& h, const std::vector<SharedMemory>& arrays, const Limits& limits);

}  // namespace forklift::cluster::detail
