// The open-loop probe of the benchmarks' overload and latency phases: a native gRPC client that sends unary
// calls on a fixed schedule and times each from its schedule, whatever the status.
//
// Why native: beside h2load (which cannot tell a refusal from an answer: both are HTTP 200) a probe must say
// which code each call got and how fast. The Python asyncio probe did, but on 2 cores saturated by the
// gateway and h2load its own event loop ran late by tens of milliseconds, so a refusal the frontend sent at
// arrival was timed at 26-57 ms p99. A grpc++ callback client spends microseconds a call and is woken by the
// kernel, not by an interpreter that has to get the GIL and a core first.
//
//     probe ADDRESS METHOD BODIES RATE SECONDS [TIMEOUT_MS]
//
// BODIES: the request bodies, each as a little-endian u32 length and the bytes; call i sends body i mod n
// at start + i / RATE, with a deadline of TIMEOUT_MS (default 10000) from its send. Output, once every call
// is answered: `sent SENT_FOR_US DONE_US` (how long sending took, and from the start to the last answer),
// then one line a call, `CODE LATENCY_US DETAILS` (the gRPC status code, the time from its schedule to its
// answer, and the status message on one line: it says who refused), in the order answers came.
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

using Clock = std::chrono::steady_clock;

namespace {

struct Pending {
  grpc::ClientContext ctx;
  grpc::ByteBuffer response;
  Clock::time_point scheduled;
};

struct Result {
  int code;
  long us;
  std::string details;
};

std::mutex mu;
std::condition_variable all_done;
std::vector<Result> results;  // under mu
long outstanding = 0;         // under mu
Clock::time_point last_answer;  // under mu

int usage(const char* why) {
  std::fprintf(stderr, "probe: %s\nusage: probe ADDRESS METHOD BODIES RATE SECONDS [TIMEOUT_MS]\n", why);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 6 || argc > 7) return usage("wrong number of arguments");
  const std::string address = argv[1], method = argv[2];
  const double rate = std::atof(argv[4]), seconds = std::atof(argv[5]);
  const long timeout_ms = argc == 7 ? std::atol(argv[6]) : 10000;
  if (!(rate > 0) || !(seconds > 0) || timeout_ms <= 0) return usage("RATE, SECONDS and TIMEOUT_MS must be positive");
  std::ifstream in(argv[3], std::ios::binary);
  if (!in) return usage("BODIES: cannot be read");
  const std::string raw((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<grpc::ByteBuffer> bodies;  // built once: a call sends one without copying it
  for (size_t at = 0; at < raw.size();) {
    if (raw.size() - at < 4) return usage("BODIES: the file ends inside a length");
    uint32_t len = static_cast<unsigned char>(raw[at]) | static_cast<unsigned char>(raw[at + 1]) << 8 |
                   static_cast<unsigned char>(raw[at + 2]) << 16 | static_cast<uint32_t>(
                       static_cast<unsigned char>(raw[at + 3])) << 24;
    if (at + 4 + len > raw.size()) return usage("BODIES: a length runs past the end of the file");
    grpc::Slice s(raw.data() + at + 4, len);
    bodies.emplace_back(&s, 1);
    at += 4 + len;
  }
  if (bodies.empty()) return usage("BODIES: no request in the file");

  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_ENABLE_RETRIES, 0);  // a refusal is measured, never retried
  grpc::GenericStub stub(grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args));
  const long total = static_cast<long>(rate * seconds);
  results.reserve(total);
  const auto start = Clock::now();
  last_answer = start;
  for (long i = 0; i < total; ++i) {
    auto scheduled = start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(i / rate));
    std::this_thread::sleep_until(scheduled);
    auto* p = new Pending;
    p->scheduled = scheduled;
    p->ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(timeout_ms));
    {
      std::lock_guard<std::mutex> lk(mu);
      ++outstanding;
    }
    stub.UnaryCall(&p->ctx, method, grpc::StubOptions(), &bodies[i % bodies.size()], &p->response,
                   [p](grpc::Status st) {
                     auto now = Clock::now();
                     long us = std::chrono::duration_cast<std::chrono::microseconds>(now - p->scheduled).count();
                     delete p;
                     std::string details = st.error_message();
                     for (auto& c : details) if (c == '\n' || c == '\r') c = ' ';
                     std::lock_guard<std::mutex> lk(mu);
                     results.push_back(Result{static_cast<int>(st.error_code()), us, std::move(details)});
                     last_answer = std::max(last_answer, now);
                     if (--outstanding == 0) all_done.notify_all();
                   });
  }
  const long sent_for = std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - start).count();
  std::unique_lock<std::mutex> lk(mu);
  all_done.wait(lk, [] { return outstanding == 0; });
  const long done = std::chrono::duration_cast<std::chrono::microseconds>(last_answer - start).count();
  std::printf("sent %ld %ld\n", sent_for, done);
  for (auto& r : results) std::printf("%d %ld %s\n", r.code, r.us, r.details.c_str());
  return 0;
}
