// serve-native's frontend: an HTTP/2 engine accepts Predict and Open Inference Protocol ModelInfer calls, a
// dynamic batcher queues their raw bytes, and one dispatcher thread per connected Python worker (unix socket)
// hands that worker whole batches (at most --max-batch requests and --max-batch-bytes, waiting at most
// --max-delay-us for more) and answers each call from the worker's reply. Why native: a Python gRPC server
// spends ~0.3 ms of CPU per unary call before any model work. Two engines serve the same methods: --engine h2
// (namespace h2e below: one epoll thread on nghttp2 and OpenSSL, 3-5 us of CPU a call in plaintext) and --engine
// grpc (grpc++'s callback API, 17-27 us a call); benchmarks/h2_floor.py and gateway_frontend.md.
//
// Workers connect at any time (the supervisor replaces one that dies); gRPC health (the default health
// service, "" and recsys.v1.InferenceGateway) is SERVING while at least one worker is connected. The
// requests of a worker lost while scoring (or just before) go back to the front of the queue, once (scoring
// is pure); a request whose worker is lost a second time is answered UNAVAILABLE, so none crashes them all.
//
// Admission: a request whose expected wait, (queued requests x --cost-us + queued bytes x
// --cost-ns-per-byte / 1000) / workers, scaled by how the batches' measured times compare with that model
// (cost_scale), exceeds --max-queue-us (0: no bound of its own) or its own deadline is refused
// RESOURCE_EXHAUSTED at arrival; with no worker connected, UNAVAILABLE. A request's compute grows with its
// samples and so do its bytes (Criteo INT8 on 2 cores, quiet: ~100 us for a 503-byte one-sample request,
// ~7 ms for a 120 KB 256-sample one). One whose deadline passes (or whose client cancels) while
// queued is answered DEADLINE_EXCEEDED without compute.
//
// Methods: recsys.v1.InferenceGateway/Predict, its PredictStream (each message admitted as a Predict,
// answered on the stream as it is ready, a failed one with `error` set) and the OIP's ModelInfer (admitted,
// batched, scored together; with --predict-token-file these need `authorization: Bearer <token>`), the OIP's
// ModelMetadata, ModelReady and ServerMetadata (answered by a worker, no admission), ServerLive and
// ServerReady (answered here: ready while a worker is connected), grpc.health.v1.Health, and with
// --reflection FILE gRPC server reflection (grpc.reflection.v1alpha and v1: the supervisor computes every
// answer once from the Python stubs, native/reflection.py; no admission, not counted). --tls-cert /
// --tls-key (and --tls-client-ca: mutual TLS) serve TLS; the files are read here, never passed as text.
//
// SIGTERM: health NOT_SERVING, new calls refused UNAVAILABLE, queued and in-flight calls answered within
// --grace-ms, exit 0.
//
// stdout carries JSON lines for the supervisor: {"event": "serving", "port"} (workers may connect then),
// {"event": "worker_joined" | "worker_lost" | "worker_retired", "pid", "workers"}, {"event": "stats", ...}
// (cumulative counters, at most once a second when they changed, and once more after draining),
// {"event": "draining"}. stdin carries the supervisor's orders: `retire PID` (a model swap replaces the
// workers: that one takes no further batch and is closed once the batch it holds is answered).
//
// --access-log writes one JSON line per answered call (not health or reflection) on stderr, as serve's.
//
// --echo answers every call with an empty message at once (no workers): grpc++'s own cost per call.
//
// --sched-batch runs the dispatcher threads under SCHED_BATCH: they do not preempt a worker's batch (dispatch).
//
// --max-streams N advertises SETTINGS_MAX_CONCURRENT_STREAMS N: a client connection has at most N calls in flight.
// A refusal costs grpc++ a whole call, so without it an open-loop client past what the frontend can refuse fills
// the sockets and every call waits there, refused or not.
//
// --handshake-timeout-ms N (--engine h2; default 10 s): a client connection that has sent no HTTP/2 frame N ms
// after it was accepted (silent, or stalled in the TLS handshake) is closed; grpc++ has its own (120 s).
//
// Wire to a worker (inference_gateway/native/worker.py), little-endian: batch = u32 n, n x (u8 method,
// u32 len, bytes); reply = u32 n, n x (u8 gRPC status code, u32 len, bytes: the serialized response, or the
// error). Method numbers are kMethods' order (worker.METHODS).
#include <absl/synchronization/mutex.h>
#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/impl/codegen/server_callback_handlers.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <nghttp2/nghttp2.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <pthread.h>
#include <sched.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <deque>
#include <fstream>
#include <sstream>
#include <iostream>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

using Clock = std::chrono::steady_clock;
static const char* kService = "recsys.v1.InferenceGateway";
struct Method { const char* path; const char* name; bool infer; };  // infer: admitted, token-guarded
static const Method kMethods[] = {  // worker.METHODS: the same order
    {"/recsys.v1.InferenceGateway/Predict", "Predict", true},
    {"/inference.GRPCInferenceService/ModelInfer", "ModelInfer", true},
    {"/inference.GRPCInferenceService/ModelMetadata", "ModelMetadata", false},
    {"/inference.GRPCInferenceService/ModelReady", "ModelReady", false},
    {"/inference.GRPCInferenceService/ServerMetadata", "ServerMetadata", false},
    {"/recsys.v1.InferenceGateway/PredictStream", "PredictStream", true},  // per message; a worker scores as Predict
};
static const int kStream = 5;  // kMethods' PredictStream
static const int kForwarded = sizeof(kMethods) / sizeof(kMethods[0]);
static const char* kLocal[] = {"ServerLive", "ServerReady", "other"};  // answered here, after kMethods
static const int kCounted = kForwarded + 3;

struct Config {
  std::string addr = "127.0.0.1:0", sock, token, tls_cert, tls_key, tls_client_ca;
  int max_batch = 256;
  long max_batch_bytes = 131072;  // ~256 one-sample Criteo requests, or one of 256 samples
  long max_delay_us = 500, max_queue_us = 0, cost_us = 70, cost_ns_per_byte = 60, grace_ms = 10000;
  long max_streams = 0;  // HTTP/2 streams a client may open at once on one connection (0: grpc's default)
  long handshake_ms = 10000;  // --engine h2: a connection that sent no HTTP/2 frame by then is closed
  bool echo = false, access_log = false, sched_batch = false, h2 = false;  // h2: --engine h2
};
static Config cfg;

// What a queued request is answered through: a unary call, or one message of a PredictStream.
class Sink {
 public:
  virtual ~Sink() = default;
  virtual void Answer(int code, const std::string& bytes) = 0;
  virtual bool Cancelled() const = 0;
};
struct Item {
  Sink* call;
  int method;
  std::string body;
  Clock::time_point deadline;
  bool retried = false;  // its batch's worker died once already (a request is retried once: no crash loops)
};
static std::mutex mu;
static std::condition_variable cv;
static std::set<long> retiring;  // worker pids the supervisor retired (stdin `retire PID`), under mu
static std::deque<Item> queue_;
static long queued_bytes = 0;  // of the requests in queue_ (admission's expected wait)
// Admission's cost model learns how far off it is: exponentially weighted sums of the measured wall time of
// the batches and of what --cost-us and --cost-ns-per-byte predicted for them (big batches weigh most); the
// expected wait is scaled by their ratio, so it follows the CPU the workers really get (under contention a
// request costs several times its quiet figure, and a fixed bound let the queue grow past it). Under mu.
static double seen_us = 0, predicted_us = 0;
static double busy_us = 0;  // the model's cost of the batches at workers now (half of it is still ahead)
static double cost_of(const std::string& body) {
  return static_cast<double>(cfg.cost_us) + static_cast<double>(body.size()) * cfg.cost_ns_per_byte / 1000;
}
static double cost_scale() {
  return predicted_us > 0 ? std::min(1e4, std::max(0.01, seen_us / predicted_us)) : 1.0;
}
static int live_workers = 0;   // dispatchers whose worker still answers
static grpc::Server* server_ = nullptr;
static std::mutex out_mu;  // one JSON line at a time on stdout

// counters for the supervisor's /metrics (cumulative)
static std::atomic<long> answered[kCounted][17];  // by method (kMethods, then kLocal) and gRPC status code
static std::atomic<bool> draining{false};
static std::atomic<long> received{0}, admission_refusals{0}, expired{0}, batches{0}, batched_requests{0}, batch_us{0};
static std::atomic<long> last_arrival_us{0};  // steady clock, for the drain's quiet period

static long steady_us() {
  return std::chrono::duration_cast<std::chrono::microseconds>(Clock::now().time_since_epoch()).count();
}

static bool read_file(const std::string& path, std::string* out, bool strip = false) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return false;
  std::ostringstream ss;
  ss << f.rdbuf();
  *out = ss.str();
  if (strip) {
    auto b = out->find_first_not_of(" \t\r\n"), e = out->find_last_not_of(" \t\r\n");
    *out = b == std::string::npos ? std::string() : out->substr(b, e - b + 1);
  }
  return !out->empty();
}

static void arrived() {  // one request (or stream message) read
  ++received;
  last_arrival_us = steady_us();
}

static void emit(const std::string& json) {
  std::lock_guard<std::mutex> lk(out_mu);
  std::fputs(json.c_str(), stdout);
  std::fputc('\n', stdout);
  std::fflush(stdout);
}

static std::atomic<bool> health_serving{false};  // --engine h2's health service reads it
static void (*h2_health_changed)() = nullptr;    // --engine h2: tells its Health/Watch streams (on its loop)
static void (*h2_drain_streams)() = nullptr;     // --engine h2: SIGTERM's end of its streams (on its loop)

static void set_health(bool serving) {
  health_serving = serving;
  if (h2_health_changed != nullptr) h2_health_changed();
  if (server_ == nullptr) return;
  auto* h = server_->GetHealthCheckService();
  h->SetServingStatus("", serving);
  h->SetServingStatus(kService, serving);
}

static bool same(const std::string& a, const std::string& b) {  // constant time in the token's length
  unsigned char d = a.size() != b.size();
  for (size_t i = 0; i < a.size(); ++i) d |= static_cast<unsigned char>(a[i] ^ (i < b.size() ? b[i] : 0));
  return d == 0;
}

static std::string body_of(const grpc::ByteBuffer& buf) {
  std::vector<grpc::Slice> slices;
  buf.Dump(&slices);
  std::string body;
  for (auto& s : slices) body.append(reinterpret_cast<const char*>(s.begin()), s.size());
  return body;
}

static Clock::time_point deadline_of(std::chrono::system_clock::duration left) {
  return left > std::chrono::hours(24) ? Clock::time_point::max()
                                       : Clock::now() + std::chrono::duration_cast<Clock::duration>(left);
}

