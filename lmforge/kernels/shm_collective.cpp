// The shared-memory all-reduce of lmforge/engine/shm_comm.py as a kernel, so that a step graph can hold it: tensor
// parallelism's step graphs replay each layer's all-reduce between the kernels without returning to Python. Same
// protocol as the Python path (which it replaces wherever the kernels are built): each rank copies its tensor into
// its slot of the buffer set seq % 2, publishes seq, waits (yielding the core) for every rank's seq, then adds the
// slots in rank order in float32 (every rank gets the same bits). While waiting it checks every 50 ms that the
// processes named in `watch` still exist, and fails instead of spinning forever when one is gone.

#include <sched.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <stdexcept>

#include "cpu_ops.h"

namespace lmforge {

namespace {

constexpr int64_t kHeaderWords = 8;  // 64 bytes per rank: each sequence number on its own cache line

// Whether process `pid` still runs: it exists and, where /proc says, is not a zombie (a child that exited stays in
// the process table until its parent reaps it, and kill(pid, 0) still succeeds on it).
bool running(pid_t pid) {
  if (kill(pid, 0) != 0 && errno == ESRCH) return false;
  char path[64];
  std::snprintf(path, sizeof path, "/proc/%d/stat", static_cast<int>(pid));
  FILE* f = std::fopen(path, "r");
  if (f == nullptr) return true;  // no /proc here: existing is all we can tell
  char text[512] = {};
  const size_t n = std::fread(text, 1, sizeof text - 1, f);
  std::fclose(f);
  const char* end = std::strrchr(text, ')');  // "pid (name) S ...": the state follows the name's last ')'
  return !(n > 0 && end != nullptr && end[1] == ' ' && (end[2] == 'Z' || end[2] == 'X'));
}

bool alive(const at::Tensor& watch) {
  // watch: process ids that must run; a negative one, -pid, must be this process's parent
  const int64_t* ids = ptr<int64_t>(watch);
  for (int64_t i = 0; i < watch.numel(); ++i) {
    const int64_t id = ids[i];
    if (id < 0 ? getppid() != -id : !running(static_cast<pid_t>(id))) return false;
  }
  return true;
}

template <typename T>
void add_slots(const uint8_t* base, int64_t slot_bytes, int64_t world, T* out, int64_t n) {
  at::parallel_for(0, n, 4096, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      float acc = to_f(reinterpret_cast<const T*>(base)[i]);
      for (int64_t r = 1; r < world; ++r) acc += to_f(reinterpret_cast<const T*>(base + r * slot_bytes)[i]);
      out[i] = from_f<T>(acc);
    }
  });
}

}  // namespace

// x: contiguous float32 or bfloat16, summed over the ranks in place; data: uint8 [2, world, slot bytes] (the two
// buffer sets); seqs: int64 [world * 8] (the published sequence numbers); state: int64 [2] (this rank's last
// sequence number, its rank); watch: int64 process ids (see alive()).
at::Tensor shm_all_reduce(at::Tensor x, at::Tensor data, at::Tensor seqs, at::Tensor state, at::Tensor watch) {
  check(x, "shm_all_reduce: x");
  TORCH_CHECK(x.is_contiguous(), "shm_all_reduce: x must be contiguous");
  const int64_t world = data.size(1), slot_bytes = data.size(2);
  const int64_t nbytes = x.numel() * x.element_size();
  TORCH_CHECK(nbytes <= slot_bytes, "shm_all_reduce: ", nbytes, " bytes exceed a slot of ", slot_bytes);
  int64_t* st = ptr<int64_t>(state);
  const int64_t seq = ++st[0], rank = st[1];
  uint8_t* base = ptr<uint8_t>(data) + (seq % 2) * world * slot_bytes;
  std::memcpy(base + rank * slot_bytes, x.data_ptr(), nbytes);
  auto* published = reinterpret_cast<std::atomic<int64_t>*>(ptr<int64_t>(seqs));
  published[rank * kHeaderWords].store(seq, std::memory_order_release);  // after the copy
  auto last = std::chrono::steady_clock::now();
  for (int64_t r = 0; r < world; ++r) {
    while (published[r * kHeaderWords].load(std::memory_order_acquire) < seq) {
      sched_yield();
      const auto now = std::chrono::steady_clock::now();
      if (now - last > std::chrono::milliseconds(50)) {
        if (!alive(watch)) throw std::runtime_error("a tensor-parallel process is gone (shared-memory collective)");
        last = now;
      }
    }
  }
  dispatch(x, [&](auto tag) {
    using T = decltype(tag);
    add_slots<T>(base, slot_bytes, world, ptr<T>(x), x.numel());
  });
  return x;
}

}  // namespace lmforge
