// forklift's Python module: what the binding units share.
//
// One unit per header it binds (errors.cpp, value.cpp, shm.cpp, ring.cpp),
// each with its register<Unit>(m); module.cpp calls them in order.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "forklift/shm.hpp"
#include "forklift/timeout.hpp"
#include "forklift/value.hpp"

namespace forklift::python {

namespace py = pybind11;

void registerErrors(py::module_& m);
void registerValue(py::module_& m);
void registerShm(py::module_& m);
void registerRing(py::module_& m);

// Value <-> Python. Maps become dicts, lists lists, Fd a forklift.Fd
// (which owns its descriptor). From Python: a forklift.Fd is shared; an int
// under the key "fd", "readerBell" or "writerBell" is duplicated (the caller
// keeps its own descriptor). Anything else unknown is a forklift.TypeError.
py::object toPython(const Value& v);
Value fromPython(py::handle o, const std::string& key = {});

// The DType of a numpy dtype name ("uint8", "float16", ...); a
// forklift.TypeError naming the ones there are otherwise.
DType dtypeFromName(const std::string& name);
// The numpy dtype of a DType.
py::dtype numpyDtype(DType t);
Layout layoutFromOrder(const std::string& order);  // "C" / "F"

// A Python timeout (None: forever; seconds as a float) as forklift's.
Timeout toTimeout(const py::object& seconds);

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

}  // namespace forklift::python
