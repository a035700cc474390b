#include "tests/services/service_harness.h"

#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <grpcpp/create_channel.h>
#include <httplib.h>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace specontext::testing {

std::string ModelDir() {
  const std::string dir = std::string(SPECONTEXT_MODEL_DIR) + "/stories260K";
  if (std::filesystem::exists(dir + "/stories260K.bin") && std::filesystem::exists(dir + "/tok512.bin")) {
    return dir;
  }
  return "";
}

ServerProcess::~ServerProcess() {
  if (pid_ > 0) {
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
  }
  if (!dir_.empty()) std::filesystem::remove_all(dir_);
}

RemoveOnExit::~RemoveOnExit() {
  std::error_code ec;
  if (!path.empty()) std::filesystem::remove_all(path, ec);
}

absl::Status ServerProcess::Start(const std::string& binary, std::vector<std::string> args, double timeout_s,
                                  const std::string& listen) {
  char tmpl[] = "/tmp/spc_service_test_XXXXXX";
  if (!dir_.empty()) std::filesystem::remove_all(dir_);  // a restart of the same object: the old run's log
  if (mkdtemp(tmpl) == nullptr) return absl::InternalError("mkdtemp failed");
  exit_code_ = -1;
  dir_ = tmpl;
  const std::string port_file = dir_ + "/ports";
  log_path_ = dir_ + "/server.log";
  args.insert(args.begin(), binary);
  for (const std::string& a : {std::string("--listen"), listen, std::string("--metrics-port"), std::string("0"),
                               std::string("--metrics-host"), std::string("127.0.0.1")}) {
    args.push_back(a);
  }
  args.push_back("--port-file");
  args.push_back(port_file);
  pid_ = fork();
  if (pid_ < 0) return absl::InternalError("fork failed");
  if (pid_ == 0) {
    std::FILE* log = std::fopen(log_path_.c_str(), "w");
    if (log != nullptr) {
      dup2(fileno(log), STDOUT_FILENO);
      dup2(fileno(log), STDERR_FILENO);
    }
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    execv(binary.c_str(), argv.data());
    _exit(127);
  }
  const absl::Time give_up = absl::Now() + absl::Seconds(timeout_s);
  while (absl::Now() < give_up) {
    std::ifstream in(port_file);
    if (in >> grpc_port_ >> metrics_port_) {
      if (!(in >> http_port_)) http_port_ = 0;  // the third port only with --http-port
      return absl::OkStatus();
    }
    if (!Running()) break;
    absl::SleepFor(absl::Milliseconds(50));
  }
  std::ifstream log(log_path_);
  std::stringstream ss;
  ss << log.rdbuf();
  return absl::UnavailableError(absl::StrCat(binary, " did not start; its log:\n", ss.str()));
}

void ServerProcess::Signal(int sig) {
  if (pid_ > 0) kill(pid_, sig);
}

bool ServerProcess::Running() {
  if (pid_ <= 0) return false;
  int status = 0;
  const pid_t r = waitpid(pid_, &status, WNOHANG);
  if (r == pid_) {
    pid_ = -1;
    exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    return false;
  }
  return true;
}

absl::StatusOr<int> ServerProcess::WaitExit(double timeout_s) {
  const absl::Time give_up = absl::Now() + absl::Seconds(timeout_s);
  while (pid_ > 0 && absl::Now() < give_up) {
    if (!Running()) break;
    absl::SleepFor(absl::Milliseconds(20));
  }
  if (pid_ <= 0 && exit_code_ >= 0) return exit_code_;
  return absl::DeadlineExceededError("the server did not exit");
}

std::unique_ptr<v1::Generator::Stub> GeneratorStub(const std::string& address) {
  return v1::Generator::NewStub(grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
}

absl::StatusOr<std::string> FetchMetrics(int port) {
  httplib::Client client("127.0.0.1", port);
  auto res = client.Get("/metrics");
  if (!res || res->status != 200) return absl::UnavailableError("GET /metrics failed");
  return res->body;
}

absl::StatusOr<double> MetricValue(const std::string& body, const std::string& name_with_labels) {
  std::istringstream in(body);
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(name_with_labels + " ", 0) == 0) {
      return std::stod(line.substr(name_with_labels.size() + 1));
    }
  }
  return absl::NotFoundError(absl::StrCat("no sample ", name_with_labels));
}

void ExpectGeneratorStateFreed(int metrics_port) {
  double running = -1, queued = -1, kv = -1, calls = -1;
  const absl::Time give_up = absl::Now() + absl::Seconds(20);
  while (absl::Now() < give_up) {
    auto body = FetchMetrics(metrics_port);
    ASSERT_TRUE(body.ok()) << body.status();
    running = MetricValue(*body, "spc_generator_running_sequences").value_or(-1);
    queued = MetricValue(*body, "spc_generator_queue_depth").value_or(-1);
    kv = MetricValue(*body, "spc_device_memory_bytes{kind=\"kv_cache\"}").value_or(-1);
    calls = MetricValue(*body, "spc_generator_active_calls").value_or(-1);
    if (running == 0 && queued == 0 && kv == 0 && calls == 0) return;
    absl::SleepFor(absl::Milliseconds(50));
  }
  FAIL() << "state not freed: running=" << running << " queued=" << queued << " kv_bytes=" << kv
         << " active_calls=" << calls;
}

std::string RunCommand(const std::vector<std::string>& argv, int* exit_code) {
  int out[2];
  if (pipe(out) != 0) return "";
  const pid_t pid = fork();
  if (pid == 0) {
    dup2(out[1], STDOUT_FILENO);
    close(out[0]);
    close(out[1]);
    std::vector<char*> a;
    for (const auto& s : argv) a.push_back(const_cast<char*>(s.c_str()));
    a.push_back(nullptr);
    execv(a[0], a.data());
    _exit(127);
  }
  close(out[1]);
  std::string result;
  char buf[4096];
  ssize_t n;
  while ((n = read(out[0], buf, sizeof(buf))) > 0) result.append(buf, static_cast<size_t>(n));
  close(out[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  *exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return result;
}

StreamResult CallGenerate(v1::Generator::Stub* stub, const v1::GenerateRequest& req, double timeout_s) {
  StreamResult r;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() +
                   std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1e3)));
  auto reader = stub->Generate(&ctx, req);
  v1::GenerateResponse resp;
  while (reader->Read(&resp)) {
    ++r.messages;
    r.tokens.insert(r.tokens.end(), resp.token_ids().begin(), resp.token_ids().end());
    r.text += resp.text();
    if (resp.done()) r.final = resp;
  }
  r.status = reader->Finish();
  return r;
}

}  // namespace specontext::testing
