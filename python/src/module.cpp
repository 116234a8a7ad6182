// forklift's Python module, `forklift._forklift`: the package forklift/
// imports it and adds the Python-only parts.
#include "common.hpp"

PYBIND11_MODULE(_forklift, m) {
  namespace fp = forklift::python;
  m.doc() = "forklift: shared-memory arrays and rings as numpy views, C++ backends' types (see the package forklift)";
  fp::registerErrors(m);
  fp::registerValue(m);
  fp::registerShm(m);
  fp::registerRing(m);
  fp::registerProcessTypes(m);
  fp::registerBackend(m);
}
