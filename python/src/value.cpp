// Values (include/forklift/value.hpp) to and from Python, forklift.Fd, and
// the dtype, layout and timeout conversions the other units share.
#include <array>
#include <cmath>
#include <cstring>
#include <limits>

#include "common.hpp"
#include "forklift/detail/fd.hpp"
#include "forklift/error.hpp"

namespace forklift::python {

namespace {
constexpr std::array<DType, 11> kDTypes{DType::I8,  DType::U8,  DType::I16, DType::U16, DType::I32, DType::U32,
                                        DType::I64, DType::U64, DType::F32, DType::F64, DType::F16};

bool isFdKey(const std::string& key) { return key == "fd" || key == "readerBell" || key == "writerBell"; }
}  // namespace

DType dtypeFromName(const std::string& name) {
  std::string known;
  for (DType t : kDTypes) {
    if (name == dtypeName(t)) return t;
    known += (known.empty() ? "" : ", ") + std::string(dtypeName(t));
  }
  throw forklift::TypeError("dtype '" + name + "' cannot live in shared memory: forklift arrays hold " + known +
                            " (in native byte order)");
}

py::dtype numpyDtype(DType t) { return py::dtype(std::string(dtypeName(t))); }

Layout layoutFromOrder(const std::string& order) {
  if (order == "C") return Layout::RowMajor;
  if (order == "F") return Layout::ColMajor;
  throw forklift::TypeError("order '" + order + "': 'C' (row-major) or 'F' (column-major)");
}

Timeout toTimeout(const py::object& seconds) {
  if (seconds.is_none()) return kForever;
  const double s = seconds.cast<double>();
  if (std::isnan(s)) throw forklift::TypeError("timeout is NaN");
  if (s <= 0) return Timeout::zero();
  const double ms = std::ceil(s * 1000.0);
  if (ms >= static_cast<double>(std::numeric_limits<Timeout::rep>::max() / 2)) return kForever;
  return Timeout(static_cast<Timeout::rep>(ms));
}

py::object toPython(const Value& v) {
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
      for (const auto& [k, e] : *v.getIf<Map>()) d[py::str(k)] = toPython(e);
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

Value fromPython(py::handle o, const std::string& key) {
  const std::string where = key.empty() ? std::string("a value") : "field '" + key + "'";
  if (o.is_none()) return Value();
  if (py::isinstance<Fd>(o)) return Value(o.cast<Fd>());
  if (py::isinstance<py::bool_>(o)) return Value(o.cast<bool>());
  if (py::isinstance<py::int_>(o)) {
    if (isFdKey(key)) return Value(Fd::dup(o.cast<int>()));
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
    for (auto [k, e] : py::reinterpret_borrow<py::dict>(o)) {
      if (!py::isinstance<py::str>(k)) throw forklift::TypeError(where + ": a map key is not a str");
      const std::string name = k.cast<std::string>();
      m.emplace_back(name, fromPython(e, name));
    }
    return Value(std::move(m));
  }
  if (py::isinstance<py::list>(o) || py::isinstance<py::tuple>(o)) {
    List l;
    for (py::handle e : o) l.push_back(fromPython(e, key));
    return Value(std::move(l));
  }
  if (py::isinstance<py::array>(o)) {
    auto a = py::array::ensure(o, py::array::c_style);
    const DType t = dtypeFromName(py::str(a.dtype().attr("name")).cast<std::string>());
    std::vector<std::int64_t> shape(a.shape(), a.shape() + a.ndim());
    const auto* p = static_cast<const std::uint8_t*>(a.data());
    return Value(Array(t, std::move(shape), Bytes(p, p + a.nbytes())));
  }
  throw forklift::TypeError(where + ": a Python " + std::string(py::str(o.get_type().attr("__name__"))) +
                            " has no forklift value");
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
