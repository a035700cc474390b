// Standalone probe (not part of the build), run on the GPU machine 2026-11-24 for docs/benchmarks.md
// "Where a sparse step's time goes":
// a GPU timeline without nsys (not installed there). A CUPTI injection library: with
// CUDA_INJECTION64_PATH=<this .so> and SPC_TRACE=<file>, every kernel, memcpy and memset of the process is written
// to the file at exit as "K|C|S start_ns end_ns stream graph name-or-bytes" (with SPC_TRACE_API=1 also every
// runtime API call, "R start_ns end_ns thread 0 name", on the same clock). Build here:
//   g++ -O2 -shared -fPIC -I/usr/local/cuda/include -o build-probe/libspctrace.so bench/probes/cupti_trace.cc
//       -L/usr/local/cuda/lib -lcupti
// and carry libcupti.so.13 beside it (LD_LIBRARY_PATH). Idle gaps between consecutive kernels of a decode step
// show where the GPU waited for the host.
#include <cupti.h>

#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

namespace {

std::mutex g_mu;
std::vector<std::string> g_lines;

void CUPTIAPI BufferRequested(uint8_t** buffer, size_t* size, size_t* max_records) {
  *size = 8 << 20;
  *buffer = static_cast<uint8_t*>(std::aligned_alloc(8, *size));
  *max_records = 0;
}

void CUPTIAPI BufferCompleted(CUcontext, uint32_t, uint8_t* buffer, size_t, size_t valid) {
  CUpti_Activity* r = nullptr;
  std::vector<std::string> lines;
  char line[512];
  while (cuptiActivityGetNextRecord(buffer, valid, &r) == CUPTI_SUCCESS) {
    if (r->kind == CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL || r->kind == CUPTI_ACTIVITY_KIND_KERNEL) {
      auto* k = reinterpret_cast<CUpti_ActivityKernel10*>(r);
      std::snprintf(line, sizeof(line), "K %llu %llu %u %u %s", (unsigned long long)k->start,
                    (unsigned long long)k->end, k->streamId, k->graphId, k->name ? k->name : "?");
    } else if (r->kind == CUPTI_ACTIVITY_KIND_MEMCPY) {
      auto* c = reinterpret_cast<CUpti_ActivityMemcpy6*>(r);
      std::snprintf(line, sizeof(line), "C %llu %llu %u %u %llu kind%u", (unsigned long long)c->start,
                    (unsigned long long)c->end, c->streamId, c->graphId, (unsigned long long)c->bytes,
                    unsigned(c->copyKind));
    } else if (r->kind == CUPTI_ACTIVITY_KIND_MEMSET) {
      auto* m = reinterpret_cast<CUpti_ActivityMemset4*>(r);
      std::snprintf(line, sizeof(line), "S %llu %llu %u %u %llu", (unsigned long long)m->start,
                    (unsigned long long)m->end, m->streamId, m->graphId, (unsigned long long)m->bytes);
    } else if (r->kind == CUPTI_ACTIVITY_KIND_RUNTIME || r->kind == CUPTI_ACTIVITY_KIND_DRIVER) {
      auto* a = reinterpret_cast<CUpti_ActivityAPI*>(r);
      const char* name = nullptr;
      cuptiGetCallbackName(r->kind == CUPTI_ACTIVITY_KIND_RUNTIME ? CUPTI_CB_DOMAIN_RUNTIME_API
                                                                  : CUPTI_CB_DOMAIN_DRIVER_API,
                           a->cbid, &name);
      std::snprintf(line, sizeof(line), "%c %llu %llu %u 0 %s", r->kind == CUPTI_ACTIVITY_KIND_RUNTIME ? 'R' : 'D',
                    (unsigned long long)a->start, (unsigned long long)a->end, a->threadId,
                    name != nullptr ? name : "?");
    } else {
      continue;
    }
    lines.emplace_back(line);
  }
  std::free(buffer);
  std::lock_guard<std::mutex> lock(g_mu);
  for (auto& l : lines) g_lines.push_back(std::move(l));
}

void Flush() {
  cuptiActivityFlushAll(1);
  const char* path = std::getenv("SPC_TRACE");
  FILE* f = std::fopen(path != nullptr ? path : "/tmp/spc_trace.txt", "w");
  if (f == nullptr) return;
  std::lock_guard<std::mutex> lock(g_mu);
  for (const auto& l : g_lines) std::fprintf(f, "%s\n", l.c_str());
  std::fclose(f);
}

}  // namespace

extern "C" int InitializeInjection() {
  cuptiActivityRegisterCallbacks(BufferRequested, BufferCompleted);
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY);
  cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMSET);
  if (std::getenv("SPC_TRACE_API") != nullptr) cuptiActivityEnable(CUPTI_ACTIVITY_KIND_RUNTIME);
  std::atexit(Flush);
  return 1;
}
