// A prototype native frontend (measured by benchmarks/native_floor.py and `gateway_load --frontend
// native`; not part of the product): grpc++ accepts Predict calls, a dynamic batcher queues their raw
// bytes, and one dispatcher thread per Python worker (unix socket) hands the worker whole batches (at
// most --max-batch requests and --max-batch-bytes) and answers each call from the worker's reply. Admission: a request that would wait longer than
// --max-queue-us, or past its deadline, is refused RESOURCE_EXHAUSTED at arrival (UNAVAILABLE once no
// worker is left). The expected wait is
// (queued requests x --cost-us + queued bytes x --cost-ns-per-byte / 1000) / workers: a request's
// compute grows with its samples, and so do its bytes (Criteo INT8 on this host: ~100 us for a
// 503-byte W1 request, ~7 ms for a 120 KB W2 one). A request whose deadline passed while it was queued
// (or that its client cancelled) is answered DEADLINE_EXCEEDED without compute.
//
// --echo answers every call with an empty message at once (no workers): the native ceiling, as
// gateway_load's Python echo is Python gRPC's.
//
// Wire to a worker, little-endian: batch = u32 n, n x (u32 len, bytes); reply = u32 n, n x (u8 grpc
// status code, u32 len, bytes: the serialized response, or the error message).
#include <absl/synchronization/mutex.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/generic/async_generic_service.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

using Clock = std::chrono::steady_clock;
static const char* kMethod = "/recsys.v1.InferenceGateway/Predict";

struct Config {
  std::string addr = "127.0.0.1:0", sock;
  int workers = 2, max_batch = 256;
  long max_batch_bytes = 131072;  // ~256 one-sample Criteo requests, or one of 256 samples
  long max_delay_us = 500, max_queue_us = 0, cost_us = 70, cost_ns_per_byte = 60;
  bool echo = false;
};
static Config cfg;

class Call;
struct Item { Call* call; std::string body; Clock::time_point deadline; };
static std::mutex mu;
static std::condition_variable cv;
static std::deque<Item> queue_;
static long queued_bytes = 0;  // of the requests in queue_ (admission's expected wait)
static int live_workers = 0;  // dispatchers whose worker still answers

class Call : public grpc::ServerGenericBidiReactor {
 public:
  explicit Call(grpc::GenericCallbackServerContext* ctx) : ctx_(ctx) { StartRead(&req_); }
  void OnReadDone(bool ok) override {
    if (!ok) { Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "no request message")); return; }
    if (ctx_->method() != kMethod) { Finish(grpc::Status(grpc::StatusCode::UNIMPLEMENTED, ctx_->method())); return; }
    if (cfg.echo) { Answer(0, std::string()); return; }
    std::vector<grpc::Slice> slices;
    req_.Dump(&slices);
    std::string body;
    for (auto& s : slices) body.append(reinterpret_cast<const char*>(s.begin()), s.size());
    auto now = Clock::now();
    auto left = ctx_->deadline() - std::chrono::system_clock::now();
    auto deadline = left > std::chrono::hours(24) ? Clock::time_point::max()
                                                   : now + std::chrono::duration_cast<Clock::duration>(left);
    {
      std::unique_lock<std::mutex> lk(mu);
      if (live_workers == 0) {
        lk.unlock();
        Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "no worker is serving"));
        return;
      }
      long wait_us = (static_cast<long>(queue_.size() + 1) * cfg.cost_us +
                      (queued_bytes + static_cast<long>(body.size())) * cfg.cost_ns_per_byte / 1000) / live_workers;
      if (cfg.max_queue_us > 0 && wait_us > cfg.max_queue_us) {
        lk.unlock();
        Finish(grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                            "overloaded: expected queue wait " + std::to_string(wait_us / 1000) +
                                " ms exceeds max_queue_us " + std::to_string(cfg.max_queue_us / 1000) + " ms"));
        return;
      }
      if (deadline != Clock::time_point::max() && now + std::chrono::microseconds(wait_us) > deadline) {
        lk.unlock();
        Finish(grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, "overloaded: expected queue wait " +
                                                                     std::to_string(wait_us / 1000) +
                                                                     " ms exceeds the request's remaining deadline"));
        return;
      }
      queued_bytes += static_cast<long>(body.size());
      queue_.push_back(Item{this, std::move(body), deadline});
    }
    cv.notify_one();
  }
  void Answer(int code, std::string bytes) {
    if (code == 0) {
      grpc::Slice s(bytes);
      resp_ = grpc::ByteBuffer(&s, 1);
      StartWriteAndFinish(&resp_, grpc::WriteOptions(), grpc::Status::OK);
    } else {
      Finish(grpc::Status(static_cast<grpc::StatusCode>(code), bytes));
    }
  }
  void OnDone() override { delete this; }
  bool Cancelled() const { return ctx_->IsCancelled(); }

 private:
  grpc::GenericCallbackServerContext* ctx_;
  grpc::ByteBuffer req_, resp_;
};

class Service : public grpc::CallbackGenericService {
  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext* ctx) override {
    return new Call(ctx);
  }
};

static bool read_all(int fd, void* p, size_t n) {
  char* c = static_cast<char*>(p);
  while (n) { ssize_t r = ::read(fd, c, n); if (r <= 0) return false; c += r; n -= r; }
  return true;
}

static bool write_all(int fd, const void* p, size_t n) {
  const char* c = static_cast<const char*>(p);
  while (n) { ssize_t r = ::write(fd, c, n); if (r <= 0) return false; c += r; n -= r; }
  return true;
}