// Queues a request for the workers, or refuses it: 0, or the status code with `refusal` set (draining, no
// worker, or an expected queue wait past --max-queue-us or past the request's deadline).
static int admit(Sink* sink, int method, std::string body, Clock::time_point deadline, std::string* refusal) {
  auto now = Clock::now();
  int code = 8;
  bool wake = false;
  refusal->clear();
  {
    std::unique_lock<std::mutex> lk(mu);
    double queued_us = static_cast<double>(queue_.size()) * cfg.cost_us +
                       static_cast<double>(queued_bytes) * cfg.cost_ns_per_byte / 1000;
    long wait_us = live_workers == 0 ? 0 : static_cast<long>(cost_scale() *
        (queued_us + busy_us / 2 + cost_of(body)) / live_workers);
    if (draining) {
      code = 14;
      *refusal = "the gateway is draining (SIGTERM): send the request to another replica";
    } else if (live_workers == 0) {
      code = 14;
      *refusal = "no worker is serving (the supervisor is replacing them)";
    } else if (queue_.empty() && busy_us <= 0) {
      // idle: admitted whatever the estimate says (a scale learned from one slow batch must not refuse every
      // request of an idle gateway, which would leave no batch to learn better from)
    } else if (kMethods[method].infer && cfg.max_queue_us > 0 && wait_us > cfg.max_queue_us) {
      *refusal = "overloaded: expected queue wait " + std::to_string(wait_us / 1000) +
                 " ms exceeds max_queue_wait_ms " + std::to_string(cfg.max_queue_us / 1000);
    } else if (kMethods[method].infer && deadline != Clock::time_point::max() &&
               now + std::chrono::microseconds(wait_us) > deadline) {
      *refusal = "overloaded: expected queue wait " + std::to_string(wait_us / 1000) +
                 " ms exceeds the request's remaining deadline";
    }
    if (refusal->empty() && code == 8) {
      queued_bytes += static_cast<long>(body.size());
      queue_.push_back(Item{sink, method, std::move(body), deadline});
      code = 0;
      // a dispatcher waits for the first request, then for a full batch (or its --max-delay-us): waking it
      // for every request in between cost a futex wake-up and a context switch a request
      wake = queue_.size() == 1 || static_cast<int>(queue_.size()) >= cfg.max_batch ||
             queued_bytes >= cfg.max_batch_bytes;
    }
  }
  if (wake) {
    cv.notify_one();
  } else if (code == 8) {
    ++admission_refusals;
  }
  return code;
}

// `authorization: Bearer <--predict-token-file's token>` on Predict, PredictStream and ModelInfer: 0, or the
// status code with `refusal` set.
static int check_token(const std::string& value, const char* path, std::string* refusal) {
  if (cfg.token.empty()) return 0;
  auto space = value.find(' ');
  std::string scheme = value.substr(0, space == std::string::npos ? value.size() : space);
  for (auto& c : scheme) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  std::string given = space == std::string::npos ? std::string() : value.substr(space + 1);
  while (!given.empty() && (given.back() == ' ' || given.back() == '\t')) given.pop_back();
  if (scheme != "bearer" || given.empty()) { *refusal = std::string("missing bearer token for ") + path; return 16; }
  if (!same(given, cfg.token)) { *refusal = std::string("wrong bearer token for ") + path; return 7; }
  return 0;
}

// The call's `authorization` header (grpc++), looked up only when --predict-token-file asks for one.
static std::string authorization_of(const grpc::ServerContextBase& ctx) {
  if (cfg.token.empty()) return std::string();
  auto& md = ctx.client_metadata();
  auto it = md.find("authorization");
  return it == md.end() ? std::string() : std::string(it->second.data(), it->second.size());
}

// PredictResponse fields: request_id = 4, error = 5 (Status: code = 1, message = 2).
static void put_varint(std::string* out, uint64_t v) {
  while (v >= 0x80) { out->push_back(static_cast<char>((v & 0x7f) | 0x80)); v >>= 7; }
  out->push_back(static_cast<char>(v));
}

static bool get_varint(const std::string& b, size_t* at, uint64_t* v) {
  *v = 0;
  for (int shift = 0; shift < 64 && *at < b.size(); shift += 7) {
    uint8_t c = static_cast<uint8_t>(b[(*at)++]);
    *v |= static_cast<uint64_t>(c & 0x7f) << shift;
    if (!(c & 0x80)) return true;
  }
  return false;
}

// A field of a serialized message: its number, a varint's value, or where a length-delimited one's bytes are.
struct Field {
  uint64_t number = 0, value = 0;
  bool delimited = false;
  size_t start = 0, len = 0;
};

// The field at `at` (advanced past it); false at a malformed one.
static bool next_field(const std::string& b, size_t* at, Field* f) {
  uint64_t key;
  if (!get_varint(b, at, &key)) return false;
  f->number = key >> 3;
  f->delimited = (key & 7) == 2;
  f->value = 0;
  switch (key & 7) {
    case 0: return get_varint(b, at, &f->value);
    case 1: if (b.size() - *at < 8) return false; *at += 8; return true;
    case 5: if (b.size() - *at < 4) return false; *at += 4; return true;
    case 2:
      if (!get_varint(b, at, &f->value) || f->value > b.size() - *at) return false;
      f->start = *at;
      f->len = f->value;
      *at += f->len;
      return true;
    default: return false;
  }
}

// PredictRequest.request_id (field 7) from the serialized request; empty when absent or malformed.
static std::string request_id_of(const std::string& b) {
  size_t at = 0;
  Field f;
  std::string id;
  while (at < b.size()) {
    if (!next_field(b, &at, &f)) return std::string();
    if (f.number == 7 && f.delimited) id = b.substr(f.start, f.len);
  }
  return id;
}

// --access-log: one line per answered call on stderr, as serve's `inference_gateway.access` logger writes it
// ({"method", "request_id", "model", "version", "samples", "code", "ms"}, "error" when not OK).
struct Access {
  Clock::time_point start = Clock::now();
  std::string request_id, model, version;  // version as JSON: Predict's a number, the OIP's a string
  long samples = -1;
};

static long first_dim(const std::string& b, const Field& tensor, uint64_t shape_field) {
  std::string t = b.substr(tensor.start, tensor.len);
  size_t at = 0;
  Field f;
  while (at < t.size() && next_field(t, &at, &f)) {
    if (f.number != shape_field) continue;
    if (!f.delimited) return static_cast<long>(f.value);
    size_t in = f.start;
    uint64_t v;
    return f.len && get_varint(t, &in, &v) ? static_cast<long>(v) : -1;  // packed
  }
  return -1;
}

// The length of the valid UTF-8 sequence at v[i], or 0 (a client's strings reach the log unchecked by grpc).
static size_t utf8_at(const std::string& v, size_t i) {
  auto c = static_cast<unsigned char>(v[i]);
  size_t n = c < 0x80                  ? 1
             : (c >= 0xc2 && c <= 0xdf) ? 2
             : (c >= 0xe0 && c <= 0xef) ? 3
             : (c >= 0xf0 && c <= 0xf4) ? 4
                                        : 0;
  if (n == 0 || i + n > v.size()) return 0;
  for (size_t k = 1; k < n; ++k) if ((static_cast<unsigned char>(v[i + k]) >> 6) != 0x2) return 0;
  auto d = static_cast<unsigned char>(v[i + (n > 1)]);  // no overlong forms, surrogates or code points past U+10FFFF
  if ((c == 0xe0 && d < 0xa0) || (c == 0xed && d >= 0xa0) || (c == 0xf0 && d < 0x90) || (c == 0xf4 && d >= 0x90)) {
    return 0;
  }
  return n;
}

// A JSON string of `v`: quotes, backslashes and control characters escaped, a byte that is not UTF-8 as U+FFFD.
static std::string json_string(const std::string& v) {
  std::string out = "\"";
  for (size_t i = 0; i < v.size();) {
    auto c = static_cast<unsigned char>(v[i]);
    size_t n = utf8_at(v, i);
    if (n == 0) { out += "\\ufffd"; ++i; continue; }
    if (c == '"' || c == '\\') { out.push_back('\\'); out.push_back(static_cast<char>(c)); }
    else if (c < 0x20) { char e[8]; std::snprintf(e, sizeof(e), "\\u%04x", c); out += e; }
    else out.append(v, i, n);
    i += n;
  }
  return out + "\"";
}

// The access-log fields a Predict or ModelInfer request, or its OK response, carries. PredictRequest: model 1,
// version 2, dense 3 (Tensor: shape 2), request_id 7; PredictResponse: scores 1, model 2, version 3,
// request_id 4; ModelInferRequest / Response: model_name 1, model_version 2, id 3, first input / output 5
// (shape 3).
static void access_fields(int method, bool response, const std::string& b, Access* a) {
  bool predict = method == 0 || method == kStream, infer = method == 1;
  if (!predict && !infer) return;
  size_t at = 0;
  Field f;
  bool tensor_seen = false;
  while (at < b.size() && next_field(b, &at, &f)) {
    auto text = [&] { return b.substr(f.start, f.len); };
    if (predict) {
      uint64_t model = response ? 2 : 1, version = response ? 3 : 2, tensor = response ? 1 : 3, id = response ? 4 : 7;
      if (f.number == model && f.delimited) a->model = text();
      else if (f.number == version && !f.delimited) a->version = std::to_string(static_cast<int64_t>(f.value));
      else if (f.number == tensor && f.delimited) a->samples = first_dim(b, f, 2);
      else if (f.number == id && f.delimited) a->request_id = text();
    } else if (f.delimited) {
      if (f.number == 1) a->model = text();
      else if (f.number == 2) a->version = json_string(text());
      else if (f.number == 3) a->request_id = text();
      else if (f.number == 5 && !tensor_seen) { a->samples = first_dim(b, f, 3); tensor_seen = true; }
    }
  }
}

static const char* kCodeNames[] = {"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
                                   "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
                                   "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
                                   "UNAUTHENTICATED"};
static std::mutex err_mu;

static void log_access(int method, int code, const std::string& bytes, Access* a) {
  double ms = std::chrono::duration<double, std::milli>(Clock::now() - a->start).count();
  if (code == 0) access_fields(method, true, bytes, a);  // the model and version that answered
  auto now = std::chrono::system_clock::now();
  std::time_t t = std::chrono::system_clock::to_time_t(now);
  std::tm tm{};
  ::localtime_r(&t, &tm);
  char when[40], took[32];
  std::strftime(when, sizeof(when), "%Y-%m-%d %H:%M:%S", &tm);
  std::snprintf(took, sizeof(took), "%.3f", ms);
  long millis = std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count() % 1000;
  std::string name = method < kForwarded ? kMethods[method].name : kLocal[method - kForwarded];
  std::string line = std::string(when) + "," + (millis < 100 ? (millis < 10 ? "00" : "0") : "") +
                     std::to_string(millis) + " INFO inference_gateway.access: {\"method\": " + json_string(name);
  if (method == 0 || method == 1 || method == kStream) {
    std::string version = a->version.empty() ? (method == 1 ? "\"\"" : "0") : a->version;  // no request read
    line += ", \"request_id\": " + json_string(a->request_id) + ", \"model\": " + json_string(a->model) +
            ", \"version\": " + version + ", \"samples\": " +
            (a->samples < 0 ? "null" : std::to_string(a->samples));
  }
  line += ", \"code\": " + json_string(code >= 0 && code <= 16 ? kCodeNames[code] : "UNKNOWN") + ", \"ms\": " + took;
  if (code != 0) line += ", \"error\": " + json_string(bytes);
  line += "}\n";
  std::lock_guard<std::mutex> lk(err_mu);
  std::fputs(line.c_str(), stderr);
}

// One answered call in the counters (by method and status code) and, with --access-log, its line.
static void account(int method, int code, const std::string& bytes, Access* a) {
  ++answered[method][code < 0 || code > 16 ? 2 : code];
  if (cfg.access_log) log_access(method, code, bytes, a);
}

// What a call to a method neither engine serves is told (UNIMPLEMENTED).
static std::string not_served(const std::string& path) {
  return "method " + path + " is not served by serve-native (it serves recsys.v1.InferenceGateway's Predict and "
         "PredictStream, inference.GRPCInferenceService, grpc.health.v1.Health and, with its table, grpc.reflection)";
}

