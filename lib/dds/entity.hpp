// Internal: RAII for Cyclone DDS handles, and check().
//
// Entity owns one dds_entity_t (participant, topic, writer, reader,
// waitset, guard or read condition) and deletes it when it goes. Cyclone
// deletes an entity's children with it (dds.h: "delete all its children"),
// so an owner declares parents first: members die in reverse order, the
// children first, and a child's own dds_delete never meets a dead handle
// except when the parent was deleted explicitly (then it returns an error
// we ignore: the handle is gone either way).
#pragma once

#include <dds/dds.h>

#include <memory>
#include <string>
#include <utility>

#include "forklift/dds/error.hpp"

namespace forklift::dds::detail {

// rc if it is not negative, else DdsError "<what>: <Cyclone's text>".
inline dds_return_t check(dds_return_t rc, const char* what) {
  if (rc < 0) throw DdsError(std::string(what) + ": " + dds_strretcode(rc), -rc);
  return rc;
}

class Entity {
 public:
  Entity() noexcept = default;
  // Takes a handle a dds_create_* call returned (checked: a negative one
  // throws DdsError naming `what`).
  Entity(dds_entity_t h, const char* what) : h_(check(h, what)) {}
  Entity(Entity&& o) noexcept : h_(std::exchange(o.h_, 0)) {}
  Entity& operator=(Entity&& o) noexcept {
    if (this != &o) {
      reset();
      h_ = std::exchange(o.h_, 0);
    }
    return *this;
  }
  Entity(const Entity&) = delete;
  Entity& operator=(const Entity&) = delete;
  ~Entity() { reset(); }

  dds_entity_t get() const noexcept { return h_; }
  explicit operator bool() const noexcept { return h_ > 0; }
  void reset() noexcept {
    if (h_ > 0) (void)dds_delete(h_);
    h_ = 0;
  }

 private:
  dds_entity_t h_ = 0;
};

struct QosDeleter {
  void operator()(dds_qos_t* q) const noexcept { dds_delete_qos(q); }
};
using Qos = std::unique_ptr<dds_qos_t, QosDeleter>;

}  // namespace forklift::dds::detail
