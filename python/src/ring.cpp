// rings: next commit
#include "common.hpp"
namespace forklift::python { void registerRing(py::module_&) {} }
