// Rings (include/forklift/ring_buffer.hpp) from Python: forklift.Ring,
// RingWriter, RingReader, and the slots they hand out, WriteSlot and
// ReadSlot. A slot's `array` is a numpy view of the slot in place (of its
// array shape and dtype, or its bytes as uint8); the view's base is a lease
// that keeps the slot held, so the pages cannot go back to the other side
// while a view lives. commit(), abandon() and release() refuse (forklift.Error)
// while a view of the slot still lives: del the views first. The waits
// (reserve, next, push) release the GIL in slices of 50 ms and let Ctrl-C
// through; fileno() is the doorbell, for selectors, poll and asyncio.
//
// Threads: C++ uses a role and the slots it handed out from one thread at a
// time. Python code runs one thread at a time under the GIL, except while a
// wait has released it; so a wait marks its role busy, any other call on the
// role or its slots meanwhile raises forklift.Error, and a read slot that
// another thread releases (or drops) meanwhile is released by the waiting
// thread when its wait returns.
#include <memory>
#include <optional>

#include "common.hpp"
#include "forklift/ring_buffer.hpp"

namespace forklift::python {

namespace {

// One role (reader or writer) as Python shares it with its slots. Touched
// with the GIL held only.
struct Role {
  bool busy = false;                // a wait runs with the GIL released
  std::vector<ReadSlot> deferred;   // released by the waiting thread after its wait
  const char* what = "ring role";
};

void checkIdle(const Role& r) {
  if (r.busy)
    throw Error(std::string("this ") + r.what +
                " is waiting in another thread: a role and its slots are used by one thread at a time");
}

// Marks a role busy for one wait.
struct Busy {
  Role& r;
  explicit Busy(Role& role) : r(role) {
    checkIdle(r);
    r.busy = true;
  }
  Busy(const Busy&) = delete;
  Busy& operator=(const Busy&) = delete;
  ~Busy() {
    r.busy = false;
    r.deferred.clear();  // releases what other threads gave back meanwhile
  }
};

// A slot held for Python: the wrapper and every numpy view's lease share it.
template <class Slot>
struct Held {
  Slot slot;
  std::shared_ptr<Role> role;
  Held(Slot s, std::shared_ptr<Role> r) : slot(std::move(s)), role(std::move(r)) {}
  Held(const Held&) = delete;
  Held& operator=(const Held&) = delete;
  ~Held() {
    if constexpr (std::is_same_v<Slot, ReadSlot>) {
      if (slot.valid() && role && role->busy) role->deferred.push_back(std::move(slot));
    }
  }
};

// What a numpy view's base holds.
struct Lease {
  std::shared_ptr<void> held;
};

py::dict statsDict(const RingStats& s) {
  py::dict d;
  d["committed"] = s.committed;
  d["consumed"] = s.consumed;
  d["drops"] = s.drops;
  d["torn"] = s.torn;
  return d;
}

py::dict infoDict(const RingSlotInfo& i) {
  py::dict d;
  d["sequence"] = i.sequence;
  d["bytes"] = i.bytes;
  d["timestamp_ns"] = i.timestampNs;
  d["user"] = py::make_tuple(i.user[0], i.user[1], i.user[2], i.user[3]);
  return d;
}

// The numpy view of a slot's payload: the ring's array shape when it has
// one, else `bytes` uint8.
py::array slotView(const RingFormat& f, void* data, std::size_t bytes, std::shared_ptr<void> held, bool writable) {
  py::object base = py::cast(Lease{std::move(held)});
  py::array a;
  if (f.dtype) {
    const auto size = static_cast<py::ssize_t>(dtypeSize(*f.dtype));
    std::vector<py::ssize_t> shape(f.shape.begin(), f.shape.end());
    std::vector<py::ssize_t> strides(shape.size());
    py::ssize_t s = size;
    if (f.layout == Layout::RowMajor) {
      for (std::size_t k = shape.size(); k-- > 0;) strides[k] = s, s *= shape[k];
    } else {
      for (std::size_t k = 0; k < shape.size(); ++k) strides[k] = s, s *= shape[k];
    }
    a = py::array(numpyDtype(*f.dtype), shape, strides, data, base);
  } else {
    a = py::array(py::dtype("uint8"), {static_cast<py::ssize_t>(bytes)}, {1}, data, base);
  }
  if (!writable) a.attr("flags").attr("writeable") = false;
  return a;
}

template <class H>
void checkNoViews(const std::shared_ptr<H>& h, const char* what) {
  const long views = h.use_count() - 1;
  if (views > 0)
    throw Error(std::string(what) + "(): " + std::to_string(views) +
                " numpy view(s) of this slot still live; del them first (a view must not outlive its slot)");
}

struct PyWriteSlot {
  std::shared_ptr<Held<WriteSlot>> h;
  const RingFormat* format = nullptr;

