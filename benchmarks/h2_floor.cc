// What a gRPC call costs below gRPC: a single-threaded HTTP/2 server on nghttp2 (epoll, h2c) that answers every
// call at once, either OK with an empty message (--mode echo) or trailers-only RESOURCE_EXHAUSTED with
// serve-native's admission message (--mode refuse). benchmarks/h2_floor.py drives it with h2load beside
// serve-native's grpc++ frontend doing the same two things, to price W1's 2x overload: a refusal there costs
// grpc++ a whole call (~20 us), and goodput >= 0.9 needs refusals at a fraction of an answer's cost.
//
//     h2_floor --mode echo|refuse [--port N] [--max-streams N]
//
// stdout: {"event": "serving", "port": N}. No TLS, no deadlines, no flow-control tuning: a floor, not a server.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <nghttp2/nghttp2.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

static bool refuse = false;
static const char kRefusal[] =
    "overloaded: expected queue wait 21 ms exceeds max_queue_wait_ms 20";  // as serve-native words it

struct Conn {
  int fd;
  nghttp2_session* session = nullptr;
  std::string out;  // bytes nghttp2 produced that the socket has not taken yet
  bool watching_out = false;
};

static nghttp2_nv nv(const char* name, const char* value) {
  return nghttp2_nv{reinterpret_cast<uint8_t*>(const_cast<char*>(name)),
                    reinterpret_cast<uint8_t*>(const_cast<char*>(value)), std::strlen(name), std::strlen(value),
                    NGHTTP2_NV_FLAG_NO_COPY_NAME | NGHTTP2_NV_FLAG_NO_COPY_VALUE};
}

static ssize_t empty_message(nghttp2_session* session, int32_t id, uint8_t* buf, size_t length,
                             uint32_t* flags, nghttp2_data_source*, void*) {
  std::memset(buf, 0, 5);  // one gRPC frame: uncompressed, 0 bytes
  *flags = NGHTTP2_DATA_FLAG_EOF | NGHTTP2_DATA_FLAG_NO_END_STREAM;
  nghttp2_nv trailer[] = {nv("grpc-status", "0")};
  nghttp2_submit_trailer(session, id, trailer, 1);
  return 5;
}

static void answer(nghttp2_session* session, int32_t id) {
  if (refuse) {
    nghttp2_nv h[] = {nv(":status", "200"), nv("content-type", "application/grpc"), nv("grpc-status", "8"),
                      nv("grpc-message", kRefusal)};
    nghttp2_submit_response(session, id, h, 4, nullptr);  // trailers-only: HEADERS with END_STREAM
  } else {
    nghttp2_nv h[] = {nv(":status", "200"), nv("content-type", "application/grpc")};
    nghttp2_data_provider data{};
    data.read_callback = empty_message;
    nghttp2_submit_response(session, id, h, 2, &data);
  }
}

static int on_frame_recv(nghttp2_session* session, const nghttp2_frame* frame, void*) {
  bool request = frame->hd.type == NGHTTP2_DATA ||
                 (frame->hd.type == NGHTTP2_HEADERS && frame->headers.cat == NGHTTP2_HCAT_REQUEST);
  if (request && (frame->hd.flags & NGHTTP2_FLAG_END_STREAM)) answer(session, frame->hd.stream_id);
  return 0;
}

static void watch(int ep, Conn* c, bool out) {
  if (c->watching_out == out) return;
  epoll_event ev{};
  ev.events = EPOLLIN | (out ? EPOLLOUT : 0);
  ev.data.ptr = c;
  epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
  c->watching_out = out;
}

// Everything nghttp2 has to send, in as few writes as the socket takes; false: the connection is done.
static bool flush(int ep, Conn* c) {
  for (;;) {
    const uint8_t* data;
    ssize_t n = nghttp2_session_mem_send(c->session, &data);
    if (n < 0) return false;
    if (n == 0) break;
    c->out.append(reinterpret_cast<const char*>(data), static_cast<size_t>(n));
  }
  while (!c->out.empty()) {
    ssize_t w = ::write(c->fd, c->out.data(), c->out.size());
    if (w < 0) {
      if (errno == EAGAIN) break;
      return false;
    }
    c->out.erase(0, static_cast<size_t>(w));
  }
  watch(ep, c, !c->out.empty());
  return !c->out.empty() || nghttp2_session_want_read(c->session) || nghttp2_session_want_write(c->session);
}

static void close_conn(Conn* c) {
  nghttp2_session_del(c->session);
  ::close(c->fd);
  delete c;
}

int main(int argc, char** argv) {
  int port = 0;
  long max_streams = 256;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string k = argv[i], v = argv[i + 1];
    if (k == "--mode") refuse = v == "refuse";
    else if (k == "--port") port = std::atoi(v.c_str());
    else if (k == "--max-streams") max_streams = std::atol(v.c_str());
    else { std::fprintf(stderr, "h2_floor: unknown flag %s\n", k.c_str()); return 2; }
  }
  std::signal(SIGPIPE, SIG_IGN);
  int ls = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
  int one = 1;
  setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(static_cast<uint16_t>(port));
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(sa);
  if (::bind(ls, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) || ::listen(ls, 512) ||
      ::getsockname(ls, reinterpret_cast<sockaddr*>(&sa), &len)) {
    std::perror("h2_floor: listen");
    return 1;
  }
  nghttp2_session_callbacks* cbs;
  nghttp2_session_callbacks_new(&cbs);
  nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, on_frame_recv);
  int ep = epoll_create1(0);
  epoll_event lev{};
  lev.events = EPOLLIN;
  lev.data.ptr = nullptr;
  epoll_ctl(ep, EPOLL_CTL_ADD, ls, &lev);
  std::printf("{\"event\": \"serving\", \"port\": %d}\n", ntohs(sa.sin_port));
  std::fflush(stdout);
  epoll_event events[64];
  static char buf[1 << 16];
  for (;;) {
    int n = epoll_wait(ep, events, 64, -1);
    for (int i = 0; i < n; ++i) {
      auto* c = static_cast<Conn*>(events[i].data.ptr);
      if (c == nullptr) {
        int fd;
        while ((fd = ::accept4(ls, nullptr, nullptr, SOCK_NONBLOCK)) >= 0) {
          setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
          auto* nc = new Conn{fd};
          nghttp2_session_server_new(&nc->session, cbs, nc);
          nghttp2_settings_entry s[] = {{NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, static_cast<uint32_t>(max_streams)}};
          nghttp2_submit_settings(nc->session, NGHTTP2_FLAG_NONE, s, 1);
          epoll_event ev{};
          ev.events = EPOLLIN;
          ev.data.ptr = nc;
          epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
          if (!flush(ep, nc)) close_conn(nc);
        }
        continue;
      }
      bool alive = true;
      if (events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
        for (;;) {
          ssize_t r = ::read(c->fd, buf, sizeof(buf));
          if (r > 0) {
            if (nghttp2_session_mem_recv(c->session, reinterpret_cast<uint8_t*>(buf), static_cast<size_t>(r)) < 0) {
              alive = false;
              break;
            }
            if (r < static_cast<ssize_t>(sizeof(buf))) break;
            continue;
          }
          if (r < 0 && errno == EAGAIN) break;
          alive = false;  // closed or failed
          break;
        }
      }
      if (!alive || !flush(ep, c)) close_conn(c);
    }
  }
}
