// iceoryx peer for forklift's benchmarks (iceoryx 2.0, posh C++ API).
//
// One program, one figure per invocation. The process pins itself to the
// frontend CPU, forks the backend (which pins itself to the backend CPU), and
// only then does each side register with RouDi under its own runtime name.
//
//   iox_peer rtt     [--busy] [--iters N] [--warmup W] [--cpus A,B]
//   iox_peer handoff --bytes B [--iters N] [--warmup W] [--cpus A,B]
//
// rtt:     frontend publishes a small Ping (seq + "gotcha!"), backend waits on a
//          WaitSet, takes it and publishes a Pong; the frontend waits on its
//          own WaitSet for the Pong. Per-iteration latency, median and p99 (us).
//          With --busy each side busy-polls its subscriber instead
//          (figure rtt_small_busy; meant for one CPU per side).
// handoff: frontend loans a chunk of B bytes, fills it in place with a new
//          float64 value, publishes it; the backend reads every element (sum),
//          releases the chunk and answers with the sum in a Pong; the frontend
//          checks it. GB/s = B / median iteration time.
//
// Results go to stdout, one JSON object per line; diagnostics to stderr.
// A RouDi must be running (the driver `bench/peers/run` starts one).

#include "iceoryx_hoofs/log/logmanager.hpp"
#include "iceoryx_posh/popo/publisher.hpp"
#include "iceoryx_posh/popo/subscriber.hpp"
#include "iceoryx_posh/popo/untyped_publisher.hpp"
#include "iceoryx_posh/popo/untyped_subscriber.hpp"
#include "iceoryx_posh/popo/wait_set.hpp"
#include "iceoryx_posh/runtime/posh_runtime.hpp"

#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

constexpr std::uint64_t kStop = ~std::uint64_t{0};
constexpr auto kConnectTimeout = std::chrono::seconds(20);
constexpr auto kReplyTimeout = iox::units::Duration::fromSeconds(20);

struct Ping {
    std::uint64_t seq;
    char parameter[16];
};

struct Pong {
    std::uint64_t seq;
    double sum;
};

struct Options {
    std::string mode;
    std::uint64_t bytes = 0;
    int iters = 0;
    int warmup = -1;
    int cpu_front = 0;
    int cpu_back = 1;
    bool busy = false;  // rtt: busy-poll the subscriber instead of a WaitSet
};

[[noreturn]] void die(const char* what) {
    std::fprintf(stderr, "iox_peer[%d]: %s\n", static_cast<int>(getpid()), what);
    std::fflush(stderr);
    _exit(2);
}

void pin(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof(set), &set) != 0) {
        std::perror("sched_setaffinity");
        die("cannot pin to the requested CPU");
    }
}

Options parse(int argc, char** argv) {
    Options o;
    if (argc < 2) die("usage: iox_peer rtt|handoff [--bytes B] [--iters N] [--warmup W] [--cpus A,B]");
    o.mode = argv[1];
    for (int i = 2; i < argc; ++i) {
        std::string a = argv[i];
        auto next = [&]() -> const char* {
            if (i + 1 >= argc) die("option needs a value");
            return argv[++i];
        };
        if (a == "--bytes") {
            o.bytes = std::strtoull(next(), nullptr, 10);
        } else if (a == "--iters") {
            o.iters = std::atoi(next());
        } else if (a == "--warmup") {
            o.warmup = std::atoi(next());
        } else if (a == "--busy") {
            o.busy = true;
        } else if (a == "--cpus") {
            const char* v = next();
            if (std::sscanf(v, "%d,%d", &o.cpu_front, &o.cpu_back) != 2) die("--cpus wants A,B");
        } else {
            die("unknown option");
        }
    }
    if (o.mode != "rtt" && o.mode != "handoff") die("mode must be rtt or handoff");
    if (o.mode == "handoff") {
        if (o.bytes == 0 || o.bytes % 64 != 0 || o.bytes > 0xF0000000ull)
            die("--bytes must be a positive multiple of 64 below 3.75 GiB");
    }
    if (o.iters <= 0) o.iters = o.mode == "rtt" ? 20000 : 50;
    if (o.warmup < 0) o.warmup = o.mode == "rtt" ? 1000 : 5;
    return o;
}