// The answers a unary call gets without a worker (either engine): --echo's empty one, ServerLive and ServerReady
// (bool field 1; ready while a worker is connected and no drain). True when it was answered.
static bool answered_here(Sink* call, int method) {
  if (cfg.echo) { call->Answer(0, std::string()); return true; }
  if (method < kForwarded) return false;
  bool yes = method == kForwarded;
  if (!yes) {
    std::lock_guard<std::mutex> lk(mu);
    yes = !draining && live_workers > 0;
  }
  call->Answer(0, yes ? std::string("\x08\x01", 2) : std::string());
  return true;
}

// A unary request for the workers (either engine): its access-log fields (a refused call's line names it too),
// the bearer token (Predict, ModelInfer), then admission; a refusal is answered here.
static void take_unary(Sink* call, int method, std::string body, const std::string& authorization,
                       Clock::time_point deadline, Access* access) {
  if (cfg.access_log) access_fields(method, false, body, access);
  std::string refusal;
  if (kMethods[method].infer) {
    int denied = check_token(authorization, kMethods[method].path, &refusal);
    if (denied) { call->Answer(denied, refusal); return; }
  }
  int code = admit(call, method, std::move(body), deadline, &refusal);
  if (code) call->Answer(code, refusal);
}

static std::string error_response(const std::string& request_id, int code, const std::string& message) {
  std::string status, out;
  if (code) { status.push_back(0x08); put_varint(&status, static_cast<uint64_t>(code)); }
  status.push_back(0x12);
  put_varint(&status, message.size());
  status += message;
  if (!request_id.empty()) { out.push_back(0x22); put_varint(&out, request_id.size()); out += request_id; }
  out.push_back(0x2a);
  put_varint(&out, status.size());
  return out + status;
}

// A unary call of a method registered with grpc++ (Predict, the OIP's unary methods): grpc++'s unary path hands
// over the request with the call and answers it in one batch, ~7 us of CPU a call less than the generic bidi
// path (15-16 against 21-26 us for an echo at 64 streams, h2load), for refusals as for answers.
class UnaryCall : public grpc::ServerUnaryReactor, public Sink {
 public:
  UnaryCall(grpc::CallbackServerContext* ctx, int method, grpc::ByteBuffer* resp)
      : ctx_(ctx), resp_(resp), method_(method) {}
  void Start(const grpc::ByteBuffer& req) {
    arrived();
    if (answered_here(this, method_)) return;
    take_unary(this, method_, body_of(req), authorization_of(*ctx_),
               deadline_of(ctx_->deadline() - std::chrono::system_clock::now()), &access_);
  }
  void Answer(int code, const std::string& bytes) override {
    account(method_, code, bytes, &access_);
    if (code == 0) {
      grpc::Slice s(bytes);
      *resp_ = grpc::ByteBuffer(&s, 1);
      Finish(grpc::Status::OK);
    } else {
      Finish(grpc::Status(static_cast<grpc::StatusCode>(code), bytes));
    }
  }
  void OnDone() override { delete this; }
  bool Cancelled() const override { return ctx_->IsCancelled(); }

 private:
  grpc::CallbackServerContext* ctx_;
  grpc::ByteBuffer* resp_;  // grpc++'s, alive until OnDone
  int method_;
  Access access_;
};

// The unary methods above as raw (ByteBuffer) callback methods: kMethods but PredictStream, then ServerLive and
// ServerReady.
class Unary : public grpc::Service {
 public:
  Unary() {
    int index = 0;
    for (int m = 0; m < kForwarded + 2; ++m) {
      if (m == kStream) continue;
      paths_.push_back(m < kForwarded ? kMethods[m].path
                                      : std::string("/inference.GRPCInferenceService/") + kLocal[m - kForwarded]);
      AddMethod(new grpc::internal::RpcServiceMethod(paths_.back().c_str(), grpc::internal::RpcMethod::NORMAL_RPC,
                                                     nullptr));
      MarkMethodRawCallback(index++, new grpc::internal::CallbackUnaryHandler<grpc::ByteBuffer, grpc::ByteBuffer>(
          [m](grpc::CallbackServerContext* ctx, const grpc::ByteBuffer* req, grpc::ByteBuffer* resp) {
            auto* call = new UnaryCall(ctx, m, resp);
            call->Start(*req);  // it may finish (or be answered by a dispatcher) before grpc++ holds it: allowed
            return call;
          }));
    }
  }

 private:
  std::deque<std::string> paths_;  // RpcServiceMethod keeps the pointer
};

// Any other method on the generic service: UNIMPLEMENTED (with --echo, an empty answer), counted as "other".
class Call : public grpc::ServerGenericBidiReactor {
 public:
  explicit Call(grpc::GenericCallbackServerContext* ctx) : ctx_(ctx) { StartRead(&req_); }
  void OnReadDone(bool) override {
    arrived();
    int code = cfg.echo ? 0 : 12;
    std::string why = cfg.echo ? std::string() : not_served(ctx_->method());
    Access a;
    account(kCounted - 1, code, why, &a);
    if (code == 0) {
      grpc::Slice empty("");
      resp_ = grpc::ByteBuffer(&empty, 1);
      StartWriteAndFinish(&resp_, grpc::WriteOptions(), grpc::Status::OK);
    } else {
      Finish(grpc::Status(grpc::StatusCode::UNIMPLEMENTED, why));
    }
  }
  void OnDone() override { delete this; }

 private:
  grpc::GenericCallbackServerContext* ctx_;
  grpc::ByteBuffer req_, resp_;
};

// PredictStream, as serve answers it: each message is admitted and queued as a Predict; answers are written as
// they are ready (each with its request_id); a refused or failed message gets a response with `error` set and
// the stream goes on; it finishes OK once the client has half-closed and every message is answered.
class StreamCall;
static std::mutex streams_mu;  // the open streams, for the drain; taken before a stream's own smu_
static std::set<StreamCall*> streams;

class StreamCall : public grpc::ServerGenericBidiReactor {
 public:
  explicit StreamCall(grpc::GenericCallbackServerContext* ctx) : ctx_(ctx) {
    std::string refusal;
    int denied = check_token(authorization_of(*ctx_), ctx_->method().c_str(), &refusal);
    if (denied) {
      arrived();
      Access a;
      account(kStream, denied, refusal, &a);
      finished_ = true;
      Finish(grpc::Status(static_cast<grpc::StatusCode>(denied), refusal));
      return;
    }
    {
      std::lock_guard<std::mutex> lk(streams_mu);
      streams.insert(this);
    }
    deadline_ = deadline_of(ctx_->deadline() - std::chrono::system_clock::now());
    StartRead(&req_);
  }

  class Message : public Sink {
   public:
    Message(StreamCall* call, const std::string& body) : call_(call), id_(request_id_of(body)) {
      if (cfg.access_log) access_fields(kStream, false, body, &access_);
    }
    void Answer(int code, const std::string& bytes) override {
      account(kStream, code, bytes, &access_);
      call_->Write(code == 0 ? bytes : error_response(id_, code, bytes));
      delete this;
    }
    bool Cancelled() const override { return call_->ctx_->IsCancelled(); }

   private:
    StreamCall* call_;
    std::string id_;
    Access access_;
  };

  void OnReadDone(bool ok) override {
    if (!ok) {  // the client half-closed (or is gone)
      bool finish;
      {
        std::lock_guard<std::recursive_mutex> lk(smu_);
        reading_ = false;
        finish = Finishing();
      }
      if (finish) Finish(grpc::Status::OK);
      return;
    }
    {
      std::lock_guard<std::recursive_mutex> lk(smu_);
      if (finished_) return;  // drained while this message was on its way: not read, not answered
    }
    arrived();
    std::string body = body_of(req_);
    auto* m = new Message(this, body);
    {
      std::lock_guard<std::recursive_mutex> lk(smu_);
      ++in_flight_;
    }
    std::string refusal;
    int code = cfg.echo ? 0 : admit(m, kStream, std::move(body), deadline_, &refusal);
    if (cfg.echo) m->Answer(0, std::string());
    else if (code) m->Answer(code, refusal);
    StartRead(&req_);
  }
  void OnWriteDone(bool ok) override {
    bool finish;
    {
      std::lock_guard<std::recursive_mutex> lk(smu_);
      writing_ = false;
      if (!ok) {  // the client is gone: what is left is dropped
        failed_ = true;
        pending_.clear();
      }
      finish = StartNext();
    }
    if (finish) Finish(grpc::Status::OK);
  }
  void OnDone() override {
    {
      std::lock_guard<std::mutex> lk(streams_mu);
      streams.erase(this);
    }
    delete this;
  }

  // SIGTERM, once everything received is answered: a stream stops reading; one with nothing in flight is
  // finished UNAVAILABLE now (a client would otherwise hold the drain for the whole grace period), the others
  // once their last answer is written. Called under streams_mu, so the stream is not deleted meanwhile.
  void Drain() {
    bool finish = false;
    {
      std::lock_guard<std::recursive_mutex> lk(smu_);
      if (finished_) return;
      reading_ = false;
      if (!in_flight_ && !writing_ && pending_.empty()) finish = finished_ = true;
    }
    if (finish) Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the gateway is draining (SIGTERM): reopen the "
                                                                  "stream on another replica"));
  }

 private:
  // From a dispatcher thread too: Finish runs after the lock is released and nothing is touched after it (grpc
  // may run OnDone, which deletes this, on another thread as soon as Finish is called outside a reaction).
  void Write(std::string out) {
    bool finish = false;
    {
      std::lock_guard<std::recursive_mutex> lk(smu_);
      --in_flight_;
      if (!failed_) pending_.push_back(std::move(out));
      if (!writing_) finish = StartNext();
    }
    if (finish) Finish(grpc::Status::OK);
  }
  bool StartNext() {  // under smu_; true: the caller finishes the stream
    if (pending_.empty()) return Finishing();
    writing_ = true;
    grpc::Slice s(pending_.front());
    pending_.pop_front();
    resp_ = grpc::ByteBuffer(&s, 1);
    StartWrite(&resp_);
    return false;
  }
  bool Finishing() {  // under smu_: whether the stream is done now (then the caller calls Finish, once)
    if (reading_ || in_flight_ || writing_ || !pending_.empty() || finished_) return false;
    finished_ = true;
    return true;
  }
  grpc::GenericCallbackServerContext* ctx_;
  grpc::ByteBuffer req_, resp_;
  Clock::time_point deadline_;
  std::recursive_mutex smu_;  // guards what follows
  std::deque<std::string> pending_;
  int in_flight_ = 0;
  bool reading_ = true, writing_ = false, failed_ = false, finished_ = false;
};

// gRPC server reflection: query key -> ServerReflectionResponse bytes without fields 1 and 2 (reflection.py).
static std::unordered_map<std::string, std::string> reflection_table;

static bool load_reflection(const std::string& path) {
  std::string b;
  if (!read_file(path, &b)) return false;
  size_t at = 0;
  auto u32 = [&b, &at](uint32_t* v) {
    if (b.size() - at < 4) return false;
    std::memcpy(v, b.data() + at, 4);
    at += 4;
    return true;
  };
  auto str = [&b, &at, &u32](std::string* v) {
    uint32_t n;
    if (!u32(&n) || b.size() - at < n) return false;
    v->assign(b, at, n);
    at += n;
    return true;
  };
  uint32_t n;
  if (!u32(&n)) return false;
  for (uint32_t i = 0; i < n; ++i) {
    std::string key, value;
    if (!str(&key) || !str(&value)) return false;
    reflection_table.emplace(std::move(key), std::move(value));
  }
  return at == b.size() && reflection_table.count("list");
}

