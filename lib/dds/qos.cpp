#include "qos.hpp"

#include "forklift/error.hpp"

namespace forklift::dds::detail {

Qos qosFor(RingPolicy policy, std::size_t slots, const StreamOptions& options) {
  if (options.lease < std::chrono::milliseconds(10)) throw LimitError("a DDS stream's lease must be 10 ms or more");
  const std::size_t depth = options.depth != 0 ? options.depth : slots;
  if (depth == 0 || depth > 0x7fffffff) throw LimitError("a DDS stream's depth must be 1 to 2^31-1");
  Qos q(dds_create_qos());
  if (!q) throw DdsError("dds_create_qos: out of memory", DDS_RETCODE_OUT_OF_RESOURCES);
  const auto d = static_cast<std::int32_t>(depth);
  switch (policy) {
    case RingPolicy::KeepLatest:
      dds_qset_reliability(q.get(), DDS_RELIABILITY_BEST_EFFORT, 0);
      dds_qset_history(q.get(), DDS_HISTORY_KEEP_LAST, 1);
      break;
    case RingPolicy::DropOldest:
      dds_qset_reliability(q.get(), DDS_RELIABILITY_RELIABLE, DDS_MSECS(options.blockTimeout.count()));
      dds_qset_history(q.get(), DDS_HISTORY_KEEP_LAST, d);
      break;
    case RingPolicy::Block:
      dds_qset_reliability(q.get(), DDS_RELIABILITY_RELIABLE, DDS_MSECS(options.blockTimeout.count()));
      dds_qset_history(q.get(), DDS_HISTORY_KEEP_ALL, 0);
      dds_qset_resource_limits(q.get(), d, DDS_LENGTH_UNLIMITED, DDS_LENGTH_UNLIMITED);
      break;
  }
  dds_qset_durability(q.get(), DDS_DURABILITY_VOLATILE);
  // Manual: a hung publisher stops asserting and is reported; an automatic
  // writer would live on while its process does (Cyclone's liveliness.c).
  dds_qset_liveliness(q.get(), DDS_LIVELINESS_MANUAL_BY_TOPIC, DDS_MSECS(options.lease.count()));
  // A keyless topic has one instance; disposing it when a writer goes would
  // only add a sample-less notification per publisher.
  dds_qset_writer_data_lifecycle(q.get(), false);
  return q;
}

RingPolicy policyOf(const dds_qos_t* qos) {
  dds_reliability_kind_t rel{};
  dds_duration_t blocking = 0;
  dds_history_kind_t hist{};
  std::int32_t depth = 0;
  if (!dds_qget_reliability(qos, &rel, &blocking) || !dds_qget_history(qos, &hist, &depth))
    throw Error("a QoS without reliability or history is not a forklift stream's");
  if (rel == DDS_RELIABILITY_BEST_EFFORT) return RingPolicy::KeepLatest;
  return hist == DDS_HISTORY_KEEP_ALL ? RingPolicy::Block : RingPolicy::DropOldest;
}

}  // namespace forklift::dds::detail
