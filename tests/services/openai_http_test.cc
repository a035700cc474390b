// The OpenAI-compatible HTTP API of specontext-generator (--http-port), black box: completions and chat,
// streaming (server-sent events) or not, give the same greedy text as the gRPC service for the same
// request; every kind of bad request gets its HTTP code and OpenAI's error shape and the server keeps
// serving; a client that disconnects mid-stream cancels its request; curl drives it too.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <csignal>
#include <filesystem>
#include <random>
#include <thread>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "httplib.h"
#include "tests/services/service_harness.h"

namespace specontext::testing {
namespace {

using json = nlohmann::json;

// cpp-httplib's TLS client writes through OpenSSL without MSG_NOSIGNAL: a server that refuses the
// connection (no client certificate) must give this process EPIPE, not SIGPIPE.
const bool kSigpipeIgnored = [] {
  std::signal(SIGPIPE, SIG_IGN);
  return true;
}();

std::vector<std::string> ServerArgs(std::vector<std::string> extra = {}) {
  const std::string dir = ModelDir();
  std::vector<std::string> args = {"--model", dir + "/stories260K.bin", "--tokenizer", dir + "/tok512.bin",
                                   "--backend", "cpu", "--threads", "1", "--log-level", "warning",
                                   "--http-port", "0", "--http-host", "127.0.0.1"};
  args.insert(args.end(), extra.begin(), extra.end());
  return args;
}

// The events of a server-sent event stream: the JSON of each `data:` line; `done` when it ended with
// `data: [DONE]` and nothing after it.
struct SseResult {
  std::vector<json> chunks;
  bool done = false;
};

SseResult ParseSse(const std::string& body) {
  SseResult r;
  for (absl::string_view block : absl::StrSplit(body, "\n\n", absl::SkipEmpty())) {
    EXPECT_TRUE(absl::StartsWith(block, "data: ")) << block;
    EXPECT_FALSE(r.done) << "an event after [DONE]";
    absl::string_view data = block.substr(6);
    if (data == "[DONE]") {
      r.done = true;
      continue;
    }
    r.chunks.push_back(json::parse(data));
  }
  return r;
}

// The text of a stream: each chunk's choices[0].text (completions) or delta.content (chat).
std::string StreamText(const SseResult& r, bool chat) {
  std::string text;
  for (const json& c : r.chunks) {
    if (c["choices"].empty()) continue;
    const json& choice = c["choices"][0];
    if (chat) {
      if (choice["delta"].contains("content")) text += choice["delta"]["content"].get<std::string>();
    } else {
      text += choice["text"].get<std::string>();
    }
  }
  return text;
}

class OpenAiHttp : public SharedGeneratorSuite {
 protected:
  static void SetUpTestSuite() { StartSharedServer(SPC_GENERATOR_BIN, ServerArgs()); }
  void SetUp() override {
    SharedGeneratorSuite::SetUp();
    if (HasFatalFailure()) return;
    ASSERT_GT(server_->http_port(), 0) << "no HTTP port in the port file";
    stub_ = GeneratorStub(server_->address());
    http_ = std::make_unique<httplib::Client>("127.0.0.1", server_->http_port());
    http_->set_read_timeout(120, 0);
  }

  httplib::Result Post(const std::string& path, const json& body) {
    return http_->Post(path.c_str(), body.dump(), "application/json");
  }

  // A greedy gRPC request with the same prompt (or messages) and length.
  StreamResult Grpc(const json& body) {
    v1::GenerateRequest req;
    if (body.contains("prompt")) req.set_prompt(body["prompt"].get<std::string>());
    if (body.contains("messages")) {
      for (const json& m : body["messages"]) {
        v1::ChatMessage* cm = req.add_messages();
        cm->set_role(m["role"].get<std::string>());
        cm->set_content(m["content"].get<std::string>());
      }
    }
    req.set_max_new_tokens(body["max_tokens"].get<int>());
    req.mutable_sampling()->set_temperature(0);
    if (body.contains("stop")) {
      for (const json& s : body["stop"]) req.add_stop(s.get<std::string>());
    }
    return CallGenerate(stub_.get(), req);
  }


