#include "generator/openai_http_server.h"

#include <dirent.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include <algorithm>
#include <cstdlib>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "core/echo.h"
#include "core/log.h"
#include "core/status_macros.h"
#include "core/metrics/connection_threads.h"
#include "core/status_http.h"
#include "generator/openai_request.h"
#include "generator/openai_response.h"
#include "httplib.h"
#include "openssl/x509v3.h"

namespace specontext::generator {
namespace {

constexpr char kJson[] = "application/json";

// The names of a verified client certificate as gRPC reports its peer identity: the DNS names of its
// subjectAltName, else its common name; empty when the client sent none.
std::string CertificateIdentity(const httplib::Request& req) {
  if (req.ssl == nullptr) return "";
  X509* cert = SSL_get1_peer_certificate(req.ssl);
  if (cert == nullptr) return "";
  std::string out;
  if (auto* names = static_cast<GENERAL_NAMES*>(X509_get_ext_d2i(cert, NID_subject_alt_name, nullptr, nullptr))) {
    for (int i = 0; i < sk_GENERAL_NAME_num(names); ++i) {
      const GENERAL_NAME* n = sk_GENERAL_NAME_value(names, i);
      if (n->type != GEN_DNS) continue;
      const ASN1_STRING* dns = n->d.dNSName;
      if (!out.empty()) out += ",";
      out.append(reinterpret_cast<const char*>(ASN1_STRING_get0_data(dns)),
                 static_cast<size_t>(ASN1_STRING_length(dns)));
    }
    GENERAL_NAMES_free(names);
  }
  if (out.empty()) {
    char cn[256];
    const int n = X509_NAME_get_text_by_NID(X509_get_subject_name(cert), NID_commonName, cn, sizeof(cn));
    if (n > 0) out.assign(cn, static_cast<size_t>(n));
  }
  X509_free(cert);
  return out;
}

// The key a client's calls count against, as gRPC's ClientKeyOf spells it ("tls:" + the certificate
// identity under mutual TLS, else the address without its port), so a client has one budget across
// both front ends.
std::string ClientKey(const httplib::Request& req) {
  if (std::string id = CertificateIdentity(req); !id.empty()) return absl::StrCat("tls:", id);
  const std::string& a = req.remote_addr;
  return a.find(':') != std::string::npos ? absl::StrCat("ipv6:[", a, "]") : absl::StrCat("ipv4:", a);
}

void SendError(httplib::Response& res, const HttpError& e, const std::string& param, const std::string& code) {
  res.status = e.http_status;
  res.set_content(ErrorJson(e, param, code), kJson);
}

void SendStatus(httplib::Response& res, const absl::Status& st, const std::string& param = "",
                const std::string& code = "") {
  SendError(res, ToHttpError(st), param, code);
}

std::string Event(const std::string& data) { return absl::StrCat("data: ", data, "\n\n"); }

// The port of a socket address (IPv4 or IPv6), or -1.
int PortOf(const sockaddr_storage& a) {
  if (a.ss_family == AF_INET) return ntohs(reinterpret_cast<const sockaddr_in&>(a).sin_port);
  if (a.ss_family == AF_INET6) return ntohs(reinterpret_cast<const sockaddr_in6&>(a).sin6_port);
  return -1;
}

// The socket of the connection `req` came on, or -1. cpp-httplib 0.11 (Debian 12) shows a handler
// its connection's addresses but not its socket (newer versions have Request::is_connection_closed),
// so the socket is found among this process's descriptors by its two ports. The connection's thread
// runs this handler, so the descriptor cannot be closed and reused while the handler holds it.
int FindConnectionSocket(const httplib::Request& req) {
  DIR* dir = opendir("/proc/self/fd");
  if (dir == nullptr) return -1;
  int found = -1;
  while (dirent* e = readdir(dir)) {
    char* end = nullptr;
    const long fd = std::strtol(e->d_name, &end, 10);
    if (end == e->d_name || *end != '\0' || fd == dirfd(dir)) continue;
    struct stat st;
    if (fstat(static_cast<int>(fd), &st) != 0 || !S_ISSOCK(st.st_mode)) continue;
    sockaddr_storage local{}, peer{};
    socklen_t local_len = sizeof(local), peer_len = sizeof(peer);
    if (getsockname(static_cast<int>(fd), reinterpret_cast<sockaddr*>(&local), &local_len) != 0 ||
        getpeername(static_cast<int>(fd), reinterpret_cast<sockaddr*>(&peer), &peer_len) != 0) {
      continue;
    }
    if (PortOf(local) == req.local_port && PortOf(peer) == req.remote_port) {
      found = static_cast<int>(fd);
      break;
    }
  }
  closedir(dir);
  return found;
}

// True once the peer closed (or reset) the connection on `fd`; never blocks.
bool PeerClosed(int fd) {
  if (fd < 0) return false;
  pollfd p{fd, POLLRDHUP, 0};
  return ::poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR)) != 0;
}

