// forklift's exceptions (include/forklift/error.hpp, shm.hpp) as Python
// classes of the same names, under forklift.Error. Where a builtin means the
// same thing the class derives from it too: forklift.TimeoutError is a
// builtin TimeoutError, forklift.SystemError an OSError (errno, strerror
// set), forklift.TypeError a builtin TypeError, forklift.ShmNameError a
// ValueError. The translator (forklift/python.hpp) is local to each module
// that uses it, this one and users' modules, and raises these classes.
#include "common.hpp"
#include "forklift/error.hpp"

namespace forklift::python {

namespace {

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

}  // namespace

void registerErrors(py::module_& m) {
  PyObject* error = make(m, "Error", {PyExc_Exception}, "Every error forklift raises.");
  make(m, "SystemError", {error, PyExc_OSError},
                        "An OS call failed; errno and strerror say which error.");
  make(m, "TypeError", {error, PyExc_TypeError},
                      "An argument or a descriptor field is missing or has the wrong type.");
  PyObject* decode = make(m, "DecodeError", {error}, "Bytes that are not a valid forklift message.");
  make(m, "StreamCorrupt", {decode}, "A stream that lost its framing.");
  make(m, "LimitError", {error}, "Larger, deeper or wider than a limit; an index out of range.");
  make(m, "TimeoutError", {error, PyExc_TimeoutError}, "A bounded wait ran out.");
  PyObject* peerClosed = make(m, "PeerClosed", {error}, "The other end is gone.");
  make(m, "ProcessDied", {peerClosed}, "A backend died while we waited for it.");
  PyObject* remote = make(m, "RemoteError", {error}, "A backend handler raised.");
  make(m, "CommandError", {remote}, "A command sent with send() failed in the backend.");
  make(m, "ShmNameError", {error, PyExc_ValueError}, "Not a valid shared-memory name.");
  make(m, "ShmFormatError", {error},
                           "A segment that is not what the caller can use: foreign, corrupt, another type or shape.");
  useForkliftErrors(m);
}

}  // namespace forklift::python
