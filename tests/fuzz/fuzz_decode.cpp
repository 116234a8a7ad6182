// libFuzzer target: the message decoder on arbitrary bytes.
//
// Any input either decodes or throws forklift::Error (DecodeError,
// LimitError): never a crash, a sanitizer report, or another exception. A
// message that decodes encodes again (with the same limits), and that
// encoding decodes and encodes to the same bytes.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "forklift/message.hpp"

namespace {

// Limits small enough for the fuzzer to reach every one of them.
forklift::Limits smallLimits() {
  forklift::Limits l;
  l.maxBytes = 1u << 16;
  l.maxDepth = 8;
  l.maxElements = 512;
  return l;
}

void check(const char* data, std::size_t size, const forklift::Limits& limits) {
  forklift::Message m;
  try {
    m = forklift::decode(data, size, limits);
  } catch (const forklift::Error&) {
    return;  // refused with a clear error: fine
  }
  forklift::Buffer again;
  try {
    forklift::encode(m, again, limits);
  } catch (const forklift::Error&) {
    std::abort();  // the sender would refuse what the receiver accepted
  }
  // Compared as bytes, not as Messages: a NaN argument is not equal to itself.
  forklift::Buffer third;
  forklift::encode(forklift::decode(again.data(), again.size(), limits), third, limits);
  if (third.size() != again.size() || std::memcmp(third.data(), again.data(), again.size()) != 0) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const char* p = reinterpret_cast<const char*>(data);
  check(p, size, forklift::Limits{});
  check(p, size, smallLimits());
  return 0;
}