// A non-streaming call: the responses gathered into one choice; a client that closes its connection
// meanwhile cancels the request.
class CollectSink final : public CallSink {
 public:
  CollectSink(OpenAiChoice* choice, int fd) : choice_(choice), fd_(fd) {}
  bool Cancelled() override { return PeerClosed(fd_); }
  bool Write(const v1::GenerateResponse& r) override {
    choice_->text += r.text();
    if (r.done()) {
      choice_->finish_reason = OpenAiFinishReason(r.finish_reason());
      choice_->prompt_tokens = r.usage().prompt_tokens();
      choice_->completion_tokens = r.usage().generated_tokens();
    }
    return true;
  }

 private:
  OpenAiChoice* choice_;
  int fd_;  // the connection's socket, or -1 when it was not found (the request then runs to its end)
};

// A streaming call: each response becomes a server-sent event in OpenAI's chunk shape.
class SseSink final : public CallSink {
 public:
  SseSink(httplib::DataSink& sink, OpenAiEndpoint endpoint, OpenAiChoice base, bool include_usage)
      : sink_(sink), endpoint_(endpoint), choice_(std::move(base)), include_usage_(include_usage) {}

  // The socket is probed (a peek sees the peer's close) before each wait for engine events.
  bool Cancelled() override { return !sink_.is_writable(); }

  bool Write(const v1::GenerateResponse& r) override {
    pending_ += r.text();
    std::string out;
    const size_t n = r.done() ? pending_.size() : CompleteUtf8Prefix(pending_);
    const bool chat = endpoint_ == OpenAiEndpoint::kChatCompletions;
    if (n > 0 || (first_ && chat)) {
      choice_.text = pending_.substr(0, n);
      pending_.erase(0, n);
      absl::StrAppend(&out, Event(ChunkJson(endpoint_, choice_, first_, false)));
      first_ = false;
    }
    if (r.done()) {
      choice_.text.clear();
      choice_.finish_reason = OpenAiFinishReason(r.finish_reason());
      choice_.prompt_tokens = r.usage().prompt_tokens();
      choice_.completion_tokens = r.usage().generated_tokens();
      absl::StrAppend(&out, Event(ChunkJson(endpoint_, choice_, first_, false)));
      if (include_usage_) absl::StrAppend(&out, Event(ChunkJson(endpoint_, choice_, false, true)));
      absl::StrAppend(&out, "data: [DONE]\n\n");
    }
    return out.empty() || sink_.write(out.data(), out.size());
  }

 private:
  httplib::DataSink& sink_;
  OpenAiEndpoint endpoint_;
  OpenAiChoice choice_;
  bool include_usage_;
  bool first_ = true;
  std::string pending_;  // text held back until its UTF-8 character is complete
};

// An admitted streaming call between the handler (which admitted it) and the content provider
// (which streams it once the status line is out). A call whose provider never ran (the client left
// first) is cancelled and counted when the response is dropped.
struct StreamState {
  GeneratorService* service;
  std::unique_ptr<GenerationCall> call;
  absl::Time arrival;
  std::string client;
  bool ended = false;