  std::unique_ptr<v1::Generator::Stub> stub_;
  std::unique_ptr<httplib::Client> http_;
};

const char* const kPrompts[] = {"Once upon a time", "Lily and the dog", "The sun was", "Tom had a big ball"};

TEST_F(OpenAiHttp, Models) {
  auto res = http_->Get("/v1/models");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200);
  const json j = json::parse(res->body);
  EXPECT_EQ(j["object"], "list");
  ASSERT_EQ(j["data"].size(), 1u);
  EXPECT_EQ(j["data"][0]["id"], "stories260K");
  EXPECT_EQ(j["data"][0]["object"], "model");
}

TEST_F(OpenAiHttp, CompletionEqualsGrpc) {
  int max_tokens = 7;
  for (const char* prompt : kPrompts) {
    max_tokens = max_tokens * 3 % 40 + 1;
    const json body = {{"model", "stories260K"}, {"prompt", prompt}, {"max_tokens", max_tokens}, {"temperature", 0}};
    auto res = Post("/v1/completions", body);
    ASSERT_TRUE(res);
    ASSERT_EQ(res->status, 200) << res->body;
    const json j = json::parse(res->body);
    const StreamResult g = Grpc(body);
    ASSERT_TRUE(g.status.ok()) << g.status.error_message();
    EXPECT_EQ(j["object"], "text_completion");
    EXPECT_EQ(j["model"], "stories260K");
    ASSERT_EQ(j["choices"].size(), 1u);
    EXPECT_EQ(j["choices"][0]["text"], g.text) << prompt;
    EXPECT_EQ(j["choices"][0]["finish_reason"], "length");
    EXPECT_EQ(j["usage"]["completion_tokens"], g.final.usage().generated_tokens());
    EXPECT_EQ(j["usage"]["prompt_tokens"], g.final.usage().prompt_tokens());
    EXPECT_EQ(j["usage"]["total_tokens"],
              g.final.usage().generated_tokens() + g.final.usage().prompt_tokens());
  }
}

TEST_F(OpenAiHttp, StreamingCompletionEqualsGrpc) {
  for (bool include_usage : {false, true}) {
    const json body = {{"prompt", "Once upon a time"}, {"max_tokens", 30}, {"temperature", 0}, {"stream", true},
                       {"stream_options", {{"include_usage", include_usage}}}};
    auto res = Post("/v1/completions", body);
    ASSERT_TRUE(res);
    ASSERT_EQ(res->status, 200) << res->body;
    EXPECT_EQ(res->get_header_value("Content-Type"), "text/event-stream");
    const SseResult sse = ParseSse(res->body);
    EXPECT_TRUE(sse.done);
    ASSERT_GE(sse.chunks.size(), 3u);
    const StreamResult g = Grpc(body);
    EXPECT_EQ(StreamText(sse, false), g.text);
    for (const json& c : sse.chunks) EXPECT_EQ(c["object"], "text_completion");
    const json& last = include_usage ? sse.chunks[sse.chunks.size() - 2] : sse.chunks.back();
    EXPECT_EQ(last["choices"][0]["finish_reason"], "length");
    if (include_usage) {
      const json& u = sse.chunks.back();
      EXPECT_TRUE(u["choices"].empty());
      EXPECT_EQ(u["usage"]["completion_tokens"], 30);
      EXPECT_EQ(u["usage"]["prompt_tokens"], g.final.usage().prompt_tokens());
    } else {
      for (const json& c : sse.chunks) EXPECT_FALSE(c.contains("usage"));
    }
  }
}

TEST_F(OpenAiHttp, ChatEqualsGrpcStreamingOrNot) {
  const json body = {{"model", "stories260K"},
                     {"messages", {{{"role", "system"}, {"content", "Tell a story."}},
                                   {{"role", "user"}, {"content", "Lily and the dog"}}}},
                     {"max_tokens", 25},
                     {"temperature", 0}};
  const StreamResult g = Grpc(body);
  ASSERT_TRUE(g.status.ok()) << g.status.error_message();
  auto res = Post("/v1/chat/completions", body);
  ASSERT_TRUE(res);
  ASSERT_EQ(res->status, 200) << res->body;
  const json j = json::parse(res->body);
  EXPECT_EQ(j["object"], "chat.completion");
  EXPECT_EQ(j["choices"][0]["message"]["role"], "assistant");
  EXPECT_EQ(j["choices"][0]["message"]["content"], g.text);
  EXPECT_EQ(j["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(j["usage"]["completion_tokens"], 25);

  json stream_body = body;
  stream_body["stream"] = true;
  auto sres = Post("/v1/chat/completions", stream_body);
  ASSERT_TRUE(sres);
  ASSERT_EQ(sres->status, 200) << sres->body;
  const SseResult sse = ParseSse(sres->body);
  EXPECT_TRUE(sse.done);
  ASSERT_GE(sse.chunks.size(), 2u);
  EXPECT_EQ(sse.chunks.front()["choices"][0]["delta"]["role"], "assistant");
  EXPECT_EQ(sse.chunks.back()["choices"][0]["finish_reason"], "length");
  for (const json& c : sse.chunks) EXPECT_EQ(c["object"], "chat.completion.chunk");
  EXPECT_EQ(StreamText(sse, true), g.text);
}

TEST_F(OpenAiHttp, StopStringsAndFinishReason) {
  const json probe = {{"prompt", "Once upon a time"}, {"max_tokens", 30}, {"temperature", 0}};
  const StreamResult full = Grpc(probe);
  ASSERT_TRUE(full.status.ok());
  ASSERT_GT(full.text.size(), 12u);
  const std::string stop = full.text.substr(8, 3);  // a piece of the greedy text: generation stops there
  for (const json& stop_field : {json(stop), json::array({"zzzz-never", stop})}) {
    json body = probe;
    body["stop"] = stop_field;
    auto res = Post("/v1/completions", body);
    ASSERT_TRUE(res);
    ASSERT_EQ(res->status, 200) << res->body;
    const json j = json::parse(res->body);
    EXPECT_EQ(j["choices"][0]["finish_reason"], "stop");
    json grpc_body = probe;
    grpc_body["stop"] = json::array({stop});
    EXPECT_EQ(j["choices"][0]["text"], Grpc(grpc_body).text);
  }
}

// One bad request: what is sent and what must come back.
struct BadCase {
  std::string method;
  std::string path;
  std::string body;
  int status;
  std::string param;  // expected error.param ("" = null)
  std::string code;   // expected error.code ("" = null)
};

TEST_F(OpenAiHttp, EachBadRequestGetsItsCodeAndTheServerKeepsServing) {
  const std::vector<BadCase> cases = {
      {"POST", "/v1/completions", "{not json", 400, "", ""},
      {"POST", "/v1/completions", "[1, 2]", 400, "", ""},
      {"POST", "/v1/completions", "\"a string\"", 400, "", ""},
      {"POST", "/v1/completions", "{\"prompt\": \"\\ud800\"}", 400, "", ""},
      {"POST", "/v1/completions", std::string("{\"prompt\": \"a\xff\"}"), 400, "", ""},
      {"POST", "/v1/completions", "{}", 400, "prompt", ""},
      {"POST", "/v1/completions", "{\"prompt\": 5}", 400, "prompt", ""},
      {"POST", "/v1/completions", "{\"prompt\": [\"a\", \"b\"]}", 400, "prompt", ""},
      {"POST", "/v1/completions", "{\"prompt\": \"x\", \"n\": 2}", 400, "n", ""},
      {"POST", "/v1/completions", "{\"prompt\": \"x\", \"max_tokens\": 0}", 400, "max_tokens", ""},
      {"POST", "/v1/completions", "{\"prompt\": \"x\", \"max_tokens\": \"5\"}", 400, "max_tokens", ""},
      {"POST", "/v1/completions", "{\"prompt\": \"x\", \"max_tokens\": 1e300}", 400, "max_tokens", ""},
      {"POST", "/v1/completions", "{\"prompt\": \"x\", \"max_tokens\": 99999999999}", 400, "", ""},
      {"POST", "/v1/completions", "{\"prompt\": \"x\", \"temperature\": -1}", 400, "temperature", ""},
      {"POST", "/v1/completions", "{\"prompt\": \"x\", \"top_p\": 0}", 400, "top_p", ""},
      {"POST", "/v1/completions", "{\"prompt\": \"x\", \"stop\": 3}", 400, "stop", ""},
      {"POST", "/v1/completions", "{\"prompt\": \"x\", \"stop\": [\"\"]}", 400, "", ""},
      {"POST", "/v1/completions", "{\"prompt\": \"x\", \"stream\": \"yes\"}", 400, "stream", ""},
      {"POST", "/v1/completions", "{\"prompt\": \"x\", \"logprobs\": 3}", 400, "logprobs", ""},
      {"POST", "/v1/completions", "{\"prompt\": \"x\", \"budget\": 0}", 400, "budget", ""},
      {"POST", "/v1/completions", "{\"prompt\": [1, 2, 100000]}", 400, "", ""},
      {"POST", "/v1/completions", "{\"prompt\": \"x\", \"model\": \"gpt-4\"}", 404, "model", "model_not_found"},
      {"POST", "/v1/chat/completions", "{\"messages\": []}", 400, "messages", ""},
      {"POST", "/v1/chat/completions", "{\"messages\": [{\"role\": \"tool\", \"content\": \"x\"}]}", 400, "", ""},
      {"POST", "/v1/chat/completions", "{\"messages\": [{\"content\": \"x\"}]}", 400, "messages", ""},
      {"POST", "/v1/chat/completions", "{\"messages\": [{\"role\": \"user\", \"content\": 5}]}", 400, "messages",
       ""},
      {"POST", "/v1/chat/completions", "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"tools\": []}",
       400, "tools", ""},
      {"POST", "/v1/chat/completions", std::string(200, '['), 400, "", ""},
      {"POST", "/v1/chat/completions", std::string(100000, '[') , 400, "", ""},
      {"POST", "/v1/embeddings", "{}", 404, "", "unknown_url"},
      {"GET", "/", "", 404, "", "unknown_url"},
      {"GET", "/v1/completions", "", 405, "", "method_not_allowed"},
      {"DELETE", "/v1/chat/completions", "", 405, "", "method_not_allowed"},
      {"POST", "/v1/models", "{}", 405, "", "method_not_allowed"},
      {"POST", "/v1/completions", std::string(5 << 20, 'a'), 413, "", "request_too_large"},
  };
  for (const BadCase& c : cases) {
    SCOPED_TRACE(c.method + " " + c.path + " " + c.body.substr(0, 80));
    httplib::Client cli("127.0.0.1", server_->http_port());
    cli.set_read_timeout(60, 0);
    httplib::Request req;
    req.method = c.method;
    req.path = c.path;
    req.body = c.body;
    if (!c.body.empty() || c.method == "POST") req.set_header("Content-Type", "application/json");
    auto res = cli.send(req);
    ASSERT_TRUE(res) << httplib::to_string(res.error());
    EXPECT_EQ(res->status, c.status) << res->body;
    EXPECT_EQ(res->get_header_value("Content-Type"), "application/json");
    const json j = json::parse(res->body, nullptr, false);
    ASSERT_FALSE(j.is_discarded()) << res->body;
    ASSERT_TRUE(j.contains("error")) << res->body;
    const json& e = j["error"];
    EXPECT_TRUE(e["message"].is_string() && !e["message"].get<std::string>().empty());
    EXPECT_EQ(e["type"], "invalid_request_error");
    EXPECT_EQ(e["param"], c.param.empty() ? json(nullptr) : json(c.param));
    EXPECT_EQ(e["code"], c.code.empty() ? json(nullptr) : json(c.code));
    if (c.status == 405) EXPECT_FALSE(res->get_header_value("Allow").empty());
    // Still serving.
    auto ok = Post("/v1/completions", {{"prompt", "Hi"}, {"max_tokens", 2}});
    ASSERT_TRUE(ok);
    EXPECT_EQ(ok->status, 200) << ok->body;
  }
  ExpectGeneratorStateFreed(server_->metrics_port());
}

// Opens a raw connection, sends a streaming request and reads until `events` events arrived.
int OpenStream(int port, const std::string& body, int events) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) return -1;
  const std::string req = absl::StrCat("POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                                       "application/json\r\nContent-Length: ", body.size(), "\r\n\r\n", body);
  if (write(fd, req.data(), req.size()) != static_cast<ssize_t>(req.size())) return -1;
  std::string got;
  char buf[4096];
  while (true) {
    size_t seen = 0;
    for (size_t at = got.find("data: "); at != std::string::npos; at = got.find("data: ", at + 1)) ++seen;
    if (static_cast<int>(seen) >= events) break;
    const ssize_t n = read(fd, buf, sizeof(buf));
    if (n <= 0) break;
    got.append(buf, static_cast<size_t>(n));
  }
  return fd;
}

TEST_F(OpenAiHttp, DisconnectMidStreamCancels) {
  auto before = FetchMetrics(server_->metrics_port());
  ASSERT_TRUE(before.ok());
  const double cancelled_before = MetricValue(*before, "spc_generator_cancelled_total").value_or(0);
  // Long enough that the client leaves while it still runs: up to the context, past any EOS.
  const json body = {{"prompt", "Once upon a time"}, {"max_tokens", 480}, {"ignore_eos", true},
                     {"temperature", 0}, {"stream", true}};
  const int fd = OpenStream(server_->http_port(), body.dump(), 3);
  ASSERT_GE(fd, 0);
  close(fd);
  ExpectGeneratorStateFreed(server_->metrics_port());
  auto after = FetchMetrics(server_->metrics_port());
  ASSERT_TRUE(after.ok());
  EXPECT_EQ(MetricValue(*after, "spc_generator_cancelled_total").value_or(0), cancelled_before + 1);
  auto ok = Post("/v1/completions", {{"prompt", "Hi"}, {"max_tokens", 2}});
  ASSERT_TRUE(ok);
  EXPECT_EQ(ok->status, 200);
}

TEST_F(OpenAiHttp, DisconnectDuringANonStreamingRequestCancels) {
  auto before = FetchMetrics(server_->metrics_port());
  ASSERT_TRUE(before.ok());
  const std::string cancelled = "spc_generator_requests_total{code=\"CANCELLED\"}";
  const double cancelled_before = MetricValue(*before, cancelled).value_or(0);
  const json body = {{"prompt", "Once upon a time"}, {"max_tokens", 480}, {"ignore_eos", true}, {"temperature", 0}};
  const int fd = OpenStream(server_->http_port(), body.dump(), 0);  // sends the request, reads nothing
  ASSERT_GE(fd, 0);
  absl::SleepFor(absl::Milliseconds(20));
  close(fd);
  ExpectGeneratorStateFreed(server_->metrics_port());
  auto after = FetchMetrics(server_->metrics_port());
  ASSERT_TRUE(after.ok());
  EXPECT_EQ(MetricValue(*after, cancelled).value_or(0), cancelled_before + 1);
}

TEST_F(OpenAiHttp, Curl) {
  if (!std::filesystem::exists("/usr/bin/curl")) GTEST_SKIP() << "curl not installed: the curl test did not run";
  const std::string url = absl::StrCat("http://127.0.0.1:", server_->http_port(), "/v1");
  const json body = {{"prompt", "Once upon a time"}, {"max_tokens", 12}, {"temperature", 0}};
  int code = -1;
  const std::string out = RunCommand({"/usr/bin/curl", "-sS", url + "/completions", "-H",
                                      "Content-Type: application/json", "-d", body.dump()}, &code);
  ASSERT_EQ(code, 0);
  const StreamResult g = Grpc(body);
  EXPECT_EQ(json::parse(out)["choices"][0]["text"], g.text);
  json stream_body = body;
  stream_body["stream"] = true;
  const std::string sse = RunCommand({"/usr/bin/curl", "-sSN", url + "/completions", "-d", stream_body.dump()},
                                     &code);
  ASSERT_EQ(code, 0);
  const SseResult r = ParseSse(sse);
  EXPECT_TRUE(r.done);
  EXPECT_EQ(StreamText(r, false), g.text);
  const std::string models = RunCommand({"/usr/bin/curl", "-sS", "-w", " %{http_code}", url + "/models"}, &code);
  EXPECT_TRUE(absl::EndsWith(models, " 200")) << models;
}

// Admission limits and draining reach HTTP clients as 429 and 503 (their own server: one request per
// client at a time).
TEST(OpenAiHttpLimits, PerClientLimitIs429AndDrainingIs503) {
  if (ModelDir().empty()) GTEST_FAIL() << "stories260K not found in models/";
  ServerProcess server;
  ASSERT_TRUE(server.Start(SPC_GENERATOR_BIN, ServerArgs({"--max-requests-per-peer", "1"})).ok());
  const json body = {{"prompt", "Once upon a time"}, {"max_tokens", 480}, {"ignore_eos", true},
                     {"temperature", 0}, {"stream", true}};
  const int fd = OpenStream(server.http_port(), body.dump(), 2);  // holds the client's one slot
  ASSERT_GE(fd, 0);
  httplib::Client cli("127.0.0.1", server.http_port());
  auto res = cli.Post("/v1/completions", R"({"prompt": "Hi", "max_tokens": 2})", "application/json");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 429) << res->body;
  json j = json::parse(res->body);
  EXPECT_EQ(j["error"]["type"], "rate_limit_error");
  EXPECT_EQ(j["error"]["code"], "rate_limit_exceeded");

  server.Signal(SIGTERM);  // the stream in flight goes on; new calls are refused
  absl::StatusOr<double> draining;
  for (int i = 0; i < 200; ++i) {
    auto m = FetchMetrics(server.metrics_port());
    if (m.ok() && MetricValue(*m, "spc_generator_draining").value_or(0) == 1) break;
    absl::SleepFor(absl::Milliseconds(20));
  }
  res = cli.Post("/v1/completions", R"({"prompt": "Hi", "max_tokens": 2})", "application/json");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 503) << res->body;
  j = json::parse(res->body);
  EXPECT_EQ(j["error"]["type"], "server_error");
  close(fd);  // the stream is cancelled; the drain completes
  auto code = server.WaitExit(30);
  ASSERT_TRUE(code.ok()) << code.status();
  EXPECT_EQ(*code, 0);
}

