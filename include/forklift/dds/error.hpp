// forklift::dds - DdsError: a Cyclone DDS call failed.
//
// Every Cyclone call libforklift-dds makes is checked; a negative return
// code becomes a DdsError whose text names the call and Cyclone's own
// words for the code (dds_strretcode), e.g.
//   "dds_create_participant: Error" or "dds_write: Timeout".
// code() is Cyclone's DDS_RETCODE_* value (positive: DDS_RETCODE_TIMEOUT is 10).
#pragma once

#include <string>

#include "forklift/error.hpp"

namespace forklift::dds {

class DdsError : public Error {
 public:
  DdsError(const std::string& what, int code) : Error(what), code_(code) {}
  int code() const noexcept { return code_; }

 private:
  int code_;
};

}  // namespace forklift::dds