static void put_field(std::string* out, int field, const std::string& bytes) {  // a length-delimited field
  out->push_back(static_cast<char>(field << 3 | 2));
  put_varint(out, bytes.size());
  *out += bytes;
}

// One ServerReflectionResponse for the serialized request `req` (host 1, file_by_filename 3,
// file_containing_symbol 4, file_containing_extension 5, all_extension_numbers_of_type 6, list_services 7);
// false when `req` is not a message at all.
static bool reflect(const std::string& req, std::string* out) {
  static const char* kKeys[] = {nullptr, nullptr, nullptr, "file:", "symbol:", "", "ext:", "list"};
  size_t at = 0;
  Field f;
  std::string host, key;
  bool asked = false;
  while (at < req.size()) {
    if (!next_field(req, &at, &f)) return false;
    if (!f.delimited) continue;
    if (f.number == 1) host = req.substr(f.start, f.len);
    if (f.number >= 3 && f.number <= 7) {  // a oneof: the last one set counts
      asked = true;
      key = f.number == 7 ? "list" : f.number == 5 ? std::string() : kKeys[f.number] + req.substr(f.start, f.len);
    }
  }
  out->clear();
  if (!host.empty()) put_field(out, 1, host);
  put_field(out, 2, req);
  auto found = key.empty() ? reflection_table.end() : reflection_table.find(key);
  if (found != reflection_table.end()) {
    *out += found->second;
    return true;
  }
  std::string error;  // ErrorResponse {error_code 1, error_message 2}, as grpc_reflection answers it
  error.push_back(0x08);
  put_varint(&error, asked ? 5 : 3);
  put_field(&error, 2, asked ? "Not found" : "request: names no query (file_by_filename, file_containing_symbol, "
                                             "all_extension_numbers_of_type or list_services)");
  put_field(out, 7, error);
  return true;
}

// ServerReflectionInfo: each request answered in turn from the table; finishes OK when the client half-closes.
class ReflectionCall : public grpc::ServerGenericBidiReactor {
 public:
  ReflectionCall() { StartRead(&req_); }
  void OnReadDone(bool ok) override {
    if (!ok) { Finish(grpc::Status::OK); return; }
    std::string out;
    if (!reflect(body_of(req_), &out)) {
      Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "request: not a ServerReflectionRequest"));
      return;
    }
    grpc::Slice s(out);
    resp_ = grpc::ByteBuffer(&s, 1);
    StartWrite(&resp_);
  }
  void OnWriteDone(bool ok) override {
    if (ok) StartRead(&req_);
    else Finish(grpc::Status(grpc::StatusCode::CANCELLED, "the client is gone"));
  }
  void OnDone() override { delete this; }

 private:
  grpc::ByteBuffer req_, resp_;
};

class Service : public grpc::CallbackGenericService {
  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext* ctx) override {
    if (ctx->method() == kMethods[kStream].path) return new StreamCall(ctx);
    if (!reflection_table.empty() && (ctx->method() == "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo" ||
                                      ctx->method() == "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo")) {
      return new ReflectionCall();
    }
    return new Call(ctx);
  }
};

// A worker's reply read in large chunks: one read() a batch instead of three a request.
class Reader {
 public:
  explicit Reader(int fd) : fd_(fd) {}
  bool get(void* p, size_t n) {
    if (!fill(n)) return false;
    std::memcpy(p, buf_.data() + at_, n);
    at_ += n;
    return true;
  }
  bool get(std::string* out, size_t n) {
    if (!fill(n)) return false;
    out->assign(buf_.data() + at_, n);
    at_ += n;
    return true;
  }

 private:
  bool fill(size_t n) {  // n bytes from at_ on, reading as much as the socket holds
    if (buf_.size() - at_ >= n) return true;
    buf_.erase(0, at_);
    at_ = 0;
    while (buf_.size() < n) {
      size_t had = buf_.size();
      buf_.resize(std::max(had + (64 << 10), n));
      ssize_t r = ::read(fd_, buf_.data() + had, buf_.size() - had);
      buf_.resize(had + static_cast<size_t>(std::max<ssize_t>(r, 0)));
      if (r <= 0) return false;
    }
    return true;
  }
  int fd_;
  std::string buf_;
  size_t at_ = 0;
};

static bool write_all(int fd, const void* p, size_t n) {
  const char* c = static_cast<const char*>(p);
  while (n) { ssize_t r = ::write(fd, c, n); if (r <= 0) return false; c += r; n -= r; }
  return true;
}

// Between batches a worker sends nothing, so a readable socket means it is gone (EOF or an error). Checked
// before each batch is taken: a worker that died idle is dropped then, instead of costing its first batch
// the one retry (with every worker killed at once, that batch could meet two dead ones and fail).
static bool peer_closed(int fd) {
  char c;
  ssize_t r = ::recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
  return r == 0 || (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR);
}

// --sched-batch: this dispatcher thread (named "dispatcher") runs under SCHED_BATCH, so when it wakes (a worker's
// reply) it does not preempt the other worker in the middle of its batch: it runs on an idle core at once, or when
// the running slice ends. gRPC's threads, which accept calls and refuse overload, keep SCHED_OTHER, so a refusal
// still preempts. On 2 cores at 64 streams (INT8, alternating pairs) it cut the gateway's CPU per W1 request from
// 0.37-0.39x the Python echo's to 0.32x and raised the 512-stream maximum ~3%, with W2's 2x refusal p99 unchanged
// (2.4-3.1 ms); every frontend thread under SCHED_BATCH cut the CPU as much but made W2's refusals ~2 ms later.
static void dispatch(int fd, long pid) {
  ::pthread_setname_np(::pthread_self(), "dispatcher");
  if (cfg.sched_batch) {
    sched_param none{};
    if (::sched_setscheduler(0, SCHED_BATCH, &none) != 0) std::perror("frontend: --sched-batch (runs as SCHED_OTHER)");
  }
  std::vector<Item> batch, dropped;
  std::string frame, reply;
  Reader in(fd);
  auto lose = [fd, pid] {  // the worker is gone: this dispatcher stops
    ::close(fd);
    int left;
    {
      std::lock_guard<std::mutex> lk(mu);
      left = --live_workers;  // at 0 new calls are refused UNAVAILABLE; queued ones wait for a worker
      retiring.erase(pid);  // a retire order that crossed the loss: no later worker with this pid inherits it
    }
    if (left == 0) set_health(false);
    emit("{\"event\": \"worker_lost\", \"pid\": " + std::to_string(pid) + ", \"workers\": " +
         std::to_string(left) + "}");
  };
  for (;;) {
    batch.clear();
    dropped.clear();
    {
      std::unique_lock<std::mutex> lk(mu);
      // idle, it looks at its worker every 200 ms: one that died between batches is dropped then (health goes
      // NOT_SERVING with the last one), not when the next request comes
      while (!cv.wait_for(lk, std::chrono::milliseconds(200), [pid] { return !queue_.empty() || retiring.count(pid); })) {
        if (peer_closed(fd)) break;
      }
      auto full = [] {
        return static_cast<int>(queue_.size()) >= cfg.max_batch || queued_bytes >= cfg.max_batch_bytes;
      };
      if (!retiring.count(pid) && cfg.max_delay_us > 0 && !full()) {
        auto until = Clock::now() + std::chrono::microseconds(cfg.max_delay_us);
        cv.wait_until(lk, until, [pid, &full] { return full() || retiring.count(pid) > 0; });
      }
      if (retiring.count(pid)) {  // between batches: nothing of its is in flight; it sees EOF and exits
        retiring.erase(pid);
        int left = --live_workers;
        if (!queue_.empty()) cv.notify_one();  // a request's wake-up may have gone to this dispatcher
        lk.unlock();
        ::close(fd);
        if (left == 0) set_health(false);
        emit("{\"event\": \"worker_retired\", \"pid\": " + std::to_string(pid) + ", \"workers\": " +
             std::to_string(left) + "}");
        return;
      }
      if (peer_closed(fd)) {
        if (!queue_.empty()) cv.notify_one();  // the wake-up this dispatcher took goes to another
        lk.unlock();
        lose();
        return;
      }
      auto now = Clock::now();
      long bytes = 0;  // a batch is bounded in requests and in bytes (samples), so no worker takes them all
      while (!queue_.empty() && static_cast<int>(batch.size()) < cfg.max_batch &&
             (batch.empty() || bytes + static_cast<long>(queue_.front().body.size()) <= cfg.max_batch_bytes)) {
        Item it = std::move(queue_.front());
        queue_.pop_front();
        queued_bytes -= static_cast<long>(it.body.size());
        if (it.deadline < now || it.call->Cancelled()) {  // answered without compute
          dropped.push_back(std::move(it));
          continue;
        }
        bytes += static_cast<long>(it.body.size());
        batch.push_back(std::move(it));
      }
      for (auto& it : batch) busy_us += cost_of(it.body);
      if (!queue_.empty()) cv.notify_one();
    }
    expired += static_cast<long>(dropped.size());
    for (auto& it : dropped) it.call->Answer(4, "deadline passed (or cancelled) while queued; dropped before compute");
    if (batch.empty()) continue;
    double predicted = 0;
    for (auto& it : batch) predicted += cost_of(it.body);
    auto start = Clock::now();
    frame.clear();
    uint32_t n = batch.size();
    frame.append(reinterpret_cast<char*>(&n), 4);
    for (auto& it : batch) {
      uint8_t method = static_cast<uint8_t>(it.method);
      uint32_t len = it.body.size();
      frame.append(reinterpret_cast<char*>(&method), 1);
      frame.append(reinterpret_cast<char*>(&len), 4);
      frame.append(it.body);
    }
    bool ok = write_all(fd, frame.data(), frame.size());
    uint32_t m = 0;
    ok = ok && in.get(&m, 4) && m == n;
    std::vector<Item> again;  // the worker died holding them: scoring is pure, so each goes back once
    for (uint32_t i = 0; i < n; ++i) {
      uint8_t code = 13;
      uint32_t len = 0;
      if (ok && in.get(&code, 1) && in.get(&len, 4) && in.get(&reply, len)) {
        batch[i].call->Answer(code, reply);
        continue;
      }
      ok = false;
      if (batch[i].retried) {
        batch[i].call->Answer(14, "worker lost while scoring this request's batch (twice: not retried again)");
      } else {
        batch[i].retried = true;
        again.push_back(std::move(batch[i]));
      }
    }
    {
      std::lock_guard<std::mutex> lk(mu);
      busy_us = std::max(0.0, busy_us - predicted);
    }
    if (!again.empty()) {
      {
        std::lock_guard<std::mutex> lk(mu);
        for (auto it = again.rbegin(); it != again.rend(); ++it) {
          queued_bytes += static_cast<long>(it->body.size());
          queue_.push_front(std::move(*it));
        }
      }
      cv.notify_all();
    }
    ++batches;
    batched_requests += n;
    long took = std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - start).count();
    batch_us += took;
    if (ok) {
      std::lock_guard<std::mutex> lk(mu);
      seen_us = 0.9 * seen_us + 0.1 * static_cast<double>(took);
      predicted_us = 0.9 * predicted_us + 0.1 * predicted;
    }
    if (!ok) {
      lose();
      return;
    }
  }
}

