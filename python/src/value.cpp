// forklift.Fd and the layout conversion; the conversions of values to and
// from Python are in forklift/python.hpp.

#include "common.hpp"
#include "forklift/detail/fd.hpp"
#include "forklift/error.hpp"

namespace forklift::python {

Layout layoutFromOrder(const std::string& order) {
  if (order == "C") return Layout::RowMajor;
  if (order == "F") return Layout::ColMajor;
  throw forklift::TypeError("order '" + order + "': 'C' (row-major) or 'F' (column-major)");
}

void registerValue(py::module_& m) {
  py::class_<Fd>(m, "Fd",
                 "An owned file descriptor: closed when the last forklift.Fd (or the value holding it) is gone.")
      .def(py::init([](int fd) { return Fd::dup(fd); }), py::arg("fd"),
           "A close-on-exec duplicate of fd; the caller keeps (and closes) its own.")
      .def_static(
          "adopt", [](int fd) {
            if (fd < 0) throw forklift::TypeError("adopt(): descriptor " + std::to_string(fd) + " is not open");
            return Fd(detail::UniqueFd(fd));
          },
          py::arg("fd"), "Takes ownership of fd (from os.open, socket.recv_fds, ...).")
      .def("fileno", [](const Fd& f) {
        if (!f.valid()) throw forklift::Error("fileno() of a closed forklift.Fd");
        return f.get();
      })
      .def("detach", [](const Fd& f) { return f.take().release(); },
           "Hands the descriptor to the caller (who closes it); this Fd and its copies become empty. -1 if empty.")
      .def("close", [](const Fd& f) { f.take(); })
      .def_property_readonly("closed", [](const Fd& f) { return !f.valid(); })
      .def("__enter__", [](const Fd& f) { return f; })
      .def("__exit__", [](const Fd& f, py::args) { f.take(); })
      .def("__repr__", [](const Fd& f) {
        return f.valid() ? "forklift.Fd(" + std::to_string(f.get()) + ")" : std::string("forklift.Fd(closed)");
      });
}

}  // namespace forklift::python
