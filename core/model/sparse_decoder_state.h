// SparseDecoder's per-sequence state, shared by its implementation files (sparse_decoder.cc,
// sparse_decoder_sources.cc). Internal to core/model.
#pragma once

#include <cstdint>

#include "core/model/sparse_decoder.h"

namespace specontext {

struct SparseDecoder::SeqState {
  SeqState(int32_t n_sets, int32_t b) : map(n_sets, b), budget(b) {}
  uint64_t id = 0;
  SequenceKv* kv = nullptr;
  int32_t rows = 0;  // device KV rows of the resident layers (grows in chunks, DeviceRowsFor)
  Tensor cache;      // retrieval head K cache [n_kv, rows, hd], backend tensor (kRetrieval), grows;
                 // empty without a head
  int32_t cache_len = 0;  // rows of `cache` written
  SlotMap map;
  int32_t budget;
  int32_t len = 0;           // tokens whose KV exists
  int32_t capacity = 0;      // tokens the sequence may reach
  int32_t hidden_slot = -1;  // eagle3: row of hidden_pool_
  PreviousSets prev_sets;    // synthetic_overlap: the sets of the last sparse step
};

}  // namespace specontext
