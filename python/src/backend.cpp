// Python backends (issue 23, section 3, first part): forklift._PyProcess,
// the base of forklift.MessageProcess. Its backend is a fork of the
// interpreter that runs forklift's loop and dispatches each command to the
// Python subclass's c__<command> method, the fields as keyword arguments.
//
// The interpreter is forked as os.fork() forks it: start() keeps the GIL
// through the fork, between PyOS_BeforeFork() and PyOS_AfterFork_Parent(),
// and the child calls PyOS_AfterFork_Child() first thing (in preRun__), so
// its only thread owns the GIL from then on and every handler runs with it.
// forklift forks the main thread itself only (another thread's fork goes
// through forklift's forking thread, which has no Python thread state), so
// start() is refused from other threads; and forklift's rule stays: other
// running threads refuse the fork. In-process mode is refused (its backend
// thread would wait for the GIL the frontend holds in start()).
#include <cstdlib>
#include <cstring>
#include <functional>

#include "common.hpp"
#include "forklift/error.hpp"
#include "forklift/message.hpp"
#include "forklift/process.hpp"

namespace forklift::python {

namespace {

bool inProcessFromEnvironment() {
  const char* v = std::getenv("FORKLIFT_IN_PROCESS");
  if (!v || !*v) return false;
  for (const char* no : {"0", "false", "no", "off"})
    if (std::strcmp(v, no) == 0) return false;
  return true;
}

// "ValueError: text" of the Python exception being handled.
std::string describePythonError(py::error_already_set& e) {
  const std::string type = py::str(e.type().attr("__name__"));
  const std::string text = py::str(e.value());
  return text.empty() ? type : type + ": " + text;
}

// ProcessOptions from the keyword arguments of forklift.MessageProcess's
// constructor; a key it does not know is a forklift.TypeError naming them.
ProcessOptions optionsFrom(const py::dict& given) {
  ProcessOptions o;
  const auto seconds = [](py::handle v) { return toTimeout(py::reinterpret_borrow<py::object>(v)); };
  for (auto kv : given) {
    const std::string key = py::str(kv.first);
    if (key == "start_timeout") {
      o.startTimeout = seconds(kv.second);
    } else if (key == "call_timeout") {
      o.callTimeout = seconds(kv.second);
    } else if (key == "send_timeout") {
      o.sendTimeout = seconds(kv.second);
    } else if (key == "stop_timeout") {
      o.stopTimeout = seconds(kv.second);
    } else if (key == "allow_threads") {
      o.allowThreads = kv.second.cast<bool>();
    } else if (key == "ignore_sigint") {
      o.ignoreSigint = kv.second.cast<bool>();
    } else if (key == "transport") {
      const std::string t = py::str(kv.second);
      if (t != "shm" && t != "socket") throw forklift::TypeError("transport '" + t + "': 'shm' or 'socket'");
      o.transport = t == "shm" ? Transport::SharedMemory : Transport::Socket;
    } else {
      throw forklift::TypeError("option '" + key + "': the options are start_timeout, call_timeout, send_timeout, "
                                "stop_timeout (seconds), allow_threads, ignore_sigint and transport");
    }
  }
  return o;
}

class PyProcess : public MessageProcess {
 public:
  PyProcess(std::string name, const py::dict& options) : MessageProcess(std::move(name), optionsFrom(options)) {}
  ~PyProcess() override { stop(); }

  // Frontend, from the Python base class's __init__: the c__ methods of
  // the subclass. `self` is the Python object that owns this one.
  void registerCommands(const py::object& owner, const std::vector<std::string>& methods) {
    self_ = owner.ptr();  // borrowed: the Python object owns this C++ object
    for (const std::string& method : methods) {
      if (method.size() <= 3 || method.compare(0, 3, "c__") != 0)
        throw forklift::TypeError("'" + method + "' is not a c__<command> method");
      commandRaw(method.substr(3), [this, method](const Message& m) -> Value {
        py::gil_scoped_acquire gil;
        try {
          py::dict fields;
          for (const auto& kv : m.args()) fields[py::str(kv.first)] = toPython(kv.second);
          return fromPython(self().attr(method.c_str())(**fields));
        } catch (py::error_already_set& e) {
          throw Error(describePythonError(e));  // the frontend's RemoteError
        }
      });
    }
  }

