// The engine's step arena (kernels/cpu/host_memory.py `step_arena`): a caching CPU allocator for the tensors one
// thread makes between `enter()` and `leave()`. A freed block goes back to a free list of its size class instead
// of to malloc, so a later step of the same shapes takes it again without a page fault, where glibc would have
// unmapped it (above its mmap threshold) or trimmed it off the heap's top and faulted fresh zeroed pages back in.
//
// While any thread is inside, the process's CPU allocator is this one (c10::SetCPUAllocator); it serves only
// threads inside (a thread-local depth) and passes every other request, and each request beyond the budget of
// cached bytes, to the allocator it was installed over. The last thread out puts that allocator back. A block
// is returned to its free list by whichever thread frees the tensor, whenever (a mutex); blocks are never given
// back to malloc (`release()` frees the idle ones).
// Size classes: multiples of 64 bytes up to 4 KiB, then four classes per power of two (at most 25% over a
// request), so the varying token counts of prefill chunks share blocks.
#include <torch/extension.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <cstdint>
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace {

thread_local int64_t t_depth = 0;  // this thread's nesting of enter() / leave()

size_t size_class(size_t n) {
  if (n <= 4096) return (n + 63) & ~size_t(63);
  const int top = 63 - __builtin_clzll(n - 1);  // 2^top < n <= 2^(top + 1)
  const size_t step = size_t(1) << (top - 2);   // four classes between 2^top and 2^(top + 1)
  return (n + step - 1) & ~(step - 1);
}

struct Arena final : c10::Allocator {
  std::mutex mu;
  std::unordered_map<size_t, std::vector<void*>> idle;  // size class -> cached free blocks
  std::unordered_map<void*, size_t> blocks;             // every block the arena holds -> its size class
  size_t held = 0, budget = 0;                          // bytes in `blocks`; the cap on them
  int64_t inside = 0;                                   // threads between enter() and leave()
  c10::Allocator* next = nullptr;                       // the allocator installed before, which serves the rest
  int64_t served = 0, passed = 0;

  static void release_block(void* p);

  c10::DataPtr allocate(size_t n) override {
    if (t_depth > 0 && n > 0) {
      const size_t r = size_class(n);
      void* p = nullptr;
      {
        std::lock_guard<std::mutex> g(mu);
        auto it = idle.find(r);
        if (it != idle.end() && !it->second.empty()) {
          p = it->second.back();
          it->second.pop_back();
        } else if (held + r <= budget) {
          p = c10::alloc_cpu(r);
          blocks.emplace(p, r);
          held += r;
        }
        if (p != nullptr) ++served; else ++passed;
      }
      if (p != nullptr) return {p, p, &Arena::release_block, c10::Device(c10::DeviceType::CPU)};
    }
    return next->allocate(n);
  }
  c10::DeleterFnPtr raw_deleter() const override { return &Arena::release_block; }
  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }
};

Arena& arena() {
  static Arena* a = new Arena();  // never destroyed: tensors may free blocks into it at any time
  return *a;
}

void Arena::release_block(void* p) {
  Arena& a = arena();
  c10::Allocator* next = nullptr;
  {
    std::lock_guard<std::mutex> g(a.mu);
    auto it = a.blocks.find(p);
    if (it != a.blocks.end()) {
      a.idle[it->second].push_back(p);
      return;
    }
    next = a.next;
  }
  next->raw_deleter()(p);  // (raw_allocate's block from the allocator it passed the request to)
}

}  // namespace

void enter(int64_t budget) {
  TORCH_CHECK(budget >= 0, "step_arena: budget must be >= 0 bytes, got ", budget);
  Arena& a = arena();
  std::lock_guard<std::mutex> g(a.mu);
  if (a.inside++ == 0) {
    c10::Allocator* current = c10::GetCPUAllocator();
    if (current != &a) {
      a.next = current;
      c10::SetCPUAllocator(&a);
    }
  }
  a.budget = static_cast<size_t>(budget);  // (the latest enter's: one setting a process in practice)
  ++t_depth;
}

void leave() {
  TORCH_CHECK(t_depth > 0, "step_arena: leave() without enter() on this thread");
  --t_depth;
  Arena& a = arena();
  std::lock_guard<std::mutex> g(a.mu);
  if (--a.inside == 0 && c10::GetCPUAllocator() == &a) c10::SetCPUAllocator(a.next);
}

// suspend(): the calling thread's requests go to the allocator underneath until resume(the depth it returned): what
// a step makes that outlives it (a weight's packed copy, the rotary table) stays out of the arena.
int64_t suspend() {
  const int64_t depth = t_depth;
  t_depth = 0;
  return depth;
}

void resume(int64_t depth) {
  TORCH_CHECK(depth >= 0 && t_depth == 0, "step_arena: resume(", depth, ") without suspend() on this thread");
  t_depth = depth;
}

// the idle blocks' memory back to malloc; returns the bytes freed
int64_t release() {
  Arena& a = arena();
  std::lock_guard<std::mutex> g(a.mu);
  int64_t freed = 0;
  for (auto& [r, ps] : a.idle) {
    for (void* p : ps) {
      c10::free_cpu(p);
      a.blocks.erase(p);
      a.held -= r;
      freed += static_cast<int64_t>(r);
    }
    ps.clear();
  }
  return freed;
}

// {bytes held, idle blocks, requests served, requests passed on, threads inside}
std::vector<int64_t> stats() {
  Arena& a = arena();
  std::lock_guard<std::mutex> g(a.mu);
  int64_t idle = 0;
  for (auto& [r, ps] : a.idle) idle += static_cast<int64_t>(ps.size());
  return {static_cast<int64_t>(a.held), idle, a.served, a.passed, a.inside};
}

// whether the tensor's storage is one of the arena's blocks
bool owns(const torch::Tensor& t) {
  Arena& a = arena();
  std::lock_guard<std::mutex> g(a.mu);
  return a.blocks.count(t.storage().data_ptr().get()) > 0;
}

int64_t size_class_of(int64_t n) { return static_cast<int64_t>(size_class(static_cast<size_t>(n))); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("enter", &enter);
  m.def("leave", &leave);
  m.def("suspend", &suspend);
  m.def("resume", &resume);
  m.def("release", &release);
  m.def("stats", &stats);
  m.def("owns", &owns);
  m.def("size_class", &size_class_of);
}