static void accept_workers(int ls) {
  for (;;) {
    int fd = ::accept(ls, nullptr, nullptr);
    if (fd < 0) { std::perror("accept"); continue; }
    struct ucred peer {};
    socklen_t len = sizeof(peer);
    long pid = ::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &peer, &len) == 0 ? peer.pid : -1;
    int now;
    {
      std::lock_guard<std::mutex> lk(mu);
      now = ++live_workers;
      retiring.erase(pid);  // an order for an earlier worker with this pid (lost first) is not for this one
    }
    std::thread(dispatch, fd, pid).detach();
    if (now == 1 && !draining) set_health(true);
    emit("{\"event\": \"worker_joined\", \"pid\": " + std::to_string(pid) + ", \"workers\": " +
         std::to_string(now) + "}");
    cv.notify_all();  // requests queued while no worker was connected
  }
}

// The supervisor's orders on stdin, one per line: `retire PID` (that worker takes no further batch; its
// dispatcher closes the socket once the batch it holds is answered).
static void read_orders() {
  std::string line;
  while (std::getline(std::cin, line)) {
    long pid = 0;
    if (std::sscanf(line.c_str(), "retire %ld", &pid) == 1) {
      {
        std::lock_guard<std::mutex> lk(mu);
        retiring.insert(pid);
      }
      cv.notify_all();
    }
  }
}

static std::string stats_line() {
  std::string codes;
  for (int m = 0; m < kCounted; ++m) {
    std::string these;
    for (int c = 0; c <= 16; ++c) {
      long v = answered[m][c].load();
      if (v) these += (these.empty() ? "" : ", ") + ("\"" + std::to_string(c) + "\": " + std::to_string(v));
    }
    if (these.empty()) continue;
    const char* name = m < kForwarded ? kMethods[m].name : kLocal[m - kForwarded];
    codes += (codes.empty() ? "\"" : ", \"") + std::string(name) + "\": {" + these + "}";
  }
  int workers, queued;
  {
    std::lock_guard<std::mutex> lk(mu);
    workers = live_workers;
    queued = static_cast<int>(queue_.size());
  }
  return "{\"event\": \"stats\", \"received\": " + std::to_string(received.load()) + ", \"answered\": {" + codes +
         "}, \"admission_refusals\": " + std::to_string(admission_refusals.load()) + ", \"expired\": " +
         std::to_string(expired.load()) + ", \"batches\": " + std::to_string(batches.load()) +
         ", \"batched_requests\": " + std::to_string(batched_requests.load()) + ", \"batch_seconds\": " +
         std::to_string(batch_us.load() / 1e6) + ", \"workers\": " + std::to_string(workers) + ", \"queued\": " +
         std::to_string(queued) + "}";
}

static void report_stats() {
  std::string last;
  for (;;) {
    std::this_thread::sleep_for(std::chrono::seconds(1));
    std::string line = stats_line();
    if (line != last) emit(line);
    last = line;
  }
}

static void drain_on_signal(sigset_t set) {
  int sig = 0;
  sigwait(&set, &sig);
  emit("{\"event\": \"draining\"}");
  auto grace_end = std::chrono::system_clock::now() + std::chrono::milliseconds(cfg.grace_ms);
  {
    std::lock_guard<std::mutex> lk(mu);  // from here arrivals are refused UNAVAILABLE (OnReadDone reads it under mu)
    draining = true;
  }
  set_health(false);
  // Keep accepting while the backlog is answered: grpc's Shutdown cancels calls its transport holds but has
  // not handed to us yet, which a client would see as CANCELLED, so it comes once everything received is
  // answered and arrivals paused for 100 ms (or after at most 2 s of refusing, or at the grace's end).
  long answered_since = -1;
  while (std::chrono::system_clock::now() < grace_end) {
    long done = 0;
    for (auto& per_method : answered) for (auto& n : per_method) done += n.load();
    long t = steady_us();
    if (done < received.load()) {
      answered_since = -1;
    } else {
      if (answered_since < 0) answered_since = t;
      if (t - last_arrival_us.load() > 100000 || t - answered_since > 2000000) break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  {
    std::lock_guard<std::mutex> lk(streams_mu);
    for (auto* stream : streams) stream->Drain();
  }
  if (h2_drain_streams != nullptr) h2_drain_streams();
  std::vector<Item> stranded;  // queued at the grace's end with no worker to take them (none is replaced now)
  {
    std::lock_guard<std::mutex> lk(mu);
    if (live_workers == 0) {
      stranded.assign(std::make_move_iterator(queue_.begin()), std::make_move_iterator(queue_.end()));
      queue_.clear();
      queued_bytes = 0;
    }
  }
  for (auto& it : stranded) it.call->Answer(14, "the gateway is draining (SIGTERM) and no worker is left");
  if (server_ != nullptr) server_->Shutdown(grace_end);
  else std::this_thread::sleep_for(std::chrono::milliseconds(100));  // --engine h2: the loop writes the last answers
  emit(stats_line());  // the final counters: received == answered unless the grace ran out
  std::_Exit(0);
}

// --engine h2: the same calls served on nghttp2 instead of grpc++ (benchmarks/h2_floor.py: a call costs this
// engine 3-5 us of CPU, grpc++ 17-27 us, answered or refused). One epoll thread owns
// every connection and nghttp2 session; the dispatchers hand it their answers through a mailbox and an eventfd.
// Served as on grpc++: Predict, PredictStream, the OIP's methods, grpc.health.v1.Health (Check and Watch) and,
// with --reflection, server reflection, with the same admission, batching, deadlines (grpc-timeout), tokens,
// counters, access log and drain, and TLS (OpenSSL on the same loop: ALPN h2, TLS 1.2 or later, with
// --tls-client-ca a client certificate of that CA required). Not: compressed messages (UNIMPLEMENTED; grpc
// clients send identity unless asked).
namespace h2e {
struct Conn;
static const size_t kMaxMessage = 4 << 20;  // grpc's default receive limit
enum class Kind { kUnary, kStream, kReflect, kWatch };  // kStream: PredictStream
static const char* kReflectV1a = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo";
static const char* kReflectV1 = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo";
static const char* kWatchPath = "/grpc.health.v1.Health/Watch";

// What the dispatchers answer through: Answer from any thread, Deliver on the loop (through the mailbox).
class LoopSink : public Sink {
 public:
  virtual void Deliver(int code, const std::string& bytes) = 0;
  void Post(int code, const std::string& bytes);
};

// One HTTP/2 stream: a unary call (its request whole at END_STREAM, one answer) or a streaming one
// (PredictStream, reflection: each request message answered in turn; Health/Watch: statuses as they change).
struct H2Call : public LoopSink {
  Conn* conn;
  int32_t id;
  Kind kind = Kind::kUnary;
  int method = kCounted - 1;  // counted as: kMethods' index, kForwarded.. ServerLive / ServerReady, kCounted-1
                              // other (also a request without :path, which nghttp2 refuses first); -1 not
  std::string path, auth, body, out;  // body: the request bytes so far; out: DATA not yet handed to nghttp2
  Clock::time_point deadline = Clock::time_point::max();
  Access access;
  std::atomic<bool> closed{false};  // the stream ended first (client cancelled, connection lost): answers dropped
  bool received = false;    // unary: the whole request is in; streaming: the call started (headers answered)
  bool submitted = false;   // unary: the answer is with nghttp2; streaming: the response headers are
  bool half_closed = false; // streaming: the client sent END_STREAM (or no more is read: drain, error)
  bool deferred = false;    // the data provider found nothing to send and waits for resume
  int in_flight = 0;        // streaming: messages at the workers (each holds this call)
  int final_code = -1;      // streaming: the status its trailers carry once `out` is sent (-1: not decided)
  std::string final_message, watched;  // watched: Health/Watch's service; its last status sent in `watch_sent`
  int watch_sent = -1;
  H2Call(Conn* c, int32_t i) : conn(c), id(i) {}
  void Answer(int code, const std::string& bytes) override;
  void Deliver(int code, const std::string& bytes) override;
  bool Cancelled() const override { return closed.load(); }
  bool pending() const { return kind == Kind::kUnary ? received && !submitted : in_flight > 0; }
};

struct Conn {
  int fd;
  nghttp2_session* session = nullptr;
  SSL* ssl = nullptr;  // with --tls-cert: `out` goes through it, and what is read comes out of it
  std::string out;
  bool watching_out = false, dead = false;
  bool write_needs_read = false, read_needs_write = false;  // TLS: the handshake waits for the other direction
  bool greeted = false;  // a frame (the client's SETTINGS, after its preface and any TLS handshake) arrived
  uint64_t serial = 0;   // which connection this is, for the greeting deadlines (an address may be reused)
  std::set<H2Call*> calls;  // every call of this connection not yet deleted
};

static int epfd = -1, mailfd = -1;
static thread_local bool in_loop = false;
static std::mutex mail_mu;
struct Mail { LoopSink* sink; int code; std::string bytes; };
static std::vector<Mail> mailbox;
static std::set<Conn*> conns, graveyard;  // live connections; dead ones whose calls are still answered
static std::set<Conn*>* touched_now = nullptr;  // the loop's connections to flush this turn

void LoopSink::Post(int code, const std::string& bytes) {
  if (in_loop) { Deliver(code, bytes); return; }
  bool first;
  {
    std::lock_guard<std::mutex> lk(mail_mu);
    first = mailbox.empty();
    mailbox.push_back(Mail{this, code, bytes});
  }
  if (first) { uint64_t one = 1; ssize_t r = ::write(mailfd, &one, 8); (void)r; }
}

static SSL_CTX* tls = nullptr;  // --tls-cert: every connection is TLS

// ALPN: gRPC runs on h2 only (grpc clients offer it, and refuse a server that does not select it).
static int select_h2(SSL*, const unsigned char** out, unsigned char* outlen, const unsigned char* in, unsigned inlen,
                     void*) {
  for (unsigned i = 0; i < inlen; i += 1u + in[i]) {
    if (in[i] == 2 && i + 3 <= inlen && std::memcmp(in + i + 1, "h2", 2) == 0) {
      *out = in + i + 1;
      *outlen = 2;
      return SSL_TLSEXT_ERR_OK;
    }
  }
  return SSL_TLSEXT_ERR_ALERT_FATAL;
}

static std::string ssl_error() {  // OpenSSL's reason, if it gave one
  unsigned long e = ERR_get_error();
  char text[256] = "";
  if (e) ERR_error_string_n(e, text, sizeof(text));
  ERR_clear_error();
  return e ? std::string(" (") + text + ")" : std::string();
}

// The server's context from the PEMs main read (--tls-cert: the leaf, then its chain; --tls-key; --tls-client-ca:
// the CAs a client's certificate must chain to). False with `why` naming the flag.
static bool tls_setup(std::string* why) {
  SSL_CTX* ctx = SSL_CTX_new(TLS_server_method());
  SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
  SSL_CTX_set_options(ctx, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION);
  SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER | SSL_MODE_RELEASE_BUFFERS);
  SSL_CTX_set_alpn_select_cb(ctx, select_h2, nullptr);
  auto certs = [](const std::string& pem) {
    std::vector<X509*> out;
    BIO* b = BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size()));
    while (X509* x = PEM_read_bio_X509(b, nullptr, nullptr, nullptr)) out.push_back(x);
    BIO_free(b);
    ERR_clear_error();  // the end of the PEM reads as an error
    return out;
  };
  auto fail = [ctx, why](const std::string& what) { *why = what + ssl_error(); SSL_CTX_free(ctx); return false; };
  std::vector<X509*> chain = certs(cfg.tls_cert);
  if (chain.empty()) return fail("--tls-cert: no PEM certificate in it");
  if (SSL_CTX_use_certificate(ctx, chain[0]) != 1) return fail("--tls-cert");
  X509_free(chain[0]);
  for (size_t i = 1; i < chain.size(); ++i) SSL_CTX_add_extra_chain_cert(ctx, chain[i]);  // takes it
  BIO* kb = BIO_new_mem_buf(cfg.tls_key.data(), static_cast<int>(cfg.tls_key.size()));
  EVP_PKEY* key = PEM_read_bio_PrivateKey(kb, nullptr, nullptr, nullptr);
  BIO_free(kb);
  if (key == nullptr) return fail("--tls-key: no PEM private key in it");
  bool used = SSL_CTX_use_PrivateKey(ctx, key) == 1;
  EVP_PKEY_free(key);
  if (!used || SSL_CTX_check_private_key(ctx) != 1) return fail("--tls-key: not the key of --tls-cert");
  if (!cfg.tls_client_ca.empty()) {
    std::vector<X509*> cas = certs(cfg.tls_client_ca);
    if (cas.empty()) return fail("--tls-client-ca: no PEM certificate in it");
    X509_STORE* store = SSL_CTX_get_cert_store(ctx);
    for (X509* ca : cas) {
      X509_STORE_add_cert(store, ca);
      SSL_CTX_add_client_CA(ctx, ca);
      X509_free(ca);
    }
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, nullptr);
  }
  tls = ctx;
  return true;
}

