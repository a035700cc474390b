// The in-process communicator (core/parallel/communicator.h): all-reduce of random tensors at several
// sizes and group sizes equals the serial rank-order sum bit for bit on every rank, across repeated
// calls; mismatched shapes fail on every rank; an aborted or absent rank does not hang the others. The
// host-staged group (device tensors through host memory) on a CPU backend posing as a device; the device of
// each rank on a GPU backend and the refusal of more ranks than GPUs (core/parallel/tensor_parallel_devices.h).
#include "core/parallel/communicator.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <functional>
#include <future>
#include <random>
#include <thread>
#include <vector>

#include "core/cpu/cpu_backend.h"
#include "core/dtype.h"
#include "core/parallel/tensor_parallel_devices.h"

namespace specontext {
namespace {

// Runs fn(rank) on one thread per rank and returns each rank's status.
std::vector<absl::Status> RunRanks(int size, const std::function<absl::Status(int)>& fn) {
  std::vector<absl::Status> out(size);
  std::vector<std::thread> threads;
  for (int r = 0; r < size; ++r) threads.emplace_back([&, r] { out[r] = fn(r); });
  for (std::thread& t : threads) t.join();
  return out;
}

Tensor RandomTensor(DType dtype, int64_t n, std::mt19937& rng) {
  std::normal_distribution<float> dist(0.0f, 3.0f);
  std::vector<float> f(n);
  for (float& x : f) x = dist(rng);
  Tensor t = Tensor::HostEmpty(dtype, {n});
  ConvertFromF32(f.data(), dtype, t.data(), n);
  return t;
}

class AllReduce : public ::testing::TestWithParam<std::tuple<int, DType>> {};

TEST_P(AllReduce, EqualsSerialSumOnEveryRank) {
  const auto [size, dtype] = GetParam();
  auto comms = CreateInProcessGroup(size);
  ASSERT_EQ(comms.size(), static_cast<size_t>(size));
  std::mt19937 rng(size * 17 + static_cast<int>(dtype));
  for (int64_t n : {1, 17, 97, 2049, 65537}) {
    for (int rep = 0; rep < 3; ++rep) {
      std::vector<Tensor> in, io;
      for (int r = 0; r < size; ++r) {
        in.push_back(RandomTensor(dtype, n, rng));
        Tensor copy = Tensor::HostEmpty(dtype, {n});
        std::memcpy(copy.data(), in.back().data(), copy.nbytes());
        io.push_back(copy);
      }
      std::vector<float> want(n, 0.0f), x(n);
      for (int r = 0; r < size; ++r) {
        ConvertToF32(in[r].data(), dtype, x.data(), n);
        for (int64_t i = 0; i < n; ++i) want[i] = r == 0 ? x[i] : want[i] + x[i];
      }
      Tensor want_t = Tensor::HostEmpty(dtype, {n});
      ConvertFromF32(want.data(), dtype, want_t.data(), n);
      auto st = RunRanks(size, [&](int r) {
        EXPECT_EQ(comms[r]->rank(), r);
        EXPECT_EQ(comms[r]->size(), size);
        return comms[r]->AllReduceSum(&io[r]);
      });
      for (int r = 0; r < size; ++r) {
        ASSERT_TRUE(st[r].ok()) << st[r];
        ASSERT_EQ(std::memcmp(io[r].data(), want_t.data(), want_t.nbytes()), 0) << "rank " << r << " n " << n;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Sizes, AllReduce,
                         ::testing::Combine(::testing::Values(1, 2, 3, 4),
                                            ::testing::Values(DType::kF32, DType::kBF16)));

TEST(InProcessGroup, ManyBackToBackCollectives) {
  // Fast ranks run ahead into the next call while slow ones still copy the previous result out.
  const int size = 3, calls = 500;
  auto comms = CreateInProcessGroup(size);
  auto st = RunRanks(size, [&](int r) -> absl::Status {
    for (int i = 0; i < calls; ++i) {
      float v[5];
      for (float& x : v) x = static_cast<float>(r + i);
      Tensor t(v, DType::kF32, {5});
      if (absl::Status s = comms[r]->AllReduceSum(&t); !s.ok()) return s;
      for (float x : v) {
        if (x != static_cast<float>(3 * i + 3)) return absl::InternalError("wrong sum");
      }
      if (i % 7 == 0) {
        if (absl::Status s = comms[r]->Barrier(); !s.ok()) return s;
      }
    }
    return absl::OkStatus();
  });
  for (const absl::Status& s : st) EXPECT_TRUE(s.ok()) << s;
}

TEST(InProcessGroup, MismatchedShapesFailOnEveryRank) {
  auto comms = CreateInProcessGroup(2);
  std::vector<Tensor> t = {Tensor::HostEmpty(DType::kF32, {4}), Tensor::HostEmpty(DType::kF32, {5})};
  t[0].as<float>()[0] = 1;
  auto st = RunRanks(2, [&](int r) { return comms[r]->AllReduceSum(&t[r]); });
  for (const absl::Status& s : st) EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
  EXPECT_EQ(t[0].as<float>()[0], 1.0f);  // untouched
  // Mismatched dtypes, and a barrier against an all-reduce.
  std::vector<Tensor> u = {Tensor::HostEmpty(DType::kF32, {4}), Tensor::HostEmpty(DType::kBF16, {4})};
  st = RunRanks(2, [&](int r) { return comms[r]->AllReduceSum(&u[r]); });
  for (const absl::Status& s : st) EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
  st = RunRanks(2, [&](int r) { return r == 0 ? comms[r]->Barrier() : comms[r]->AllReduceSum(&u[0]); });
  for (const absl::Status& s : st) EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
  // The group still works afterwards.
  std::vector<Tensor> w = {Tensor::HostEmpty(DType::kF32, {3}), Tensor::HostEmpty(DType::kF32, {3})};
  w[1].as<float>()[2] = 2.5f;
  st = RunRanks(2, [&](int r) { return comms[r]->AllReduceSum(&w[r]); });
  for (const absl::Status& s : st) EXPECT_TRUE(s.ok()) << s;
  EXPECT_EQ(w[0].as<float>()[2], 2.5f);
}

TEST(InProcessGroup, AbortReleasesWaitingRanks) {
  auto comms = CreateInProcessGroup(3);
  // Ranks 0 and 1 wait in an all-reduce; rank 2 fails and aborts instead of joining.
  auto done = std::async(std::launch::async, [&] {
    return RunRanks(3, [&](int r) -> absl::Status {
      if (r == 2) {
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
        comms[r]->Abort();
        return absl::OkStatus();
      }
      Tensor t = Tensor::HostEmpty(DType::kF32, {8});
      return comms[r]->AllReduceSum(&t);
    });
  });
  ASSERT_EQ(done.wait_for(std::chrono::seconds(20)), std::future_status::ready) << "ranks hang after an abort";
  auto st = done.get();
  EXPECT_TRUE(absl::IsAborted(st[0])) << st[0];
  EXPECT_TRUE(absl::IsAborted(st[1])) << st[1];
  EXPECT_TRUE(absl::IsAborted(comms[0]->Barrier()));  // later calls fail at once
}

TEST(InProcessGroup, AbortAfterTheLastCollectiveKeepsItsResult) {
  // Every rank aborts right after its last all-reduce: whichever leaves first, the others still get the sum.
  for (int round = 0; round < 200; ++round) {
    auto comms = CreateInProcessGroup(3);
    std::vector<float> v = {1, 2, 3};
    auto st = RunRanks(3, [&](int r) {
      Tensor t(&v[r], DType::kF32, {1});
      absl::Status s = comms[r]->AllReduceSum(&t);
      comms[r]->Abort();
      return s;
    });
    for (int r = 0; r < 3; ++r) {
      ASSERT_TRUE(st[r].ok()) << "round " << round << " rank " << r << ": " << st[r];
      ASSERT_EQ(v[r], 6.0f);
    }
  }
}

TEST(InProcessGroup, TimeoutAbortsTheGroup) {
  auto comms = CreateInProcessGroup(2, {.timeout = absl::Milliseconds(100)});
  // Rank 1 never arrives: rank 0 times out instead of hanging, and the group is aborted.
  auto done = std::async(std::launch::async, [&] { return comms[0]->Barrier(); });
  ASSERT_EQ(done.wait_for(std::chrono::seconds(20)), std::future_status::ready);
  EXPECT_TRUE(absl::IsDeadlineExceeded(done.get()));
  EXPECT_TRUE(absl::IsAborted(comms[1]->Barrier()));
}

}  // namespace
}  // namespace specontext

namespace specontext {
namespace {

// A CPU backend whose tensors pass for device tensors (tagged kCuda, in host memory): the host-staged group's
// download, sum and upload run without a GPU. Counts the copies; a download may be made to fail.
class FakeDeviceBackend : public CpuBackend {
 public:
  FakeDeviceBackend() : CpuBackend(0) {}
  Tensor Device(const Tensor& host) {
    storage_.emplace_back(host.nbytes());
    std::memcpy(storage_.back().data(), host.data(), host.nbytes());
    return Tensor(storage_.back().data(), host.dtype(), host.shape(), DeviceKind::kCuda);
  }
  absl::Status ToHost(const Tensor& device, Tensor* host) override {
    if (fail_download) return absl::InternalError("download failed");
    if (device.device() != DeviceKind::kCuda || host->device() != DeviceKind::kCpu) {
      return absl::InvalidArgumentError("ToHost: not a device tensor");
    }
    ++downloads;
    std::memcpy(host->data(), device.data(), device.nbytes());
    return absl::OkStatus();
  }
  absl::Status CopyToDevice(const Tensor& host, Tensor* device) override {
    ++uploads;
    std::memcpy(device->data(), host.data(), host.nbytes());
    return absl::OkStatus();
  }
  int downloads = 0, uploads = 0;
  bool fail_download = false;

 private:
  std::vector<std::vector<char>> storage_;
};

TEST(HostStagedGroup, StagesDeviceTensorsThroughTheRankOrderSum) {
  std::mt19937 rng(7);
  for (int size : {2, 3, 4}) {
    std::vector<std::unique_ptr<FakeDeviceBackend>> owned;
    std::vector<Backend*> backends;
    for (int r = 0; r < size; ++r) {
      owned.push_back(std::make_unique<FakeDeviceBackend>());
      backends.push_back(owned.back().get());
    }
    auto comms = CreateHostStagedGroup(backends);
    ASSERT_EQ(comms.size(), static_cast<size_t>(size));
    for (DType dtype : {DType::kF32, DType::kBF16}) {
      for (int64_t n : {1, 17, 2049}) {
        std::vector<Tensor> host, device;
        for (int r = 0; r < size; ++r) {
          host.push_back(RandomTensor(dtype, n, rng));
          device.push_back(owned[r]->Device(host.back()));
        }
        std::vector<float> want(n, 0.0f), x(n);  // rank order in f32, rounded to the dtype once
        for (int r = 0; r < size; ++r) {
          ConvertToF32(host[r].data(), dtype, x.data(), n);
          for (int64_t i = 0; i < n; ++i) want[i] = r == 0 ? x[i] : want[i] + x[i];
        }
        Tensor rounded = Tensor::HostEmpty(dtype, {n});
        ConvertFromF32(want.data(), dtype, rounded.data(), n);
        ConvertToF32(rounded.data(), dtype, want.data(), n);
        auto st = RunRanks(size, [&](int r) { return comms[r]->AllReduceSum(&device[r]); });
        for (int r = 0; r < size; ++r) {
          ASSERT_TRUE(st[r].ok()) << st[r];
          std::vector<float> got(n);
          ConvertToF32(device[r].data(), dtype, got.data(), n);
          ASSERT_EQ(got, want) << "size " << size << " rank " << r << " n " << n;
        }
      }
    }
    for (int r = 0; r < size; ++r) {
      EXPECT_EQ(owned[r]->downloads, 6) << "rank " << r;
      EXPECT_EQ(owned[r]->uploads, 6) << "rank " << r;
    }
    // Host tensors go straight to the in-process group.
    std::vector<Tensor> host;
    for (int r = 0; r < size; ++r) host.push_back(RandomTensor(DType::kF32, 5, rng));
    auto st = RunRanks(size, [&](int r) { return comms[r]->AllReduceSum(&host[r]); });
    for (int r = 0; r < size; ++r) EXPECT_TRUE(st[r].ok()) << st[r];
    EXPECT_EQ(owned[0]->downloads, 6);
    auto fence = RunRanks(size, [&](int r) { return comms[r]->Barrier(); });
    for (int r = 0; r < size; ++r) EXPECT_TRUE(fence[r].ok()) << fence[r];
  }
}

TEST(HostStagedGroup, AFailedDownloadAbortsTheGroup) {
  std::vector<std::unique_ptr<FakeDeviceBackend>> owned;
  std::vector<Backend*> backends;
  for (int r = 0; r < 3; ++r) {
    owned.push_back(std::make_unique<FakeDeviceBackend>());
    backends.push_back(owned.back().get());
  }
  owned[1]->fail_download = true;
  auto comms = CreateHostStagedGroup(backends);
  std::mt19937 rng(3);
  std::vector<Tensor> device;
  for (int r = 0; r < 3; ++r) device.push_back(owned[r]->Device(RandomTensor(DType::kF32, 9, rng)));
  auto st = RunRanks(3, [&](int r) { return comms[r]->AllReduceSum(&device[r]); });
  EXPECT_TRUE(absl::IsInternal(st[1])) << st[1];
  EXPECT_NE(st[1].message().find("rank 1 download"), std::string::npos) << st[1];
  EXPECT_TRUE(absl::IsAborted(st[0])) << st[0];
  EXPECT_TRUE(absl::IsAborted(st[2])) << st[2];
}

TEST(TensorParallelDevices, ParsesTheFlag) {
  EXPECT_EQ(*ParseTensorParallelDevices("separate"), TensorParallelDevices::kSeparate);
  EXPECT_EQ(*ParseTensorParallelDevices("shared"), TensorParallelDevices::kShared);
  auto bad = ParseTensorParallelDevices("both");
  ASSERT_TRUE(absl::IsInvalidArgument(bad.status())) << bad.status();
  EXPECT_NE(bad.status().message().find("--tensor-parallel-devices expects separate or shared"), std::string::npos);
}

TEST(TensorParallelDevices, OneGpuPerRankOrAllOnGpuZero) {
  EXPECT_EQ(*TensorParallelDeviceIds(4, TensorParallelDevices::kSeparate, 4), (std::vector<int>{0, 1, 2, 3}));
  EXPECT_EQ(*TensorParallelDeviceIds(2, TensorParallelDevices::kSeparate, 8), (std::vector<int>{0, 1}));
  EXPECT_EQ(*TensorParallelDeviceIds(4, TensorParallelDevices::kShared, 1), (std::vector<int>{0, 0, 0, 0}));
}

TEST(TensorParallelDevices, RefusesMoreRanksThanGpus) {
  auto two_on_one = TensorParallelDeviceIds(2, TensorParallelDevices::kSeparate, 1);
  ASSERT_TRUE(absl::IsInvalidArgument(two_on_one.status())) << two_on_one.status();
  EXPECT_EQ(two_on_one.status().message(),
            "--tensor-parallel 2 needs one GPU per rank but 1 is visible; pass --tensor-parallel-devices shared to run "
            "every rank on GPU 0 (a test mode: each all-reduce goes through host memory)");
  auto four_on_two = TensorParallelDeviceIds(4, TensorParallelDevices::kSeparate, 2);
  ASSERT_TRUE(absl::IsInvalidArgument(four_on_two.status())) << four_on_two.status();
  EXPECT_NE(four_on_two.status().message().find("but 2 are visible"), std::string::npos) << four_on_two.status();
  for (TensorParallelDevices mode : {TensorParallelDevices::kSeparate, TensorParallelDevices::kShared}) {
    auto none = TensorParallelDeviceIds(2, mode, 0);
    ASSERT_TRUE(absl::IsInvalidArgument(none.status())) << none.status();
    EXPECT_NE(none.status().message().find("no GPU is visible"), std::string::npos) << none.status();
  }
}

}  // namespace
}  // namespace specontext
