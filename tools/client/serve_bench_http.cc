#include "tools/client/serve_bench_http.h"

#include <httplib.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace specontext::client {
namespace {

using Clock = std::chrono::steady_clock;
using json = nlohmann::json;

constexpr int kUnavailable = 14;       // grpc::StatusCode::UNAVAILABLE
constexpr int kDeadlineExceeded = 4;   // grpc::StatusCode::DEADLINE_EXCEEDED
constexpr int kInternal = 13;

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// The HTTP run's state: one thread per request in flight.
struct HttpState : LoadState {
  std::map<int64_t, std::thread> threads;  // one per request sent and not yet joined
  std::vector<int64_t> ended;              // requests whose thread finished, to join
};

// Reads the server-sent events of one stream as they arrive.
class SseParser {
 public:
  // Feeds bytes; calls on_event(data) for each complete "data: ..." event.
  template <typename F>
  void Feed(const char* p, size_t n, F&& on_event) {
    buf_.append(p, n);
    size_t pos;
    while ((pos = buf_.find("\n\n")) != std::string::npos) {
      std::string event = buf_.substr(0, pos);
      buf_.erase(0, pos + 2);
      std::string data;
      size_t start = 0;
      while (start <= event.size()) {
        size_t end = event.find('\n', start);
        if (end == std::string::npos) end = event.size();
        std::string_view line(event.data() + start, end - start);
        if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
        if (line.substr(0, 5) == "data:") {
          line.remove_prefix(5);
          if (!line.empty() && line.front() == ' ') line.remove_prefix(1);
          if (!data.empty()) data += '\n';
          data.append(line);
        }
        start = end + 1;
      }
      if (!data.empty()) on_event(data);
    }
  }

 private:
  std::string buf_;
};

std::unique_ptr<httplib::Client> MakeClient(const HttpTarget& t, double timeout_s) {
  std::unique_ptr<httplib::Client> cli;
  const std::string scheme = t.tls_ca_path.empty() ? "http://" : "https://";
  const std::string host = t.host.find(':') != std::string::npos ? "[" + t.host + "]" : t.host;
  const std::string url = absl::StrCat(scheme, host, ":", t.port);
  if (t.tls_cert_path.empty()) {
    cli = std::make_unique<httplib::Client>(url);
  } else {
    cli = std::make_unique<httplib::Client>(url, t.tls_cert_path, t.tls_key_path);
  }
  if (!t.tls_ca_path.empty()) {
    cli->set_ca_cert_path(t.tls_ca_path.c_str());
    cli->enable_server_certificate_verification(true);
  }
  const auto sec = static_cast<time_t>(timeout_s);
  const auto usec = static_cast<time_t>((timeout_s - static_cast<double>(sec)) * 1e6);
  cli->set_connection_timeout(std::min<time_t>(sec, 10), sec >= 10 ? 0 : usec);
  // A stream that sends nothing for the whole deadline is past it.
  cli->set_read_timeout(sec, usec);
  cli->set_write_timeout(sec, usec);
  return cli;
}

// Runs one request to its end on the calling thread and returns its record.
// `send` is when the sending thread handed it over (so send times follow the plan's order).
RequestRecord RunOne(const HttpTarget& target, int64_t index, const v1::GenerateRequest& request,
                     Clock::time_point run_start, Clock::time_point send, double timeout_s,
                     HttpState* state) {
  const std::string body = CompletionBody(request).dump();
  auto cli = MakeClient(target, timeout_s);
  std::vector<Clock::time_point> times;
  times.reserve(static_cast<size_t>(std::clamp(request.max_new_tokens(), 0, 1 << 16)));
  int64_t usage_completion = -1, usage_prompt = 0;
  std::string event_error;
  SseParser parser;
  const Clock::time_point deadline =
      send + std::chrono::microseconds(static_cast<int64_t>(timeout_s * 1e6));
  bool past_deadline = false;

  httplib::Request req;
  req.method = "POST";
  req.path = "/v1/completions";
  req.body = body;
  req.set_header("Content-Type", "application/json");
  req.set_header("Accept", "text/event-stream");
  req.content_receiver = [&](const char* data, size_t n, uint64_t, uint64_t) {
    const Clock::time_point now = Clock::now();
    parser.Feed(data, n, [&](const std::string& ev) {
      if (ev == "[DONE]") return;
      json j = json::parse(ev, nullptr, false);
      if (j.is_discarded() || !j.is_object()) return;
      if (auto e = j.find("error"); e != j.end()) {
        event_error = e->is_object() ? e->value("message", e->dump()) : e->dump();
        return;
      }
      if (auto u = j.find("usage"); u != j.end() && u->is_object()) {
        usage_completion = u->value("completion_tokens", int64_t{-1});
        usage_prompt = u->value("prompt_tokens", int64_t{0});
      }
      auto c = j.find("choices");
      if (c == j.end() || !c->is_array() || c->empty()) return;
      const json& choice = (*c)[0];
      auto text = choice.find("text");
      if (text != choice.end() && text->is_string() && !text->get_ref<const std::string&>().empty()) {
        times.push_back(now);
        std::lock_guard<std::mutex> lock(state->mu);
        ++state->tokens;
      }
    });
    if (now >= deadline) {
      past_deadline = true;
      return false;
    }
    return true;
  };

  httplib::Result res = cli->send(req);
  const Clock::time_point end = Clock::now();

  RequestRecord r;
  r.index = index;
  r.send_s = Seconds(send - run_start);
  r.latency_s = Seconds(end - send);
  r.output_tokens_asked = request.max_new_tokens();
  r.prompt_tokens = usage_prompt > 0 ? usage_prompt : request.token_ids_size();
  if (past_deadline || (!res && res.error() == httplib::Error::Read && end >= deadline)) {
    r.code = kDeadlineExceeded;
    r.error = absl::StrCat("no end of the stream within ", timeout_s, " s");
  } else if (!res) {
    // No answer at all, or a connection that broke mid-stream.
    r.code = kUnavailable;
    r.error = absl::StrCat("HTTP client: ", httplib::to_string(res.error()));
  } else if (res->status != 200) {
    r.code = res->status;
    r.code_name = absl::StrCat("HTTP_", res->status);
    json j = json::parse(res->body, nullptr, false);
    r.error = (!j.is_discarded() && j.is_object() && j.contains("error") && j["error"].is_object())
                  ? j["error"].value("message", res->body)
                  : res->body.substr(0, 500);
  } else if (!event_error.empty()) {
    r.code = kInternal;
    r.code_name = "HTTP_STREAM_ERROR";
    r.error = event_error;
  } else if (usage_completion < 0) {
    r.code = kInternal;
    r.code_name = "HTTP_NO_USAGE";
    r.error = "the stream ended without its usage chunk";
  }
  // Tokens the usage counts beyond the text chunks arrive with the last chunk.
  if (usage_completion > static_cast<int64_t>(times.size()) && !times.empty()) {
    const int64_t extra = usage_completion - static_cast<int64_t>(times.size());
    {
      std::lock_guard<std::mutex> lock(state->mu);
      state->tokens += extra;
    }
    times.insert(times.end(), static_cast<size_t>(extra), times.back());
  }
  r.output_tokens = usage_completion >= 0 && r.ok() ? usage_completion
                                                    : static_cast<int64_t>(times.size());
  if (!times.empty()) r.ttft_s = Seconds(times.front() - send);
  for (size_t i = 1; i < times.size() && static_cast<int64_t>(i) < r.output_tokens; ++i)
    r.itl_s.push_back(Seconds(times[i] - times[i - 1]));
  return r;
}

// Joins the threads of the requests that ended; called without the lock held.
void JoinEnded(HttpState* state) {
  std::vector<std::thread> ended;
  {
    std::lock_guard<std::mutex> lock(state->mu);
    for (int64_t i : state->ended) {
      auto it = state->threads.find(i);
      ended.push_back(std::move(it->second));
      state->threads.erase(it);
    }
    state->ended.clear();
  }
  for (std::thread& t : ended) t.join();
}

}  // namespace

