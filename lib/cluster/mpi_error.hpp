// forklift::cluster - one funnel for MPI's return codes (internal).
//
// Every MPI call of lib/cluster goes through check("MPI_Routine", rc), which
// throws MpiError naming the routine, its code and MPI's own words
// (MPI_Error_string). Communicators are set to MPI_ERRORS_RETURN first, so
// an error comes back here instead of aborting inside MPI.
#pragma once

#include <mpi.h>

#include <string>

#include "forklift/cluster/world.hpp"

namespace forklift::cluster::detail {

inline void check(const char* routine, int rc) {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING] = {};
  int len = 0;
  if (MPI_Error_string(rc, text, &len) != MPI_SUCCESS) len = 0;
  throw MpiError(routine, rc, std::string(routine) + " failed (code " + std::to_string(rc) + "): " +
                                  std::string(text, static_cast<std::size_t>(len)));
}

}  // namespace forklift::cluster::detail