static nghttp2_nv header(const char* name, const std::string& value, bool copy_value) {
  return nghttp2_nv{reinterpret_cast<uint8_t*>(const_cast<char*>(name)),
                    reinterpret_cast<uint8_t*>(const_cast<char*>(value.data())), std::strlen(name), value.size(),
                    static_cast<uint8_t>(NGHTTP2_NV_FLAG_NO_COPY_NAME | (copy_value ? 0 : NGHTTP2_NV_FLAG_NO_COPY_VALUE))};
}
static const std::string k200 = "200", kGrpc = "application/grpc", kZero = "0";

static std::string percent_encoded(const std::string& m) {  // grpc-message: printable ASCII but '%' as is
  std::string out;
  for (unsigned char c : m) {
    if (c >= 0x20 && c <= 0x7e && c != '%') { out.push_back(static_cast<char>(c)); continue; }
    char e[4];
    std::snprintf(e, sizeof(e), "%%%02X", c);
    out += e;
  }
  return out;
}

static void frame_into(std::string* out, const std::string& message) {  // one gRPC message: flag, length, bytes
  out->push_back(0);
  uint32_t len = htonl(static_cast<uint32_t>(message.size()));
  out->append(reinterpret_cast<char*>(&len), 4);
  *out += message;
}

static void forget(H2Call* call) {  // on the loop: the call is done with (its connection may be too)
  Conn* c = call->conn;
  c->calls.erase(call);
  delete call;
  if (c->dead && c->calls.empty()) graveyard.insert(c);
}

// The DATA of a call: what `out` holds; then, once the call is done, its trailers. A streaming call with nothing
// to send yet waits (resumed by `kick`).
static ssize_t read_out(nghttp2_session* session, int32_t id, uint8_t* buf, size_t length, uint32_t* flags,
                        nghttp2_data_source* source, void*) {
  auto* call = static_cast<H2Call*>(source->ptr);
  size_t n = std::min(length, call->out.size());
  std::memcpy(buf, call->out.data(), n);
  call->out.erase(0, n);
  if (!call->out.empty()) return static_cast<ssize_t>(n);
  bool done = call->kind == Kind::kUnary || call->final_code >= 0 ||
              (call->kind != Kind::kWatch && call->half_closed && call->in_flight == 0);  // a watch ends on drain
  if (!done) {
    if (n) return static_cast<ssize_t>(n);
    call->deferred = true;
    return NGHTTP2_ERR_DEFERRED;
  }
  *flags = NGHTTP2_DATA_FLAG_EOF | NGHTTP2_DATA_FLAG_NO_END_STREAM;
  int code = std::max(0, call->final_code);
  if (code == 0) {
    nghttp2_nv trailer[] = {header("grpc-status", kZero, false)};
    nghttp2_submit_trailer(session, id, trailer, 1);
  } else {
    std::string status = std::to_string(code), message = percent_encoded(call->final_message);
    nghttp2_nv trailer[] = {header("grpc-status", status, true), header("grpc-message", message, true)};
    nghttp2_submit_trailer(session, id, trailer, 2);
  }
  return static_cast<ssize_t>(n);
}

static void kick(H2Call* call) {  // a streaming call has more to send (or is done): its data provider runs again
  if (call->deferred && !call->conn->dead) {
    call->deferred = false;
    nghttp2_session_resume_data(call->conn->session, call->id);
  }
  if (!call->conn->dead && touched_now != nullptr) touched_now->insert(call->conn);
}

// A unary call's answer, on the loop: DATA and trailers, or trailers only (a refusal, an error).
static void finish(H2Call* call, int code, const std::string& bytes) {
  if (call->closed || call->conn->dead) { forget(call); return; }
  call->submitted = true;
  nghttp2_session* s = call->conn->session;
  if (code == 0) {
    frame_into(&call->out, bytes);
    nghttp2_nv h[] = {header(":status", k200, false), header("content-type", kGrpc, false)};
    nghttp2_data_provider data{};
    data.source.ptr = call;
    data.read_callback = read_out;
    nghttp2_submit_response(s, call->id, h, 2, &data);
  } else {
    std::string status = std::to_string(code), message = percent_encoded(bytes);
    nghttp2_nv h[] = {header(":status", k200, false), header("content-type", kGrpc, false),
                      header("grpc-status", status, true), header("grpc-message", message, true)};
    nghttp2_submit_response(s, call->id, h, 4, nullptr);  // trailers-only
  }
  if (touched_now != nullptr) touched_now->insert(call->conn);
}

void H2Call::Answer(int code, const std::string& bytes) {
  if (method >= 0) account(method, code, bytes, &access);
  Post(code, bytes);
}

void H2Call::Deliver(int code, const std::string& bytes) { finish(this, code, bytes); }

// One PredictStream message: admitted and scored as a Predict, its answer written on the stream in turn.
class StreamMessage : public LoopSink {
 public:
  StreamMessage(H2Call* call, const std::string& body) : call_(call), id_(request_id_of(body)) {
    if (cfg.access_log) access_fields(kStream, false, body, &access_);
  }
  void Answer(int code, const std::string& bytes) override {
    account(kStream, code, bytes, &access_);
    Post(code, bytes);
  }
  void Deliver(int code, const std::string& bytes) override {  // on the loop
    H2Call* call = call_;
    --call->in_flight;
    if (call->closed || call->conn->dead) {
      if (!call->pending()) forget(call);
    } else {
      frame_into(&call->out, code == 0 ? bytes : error_response(id_, code, bytes));
      kick(call);
    }
    delete this;
  }
  bool Cancelled() const override { return call_->closed.load(); }

 private:
  H2Call* call_;
  std::string id_;
  Access access_;
};

static long timeout_us(const std::string& v) {  // grpc-timeout: digits and a unit; -1 when malformed
  if (v.size() < 2 || v.size() > 9) return -1;
  long n = 0;
  for (size_t i = 0; i + 1 < v.size(); ++i) {
    if (!std::isdigit(static_cast<unsigned char>(v[i]))) return -1;
    n = n * 10 + (v[i] - '0');
  }
  switch (v.back()) {
    case 'H': return n * 3600000000L;
    case 'M': return n * 60000000L;
    case 'S': return n * 1000000L;
    case 'm': return n * 1000L;
    case 'u': return n;
    case 'n': return n / 1000;
    default: return -1;
  }
}

static const int kHealth = -2;  // Health/Check: answered here, not counted (as grpc++'s health service)
static std::unordered_map<std::string, int> method_numbers() {
  std::unordered_map<std::string, int> m;
  for (int i = 0; i < kForwarded; ++i) m[kMethods[i].path] = i;
  m[std::string("/inference.GRPCInferenceService/") + kLocal[0]] = kForwarded;
  m[std::string("/inference.GRPCInferenceService/") + kLocal[1]] = kForwarded + 1;
  m["/grpc.health.v1.Health/Check"] = kHealth;
  return m;
}
static const std::unordered_map<std::string, int> kNumbers = method_numbers();

// The service field (1) of a HealthCheckRequest.
static std::string service_of(const std::string& message) {
  std::string service;
  size_t at = 0;
  Field f;
  while (at < message.size() && next_field(message, &at, &f)) {
    if (f.number == 1 && f.delimited) service = message.substr(f.start, f.len);
  }
  return service;
}

// HealthCheckResponse.status (field 1): SERVING 1, NOT_SERVING 2, SERVICE_UNKNOWN 3 (Watch's answer for another
// service; Check answers NOT_FOUND).
static int health_of(const std::string& service) {
  if (!service.empty() && service != kService) return 3;
  return health_serving ? 1 : 2;
}

static void watch_update(H2Call* call) {  // a Health/Watch stream: the status, when it changed
  int now = health_of(call->watched);
  if (now == call->watch_sent) return;
  call->watch_sent = now;
  frame_into(&call->out, std::string("\x08", 1) + static_cast<char>(now));
  kick(call);
}

// A whole unary request (END_STREAM): answered here, refused, or queued for the workers.
static void handle_unary(H2Call* call) {
  call->received = true;
  if (call->method != kHealth) arrived();
  const std::string& b = call->body;
  uint32_t len = 0;
  if (b.size() >= 5) { std::memcpy(&len, b.data() + 1, 4); len = ntohl(len); }
  int counted = call->method;
  if (call->method == kHealth) call->method = -1;
  if (counted == kCounted - 1) {
    call->Answer(12, not_served(call->path));
    return;
  }
  if (b.size() > kMaxMessage + 5) { call->Answer(8, "request: larger than 4 MiB (grpc's limit)"); return; }
  if (b.size() < 5 || b.size() - 5 != len) { call->Answer(13, "request: not one gRPC message"); return; }
  if (b[0] != 0) { call->Answer(12, "request: compressed messages are not served (grpc-encoding identity)"); return; }
  std::string message(b, 5, len);
  if (counted == kHealth) {
    int status = health_of(service_of(message));
    if (status == 3) call->Answer(5, "unknown service " + service_of(message));
    else call->Answer(0, std::string("\x08", 1) + static_cast<char>(status));
    return;
  }
  if (answered_here(call, counted)) return;
  take_unary(call, counted, std::move(message), call->auth, call->deadline, &call->access);
}

// A streaming call's request headers: its response headers now (messages follow as they are answered), or a
// refusal in trailers only.
static void start_stream(H2Call* call) {
  call->received = true;
  if (call->kind == Kind::kStream) {
    std::string refusal;
    int denied = check_token(call->auth, kMethods[kStream].path, &refusal);
    if (denied) {
      arrived();
      call->method = kStream;
      call->Answer(denied, refusal);  // trailers only; the stream is not read further
      call->half_closed = true;
      return;
    }
  }
  call->submitted = true;
  nghttp2_nv h[] = {header(":status", k200, false), header("content-type", kGrpc, false)};
  nghttp2_data_provider data{};
  data.source.ptr = call;
  data.read_callback = read_out;
  nghttp2_submit_response(call->conn->session, call->id, h, 2, &data);
}

static void stop_stream(H2Call* call, int code, const std::string& message) {  // trailers once `out` is sent
  if (call->final_code < 0) { call->final_code = code; call->final_message = message; }
  call->half_closed = true;
  kick(call);
}