absl::StatusOr<HttpTarget> ParseHttpAddress(const std::string& addr) {
  HttpTarget t;
  std::string port;
  if (!addr.empty() && addr.front() == '[') {
    const size_t close = addr.find("]:");
    if (close == std::string::npos) return absl::InvalidArgumentError("--addr must be HOST:PORT");
    t.host = addr.substr(1, close - 1);
    port = addr.substr(close + 2);
  } else {
    const size_t colon = addr.rfind(':');
    if (colon == std::string::npos || colon == 0) {
      return absl::InvalidArgumentError("--addr must be HOST:PORT");
    }
    t.host = addr.substr(0, colon);
    port = addr.substr(colon + 1);
  }
  if (!absl::SimpleAtoi(port, &t.port) || t.port < 1 || t.port > 65535) {
    return absl::InvalidArgumentError("--addr must be HOST:PORT with a port in 1..65535");
  }
  return t;
}

absl::Status CheckHttpApi(const HttpTarget& target) {
  auto cli = MakeClient(target, 10);
  httplib::Result res = cli->Get("/v1/models");
  const std::string where = absl::StrCat("the HTTP API at ", target.host, ":", target.port);
  if (!res) {
    return absl::UnavailableError(
        absl::StrCat("cannot reach ", where, ": ", httplib::to_string(res.error())));
  }
  if (res->status != 200) {
    return absl::UnavailableError(absl::StrCat(where, " answers GET /v1/models with HTTP ",
                                               res->status, " (is it the generator's --http-port?)"));
  }
  return absl::OkStatus();
}

json CompletionBody(const v1::GenerateRequest& r) {
  json j;
  if (r.token_ids_size() > 0) {
    j["prompt"] = std::vector<int32_t>(r.token_ids().begin(), r.token_ids().end());
  } else {
    j["prompt"] = r.prompt();
  }
  j["max_tokens"] = r.max_new_tokens();
  j["ignore_eos"] = r.ignore_eos();
  j["temperature"] = r.sampling().temperature();
  j["seed"] = r.sampling().seed();
  if (r.sparsity().budget() > 0) j["budget"] = r.sparsity().budget();
  if (r.sparsity().dense()) j["dense"] = true;
  j["stream"] = true;
  j["stream_options"] = {{"include_usage", true}};
  return j;
}

LoadResult RunLoadHttp(const HttpTarget& target, const std::vector<v1::GenerateRequest>& requests,
                       const LoadOptions& o) {
  HttpState state;
  return DriveLoad(
      &state, requests.size(), o,
      [&](size_t i, Clock::time_point start, std::unique_lock<std::mutex>&) {
        const auto index = static_cast<int64_t>(i);
        const v1::GenerateRequest* request = &requests[i];
        const Clock::time_point send = Clock::now();
        // Started under the lock: the thread's end (which takes it) cannot come before its entry.
        state.threads.emplace(
            index, std::thread([&state, &target, index, request, start, send, &o] {
              RequestRecord r = RunOne(target, index, *request, start, send, o.timeout_s, &state);
              std::lock_guard<std::mutex> lock(state.mu);
              state.ended.push_back(index);
              const bool stops =
                  (r.code == kUnavailable || r.code == kDeadlineExceeded) && r.code_name.empty();
              state.EndLocked(std::move(r), stops);
            }));
      },
      [&] { JoinEnded(&state); });
}

}  // namespace specontext::client
