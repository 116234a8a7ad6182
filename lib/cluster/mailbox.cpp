// forklift::cluster::Mailbox (see mailbox.hpp).
#include "forklift/cluster/mailbox.hpp"

#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <deque>
#include <mutex>

#include "forklift/error.hpp"
#include "forklift/log.hpp"
#include "forklift/manager.hpp"

namespace forklift::cluster {

struct Mailbox::Impl {
  mutable std::mutex mutex;
  std::deque<Received> queue;
  int eventFd = -1;  // semaphore: one count per queued message
  Manager* manager = nullptr;
  std::shared_ptr<std::function<void(int, Message&)>> handler;

  void post(Received r) {
    manager->post([h = handler, r = std::move(r)]() mutable { (*h)(r.source, r.message); });
  }
};

Mailbox::Mailbox() : impl_(std::make_unique<Impl>()) {
  impl_->eventFd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK | EFD_SEMAPHORE);
  if (impl_->eventFd < 0) throw SystemError(errno, "cluster::Mailbox: eventfd");
}

Mailbox::~Mailbox() { ::close(impl_->eventFd); }

void Mailbox::put(Received r) {
  std::lock_guard lock(impl_->mutex);
  if (impl_->manager) {
    impl_->post(std::move(r));
    return;
  }
  impl_->queue.push_back(std::move(r));
  std::uint64_t one = 1;
  if (::write(impl_->eventFd, &one, sizeof one) < 0 && errno != EAGAIN) {
    static auto log = makeLogger("cluster");
    log->error("cluster::Mailbox: write to its eventfd: {}", std::strerror(errno));
  }
}

std::optional<Received> Mailbox::tryRecv() {
  std::lock_guard lock(impl_->mutex);
  if (impl_->queue.empty()) return std::nullopt;
  std::uint64_t v;
  (void)!::read(impl_->eventFd, &v, sizeof v);
  Received r = std::move(impl_->queue.front());
  impl_->queue.pop_front();
  return r;
}

std::optional<Received> Mailbox::recv(Timeout timeout) {
  Deadline deadline(timeout);
  for (;;) {
    if (auto r = tryRecv()) return r;
    if (deadline.expired()) return std::nullopt;
    pollfd p{impl_->eventFd, POLLIN, 0};
    if (::poll(&p, 1, deadline.pollMillis()) < 0 && errno != EINTR)
      throw SystemError(errno, "cluster::Mailbox::recv: poll");
  }
}

int Mailbox::fd() const noexcept { return impl_->eventFd; }

std::size_t Mailbox::size() const {
  std::lock_guard lock(impl_->mutex);
  return impl_->queue.size();
}

void Mailbox::deliverTo(Manager& manager, std::function<void(int source, Message&)> fn) {
  std::lock_guard lock(impl_->mutex);
  impl_->manager = &manager;
  impl_->handler = std::make_shared<std::function<void(int, Message&)>>(std::move(fn));
  while (!impl_->queue.empty()) {
    std::uint64_t v;
    (void)!::read(impl_->eventFd, &v, sizeof v);
    impl_->post(std::move(impl_->queue.front()));
    impl_->queue.pop_front();
  }
}

void Mailbox::deliverToInbox() {
  std::lock_guard lock(impl_->mutex);
  impl_->manager = nullptr;
  impl_->handler.reset();
}

}  // namespace forklift::cluster
