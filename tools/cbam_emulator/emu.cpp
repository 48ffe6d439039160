// Emulator for the CBAM small-path kernels (csrc/cuda/cbam_small.cu), their source unmodified, as host C++.
//  * every GPU thread is a fiber (ucontext) of its block's OS thread, scheduled round robin in a shuffled
//    order each round; __syncthreads and the shuffles are real exchanges (all threads / lanes must arrive);
//  * every block of the grid runs at once on its own OS thread (a cooperative launch's guarantee), and
//    grid.sync() is a real barrier across them;
//  * unwritten shared memory reads as NaN; a barrier that never completes (threads of a block at different
//    barriers, or blocks calling grid.sync() different numbers of times) is reported as a deadlock (exit 3).
#include "cbam_small_host.cuh"

#include <ucontext.h>
#include <unistd.h>

#include <atomic>
#include <barrier>
#include <chrono>
#include <cstdio>
#include <random>
#include <thread>
#include <vector>

using dermomamba::cuda::CbamParams;
thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

namespace {

constexpr size_t kStackBytes = 128 * 1024;

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  bool done = false;
};

struct Barrier {
  unsigned arrived = 0;
  unsigned generation = 0;
};

struct BlockRun {
  std::vector<Fiber> fibers;
  ucontext_t main;
  int current = 0;
  Barrier block_barrier, grid_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<float> warp_buf;
  std::vector<float> shared;
  std::mt19937 rng;
};

thread_local BlockRun* tl_run = nullptr;
std::barrier<>* g_grid = nullptr;
std::atomic<long> g_progress{0};
CbamParams g_params;
void (*g_kernel)(CbamParams) = nullptr;

void yield_fiber() {
  BlockRun* r = tl_run;
  ++g_progress;
  swapcontext(&r->fibers[r->current].ctx, &r->main);
}

void wait_barrier(Barrier& b, unsigned count) {
  const unsigned g = b.generation;
  if (++b.arrived == count) {
    b.arrived = 0;
    ++b.generation;
    return;
  }
  while (b.generation == g) yield_fiber();
}

void fiber_entry() {
  g_kernel(g_params);
  tl_run->fibers[tl_run->current].done = true;
}

void run_block(unsigned block_index, unsigned threads, size_t shared_floats, unsigned seed) {
  BlockRun run;
  run.rng.seed(seed);
  tl_run = &run;
  blockIdx = {block_index, 0, 0};
  blockDim = dim3(threads);
  run.fibers.resize(threads);
  run.warp_barriers.resize((threads + 31) / 32);
  run.warp_buf.assign(threads, 0.f);
  run.shared.assign(shared_floats, NAN);
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = run.fibers[t];
    f.stack.resize(kStackBytes);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = &run.main;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  std::vector<unsigned> order(threads);
  for (unsigned t = 0; t < threads; ++t) order[t] = t;
  for (;;) {
    bool any = false;
    std::shuffle(order.begin(), order.end(), run.rng);
    for (unsigned t : order) {
      if (run.fibers[t].done) continue;
      any = true;
      run.current = static_cast<int>(t);
      threadIdx = {t, 0, 0};
      swapcontext(&run.main, &run.fibers[t].ctx);
    }
    if (!any) break;
  }
  tl_run = nullptr;
}

// Every block at once (cooperative launch); a watchdog reports a grid that stops making progress.
void run_grid(const CbamParams& p, unsigned blocks, unsigned threads, size_t shared_floats, unsigned seed) {
  g_params = p;
  std::barrier<> grid(static_cast<std::ptrdiff_t>(blocks));
  g_grid = &grid;
  std::atomic<bool> finished{false};
  std::thread watchdog([&] {
    long last = -1;
    int still = 0;
    while (!finished) {
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
      const long now = g_progress.load();
      still = now == last ? still + 1 : 0;
      last = now;
      if (still > 50) {
        std::fprintf(stderr, "emulator: deadlock (no fiber progressed for 10 s)\n");
        std::fflush(stderr);
        _exit(3);
      }
    }
  });
  std::vector<std::thread> runners;
  std::mt19937 rng(seed);
  for (unsigned b = 0; b < blocks; ++b) {
    const unsigned block_seed = rng();
    runners.emplace_back([=] {
      gridDim = dim3(blocks);
      run_block(b, threads, shared_floats, block_seed);
    });
  }
  for (auto& t : runners) t.join();
  finished = true;
  watchdog.join();
  g_grid = nullptr;
}

}  // namespace

float* emu_dynamic_shared() { return tl_run->shared.data(); }

void emu_grid_sync() {
  BlockRun* r = tl_run;
  Barrier& b = r->grid_barrier;
  const unsigned g = b.generation;
  if (++b.arrived == blockDim.x) {
    // the block's last thread to arrive holds its OS thread at the grid barrier for the whole block
    ++g_progress;
    g_grid->arrive_and_wait();
    b.arrived = 0;
    ++b.generation;
    return;
  }
  while (b.generation == g) yield_fiber();
}

