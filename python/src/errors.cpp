// forklift's exceptions (include/forklift/error.hpp, shm.hpp) as Python
// classes of the same names, under forklift.Error. Where a builtin means the
// same thing the class derives from it too: forklift.TimeoutError is a
// builtin TimeoutError, forklift.SystemError an OSError (errno, strerror
// set), forklift.TypeError a builtin TypeError, forklift.ShmNameError a
// ValueError. The translator is local to this module and catches the most
// derived class first, so a PeerClosed never becomes a plain Error.
#include <cstring>

#include "common.hpp"
#include "forklift/error.hpp"

namespace forklift::python {

namespace {

struct Classes {
  PyObject* error = nullptr;
  PyObject* system = nullptr;
  PyObject* type = nullptr;
  PyObject* decode = nullptr;
  PyObject* streamCorrupt = nullptr;
  PyObject* limit = nullptr;
  PyObject* timeout = nullptr;
  PyObject* peerClosed = nullptr;
  PyObject* processDied = nullptr;
  PyObject* remote = nullptr;
  PyObject* command = nullptr;
  PyObject* shmName = nullptr;
  PyObject* shmFormat = nullptr;
};
// Module-lifetime references (the module object holds them too).
Classes classes;

PyObject* make(py::module_& m, const char* name, std::initializer_list<PyObject*> bases, const char* doc) {
  const std::string qualified = std::string("forklift.") + name;
  py::tuple b(bases.size());
  std::size_t i = 0;
  for (PyObject* base : bases) b[i++] = py::reinterpret_borrow<py::object>(base);
  PyObject* cls = PyErr_NewExceptionWithDoc(qualified.c_str(), doc, b.ptr(), nullptr);
  if (!cls) throw py::error_already_set();
  m.add_object(name, py::reinterpret_borrow<py::object>(cls));
  return cls;
}

// Raises `cls(*args)` with the attributes given.
void raise(PyObject* cls, py::tuple args, std::initializer_list<std::pair<const char*, py::object>> attrs = {}) {
  py::object inst = py::reinterpret_borrow<py::object>(cls)(*args);
  for (const auto& [k, v] : attrs) inst.attr(k) = v;
  PyErr_SetObject(cls, inst.ptr());
}

void translate(std::exception_ptr p) {
  try {
    std::rethrow_exception(p);
  } catch (const SystemError& e) {
    raise(classes.system, py::make_tuple(e.code().value(), e.what()));
  } catch (const forklift::TypeError& e) {
    raise(classes.type, py::make_tuple(e.what()));
  } catch (const StreamCorrupt& e) {
    raise(classes.streamCorrupt, py::make_tuple(e.what()), {{"command", py::str(e.command())}, {"id", py::int_(e.id())}});
  } catch (const DecodeError& e) {
    raise(classes.decode, py::make_tuple(e.what()), {{"command", py::str(e.command())}, {"id", py::int_(e.id())}});
  } catch (const LimitError& e) {
    raise(classes.limit, py::make_tuple(e.what()), {{"command", py::str(e.command())}, {"id", py::int_(e.id())}});
  } catch (const forklift::TimeoutError& e) {
    raise(classes.timeout, py::make_tuple(e.what()));
  } catch (const ProcessDied& e) {
    raise(classes.processDied, py::make_tuple(e.what()));
  } catch (const PeerClosed& e) {
    raise(classes.peerClosed, py::make_tuple(e.what()));
  } catch (const CommandError& e) {
    raise(classes.command, py::make_tuple(e.what()), {{"command", py::str(e.command())}});
  } catch (const RemoteError& e) {
    raise(classes.remote, py::make_tuple(e.what()));
  } catch (const ShmNameError& e) {
    raise(classes.shmName, py::make_tuple(e.what()));
  } catch (const ShmFormatError& e) {
    raise(classes.shmFormat, py::make_tuple(e.what()));
  } catch (const Error& e) {
    raise(classes.error, py::make_tuple(e.what()));
  }
  // Anything else goes on to pybind11's own translators.
}

}  // namespace

void registerErrors(py::module_& m) {
  classes.error = make(m, "Error", {PyExc_Exception}, "Every error forklift raises.");
  classes.system = make(m, "SystemError", {classes.error, PyExc_OSError},
                        "An OS call failed; errno and strerror say which error.");
  classes.type = make(m, "TypeError", {classes.error, PyExc_TypeError},
                      "An argument or a descriptor field is missing or has the wrong type.");
  classes.decode = make(m, "DecodeError", {classes.error}, "Bytes that are not a valid forklift message.");
  classes.streamCorrupt = make(m, "StreamCorrupt", {classes.decode}, "A stream that lost its framing.");
  classes.limit = make(m, "LimitError", {classes.error}, "Larger, deeper or wider than a limit; an index out of range.");
  classes.timeout = make(m, "TimeoutError", {classes.error, PyExc_TimeoutError}, "A bounded wait ran out.");
  classes.peerClosed = make(m, "PeerClosed", {classes.error}, "The other end is gone.");
  classes.processDied = make(m, "ProcessDied", {classes.peerClosed}, "A backend died while we waited for it.");
  classes.remote = make(m, "RemoteError", {classes.error}, "A backend handler raised.");
  classes.command = make(m, "CommandError", {classes.remote}, "A command sent with send() failed in the backend.");
  classes.shmName = make(m, "ShmNameError", {classes.error, PyExc_ValueError}, "Not a valid shared-memory name.");
  classes.shmFormat = make(m, "ShmFormatError", {classes.error},
                           "A segment that is not what the caller can use: foreign, corrupt, another type or shape.");
  py::register_local_exception_translator(translate);
}

}  // namespace forklift::python
