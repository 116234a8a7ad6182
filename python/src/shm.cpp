// Shared-memory arrays (include/forklift/shm.hpp, shm_tensor.hpp) as
// forklift.Segment: one mapped segment of kind "array", any rank and dtype.
// Segment.array() is a numpy.ndarray over the segment's own pages whose base
// is the Segment, so the mapping lives as long as any view of it; the
// buffer protocol gives the same view to memoryview() and numpy.asarray().
// Opening goes through the library's own checks (checkTensorSegment,
// openDescribedTensor), so a forged or mismatched segment is the same
// forklift.ShmFormatError or forklift.TypeError as in C++.
#include <fcntl.h>

#include <optional>

#include "common.hpp"
#include "forklift/shm_tensor.hpp"

namespace forklift::python {

namespace {

struct Segment {
  SharedMemory shm;

  DType dtype() const { return *shm.dtype(); }
  std::vector<py::ssize_t> shape() const {
    const auto s = shm.shape();
    return {s.begin(), s.end()};
  }
  std::vector<py::ssize_t> byteStrides() const {
    const auto size = static_cast<py::ssize_t>(dtypeSize(dtype()));
    std::vector<py::ssize_t> out;
    for (std::int64_t s : shm.strides()) out.push_back(static_cast<py::ssize_t>(s) * size);
    return out;
  }
  void checkOpen() const {
    if (!shm.valid()) throw Error("the segment is closed");
  }
};

// Checks what the caller asked for (dtype, shape, order; None: whatever the
// segment holds) against the segment, with the library's own checks.
void checkAsked(const SharedMemory& shm, const std::optional<std::string>& dtype,
                const std::optional<std::vector<std::int64_t>>& shape, const std::optional<std::string>& order) {
  if (!shm.dtype()) throw ShmFormatError("shared memory segment '" + shm.name() + "' holds raw bytes, not an array");
  const DType t = dtype ? dtypeFromName(*dtype) : *shm.dtype();
  const std::size_t rank = shape ? shape->size() : shm.shape().size();
  const Layout layout = order ? layoutFromOrder(*order) : shm.layout();
  const auto have = detail::checkTensorSegment(shm, t, rank, layout);
  if (shape && have != *shape) detail::throwTensorShapeMismatch(shm.name(), have, *shape, "expected");
}

Segment create(const std::vector<std::int64_t>& shape, const std::string& dtype, const std::string& name,
               const std::string& mode, const std::string& order) {
  if (shape.empty() || shape.size() > 8)
    throw forklift::TypeError("a forklift array has rank 1 to 8, this shape has " + std::to_string(shape.size()));
  ShmName n = mode == "anonymous" ? ShmName(name)
              : mode == "named"   ? ShmName::named(name)
              : mode == "exact"   ? ShmName::exact(name)
                                  : throw forklift::TypeError("mode '" + mode + "': anonymous, named or exact");
  return Segment{SharedMemory(create_only, n, dtypeFromName(dtype), shape, layoutFromOrder(order))};
}

Segment openName(const std::string& name, const std::optional<std::string>& dtype,
                 const std::optional<std::vector<std::int64_t>>& shape, const std::optional<std::string>& order) {
  Segment s{SharedMemory(open_only, name)};
  checkAsked(s.shm, dtype, shape, order);
  return s;
}

Segment openFd(int fd, const std::optional<std::string>& dtype, const std::optional<std::vector<std::int64_t>>& shape,
               const std::optional<std::string>& order) {
  if (::fcntl(fd, F_GETFD) < 0)
    throw SystemError(errno, "cannot open shared memory from descriptor " + std::to_string(fd));
  // The label an anonymous segment gets in this process: its creator's is
  // not in the segment.
  Map d{{"name", makeShmName("fd" + std::to_string(fd), kShmAnonymousPrefix)}, {"fd", Fd::dup(fd)}};
  Segment s{SharedMemory(open_only, Value(std::move(d)))};
  checkAsked(s.shm, dtype, shape, order);
  return s;
}

Segment openDescriptor(const py::dict& descriptor) {
  const Value v = fromPython(descriptor);
  // The descriptor names what it holds; openDescribedTensor checks the
  // segment against it exactly as ShmTensor::open(descriptor) does.
  const Map& m = *v.getIf<Map>();
  const auto field = [&](const char* key) -> const Value& {
    for (const auto& [k, e] : m)
      if (k == key) return e;
    throw forklift::TypeError(std::string("shared memory descriptor: missing field '") + key + "'");
  };
  const auto* dtypeText = field("dtype").getIf<std::string>();
  const auto* layoutText = field("layout").getIf<std::string>();
  const auto* shape = field("shape").getIf<List>();
  if (!dtypeText || !layoutText || !shape)
    throw forklift::TypeError("shared memory descriptor: dtype and layout are strings, shape a list");
  if (shape->empty() || shape->size() > 8)
    throw forklift::TypeError("shared memory descriptor: shape has rank " + std::to_string(shape->size()) +
                              ", 1 to 8 wanted");
  const Layout layout = *layoutText == layoutName(Layout::ColMajor) ? Layout::ColMajor : Layout::RowMajor;
  return Segment{detail::openDescribedTensor(v, dtypeFromName(*dtypeText), shape->size(), layout)};
}

py::array view(py::object self) {
  const Segment& s = self.cast<const Segment&>();
  s.checkOpen();
  return py::array(numpyDtype(s.dtype()), s.shape(), s.byteStrides(), s.shm.data(), self);
}

}  // namespace

void registerShm(py::module_& m) {
  py::class_<Segment>(m, "Segment", py::buffer_protocol(),
                      "One shared-memory array segment (anonymous memfd or named in /dev/shm). "
                      "array() views its pages; the mapping lives while a view does.")
      .def_static("create", &create, py::arg("shape"), py::arg("dtype"), py::arg("name") = "",
                  py::arg("mode") = "anonymous", py::arg("order") = "C")
      .def_static("open_name", &openName, py::arg("name"), py::arg("dtype") = py::none(),
                  py::arg("shape") = py::none(), py::arg("order") = py::none())
      .def_static("open_fd", &openFd, py::arg("fd"), py::arg("dtype") = py::none(), py::arg("shape") = py::none(),
                  py::arg("order") = py::none())
      .def_static("open_descriptor", &openDescriptor, py::arg("descriptor"))
      .def("array", &view, "A numpy.ndarray over the segment's pages (no copy); its base is this Segment.")
      .def("describe",
           [](const Segment& s) {
             s.checkOpen();
             return toPython(detail::describeTensor(s.shm));
           },
           "The descriptor C++ ShmTensor::describe() makes: {name, dtype, shape, [rows, cols,] layout, "
           "generation, [fd]}.")
      .def_property_readonly("name", [](const Segment& s) { return s.shm.name(); })
      .def_property_readonly("anonymous", [](const Segment& s) { return s.shm.anonymous(); })
      .def_property_readonly("fd", [](const Segment& s) { return s.shm.fd(); },
                             "The memfd of an anonymous segment (owned by the Segment), -1 if named.")
      .def_property_readonly("dtype", [](const Segment& s) { s.checkOpen(); return numpyDtype(s.dtype()); })
      .def_property_readonly("shape", [](const Segment& s) { return py::tuple(py::cast(s.shape())); })
      .def_property_readonly("order", [](const Segment& s) {
        return s.shm.layout() == Layout::RowMajor ? "C" : "F";
      })
      .def_property_readonly("nbytes", [](const Segment& s) { return s.shm.bytes(); })
      .def_property_readonly("generation", [](const Segment& s) { return s.shm.generation(); })
      .def_property_readonly("creator_pid", [](const Segment& s) { return s.shm.creatorPid(); })
      .def_property_readonly("owns", [](const Segment& s) { return s.shm.owns(); },
                             "True in the creator of a named segment: the name goes when the Segment does.")
      .def("release", [](Segment& s) { s.shm.release(); }, "Gives up the name: it stays when the Segment goes.")
      .def_static("remove", &SharedMemory::remove, py::arg("name"), "Removes a name from /dev/shm.")
      .def("__repr__", [](const Segment& s) {
        return s.shm.valid() ? "forklift.Segment('" + s.shm.name() + "', " + s.shm.describe() + ")"
                             : std::string("forklift.Segment(closed)");
      })
      .def_buffer([](Segment& s) {
        s.checkOpen();
        const std::string fmt = s.dtype() == DType::F16 ? std::string("e")
                                                        : py::str(numpyDtype(s.dtype()).attr("char")).cast<std::string>();
        return py::buffer_info(s.shm.data(), static_cast<py::ssize_t>(dtypeSize(s.dtype())), fmt,
                               static_cast<py::ssize_t>(s.shape().size()), s.shape(), s.byteStrides());
      });
}

}  // namespace forklift::python
