// The restricted unpickler of pickle.h. Opcode values: CPython Lib/pickletools.py (protocols 0-5).
// Values live in an arena and containers hold raw pointers into it, so a file that builds deep or
// cyclic structures (through the memo) costs one allocation per opcode and nothing recursive on
// destruction.
#include "core/io/pickle.h"

#include <cstring>
#include <memory>
#include <unordered_map>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/status_macros.h"

namespace specontext {
namespace {

enum class Kind : uint8_t {
  kNone,
  kBool,
  kInt,
  kFloat,
  kString,
  kTuple,
  kList,
  kDict,
  kGlobal,
  kStorage,
  kTensor
};
enum class Callable : uint8_t {
  kOrderedDict,
  kRebuildV2,
  kRebuildV3,
  kRebuildParameter,
  kStorageType,
  kDtype
};

struct Value {
  Kind kind = Kind::kNone;
  int64_t i = 0;                               // kInt, kBool
  std::string s;                               // kString; kGlobal: "module.name"
  std::vector<Value*> items;                   // kTuple/kList; kDict: key, value, key, value, ...
  Callable callable = Callable::kOrderedDict;  // kGlobal
  DType dtype = DType::kU8;                    // kGlobal storage type / dtype
  TorchStorageRef storage;                     // kStorage
  TorchTensorRecord tensor;                    // kTensor
};

struct AllowedGlobal {
  const char* module;
  const char* name;
  Callable callable;
  DType dtype;
};

// Everything a state dict may name (pickle.h). Storage types give the element dtype of their
// storage.
constexpr AllowedGlobal kAllowed[] = {
    {"collections", "OrderedDict", Callable::kOrderedDict, DType::kU8},
    {"torch._utils", "_rebuild_tensor_v2", Callable::kRebuildV2, DType::kU8},
    {"torch._utils", "_rebuild_tensor_v3", Callable::kRebuildV3, DType::kU8},
    {"torch._utils", "_rebuild_parameter", Callable::kRebuildParameter, DType::kU8},
    {"torch", "FloatStorage", Callable::kStorageType, DType::kF32},
    {"torch", "HalfStorage", Callable::kStorageType, DType::kF16},
    {"torch", "BFloat16Storage", Callable::kStorageType, DType::kBF16},
    {"torch", "DoubleStorage", Callable::kStorageType, DType::kF64},
    {"torch", "LongStorage", Callable::kStorageType, DType::kI64},
    {"torch", "IntStorage", Callable::kStorageType, DType::kI32},
    {"torch", "ShortStorage", Callable::kStorageType, DType::kI16},
    {"torch", "CharStorage", Callable::kStorageType, DType::kI8},
    {"torch", "ByteStorage", Callable::kStorageType, DType::kU8},
    {"torch", "BoolStorage", Callable::kStorageType, DType::kBool},
    {"torch", "ComplexFloatStorage", Callable::kStorageType, DType::kC64},
    {"torch", "UntypedStorage", Callable::kStorageType, DType::kU8},
    {"torch", "float8_e4m3fn", Callable::kDtype, DType::kF8E4M3},
    {"torch", "float8_e5m2", Callable::kDtype, DType::kF8E5M2},
    {"torch", "float8_e8m0fnu", Callable::kDtype, DType::kF8E8M0},
    {"torch", "uint16", Callable::kDtype, DType::kU16},
    {"torch", "uint32", Callable::kDtype, DType::kU32},
    {"torch", "uint64", Callable::kDtype, DType::kU64},
};

constexpr int kMaxRank = 8;

class Machine {
 public:
  Machine(const uint8_t* data, size_t size) : d_(data), n_(size) {}

  absl::StatusOr<std::vector<TorchTensorRecord>> Run() {
    for (uint64_t ops = 0; ops < kMaxPickleOps; ++ops) {
      if (pos_ >= n_) return Bad("ends without a STOP opcode");
      op_at_ = pos_;
      op_ = d_[pos_++];
      bool stop = false;
      RETURN_IF_ERROR(Step(&stop));
      if (stop) return Result();
    }
    return Bad(absl::StrCat("more than ", kMaxPickleOps, " opcodes"));
  }

