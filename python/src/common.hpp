// forklift's Python module: what the binding units share.
//
// One unit per header it binds (errors.cpp, value.cpp, shm.cpp, ring.cpp),
// each with its register<Unit>(m); module.cpp calls them in order. What
// users' modules share with this one (value conversions, the error
// translator, forklift.CallFuture and ExitStatus) is inline in
// python/include/forklift/python.hpp.
#pragma once

#include <string>

#include "forklift/shm.hpp"
#include "forklift/timeout.hpp"
#include "forklift/python.hpp"
#include "forklift/value.hpp"

namespace forklift::python {

void registerErrors(py::module_& m);
void registerValue(py::module_& m);
void registerShm(py::module_& m);
void registerRing(py::module_& m);
void registerBackend(py::module_& m);  // backend.cpp: Python backends

// toPython, fromPython, dtypeFromName, numpyDtype, toTimeout and
// waitInSlices are in forklift/python.hpp, shared with users' modules.
Layout layoutFromOrder(const std::string& order);  // "C" / "F"

}  // namespace forklift::python