  void End(const absl::Status& st) {
    call.reset();
    service->EndCall(st, arrival, client);
    ended = true;
  }
  ~StreamState() {
    if (!ended) End(absl::CancelledError("the client left before the stream started"));
  }
};

}  // namespace

OpenAiHttpServer::OpenAiHttpServer(GeneratorService* service, std::string host, int port,
                                   OpenAiHttpOptions options)
    : service_(service), host_(std::move(host)), port_(port), options_(std::move(options)) {}

OpenAiHttpServer::~OpenAiHttpServer() { Stop(); }

namespace {

void HandleGenerate(GeneratorService* service, OpenAiEndpoint endpoint, const httplib::Request& req,
                    httplib::Response& res) {
  std::string param;
  absl::StatusOr<OpenAiRequest> parsed = ParseOpenAiRequest(req.body, endpoint, &param);
  if (!parsed.ok()) return SendStatus(res, parsed.status(), param);
  const ServiceOptions& options = service->options();
  if (!parsed->model.empty() && parsed->model != options.model_name) {
    return SendStatus(res,
                      absl::NotFoundError(absl::StrCat("the model ", EchoValue(parsed->model),
                                                       " does not exist; this server serves ",
                                                       EchoValue(options.model_name))),
                      "model", "model_not_found");
  }
  const v1::GenerateRequest request = ToGenerateRequest(*parsed, options.max_context);
  const absl::Time arrival = absl::Now();
  const std::string client = ClientKey(req);
  service->BeginCall();
  const int fd = parsed->stream ? -1 : FindConnectionSocket(req);  // streams probe their DataSink instead
  absl::StatusOr<std::unique_ptr<GenerationCall>> call =
      service->Admit(request, client, [fd] { return PeerClosed(fd); }, arrival);
  if (!call.ok()) {
    service->EndCall(call.status(), arrival, client);
    return SendStatus(res, call.status(), "",
                      call.status().code() == absl::StatusCode::kResourceExhausted ? "rate_limit_exceeded" : "");
  }
  const bool chat = endpoint == OpenAiEndpoint::kChatCompletions;
  OpenAiChoice choice;
  choice.id = absl::StrCat(chat ? "chatcmpl-" : "cmpl-", (*call)->request_id());
  choice.created = absl::ToUnixSeconds(absl::Now());
  choice.model = options.model_name;
  if (!parsed->stream) {
    CollectSink sink(&choice, fd);
    absl::Status st = service->Stream(**call, sink);
    call->reset();
    service->EndCall(st, arrival, client);
    if (!st.ok()) return SendStatus(res, st);
    res.set_content(CompletionJson(endpoint, choice), kJson);
    return;
  }
  auto state = std::make_shared<StreamState>();
  state->service = service;
  state->call = *std::move(call);
  state->arrival = arrival;
  state->client = client;
  res.set_header("Cache-Control", "no-cache");
  res.set_header("X-Accel-Buffering", "no");  // proxies pass events on at once
  const bool include_usage = parsed->include_usage;
  res.set_chunked_content_provider(
      "text/event-stream", [state, endpoint, choice, include_usage](size_t, httplib::DataSink& sink) {
        if (state->ended) return false;
        SseSink sse(sink, endpoint, choice, include_usage);
        absl::Status st = state->service->Stream(*state->call, sse);
        const bool client_left =
            st.code() == absl::StatusCode::kCancelled || st.code() == absl::StatusCode::kDeadlineExceeded;
        if (!st.ok() && !client_left) {
          // The status line said 200 already: the error travels as an event, as OpenAI's do.
          const std::string out =
              absl::StrCat(Event(ErrorJson(ToHttpError(st), "", "")), "data: [DONE]\n\n");
          sink.write(out.data(), out.size());
        }
        state->End(st);
        if (client_left) return false;  // closes the connection
        sink.done();
        return true;
      });
}

}  // namespace