 private:
  absl::Status Bad(const std::string& msg) const {
    return absl::InvalidArgumentError(absl::StrFormat("pickle: %s (opcode 0x%02x at byte %d)", msg,
                                                      static_cast<int>(op_), op_at_));
  }

  Value* New(Kind kind) {
    arena_.push_back(std::make_unique<Value>());
    arena_.back()->kind = kind;
    return arena_.back().get();
  }
  Value* Int(int64_t v, Kind kind = Kind::kInt) {
    Value* x = New(kind);
    x->i = v;
    return x;
  }

  absl::StatusOr<uint64_t> ReadLe(int bytes) {
    if (n_ - pos_ < static_cast<size_t>(bytes)) return Bad("truncated argument");
    uint64_t v = 0;
    for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | d_[pos_ + i];
    pos_ += bytes;
    return v;
  }
  absl::StatusOr<std::string> ReadBytes(uint64_t len) {
    if (len > n_ - pos_)
      return Bad(absl::StrCat("a ", len, "-byte string runs past the end of the pickle"));
    std::string s(reinterpret_cast<const char*>(d_ + pos_), static_cast<size_t>(len));
    pos_ += static_cast<size_t>(len);
    return s;
  }
  absl::StatusOr<std::string> ReadLine() {
    const void* nl = std::memchr(d_ + pos_, '\n', n_ - pos_);
    if (nl == nullptr) return Bad("unterminated text argument");
    const size_t len = static_cast<const uint8_t*>(nl) - (d_ + pos_);
    std::string s(reinterpret_cast<const char*>(d_ + pos_), len);
    pos_ += len + 1;
    return s;
  }

  absl::StatusOr<Value*> Pop() {
    if (stack_.empty() || (!marks_.empty() && marks_.back() == stack_.size()))
      return Bad("pops an empty stack");
    Value* v = stack_.back();
    stack_.pop_back();
    return v;
  }
  absl::StatusOr<Value*> Top() {
    if (stack_.empty() || (!marks_.empty() && marks_.back() == stack_.size()))
      return Bad("reads an empty stack");
    return stack_.back();
  }
  absl::StatusOr<std::vector<Value*>> PopMark() {
    if (marks_.empty()) return Bad("needs a MARK");
    std::vector<Value*> items(stack_.begin() + static_cast<std::ptrdiff_t>(marks_.back()),
                              stack_.end());
    stack_.resize(marks_.back());
    marks_.pop_back();
    return items;
  }

  absl::StatusOr<Value*> Global(const std::string& module, const std::string& name) {
    for (const AllowedGlobal& g : kAllowed) {
      if (module == g.module && name == g.name) {
        Value* v = New(Kind::kGlobal);
        v->s = absl::StrCat(module, ".", name);
        v->callable = g.callable;
        v->dtype = g.dtype;
        return v;
      }
    }
    return Bad(absl::StrCat("global ", module, ".", name,
                            " is not allowed: a state dict names only collections.OrderedDict, "
                            "torch._utils._rebuild_* and torch storage types"));
  }

  absl::Status SetItem(Value* dict, Value* key, Value* value) {
    if (dict->kind != Kind::kDict) return Bad("SETITEM on something that is not a dict");
    for (size_t i = 0; key->kind == Kind::kString && i < dict->items.size(); i += 2) {
      if (dict->items[i]->kind == Kind::kString && dict->items[i]->s == key->s) {
        dict->items[i + 1] = value;
        return absl::OkStatus();
      }
    }
    dict->items.push_back(key);
    dict->items.push_back(value);
    return absl::OkStatus();
  }

  absl::Status Memo(uint64_t index) {
    ASSIGN_OR_RETURN(Value * v, Top());
    memo_[index] = v;
    return absl::OkStatus();
  }
  absl::Status Get(uint64_t index) {
    auto it = memo_.find(index);
    if (it == memo_.end()) return Bad(absl::StrCat("memo entry ", index, " was never stored"));
    stack_.push_back(it->second);
    return absl::OkStatus();
  }

