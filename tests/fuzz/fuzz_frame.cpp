// libFuzzer target: the frame parser of a Channel on an arbitrary stream.
//
// The input is written into one end of a socketpair (then closed); the other
// end receives until the stream ends. Every outcome must be a message or a
// forklift::Error (StreamCorrupt, DecodeError, LimitError, PeerClosed), and a
// corrupt stream stays corrupt: the receiver never reads past it. The first
// byte chooses the read mode, so both are covered.
#include <sys/socket.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "forklift/channel.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) std::abort();
  forklift::Limits limits;
  limits.maxBytes = 1u << 16;
  forklift::Channel rx(sv[0], limits);
  {
    // The whole input fits the socket buffer (-max_len is far below it).
    const auto* p = reinterpret_cast<const char*>(data + 1);
    std::size_t left = size - 1;
    while (left > 0) {
      const ssize_t w = ::write(sv[1], p, left);
      if (w <= 0) std::abort();
      p += w;
      left -= static_cast<std::size_t>(w);
    }
    ::close(sv[1]);
  }
  rx.setReadMode(data[0] & 1 ? forklift::ReadMode::OneFrame : forklift::ReadMode::Greedy);
  bool corrupt = false;
  for (;;) {
    try {
      const auto m = rx.recv(forklift::Timeout::zero());
      if (corrupt) std::abort();  // a message after the stream was declared corrupt
      if (!m) break;              // cannot happen once the writer closed: EOF is PeerClosed
    } catch (const forklift::StreamCorrupt&) {
      if (corrupt) break;  // thrown again, without reading: as promised
      if (!rx.buffered()) std::abort();
      corrupt = true;
    } catch (const forklift::PeerClosed&) {
      if (corrupt) std::abort();
      break;
    } catch (const forklift::Error&) {
      if (corrupt) std::abort();  // a refused frame: the next one comes
    }
  }
  return 0;
}
