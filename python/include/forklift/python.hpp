// forklift - python.hpp: a C++ MessageProcess as a Python class, in one line
//
// In a user's pybind11 module:
//
//   #include <forklift/python.hpp>
//   PYBIND11_MODULE(mymod, m) {
//     forklift::python::bindProcess<Camera, std::string, int>(m, "Camera");  // Camera(std::string, int)
//   }
//
// and in Python:
//
//   cam = mymod.Camera("cam0", 25)
//   cam.start()
//   cam.call("set_fps", fps=25, timeout=1.0)   # keyword arguments: the Message's named fields
//   cam.send("grab", n=3)                       # fire and forget; a failure comes back from recv()
//   f = cam.call_async("set_fps", fps=30)       # forklift.CallFuture: f.result(timeout), f.done()
//   cam.recv(timeout=1.0)                       # (command, {fields}) sent by sendOut__, None when none came
//   cam.fileno()                                # readable while a message waits: selectors, asyncio
//   status = cam.stop()                         # forklift.ExitStatus: how the backend ended
//   with mymod.Camera("cam1", 25) as cam: ...   # starts it (if not started), stops it on leaving
//
// The template arguments after the class are its constructor's parameter
// types (none: a constructor from one std::string, the name). The returned
// pybind11 class_ takes more .def()s for the class's own frontend methods.
//
// Values: None, bool, int (int64), float, str, bytes, list (and tuple),
// dict with str keys, numpy arrays of forklift's eleven dtypes (copied into
// the message as a forklift Array; they come back as numpy arrays), numpy
// scalars, forklift.Fd (a descriptor travelling with the message). A numpy
// array that is a whole view of a forklift shared-memory array
// (forklift.create) travels as its descriptor instead, a dict the handler
// opens with ShmTensor<T, N>::open(msg.get<Value>(name)): no copy. Anything
// else raises forklift.TypeError, and nothing is sent.
//
// Errors are forklift's own Python classes (the module `forklift` is
// imported when the class is bound): forklift.RemoteError with the
// backend's message (CommandError from recv() for a failed send()),
// forklift.TimeoutError (a builtin TimeoutError too), forklift.ProcessDied
// (a PeerClosed) when the backend died, with the backend's forklift.ExitStatus
// in its `status` attribute (from the object's methods and its futures),
// forklift.Error for a misuse.
//
// Waits (call, result, recv, stop, wait_stop) release the GIL and wait in
// slices of at most 50 ms, checking signals between them: Ctrl-C raises
// KeyboardInterrupt promptly, and the call in progress is forgotten (its
// late reply is dropped). start() and send() release the GIL too, but end
// only at their own timeouts (ProcessOptions::startTimeout, sendTimeout).
//
// Lifetime: the backend is stopped when the Python object is collected
// (with the GIL released), and at interpreter exit (atexit) for every object
// of the module still running; it also dies with the process (forklift's
// PR_SET_PDEATHSIG), so nothing outlives the interpreter.
//
// Forking: start() forks the interpreter's process, and the child runs only
// C++: forklift's loop and the class's handlers. It resets the signal
// handlers, never touches the interpreter, its locks or its objects, and
// leaves with _exit, so Python's at-fork hooks (PyOS_BeforeFork,
// os.register_at_fork) are not run and not needed. forklift's rule stays:
// start() raises forklift.Error when other threads run (a Python thread,
// an OpenBLAS pool of numpy in some installations) unless the class sets
// ProcessOptions::allowThreads (sound when the handlers use no lock those
// threads may hold) or a forklift::ForkServer started first.
//
// Build: link forklift and pybind11 (pkg-config forklift; the same pybind11
// as forklift's module, whose classes forklift.Fd, CallFuture and ExitStatus
// this module's objects are made of). Everything here is inline.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "forklift/call_future.hpp"
#include "forklift/error.hpp"
#include "forklift/exit_status.hpp"
#include "forklift/message.hpp"
#include "forklift/process.hpp"
#include "forklift/shm.hpp"
#include "forklift/timeout.hpp"
#include "forklift/value.hpp"

