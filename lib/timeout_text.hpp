// forklift (internal) - a Timeout in words, for error texts and logs.
#pragma once

#include <string>

#include "forklift/timeout.hpp"

namespace forklift {

inline std::string ms(Timeout t) { return std::to_string(t.count()) + " ms"; }

}  // namespace forklift