absl::Status OpenAiHttpServer::Start() {
  if (listener_.started()) return absl::FailedPreconditionError("http: server already started");
  const bool tls = !options_.tls_cert_file.empty() || !options_.tls_key_file.empty();
  std::unique_ptr<httplib::Server> server;
  if (tls) {
    if (options_.tls_cert_file.empty() || options_.tls_key_file.empty()) {
      return absl::InvalidArgumentError("http: --tls-cert and --tls-key must be given together");
    }
    auto ssl = std::make_unique<httplib::SSLServer>(
        options_.tls_cert_file.c_str(), options_.tls_key_file.c_str(),
        options_.tls_client_ca_file.empty() ? nullptr : options_.tls_client_ca_file.c_str());
    if (!ssl->is_valid()) {
      return absl::InvalidArgumentError(absl::StrCat("http: cannot load TLS certificate ", options_.tls_cert_file,
                                                     " and key ", options_.tls_key_file));
    }
    server = std::move(ssl);
  } else {
    server = std::make_unique<httplib::Server>();
  }
  listener_.Configure(server.get(), options_.max_connections);
  // Headers and body leave in separate writes: with Nagle's algorithm and the peer's delayed ACK
  // every response would wait ~40 ms (measured: +85 ms a request against gRPC without this).
  server->set_tcp_nodelay(true);
  server->set_keep_alive_timeout(std::max<time_t>(1, options_.idle_timeout.count()));
  server->set_read_timeout(options_.io_timeout);
  server->set_write_timeout(options_.io_timeout);
  server->set_payload_max_length(static_cast<size_t>(options_.max_body_bytes));

  GeneratorService* service = service_;
  server->Post("/v1/completions", [service](const httplib::Request& req, httplib::Response& res) {
    HandleGenerate(service, OpenAiEndpoint::kCompletions, req, res);
  });
  server->Post("/v1/chat/completions", [service](const httplib::Request& req, httplib::Response& res) {
    HandleGenerate(service, OpenAiEndpoint::kChatCompletions, req, res);
  });
  const int64_t started = absl::ToUnixSeconds(absl::Now());
  server->Get("/v1/models", [service, started](const httplib::Request&, httplib::Response& res) {
    res.set_content(ModelsJson(service->options().model_name, started), kJson);
  });
  // The other methods on known paths: 405 with Allow.
  for (const auto& [path, allow] : {std::pair<std::string, std::string>{"/v1/completions", "POST"},
                                    {"/v1/chat/completions", "POST"}, {"/v1/models", "GET"}}) {
    auto not_allowed = [allow](const httplib::Request& req, httplib::Response& res) {
      res.set_header("Allow", allow);
      SendError(res, {405, "invalid_request_error", absl::StrCat(req.method, " is not allowed here; use ", allow)},
                "", "method_not_allowed");
    };
    if (allow != "GET") server->Get(path, not_allowed);
    if (allow != "POST") server->Post(path, not_allowed);
    server->Put(path, not_allowed);
    server->Patch(path, not_allowed);
    server->Delete(path, not_allowed);
  }
  // Errors cpp-httplib produces itself (no route, a body past the cap) get OpenAI's shape too.
  const int64_t max_body = options_.max_body_bytes;
  server->set_error_handler(httplib::Server::HandlerWithResponse(
      [max_body](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty()) return httplib::Server::HandlerResponse::Unhandled;  // a handler's own error
    if (res.status == 404) {
      SendError(res, {404, "invalid_request_error", absl::StrCat("unknown path ", EchoValue(req.path))}, "",
                "unknown_url");
    } else if (res.status == 413) {
      SendError(res, {413, "invalid_request_error", absl::StrCat("the body exceeds ", max_body, " bytes")}, "",
                "request_too_large");
    } else {
      SendError(res, {res.status, res.status >= 500 ? "server_error" : "invalid_request_error",
                      absl::StrCat("HTTP ", res.status)}, "", "");
    }
    return httplib::Server::HandlerResponse::Handled;
  }));

  RETURN_IF_ERROR(listener_.Listen(std::move(server), host_, port_));
  SPC_LOG(INFO) << "http: serving the OpenAI-compatible API" << Kv("host", host_) << Kv("port", listener_.port())
                << Kv("tls", tls);
  return absl::OkStatus();
}

void OpenAiHttpServer::Stop() { listener_.Stop(); }

}  // namespace specontext::generator