// Hidden, as pybind11's own namespace: each extension module has its own
// copy of what is here (its error classes, its running processes).
namespace forklift {
namespace python __attribute__((visibility("hidden"))) {

namespace py = pybind11;

// ---------------------------------------------------------------- values

// The DType of a numpy dtype name ("uint8", "float16", ...); a
// forklift.TypeError naming the ones there are otherwise.
inline DType dtypeFromName(const std::string& name) {
  static constexpr std::array<DType, 11> kAll{DType::I8,  DType::U8,  DType::I16, DType::U16, DType::I32, DType::U32,
                                              DType::I64, DType::U64, DType::F32, DType::F64, DType::F16};
  std::string known;
  for (DType t : kAll) {
    if (name == dtypeName(t)) return t;
    known += (known.empty() ? "" : ", ") + std::string(dtypeName(t));
  }
  throw forklift::TypeError("dtype '" + name + "' cannot live in shared memory: forklift arrays hold " + known +
                            " (in native byte order)");
}

// The numpy dtype of a DType.
inline py::dtype numpyDtype(DType t) { return py::dtype(std::string(dtypeName(t))); }

// A Python timeout (None: forever; seconds as a float; inf: forever) as
// forklift's. Zero or negative: no wait.
inline Timeout toTimeout(const py::object& seconds) {
  if (seconds.is_none()) return kForever;
  const double s = seconds.cast<double>();
  if (std::isnan(s)) throw forklift::TypeError("timeout is NaN");
  if (s <= 0) return Timeout::zero();
  const double ms = std::ceil(s * 1000.0);
  if (ms >= static_cast<double>(std::numeric_limits<Timeout::rep>::max() / 2)) return kForever;
  return Timeout(static_cast<Timeout::rep>(ms));
}

// Value -> Python. Maps become dicts, lists lists, Arrays numpy arrays (a
// copy), an Fd a forklift.Fd (which owns its descriptor).
inline py::object toPython(const Value& v) {
  switch (v.kind()) {
    case Value::Kind::Nil: return py::none();
    case Value::Kind::Bool: return py::bool_(*v.getIf<bool>());
    case Value::Kind::Int: return py::int_(*v.getIf<std::int64_t>());
    case Value::Kind::Double: return py::float_(*v.getIf<double>());
    case Value::Kind::String: return py::str(*v.getIf<std::string>());
    case Value::Kind::Bytes: {
      const Bytes& b = *v.getIf<Bytes>();
      return py::bytes(reinterpret_cast<const char*>(b.data()), b.size());
    }
    case Value::Kind::List: {
      py::list l;
      for (const Value& e : *v.getIf<List>()) l.append(toPython(e));
      return l;
    }
    case Value::Kind::Map: {
      py::dict d;
      for (const auto& kv : *v.getIf<Map>()) d[py::str(kv.first)] = toPython(kv.second);
      return d;
    }
    case Value::Kind::Array: {
      const Array& a = *v.getIf<Array>();
      py::array out(numpyDtype(a.dtype()), std::vector<py::ssize_t>(a.shape().begin(), a.shape().end()));
      if (!a.data().empty()) std::memcpy(out.mutable_data(), a.data().data(), a.data().size());
      return out;
    }
    case Value::Kind::Fd: return py::cast(*v.getIf<Fd>());
  }
  throw forklift::TypeError("a value of unknown kind");
}

namespace impl {
inline bool isFdKey(const std::string& key) { return key == "fd" || key == "readerBell" || key == "writerBell"; }

// The forklift.Segment under a numpy array when the array is the whole
// segment, as Segment.array() makes it; None otherwise (a slice, a copy).
inline py::object wholeSegmentOf(const py::array& a) {
  // A strong reference never released: the class lives as long as the interpreter.
  static PyObject* type = py::object(py::module_::import("forklift._forklift").attr("Segment")).release().ptr();
  const auto segmentType = py::reinterpret_borrow<py::object>(type);
  py::object obj = py::reinterpret_borrow<py::object>(a);
  while (!obj.is_none() && !py::isinstance(obj, segmentType)) {
    if (!py::hasattr(obj, "base")) return py::none();
    obj = obj.attr("base");
  }
  if (obj.is_none()) return py::none();
  const auto whole = obj.attr("array")().cast<py::array>();
  if (whole.data() != a.data() || whole.ndim() != a.ndim()) return py::none();
  for (py::ssize_t i = 0; i < a.ndim(); ++i)
    if (whole.shape(i) != a.shape(i) || whole.strides(i) != a.strides(i)) return py::none();
  return obj;
}
}  // namespace impl

// Python -> Value. A forklift.Fd is shared; an int under the key "fd",
// "readerBell" or "writerBell" is duplicated (the caller keeps its own
// descriptor). With `shmAsDescriptor`, a numpy array that is a whole
// forklift shared-memory array becomes its descriptor (a Map), not a copy.
// Anything else unknown is a forklift.TypeError naming the field.
inline Value fromPython(py::handle o, const std::string& key = {}, bool shmAsDescriptor = false) {
  const std::string where = key.empty() ? std::string("a value") : "field '" + key + "'";
  if (o.is_none()) return Value();
  if (py::isinstance<Fd>(o)) return Value(o.cast<Fd>());
  if (py::isinstance<py::bool_>(o)) return Value(o.cast<bool>());
  if (py::isinstance<py::int_>(o)) {
    if (impl::isFdKey(key)) return Value(Fd::dup(o.cast<int>()));
    int overflow = 0;
    const long long i = PyLong_AsLongLongAndOverflow(o.ptr(), &overflow);
    if (overflow != 0) throw forklift::TypeError(where + ": integer does not fit int64");
    if (i == -1 && PyErr_Occurred()) throw py::error_already_set();
    return Value(static_cast<std::int64_t>(i));
  }
  if (py::isinstance<py::float_>(o)) return Value(o.cast<double>());
  if (py::isinstance<py::str>(o)) return Value(o.cast<std::string>());
  if (py::isinstance<py::bytes>(o)) {
    const std::string s = o.cast<std::string>();
    return Value(Bytes(s.begin(), s.end()));
  }
  if (py::isinstance<py::dict>(o)) {
    Map m;
    for (auto kv : py::reinterpret_borrow<py::dict>(o)) {
      if (!py::isinstance<py::str>(kv.first)) throw forklift::TypeError(where + ": a map key is not a str");
      std::string name = kv.first.cast<std::string>();
      Value e = fromPython(kv.second, name, shmAsDescriptor);
      m.emplace_back(std::move(name), std::move(e));
    }
    return Value(std::move(m));
  }
  if (py::isinstance<py::list>(o) || py::isinstance<py::tuple>(o)) {
    List l;
    for (py::handle e : o) l.push_back(fromPython(e, key, shmAsDescriptor));
    return Value(std::move(l));
  }
  if (py::isinstance<py::array>(o)) {
    if (shmAsDescriptor) {
      py::object seg = impl::wholeSegmentOf(py::reinterpret_borrow<py::array>(o));
      if (!seg.is_none()) return fromPython(seg.attr("describe")(), key);
    }
    auto a = py::array::ensure(o, py::array::c_style);
    const std::string dtype = py::str(a.dtype().attr("name")).cast<std::string>();
    DType t{};
    try {
      t = dtypeFromName(dtype);
    } catch (const forklift::TypeError& e) {
      throw forklift::TypeError(where + ": a numpy array of " + e.what());
    }
    std::vector<std::int64_t> shape(a.shape(), a.shape() + a.ndim());
    const auto* p = static_cast<const std::uint8_t*>(a.data());
    return Value(Array(t, std::move(shape), Bytes(p, p + a.nbytes())));
  }
  // numpy scalars (numpy.int64(3), numpy.float32(1.5)) as the Python number.
  if (py::hasattr(o, "dtype") && py::hasattr(o, "item")) return fromPython(o.attr("item")(), key, shmAsDescriptor);
  throw forklift::TypeError(where + ": a Python " + std::string(py::str(o.get_type().attr("__name__"))) +
                            " has no forklift value");
}

// Runs `wait(slice)` with the GIL released in slices of at most 50 ms until
// it returns true or `timeout` ran out, checking signals between slices (a
// Ctrl-C raises KeyboardInterrupt). False when the time ran out.
template <class F>
bool waitInSlices(Timeout timeout, F&& wait) {
  const Deadline deadline(timeout);
  for (;;) {
    const auto left = std::chrono::duration_cast<Timeout>(deadline.remaining());
    const Timeout slice = deadline.forever() ? Timeout(50) : std::min(left, Timeout(50));
    bool done = false;
    {
      py::gil_scoped_release nogil;
      done = wait(slice);
    }
    if (done) return true;
    if (PyErr_CheckSignals() != 0) throw py::error_already_set();
    if (deadline.expired()) return false;
  }
}

// ---------------------------------------------------------------- errors

namespace impl {
// forklift's exception classes, as the module forklift._forklift made them.
struct ErrorClasses {
  py::object error, system, type, decode, streamCorrupt, limit, timeout, peerClosed, processDied, remote, command,
      shmName, shmFormat;
};
inline ErrorClasses& errorClasses() {
  // Never destroyed: a py::object must not be released after the interpreter.
  static ErrorClasses* c = new ErrorClasses;
  return *c;
}

// Raises `cls(*args)` with the attributes given.
inline void raise(const py::object& cls, const py::tuple& args,
                  std::initializer_list<std::pair<const char*, py::object>> attrs = {}) {
  py::object inst = cls(*args);
  for (const auto& kv : attrs) inst.attr(kv.first) = kv.second;
  PyErr_SetObject(cls.ptr(), inst.ptr());
}

// The most derived class first, so a PeerClosed never becomes a plain Error.
inline void translate(std::exception_ptr p) {
  const ErrorClasses& c = errorClasses();
  try {
    std::rethrow_exception(p);
  } catch (const SystemError& e) {
    raise(c.system, py::make_tuple(e.code().value(), e.what()));
  } catch (const forklift::TypeError& e) {
    raise(c.type, py::make_tuple(e.what()));
  } catch (const StreamCorrupt& e) {
    raise(c.streamCorrupt, py::make_tuple(e.what()), {{"command", py::str(e.command())}, {"id", py::int_(e.id())}});
  } catch (const DecodeError& e) {
    raise(c.decode, py::make_tuple(e.what()), {{"command", py::str(e.command())}, {"id", py::int_(e.id())}});
  } catch (const LimitError& e) {
    raise(c.limit, py::make_tuple(e.what()), {{"command", py::str(e.command())}, {"id", py::int_(e.id())}});
  } catch (const forklift::TimeoutError& e) {
    raise(c.timeout, py::make_tuple(e.what()));
  } catch (const ProcessDied& e) {
    raise(c.processDied, py::make_tuple(e.what()), {{"status", py::none()}});
  } catch (const PeerClosed& e) {
    raise(c.peerClosed, py::make_tuple(e.what()));
  } catch (const CommandError& e) {
    raise(c.command, py::make_tuple(e.what()), {{"command", py::str(e.command())}});
  } catch (const RemoteError& e) {
    raise(c.remote, py::make_tuple(e.what()));
  } catch (const ShmNameError& e) {
    raise(c.shmName, py::make_tuple(e.what()));
  } catch (const ShmFormatError& e) {
    raise(c.shmFormat, py::make_tuple(e.what()));
  } catch (const Error& e) {
    raise(c.error, py::make_tuple(e.what()));
  }
  // Anything else goes on to pybind11's own translators.
}
}  // namespace impl

// Makes this module raise forklift's exception classes, the ones `forklift`
// (the module given: forklift._forklift) holds, for forklift's C++
// exceptions thrown by anything this module binds.
inline void useForkliftErrors(const py::module_& forklift) {
  impl::ErrorClasses& c = impl::errorClasses();
  if (!c.error) {
    c.error = forklift.attr("Error");
    c.system = forklift.attr("SystemError");
    c.type = forklift.attr("TypeError");
    c.decode = forklift.attr("DecodeError");
    c.streamCorrupt = forklift.attr("StreamCorrupt");
    c.limit = forklift.attr("LimitError");
    c.timeout = forklift.attr("TimeoutError");
    c.peerClosed = forklift.attr("PeerClosed");
    c.processDied = forklift.attr("ProcessDied");
    c.remote = forklift.attr("RemoteError");
    c.command = forklift.attr("CommandError");
    c.shmName = forklift.attr("ShmNameError");
    c.shmFormat = forklift.attr("ShmFormatError");
    py::register_local_exception_translator(impl::translate);
  }
}

// ---------------------------------------------------------------- processes

// A call's future in Python (forklift.CallFuture): result(timeout) waits
// with the GIL released, in slices (Ctrl-C gets through); done() never
// blocks. Safe from several threads (one waits at a time). It keeps its
// process object alive.
struct PyCallFuture {
  PyCallFuture(CallFuture f, py::object process)
      : future(std::make_shared<CallFuture>(std::move(f))), owner(std::move(process)) {}
  std::shared_ptr<CallFuture> future;
  std::shared_ptr<std::mutex> lock = std::make_shared<std::mutex>();
  py::object owner;  // the Python process object: its wait_stop() gives a ProcessDied its status