static void dispatch(int fd) {
  std::vector<Item> batch, expired;
  std::string frame, reply;
  for (;;) {
    batch.clear();
    expired.clear();
    {
      std::unique_lock<std::mutex> lk(mu);
      cv.wait(lk, [] { return !queue_.empty(); });
      auto full = [] {
        return static_cast<int>(queue_.size()) >= cfg.max_batch || queued_bytes >= cfg.max_batch_bytes;
      };
      if (cfg.max_delay_us > 0 && !full()) {
        auto until = Clock::now() + std::chrono::microseconds(cfg.max_delay_us);
        cv.wait_until(lk, until, full);
      }
      auto now = Clock::now();
      long bytes = 0;  // a batch is bounded in requests and in bytes (samples), so no worker takes them all
      while (!queue_.empty() && static_cast<int>(batch.size()) < cfg.max_batch &&
             (batch.empty() || bytes + static_cast<long>(queue_.front().body.size()) <= cfg.max_batch_bytes)) {
        Item it = std::move(queue_.front());
        queue_.pop_front();
        queued_bytes -= static_cast<long>(it.body.size());
        if (it.deadline < now || it.call->Cancelled()) {  // answered without compute
          expired.push_back(std::move(it));
          continue;
        }
        bytes += static_cast<long>(it.body.size());
        batch.push_back(std::move(it));
      }
      if (!queue_.empty()) cv.notify_one();
    }
    for (auto& it : expired) it.call->Answer(4, "deadline passed (or cancelled) while queued; dropped before compute");
    if (batch.empty()) continue;
    frame.clear();
    uint32_t n = batch.size();
    frame.append(reinterpret_cast<char*>(&n), 4);
    for (auto& it : batch) {
      uint32_t len = it.body.size();
      frame.append(reinterpret_cast<char*>(&len), 4);
      frame.append(it.body);
    }
    bool ok = write_all(fd, frame.data(), frame.size());
    uint32_t m = 0;
    ok = ok && read_all(fd, &m, 4) && m == n;
    for (uint32_t i = 0; i < n; ++i) {
      uint8_t code = 13;
      uint32_t len = 0;
      if (ok && read_all(fd, &code, 1) && read_all(fd, &len, 4)) {
        reply.resize(len);
        if (read_all(fd, reply.data(), len)) { batch[i].call->Answer(code, reply); continue; }
      }
      ok = false;
      batch[i].call->Answer(13, "worker lost");
    }
    if (!ok) {
      std::fprintf(stderr, "worker lost\n");
      ::close(fd);
      std::lock_guard<std::mutex> lk(mu);
      --live_workers;  // at 0 new calls are refused UNAVAILABLE; queued ones wait for their deadlines
      return;
    }
  }
}

static void serve() {
  int port = 0;
  Service svc;
  grpc::ServerBuilder b;
  b.AddListeningPort(cfg.addr, grpc::InsecureServerCredentials(), &port);
  b.RegisterCallbackGenericService(&svc);
  auto server = b.BuildAndStart();
  std::printf("{\"event\": \"serving\", \"port\": %d}\n", port);
  std::fflush(stdout);
  server->Wait();
}

int main(int argc, char** argv) {
  // Debian's abseil checks every Mutex for lock-order cycles (GraphCycles: ~4% of the frontend's CPU)
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  std::signal(SIGPIPE, SIG_IGN);  // a worker gone between batches: write() fails, and the dispatcher stops
  for (int i = 1; i < argc; ++i) {
    std::string k = argv[i];
    if (k == "--echo") { cfg.echo = true; continue; }
    if (i + 1 >= argc) { std::fprintf(stderr, "%s needs a value\n", k.c_str()); return 2; }
    std::string v = argv[++i];
    if (k == "--addr") cfg.addr = v;
    else if (k == "--socket") cfg.sock = v;
    else if (k == "--workers") cfg.workers = std::atoi(v.c_str());
    else if (k == "--max-batch") cfg.max_batch = std::atoi(v.c_str());
    else if (k == "--max-batch-bytes") cfg.max_batch_bytes = std::atol(v.c_str());
    else if (k == "--max-delay-us") cfg.max_delay_us = std::atol(v.c_str());
    else if (k == "--max-queue-us") cfg.max_queue_us = std::atol(v.c_str());
    else if (k == "--cost-us") cfg.cost_us = std::atol(v.c_str());
    else if (k == "--cost-ns-per-byte") cfg.cost_ns_per_byte = std::atol(v.c_str());
    else { std::fprintf(stderr, "unknown flag %s\n", k.c_str()); return 2; }
  }
  if (cfg.echo) { serve(); return 0; }
  int ls = ::socket(AF_UNIX, SOCK_STREAM, 0);
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  std::strncpy(sa.sun_path, cfg.sock.c_str(), sizeof(sa.sun_path) - 1);
  ::unlink(cfg.sock.c_str());
  if (::bind(ls, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) || ::listen(ls, 64)) { perror("socket"); return 1; }
  std::printf("{\"event\": \"listening\", \"socket\": \"%s\"}\n", cfg.sock.c_str());
  std::fflush(stdout);
  std::vector<std::thread> threads;
  for (int w = 0; w < cfg.workers; ++w) {
    int fd = ::accept(ls, nullptr, nullptr);
    if (fd < 0) { perror("accept"); return 1; }
    {
      std::lock_guard<std::mutex> lk(mu);
      ++live_workers;
    }
    threads.emplace_back(dispatch, fd);
  }
  serve();
}
