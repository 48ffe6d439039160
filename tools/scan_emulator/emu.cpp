// Block/warp emulator driving csrc/cuda/scan_staged_kernels.cuh's and scan_staged_bwd_kernels.cuh's kernel
// source unmodified, as host C++; also the flat forward (scan_flat_kernels.cuh) with its own launchers, whose
// <<<>>> launches run here (emu::Launch; make_host_copy.py --launchers).
//  * every GPU thread is a fiber (ucontext) of its block's OS thread; __syncthreads, __syncwarp and the
//    shuffles are real exchanges (all 32 lanes / all threads must arrive);
//  * several blocks run at once on separate OS threads, started in a shuffled order with random delays,
//    so the look-back really waits for tiles that are still running;
//  * a weak memory model for the published look-back data: a __stcg store becomes visible to other
//    blocks only when the storing thread executes __threadfence (or when the grid ends), so a missing
//    fence leaves the reader with the NaN-poisoned scratch;
//  * a look-back that waits too long (a block waiting for a tile no running block will publish) is
//    reported as a deadlock (exit code 3);
//  * a 16-byte access (float4 / uint4 __ldg, __ldcg, __stcg) off a 16-byte boundary, which faults on the
//    GPU, stops the run (exit code 4).
// EMU_FLAT_ONLY (build.sh with EMU_CXXFLAGS=-DEMU_FLAT_ONLY): the flat forward alone, built in seconds rather than
// minutes (plant_bugs_flat.py builds one library per planted bug).
#ifndef EMU_FLAT_ONLY
#include "scan_staged_bwd_kernels.cuh"
#include "scan_regs_fwd_kernels.cuh"
#include "scan_regs_bwd_kernels.cuh"
#endif
#include "scan_flat_kernels.cuh"

#include <ucontext.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <random>
#include <thread>
#include <unistd.h>
#include <vector>

using dermomamba::cuda::ScanParams;
thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

namespace {

constexpr size_t kStackBytes = 96 * 1024;

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  bool done = false;
  std::vector<std::pair<float*, float>> pending;  // __stcg stores not yet fenced
};

struct Barrier {
  int arrived = 0;
  unsigned generation = 0;
  int kind = 0;  // what the lanes of this generation arrived at (warp barriers: __syncwarp or __shfl_xor_sync)
};

// __shfl_sync (emu::shfl_bits): each lane posts its value of its n-th shuffle into its ring and waits only for
// its source lane's n-th post, so lanes are not held together by a shuffle (CUDA gives a shuffle no barrier or
// memory-ordering meaning; only __syncwarp orders shared memory between lanes).
constexpr int kShuffleRing = 64;
struct ShufflePost {
  unsigned long long bits;
  int tag;
};
struct WarpShuffles {
  std::array<long, 32> posted{}, consumed{};
  std::array<std::array<ShufflePost, kShuffleRing>, 32> ring{};
};

struct BlockRun {
  std::vector<Fiber> fibers;
  ucontext_t main;
  int current = 0;
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<WarpShuffles> warp_shuffles;
  std::vector<float> warp_buf;
  std::vector<unsigned char> shared;
  std::vector<unsigned char> static_shared;  // static __shared__ arrays (emu::static_shared), + alignment slack
  size_t static_shared_bytes = 0, static_shared_offset = 0;
  // Deadlock detection inside a block: `events` counts arrivals, posts and finished fibers; a fiber that yields
  // from a wait sets `waiting`. A whole round of waits with no event: the block can never finish.
  long events = 0;
  bool waiting = false;
  std::mt19937 rng;
  long spins = 0;
  std::chrono::steady_clock::time_point first_spin;
};

thread_local BlockRun* tl_run = nullptr;
std::mutex g_atomic_mutex;
std::mutex g_pending_mutex;
std::vector<std::pair<float*, float>> g_leftover;  // flushed at grid end
std::atomic<long> g_spins{0};
std::atomic<long> g_fence_delays{0};
double g_delay_probability = 0.0;
// Probability that a float atomicAdd first yields to the block's other fibers (the flat forward's checks set
// it): lanes otherwise switch only at barriers, so a missing __syncwarp between reading and rewriting shared
// memory (a lane running ahead into the next window while another still reads this one) would go unseen.
double g_atomic_yield_probability = 0.0;
ScanParams g_params;

void yield_fiber();

