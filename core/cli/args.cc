#include "core/cli/args.h"

#include <cmath>
#include <cstdio>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "core/log.h"

namespace specontext {

void Args::Define(Flag flag) { flags_.push_back(std::move(flag)); }

const Args::Flag* Args::Find(const std::string& name) const {
  for (const Flag& f : flags_) {
    if (f.name == name) return &f;
  }
  return nullptr;
}

namespace {

bool IsHelpWord(const std::string& arg) { return arg == "--help" || arg == "-h"; }

}  // namespace

absl::Status Args::Parse(int argc, char** argv, int first) {
  // A line that is wrong before its --help still asks for the usage.
  const auto fail = [&](int at, absl::Status error) {
    for (int j = at; j < argc; ++j) {
      if (IsHelpWord(argv[j])) {
        help_requested_ = true;
        return absl::OkStatus();
      }
    }
    return error;
  };
  for (int i = first; i < argc; ++i) {
    std::string arg = argv[i];
    if (IsHelpWord(arg) && Find("help") == nullptr) {
      help_requested_ = true;
      continue;
    }
    if (arg.size() < 3 || arg.compare(0, 2, "--") != 0) {
      positional_.push_back(arg);
      continue;
    }
    std::string name = arg.substr(2), value;
    bool has_value = false;
    if (size_t eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
      has_value = true;
    }
    const Flag* f = Find(name);
    if (f == nullptr)
      return fail(i, absl::InvalidArgumentError(absl::StrCat("unknown flag --", name)));
    if (f->is_bool) {
      if (has_value && value != "true" && value != "false") {
        return fail(i, absl::InvalidArgumentError(
                           absl::StrCat("--", name, " takes true or false, got \"", value, "\"")));
      }
      if (!has_value) value = "true";
    } else if (!has_value) {
      if (i + 1 >= argc)
        return fail(i, absl::InvalidArgumentError(absl::StrCat("--", name, " needs a value")));
      value = argv[++i];
    }
    auto& slot = values_[name];
    if (!f->repeated) slot.clear();
    slot.push_back(value);
  }
  return absl::OkStatus();
}

bool Args::Has(const std::string& name) const { return values_.count(name) > 0; }

std::string Args::GetString(const std::string& name) const {
  auto it = values_.find(name);
  if (it != values_.end() && !it->second.empty()) return it->second.back();
  const Flag* f = Find(name);
  return f ? f->default_value : "";
}

std::vector<std::string> Args::GetAll(const std::string& name) const {
  auto it = values_.find(name);
  return it == values_.end() ? std::vector<std::string>{} : it->second;
}

absl::StatusOr<int64_t> Args::GetInt(const std::string& name) const {
  const std::string v = GetString(name);
  int64_t out;
  if (!absl::SimpleAtoi(v, &out)) {
    return absl::InvalidArgumentError(absl::StrCat("--", name, " expects an integer, got \"", v, "\""));
  }
  return out;
}

absl::StatusOr<double> Args::GetDouble(const std::string& name) const {
  const std::string v = GetString(name);
  double out;
  if (!absl::SimpleAtod(v, &out) || std::isnan(out)) {
    return absl::InvalidArgumentError(absl::StrCat("--", name, " expects a number, got \"", v, "\""));
  }
  return out;
}

absl::StatusOr<std::vector<int64_t>> Args::GetPositiveIntList(const std::string& name) const {
  const std::string text = GetString(name);
  std::vector<int64_t> out;
  for (absl::string_view part : absl::StrSplit(text, ',', absl::SkipEmpty())) {
    int64_t v;
    if (!absl::SimpleAtoi(part, &v) || v <= 0) {
      return absl::InvalidArgumentError(absl::StrCat("--", name, " expects positive integers, got \"", text, "\""));
    }
    out.push_back(v);
  }
  if (out.empty()) return absl::InvalidArgumentError(absl::StrCat("--", name, " is empty"));
  return out;
}

bool Args::GetBool(const std::string& name) const { return GetString(name) == "true"; }

absl::StatusOr<int64_t> Args::GetBytes(const std::string& name) const {
  const std::string text = GetString(name);
  absl::string_view v = absl::StripAsciiWhitespace(text);
  static const std::pair<const char*, int64_t> kUnits[] = {
      {"KiB", int64_t{1} << 10}, {"MiB", int64_t{1} << 20}, {"GiB", int64_t{1} << 30},
      {"KB", 1000}, {"MB", 1000000}, {"GB", 1000000000}, {"B", 1}};
  int64_t mult = 1;
  for (const auto& [suffix, m] : kUnits) {
    if (absl::ConsumeSuffix(&v, suffix)) {
      mult = m;
      break;
    }
  }
  double number;
  if (!absl::SimpleAtod(v, &number) || !(number >= 0) || number * mult > 9e18) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", name, " expects a size such as 4GiB or 512MiB, got \"", text, "\""));
  }
  return static_cast<int64_t>(number * mult);
}

std::string Args::Usage() const {
  std::string out;
  for (const Flag& f : flags_) {
    absl::StrAppend(&out, "  --", f.name, f.is_bool ? "" : " VALUE", "\n      ", f.help);
    // Some helps explain a default the value alone cannot ("generation_config.json's"); a second
    // "(default: 0)" after them would contradict them.
    const std::string help = absl::AsciiStrToLower(f.help);
    const bool help_tells_default =
        absl::StrContains(help, "(default") || absl::StrContains(help, "default:");
    if (!f.default_value.empty() && !help_tells_default) {
      absl::StrAppend(&out, " (default: ", f.default_value, ")");
    }
    absl::StrAppend(&out, "\n");
  }
  return out;
}

absl::Status ApplyLogLevelFlag(const Args& args) {
  LogLevel level;
  if (!ParseLogLevel(args.GetString("log-level"), &level)) {
    return absl::InvalidArgumentError("--log-level must be debug, info, warning or error");
  }
  SetLogLevel(level);
  return absl::OkStatus();
}

std::string CommandUsage(const std::string& name, const Args& args) {
  return absl::StrCat("usage: ", name, " [flags]\n\nflags:\n", args.Usage());
}

int RunCommand(const std::string& name, Args& args, int argc, char** argv, int first,
               const std::function<absl::Status(const Args&)>& run) {
  absl::Status st = args.Parse(argc, argv, first);
  if (st.ok() && args.help_requested()) {
    std::fputs(CommandUsage(name, args).c_str(), stdout);
    return 0;
  }
  if (st.ok() && !args.positional().empty()) {
    st = absl::InvalidArgumentError("unexpected argument \"" + args.positional()[0] + "\"");
  }
  if (!st.ok()) {
    std::fprintf(stderr, "%s: %s\n\nflags:\n%s", name.c_str(), std::string(st.message()).c_str(),
                 args.Usage().c_str());
    return 2;
  }
  st = run(args);
  if (!st.ok()) {
    std::fprintf(stderr, "%s: error: %s\n", name.c_str(), std::string(st.message()).c_str());
    return 1;
  }
  return 0;
}

}  // namespace specontext