  bool done() {
    py::gil_scoped_release nogil;
    const std::lock_guard<std::mutex> g(*lock);
    return future->ready();
  }
  // None: until the call's own timeout. Raises forklift.TimeoutError when
  // `timeout` ran out first (the call goes on: result() may be asked again).
  py::object result(const py::object& timeout) {
    const bool ready = waitInSlices(toTimeout(timeout), [this](Timeout slice) {
      const std::unique_lock<std::mutex> g(*lock, std::try_to_lock);
      if (!g.owns_lock()) {  // another thread waits: take turns
        std::this_thread::sleep_for(std::min(slice, Timeout(1)));
        return false;
      }
      return future->wait(slice);
    });
    if (!ready) throw forklift::TimeoutError("CallFuture.result(): no reply within the timeout given");
    CallResult r;
    {
      py::gil_scoped_release nogil;
      const std::lock_guard<std::mutex> g(*lock);
      r = future->result();
    }
    if (r.kind() == CallResult::Kind::ProcessDied && !owner.is_none()) {
      py::object status = owner.attr("wait_stop")(0.5);  // it died: its status is there or about to be
      impl::raise(impl::errorClasses().processDied, py::make_tuple(r.what()), {{"status", status}});
      throw py::error_already_set();
    }
    return toPython(r.get());  // or throws what call() would have thrown
  }
};

namespace impl {
// Every started process of this module, stopped at interpreter exit.
struct Running {
  std::mutex lock;
  std::set<MessageProcess*> processes;
};
inline Running& running() {
  static Running* r = new Running;  // lives as long as the process: atexit may run late
  return *r;
}

inline void stopAllAtExit() {
  std::vector<MessageProcess*> all;
  {
    const std::lock_guard<std::mutex> g(running().lock);
    all.assign(running().processes.begin(), running().processes.end());
  }
  if (all.empty()) return;
  py::gil_scoped_release nogil;
  Timeout longest = Timeout::zero();
  for (MessageProcess* p : all) longest = std::max(longest, p->options().stopTimeout);
  MessageProcess::stopAll(all, longest);
}

// Deletes a process with the GIL released: its destructor stops the backend
// and may wait up to its stop timeout.
struct ReleasingDelete {
  void operator()(MessageProcess* p) const {
    {
      const std::lock_guard<std::mutex> g(running().lock);
      running().processes.erase(p);
    }
    if (Py_IsInitialized() != 0 && PyGILState_Check() != 0) {
      py::gil_scoped_release nogil;
      delete p;
    } else {
      delete p;
    }
  }
};

// A message's fields: the dict `args` (None: none) and the keyword arguments.
inline Map messageArgs(const py::object& args, const py::kwargs& fields) {
  py::dict all;
  if (!args.is_none()) {
    if (!py::isinstance<py::dict>(args)) throw forklift::TypeError("args: a dict of the message's fields");
    all.attr("update")(args);
  }
  for (auto kv : fields) {
    if (all.contains(kv.first))
      throw forklift::TypeError("field '" + kv.first.cast<std::string>() + "' given twice (in args and by keyword)");
    all[kv.first] = kv.second;
  }
  return std::move(*fromPython(all, {}, true).getIf<Map>());
}

inline Timeout optionOr(const py::object& timeout, Timeout fallback) {
  return timeout.is_none() ? fallback : toTimeout(timeout);
}

// Runs `f` and raises a ProcessDied from it with the backend's status.
template <class F>
auto withStatus(MessageProcess& p, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const ProcessDied& e) {
    ExitStatus s;
    {
      py::gil_scoped_release nogil;
      s = p.waitStop(std::chrono::milliseconds(500));  // it died: its status is there or about to be
    }
    raise(errorClasses().processDied, py::make_tuple(e.what()), {{"status", py::cast(s)}});
    throw py::error_already_set();
  }
}
}  // namespace impl

// Binds the MessageProcess subclass P as the Python class `name` of module
// `m`, constructed from CtorArgs (none: from one std::string). See the top
// of this header for what the Python class does.
template <class P, class... CtorArgs>
py::class_<P, std::unique_ptr<P, impl::ReleasingDelete>> bindProcess(py::module_& m, const char* name);

namespace impl {
// bindProcess, with forklift's module given (forklift._forklift binds its
// own classes while it is being imported).
template <class P, class... CtorArgs>
py::class_<P, std::unique_ptr<P, ReleasingDelete>> bindProcessWith(py::module_& m, const char* name,
                                                                   const py::module_& fk) {
  static_assert(std::is_base_of_v<MessageProcess, P>, "bindProcess<P>: P is a forklift::MessageProcess subclass");
  using Class = py::class_<P, std::unique_ptr<P, ReleasingDelete>>;
  useForkliftErrors(fk);
  static bool atExit = false;  // once per module
  if (!atExit) {
    atExit = true;
    py::module_::import("atexit").attr("register")(py::cpp_function(&impl::stopAllAtExit));
  }
  Class c(m, name);
  if constexpr (sizeof...(CtorArgs) == 0) {
    static_assert(std::is_constructible_v<P, std::string>,
                  "bindProcess<P>: P has no constructor from a std::string; list its constructor's parameter types: "
                  "bindProcess<P, Args...>");
    c.def(py::init<std::string>(), py::arg("name"));
  } else {
    c.def(py::init<CtorArgs...>());
  }
  c.def(
       "start",
       [](P& p) {
         {
           py::gil_scoped_release nogil;
           p.start();
         }
         const std::lock_guard<std::mutex> g(impl::running().lock);
         impl::running().processes.insert(&p);
       },
       "Forks the backend; returns once it is ready (after preRun__).")
      .def(
          "call",
          [](P& p, const std::string& command, const py::object& args, const py::object& timeout,
             const py::kwargs& fields) {
            Map a = impl::messageArgs(args, fields);
            const Timeout t = impl::optionOr(timeout, p.options().callTimeout);
            return impl::withStatus(p, [&] {
              CallFuture f = p.callAsync(command, std::move(a), t);
              waitInSlices(kForever, [&f](Timeout slice) { return f.wait(slice); });
              CallResult r;
              {
                py::gil_scoped_release nogil;
                r = f.result();
              }
              return toPython(r.get());
            });
          },
          py::arg("command"), py::arg("args") = py::none(), py::arg("timeout") = py::none(),
          "Runs c__<command> in the backend with the keyword arguments as its fields and returns its result. "
          "timeout: seconds (None: the class's ProcessOptions::callTimeout).")
      .def(
          "call_async",
          [](const py::object& self, const std::string& command, const py::object& args, const py::object& timeout,
             const py::kwargs& fields) {
            P& p = self.cast<P&>();
            Map a = impl::messageArgs(args, fields);
            const Timeout t = impl::optionOr(timeout, p.options().callTimeout);
            return PyCallFuture(p.callAsync(command, std::move(a), t), self);
          },
          py::arg("command"), py::arg("args") = py::none(), py::arg("timeout") = py::none(),
          "The same call without waiting: a forklift.CallFuture (result(timeout), done()).")
      .def(
          "send",
          [](P& p, const std::string& command, const py::object& args, const py::kwargs& fields) {
            Map a = impl::messageArgs(args, fields);
            impl::withStatus(p, [&] {
              py::gil_scoped_release nogil;
              p.send(command, std::move(a));
            });
          },
          py::arg("command"), py::arg("args") = py::none(),
          "Fire and forget; a failure in the backend comes back from recv() as forklift.CommandError.")
      .def(
          "recv",
          [](P& p, const py::object& timeout) -> py::object {
            std::optional<Message> msg;
            impl::withStatus(p, [&] {
              waitInSlices(toTimeout(timeout), [&](Timeout slice) {
                msg = p.recv(slice);
                return msg.has_value();
              });
            });
            if (!msg) return py::none();
            return py::make_tuple(msg->command(), toPython(Value(std::move(msg->args()))));
          },
          py::arg("timeout") = py::none(),
          "The next message the backend sent with sendOut__, as (command, fields); None when none came within "
          "timeout (None: wait until one comes or the backend ends).")
      .def(
          "fileno",
          [](P& p) {
            const int fd = p.fd();
            if (fd < 0) throw Error(p.name() + ": fileno() before start()");
            return fd;
          },
          "Readable exactly while a message from sendOut__ waits (for selectors, poll, asyncio's add_reader).")
      .def(
          "stop",
          [](P& p, const py::object& timeout) {
            const Timeout t = impl::optionOr(timeout, p.options().stopTimeout);
            p.requestStop();
            waitInSlices(t, [&p](Timeout slice) {
              const ExitStatus s = p.waitStop(slice);
              return s.ended() || s.how == ExitStatus::How::NotStarted;
            });
            py::gil_scoped_release nogil;
            return p.stop(Timeout::zero());  // past the timeout: SIGTERM, then SIGKILL
          },
          py::arg("timeout") = py::none(),
          "Asks the backend to stop, waits up to timeout (None: ProcessOptions::stopTimeout), then SIGTERM, "
          "500 ms, SIGKILL. Returns how it ended (forklift.ExitStatus); again: the same status.")
      .def("request_stop", [](P& p) { p.requestStop(); }, "Asks the backend to stop; does not wait.")
      .def(
          "wait_stop",
          [](P& p, const py::object& timeout) {
            ExitStatus s;
            waitInSlices(toTimeout(timeout), [&](Timeout slice) {
              s = p.waitStop(slice);
              return s.ended() || s.how == ExitStatus::How::NotStarted;
            });
            return s;
          },
          py::arg("timeout") = py::none(), "Waits for the backend to end; its status (how='running' if not yet).")
      .def("signal", [](P& p, int sig) { p.signal(sig); }, py::arg("signal"), "Sends a signal to the backend.")
      .def("ignore_sigint", [](P& p) { p.ignoreSigint(); },
           "Before start(): the backend ignores SIGINT (Ctrl-C reaches only this process, which stops it).")
      .def_property_readonly("pid", [](const P& p) { return p.pid(); }, "The backend's pid (-1 before start).")
      .def_property_readonly("alive", [](const P& p) { return p.isAlive(); })
      .def_property_readonly("started", [](const P& p) { return p.started(); })
      .def_property_readonly("name", [](const P& p) { return p.name(); })
      .def_property_readonly("full_name", [](const P& p) { return p.fullName(); })
      .def("death_fileno", [](const P& p) { return p.deathFd(); },
           "Readable once the backend has ended (its pidfd); -1 before start.")
      .def("__enter__",
           [](py::object self) {
             P& p = self.cast<P&>();
             if (!p.started()) {
               py::gil_scoped_release nogil;
               p.start();
             }
             if (p.started()) {
               const std::lock_guard<std::mutex> g(impl::running().lock);
               impl::running().processes.insert(&p);
             }
             return self;
           })
      .def("__exit__",
           [](P& p, const py::args&) {
             py::gil_scoped_release nogil;
             p.stop();
           })
      .def("__repr__", [](const P& p) {
        std::string state = !p.started() ? "not started" : p.isAlive() ? "pid " + std::to_string(p.pid()) : "ended";
        return "<" + (p.fullName().empty() ? p.name() : p.fullName()) + ": " + state + ">";
      });
  return c;
}
}  // namespace impl

template <class P, class... CtorArgs>
py::class_<P, std::unique_ptr<P, impl::ReleasingDelete>> bindProcess(py::module_& m, const char* name) {
  return impl::bindProcessWith<P, CtorArgs...>(m, name, py::module_::import("forklift._forklift"));
}

// Registers forklift.CallFuture and forklift.ExitStatus in forklift's own
// module (forklift._forklift calls it; a user module never does).
inline void registerProcessTypes(py::module_& m) {
  py::class_<PyCallFuture>(m, "CallFuture", "The reply of a call_async(), to come.")
      .def("result", &PyCallFuture::result, py::arg("timeout") = py::none(),
           "The call's result, or raises what call() would have. timeout: seconds to wait (None: up to the call's "
           "own timeout); forklift.TimeoutError when it ran out first.")
      .def("done", &PyCallFuture::done, "True once the reply (or the error) is there; never blocks.");
  py::class_<ExitStatus>(m, "ExitStatus", "How a backend ended.")
      .def_property_readonly("how",
                             [](const ExitStatus& s) {
                               switch (s.how) {
                                 case ExitStatus::How::Running: return "running";
                                 case ExitStatus::How::Exited: return "exited";
                                 case ExitStatus::How::Signaled: return "signaled";
                                 case ExitStatus::How::Abandoned: return "abandoned";
                                 case ExitStatus::How::NotStarted: return "not started";
                                 case ExitStatus::How::Unknown: return "unknown";
                               }
                               return "unknown";
                             })
      .def_readonly("code", &ExitStatus::code, "The exit code when how == 'exited'.")
      .def_readonly("signal", &ExitStatus::signal, "The signal when how == 'signaled'.")
      .def_readonly("escalation", &ExitStatus::escalation, "1: it took a SIGTERM, 2: a SIGKILL.")
      .def_property_readonly("ok", &ExitStatus::ok, "Exited with code 0.")
      .def_property_readonly("ended", &ExitStatus::ended)
      .def("__str__", &ExitStatus::describe)
      .def("__repr__", [](const ExitStatus& s) { return "<forklift.ExitStatus: " + s.describe() + ">"; });
}

}  // namespace python
}  // namespace forklift