// A lane yields to its block's other lanes (g_atomic_yield_probability) before a float atomicAdd, a global
// __ldg or after a __shfl_sync, so that lanes interleave between __syncwarp.
void maybe_yield() {
  BlockRun* r = tl_run;
  if (r != nullptr && g_atomic_yield_probability > 0 &&
      std::uniform_real_distribution<double>(0, 1)(r->rng) < g_atomic_yield_probability) {
    ++r->events;
    yield_fiber();
  }
}
void (*g_kernel)(ScanParams) = nullptr;
// What every fiber runs: the staged kernels' g_kernel(g_params), or an emu::Launch's kernel call.
std::function<void()> g_body;

void yield_fiber() {
  BlockRun* r = tl_run;
  swapcontext(&r->fibers[r->current].ctx, &r->main);
}

// A yield from a wait that found its condition unmet (see BlockRun::events).
void wait_yield() {
  tl_run->waiting = true;
  yield_fiber();
}

[[noreturn]] void warp_fault(const char* what) {
  std::fprintf(stderr, "emulator: %s (block %u,%u,%u thread %u)\n", what, blockIdx.x, blockIdx.y, blockIdx.z,
               threadIdx.x);
  std::fflush(stderr);
  _exit(6);
}

// Warp barriers (kind: kSyncwarp, kShuffleXor) also check that every lane arrived at the same operation after
// the same number of __shfl_sync (a lane that skipped or repeated a warp-wide operation: exit code 6).
constexpr int kBlockBarrier = 0, kSyncwarp = 1, kShuffleXor = 2;
void wait_barrier(Barrier& b, int count, int kind = kBlockBarrier, const WarpShuffles* shuffles = nullptr) {
  const unsigned g = b.generation;
  ++tl_run->events;
  if (b.arrived == 0) b.kind = kind;
  if (b.kind != kind) warp_fault("lanes of a warp at different warp-wide operations (__syncwarp / shuffle)");
  if (++b.arrived == count) {
    if (shuffles != nullptr)
      for (int lane = 1; lane < 32; ++lane)
        if (shuffles->posted[lane] != shuffles->posted[0])
          warp_fault("lanes of a warp reached a __syncwarp after different numbers of __shfl_sync");
    b.arrived = 0;
    ++b.generation;
    return;
  }
  while (b.generation == g) wait_yield();
}

void fiber_entry() {
  g_body();
  tl_run->fibers[tl_run->current].done = true;
  ++tl_run->events;
}

void run_block(uint3 block_index, unsigned threads, size_t shared_bytes, unsigned seed) {
  BlockRun run;
  run.rng.seed(seed);
  tl_run = &run;
  blockIdx = block_index;
  blockDim = dim3(threads);
  run.fibers.resize(threads);
  run.warp_barriers.resize((threads + 31) / 32);
  run.warp_shuffles.resize((threads + 31) / 32);
  run.warp_buf.assign(threads, 0.f);
  // Unwritten shared memory reads as NaN.
  run.shared.assign(shared_bytes, 0xff);
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = run.fibers[t];
    f.stack.resize(kStackBytes);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = &run.main;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  // Round robin; the order inside a round is shuffled per round so no lane order is assumed.
  std::vector<unsigned> order(threads);
  for (unsigned t = 0; t < threads; ++t) order[t] = t;
  for (;;) {
    bool any = false, all_waiting = true;
    const long events = run.events;
    std::shuffle(order.begin(), order.end(), run.rng);
    for (unsigned t : order) {
      if (run.fibers[t].done) continue;
      any = true;
      run.current = static_cast<int>(t);
      threadIdx = {t, 0, 0};
      run.waiting = false;
      swapcontext(&run.main, &run.fibers[t].ctx);
      all_waiting &= run.waiting;
    }
    if (!any) break;
    if (all_waiting && run.events == events) {
      // Every live thread waits for a lane that exited or sits at another warp-wide operation.
      std::fprintf(stderr, "emulator: block %u,%u,%u can never finish: its threads wait at a __syncwarp / shuffle "
                   "for lanes that exited or wait elsewhere\n", block_index.x, block_index.y, block_index.z);
      std::fflush(stderr);
      _exit(6);
    }
  }
  std::lock_guard<std::mutex> g(g_pending_mutex);
  for (auto& f : run.fibers) g_leftover.insert(g_leftover.end(), f.pending.begin(), f.pending.end());
  tl_run = nullptr;
}

}  // namespace

#ifndef EMU_FLAT_ONLY
unsigned char* dermomamba::cuda::staged::staged_shared_memory() { return tl_run->shared.data(); }
#endif