// One whole message of a streaming call.
static void stream_message(H2Call* call, const std::string& message) {
  if (call->kind == Kind::kStream) {
    arrived();
    auto* m = new StreamMessage(call, message);
    ++call->in_flight;
    std::string refusal;
    int code = cfg.echo ? 0 : admit(m, kStream, message, call->deadline, &refusal);
    if (cfg.echo) m->Answer(0, std::string());
    else if (code) m->Answer(code, refusal);
  } else if (call->kind == Kind::kReflect) {
    std::string answer;
    if (!reflect(message, &answer)) { stop_stream(call, 3, "request: not a ServerReflectionRequest"); return; }
    frame_into(&call->out, answer);
    kick(call);
  } else if (call->kind == Kind::kWatch && call->watch_sent < 0) {
    call->watched = service_of(message);
    watch_update(call);
  }
}

static int on_begin_headers(nghttp2_session* s, const nghttp2_frame* frame, void* user) {
  if (frame->hd.type != NGHTTP2_HEADERS || frame->headers.cat != NGHTTP2_HCAT_REQUEST) return 0;
  auto* c = static_cast<Conn*>(user);
  auto* call = new H2Call(c, frame->hd.stream_id);
  c->calls.insert(call);
  nghttp2_session_set_stream_user_data(s, frame->hd.stream_id, call);
  return 0;
}

static int on_header(nghttp2_session* s, const nghttp2_frame* frame, const uint8_t* name, size_t namelen,
                     const uint8_t* value, size_t valuelen, uint8_t, void*) {
  auto* call = static_cast<H2Call*>(nghttp2_session_get_stream_user_data(s, frame->hd.stream_id));
  if (call == nullptr || frame->hd.type != NGHTTP2_HEADERS || frame->headers.cat != NGHTTP2_HCAT_REQUEST) return 0;
  std::string n(reinterpret_cast<const char*>(name), namelen), v(reinterpret_cast<const char*>(value), valuelen);
  if (n == ":path") {
    call->path = v;
    auto found = kNumbers.find(v);
    call->method = found == kNumbers.end() ? kCounted - 1 : found->second;
    if (call->method == kStream) call->kind = Kind::kStream;
    else if (!reflection_table.empty() && (v == kReflectV1a || v == kReflectV1)) call->kind = Kind::kReflect;
    else if (v == kWatchPath) call->kind = Kind::kWatch;
    if (call->kind != Kind::kUnary) call->method = -1;  // a PredictStream is counted per message
  } else if (n == "authorization") {
    call->auth = v;
  } else if (n == "grpc-timeout") {
    long us = timeout_us(v);
    if (us >= 0 && us < 86400L * 1000000) call->deadline = Clock::now() + std::chrono::microseconds(us);
  }
  return 0;
}

// Whole messages of a streaming call out of its buffered bytes.
static void split_messages(H2Call* call) {
  std::string& b = call->body;
  size_t at = 0;
  while (!call->half_closed && b.size() - at >= 5) {
    uint32_t len;
    std::memcpy(&len, b.data() + at + 1, 4);
    len = ntohl(len);
    if (len > kMaxMessage) { stop_stream(call, 8, "request: a message larger than 4 MiB"); break; }
    if (b.size() - at - 5 < len) break;
    if (b[at] != 0) { stop_stream(call, 12, "request: compressed messages are not served (grpc-encoding identity)"); break; }
    stream_message(call, b.substr(at + 5, len));
    at += 5 + len;
  }
  b.erase(0, at);
}

static int on_data(nghttp2_session* s, uint8_t, int32_t id, const uint8_t* data, size_t len, void*) {
  auto* call = static_cast<H2Call*>(nghttp2_session_get_stream_user_data(s, id));
  if (call == nullptr) return 0;
  if (call->kind == Kind::kUnary) {
    if (call->body.size() <= kMaxMessage + 5) call->body.append(reinterpret_cast<const char*>(data), len);
  } else if (!call->half_closed) {
    call->body.append(reinterpret_cast<const char*>(data), len);
    split_messages(call);
  }
  return 0;
}

static int on_frame_recv(nghttp2_session* s, const nghttp2_frame* frame, void* user) {
  static_cast<Conn*>(user)->greeted = true;
  bool headers = frame->hd.type == NGHTTP2_HEADERS && frame->headers.cat == NGHTTP2_HCAT_REQUEST;
  if (frame->hd.type != NGHTTP2_DATA && !headers) return 0;
  auto* call = static_cast<H2Call*>(nghttp2_session_get_stream_user_data(s, frame->hd.stream_id));
  if (call == nullptr) return 0;
  bool end = frame->hd.flags & NGHTTP2_FLAG_END_STREAM;
  if (call->kind == Kind::kUnary) {
    if (end && !call->received) handle_unary(call);
    return 0;
  }
  if (headers && !call->received) start_stream(call);
  if (end && !call->half_closed) {
    call->half_closed = true;  // the client sent all its messages: the call ends once they are answered
    if (call->kind != Kind::kWatch) kick(call);
  }
  return 0;
}

static int on_stream_close(nghttp2_session* s, int32_t id, uint32_t, void* user) {
  auto* call = static_cast<H2Call*>(nghttp2_session_get_stream_user_data(s, id));
  if (call == nullptr || static_cast<Conn*>(user)->dead) return 0;  // a dead connection settles its calls itself
  nghttp2_session_set_stream_user_data(s, id, nullptr);
  call->closed = true;
  if (!call->pending()) forget(call);  // else the last answer forgets it
  return 0;
}

// What the loop does to every call of every connection when another thread asks (through the mailbox).
class EveryCall : public LoopSink {
 public:
  explicit EveryCall(void (*fn)(H2Call*)) : fn_(fn) {}
  void Answer(int, const std::string&) override {}
  bool Cancelled() const override { return false; }
  void Deliver(int, const std::string&) override {
    for (Conn* c : conns) for (H2Call* call : c->calls) fn_(call);
  }

 private:
  void (*fn_)(H2Call*);
};

// SIGTERM, once everything received is answered (the drain thread asks): a stream stops reading; one with
// nothing in flight is finished UNAVAILABLE now, the others once their last answer is written; watches end.
static void drain_stream(H2Call* call) {
  if (call->kind == Kind::kUnary || call->closed || !call->submitted || call->final_code >= 0) return;
  if (call->in_flight == 0 || call->kind == Kind::kWatch) {
    stop_stream(call, 14, "the gateway is draining (SIGTERM): reopen the stream on another replica");
  } else {
    call->half_closed = true;  // finishes OK once its last answer is written
  }
}

// set_health's change: every Health/Watch stream is told.
static void tell_watch(H2Call* call) {
  if (call->kind == Kind::kWatch && call->watch_sent >= 0 && !call->closed && call->final_code < 0) watch_update(call);
}

static EveryCall drain_streams(drain_stream), health_changed(tell_watch);

static void watch(Conn* c, bool out) {
  out = (out && !c->write_needs_read) || c->read_needs_write;
  if (c->watching_out == out) return;
  epoll_event ev{};
  ev.events = EPOLLIN | (out ? EPOLLOUT : 0);
  ev.data.ptr = c;
  epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
  c->watching_out = out;
}

static bool flush(Conn* c) {  // false: the connection is done
  for (;;) {
    const uint8_t* data;
    ssize_t n = nghttp2_session_mem_send(c->session, &data);
    if (n < 0) return false;
    if (n == 0) break;
    c->out.append(reinterpret_cast<const char*>(data), static_cast<size_t>(n));
  }
  while (!c->out.empty()) {
    ssize_t w;
    if (c->ssl != nullptr) {  // a record at a time (partial writes); what it cannot take stays in out
      ERR_clear_error();
      int r = SSL_write(c->ssl, c->out.data(), static_cast<int>(std::min<size_t>(c->out.size(), 1 << 20)));
      if (r <= 0) {
        int e = SSL_get_error(c->ssl, r);
        if (e == SSL_ERROR_WANT_READ) c->write_needs_read = true;  // the handshake: the client speaks next
        if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) break;
        return false;
      }
      c->write_needs_read = false;
      w = r;
    } else {
      w = ::write(c->fd, c->out.data(), c->out.size());
      if (w < 0) {
        if (errno == EAGAIN || errno == EINTR) break;
        return false;
      }
    }
    c->out.erase(0, static_cast<size_t>(w));
  }
  watch(c, !c->out.empty());
  return !c->out.empty() || nghttp2_session_want_read(c->session) || nghttp2_session_want_write(c->session);
}

static void close_conn(Conn* c) {  // its calls at the workers keep it (dead) until they are answered
  epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, nullptr);
  if (c->ssl != nullptr) { SSL_free(c->ssl); c->ssl = nullptr; }
  ::close(c->fd);
  c->dead = true;
  conns.erase(c);
  nghttp2_session_del(c->session);  // calls no callback: the calls are settled here
  c->session = nullptr;
  std::vector<H2Call*> done;
  for (H2Call* call : c->calls) {
    call->closed = true;
    if (!call->pending()) done.push_back(call);
  }
  for (H2Call* call : done) { c->calls.erase(call); delete call; }
  graveyard.insert(c);
}

static int listen_on(const std::string& addr, int* port) {  // HOST:PORT (a name, IPv4 or [IPv6]): the socket or -1
  auto colon = addr.rfind(':');
  if (colon == std::string::npos) return -1;
  std::string host = addr.substr(0, colon), service = addr.substr(colon + 1);
  if (host.size() > 1 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  addrinfo hints{}, *found = nullptr;
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  if (::getaddrinfo(host.empty() ? nullptr : host.c_str(), service.c_str(), &hints, &found) != 0) return -1;
  int fd = -1;
  for (addrinfo* a = found; a != nullptr && fd < 0; a = a->ai_next) {
    fd = ::socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK, a->ai_protocol);
    if (fd < 0) continue;
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (::bind(fd, a->ai_addr, a->ai_addrlen) || ::listen(fd, 1024)) { ::close(fd); fd = -1; }
  }
  ::freeaddrinfo(found);
  sockaddr_storage ss{};
  socklen_t len = sizeof(ss);
  if (fd < 0 || ::getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len)) return -1;
  *port = ntohs(ss.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port
                                         : reinterpret_cast<sockaddr_in*>(&ss)->sin_port);
  return fd;
}

// Connections yet to send a frame, oldest first, each with its deadline (--handshake-timeout-ms after accept): one
// that connects and stays silent, or stalls in the TLS handshake, is closed then instead of held for good.
struct Greeting { Clock::time_point deadline; Conn* conn; uint64_t serial; };
static std::deque<Greeting> greetings;

static void accept_clients(int ls, nghttp2_session_callbacks* cbs, std::set<Conn*>* touched) {
  static uint64_t serials = 0;
  int fd;
  while ((fd = ::accept4(ls, nullptr, nullptr, SOCK_NONBLOCK)) >= 0) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    auto* c = new Conn{fd};
    c->serial = ++serials;
    greetings.push_back({Clock::now() + std::chrono::milliseconds(cfg.handshake_ms), c, c->serial});
    if (tls != nullptr) {
      c->ssl = SSL_new(tls);
      SSL_set_fd(c->ssl, fd);
      SSL_set_accept_state(c->ssl);
    }
    nghttp2_session_server_new(&c->session, cbs, c);
    // 1 MiB a stream and 16 MiB a connection before a WINDOW_UPDATE: a W2 request (~120 KB) arrives in one go
    std::vector<nghttp2_settings_entry> s = {{NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, 1 << 20}};
    if (cfg.max_streams > 0) s.push_back({NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, static_cast<uint32_t>(cfg.max_streams)});
    nghttp2_submit_settings(c->session, NGHTTP2_FLAG_NONE, s.data(), s.size());
    nghttp2_session_set_local_window_size(c->session, NGHTTP2_FLAG_NONE, 0, 16 << 20);
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.ptr = c;
    epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
    conns.insert(c);
    touched->insert(c);
  }
}

