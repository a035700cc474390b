// A restricted unpickler for the data.pkl of a torch.save'd state dict: it rebuilds the dict of
// tensor descriptions and executes nothing. Python's pickle calls any global a file names
// (os.system included); this machine knows a handful of names and refuses every other one, naming
// it, before anything else happens. What a state dict needs (pytorch/pytorch torch/serialization.py
// `_save`/`persistent_id`, torch/_tensor.py `_reduce_ex_internal`, torch/_utils.py):
//   collections.OrderedDict                   the dict (its `_metadata` attribute, set by BUILD, is
//   dropped) torch._utils._rebuild_tensor_v2           (storage, offset, size, stride,
//   requires_grad, hooks[, metadata]) torch._utils._rebuild_tensor_v3           (untyped storage,
//   offset, size, stride, requires_grad, hooks, dtype) torch._utils._rebuild_parameter (tensor,
//   requires_grad, hooks)
//   torch.{Float,Half,BFloat16,Double,Long,Int,Short,Char,Byte,Bool,ComplexFloat}Storage,
//   torch.UntypedStorage
//                                             storage types inside the persistent ids
//   torch.{float8_e4m3fn,float8_e5m2,float8_e8m0fnu,uint16,uint32,uint64}   dtypes of
//   _rebuild_tensor_v3
// Persistent ids (BINPERSID) are ('storage', storage type, key, location, numel): the tensor bytes
// live in the archive entry data/<key>. Opcodes of protocols 0-5 that a state dict does not use
// (INST, OBJ, EXT*, NEWOBJ, PERSID, buffers) are refused.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/tensor.h"

namespace specontext {

/// One storage a persistent id names: archive entry data/<key>, `bytes` long, holding elements of
/// `dtype` (kU8 for an untyped storage).
struct TorchStorageRef {
  std::string key;
  DType dtype = DType::kU8;
  uint64_t bytes = 0;
};

/// One tensor of the state dict: `shape` elements of `dtype` at element `offset` of its storage,
/// laid out with `stride` (elements; torch strides are non-negative).
struct TorchTensorRecord {
  std::string name;
  TorchStorageRef storage;
  DType dtype = DType::kF32;
  uint64_t offset = 0;
  Shape shape;
  std::vector<int64_t> stride;
};

/// Opcodes executed before the machine gives up on a file (a 1 GB draft's data.pkl has ~100).
inline constexpr uint64_t kMaxPickleOps = 50'000'000;

/// Runs the restricted machine over `data[0, size)` (a data.pkl) and returns the tensors of the
/// top-level dict (dict or OrderedDict, string keys), in its order; values that are not tensors are
/// skipped. InvalidArgument naming the opcode, global or field at fault otherwise.
absl::StatusOr<std::vector<TorchTensorRecord>> UnpickleTorchStateDict(const uint8_t* data,
                                                                      size_t size);

}  // namespace specontext