  // ('storage', storage type, key, location, numel) -> kStorage.
  absl::StatusOr<Value*> PersistentLoad(Value* pid) {
    const std::vector<Value*>& t = pid->items;
    if (pid->kind != Kind::kTuple || t.size() != 5 || t[0]->kind != Kind::kString ||
        t[0]->s != "storage" || t[1]->kind != Kind::kGlobal ||
        t[1]->callable != Callable::kStorageType || t[2]->kind != Kind::kString ||
        t[4]->kind != Kind::kInt || t[4]->i < 0) {
      return Bad("a persistent id is not ('storage', torch storage type, key, location, numel)");
    }
    const DType dtype = t[1]->dtype;
    uint64_t bytes = 0;
    if (__builtin_mul_overflow(static_cast<uint64_t>(t[4]->i), DTypeSize(dtype), &bytes)) {
      return Bad("storage size overflows");
    }
    auto [it, fresh] = storages_.try_emplace(t[2]->s, TorchStorageRef{t[2]->s, dtype, bytes});
    if (!fresh && (it->second.dtype != dtype || it->second.bytes != bytes)) {
      return Bad(
          absl::StrCat("storage \"", t[2]->s, "\" is named with two different types or sizes"));
    }
    Value* v = New(Kind::kStorage);
    v->storage = it->second;
    return v;
  }

  absl::StatusOr<Value*> RebuildTensor(const std::vector<Value*>& a, bool v3) {
    const size_t want = v3 ? 7 : 6;
    if (a.size() != want && a.size() != want + 1) {
      return Bad(absl::StrCat("_rebuild_tensor_v", v3 ? 3 : 2, " takes ", want, " arguments, got ",
                              a.size()));
    }
    if (a[0]->kind != Kind::kStorage || a[1]->kind != Kind::kInt || a[1]->i < 0 ||
        a[2]->kind != Kind::kTuple || a[3]->kind != Kind::kTuple ||
        a[2]->items.size() != a[3]->items.size() ||
        (v3 && (a[6]->kind != Kind::kGlobal || a[6]->callable != Callable::kDtype))) {
      return Bad("tensor arguments are not (storage, offset, size tuple, stride tuple, ...)");
    }
    if (a[2]->items.size() > kMaxRank)
      return Bad(absl::StrCat("tensor rank ", a[2]->items.size(), " > ", kMaxRank));
    Value* v = New(Kind::kTensor);
    TorchTensorRecord& t = v->tensor;
    t.storage = a[0]->storage;
    t.dtype = v3 ? a[6]->dtype : a[0]->storage.dtype;
    t.offset = static_cast<uint64_t>(a[1]->i);
    for (size_t i = 0; i < a[2]->items.size(); ++i) {
      const Value* sz = a[2]->items[i];
      const Value* st = a[3]->items[i];
      if (sz->kind != Kind::kInt || st->kind != Kind::kInt || sz->i < 0 || st->i < 0 ||
          sz->i > (int64_t{1} << 48)) {
        return Bad("tensor sizes and strides must be non-negative integers");
      }
      t.shape.push_back(sz->i);
      t.stride.push_back(st->i);
    }
    // The highest element the view reaches must lie inside its storage.
    const uint64_t es = DTypeSize(t.dtype);
    uint64_t last = t.offset, numel = 1;
    for (size_t i = 0; i < t.shape.size(); ++i) {
      uint64_t reach = 0;
      if (__builtin_mul_overflow(static_cast<uint64_t>(t.shape[i]), numel, &numel) ||
          numel > (uint64_t{1} << 56) ||
          (t.shape[i] > 0 && (__builtin_mul_overflow(static_cast<uint64_t>(t.shape[i] - 1),
                                                     static_cast<uint64_t>(t.stride[i]), &reach) ||
                              __builtin_add_overflow(last, reach, &last)))) {
        return Bad("tensor size overflows");
      }
    }
    uint64_t end_byte = 0;
    if (numel > 0 &&
        (__builtin_mul_overflow(last + 1, es, &end_byte) || end_byte > t.storage.bytes)) {
      return Bad(absl::StrCat("a tensor view reaches element ", last, " of storage \"",
                              t.storage.key, "\" (", t.storage.bytes, " bytes of ",
                              std::string(DTypeName(t.dtype)), ")"));
    }
    return v;
  }