// One static shared array per kernel, at offset 0 of the block's static shared memory, NaN until written.
unsigned char* emu::block_static_shared(size_t bytes, size_t alignment) {
  BlockRun* r = tl_run;
  auto& memory = r->static_shared;
  if (memory.empty()) {
    memory.assign(bytes + alignment, 0xff);
    const auto base = reinterpret_cast<uintptr_t>(memory.data());
    r->static_shared_offset = (alignment - base % alignment) % alignment;
    r->static_shared_bytes = bytes;
  }
  if (r->static_shared_bytes != bytes) {
    std::fprintf(stderr, "emulator: more than one static __shared__ array in a kernel (%zu and %zu bytes)\n",
                 r->static_shared_bytes, bytes);
    std::fflush(stderr);
    _exit(5);
  }
  return memory.data() + r->static_shared_offset;
}

float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
  if (mask != 0xffffffffu) std::abort();
  BlockRun* r = tl_run;
  const int t = r->current, warp = t / 32, lane = t % 32;
  r->warp_buf[t] = v;
  wait_barrier(r->warp_barriers[warp], 32, kShuffleXor);
  const float out = r->warp_buf[warp * 32 + (lane ^ lane_mask)];
  wait_barrier(r->warp_barriers[warp], 32, kShuffleXor);
  return out;
}
float __shfl_up_sync(unsigned, float, unsigned) { std::abort(); }
float __shfl_down_sync(unsigned, float, unsigned) { std::abort(); }
unsigned long long emu::shfl_bits(unsigned mask, unsigned long long bits, int src, int tag) {
  if (mask != 0xffffffffu) warp_fault("__shfl_sync with a partial mask (the emulator takes full warps only)");
  if (src < 0 || src >= 32) warp_fault("__shfl_sync source lane out of 0..31");
  BlockRun* r = tl_run;
  const int t = r->current, lane = t % 32;
  WarpShuffles& w = r->warp_shuffles[t / 32];
  const long n = w.posted[lane];
  // The ring slot of post n - kShuffleRing is free once every lane has read that post.
  for (;;) {
    bool free = true;
    for (int m = 0; m < 32; ++m) free &= w.consumed[m] > n - kShuffleRing;
    if (free) break;
    wait_yield();
  }
  w.ring[lane][n % kShuffleRing] = {bits, tag};
  w.posted[lane] = n + 1;
  ++r->events;
  while (w.posted[src] <= n) wait_yield();
  const ShufflePost post = w.ring[src][n % kShuffleRing];
  if (post.tag != tag) warp_fault("lanes of a warp at different __shfl_sync (value types differ)");
  w.consumed[lane] = n + 1;
  ++r->events;
  // Sometimes let the other lanes run first: a shuffle does not hold the warp together.
  maybe_yield();
  return post.bits;
}
void __syncwarp(unsigned mask) {
  if (mask != 0xffffffffu) warp_fault("__syncwarp with a partial mask (the emulator takes full warps only)");
  BlockRun* r = tl_run;
  wait_barrier(r->warp_barriers[r->current / 32], 32, kSyncwarp, &r->warp_shuffles[r->current / 32]);
}
void __syncthreads() { wait_barrier(tl_run->block_barrier, static_cast<int>(blockDim.x)); }
float atomicAdd(float* a, float v) {
  maybe_yield();
  std::lock_guard<std::mutex> g(g_atomic_mutex);
  const float old = *a;
  *a = old + v;
  return old;
}
int atomicAdd(int* a, int v) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); }
int atomicExch(int* a, int v) { return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST); }
void __threadfence() {
  BlockRun* r = tl_run;
  // Sometimes stall before the fence, so that readers find the flag unset and wait.
  if (g_delay_probability > 0 && std::uniform_real_distribution<double>(0, 1)(r->rng) < g_delay_probability) {
    ++g_fence_delays;
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  auto& pending = r->fibers[r->current].pending;
  for (auto& [address, value] : pending) __atomic_store(address, &value, __ATOMIC_SEQ_CST);
  pending.clear();
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
}
void __nanosleep(unsigned) {
  BlockRun* r = tl_run;
  if (r->spins++ == 0) r->first_spin = std::chrono::steady_clock::now();
  ++g_spins;
  if (std::chrono::steady_clock::now() - r->first_spin > std::chrono::seconds(20)) {
    std::fprintf(stderr, "emulator: look-back deadlock (block %u waited %ld times in 20 s)\n", blockIdx.x, r->spins);
    std::fflush(stderr);
    _exit(3);
  }
  std::this_thread::sleep_for(std::chrono::microseconds(5));
  yield_fiber();
}
float __ldcg(const float* a) {
  float v;
  __atomic_load(a, &v, __ATOMIC_SEQ_CST);
  return v;
}
void __stcg(float* a, float v) { tl_run->fibers[tl_run->current].pending.emplace_back(a, v); }

namespace {
void check_vector_alignment(const void* a, const char* what) {
  if (reinterpret_cast<uintptr_t>(a) % 16 != 0) {
    std::fprintf(stderr, "emulator: misaligned 16-byte %s at %p (block %u,%u,%u thread %u)\n", what, a, blockIdx.x,
                 blockIdx.y, blockIdx.z, threadIdx.x);
    std::fflush(stderr);
    _exit(4);
  }
}
}  // namespace

float4 __ldcg(const float4* a) {
  check_vector_alignment(a, "__ldcg");
  const float* f = reinterpret_cast<const float*>(a);
  return make_float4(__ldcg(f), __ldcg(f + 1), __ldcg(f + 2), __ldcg(f + 3));
}
void __stcg(float4* a, float4 v) {
  check_vector_alignment(a, "__stcg");
  float* f = reinterpret_cast<float*>(a);
  __stcg(f, v.x);
  __stcg(f + 1, v.y);
  __stcg(f + 2, v.z);
  __stcg(f + 3, v.w);
}
float __ldg(const float* a) {
  maybe_yield();
  return *a;
}
float4 __ldg(const float4* a) {
  maybe_yield();
  check_vector_alignment(a, "__ldg");
  float4 v;
  std::memcpy(&v, a, sizeof v);
  return v;
}
uint4 __ldg(const uint4* a) {
  maybe_yield();
  check_vector_alignment(a, "__ldg");
  uint4 v;
  std::memcpy(&v, a, sizeof v);
  return v;
}

#ifndef EMU_FLAT_ONLY
namespace st = dermomamba::cuda::staged;
namespace rg = dermomamba::cuda::regs;

// EMU_FWD_KERNEL / EMU_BWD_KERNEL = "regs" runs the v5 kernels (scan_regs_*_kernels.cuh) in place of the
// staged (v4) ones; the check scripts stay the same.
bool use_regs(const char* variable) {
  const char* v = std::getenv(variable);
  return v != nullptr && std::strcmp(v, "regs") == 0;
}
st::StagedLayout forward_layout(int dim, int dstate, int chunk, int chunks) {
  return use_regs("EMU_FWD_KERNEL") ? rg::regs_fwd_layout(dim, dstate, chunk, chunks)
                                    : st::staged_layout(dim, dstate, chunk, chunks);
}
// The staged backward's variant comes from DERMOMAMBA_STAGED_BWD_VARIANT, as in the host glue and the
// launcher (staged_bwd_layout_selected; an unknown name: the layout is refused).
st::StagedLayout backward_layout(int dim, int dstate, int chunk, int chunks) {
  return use_regs("EMU_BWD_KERNEL") ? rg::regs_bwd_layout(dim, dstate, chunk, chunks)
                                    : st::staged_bwd_layout_selected(dim, dstate, chunk, chunks);
}

#endif  // EMU_FLAT_ONLY

// A grid of (x, y, z) blocks of `threads` threads running g_body: `concurrent` OS threads take the blocks in a
// shuffled order, each after a random delay; stores still pending at the end are flushed (the end of a launch).
void run_blocks(dim3 grid, unsigned threads, size_t shared_bytes, int concurrent_in, int seed, int delay_permille) {
  g_delay_probability = delay_permille / 1000.0;
  g_leftover.clear();
  const unsigned blocks = grid.x * grid.y * grid.z;
  std::mt19937 rng(seed);
  std::vector<unsigned> order(blocks);
  for (unsigned b = 0; b < blocks; ++b) order[b] = b;
  std::shuffle(order.begin(), order.end(), rng);
  std::atomic<unsigned> next{0};
  const int concurrent = std::max(1, concurrent_in);
  std::vector<std::thread> runners;
  for (int c = 0; c < concurrent; ++c)
    runners.emplace_back([&, c] {
      gridDim = grid;
      std::mt19937 local(seed * 7919u + c);
      for (;;) {
        const unsigned i = next++;
        if (i >= blocks) break;
        std::this_thread::sleep_for(std::chrono::microseconds(local() % 300));
        const unsigned b = order[i];
        run_block({b % grid.x, b / grid.x % grid.y, b / (grid.x * grid.y)}, threads, shared_bytes, local());
      }
    });
  for (auto& t : runners) t.join();
  for (auto& [address, value] : g_leftover) *address = value;
}

#ifndef EMU_FLAT_ONLY
// Runs the grid of g_kernel (the staged and regs kernels, launched by transcribed host logic).
void run_grid(const ScanParams& p, unsigned blocks, const st::StagedLayout& l, int concurrent_in, int seed,
              int delay_permille) {
  g_params = p;
  g_spins = 0;
  g_fence_delays = 0;
  g_body = [] { g_kernel(g_params); };
  run_blocks(dim3(blocks), l.threads, l.shared_bytes, concurrent_in, seed, delay_permille);
}

// selective_scan_cuda.cpp's setup_staged and scan_forward_multiaxial_staged, transcribed, with the
// The multiaxial forward's ScanParams as the host's multiaxial_params / set_bc / set_fp32_params fill them, from
// the Python side's cfg (batch, dim, H, W, N, chunk, softplus, bc_kind, u_kind, delta_kind, ...) and strides.
static ScanParams forward_params(const int* cfg, const void* x, const int64_t* xs, const void* delta,
                                 const int64_t* ds, const void* B, const int64_t* bs, const void* C,
                                 const int64_t* cs, const float* A, const float* D, const float* bias, float* y,
                                 float* chunk_states) {
  ScanParams p{};
  p.batch = cfg[0]; p.dim = cfg[1]; p.height = cfg[2]; p.width = cfg[3]; p.dstate = cfg[4];
  p.num_directions = 4; p.num_seqs = 4 * p.dim; p.length = p.height * p.width;
  p.channels_per_group = p.dim; p.num_bc_groups = 4;
  const int chunk = cfg[5];
  p.chunk_size = std::min(chunk, p.length);
  p.num_chunks = (p.length + chunk - 1) / chunk;
  p.delta_softplus = cfg[6] != 0;
  p.u = x; p.u_kind = cfg[8];
  p.u_batch_stride = xs[0]; p.u_dim_stride = xs[1]; p.u_h_stride = xs[2]; p.u_w_stride = xs[3];
  p.delta = delta; p.delta_kind = cfg[9];
  p.delta_batch_stride = ds[0]; p.delta_dir_stride = ds[1]; p.delta_dim_stride = ds[2];
  p.delta_h_stride = ds[3]; p.delta_w_stride = ds[4];
  p.B = B; p.B_batch_stride = bs[0]; p.B_group_stride = bs[1]; p.B_state_stride = bs[2];
  p.B_h_stride = bs[3]; p.B_w_stride = bs[4];
  p.C = C; p.C_batch_stride = cs[0]; p.C_group_stride = cs[1]; p.C_state_stride = cs[2];
  p.C_h_stride = cs[3]; p.C_w_stride = cs[4];
  p.A = A; p.D = D; p.delta_bias = bias;
  p.out = y; p.chunk_states = chunk_states;
  return p;
}

// launch replaced by `concurrent` OS threads running the blocks in a shuffled order.
extern "C" int staged_forward(const int* cfg, const void* x, const int64_t* xs, const void* delta, const int64_t* ds,
                              const void* B, const int64_t* bs, const void* C, const int64_t* cs, const float* A,
                              const float* D, const float* bias, float* y, float* chunk_states, long* stats) {
  // cfg: batch, dim, H, W, N, chunk, softplus, bc_kind, u_kind, delta_kind, concurrent, seed, delay_permille
  ScanParams p = forward_params(cfg, x, xs, delta, ds, B, bs, C, cs, A, D, bias, y, chunk_states);
  const st::StagedLayout l = forward_layout(p.dim, p.dstate, p.chunk_size, p.num_chunks);
  if (!l.ok) return -1;
  p.chunks_per_split = l.chunks_per_tile;
  p.num_splits = l.num_tiles;
  const int64_t flags = int64_t(p.batch) * p.num_directions * l.channel_blocks * l.num_tiles;
  std::vector<int> lookback(1 + flags, 0);
  p.tile_ticket = lookback.data();
  p.tile_flags = lookback.data() + 1;
  std::vector<float> decay, state;
  if (p.num_splits > 1) {
    decay.assign(size_t(p.batch) * p.num_seqs * p.num_splits * p.dstate, NAN);
    state = decay;
    p.split_decay = decay.data();
    p.split_state = state.data();
  }
  switch (cfg[7]) {
    case 0: g_kernel = l.group == 16 ? st::scan_staged_fwd<float, dermomamba::cuda::lane::LaneShape<16, 1>>
                                     : st::scan_staged_fwd<float, dermomamba::cuda::lane::LaneShape<32, 1>>; break;
    case 1: g_kernel = l.group == 16 ? st::scan_staged_fwd<__half, dermomamba::cuda::lane::LaneShape<16, 1>>
                                     : st::scan_staged_fwd<__half, dermomamba::cuda::lane::LaneShape<32, 1>>; break;
    default: g_kernel = l.group == 16 ? st::scan_staged_fwd<__nv_bfloat16, dermomamba::cuda::lane::LaneShape<16, 1>>
                                      : st::scan_staged_fwd<__nv_bfloat16, dermomamba::cuda::lane::LaneShape<32, 1>>;
  }
  if (use_regs("EMU_FWD_KERNEL")) {
    g_kernel = cfg[7] == 0 ? rg::regs_fwd_kernel<float>(l)
             : cfg[7] == 1 ? rg::regs_fwd_kernel<__half>(l) : rg::regs_fwd_kernel<__nv_bfloat16>(l);
    if (g_kernel == nullptr) return -2;
  }
  const unsigned blocks = static_cast<unsigned>(flags);
  run_grid(p, blocks, l, cfg[10], cfg[11], cfg[12]);
  stats[0] = blocks;
  stats[1] = g_spins;
  stats[2] = g_fence_delays;
  stats[3] = l.num_tiles;
  stats[4] = l.threads;
  stats[5] = l.shared_bytes;
  stats[6] = l.channel_blocks;
  stats[7] = l.chunks_per_tile;
  return 0;
}

// selective_scan_cuda.cpp's multiaxial_scan_bwd_cuda (staged branch) and scan_backward_multiaxial_staged,
// transcribed; the caller (check_bwd.py) allocates the outputs as the host does (dx zeroed for atomics
// or per-direction planes, dB / dC per grad_bc_mode, partials) and finishes the reductions.
extern "C" int staged_backward(const int* cfg, const void* x, const int64_t* xs, const void* delta, const int64_t* ds,
                               const void* B, const int64_t* bs, const void* C, const int64_t* cs, const float* A,
                               const float* D, const float* bias, const void* dy, const int64_t* dys,
                               float* chunk_states, float* dx_accum, float* dx_per_direction, void* ddelta, void* dB,
                               void* dC, float* dA_partial, float* dD_partial, float* dbias_partial, long* stats) {
  // cfg: batch, dim, H, W, N, chunk, softplus, bc_kind, u_kind, delta_kind, concurrent, seed, delay_permille,
  //      dy_kind, grad_bc_mode
  ScanParams p{};
  p.batch = cfg[0]; p.dim = cfg[1]; p.height = cfg[2]; p.width = cfg[3]; p.dstate = cfg[4];
  p.num_directions = 4; p.num_seqs = 4 * p.dim; p.length = p.height * p.width;
  p.channels_per_group = p.dim; p.num_bc_groups = 4;
  const int chunk = cfg[5];
  p.chunk_size = std::min(chunk, p.length);
  p.num_chunks = (p.length + chunk - 1) / chunk;
  p.delta_softplus = cfg[6] != 0;
  p.u = x; p.u_kind = cfg[8];
  p.u_batch_stride = xs[0]; p.u_dim_stride = xs[1]; p.u_h_stride = xs[2]; p.u_w_stride = xs[3];
  p.delta = delta; p.delta_kind = cfg[9];
  p.delta_batch_stride = ds[0]; p.delta_dir_stride = ds[1]; p.delta_dim_stride = ds[2];
  p.delta_h_stride = ds[3]; p.delta_w_stride = ds[4];
  p.B = B; p.B_batch_stride = bs[0]; p.B_group_stride = bs[1]; p.B_state_stride = bs[2];
  p.B_h_stride = bs[3]; p.B_w_stride = bs[4];
  p.C = C; p.C_batch_stride = cs[0]; p.C_group_stride = cs[1]; p.C_state_stride = cs[2];
  p.C_h_stride = cs[3]; p.C_w_stride = cs[4];
  p.A = A; p.D = D; p.delta_bias = bias;
  p.dout = dy; p.dout_kind = cfg[13];
  p.dout_batch_stride = dys[0]; p.dout_dim_stride = dys[1]; p.dout_h_stride = dys[2]; p.dout_w_stride = dys[3];
  p.chunk_states = chunk_states;
  p.dx_accum = dx_accum; p.dx_per_direction = dx_per_direction;
  p.ddelta = ddelta; p.dB = dB; p.dC = dC; p.grad_bc_mode = cfg[14];
  p.dA_partial = dA_partial; p.dD_partial = dD_partial; p.ddelta_bias_partial = dbias_partial;
  const st::StagedLayout l = backward_layout(p.dim, p.dstate, p.chunk_size, p.num_chunks);
  if (!l.ok) return -1;
  p.chunks_per_split = l.chunks_per_tile;
  p.num_splits = l.num_tiles;
  const int64_t flags = int64_t(p.batch) * p.num_directions * l.channel_blocks * l.num_tiles;
  std::vector<int> lookback(1 + flags, 0);
  p.tile_ticket = lookback.data();
  p.tile_flags = lookback.data() + 1;
  std::vector<float> decay, state, carry;
  if (p.num_splits > 1) {
    decay.assign(size_t(p.batch) * p.num_seqs * p.num_splits * p.dstate, NAN);
    state = decay;
    carry = decay;
    p.split_decay = decay.data();
    p.split_state = state.data();
    p.reverse_carry = carry.data();
  }
  using dermomamba::cuda::lane::LaneShape;
  switch (cfg[7]) {
    case 0: g_kernel = l.group == 16 ? st::scan_staged_bwd<float, LaneShape<16, 1>>
                                     : st::scan_staged_bwd<float, LaneShape<32, 1>>; break;
    case 1: g_kernel = l.group == 16 ? st::scan_staged_bwd<__half, LaneShape<16, 1>>
                                     : st::scan_staged_bwd<__half, LaneShape<32, 1>>; break;
    default: g_kernel = l.group == 16 ? st::scan_staged_bwd<__nv_bfloat16, LaneShape<16, 1>>
                                      : st::scan_staged_bwd<__nv_bfloat16, LaneShape<32, 1>>;
  }
  // The lean variants, as launch_backward_staged picks them (16-lane groups only).
  if (l.bwd_variant == 1 || l.bwd_variant == 2) {
    if (l.group != 16) return -2;
    g_kernel = l.bwd_variant == 1 ? (cfg[7] == 0   ? st::scan_staged_bwd_lean<float, 1>
                                     : cfg[7] == 1 ? st::scan_staged_bwd_lean<__half, 1>
                                                   : st::scan_staged_bwd_lean<__nv_bfloat16, 1>)
                                  : (cfg[7] == 0   ? st::scan_staged_bwd_lean<float, 2>
                                     : cfg[7] == 1 ? st::scan_staged_bwd_lean<__half, 2>
                                                   : st::scan_staged_bwd_lean<__nv_bfloat16, 2>);
  }
  if (use_regs("EMU_BWD_KERNEL")) {
    g_kernel = cfg[7] == 0 ? rg::regs_bwd_kernel<float>(l)
             : cfg[7] == 1 ? rg::regs_bwd_kernel<__half>(l) : rg::regs_bwd_kernel<__nv_bfloat16>(l);
    if (g_kernel == nullptr) return -2;
  }
  const unsigned blocks = static_cast<unsigned>(flags);
  run_grid(p, blocks, l, cfg[10], cfg[11], cfg[12]);
  stats[0] = blocks;
  stats[1] = g_spins;
  stats[2] = g_fence_delays;
  stats[3] = l.num_tiles;
  stats[4] = l.threads;
  stats[5] = l.shared_bytes;
  stats[6] = l.channel_blocks;
  stats[7] = l.chunks_per_tile;
  stats[8] = l.bwd_variant;
  return 0;
}

extern "C" int staged_bwd_channel_blocks(int dim, int dstate, int chunk_size, int num_chunks) {
  const st::StagedLayout l = backward_layout(dim, dstate, chunk_size, num_chunks);
  return l.ok ? l.channel_blocks : -1;
}

#endif  // EMU_FLAT_ONLY

// ---- Launches from the kernels' own launchers (make_host_copy.py --launchers) ----

namespace {
// Schedule of the next emu::Launch (set by the entry point that calls a launcher); each launch takes the next
// seed, so the launches of one forward run in different block orders.
int g_launch_concurrent = 8, g_launch_seed = 1, g_launch_delay_permille = 0;
cudaError_t g_last_error = cudaSuccess;
// (grid.x, grid.y, grid.z, block.x) of each launch since the entry point started, for the caller's stats.
std::vector<std::array<unsigned, 4>> g_launches;
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr unsigned kMaxGridYZ = 65535;
}  // namespace

emu::Launch::Launch(dim3 g, dim3 b, size_t dynamic_shared, cudaStream_t) : grid(g), block(b) {
  // Dynamic shared memory: only the staged kernels use it, through their own path (run_grid).
  if (dynamic_shared != 0) g_last_error = cudaErrorInvalidConfiguration;
}

void emu::Launch::run(const std::function<void()>& body) const {
  // The GPU refuses these configurations at launch (cudaGetLastError); one-dimensional blocks only here.
  if (block.x == 0 || block.x > kMaxThreadsPerBlock || block.y != 1 || block.z != 1 || grid.x == 0 || grid.y == 0 ||
      grid.z == 0 || grid.y > kMaxGridYZ || grid.z > kMaxGridYZ) {
    g_last_error = cudaErrorInvalidConfiguration;
    return;
  }
  g_launches.push_back({grid.x, grid.y, grid.z, block.x});
  g_body = body;
  run_blocks(grid, block.x, 0, g_launch_concurrent, g_launch_seed++, g_launch_delay_permille);
  g_body = nullptr;
}

cudaError_t cudaGetLastError() {
  const cudaError_t e = g_last_error;
  g_last_error = cudaSuccess;
  return e;
}

// selective_scan_cuda.cpp's multiaxial_scan_fwd_cuda (flat branch) up to the launch, transcribed (set_common,
// set_bc, set_fp32_params: D and delta_bias may be null, as the kernel allows); then the real
// scan_forward_multiaxial_flat<bc_t> (its checks, vector-path choice and three launches) on emulated grids.
// The caller allocates y (zeroed, as the host does) and chunk_states; the segment scratch is allocated here
// NaN-poisoned (the host's at::empty) inside guard zones that must stay untouched.
extern "C" int flat_forward(const int* cfg, const void* x, const int64_t* xs, const void* delta, const int64_t* ds,
                            const void* B, const int64_t* bs, const void* C, const int64_t* cs, const float* A,
                            const float* D, const float* bias, float* y, float* chunk_states, long* stats) {
  // cfg: batch, dim, H, W, N, chunk, softplus, bc_kind, u_kind, delta_kind, concurrent, seed, delay_permille,
  //      atomic_yield_permille
  ScanParams p = forward_params(cfg, x, xs, delta, ds, B, bs, C, cs, A, D, bias, y, chunk_states);
  p.num_splits = 1;
  g_atomic_yield_probability = cfg[13] / 1000.0;
  namespace flat = dermomamba::cuda::flat;
  const int64_t slots = flat::max_segments(p.height, p.width);
  const size_t state_count = size_t(p.batch) * p.num_seqs * slots * flat::kStates;
  const size_t sum_count = size_t(p.batch) * p.num_seqs * slots;
  // Guard zones of a sentinel around each scratch buffer (16-byte multiples: the rows stay aligned).
  constexpr size_t kGuard = 64;
  constexpr float kSentinel = 1234.5f;
  std::vector<float> state_buf(state_count + 2 * kGuard, kSentinel), sum_buf(sum_count + 2 * kGuard, kSentinel);
  std::fill(state_buf.begin() + kGuard, state_buf.end() - kGuard, NAN);
  std::fill(sum_buf.begin() + kGuard, sum_buf.end() - kGuard, NAN);
  // std::vector<float> storage is 16-byte aligned with glibc's allocator (malloc aligns to 16).
  p.split_state = state_buf.data() + kGuard;
  p.split_decay = sum_buf.data() + kGuard;
  g_launch_concurrent = cfg[10];
  g_launch_seed = cfg[11];
  g_launch_delay_permille = cfg[12];
  g_launches.clear();
  g_last_error = cudaSuccess;
  g_spins = 0;
  g_fence_delays = 0;
  int rc = 0;
  bool vector = false;
  switch (cfg[7]) {
    case 0:
      vector = dermomamba::cuda::flat_vector_bc<float>(p);
      rc = dermomamba::cuda::scan_forward_multiaxial_flat<float>(p, nullptr);
      break;
    case 1:
      vector = dermomamba::cuda::flat_vector_bc<__half>(p);
      rc = dermomamba::cuda::scan_forward_multiaxial_flat<__half>(p, nullptr);
      break;
    default:
      vector = dermomamba::cuda::flat_vector_bc<__nv_bfloat16>(p);
      rc = dermomamba::cuda::scan_forward_multiaxial_flat<__nv_bfloat16>(p, nullptr);
  }
  bool guards_intact = true;
  for (size_t i = 0; i < kGuard; ++i)
    guards_intact &= state_buf[i] == kSentinel && state_buf[state_buf.size() - 1 - i] == kSentinel &&
                     sum_buf[i] == kSentinel && sum_buf[sum_buf.size() - 1 - i] == kSentinel;
  // stats: kVector, launches, then (grid.x, grid.y, grid.z, block.x) of up to three launches, scratch guards
  // intact, segment slots
  stats[0] = vector;
  stats[1] = static_cast<long>(g_launches.size());
  for (size_t i = 0; i < 3; ++i)
    for (int j = 0; j < 4; ++j) stats[2 + 4 * i + j] = i < g_launches.size() ? g_launches[i][j] : 0;
  stats[14] = guards_intact;
  stats[15] = slots;
  g_atomic_yield_probability = 0;
  return rc;
}