static bool read_from(Conn* c) {  // false: the connection is done
  static char buf[1 << 16];
  // at most 16 reads (1 MiB) a turn: a client streaming large requests must not starve the others (epoll is
  // level-triggered, so what is left is read on the next turn)
  for (int reads = 0; reads < 16; ++reads) {
    ssize_t r;
    if (c->ssl != nullptr) {  // one record (<= 16 KB) a read, until the socket has no more
      ERR_clear_error();
      int n = SSL_read(c->ssl, buf, sizeof(buf));
      if (n <= 0) {
        int e = SSL_get_error(c->ssl, n);
        c->read_needs_write = e == SSL_ERROR_WANT_WRITE;
        return e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE;  // else: closed, or a failed handshake
      }
      c->read_needs_write = false;
      r = n;
    } else {
      r = ::read(c->fd, buf, sizeof(buf));
      if (r <= 0) return r < 0 && (errno == EAGAIN || errno == EINTR);
    }
    if (nghttp2_session_mem_recv(c->session, reinterpret_cast<uint8_t*>(buf), static_cast<size_t>(r)) < 0) return false;
    if (c->ssl == nullptr && r < static_cast<ssize_t>(sizeof(buf))) return true;
  }
  return true;
}

// The loop: never returns.
static int serve() {
  int port = 0, ls = listen_on(cfg.addr, &port);
  if (ls < 0) { std::fprintf(stderr, "frontend: cannot listen on %s\n", cfg.addr.c_str()); return 1; }
  nghttp2_session_callbacks* cbs;
  nghttp2_session_callbacks_new(&cbs);
  nghttp2_session_callbacks_set_on_begin_headers_callback(cbs, on_begin_headers);
  nghttp2_session_callbacks_set_on_header_callback(cbs, on_header);
  nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, on_data);
  nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, on_frame_recv);
  nghttp2_session_callbacks_set_on_stream_close_callback(cbs, on_stream_close);
  epfd = epoll_create1(0);
  mailfd = eventfd(0, EFD_NONBLOCK);
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.ptr = &ls;
  epoll_ctl(epfd, EPOLL_CTL_ADD, ls, &ev);
  ev.data.ptr = &mailfd;
  epoll_ctl(epfd, EPOLL_CTL_ADD, mailfd, &ev);
  in_loop = true;
  h2_health_changed = [] { health_changed.Post(0, std::string()); };
  h2_drain_streams = [] { drain_streams.Post(0, std::string()); };
  emit("{\"event\": \"serving\", \"port\": " + std::to_string(port) + "}");
  epoll_event events[128];
  std::vector<Mail> mail;
  std::set<Conn*> touched;
  touched_now = &touched;
  for (;;) {
    int wait_ms = -1;
    if (!greetings.empty()) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(greetings.front().deadline - Clock::now());
      wait_ms = static_cast<int>(std::max<long>(0, left.count() + 1));
    }
    int n = epoll_wait(epfd, events, 128, wait_ms);
    for (int i = 0; i < n; ++i) {
      void* p = events[i].data.ptr;
      if (p == &ls) {
        accept_clients(ls, cbs, &touched);
      } else if (p == &mailfd) {
        uint64_t v;
        ssize_t r = ::read(mailfd, &v, 8);
        (void)r;
        {
          std::lock_guard<std::mutex> lk(mail_mu);
          mail.swap(mailbox);
        }
        for (auto& m : mail) m.sink->Deliver(m.code, m.bytes);  // connections it wrote to are touched
        mail.clear();
      } else {
        auto* c = static_cast<Conn*>(p);
        if (c->dead) continue;
        // TLS: a handshake that waited to write goes on from SSL_read as well
        bool readable = events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR) || c->read_needs_write;
        if (!readable || read_from(c)) touched.insert(c);
        else close_conn(c);
      }
    }
    for (Conn* c : touched) if (!c->dead && !flush(c)) close_conn(c);
    touched.clear();
    if (!greetings.empty()) {
      auto now = Clock::now();
      while (!greetings.empty()) {
        const Greeting& g = greetings.front();
        bool waiting = conns.count(g.conn) && g.conn->serial == g.serial && !g.conn->greeted;  // not yet deleted
        if (waiting && g.deadline > now) break;
        if (waiting) close_conn(g.conn);
        greetings.pop_front();
      }
    }
    for (auto it = graveyard.begin(); it != graveyard.end();) {  // dead, and no worker holds a call of theirs
      if ((*it)->calls.empty()) { delete *it; it = graveyard.erase(it); } else { ++it; }
    }
  }
}
}  // namespace h2e

// Health as the workers stand, and the threads beside either engine: SIGTERM's drain, the workers' socket, the
// stats lines, the supervisor's orders.
static void start_threads(sigset_t stop, int ls) {
  set_health(cfg.echo);
  std::thread(drain_on_signal, stop).detach();
  if (!cfg.echo) {
    std::thread(accept_workers, ls).detach();
    std::thread(report_stats).detach();
    std::thread(read_orders).detach();
  }
}

static int usage(const std::string& why) {
  std::fprintf(stderr, "frontend: %s\n(flags: --addr HOST:PORT --socket PATH --max-batch N --max-batch-bytes N "
               "--max-delay-us N --max-queue-us N --cost-us N --cost-ns-per-byte N --grace-ms N --max-streams N "
               "--handshake-timeout-ms N "
               "--predict-token-file PATH --tls-cert PATH --tls-key PATH --tls-client-ca PATH --reflection PATH --access-log "
               "--sched-batch --engine grpc|h2 | --echo)\n",
               why.c_str());
  return 2;
}

int main(int argc, char** argv) {
  // Debian's abseil checks every Mutex for lock-order cycles (GraphCycles: ~4% of the frontend's CPU)
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  std::signal(SIGPIPE, SIG_IGN);  // a worker gone between batches: write() fails, and its dispatcher stops
  // SIGTERM (a drain) when the supervisor dies, even by SIGKILL; its workers then see their socket close.
  // Set here, not in a preexec_fn: forking a Python process that runs gRPC threads is not safe.
  ::prctl(PR_SET_PDEATHSIG, SIGTERM);
  if (::getppid() == 1) return 1;  // it died before the line above
  for (int i = 1; i < argc; ++i) {
    std::string k = argv[i];
    if (k == "--echo") { cfg.echo = true; continue; }
    if (k == "--access-log") { cfg.access_log = true; continue; }
    if (k == "--sched-batch") { cfg.sched_batch = true; continue; }
    if (i + 1 >= argc) return usage(k + " needs a value");
    std::string v = argv[++i];
    if (k == "--engine") {
      if (v != "grpc" && v != "h2") return usage("--engine: grpc or h2, not " + v);
      cfg.h2 = v == "h2";
      continue;
    }
    char* end = nullptr;
    long n = std::strtol(v.c_str(), &end, 10);
    bool number = end != v.c_str() && *end == '\0' && n >= 0;
    if (k == "--addr") cfg.addr = v;
    else if (k == "--socket") cfg.sock = v;
    else if (k == "--predict-token-file") { if (!read_file(v, &cfg.token, true)) return usage(k + ": cannot read " + v); }
    else if (k == "--tls-cert") { if (!read_file(v, &cfg.tls_cert)) return usage(k + ": cannot read " + v); }
    else if (k == "--tls-key") { if (!read_file(v, &cfg.tls_key)) return usage(k + ": cannot read " + v); }
    else if (k == "--tls-client-ca") { if (!read_file(v, &cfg.tls_client_ca)) return usage(k + ": cannot read " + v); }
    else if (k == "--reflection") { if (!load_reflection(v)) return usage(k + ": cannot read a reflection table from " + v); }
    else if (!number) return usage(k + ": not a non-negative integer: " + v);
    else if (k == "--max-batch") cfg.max_batch = static_cast<int>(n);
    else if (k == "--max-batch-bytes") cfg.max_batch_bytes = n;
    else if (k == "--max-delay-us") cfg.max_delay_us = n;
    else if (k == "--max-queue-us") cfg.max_queue_us = n;
    else if (k == "--cost-us") cfg.cost_us = n;
    else if (k == "--cost-ns-per-byte") cfg.cost_ns_per_byte = n;
    else if (k == "--grace-ms") cfg.grace_ms = n;
    else if (k == "--max-streams") cfg.max_streams = n;
    else if (k == "--handshake-timeout-ms") cfg.handshake_ms = n;
    else return usage("unknown flag " + k);
  }
  if (cfg.max_batch < 1) return usage("--max-batch must be at least 1");
  if (cfg.handshake_ms < 1) return usage("--handshake-timeout-ms must be at least 1");
  if (!cfg.echo && cfg.sock.empty()) return usage("--socket is required (or --echo)");
  if (cfg.tls_cert.empty() != cfg.tls_key.empty()) return usage("--tls-cert and --tls-key go together");
  if (!cfg.tls_client_ca.empty() && cfg.tls_cert.empty()) return usage("--tls-client-ca needs --tls-cert");
  // SIGTERM / SIGINT go to the drain thread only (blocked here, before any thread starts, so all inherit it)
  sigset_t stop;
  sigemptyset(&stop);
  sigaddset(&stop, SIGTERM);
  sigaddset(&stop, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop, nullptr);
  int ls = -1;
  if (!cfg.echo) {
    ls = ::socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un sa{};
    sa.sun_family = AF_UNIX;
    if (cfg.sock.size() >= sizeof(sa.sun_path)) return usage("--socket: path longer than a unix socket allows");
    std::strncpy(sa.sun_path, cfg.sock.c_str(), sizeof(sa.sun_path) - 1);
    ::unlink(cfg.sock.c_str());
    if (::bind(ls, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) || ::listen(ls, 64)) {
      std::perror("worker socket");
      return 1;
    }
  }
  if (cfg.h2) {
    std::string why;
    if (!cfg.tls_cert.empty() && !h2e::tls_setup(&why)) return usage(why);
    start_threads(stop, ls);
    return h2e::serve();
  }
  grpc::EnableDefaultHealthCheckService(true);
  int port = 0;
  Service svc;
  Unary unary;
  grpc::ServerBuilder b;
  std::shared_ptr<grpc::ServerCredentials> creds = grpc::InsecureServerCredentials();
  if (!cfg.tls_cert.empty()) {
    grpc::SslServerCredentialsOptions opts(cfg.tls_client_ca.empty()
                                               ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
                                               : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
    opts.pem_root_certs = cfg.tls_client_ca;
    opts.pem_key_cert_pairs.push_back({cfg.tls_key, cfg.tls_cert});
    creds = grpc::SslServerCredentials(opts);
  }
  b.AddListeningPort(cfg.addr, creds, &port);
  if (cfg.max_streams > 0) b.AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS, static_cast<int>(cfg.max_streams));
  b.RegisterService(&unary);
  b.RegisterCallbackGenericService(&svc);
  auto server = b.BuildAndStart();
  if (!server || port == 0) {
    std::fprintf(stderr, "frontend: cannot listen on %s\n", cfg.addr.c_str());
    return 1;
  }
  server_ = server.get();
  start_threads(stop, ls);
  emit("{\"event\": \"serving\", \"port\": " + std::to_string(port) + "}");
  server->Wait();
}