  absl::StatusOr<Value*> Reduce(Value* fn, Value* args) {
    if (fn->kind != Kind::kGlobal) return Bad("REDUCE of something that is not an allowed global");
    if (args->kind != Kind::kTuple)
      return Bad(absl::StrCat("REDUCE of ", fn->s, " without an argument tuple"));
    switch (fn->callable) {
      case Callable::kOrderedDict:
        if (!args->items.empty()) return Bad("collections.OrderedDict called with arguments");
        return New(Kind::kDict);
      case Callable::kRebuildV2:
        return RebuildTensor(args->items, false);
      case Callable::kRebuildV3:
        return RebuildTensor(args->items, true);
      case Callable::kRebuildParameter:
        if (args->items.size() != 3 || args->items[0]->kind != Kind::kTensor) {
          return Bad("_rebuild_parameter takes (tensor, requires_grad, hooks)");
        }
        return args->items[0];
      default:
        return Bad(absl::StrCat(fn->s, " cannot be called"));
    }
  }

  absl::StatusOr<std::vector<TorchTensorRecord>> Result() {
    ASSIGN_OR_RETURN(Value * root, Pop());
    if (root->kind != Kind::kDict) return Bad("the pickle is not a dict (a state dict)");
    std::vector<TorchTensorRecord> out;
    for (size_t i = 0; i < root->items.size(); i += 2) {
      if (root->items[i]->kind != Kind::kString || root->items[i + 1]->kind != Kind::kTensor)
        continue;
      out.push_back(root->items[i + 1]->tensor);
      out.back().name = root->items[i]->s;
    }
    return out;
  }

  absl::Status Step(bool* stop);

