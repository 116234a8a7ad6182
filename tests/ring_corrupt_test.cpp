// Shared memory written by a peer is input. Each test plays the other side
// (white-box, through lib/ring_layout.hpp and a second mapping of the
// ring's segment), writes nonsense into one field, and checks that this
// side fails with a ShmFormatError naming the ring and the field: no read
// or write out of bounds (these run under ASan in CI), no crash, no hang,
// no slot handed out twice. The channel's shared-memory queues
// (lib/shm_pipe.*) follow the same rule: last section.
#include <gtest/gtest.h>
#include <sched.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "forklift/manager.hpp"
#include "forklift/ring_buffer.hpp"
#include "ring_layout.hpp"
#include "shm_pipe.hpp"
#include "support.hpp"

namespace forklift {
namespace {

using namespace std::chrono_literals;
using detail::deliverEntry;
using detail::record;
using detail::RecordState;

// The ring's segment as the peer sees it: a mapping of its own.
struct Peer {
  SharedMemory shm;
  detail::RingHeader* h;
  detail::RingSlotMeta* meta;
  std::atomic<std::uint64_t>* deliver;
  std::atomic<std::uint32_t>* ret;

  explicit Peer(const RingBuffer& ring) {
    const Value d = ring.describe();
    for (const auto& [k, v] : d.as<Map>())
      if (k == "segment") shm = SharedMemory(open_only, v);
    auto* base = static_cast<std::byte*>(shm.data());
    h = reinterpret_cast<detail::RingHeader*>(base);
    meta = reinterpret_cast<detail::RingSlotMeta*>(base + h->metaOffset);
    deliver = reinterpret_cast<std::atomic<std::uint64_t>*>(base + h->deliverOffset);
    ret = reinterpret_cast<std::atomic<std::uint32_t>*>(base + h->returnOffset);
  }
};

void commit(RingWriter& w, std::int64_t frame) {
  WriteSlot s = w.reserve(test::slow(1s));
  s.setUser(0, frame);
  s.commit();
}

// The text of the ShmFormatError `fn` throws; checks it names a corrupt ring.
template <class Fn>
std::string corruptError(Fn&& fn) {
  const std::string what = test::thrown<ShmFormatError>(std::forward<Fn>(fn));
  EXPECT_TRUE(test::contains(what, "' is corrupt: "));
  return what;
}

// ---------------------------------------------------------------- a hostile writer

TEST(RingCorrupt, ADeliveryEntryNamingASlotPastTheRing) {
  auto ring = RingBuffer::create("ring-bad-entry", 4, 64);
  Peer peer(ring);
  auto w = ring.writer();
  auto r = ring.reader();
  commit(w, 1);
  peer.deliver[0].store(deliverEntry(1, 99));
  EXPECT_TRUE(test::contains(corruptError([&] { r.tryNext(); }), "the delivery queue names slot 99 of 4"));
  EXPECT_EQ(r.held(), 0u);
}

TEST(RingCorrupt, ADeliveryEntryWithAnotherSequence) {
  auto ring = RingBuffer::create("ring-bad-seq", 4, 64);
  Peer peer(ring);
  auto w = ring.writer();
  auto r = ring.reader();
  commit(w, 1);
  peer.deliver[0].store(deliverEntry(7, 0));
  EXPECT_TRUE(test::contains(corruptError([&] { r.tryNext(); }), "entry 0 carries sequence 7, not 1"));
}

TEST(RingCorrupt, AHeadFarAheadOfTheTail) {
  auto ring = RingBuffer::create("ring-bad-head", 4, 64);
  Peer peer(ring);
  auto r = ring.reader();
  peer.h->head.store(1000);
  EXPECT_TRUE(test::contains(corruptError([&] { r.tryNext(); }), "the delivery queue holds 1000 slots, of 4"));
  // A wait meets it too, at once, not at its timeout.
  const auto t0 = std::chrono::steady_clock::now();
  corruptError([&] { r.next(test::slow(5s)); });
  EXPECT_LT(std::chrono::steady_clock::now() - t0, test::slow(2s));
}

TEST(RingCorrupt, AHeadThatGoesBack) {
  auto ring = RingBuffer::create("ring-bad-back", 4, 64);
  Peer peer(ring);
  auto w = ring.writer();
  auto r = ring.reader();
  commit(w, 1);
  commit(w, 2);
  ASSERT_TRUE(r.tryNext());
  peer.h->head.store(1);
  EXPECT_TRUE(test::contains(corruptError([&] { r.tryNext(); }), "the delivery queue's end went back from 2 to 1"));
}

TEST(RingCorrupt, ATailPastTheHead) {
  auto ring = RingBuffer::create("ring-bad-tail", 4, 64);
  Peer peer(ring);
  auto w = ring.writer();
  auto r = ring.reader();
  commit(w, 1);
  peer.h->tail.store(std::uint64_t{10} << 1);
  EXPECT_TRUE(test::contains(corruptError([&] { r.tryNext(); }), "read position 10 is past its end 1"));
}

TEST(RingCorrupt, ADeliveryEntryNamingASlotTheReaderHolds) {
  auto ring = RingBuffer::create("ring-bad-twice", 4, 64);
  Peer peer(ring);
  auto w = ring.writer();
  auto r = ring.reader({.maxHeld = 2});
  commit(w, 1);
  auto first = r.tryNext();
  ASSERT_TRUE(first);
  commit(w, 2);
  peer.deliver[1].store(deliverEntry(2, first->index()));
  EXPECT_TRUE(test::contains(corruptError([&] { r.tryNext(); }),
                             "hands out slot " + std::to_string(first->index()) + ", which the reader holds already"));
  EXPECT_EQ(r.held(), 1u);
}

TEST(RingCorrupt, SlotMetadataCannotReachPastTheSlot) {
  auto ring = RingBuffer::create("ring-bad-bytes", 4, 64);
  Peer peer(ring);
  auto w = ring.writer();
  auto r = ring.reader();
  commit(w, 1);
  peer.meta[peer.deliver[0].load() & 0xffff].bytes = std::uint64_t{1} << 60;
  auto s = r.tryNext();
  ASSERT_TRUE(s);
  EXPECT_EQ(s->bytes(), 64u);
  const RingSlotView v = ring.view(s->index(), s->sequence());
  EXPECT_EQ(v.bytes(), 64u);
}

TEST(RingCorrupt, ANegativePeerPid) {
  auto ring = RingBuffer::create("ring-bad-pid", 4, 64);
  Peer peer(ring);
  auto r = ring.reader();
  peer.h->writerPid.store(-5);
  peer.h->writerEpoch.fetch_add(1);
  EXPECT_TRUE(test::contains(corruptError([&] { r.next(test::slow(1s)); }), "the peer's pid is -5"));
  peer.h->writerPid.store(0);
  auto ring2 = RingBuffer::create("ring-bad-pid2", 4, 64);
  Peer peer2(ring2);
  peer2.h->readerPid.store(-7);
  EXPECT_TRUE(test::contains(corruptError([&] { ring2.reader(); }), "the reader's pid is -7"));
}

TEST(RingCorrupt, FormatFieldsChangedAfterTheOpenAreNotRead) {
  auto ring = RingBuffer::create("ring-bad-format", 4, 64);
  Peer peer(ring);
  auto w = ring.writer();
  auto r = ring.reader();
  peer.h->slotCount = 60000;
  peer.h->slotStride = std::uint64_t{1} << 40;
  peer.h->dataOffset = std::uint64_t{1} << 40;
  commit(w, 1);
  auto s = r.tryNext();
  ASSERT_TRUE(s);
  EXPECT_EQ(s->user(0), 1);
  // Opened anew, the header is checked.
  EXPECT_THROW(RingBuffer::open(ring.describe()), ShmFormatError);
}

// ---------------------------------------------------------------- a hostile reader

TEST(RingCorrupt, AReturnEntryNamingASlotPastTheRing) {
  auto ring = RingBuffer::create("ring-bad-ret", 4, 64);
  Peer peer(ring);
  auto w = ring.writer();
  peer.ret[0].store(77);
  EXPECT_TRUE(test::contains(corruptError([&] { w.tryReserve(); }), "the return queue names slot 77 of 4"));
  // A writer attaching to it sees it too.
  auto ring2 = RingBuffer::create("ring-bad-ret2", 4, 64);
  Peer peer2(ring2);
  peer2.ret[2].store(1u << 20);
  EXPECT_TRUE(
      test::contains(corruptError([&] { ring2.writer(); }), "the return queue names slot 1048576 of 4"));
}

TEST(RingCorrupt, AReturnEndFarAhead) {
  auto ring = RingBuffer::create("ring-bad-rhead", 4, 64);
  Peer peer(ring);
  auto w = ring.writer();
  peer.h->rHead.store(100);
  EXPECT_TRUE(test::contains(corruptError([&] { w.tryReserve(); }),
                             "the return queue's end 100 is not within 4 slots of its read position 0"));
  // A blocked Block writer meets it at once, not at its timeout.
  const auto t0 = std::chrono::steady_clock::now();
  corruptError([&] { w.reserve(test::slow(5s)); });
  EXPECT_LT(std::chrono::steady_clock::now() - t0, test::slow(2s));
}

// R gives back a slot the writer holds in its spare list: read when the
// reader shares the writer's CPU (this thread is pinned to make it so).
TEST(RingCorrupt, AReturnEntryNamingASlotTheWriterHolds) {
  cpu_set_t saved;
  ASSERT_EQ(sched_getaffinity(0, sizeof saved, &saved), 0);
  cpu_set_t one;
  CPU_ZERO(&one);
  int cpu = 0;
  while (!CPU_ISSET(cpu, &saved)) ++cpu;
  CPU_SET(cpu, &one);
  ASSERT_EQ(sched_setaffinity(0, sizeof one, &one), 0);
  {
    auto ring = RingBuffer::create("ring-bad-dup", 4, 64, RingPolicy::DropOldest);
    Peer peer(ring);
    auto w = ring.writer();
    std::optional<WriteSlot> s = w.tryReserve();  // slot 0, from R
    ASSERT_TRUE(s);
    s->abandon();  // into the writer's spare list
    // The reader "returns" slot 0 once more, and says it runs on our CPU.
    peer.ret[0].store(0);
    peer.h->rHead.store(peer.h->rHead.load() + 1);
    peer.h->readerCpu.store(cpu + 1);
    EXPECT_TRUE(test::contains(corruptError([&] { w.tryReserve(); }),
                               "the return queue gives back slot 0, which the writer holds already"));
  }
  ASSERT_EQ(sched_setaffinity(0, sizeof saved, &saved), 0);
}

TEST(RingCorrupt, TheReadersRecordNamingASlotPastTheRing) {
  auto ring = RingBuffer::create("ring-bad-record", 4, 64);
  Peer peer(ring);
  peer.h->readerRecord.store(record(RecordState::Held, 999, 0));
  EXPECT_TRUE(test::contains(corruptError([&] { ring.reader(); }), "the reader's record names slot 999 of 4"));
  EXPECT_TRUE(test::contains(corruptError([&] { ring.writer(); }), "the reader's record names slot 999 of 4"));
  // Both attachments were undone: with the record fixed, both attach.
  peer.h->readerRecord.store(0);
  auto w = ring.writer();
  auto r = ring.reader();
  commit(w, 1);
  EXPECT_TRUE(r.tryNext());
}

TEST(RingCorrupt, ADropMeetsAnEntryTheWriterDidNotWrite) {
  auto ring = RingBuffer::create("ring-bad-drop", 4, 64, RingPolicy::DropOldest);
  Peer peer(ring);
  auto w = ring.writer();
  for (int i = 1; i <= 4; ++i) commit(w, i);
  peer.deliver[0].store(deliverEntry(1, 60));
  EXPECT_TRUE(test::contains(corruptError([&] { w.tryReserve(); }), "the delivery queue names slot 60 of 4"));
  auto ring2 = RingBuffer::create("ring-bad-drop2", 4, 64, RingPolicy::DropOldest);
  Peer peer2(ring2);
  auto w2 = ring2.writer();
  for (int i = 1; i <= 4; ++i) commit(w2, i);
  peer2.deliver[0].store(deliverEntry(9, peer2.deliver[0].load() & 0xffff));
  EXPECT_TRUE(test::contains(corruptError([&] { w2.tryReserve(); }), "not what the writer put there"));
}

// A reader that "took" every slot (D and R empty, the writer holding none):
// a drop-policy writer, which never waits, would spin for good.
TEST(RingCorrupt, EverySlotWithTheReaderIsRefusedByADropWriter) {
  auto ring = RingBuffer::create("ring-bad-all", 4, 64, RingPolicy::DropOldest);
  Peer peer(ring);
  auto w = ring.writer();
  for (int i = 1; i <= 4; ++i) commit(w, i);
  peer.h->tail.store(std::uint64_t{4} << 1);
  EXPECT_TRUE(test::contains(corruptError([&] { w.reserve(kForever); }),
                             "all 4 slots are with the reader, which may hold 3 at most"));
}

TEST(RingCorrupt, ADeliveryQueueOverfullAtAWritersAttach) {
  auto ring = RingBuffer::create("ring-bad-attach", 4, 64);
  Peer peer(ring);
  peer.h->head.store(9);
  EXPECT_TRUE(test::contains(corruptError([&] { ring.writer(); }), "the delivery queue holds 9 - 0 slots, of 4"));
}

// The Manager's loop ends the reading with the error, and the loop goes on.
TEST(RingCorrupt, ReadRingEndsWithTheError) {
  auto ring = RingBuffer::create("ring-bad-loop", 4, 64);
  Peer peer(ring);
  auto w = ring.writer();
  auto r = ring.reader();
  commit(w, 1);
  peer.deliver[0].store(deliverEntry(1, 99));
  Manager m;
  std::string what;
  bool ended = false;
  m.readRing(
      r, [](ReadSlot&) {},
      [&](const Error& e) {
        ended = true;
        what = e.what();
      });
  EXPECT_TRUE(m.runUntil([&] { return ended; }, test::slow(10s)));
  EXPECT_EQ(m.finish(), 0);
  EXPECT_TRUE(test::contains(what, "the delivery queue names slot 99 of 4"));
}

// ---------------------------------------------------------------- the message queues

// A writer's tail a lap and more ahead of the head: the reader takes at most
// one queue of bytes (garbage for the framing), never past the queue.
TEST(QueueCorrupt, ATailFarAheadIsNeverCopiedPastTheQueue) {
  auto link = detail::ShmLink::make(4096, 0);
  detail::Pipe& p = *link->pipe(0);
  p.h->tail.store(p.h->head.load() + 100000);
  EXPECT_EQ(p.readable(), p.capacity);
  std::vector<char> out(1 << 20);
  EXPECT_EQ(p.read(out.data(), out.size()), p.capacity);
}

// A reader's head past the writer's tail: once the writer loads it, no
// room; before, the head it saw last (a lower bound) allows one queue.
// Never a byte past the queue.
TEST(QueueCorrupt, AHeadPastTheTailLeavesTheWriterNoRoom) {
  auto link = detail::ShmLink::make(4096, 0);
  detail::Pipe& p = *link->pipe(0);
  p.h->head.store(p.h->tail.load() + 5000);
  const std::vector<char> in(1 << 16, 'x');
  EXPECT_LE(p.write(in.data(), in.size()), p.capacity);
  EXPECT_EQ(p.writable(), 0u);
  EXPECT_EQ(p.write(in.data(), in.size()), 0u);
}

// A descriptor a peer hands over is input too: a pipe in a doorbell's place
// would block an attach's clearing read for good; open() refuses it.
TEST(RingCorrupt, ADoorbellThatIsNotAnEventfdIsRefused) {
  RingBuffer ring = RingBuffer::create("bells", 2, 64);
  int p[2];
  ASSERT_EQ(::pipe(p), 0);
  Fd pipeEnd{detail::UniqueFd(p[0])};
  ::close(p[1]);
  for (const char* bell : {"readerBell", "writerBell"}) {
    SCOPED_TRACE(bell);
    Value d = ring.describe();
    for (auto& [key, v] : *d.getIf<Map>())
      if (key == bell) v = pipeEnd;
    EXPECT_THROW(RingBuffer::open(d), TypeError);
  }
  EXPECT_NO_THROW(RingBuffer::open(ring.describe()).reader());
}

}  // namespace
}  // namespace forklift