// The HTTP port speaks TLS with the gRPC flags: --tls-cert/--tls-key serve HTTPS, --tls-client-ca requires
// a client certificate; plaintext and certificate-less clients are refused.
TEST(OpenAiHttpTls, MutualTlsOnTheHttpPort) {
  if (ModelDir().empty()) GTEST_FAIL() << "stories260K not found in models/";
  if (!std::filesystem::exists("/usr/bin/openssl")) GTEST_SKIP() << "openssl not installed: TLS not tested";
  const std::string certs = "/tmp/spc_http_tls_" + std::to_string(std::random_device{}());
  RemoveOnExit certs_guard{certs};
  std::filesystem::create_directories(certs);
  int code = -1;
  RunCommand({"/bin/sh", "-c",
              "exec >/dev/null 2>&1; set -e; cd " + certs +
                  "; openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 1 -subj /CN=ca"
                  "; openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=localhost"
                  "; printf 'subjectAltName=DNS:localhost,IP:127.0.0.1' > san.ext"
                  "; openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem "
                  "-days 1 -extfile san.ext"
                  "; openssl req -newkey rsa:2048 -nodes -keyout client.key -out client.csr -subj /CN=client"
                  "; openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out client.pem "
                  "-days 1"},
             &code);
  ASSERT_EQ(code, 0) << "openssl failed";
  ServerProcess server;
  absl::Status st = server.Start(SPC_GENERATOR_BIN,
                                 ServerArgs({"--tls-cert", certs + "/server.pem", "--tls-key", certs + "/server.key",
                                             "--tls-client-ca", certs + "/ca.pem", "--max-requests-per-peer", "1"}));
  ASSERT_TRUE(st.ok()) << st;
  const std::string body = R"({"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0})";
  {
    httplib::SSLClient cli("127.0.0.1", server.http_port(), certs + "/client.pem", certs + "/client.key");
    cli.set_ca_cert_path((certs + "/ca.pem").c_str());
    cli.enable_server_certificate_verification(true);
    auto res = cli.Post("/v1/completions", body, "application/json");
    ASSERT_TRUE(res) << httplib::to_string(res.error());
    EXPECT_EQ(res->status, 200) << res->body;
    EXPECT_EQ(json::parse(res->body)["usage"]["completion_tokens"], 4);
  }
  {
    // Under mutual TLS a client is its certificate, as on gRPC: while one connection holds the client's
    // one slot, another connection with the same certificate gets 429 naming it.
    std::atomic<bool> stop{false};
    std::thread holder([&] {
      httplib::SSLClient cli("127.0.0.1", server.http_port(), certs + "/client.pem", certs + "/client.key");
      cli.enable_server_certificate_verification(false);
      while (!stop) {
        cli.Post("/v1/completions", R"({"prompt": "Once", "max_tokens": 480, "ignore_eos": true})", "application/json");
      }
    });
    httplib::SSLClient cli("127.0.0.1", server.http_port(), certs + "/client.pem", certs + "/client.key");
    cli.enable_server_certificate_verification(false);
    std::string refused;
    for (int i = 0; i < 500 && refused.empty(); ++i) {
      auto res = cli.Post("/v1/completions", body, "application/json");
      if (res && res->status == 429) refused = res->body;
    }
    stop = true;
    holder.join();
    EXPECT_NE(refused.find("tls:client"), std::string::npos) << refused;
  }
  {
    // A TLS client that leaves mid-stream: the server's next write fails (EPIPE, never SIGPIPE) and
    // the server goes on serving.
    httplib::SSLClient cli("127.0.0.1", server.http_port(), certs + "/client.pem", certs + "/client.key");
    cli.enable_server_certificate_verification(false);
    httplib::Request req;
    req.method = "POST";
    req.path = "/v1/completions";
    req.body = R"({"prompt": "Once", "max_tokens": 480, "ignore_eos": true, "stream": true})";
    req.set_header("Content-Type", "application/json");
    int chunks = 0;
    req.content_receiver = [&chunks](const char*, size_t, uint64_t, uint64_t) { return ++chunks < 2; };
    cli.send(req);
    cli.stop();
    EXPECT_GE(chunks, 1);
    absl::SleepFor(absl::Milliseconds(300));
    ASSERT_TRUE(server.Running()) << "the server died when a TLS client left mid-stream";
    auto res = cli.Post("/v1/completions", body, "application/json");
    ASSERT_TRUE(res) << httplib::to_string(res.error());
    EXPECT_EQ(res->status, 200);
  }
  {
    httplib::SSLClient no_cert("127.0.0.1", server.http_port());
    no_cert.set_ca_cert_path((certs + "/ca.pem").c_str());
    auto res = no_cert.Post("/v1/completions", body, "application/json");
    EXPECT_FALSE(res && res->status == 200) << "served a client without a certificate";
  }
  {
    httplib::Client plain("127.0.0.1", server.http_port());
    plain.set_read_timeout(5, 0);
    auto res = plain.Post("/v1/completions", body, "application/json");
    EXPECT_FALSE(res && res->status == 200) << "served plaintext on the TLS port";
  }
}

}  // namespace
}  // namespace specontext::testing