  WriteSlot& slot() const {
    if (!h || !h->slot.valid()) throw Error("this slot was committed or abandoned already");
    checkIdle(*h->role);
    return h->slot;
  }
  void commit() {
    slot();
    checkNoViews(h, "commit");
    h->slot.commit();
    h.reset();
  }
  void abandon() {
    if (!h || !h->slot.valid()) return;
    checkIdle(*h->role);
    checkNoViews(h, "abandon");
    h->slot.abandon();
    h.reset();
  }
};

struct PyReadSlot {
  std::shared_ptr<Held<ReadSlot>> h;
  const RingFormat* format = nullptr;
  RingSlotInfo info{};
  std::uint32_t index = 0;

  ReadSlot& slot() const {
    if (!h || !h->slot.valid()) throw Error("this slot was released already");
    return h->slot;
  }
  void release() {
    if (!h || !h->slot.valid()) return;
    checkNoViews(h, "release");
    h.reset();  // ~Held releases it, or hands it to a wait in progress
  }
};

struct PyWriter {
  RingWriter w;
  std::shared_ptr<Role> role = std::make_shared<Role>(Role{false, {}, "ring writer"});
  RingWriter& idle() {
    checkIdle(*role);
    return w;
  }
  PyWriteSlot wrap(WriteSlot s) {
    return PyWriteSlot{std::make_shared<Held<WriteSlot>>(std::move(s), role), &w.format()};
  }
};
struct PyReader {
  RingReader r;
  std::shared_ptr<Role> role = std::make_shared<Role>(Role{false, {}, "ring reader"});
  RingReader& idle() {
    checkIdle(*role);
    return r;
  }
  PyReadSlot wrap(ReadSlot s) {
    PyReadSlot p;
    p.info = s.info();
    p.index = s.index();
    p.format = &r.format();
    p.h = std::make_shared<Held<ReadSlot>>(std::move(s), role);
    return p;
  }
};

RingPolicy policyFromName(const std::string& p) {
  for (RingPolicy r : {RingPolicy::Block, RingPolicy::DropOldest, RingPolicy::KeepLatest})
    if (p == ringPolicyName(r)) return r;
  throw forklift::TypeError("policy '" + p + "': block, drop-oldest or keep-latest");
}

RingBuffer createRing(std::size_t slots, std::optional<std::size_t> slotBytes,
                      std::optional<std::vector<std::int64_t>> shape, std::optional<std::string> dtype,
                      const std::string& policy, const std::string& name, const std::string& mode,
                      const std::string& order) {
  ShmName n = mode == "anonymous" ? ShmName(name)
              : mode == "named"   ? ShmName::named(name)
              : mode == "exact"   ? ShmName::exact(name)
                                  : throw forklift::TypeError("mode '" + mode + "': anonymous, named or exact");
  if (shape || dtype) {
    if (!shape || !dtype || slotBytes) throw forklift::TypeError("a ring of arrays takes shape and dtype, no slot_bytes");
    return RingBuffer::createArray(n, slots, dtypeFromName(*dtype), *shape, policyFromName(policy),
                                   layoutFromOrder(order));
  }
  if (!slotBytes) throw forklift::TypeError("a ring takes slot_bytes, or shape and dtype");
  return RingBuffer::create(n, slots, *slotBytes, policyFromName(policy));
}

}  // namespace

void registerRing(py::module_& m) {
  py::class_<Lease>(m, "_SlotLease", "Keeps a ring slot held while a numpy view of it lives.");

  py::class_<RingBuffer>(m, "Ring", "A single-producer, single-consumer ring of fixed slots in shared memory.")
      .def_static("create", &createRing, py::arg("slots"), py::arg("slot_bytes") = py::none(),
                  py::arg("shape") = py::none(), py::arg("dtype") = py::none(), py::arg("policy") = "block",
                  py::arg("name") = "", py::arg("mode") = "anonymous", py::arg("order") = "C")
      .def_static("open", [](const py::dict& d) { return RingBuffer::open(fromPython(d)); }, py::arg("descriptor"),
                  "Opens a ring from its describe() dict (made here or in C++).")
      .def("describe", [](const RingBuffer& r) { return toPython(r.describe()); })
      .def("writer", [](RingBuffer& r) { return PyWriter{r.writer()}; }, py::keep_alive<0, 1>(),
           "Attaches this process as the writer.")
      .def("reader", [](RingBuffer& r, std::size_t maxHeld) { return PyReader{r.reader(RingReaderOptions{maxHeld})}; },
           py::arg("max_held") = 1, py::keep_alive<0, 1>(), "Attaches this process as the reader.")
      .def("stats", [](const RingBuffer& r) { return statsDict(r.stats()); })
      .def_property_readonly("name", &RingBuffer::name)
      .def_property_readonly("slots", [](const RingBuffer& r) { return r.format().slots; })
      .def_property_readonly("slot_bytes", [](const RingBuffer& r) { return r.format().slotBytes; })
      .def_property_readonly("policy", [](const RingBuffer& r) { return ringPolicyName(r.format().policy); })
      .def_property_readonly("dtype", [](const RingBuffer& r) -> py::object {
        return r.format().dtype ? py::object(numpyDtype(*r.format().dtype)) : py::none();
      })
      .def_property_readonly("shape", [](const RingBuffer& r) {
        return py::tuple(py::cast(std::vector<std::int64_t>(r.format().shape)));
      })
      .def("__repr__", [](const RingBuffer& r) { return "forklift.Ring('" + r.name() + "', " + r.format().describe() + ")"; });

  py::class_<PyWriteSlot>(m, "WriteSlot", "A slot the writer holds; fill `array`, then commit() (or use `with`).")
      .def_property_readonly("array", [](const PyWriteSlot& s) {
        WriteSlot& w = s.slot();
        return slotView(*s.format, w.data(), w.capacity(), s.h, true);
      }, "A writable numpy view of the slot in place; its base keeps the slot held.")
      .def_property_readonly("sequence", [](const PyWriteSlot& s) { return s.slot().sequence(); })
      .def_property_readonly("capacity", [](const PyWriteSlot& s) { return s.slot().capacity(); })
      .def("set_bytes", [](PyWriteSlot& s, std::size_t n) { s.slot().setBytes(n); }, py::arg("n"))
      .def_property("timestamp_ns", [](const PyWriteSlot& s) { return s.slot().info().timestampNs; },
                    [](PyWriteSlot& s, std::int64_t ns) { s.slot().setTimestampNs(ns); })
      .def("set_user", [](PyWriteSlot& s, std::size_t i, std::int64_t v) { s.slot().setUser(i, v); },
           py::arg("i"), py::arg("value"))
      .def_property_readonly("user", [](const PyWriteSlot& s) {
        const auto& u = s.slot().info().user;
        return py::make_tuple(u[0], u[1], u[2], u[3]);
      })
      .def("commit", &PyWriteSlot::commit, "Publishes the slot to the reader.")
      .def("abandon", &PyWriteSlot::abandon, "Gives the slot back unpublished.")
      .def("__enter__", [](py::object self) { return self; })
      .def("__exit__", [](PyWriteSlot& s, py::object type, py::object, py::object) {
        if (!s.h || !s.h->slot.valid()) return;
        if (type.is_none()) s.commit();
        else s.abandon();
      });

  py::class_<PyReadSlot>(m, "ReadSlot", "A slot the reader holds; read `array` in place, then release() (or `with`).")
      .def_property_readonly("array", [](const PyReadSlot& s) {
        ReadSlot& r = s.slot();
        return slotView(*s.format, const_cast<std::byte*>(r.data()), r.bytes(), s.h, false);
      }, "A read-only numpy view of the slot in place; its base keeps the slot held.")
      .def_property_readonly("sequence", [](const PyReadSlot& s) { return s.info.sequence; })
      .def_property_readonly("bytes", [](const PyReadSlot& s) { return s.info.bytes; })
      .def_property_readonly("timestamp_ns", [](const PyReadSlot& s) { return s.info.timestampNs; })
      .def_property_readonly("user", [](const PyReadSlot& s) {
        return py::make_tuple(s.info.user[0], s.info.user[1], s.info.user[2], s.info.user[3]);
      })
      .def_property_readonly("index", [](const PyReadSlot& s) { return s.index; })
      .def("info", [](const PyReadSlot& s) { return infoDict(s.info); })
      .def("intact", [](const PyReadSlot& s) {
        ReadSlot& r = s.slot();
        checkIdle(*s.h->role);
        return r.intact();
      },
           "False when the writer reused the slot meanwhile (a drop policy).")
      .def("release", &PyReadSlot::release, "Gives the slot back to the writer.")
      .def("__enter__", [](py::object self) { return self; })
      .def("__exit__", [](PyReadSlot& s, py::object, py::object, py::object) { s.release(); });

  py::class_<PyWriter>(m, "RingWriter")
      .def("reserve", [](PyWriter& p, py::object timeout) {
        const Timeout t = toTimeout(timeout);
        std::optional<WriteSlot> got;
        const Busy busy(*p.role);
        const bool ok = waitInSlices(t, [&](Timeout slice) {
          try {
            got.emplace(p.w.reserve(slice));
            return true;
          } catch (const forklift::TimeoutError&) {
            return false;
          }
        });
        if (!ok) throw forklift::TimeoutError("reserve(): no free slot within the timeout (the reader holds them all)");
        return p.wrap(std::move(*got));
      }, py::arg("timeout") = py::none(), "A free slot; Block rings wait up to timeout seconds (None: forever).")
      .def("try_reserve", [](PyWriter& p) -> py::object {
        auto s = p.idle().tryReserve();
        if (!s) return py::none();
        return py::cast(p.wrap(std::move(*s)));
      })
      .def("push", [](PyWriter& p, py::buffer data, py::object timeout, std::vector<std::int64_t> user) {
        py::buffer_info b = data.request();
        py::ssize_t expect = b.itemsize;  // C-contiguous: each stride the size of what follows
        for (py::ssize_t k = b.ndim; k-- > 0;) {
          if (b.shape[k] > 1 && b.strides[k] != expect)
            throw forklift::TypeError("push(): the data is not C-contiguous (numpy.ascontiguousarray() it)");
          expect *= b.shape[k];
        }
        const std::span<const std::byte> bytes(static_cast<const std::byte*>(b.ptr),
                                               static_cast<std::size_t>(b.size * b.itemsize));
        const Timeout t = toTimeout(timeout);
        const Busy busy(*p.role);
        const bool ok = waitInSlices(t, [&](Timeout slice) {
          try {
            p.w.push(bytes, slice, user);
            return true;
          } catch (const forklift::TimeoutError&) {
            return false;
          }
        });
        if (!ok) throw forklift::TimeoutError("push(): no free slot within the timeout (the reader holds them all)");
      }, py::arg("data"), py::arg("timeout") = py::none(), py::arg("user") = std::vector<std::int64_t>{})
      .def("fileno", [](const PyWriter& p) { return p.w.fd(); }, "Readable when a blocked writer may retry.")
      .def("arm", [](PyWriter& p) { return p.idle().arm(); })
      .def("drain_doorbell", [](PyWriter& p) { p.idle().drainDoorbell(); })
      .def("reader_fd", [](PyWriter& p) { return p.idle().readerFd(); }, "The reader's pidfd; -1 while none attached.")
      .def("stats", [](PyWriter& p) { return statsDict(p.idle().stats()); });

  py::class_<PyReader>(m, "RingReader")
      .def("next", [](PyReader& p, py::object timeout) -> py::object {
        const Timeout t = toTimeout(timeout);
        std::optional<ReadSlot> got;
        const Busy busy(*p.role);
        waitInSlices(t, [&](Timeout slice) {
          got = p.r.next(slice);
          return got.has_value();
        });
        if (!got) return py::none();
        return py::cast(p.wrap(std::move(*got)));
      }, py::arg("timeout") = py::none(),
         "The next committed slot, waiting up to timeout seconds (None: forever); None when none came. "
         "ProcessDied / PeerClosed once drained and the writer is gone.")
      .def("try_next", [](PyReader& p) -> py::object {
        auto s = p.idle().tryNext();
        if (!s) return py::none();
        return py::cast(p.wrap(std::move(*s)));
      })
      .def_property_readonly("held", [](PyReader& p) { return p.idle().held() + p.role->deferred.size(); })
      .def_property_readonly("max_held", [](const PyReader& p) { return p.r.maxHeld(); })
      .def("fileno", [](const PyReader& p) { return p.r.fd(); },
           "The doorbell: readable when slots may wait. On readable: drain_doorbell(), try_next() until None, "
           "then arm(); False from arm() means a slot came meanwhile.")
      .def("arm", [](PyReader& p) { return p.idle().arm(); })
      .def("drain_doorbell", [](PyReader& p) { p.idle().drainDoorbell(); })
      .def("writer_fd", [](PyReader& p) { return p.idle().writerFd(); })
      .def("writer_gone", [](PyReader& p) { return p.idle().writerGone(); })
      .def("stats", [](PyReader& p) { return statsDict(p.idle().stats()); });
}

}  // namespace forklift::python