double percentile(std::vector<double> v, double q) {
    std::sort(v.begin(), v.end());
    const double pos = q * static_cast<double>(v.size() - 1);
    const auto lo = static_cast<std::size_t>(pos);
    const auto hi = std::min(lo + 1, v.size() - 1);
    return v[lo] + (v[hi] - v[lo]) * (pos - static_cast<double>(lo));
}

void emit(const char* figure, const char* stat, double value, const char* unit) {
    std::printf("{\"figure\": \"%s\", \"stat\": \"%s\", \"value\": %.6g, \"unit\": \"%s\"}\n", figure, stat,
                value, unit);
    std::fflush(stdout);
}

// Wait until our publisher has a subscriber and our subscriber is connected.
template <typename Pub, typename Sub>
void await_peer(const Pub& pub, const Sub& sub) {
    const auto deadline = Clock::now() + kConnectTimeout;
    while (!(pub.hasSubscribers() && sub.getSubscriptionState() == iox::SubscribeState::SUBSCRIBED)) {
        if (Clock::now() > deadline) die("peer did not connect in time");
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
}

// Block on the waitset; give up when the peer is gone or silent too long.
template <typename WS>
void wait_for(WS& ws, pid_t peer) {
    for (;;) {
        auto notes = ws.timedWait(kReplyTimeout);
        if (!notes.empty()) return;
        if (peer > 0 && kill(peer, 0) != 0) die("peer process is gone");
        if (peer == 0 && getppid() == 1) die("parent is gone");
        die("no answer from peer within the timeout");
    }
}

// Busy-polling: spin on the subscriber until it has data (iceoryx's
// lowest-latency mode, one CPU per side), looking at the peer and the
// clock now and then.
template <typename Sub>
void spin_for(Sub& sub, pid_t peer) {
    const auto deadline = Clock::now() + std::chrono::seconds(20);
    for (std::uint64_t n = 1; !sub.hasData(); ++n) {
        if ((n & 0xffff) != 0) continue;
        if (peer > 0 && kill(peer, 0) != 0) die("peer process is gone");
        if (peer == 0 && getppid() == 1) die("parent is gone");
        if (Clock::now() > deadline) die("no answer from peer within the timeout");
    }
}

// Topics carry the frontend's pid, so two runs never see each other's ports.
pid_t g_frontend_pid = 0;

iox::capro::ServiceDescription topic(const char* event) {
    char instance[32];
    std::snprintf(instance, sizeof(instance), "peers-%d", static_cast<int>(g_frontend_pid));
    return {"forklift", iox::capro::IdString_t(iox::cxx::TruncateToCapacity, instance),
            iox::capro::IdString_t(iox::cxx::TruncateToCapacity, event)};
}

// Strict ping-pong never fills a queue; a queue of one with the default
// discard policy also means a publisher never spins on a vanished subscriber
// and a stale subscriber can pin at most one chunk.
iox::popo::SubscriberOptions sub_options() {
    iox::popo::SubscriberOptions o;
    o.queueCapacity = 1;
    return o;
}

iox::popo::PublisherOptions pub_options() {
    return iox::popo::PublisherOptions{};
}

void init_runtime(const char* role) {
    char name[64];
    std::snprintf(name, sizeof(name), "fl_peer_%s_%d", role, static_cast<int>(getpid()));
    iox::runtime::PoshRuntime::initRuntime(iox::RuntimeName_t(iox::cxx::TruncateToCapacity, name));
}

// ---------------------------------------------------------------- rtt
int rtt_backend(const Options& o) {
    init_runtime("pong");
    iox::popo::Subscriber<Ping> sub(topic("ping"), sub_options());
    iox::popo::Publisher<Pong> pub(topic("pong"), pub_options());
    iox::popo::WaitSet<> ws;
    ws.attachState(sub, iox::popo::SubscriberState::HAS_DATA).or_else([](auto) { die("attachState failed"); });
    await_peer(pub, sub);
    for (;;) {
        if (o.busy)
            spin_for(sub, 0);
        else
            wait_for(ws, 0);
        bool stop = false;
        while (sub.hasData()) {
            std::uint64_t seq = 0;
            bool ok = false;
            sub.take().and_then([&](auto& sample) {
                seq = sample->seq;
                ok = std::strcmp(sample->parameter, "gotcha!") == 0;
            });
            if (seq == kStop) {
                stop = true;
                break;
            }
            if (!ok) die("bad ping parameter");
            auto loaned = pub.loan();
            if (loaned.has_error()) die("pong loan failed");
            auto& s = loaned.value();
            s->seq = seq;
            s->sum = 0.0;
            s.publish();
        }
        if (stop) return 0;
    }
}

int rtt_frontend(const Options& o, pid_t child) {
    init_runtime("ping");
    iox::popo::Publisher<Ping> pub(topic("ping"), pub_options());
    iox::popo::Subscriber<Pong> sub(topic("pong"), sub_options());
    iox::popo::WaitSet<> ws;
    ws.attachState(sub, iox::popo::SubscriberState::HAS_DATA).or_else([](auto) { die("attachState failed"); });
    await_peer(pub, sub);

    auto send = [&](std::uint64_t seq) {
        auto loaned = pub.loan();
        if (loaned.has_error()) die("ping loan failed");
        auto& s = loaned.value();
        s->seq = seq;
        std::strcpy(s->parameter, "gotcha!");
        s.publish();
    };

    std::vector<double> us;
    us.reserve(static_cast<std::size_t>(o.iters));
    const int total = o.warmup + o.iters;
    for (int i = 0; i < total; ++i) {
        const auto t0 = Clock::now();
        send(static_cast<std::uint64_t>(i));
        bool got = false;
        while (!got) {
            if (o.busy)
                spin_for(sub, child);
            else
                wait_for(ws, child);
            sub.take().and_then([&](auto& sample) {
                if (sample->seq != static_cast<std::uint64_t>(i)) die("pong out of order");
                got = true;
            });
        }
        const auto t1 = Clock::now();
        if (i >= o.warmup) us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
    }
    send(kStop);
    const char* figure = o.busy ? "rtt_small_busy" : "rtt_small";
    emit(figure, "median", percentile(us, 0.5), "us");
    emit(figure, "p99", percentile(us, 0.99), "us");
    return 0;
}

// ---------------------------------------------------------------- handoff
double sum_all(const double* p, std::size_t n) {
    // Eight independent accumulators so the read runs at memory speed.
    double s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (std::size_t i = 0; i < n; i += 8)
        for (int k = 0; k < 8; ++k) s[k] += p[i + static_cast<std::size_t>(k)];
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

int handoff_backend(const Options& o) {
    init_runtime("reader");
    iox::popo::UntypedSubscriber data(topic("data"), sub_options());
    iox::popo::Subscriber<Ping> ctl(topic("ctl"), sub_options());
    iox::popo::Publisher<Pong> pub(topic("pong"), pub_options());
    iox::popo::WaitSet<> ws;
    ws.attachState(data, iox::popo::SubscriberState::HAS_DATA).or_else([](auto) { die("attachState failed"); });
    ws.attachState(ctl, iox::popo::SubscriberState::HAS_DATA).or_else([](auto) { die("attachState failed"); });
    await_peer(pub, data);
    const std::size_t n = o.bytes / sizeof(double);
    std::uint64_t seq = 0;
    for (;;) {
        wait_for(ws, 0);
        while (data.hasData()) {
            double sum = 0.0;
            data.take().and_then([&](const void* payload) {
                sum = sum_all(static_cast<const double*>(payload), n);
                data.release(payload);
            });
            auto loaned = pub.loan();
            if (loaned.has_error()) die("pong loan failed");
            auto& s = loaned.value();
            s->seq = seq++;
            s->sum = sum;
            s.publish();
        }
        if (ctl.hasData()) return 0;  // the only control message is stop
    }
}

int handoff_frontend(const Options& o, pid_t child) {
    init_runtime("writer");
    iox::popo::UntypedPublisher data(topic("data"), pub_options());
    iox::popo::Publisher<Ping> ctl(topic("ctl"), pub_options());
    iox::popo::Subscriber<Pong> sub(topic("pong"), sub_options());
    iox::popo::WaitSet<> ws;
    ws.attachState(sub, iox::popo::SubscriberState::HAS_DATA).or_else([](auto) { die("attachState failed"); });
    await_peer(data, sub);
    {
        const auto deadline = Clock::now() + kConnectTimeout;
        while (!ctl.hasSubscribers()) {
            if (Clock::now() > deadline) die("control topic not connected");
            std::this_thread::sleep_for(std::chrono::milliseconds(1));
        }
    }
    const std::size_t n = o.bytes / sizeof(double);
    const auto payload_size = static_cast<std::uint32_t>(o.bytes);

    std::vector<double> sec;
    sec.reserve(static_cast<std::size_t>(o.iters));
    const int total = o.warmup + o.iters;
    for (int i = 0; i < total; ++i) {
        const double value = static_cast<double>(i % 1000 + 1);
        const auto t0 = Clock::now();
        auto chunk = data.loan(payload_size, 64);  // 64-byte aligned like numpy
        if (chunk.has_error()) {
            std::fprintf(stderr, "iox_peer: loan of %u bytes failed at iteration %d\n", payload_size, i);
            die("data loan failed (is the RouDi mempool big enough?)");
        }
        void* p = chunk.value();
        std::fill_n(static_cast<double*>(p), n, value);
        data.publish(p);
        bool got = false;
        double sum = 0.0;
        while (!got) {
            wait_for(ws, child);
            sub.take().and_then([&](auto& sample) {
                sum = sample->sum;
                got = true;
            });
        }
        const auto t1 = Clock::now();
        if (sum != value * static_cast<double>(n)) die("backend read a wrong sum");
        if (i >= o.warmup) sec.push_back(std::chrono::duration<double>(t1 - t0).count());
    }
    ctl.loan().and_then([](auto& s) {
        s->seq = kStop;
        std::strcpy(s->parameter, "stop");
        s.publish();
    });
    const double med = percentile(sec, 0.5);
    std::string figure = "handoff_";
    if (o.bytes % (1ull << 20) == 0)
        figure += std::to_string(o.bytes >> 20) + "MiB";
    else
        figure += std::to_string(o.bytes >> 10) + "KiB";
    emit(figure.c_str(), "median", static_cast<double>(o.bytes) / med / 1e9, "GB/s");
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    const Options o = parse(argc, argv);
    iox::log::LogManager::GetLogManager().SetDefaultLogLevel(iox::log::LogLevel::kWarn);
    pin(o.cpu_front);
    const pid_t parent = getpid();
    g_frontend_pid = parent;
    std::fflush(stdout);
    std::fflush(stderr);
    const pid_t child = fork();
    if (child < 0) die("fork failed");
    if (child == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent) _exit(2);
        pin(o.cpu_back);
        const int rc = o.mode == "rtt" ? rtt_backend(o) : handoff_backend(o);
        // exit(), not _exit(): the runtime's destructor unregisters from RouDi.
        // Nothing else is pending: stdio was flushed before fork.
        std::exit(rc);
    }
    std::fprintf(stderr, "iox_peer: %s frontend pid %d on CPU %d, backend pid %d on CPU %d\n", o.mode.c_str(),
                 static_cast<int>(parent), o.cpu_front, static_cast<int>(child), o.cpu_back);
    const int rc = o.mode == "rtt" ? rtt_frontend(o, child) : handoff_frontend(o, child);
    int status = 0;
    if (waitpid(child, &status, 0) != child) die("waitpid failed");
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        std::fprintf(stderr, "iox_peer: backend ended abnormally (status 0x%x)\n", status);
        return 1;
    }
    return rc;
}