  void startFromPython() {
    if (options().inProcess || inProcessFromEnvironment())
      throw Error(name() + ": a Python backend cannot run in-process (FORKLIFT_IN_PROCESS / inProcess)");
    const py::module_ threading = py::module_::import("threading");
    if (!threading.attr("current_thread")().is(threading.attr("main_thread")()))
      throw Error(name() + ": a Python backend starts from the main thread (forklift forks other threads' "
                           "backends from a thread of its own, where the interpreter cannot run)");
    PyOS_BeforeFork();
    try {
      start();
    } catch (...) {
      PyOS_AfterFork_Parent();
      throw;
    }
    PyOS_AfterFork_Parent();
  }

  // Backend: timers on its loop running Python callables. An exception of
  // the callable is logged (as any timer's) and the loop goes on.
  std::uint64_t afterFromPython(const py::object& seconds, const py::function& fn) {
    return after__(toTimeout(seconds), pythonCallback(fn));
  }
  std::uint64_t everyFromPython(const py::object& seconds, const py::function& fn) {
    return every__(toTimeout(seconds), pythonCallback(fn));
  }
  void cancelFromPython(std::uint64_t id) { cancel__(id); }
  void stopLoopFromPython() { stopLoop__(); }

  // Backend: a message to the frontend's recv().
  void sendOutFromPython(const std::string& command, const py::kwargs& fields) {
    Value v = fromPython(fields);
    sendOut__(Message(command, std::move(*v.getIf<Map>())));
  }

 protected:
  void preRun__() override {
    PyOS_AfterFork_Child();  // this thread holds the GIL from here on
    callHook("preRun__");
  }
  void postRun__() override {
    callHook("postRun__");
    // The backend leaves with _exit: what Python buffered is written now.
    py::gil_scoped_acquire gil;
    for (const char* stream : {"stdout", "stderr"}) {
      try {
        py::module_::import("sys").attr(stream).attr("flush")();
      } catch (py::error_already_set&) {
      }
    }
  }

 private:
  py::object self() const { return py::reinterpret_borrow<py::object>(self_); }
  // The callable runs with the GIL (the backend's thread holds it anyway).
  static std::function<void()> pythonCallback(const py::function& fn) {
    return [fn]() {
      py::gil_scoped_acquire gil;
      try {
        fn();
      } catch (py::error_already_set& e) {
        throw Error(describePythonError(e));
      }
    };
  }
  void callHook(const char* name) {
    py::gil_scoped_acquire gil;
    if (!self_ || !py::hasattr(self(), name)) return;
    try {
      self().attr(name)();
    } catch (py::error_already_set& e) {
      throw Error(std::string(name) + ": " + describePythonError(e));
    }
  }

  PyObject* self_ = nullptr;
};

}  // namespace

void registerBackend(py::module_& m) {
  auto c = impl::bindProcessWith<PyProcess, std::string, py::dict>(m, "_PyProcess", m);
  c.def("_register_commands", &PyProcess::registerCommands, py::arg("self"), py::arg("methods"));
  // Replaces bindProcess's start(), which releases the GIL through the fork.
  c.attr("start") = py::cpp_function(
      [](PyProcess& p) {
        p.startFromPython();
        const std::lock_guard<std::mutex> g(impl::running().lock);
        impl::running().processes.insert(&p);
      },
      py::name("start"), py::is_method(c), "Forks the interpreter; returns once the backend's preRun__ is done.");
  c.attr("__enter__") = py::cpp_function(
      [](py::object self) {
        PyProcess& p = self.cast<PyProcess&>();
        if (!p.started()) {
          p.startFromPython();
          const std::lock_guard<std::mutex> g(impl::running().lock);
          impl::running().processes.insert(&p);
        }
        return self;
      },
      py::name("__enter__"), py::is_method(c));
  c.def("sendOut__", &PyProcess::sendOutFromPython, py::arg("command"),
        "Backend side: sends (command, fields) to the frontend's recv().")
      .def("after__", &PyProcess::afterFromPython, py::arg("seconds"), py::arg("fn"),
           "Backend side: runs fn() once after `seconds` on the backend's loop; returns the timer's id.")
      .def("every__", &PyProcess::everyFromPython, py::arg("seconds"), py::arg("fn"),
           "Backend side: runs fn() every `seconds` (at least 1 ms); returns the timer's id.")
      .def("cancel__", &PyProcess::cancelFromPython, py::arg("timer"), "Backend side: cancels a timer.")
      .def("stopLoop__", &PyProcess::stopLoopFromPython,
           "Backend side: ends the loop after the current handler, as a stop request would.");
}

}  // namespace forklift::python