  const uint8_t* d_;
  size_t n_;
  size_t pos_ = 0, op_at_ = 0;
  uint8_t op_ = 0;
  std::vector<std::unique_ptr<Value>> arena_;
  std::vector<Value*> stack_;
  std::vector<size_t> marks_;
  std::unordered_map<uint64_t, Value*> memo_;
  std::unordered_map<std::string, TorchStorageRef> storages_;
};

absl::Status Machine::Step(bool* stop) {
  switch (op_) {
    case 0x80: {  // PROTO
      ASSIGN_OR_RETURN(uint64_t v, ReadLe(1));
      if (v > 5) return Bad(absl::StrCat("pickle protocol ", v, " is newer than 5"));
      return absl::OkStatus();
    }
    case 0x95:  // FRAME: a length prefix; the frame's opcodes follow inline
      return ReadLe(8).status();
    case '.':  // STOP
      *stop = true;
      return absl::OkStatus();
    case '(':  // MARK
      marks_.push_back(stack_.size());
      return absl::OkStatus();
    case '0':  // POP (a MARK when the stack above it is empty, as CPython does)
      if (!marks_.empty() && marks_.back() == stack_.size()) return PopMark().status();
      return Pop().status();
    case '1':  // POP_MARK
      return PopMark().status();
    case '2': {  // DUP
      ASSIGN_OR_RETURN(Value * v, Top());
      stack_.push_back(v);
      return absl::OkStatus();
    }
    case 'N':
      stack_.push_back(New(Kind::kNone));
      return absl::OkStatus();
    case 0x88:
      stack_.push_back(Int(1, Kind::kBool));
      return absl::OkStatus();  // NEWTRUE
    case 0x89:
      stack_.push_back(Int(0, Kind::kBool));
      return absl::OkStatus();  // NEWFALSE
    case 'J': {                 // BININT
      ASSIGN_OR_RETURN(uint64_t v, ReadLe(4));
      stack_.push_back(Int(static_cast<int32_t>(static_cast<uint32_t>(v))));
      return absl::OkStatus();
    }
    case 'K':    // BININT1
    case 'M': {  // BININT2
      ASSIGN_OR_RETURN(uint64_t v, ReadLe(op_ == 'K' ? 1 : 2));
      stack_.push_back(Int(static_cast<int64_t>(v)));
      return absl::OkStatus();
    }
    case 0x8a:    // LONG1
    case 0x8b: {  // LONG4
      ASSIGN_OR_RETURN(uint64_t len, ReadLe(op_ == 0x8a ? 1 : 4));
      if (len > 8) return Bad(absl::StrCat("a ", len, "-byte integer is larger than 64 bits"));
      ASSIGN_OR_RETURN(uint64_t v,
                       len == 0 ? absl::StatusOr<uint64_t>(0) : ReadLe(static_cast<int>(len)));
      if (len > 0 && len < 8 && (v >> (8 * len - 1)) & 1)
        v |= ~uint64_t{0} << (8 * len);  // sign-extend
      stack_.push_back(Int(static_cast<int64_t>(v)));
      return absl::OkStatus();
    }
    case 'G': {  // BINFLOAT (big-endian double); kept only as a value to skip
      RETURN_IF_ERROR(ReadBytes(8).status());
      stack_.push_back(New(Kind::kFloat));
      return absl::OkStatus();
    }
    case 'X':
    case 0x8c:
    case 0x8d:  // BINUNICODE, SHORT_BINUNICODE, BINUNICODE8
    case 'T':
    case 'U':  // BINSTRING, SHORT_BINSTRING
    case 'B':
    case 'C':
    case 0x8e: {  // BINBYTES, SHORT_BINBYTES, BINBYTES8
      const int width = (op_ == 0x8c || op_ == 'U' || op_ == 'C') ? 1
                        : (op_ == 0x8d || op_ == 0x8e)            ? 8
                                                                  : 4;
      ASSIGN_OR_RETURN(uint64_t len, ReadLe(width));
      if (op_ == 'T' && (len >> 31)) return Bad("negative string length");
      Value* v = New(Kind::kString);
      ASSIGN_OR_RETURN(v->s, ReadBytes(len));
      stack_.push_back(v);
      return absl::OkStatus();
    }
    case ')':
      stack_.push_back(New(Kind::kTuple));
      return absl::OkStatus();  // EMPTY_TUPLE
    case ']':
      stack_.push_back(New(Kind::kList));
      return absl::OkStatus();  // EMPTY_LIST
    case '}':
      stack_.push_back(New(Kind::kDict));
      return absl::OkStatus();  // EMPTY_DICT
    case 't':
    case 'l': {  // TUPLE, LIST (from MARK)
      Value* v = New(op_ == 't' ? Kind::kTuple : Kind::kList);
      ASSIGN_OR_RETURN(v->items, PopMark());
      stack_.push_back(v);
      return absl::OkStatus();
    }
    case 0x85:
    case 0x86:
    case 0x87: {  // TUPLE1..3
      Value* v = New(Kind::kTuple);
      v->items.resize(op_ - 0x84);
      for (size_t i = v->items.size(); i-- > 0;) {
        ASSIGN_OR_RETURN(v->items[i], Pop());
      }
      stack_.push_back(v);
      return absl::OkStatus();
    }
    case 'd': {  // DICT (from MARK)
      ASSIGN_OR_RETURN(std::vector<Value*> kv, PopMark());
      if (kv.size() % 2) return Bad("DICT with an odd number of items");
      Value* v = New(Kind::kDict);
      for (size_t i = 0; i < kv.size(); i += 2) RETURN_IF_ERROR(SetItem(v, kv[i], kv[i + 1]));
      stack_.push_back(v);
      return absl::OkStatus();
    }
    case 'a': {  // APPEND
      ASSIGN_OR_RETURN(Value * item, Pop());
      ASSIGN_OR_RETURN(Value * list, Top());
      if (list->kind != Kind::kList) return Bad("APPEND to something that is not a list");
      list->items.push_back(item);
      return absl::OkStatus();
    }
    case 'e': {  // APPENDS
      ASSIGN_OR_RETURN(std::vector<Value*> items, PopMark());
      ASSIGN_OR_RETURN(Value * list, Top());
      if (list->kind != Kind::kList) return Bad("APPENDS to something that is not a list");
      list->items.insert(list->items.end(), items.begin(), items.end());
      return absl::OkStatus();
    }
    case 's': {  // SETITEM
      ASSIGN_OR_RETURN(Value * value, Pop());
      ASSIGN_OR_RETURN(Value * key, Pop());
      ASSIGN_OR_RETURN(Value * dict, Top());
      return SetItem(dict, key, value);
    }
    case 'u': {  // SETITEMS
      ASSIGN_OR_RETURN(std::vector<Value*> kv, PopMark());
      if (kv.size() % 2) return Bad("SETITEMS with an odd number of items");
      ASSIGN_OR_RETURN(Value * dict, Top());
      for (size_t i = 0; i < kv.size(); i += 2) RETURN_IF_ERROR(SetItem(dict, kv[i], kv[i + 1]));
      return absl::OkStatus();
    }
    case 'c': {  // GLOBAL "module\nname\n"
      ASSIGN_OR_RETURN(std::string module, ReadLine());
      ASSIGN_OR_RETURN(std::string name, ReadLine());
      ASSIGN_OR_RETURN(Value * g, Global(module, name));
      stack_.push_back(g);
      return absl::OkStatus();
    }
    case 0x93: {  // STACK_GLOBAL
      ASSIGN_OR_RETURN(Value * name, Pop());
      ASSIGN_OR_RETURN(Value * module, Pop());
      if (name->kind != Kind::kString || module->kind != Kind::kString)
        return Bad("STACK_GLOBAL needs two strings");
      ASSIGN_OR_RETURN(Value * g, Global(module->s, name->s));
      stack_.push_back(g);
      return absl::OkStatus();
    }
    case 'R': {  // REDUCE
      ASSIGN_OR_RETURN(Value * args, Pop());
      ASSIGN_OR_RETURN(Value * fn, Pop());
      ASSIGN_OR_RETURN(Value * v, Reduce(fn, args));
      stack_.push_back(v);
      return absl::OkStatus();
    }
    case 'b': {  // BUILD: only an OrderedDict's attributes (state_dict()._metadata), which are
                 // dropped
      ASSIGN_OR_RETURN(Value * state, Pop());
      ASSIGN_OR_RETURN(Value * obj, Top());
      (void)state;
      if (obj->kind != Kind::kDict) return Bad("BUILD of an object other than a dict");
      return absl::OkStatus();
    }
    case 'Q': {  // BINPERSID
      ASSIGN_OR_RETURN(Value * pid, Pop());
      ASSIGN_OR_RETURN(Value * v, PersistentLoad(pid));
      stack_.push_back(v);
      return absl::OkStatus();
    }
    case 'q':
    case 'r': {  // BINPUT, LONG_BINPUT
      ASSIGN_OR_RETURN(uint64_t i, ReadLe(op_ == 'q' ? 1 : 4));
      return Memo(i);
    }
    case 0x94:  // MEMOIZE
      return Memo(memo_.size());
    case 'h':
    case 'j': {  // BINGET, LONG_BINGET
      ASSIGN_OR_RETURN(uint64_t i, ReadLe(op_ == 'h' ? 1 : 4));
      return Get(i);
    }
    default:
      return Bad("opcode not used by a state dict (refused)");
  }
}

}  // namespace

absl::StatusOr<std::vector<TorchTensorRecord>> UnpickleTorchStateDict(const uint8_t* data,
                                                                      size_t size) {
  return Machine(data, size).Run();
}

}  // namespace specontext