float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
  if (mask != 0xffffffffu) std::abort();
  BlockRun* r = tl_run;
  const int t = r->current, warp = t / 32, lane = t % 32;
  r->warp_buf[t] = v;
  wait_barrier(r->warp_barriers[warp], 32);
  const float out = r->warp_buf[warp * 32 + (lane ^ lane_mask)];
  wait_barrier(r->warp_barriers[warp], 32);
  return out;
}
void __syncthreads() { wait_barrier(tl_run->block_barrier, blockDim.x); }
float __ldcg(const float* a) {
  float v;
  __atomic_load(a, &v, __ATOMIC_SEQ_CST);
  return v;
}

namespace cs = dermomamba::cuda::cbam_small;
namespace dc = dermomamba::cuda;

template <bool kForward>
void (*pick(int kind, bool vec))(CbamParams) {
  if constexpr (kForward) {
    switch (kind) {
      case dc::kCbamFloat16: return vec ? cs::forward_kernel<__half, true> : cs::forward_kernel<__half, false>;
      case dc::kCbamBFloat16:
        return vec ? cs::forward_kernel<__nv_bfloat16, true> : cs::forward_kernel<__nv_bfloat16, false>;
      default: return vec ? cs::forward_kernel<float, true> : cs::forward_kernel<float, false>;
    }
  } else {
    switch (kind) {
      case dc::kCbamFloat16: return vec ? cs::backward_kernel<__half, true> : cs::backward_kernel<__half, false>;
      case dc::kCbamBFloat16:
        return vec ? cs::backward_kernel<__nv_bfloat16, true> : cs::backward_kernel<__nv_bfloat16, false>;
      default: return vec ? cs::backward_kernel<float, true> : cs::backward_kernel<float, false>;
    }
  }
}

// One forward (direction 0) or backward (1) of the small path, as cbam_cuda.cpp would launch it.
// cfg: batch, channels, height, width, hidden, ksize, use_batch_stats, x_kind, vector_loads, groups,
//      group_channels, param_kind, seed
// strides: x (batch, channel, pixel), grad (...), out (...)
// ptrs: x, grad, out, mlp1_w, mlp1_b, mlp2_w, mlp2_b, conv_w, bn_weight, bn_bias, running_mean, running_var,
//       cs, chan, pix, stats, small_parts, small_image, conv_wparts, d_logit, hidden_buf,
//       d_mlp1_w, d_mlp1_b, d_mlp2_w, d_mlp2_b, d_conv_w, d_bn_weight, d_bn_bias
extern "C" int cbam_small_emulate(int direction, const int* cfg, float eps, const int64_t* strides, void** ptrs) {
  CbamParams p{};
  p.batch = cfg[0];
  p.channels = cfg[1];
  p.height = cfg[2];
  p.width = cfg[3];
  p.hw = p.height * p.width;
  p.hidden = cfg[4];
  p.ksize = cfg[5];
  p.use_batch_stats = cfg[6] != 0;
  const int x_kind = cfg[7];
  p.vector_loads = cfg[8] != 0;
  p.small_groups = cfg[9];
  p.small_group_channels = cfg[10];
  const int param_kind = cfg[11];
  p.eps = eps;
  p.x = ptrs[0];
  p.x_batch_stride = strides[0];
  p.x_channel_stride = strides[1];
  p.x_pixel_stride = strides[2];
  p.grad = ptrs[1];
  p.grad_batch_stride = strides[3];
  p.grad_channel_stride = strides[4];
  p.grad_pixel_stride = strides[5];
  p.out = ptrs[2];
  p.out_batch_stride = strides[6];
  p.out_channel_stride = strides[7];
  p.out_pixel_stride = strides[8];
  auto in = [&](int i) { return dc::CbamTensor{ptrs[i], param_kind}; };
  auto out = [&](int i) { return dc::CbamOutTensor{ptrs[i], param_kind}; };
  p.mlp1_w = in(3);
  p.mlp1_b = in(4);
  p.mlp2_w = in(5);
  p.mlp2_b = in(6);
  p.conv_w = in(7);
  p.bn_weight = in(8);
  p.bn_bias = in(9);
  p.running_mean = in(10);
  p.running_var = in(11);
  p.cs = static_cast<float*>(ptrs[12]);
  p.chan = static_cast<float*>(ptrs[13]);
  p.pix = static_cast<float*>(ptrs[14]);
  p.stats = static_cast<float*>(ptrs[15]);
  p.small_parts = static_cast<float*>(ptrs[16]);
  p.small_image = static_cast<float*>(ptrs[17]);
  p.conv_wparts = static_cast<float*>(ptrs[18]);
  p.d_logit = static_cast<float*>(ptrs[19]);
  p.hidden_buf = static_cast<float*>(ptrs[20]);
  p.d_mlp1_w = out(21);
  p.d_mlp1_b = out(22);
  p.d_mlp2_w = out(23);
  p.d_mlp2_b = out(24);
  p.d_conv_w = out(25);
  p.d_bn_weight = out(26);
  p.d_bn_bias = out(27);
  const dc::CbamSmallLayout l =
      dc::cbam_small_layout(p.channels, p.hw, p.hidden, p.ksize, p.small_group_channels, direction != 0);
  g_kernel = direction == 0 ? pick<true>(x_kind, p.vector_loads) : pick<false>(x_kind, p.vector_loads);
  run_grid(p, static_cast<unsigned>(p.batch * p.small_groups), dc::kCbamSmallThreads, static_cast<size_t>(l.total),
           static_cast<unsigned>(cfg[12]));
  return 0;
}
