// CPU kernels of the selective scans (torch.ops.dermomamba.{selective_scan,multiaxial_scan}_{fwd,bwd}).
//
// One engine serves both ops. A scan reads its inputs as [batch][direction or group][channel][h][w]
// with arbitrary element strides; the 1-D scan is the case of one direction over an (L, 1) plane,
// the multiaxial (SS2D) scan has four directions over (H, W) whose visiting orders come from index
// arithmetic (no permuted copies). All arithmetic is fp32 whatever the input dtype.
//
// Work split: one work item = (batch, direction-group, slice of the group's channels). An item walks
// the sequence chunk by chunk; per chunk it loads B and C once into fp32 (chunk, N) rows shared by
// all of its channels, then runs each channel's recurrence with the loop over the N state entries
// innermost (vectorised: exp_approx has no calls or branches). The backward walks the chunks in
// reverse, recomputes one chunk's states from chunk_states into a (chunk, N) buffer and walks it
// backwards, so memory stays O(chunk * N) per item, never O(L * N).
//
// Determinism: every sum has a fixed order that depends only on the shapes (channels of a slice in
// order, slices and batches summed in index order afterwards), never on the thread count, and no
// atomics are used; the backward is bit-reproducible whatever `deterministic` says.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/scan_math_cpu.h"

namespace dermomamba {
namespace {

using cpu_math::exp_approx;
using cpu_math::sigmoid;
using cpu_math::softplus;

constexpr int64_t kMultiaxialDirections = 4;
// The state size of every Mamba model in practice; a compile-time N lets the compiler fully unroll
// the state loop into whole vectors.
constexpr int64_t kCommonStateSize = 16;
// The backward splits a group's channels into slices until there are at least this many work items.
// It depends on the shapes only (not on the thread count) so that the order of the dB / dC sums,
// hence every bit of the result, is the same on every machine.
constexpr int64_t kMinBackwardWorkItems = 4;
// The forward has no cross-channel sums, so its split may follow the thread count freely.
constexpr int64_t kForwardWorkItemsPerThread = 4;

// A tensor read as [batch][outer][channel][h][w] by element strides (outer = direction or group;
// channel = the state index n for B and C). Unused axes have stride 0.
struct StridedView {
  void* data = nullptr;
  at::ScalarType dtype = at::kFloat;
  int64_t batch = 0, outer = 0, channel = 0, h = 0, w = 0;

  bool defined() const { return data != nullptr; }
  int64_t base(int64_t b, int64_t o, int64_t c) const { return b * batch + o * outer + c * channel; }
};

StridedView view_of(const at::Tensor& t, int64_t batch, int64_t outer, int64_t channel, int64_t h, int64_t w) {
  StridedView v;
  v.data = t.data_ptr();
  v.dtype = t.scalar_type();
  v.batch = batch;
  v.outer = outer;
  v.channel = channel;
  v.h = h;
  v.w = w;
  return v;
}

// ---- gathers and scatters between strided tensors of any float dtype and fp32 chunk buffers ----

// Sequence gathers and scatters take per-position element offsets (see chunk_offsets), computed once
// per chunk and shared by all channels of a work item.
template <typename T>
void gather_seq_typed(const StridedView& v, int64_t base, const int64_t* offsets, int64_t count, float* dst) {
  const T* src = static_cast<const T*>(v.data) + base;
  for (int64_t t = 0; t < count; ++t) dst[t] = static_cast<float>(src[offsets[t]]);
}

void gather_seq(const StridedView& v, int64_t base, const int64_t* offsets, int64_t count, float* dst) {
  switch (v.dtype) {
    case at::kFloat: return gather_seq_typed<float>(v, base, offsets, count, dst);
    case at::kHalf: return gather_seq_typed<c10::Half>(v, base, offsets, count, dst);
    case at::kBFloat16: return gather_seq_typed<c10::BFloat16>(v, base, offsets, count, dst);
    default: TORCH_CHECK(false, "dermomamba scan: unsupported dtype ", v.dtype);
  }
}

template <typename T>
void scatter_seq_typed(const StridedView& v, int64_t base, const int64_t* offsets, int64_t count, const float* src) {
  T* dst = static_cast<T*>(v.data) + base;
  for (int64_t t = 0; t < count; ++t) dst[offsets[t]] = static_cast<T>(src[t]);
}

void scatter_seq(const StridedView& v, int64_t base, const int64_t* offsets, int64_t count, const float* src) {
  switch (v.dtype) {
    case at::kFloat: return scatter_seq_typed<float>(v, base, offsets, count, src);
    case at::kHalf: return scatter_seq_typed<c10::Half>(v, base, offsets, count, src);
    case at::kBFloat16: return scatter_seq_typed<c10::BFloat16>(v, base, offsets, count, src);
    default: TORCH_CHECK(false, "dermomamba scan: unsupported dtype ", v.dtype);
  }
}

// rows[t * N + n] = v[base + n * v.channel + position t]
template <typename T>
void gather_rows_typed(const StridedView& v, int64_t base, const int64_t* hh, const int64_t* ww, int64_t count,
                       int64_t N, float* rows) {
  const T* src = static_cast<const T*>(v.data) + base;
  if (v.channel == 1) {  // position-major source: one contiguous row per position
    for (int64_t t = 0; t < count; ++t) {
      const T* at_t = src + hh[t] * v.h + ww[t] * v.w;
      float* row = rows + t * N;
      for (int64_t n = 0; n < N; ++n) row[n] = static_cast<float>(at_t[n]);
    }
    return;
  }
  // state-major source: walk each state plane along the positions (sequential for row-major orders)
  for (int64_t n = 0; n < N; ++n) {
    const T* plane = src + n * v.channel;
    for (int64_t t = 0; t < count; ++t) rows[t * N + n] = static_cast<float>(plane[hh[t] * v.h + ww[t] * v.w]);
  }
}

void gather_rows(const StridedView& v, int64_t base, const int64_t* hh, const int64_t* ww, int64_t count,
                 int64_t N, float* rows) {
  switch (v.dtype) {
    case at::kFloat: return gather_rows_typed<float>(v, base, hh, ww, count, N, rows);
    case at::kHalf: return gather_rows_typed<c10::Half>(v, base, hh, ww, count, N, rows);
    case at::kBFloat16: return gather_rows_typed<c10::BFloat16>(v, base, hh, ww, count, N, rows);
    default: TORCH_CHECK(false, "dermomamba scan: unsupported dtype ", v.dtype);
  }
}

template <typename T>
void scatter_rows_typed(const StridedView& v, int64_t base, const int64_t* hh, const int64_t* ww, int64_t count,
                        int64_t N, const float* rows) {
  T* dst = static_cast<T*>(v.data) + base;
  // The outputs are state-major (contiguous (.., N, H, W)): write each state plane along the positions.
  for (int64_t n = 0; n < N; ++n) {
    T* plane = dst + n * v.channel;
    for (int64_t t = 0; t < count; ++t) plane[hh[t] * v.h + ww[t] * v.w] = static_cast<T>(rows[t * N + n]);
  }
}

void scatter_rows(const StridedView& v, int64_t base, const int64_t* hh, const int64_t* ww, int64_t count,
                  int64_t N, const float* rows) {
  switch (v.dtype) {
    case at::kFloat: return scatter_rows_typed<float>(v, base, hh, ww, count, N, rows);
    case at::kHalf: return scatter_rows_typed<c10::Half>(v, base, hh, ww, count, N, rows);
    case at::kBFloat16: return scatter_rows_typed<c10::BFloat16>(v, base, hh, ww, count, N, rows);
    default: TORCH_CHECK(false, "dermomamba scan: unsupported dtype ", v.dtype);
  }
}

// Plane coordinates of scan steps t0 .. t0+count-1 of a direction: 0 row-major (h outer, w inner),
// 1 column-major (w outer, h inner), 2 and 3 those two reversed. The 1-D scan is direction 0 over
// an (L, 1) plane.
void chunk_positions(int64_t direction, int64_t t0, int64_t count, int64_t height, int64_t width, int64_t* hh,
                     int64_t* ww) {
  const int64_t length = height * width;
  const bool reversed = direction >= 2;
  const bool column_major = direction % 2 == 1;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t step = reversed ? length - 1 - (t0 + i) : t0 + i;
    if (column_major) {
      ww[i] = step / height;
      hh[i] = step % height;
    } else {
      hh[i] = step / width;
      ww[i] = step % width;
    }
  }
}

// Everything one scan call needs, shared read-only by all work items.
struct ScanArgs {
  int64_t batch = 0, directions = 1, dim = 0, dstate = 0, height = 0, width = 0, length = 0;
  int64_t groups_per_direction = 1, chunk_size = 0, num_chunks = 0, slices = 1, channels_per_slice = 0;
  bool delta_softplus = false;

  StridedView x;      // [b][-][d][h][w]   u of the 1-D scan, x of the multiaxial scan
  StridedView delta;  // [b][k][d][h][w]
  StridedView B, C;   // [b][k * groups + g][n][h][w]
  StridedView z;      // [b][-][d][h][w]   1-D scan only; undefined when absent
  const float* A = nullptr;           // (directions * dim, N) contiguous
  const float* D = nullptr;           // (directions * dim,) or null
  const float* delta_bias = nullptr;  // (directions * dim,) or null

  // forward
  StridedView out;                // [b][k][d][h][w]
  float* chunk_states = nullptr;  // (batch, directions * dim, num_chunks, N)
  float* last_state = nullptr;    // (batch, directions * dim, N) or null

  // backward
  StridedView dout;                 // [b][-][d][h][w]
  StridedView du, ddelta, dz;       // like x (per direction for the multiaxial scan), delta, z
  StridedView dB, dC;               // like B, C; used when slices == 1
  float* dB_partial = nullptr;      // (batch, groups_total, slices, length, N) when slices > 1
  float* dC_partial = nullptr;
  float* dA_partial = nullptr;      // (batch, directions * dim, N)
  float* dD_partial = nullptr;      // (batch, directions * dim)
  float* dbias_partial = nullptr;   // (batch, directions * dim)

  int64_t groups_total() const { return directions * groups_per_direction; }
  int64_t num_items() const { return batch * groups_total() * slices; }
};

// The per-position sequence tensors of a scan, each with its own (h, w) strides.
enum SeqTensor { kSeqX, kSeqDelta, kSeqZ, kSeqOut, kSeqDout, kSeqDu, kSeqDdelta, kSeqDz, kNumSeqTensors };

const StridedView& seq_view(const ScanArgs& a, int which) {
  switch (which) {
    case kSeqX: return a.x;
    case kSeqDelta: return a.delta;
    case kSeqZ: return a.z;
    case kSeqOut: return a.out;
    case kSeqDout: return a.dout;
    case kSeqDu: return a.du;
    case kSeqDdelta: return a.ddelta;
    default: return a.dz;
  }
}

// offsets[which * chunk_size + t] = element offset of step t in that tensor's (h, w) plane.
void chunk_offsets(const ScanArgs& a, const int64_t* hh, const int64_t* ww, int64_t count, int64_t* offsets) {
  for (int which = 0; which < kNumSeqTensors; ++which) {
    const StridedView& v = seq_view(a, which);
    if (!v.defined()) continue;
    int64_t* off = offsets + which * a.chunk_size;
    for (int64_t t = 0; t < count; ++t) off[t] = hh[t] * v.h + ww[t] * v.w;
  }
}

struct ItemRange {
  int64_t b, direction, group_total, d_begin, d_end;
};

ItemRange item_range(const ScanArgs& a, int64_t item) {
  ItemRange r;
  const int64_t slice = item % a.slices;
  r.group_total = (item / a.slices) % a.groups_total();
  r.b = item / (a.slices * a.groups_total());
  r.direction = r.group_total / a.groups_per_direction;
  const int64_t channels_per_group = a.dim / a.groups_per_direction;
  const int64_t group_begin = (r.group_total % a.groups_per_direction) * channels_per_group;
  r.d_begin = group_begin + slice * a.channels_per_slice;
  r.d_end = std::min(group_begin + channels_per_group, r.d_begin + a.channels_per_slice);
  return r;
}

// Per-thread scratch, sized once per parallel range.
struct Workspace {
  std::vector<int64_t> hh, ww, offsets;
  std::vector<float> B_rows, C_rows, u, delta_in, dt, dtu, y, dy, zbuf, du, ddelta, dz;
  std::vector<float> states, decay, dB_rows, dC_rows, carry, dA_acc, lanes;

  explicit Workspace(const ScanArgs& a, bool backward) {
    const int64_t T = a.chunk_size, N = a.dstate;
    hh.resize(T);
    ww.resize(T);
    offsets.resize(kNumSeqTensors * T);
    for (auto* v : {&B_rows, &C_rows}) v->resize(T * N);
    for (auto* v : {&u, &delta_in, &dt, &dtu, &y, &zbuf}) v->resize(T);
    carry.resize(a.channels_per_slice * N);
    lanes.resize(2 * N);
    if (backward) {
      for (auto* v : {&states, &decay, &dB_rows, &dC_rows}) v->resize(T * N);
      for (auto* v : {&dy, &du, &ddelta, &dz}) v->resize(T);
      dA_acc.resize(a.channels_per_slice * N);
    }
  }
};

// delta after bias and optional softplus, and delta * u, for one channel's chunk.
DERMOMAMBA_ALWAYS_INLINE void prepare_delta(const ScanArgs& a, int64_t channel, int64_t count, Workspace& ws) {
  const float bias = a.delta_bias ? a.delta_bias[channel] : 0.0f;
  float* delta_in = ws.delta_in.data();
  float* dt = ws.dt.data();
  float* dtu = ws.dtu.data();
  const float* u = ws.u.data();
  if (a.delta_softplus) {
#pragma omp simd
    for (int64_t t = 0; t < count; ++t) {
      delta_in[t] += bias;
      dt[t] = softplus(delta_in[t]);
      dtu[t] = dt[t] * u[t];
    }
  } else {
#pragma omp simd
    for (int64_t t = 0; t < count; ++t) {
      delta_in[t] += bias;
      dt[t] = delta_in[t];
      dtu[t] = dt[t] * u[t];
    }
  }
}

// Sum of the N lanes of `lanes`. For N = 16 a halving tree of vector adds: a plain loop becomes an
// in-order chain of 16 dependent scalar adds per step (the compiler keeps that order even under
// omp simd once it fully unrolls the loop), which was the forward's bottleneck.
// GCC vector types: the halving tree below becomes a few shuffles and adds in whatever instruction
// set the calling variant is compiled for.
typedef float Floats16 __attribute__((vector_size(16 * sizeof(float))));
typedef float Floats8 __attribute__((vector_size(8 * sizeof(float))));
typedef float Floats4 __attribute__((vector_size(4 * sizeof(float))));

DERMOMAMBA_ALWAYS_INLINE float sum16(const float* lanes) {
  Floats16 v;
  std::memcpy(&v, lanes, sizeof(v));
  const Floats8 v8 = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                     __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const Floats4 v4 = __builtin_shufflevector(v8, v8, 0, 1, 2, 3) + __builtin_shufflevector(v8, v8, 4, 5, 6, 7);
  return (v4[0] + v4[2]) + (v4[1] + v4[3]);
}

template <int64_t kFixedN>
DERMOMAMBA_ALWAYS_INLINE float sum_lanes(float* lanes, int64_t N) {
  if constexpr (kFixedN == 16) {
    return sum16(lanes);
  } else {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t n = 0; n < N; ++n) sum += lanes[n];
    return sum;
  }
}

template <int64_t kFixedN>
DERMOMAMBA_ALWAYS_INLINE void forward_item(const ScanArgs& a, int64_t item, Workspace& ws) {
  const int64_t N = kFixedN > 0 ? kFixedN : a.dstate;
  const ItemRange r = item_range(a, item);
  if (r.d_begin >= r.d_end) return;
  const int64_t channels_total = a.directions * a.dim;
  float* carry = ws.carry.data();
  std::fill(ws.carry.begin(), ws.carry.end(), 0.0f);
  int64_t* hh = ws.hh.data();
  int64_t* ww = ws.ww.data();
  const auto off = [&](int which) { return ws.offsets.data() + which * a.chunk_size; };
  const float* B_rows = ws.B_rows.data();
  const float* C_rows = ws.C_rows.data();

  for (int64_t chunk = 0; chunk < a.num_chunks; ++chunk) {
    const int64_t t0 = chunk * a.chunk_size;
    const int64_t count = std::min(a.chunk_size, a.length - t0);
    chunk_positions(r.direction, t0, count, a.height, a.width, hh, ww);
    chunk_offsets(a, hh, ww, count, ws.offsets.data());
    gather_rows(a.B, a.B.base(r.b, r.group_total, 0), hh, ww, count, N, ws.B_rows.data());
    gather_rows(a.C, a.C.base(r.b, r.group_total, 0), hh, ww, count, N, ws.C_rows.data());

    for (int64_t d = r.d_begin; d < r.d_end; ++d) {
      const int64_t channel = r.direction * a.dim + d;
      float* h = carry + (d - r.d_begin) * N;
      std::memcpy(a.chunk_states + ((r.b * channels_total + channel) * a.num_chunks + chunk) * N, h,
                  N * sizeof(float));
      gather_seq(a.x, a.x.base(r.b, 0, d), off(kSeqX), count, ws.u.data());
      gather_seq(a.delta, a.delta.base(r.b, r.direction, d), off(kSeqDelta), count, ws.delta_in.data());
      prepare_delta(a, channel, count, ws);

      const float* A_row = a.A + channel * N;
      const float* dt = ws.dt.data();
      const float* dtu = ws.dtu.data();
      float* y = ws.y.data();
      float* lanes = ws.lanes.data();
      for (int64_t t = 0; t < count; ++t) {
        const float dt_t = dt[t], dtu_t = dtu[t];
        const float* B_t = B_rows + t * N;
        const float* C_t = C_rows + t * N;
#pragma omp simd
        for (int64_t n = 0; n < N; ++n) {
          const float hn = exp_approx(dt_t * A_row[n]) * h[n] + dtu_t * B_t[n];
          h[n] = hn;
          lanes[n] = C_t[n] * hn;
        }
        y[t] = sum_lanes<kFixedN>(lanes, N);
      }

      const float skip = a.D ? a.D[channel] : 0.0f;
      const float* u = ws.u.data();
      if (a.z.defined()) {
        gather_seq(a.z, a.z.base(r.b, 0, d), off(kSeqZ), count, ws.zbuf.data());
        const float* z = ws.zbuf.data();
#pragma omp simd
        for (int64_t t = 0; t < count; ++t) y[t] = (y[t] + skip * u[t]) * (z[t] * sigmoid(z[t]));
      } else {
#pragma omp simd
        for (int64_t t = 0; t < count; ++t) y[t] = y[t] + skip * u[t];
      }
      scatter_seq(a.out, a.out.base(r.b, r.direction, d), off(kSeqOut), count, y);
    }
  }
  if (a.last_state) {
    for (int64_t d = r.d_begin; d < r.d_end; ++d) {
      const int64_t channel = r.direction * a.dim + d;
      std::memcpy(a.last_state + (r.b * channels_total + channel) * N, carry + (d - r.d_begin) * N,
                  N * sizeof(float));
    }
  }
}

template <int64_t kFixedN>
DERMOMAMBA_ALWAYS_INLINE void backward_item(const ScanArgs& a, int64_t item, Workspace& ws) {
  const int64_t N = kFixedN > 0 ? kFixedN : a.dstate;
  const ItemRange r = item_range(a, item);
  if (r.d_begin >= r.d_end) return;
  const int64_t channels_total = a.directions * a.dim;
  const int64_t slice = item % a.slices;
  float* dh_carry = ws.carry.data();  // d loss / d h entering the chunk from its right, per channel
  std::fill(ws.carry.begin(), ws.carry.end(), 0.0f);
  std::fill(ws.dA_acc.begin(), ws.dA_acc.end(), 0.0f);
  std::vector<float> dD_acc(r.d_end - r.d_begin, 0.0f), dbias_acc(r.d_end - r.d_begin, 0.0f);
  int64_t* hh = ws.hh.data();
  int64_t* ww = ws.ww.data();
  const auto off = [&](int which) { return ws.offsets.data() + which * a.chunk_size; };
  const float* B_rows = ws.B_rows.data();
  const float* C_rows = ws.C_rows.data();
  float* states = ws.states.data();
  float* decay = ws.decay.data();
  float* dB_rows = ws.dB_rows.data();
  float* dC_rows = ws.dC_rows.data();

  for (int64_t chunk = a.num_chunks - 1; chunk >= 0; --chunk) {
    const int64_t t0 = chunk * a.chunk_size;
    const int64_t count = std::min(a.chunk_size, a.length - t0);
    chunk_positions(r.direction, t0, count, a.height, a.width, hh, ww);
    chunk_offsets(a, hh, ww, count, ws.offsets.data());
    gather_rows(a.B, a.B.base(r.b, r.group_total, 0), hh, ww, count, N, ws.B_rows.data());
    gather_rows(a.C, a.C.base(r.b, r.group_total, 0), hh, ww, count, N, ws.C_rows.data());
    std::fill(dB_rows, dB_rows + count * N, 0.0f);
    std::fill(dC_rows, dC_rows + count * N, 0.0f);

    for (int64_t d = r.d_begin; d < r.d_end; ++d) {
      const int64_t j = d - r.d_begin;
      const int64_t channel = r.direction * a.dim + d;
      const float* h_start = a.chunk_states + ((r.b * channels_total + channel) * a.num_chunks + chunk) * N;
      gather_seq(a.x, a.x.base(r.b, 0, d), off(kSeqX), count, ws.u.data());
      gather_seq(a.delta, a.delta.base(r.b, r.direction, d), off(kSeqDelta), count, ws.delta_in.data());
      gather_seq(a.dout, a.dout.base(r.b, 0, d), off(kSeqDout), count, ws.dy.data());
      prepare_delta(a, channel, count, ws);
      const float* A_row = a.A + channel * N;
      const float* u = ws.u.data();
      const float* dt = ws.dt.data();
      const float* dtu = ws.dtu.data();
      const float* delta_in = ws.delta_in.data();
      float* y = ws.y.data();
      float* dy = ws.dy.data();
      float* du = ws.du.data();
      float* ddelta = ws.ddelta.data();
      const bool gated = a.z.defined();

      // Recompute the chunk's states (state after step t in row t) and decays.
      for (int64_t t = 0; t < count; ++t) {
        const float dt_t = dt[t], dtu_t = dtu[t];
        const float* prev = t > 0 ? states + (t - 1) * N : h_start;
        const float* B_t = B_rows + t * N;
        const float* C_t = C_rows + t * N;
        float* h = states + t * N;
        float* decay_t = decay + t * N;
        float* lanes = ws.lanes.data();
#pragma omp simd
        for (int64_t n = 0; n < N; ++n) {
          const float a_n = exp_approx(dt_t * A_row[n]);
          decay_t[n] = a_n;
          const float hn = a_n * prev[n] + dtu_t * B_t[n];
          h[n] = hn;
          lanes[n] = C_t[n] * hn;
        }
        // y is only needed for the gate's gradient
        y[t] = gated ? sum_lanes<kFixedN>(lanes, N) : 0.0f;
      }

      // Through the gate and the skip: dy = d loss / d (C . h), du starts with the skip's share.
      const float skip = a.D ? a.D[channel] : 0.0f;
      if (gated) {
        gather_seq(a.z, a.z.base(r.b, 0, d), off(kSeqZ), count, ws.zbuf.data());
        const float* z = ws.zbuf.data();
        float* dz = ws.dz.data();
#pragma omp simd
        for (int64_t t = 0; t < count; ++t) {
          const float pre_gate = y[t] + skip * u[t];
          const float gate_sigmoid = sigmoid(z[t]);
          const float dout_t = dy[t];
          dz[t] = dout_t * pre_gate * gate_sigmoid * (1.0f + z[t] * (1.0f - gate_sigmoid));
          dy[t] = dout_t * z[t] * gate_sigmoid;
        }
        scatter_seq(a.dz, a.dz.base(r.b, 0, d), off(kSeqDz), count, dz);
      }
      float dD_sum = 0.0f;
      for (int64_t t = count - 1; t >= 0; --t) {
        dD_sum += dy[t] * u[t];
        du[t] = dy[t] * skip;
      }
      dD_acc[j] += dD_sum;

      // Reverse walk: dh holds d loss / d h_t, then is carried to h_{t-1} through the decay.
      float* dh = dh_carry + j * N;
      float* dA = ws.dA_acc.data() + j * N;
      float dbias_sum = 0.0f;
      for (int64_t t = count - 1; t >= 0; --t) {
        const float dy_t = dy[t], dt_t = dt[t], dtu_t = dtu[t];
        const float* prev = t > 0 ? states + (t - 1) * N : h_start;
        const float* h = states + t * N;
        const float* decay_t = decay + t * N;
        const float* B_t = B_rows + t * N;
        const float* C_t = C_rows + t * N;
        float* dB_t = dB_rows + t * N;
        float* dC_t = dC_rows + t * N;
        float* lanes_B = ws.lanes.data();
        float* lanes_A = ws.lanes.data() + N;
#pragma omp simd
        for (int64_t n = 0; n < N; ++n) {
          const float g = dh[n] + dy_t * C_t[n];
          dC_t[n] += dy_t * h[n];
          dB_t[n] += g * dtu_t;
          lanes_B[n] = g * B_t[n];
          const float through_decay = g * prev[n] * decay_t[n];
          lanes_A[n] = through_decay * A_row[n];
          dA[n] += dt_t * through_decay;
          dh[n] = g * decay_t[n];
        }
        const float dh_dot_B = sum_lanes<kFixedN>(lanes_B, N);
        const float dh_dot_decay_dt = sum_lanes<kFixedN>(lanes_A, N);
        du[t] += dt_t * dh_dot_B;
        ddelta[t] = u[t] * dh_dot_B + dh_dot_decay_dt;  // d loss / d dt; softplus applied below
      }
      if (a.delta_softplus) {
#pragma omp simd
        for (int64_t t = 0; t < count; ++t) ddelta[t] *= sigmoid(delta_in[t]);
      }
      for (int64_t t = count - 1; t >= 0; --t) dbias_sum += ddelta[t];
      dbias_acc[j] += dbias_sum;
      scatter_seq(a.du, a.du.base(r.b, r.direction, d), off(kSeqDu), count, du);
      scatter_seq(a.ddelta, a.ddelta.base(r.b, r.direction, d), off(kSeqDdelta), count, ddelta);
    }

    if (a.slices == 1) {
      scatter_rows(a.dB, a.dB.base(r.b, r.group_total, 0), hh, ww, count, N, dB_rows);
      scatter_rows(a.dC, a.dC.base(r.b, r.group_total, 0), hh, ww, count, N, dC_rows);
    } else {
      // Partial rows of this slice, indexed by plane position, summed over slices afterwards.
      const int64_t offset = ((r.b * a.groups_total() + r.group_total) * a.slices + slice) * a.length * N;
      for (int64_t t = 0; t < count; ++t) {
        const int64_t position = hh[t] * a.width + ww[t];
        std::memcpy(a.dB_partial + offset + position * N, dB_rows + t * N, N * sizeof(float));
        std::memcpy(a.dC_partial + offset + position * N, dC_rows + t * N, N * sizeof(float));
      }
    }
  }

  for (int64_t d = r.d_begin; d < r.d_end; ++d) {
    const int64_t j = d - r.d_begin;
    const int64_t channel = r.direction * a.dim + d;
    std::memcpy(a.dA_partial + (r.b * channels_total + channel) * N, ws.dA_acc.data() + j * N, N * sizeof(float));
    a.dD_partial[r.b * channels_total + channel] = dD_acc[j];
    a.dbias_partial[r.b * channels_total + channel] = dbias_acc[j];
  }
}

// ---- instruction-set variants: the same source compiled for AVX-512, AVX2 + FMA and baseline x86-64,
// picked at run time (the extension is built without -march, so this is how it gets wide vectors) ----

template <bool kBackward>
DERMOMAMBA_ALWAYS_INLINE void run_items(const ScanArgs& a, int64_t begin, int64_t end) {
  Workspace ws(a, kBackward);
  for (int64_t item = begin; item < end; ++item) {
    const bool common_n = a.dstate == kCommonStateSize;
    if constexpr (kBackward) {
      common_n ? backward_item<kCommonStateSize>(a, item, ws) : backward_item<0>(a, item, ws);
    } else {
      common_n ? forward_item<kCommonStateSize>(a, item, ws) : forward_item<0>(a, item, ws);
    }
  }
}

#define DERMOMAMBA_AVX512_TARGET \
  __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma,prefer-vector-width=512")))
#define DERMOMAMBA_AVX2_TARGET __attribute__((target("avx2,fma")))

DERMOMAMBA_AVX512_TARGET void forward_items_avx512(const ScanArgs& a, int64_t b, int64_t e) { run_items<false>(a, b, e); }
DERMOMAMBA_AVX512_TARGET void backward_items_avx512(const ScanArgs& a, int64_t b, int64_t e) { run_items<true>(a, b, e); }
DERMOMAMBA_AVX2_TARGET void forward_items_avx2(const ScanArgs& a, int64_t b, int64_t e) { run_items<false>(a, b, e); }
DERMOMAMBA_AVX2_TARGET void backward_items_avx2(const ScanArgs& a, int64_t b, int64_t e) { run_items<true>(a, b, e); }
void forward_items_baseline(const ScanArgs& a, int64_t b, int64_t e) { run_items<false>(a, b, e); }
void backward_items_baseline(const ScanArgs& a, int64_t b, int64_t e) { run_items<true>(a, b, e); }

using ItemsFn = void (*)(const ScanArgs&, int64_t, int64_t);

// DERMOMAMBA_CPU_ISA=baseline|avx2|avx512 forces a variant (tests use it to cover all three);
// by default the widest one the CPU supports runs.
constexpr const char* kIsaEnvVar = "DERMOMAMBA_CPU_ISA";

std::pair<ItemsFn, ItemsFn> select_variant() {
  const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool has_avx512 = has_avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw");
  const char* env = std::getenv(kIsaEnvVar);
  const std::string requested = env ? env : "";
  if (requested.empty() || requested == "auto") {
    if (has_avx512) return {forward_items_avx512, backward_items_avx512};
    if (has_avx2) return {forward_items_avx2, backward_items_avx2};
    return {forward_items_baseline, backward_items_baseline};
  }
  if (requested == "baseline") return {forward_items_baseline, backward_items_baseline};
  if (requested == "avx2") {
    TORCH_CHECK(has_avx2, kIsaEnvVar, "=avx2 but this CPU lacks AVX2/FMA");
    return {forward_items_avx2, backward_items_avx2};
  }
  if (requested == "avx512") {
    TORCH_CHECK(has_avx512, kIsaEnvVar, "=avx512 but this CPU lacks AVX-512 F/DQ/VL/BW");
    return {forward_items_avx512, backward_items_avx512};
  }
  TORCH_CHECK(false, kIsaEnvVar, "=", requested, " is not one of auto, baseline, avx2, avx512");
}

// Waking another thread costs tens of microseconds (far more on a busy machine); below about this
// many state updates per task, fewer threads finish sooner.
constexpr int64_t kMinStateUpdatesPerTask = 1 << 18;

void run_parallel(const ScanArgs& a, bool backward) {
  const auto variant = select_variant();
  const ItemsFn fn = backward ? variant.second : variant.first;
  const int64_t updates_per_item = std::max<int64_t>(1, a.channels_per_slice * a.length * a.dstate);
  const int64_t grain = std::max<int64_t>(1, kMinStateUpdatesPerTask / updates_per_item);
  at::parallel_for(0, a.num_items(), grain, [&](int64_t begin, int64_t end) { fn(a, begin, end); });
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

void set_slices(ScanArgs& a, int64_t min_items) {
  const int64_t channels_per_group = a.dim / a.groups_per_direction;
  const int64_t groups = std::max<int64_t>(1, a.batch * a.groups_total());
  a.slices = std::min(channels_per_group, std::max<int64_t>(1, ceil_div(min_items, groups)));
  a.channels_per_slice = ceil_div(channels_per_group, a.slices);
  a.slices = ceil_div(channels_per_group, a.channels_per_slice);  // no empty slices
}

// ---- argument checks ----

bool is_float_dtype(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16;
}

void check_cpu_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(is_float_dtype(t), op, ": ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* op, const char* name) {
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " must have shape ", expected, ", got ", t.sizes());
}

void check_fp32_param(const at::Tensor& t, at::IntArrayRef expected, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
  check_shape(t, expected, op, name);
}

void check_input_or_fp32(const at::Tensor& t, at::ScalarType input_dtype, const char* op, const char* name) {
  check_cpu_float(t, op, name);
  TORCH_CHECK(t.scalar_type() == input_dtype || t.scalar_type() == at::kFloat, op, ": ", name,
              " must have the input's dtype (", input_dtype, ") or float32, got ", t.scalar_type());
}

void check_chunk_size(int64_t chunk_size, const char* op) {
  TORCH_CHECK(chunk_size > 0, op, ": chunk_size must be positive, got ", chunk_size);
}

void check_chunk_states(const at::Tensor& cs, at::IntArrayRef expected, const char* op) {
  check_fp32_param(cs, expected, op, "chunk_states");
}

// ---- the 1-D scan ----

struct Scan1dTensors {
  at::Tensor A, D, delta_bias;  // contiguous fp32
};

ScanArgs scan1d_args(const char* op, const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                     const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
                     const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& delta_bias,
                     bool delta_softplus, int64_t chunk_size, Scan1dTensors& keep) {
  check_cpu_float(u, op, "u");
  TORCH_CHECK(u.dim() == 3, op, ": u must be (batch, dim, L), got shape ", u.sizes());
  const int64_t batch = u.size(0), dim = u.size(1), length = u.size(2);
  TORCH_CHECK(length > 0, op, ": u must have L >= 1");
  check_cpu_float(delta, op, "delta");
  check_shape(delta, u.sizes(), op, "delta");
  TORCH_CHECK(delta.scalar_type() == u.scalar_type(), op, ": delta must have u's dtype ", u.scalar_type(),
              ", got ", delta.scalar_type());
  TORCH_CHECK(A.dim() == 2 && A.size(0) == dim, op, ": A must be (dim=", dim, ", N), got shape ", A.sizes());
  const int64_t dstate = A.size(1);
  check_fp32_param(A, {dim, dstate}, op, "A");
  TORCH_CHECK(B.dim() == 4, op, ": B must be (batch, groups, N, L), got shape ", B.sizes());
  const int64_t groups = B.size(1);
  TORCH_CHECK(groups > 0 && dim % groups == 0, op, ": B's groups (", groups, ") must divide dim (", dim, ")");
  check_input_or_fp32(B, u.scalar_type(), op, "B");
  check_shape(B, {batch, groups, dstate, length}, op, "B");
  check_input_or_fp32(C, u.scalar_type(), op, "C");
  check_shape(C, {batch, groups, dstate, length}, op, "C");
  if (D) check_fp32_param(*D, {dim}, op, "D");
  if (delta_bias) check_fp32_param(*delta_bias, {dim}, op, "delta_bias");
  if (z) {
    check_cpu_float(*z, op, "z");
    check_shape(*z, u.sizes(), op, "z");
    TORCH_CHECK(z->scalar_type() == u.scalar_type(), op, ": z must have u's dtype ", u.scalar_type(), ", got ",
                z->scalar_type());
  }
  check_chunk_size(chunk_size, op);

  ScanArgs a;
  a.batch = batch;
  a.directions = 1;
  a.dim = dim;
  a.dstate = dstate;
  a.height = length;
  a.width = 1;
  a.length = length;
  a.groups_per_direction = groups;
  a.chunk_size = std::min(chunk_size, length);
  a.num_chunks = ceil_div(length, chunk_size);
  a.delta_softplus = delta_softplus;
  a.x = view_of(u, u.stride(0), 0, u.stride(1), u.stride(2), 0);
  a.delta = view_of(delta, delta.stride(0), 0, delta.stride(1), delta.stride(2), 0);
  a.B = view_of(B, B.stride(0), B.stride(1), B.stride(2), B.stride(3), 0);
  a.C = view_of(C, C.stride(0), C.stride(1), C.stride(2), C.stride(3), 0);
  if (z) a.z = view_of(*z, z->stride(0), 0, z->stride(1), z->stride(2), 0);
  keep.A = A.contiguous();
  a.A = keep.A.data_ptr<float>();
  if (D) {
    keep.D = D->contiguous();
    a.D = keep.D.data_ptr<float>();
  }
  if (delta_bias) {
    keep.delta_bias = delta_bias->contiguous();
    a.delta_bias = keep.delta_bias.data_ptr<float>();
  }
  return a;
}

// A contiguous (batch, outer, channels, H, W)-like output read through the same strided view.
StridedView contiguous_view(const at::Tensor& t, int64_t outer, int64_t channels, int64_t height, int64_t width) {
  const int64_t plane = height * width;
  return view_of(t, outer * channels * plane, channels * plane, plane, width, 1);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> selective_scan_fwd_cpu(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
    const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& delta_bias, bool delta_softplus, int64_t chunk_size) {
  const char* op = "selective_scan_fwd";
  Scan1dTensors keep;
  ScanArgs a = scan1d_args(op, u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_size, keep);
  auto out = at::empty({a.batch, a.dim, a.length}, u.options());
  auto last_state = at::empty({a.batch, a.dim, a.dstate}, u.options().dtype(at::kFloat));
  auto chunk_states = at::empty({a.batch, a.dim, a.num_chunks, a.dstate}, u.options().dtype(at::kFloat));
  a.out = contiguous_view(out, 1, a.dim, a.length, 1);
  a.chunk_states = chunk_states.data_ptr<float>();
  a.last_state = last_state.data_ptr<float>();
  set_slices(a, kForwardWorkItemsPerThread * at::get_num_threads());
  run_parallel(a, /*backward=*/false);
  return {out, last_state, chunk_states};
}

// Sums over the batch of (batch, rows) partials, in batch order.
at::Tensor sum_over_batch(const at::Tensor& partial) {
  auto result = at::zeros(partial.sizes().slice(1), partial.options());
  const int64_t batch = partial.size(0), rows = result.numel();
  const float* src = partial.data_ptr<float>();
  float* dst = result.data_ptr<float>();
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t i = 0; i < rows; ++i) dst[i] += src[b * rows + i];
  return result;
}

// dB (batch, groups_total, N, H, W) in `like`'s dtype from the (batch, groups_total, slices, L, N)
// partials, slices summed in order.
void reduce_slices(const ScanArgs& a, const float* partial, at::Tensor& out) {
  const int64_t groups = a.batch * a.groups_total(), L = a.length, N = a.dstate;
  auto out_fp32 = out.scalar_type() == at::kFloat ? out : at::empty(out.sizes(), out.options().dtype(at::kFloat));
  float* dst = out_fp32.data_ptr<float>();
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      float* dst_g = dst + g * N * L;
      const float* src_g = partial + g * a.slices * L * N;
      std::vector<float> row(N);
      for (int64_t p = 0; p < L; ++p) {
        std::memcpy(row.data(), src_g + p * N, N * sizeof(float));
        for (int64_t s = 1; s < a.slices; ++s) {
          const float* part = src_g + (s * L + p) * N;
          for (int64_t n = 0; n < N; ++n) row[n] += part[n];
        }
        for (int64_t n = 0; n < N; ++n) dst_g[n * L + p] = row[n];
      }
    }
  });
  if (!out_fp32.is_same(out)) out.copy_(out_fp32);
}

struct BackwardBuffers {
  at::Tensor dA_partial, dD_partial, dbias_partial, dB_partial, dC_partial;
};

void setup_backward_outputs(ScanArgs& a, at::Tensor& dB, at::Tensor& dC, const at::TensorOptions& fp32,
                            BackwardBuffers& buf) {
  const int64_t channels_total = a.directions * a.dim;
  set_slices(a, kMinBackwardWorkItems);
  buf.dA_partial = at::empty({a.batch, channels_total, a.dstate}, fp32);
  buf.dD_partial = at::empty({a.batch, channels_total}, fp32);
  buf.dbias_partial = at::empty({a.batch, channels_total}, fp32);
  a.dA_partial = buf.dA_partial.data_ptr<float>();
  a.dD_partial = buf.dD_partial.data_ptr<float>();
  a.dbias_partial = buf.dbias_partial.data_ptr<float>();
  if (a.slices == 1) {
    a.dB = contiguous_view(dB, a.groups_total(), a.dstate, a.height, a.width);
    a.dC = contiguous_view(dC, a.groups_total(), a.dstate, a.height, a.width);
  } else {
    buf.dB_partial = at::empty({a.batch, a.groups_total(), a.slices, a.length, a.dstate}, fp32);
    buf.dC_partial = at::empty({a.batch, a.groups_total(), a.slices, a.length, a.dstate}, fp32);
    a.dB_partial = buf.dB_partial.data_ptr<float>();
    a.dC_partial = buf.dC_partial.data_ptr<float>();
  }
}

void finish_backward_outputs(const ScanArgs& a, at::Tensor& dB, at::Tensor& dC, BackwardBuffers& buf) {
  if (a.slices > 1) {
    reduce_slices(a, a.dB_partial, dB);
    reduce_slices(a, a.dC_partial, dC);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
selective_scan_bwd_cpu(const at::Tensor& dout, const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                       const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
                       const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& delta_bias,
                       bool delta_softplus, const at::Tensor& chunk_states, int64_t chunk_size,
                       bool /*deterministic: the CPU backward always is*/) {
  const char* op = "selective_scan_bwd";
  Scan1dTensors keep;
  ScanArgs a = scan1d_args(op, u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_size, keep);
  check_cpu_float(dout, op, "dout");
  check_shape(dout, u.sizes(), op, "dout");
  check_chunk_states(chunk_states, {a.batch, a.dim, a.num_chunks, a.dstate}, op);
  auto states = chunk_states.contiguous();
  a.chunk_states = states.data_ptr<float>();
  a.dout = view_of(dout, dout.stride(0), 0, dout.stride(1), dout.stride(2), 0);

  const auto fp32 = u.options().dtype(at::kFloat);
  auto du = at::empty(u.sizes(), u.options());
  auto ddelta = at::empty(delta.sizes(), delta.options());
  auto dB = at::empty(B.sizes(), B.options());
  auto dC = at::empty(C.sizes(), C.options());
  auto dz = z ? at::empty(z->sizes(), z->options()) : at::empty({0}, u.options());
  a.du = contiguous_view(du, 1, a.dim, a.length, 1);
  a.ddelta = contiguous_view(ddelta, 1, a.dim, a.length, 1);
  if (z) a.dz = contiguous_view(dz, 1, a.dim, a.length, 1);
  BackwardBuffers buf;
  setup_backward_outputs(a, dB, dC, fp32, buf);
  run_parallel(a, /*backward=*/true);
  finish_backward_outputs(a, dB, dC, buf);

  auto dA = sum_over_batch(buf.dA_partial);
  auto dD = D ? sum_over_batch(buf.dD_partial) : at::empty({0}, fp32);
  auto dbias = delta_bias ? sum_over_batch(buf.dbias_partial) : at::empty({0}, fp32);
  return {du, ddelta, dA, dB, dC, dD, dz, dbias};
}

// ---- the multiaxial (SS2D) scan ----

struct MultiaxialTensors {
  at::Tensor A, D, delta_bias;
};

ScanArgs multiaxial_args(const char* op, const at::Tensor& x, const at::Tensor& delta, const at::Tensor& A,
                         const at::Tensor& B, const at::Tensor& C, const at::Tensor& D, const at::Tensor& delta_bias,
                         bool delta_softplus, int64_t chunk_size, MultiaxialTensors& keep) {
  check_cpu_float(x, op, "x");
  TORCH_CHECK(x.dim() == 4, op, ": x must be (batch, dim, H, W), got shape ", x.sizes());
  const int64_t batch = x.size(0), dim = x.size(1), height = x.size(2), width = x.size(3);
  TORCH_CHECK(height > 0 && width > 0, op, ": x must have H, W >= 1, got ", x.sizes());
  const int64_t K = kMultiaxialDirections;
  check_input_or_fp32(delta, x.scalar_type(), op, "delta");
  check_shape(delta, {batch, K, dim, height, width}, op, "delta");
  TORCH_CHECK(A.dim() == 2 && A.size(0) == K * dim, op, ": A must be (4 * dim=", K * dim, ", N), got shape ",
              A.sizes());
  const int64_t dstate = A.size(1);
  check_fp32_param(A, {K * dim, dstate}, op, "A");
  check_input_or_fp32(B, x.scalar_type(), op, "B");
  check_shape(B, {batch, K, dstate, height, width}, op, "B");
  check_input_or_fp32(C, x.scalar_type(), op, "C");
  check_shape(C, {batch, K, dstate, height, width}, op, "C");
  check_fp32_param(D, {K * dim}, op, "D");
  check_fp32_param(delta_bias, {K * dim}, op, "delta_bias");
  check_chunk_size(chunk_size, op);

  ScanArgs a;
  a.batch = batch;
  a.directions = K;
  a.dim = dim;
  a.dstate = dstate;
  a.height = height;
  a.width = width;
  a.length = height * width;
  a.groups_per_direction = 1;
  a.chunk_size = std::min(chunk_size, a.length);
  a.num_chunks = ceil_div(a.length, chunk_size);
  a.delta_softplus = delta_softplus;
  a.x = view_of(x, x.stride(0), 0, x.stride(1), x.stride(2), x.stride(3));
  a.delta = view_of(delta, delta.stride(0), delta.stride(1), delta.stride(2), delta.stride(3), delta.stride(4));
  a.B = view_of(B, B.stride(0), B.stride(1), B.stride(2), B.stride(3), B.stride(4));
  a.C = view_of(C, C.stride(0), C.stride(1), C.stride(2), C.stride(3), C.stride(4));
  keep.A = A.contiguous();
  keep.D = D.contiguous();
  keep.delta_bias = delta_bias.contiguous();
  a.A = keep.A.data_ptr<float>();
  a.D = keep.D.data_ptr<float>();
  a.delta_bias = keep.delta_bias.data_ptr<float>();
  return a;
}

// out[b, i] = sum over k of per_direction[b, k, i], k in order (fp32), cast to out's dtype.
void sum_directions(const at::Tensor& per_direction, at::Tensor& out) {
  const int64_t batch = per_direction.size(0), K = per_direction.size(1);
  const int64_t plane = per_direction.numel() / std::max<int64_t>(1, batch * K);
  auto out_fp32 = out.scalar_type() == at::kFloat ? out : at::empty(out.sizes(), out.options().dtype(at::kFloat));
  const float* src = per_direction.data_ptr<float>();
  float* dst = out_fp32.data_ptr<float>();
  at::parallel_for(0, batch * plane, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / plane, p = i % plane;
      float sum = src[(b * K) * plane + p];
      for (int64_t k = 1; k < K; ++k) sum += src[(b * K + k) * plane + p];
      dst[i] = sum;
    }
  });
  if (!out_fp32.is_same(out)) out.copy_(out_fp32);
}

std::tuple<at::Tensor, at::Tensor> multiaxial_scan_fwd_cpu(const at::Tensor& x, const at::Tensor& delta,
                                                           const at::Tensor& A, const at::Tensor& B,
                                                           const at::Tensor& C, const at::Tensor& D,
                                                           const at::Tensor& delta_bias, bool delta_softplus,
                                                           int64_t chunk_size) {
  const char* op = "multiaxial_scan_fwd";
  MultiaxialTensors keep;
  ScanArgs a = multiaxial_args(op, x, delta, A, B, C, D, delta_bias, delta_softplus, chunk_size, keep);
  const auto fp32 = x.options().dtype(at::kFloat);
  auto y_per_direction = at::empty({a.batch, a.directions, a.dim, a.height, a.width}, fp32);
  auto chunk_states = at::empty({a.batch, a.directions, a.dim, a.num_chunks, a.dstate}, fp32);
  a.out = contiguous_view(y_per_direction, a.directions, a.dim, a.height, a.width);
  a.chunk_states = chunk_states.data_ptr<float>();
  set_slices(a, kForwardWorkItemsPerThread * at::get_num_threads());
  run_parallel(a, /*backward=*/false);
  auto y = at::empty({a.batch, a.dim, a.height, a.width}, fp32);
  sum_directions(y_per_direction, y);
  return {y, chunk_states};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
multiaxial_scan_bwd_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& delta, const at::Tensor& A,
                        const at::Tensor& B, const at::Tensor& C, const at::Tensor& D, const at::Tensor& delta_bias,
                        bool delta_softplus, const at::Tensor& chunk_states, int64_t chunk_size,
                        bool /*deterministic: the CPU backward always is*/) {
  const char* op = "multiaxial_scan_bwd";
  MultiaxialTensors keep;
  ScanArgs a = multiaxial_args(op, x, delta, A, B, C, D, delta_bias, delta_softplus, chunk_size, keep);
  check_cpu_float(dy, op, "dy");
  check_shape(dy, x.sizes(), op, "dy");
  check_chunk_states(chunk_states, {a.batch, a.directions, a.dim, a.num_chunks, a.dstate}, op);
  auto states = chunk_states.contiguous();
  a.chunk_states = states.data_ptr<float>();
  a.dout = view_of(dy, dy.stride(0), 0, dy.stride(1), dy.stride(2), dy.stride(3));

  const auto fp32 = x.options().dtype(at::kFloat);
  auto dx_per_direction = at::empty({a.batch, a.directions, a.dim, a.height, a.width}, fp32);
  auto ddelta = at::empty(delta.sizes(), delta.options());
  auto dB = at::empty(B.sizes(), B.options());
  auto dC = at::empty(C.sizes(), C.options());
  a.du = contiguous_view(dx_per_direction, a.directions, a.dim, a.height, a.width);
  a.ddelta = contiguous_view(ddelta, a.directions, a.dim, a.height, a.width);
  BackwardBuffers buf;
  setup_backward_outputs(a, dB, dC, fp32, buf);
  run_parallel(a, /*backward=*/true);
  finish_backward_outputs(a, dB, dC, buf);

  auto dx = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  sum_directions(dx_per_direction, dx);
  return {dx,
          ddelta,
          sum_over_batch(buf.dA_partial),
          dB,
          dC,
          sum_over_batch(buf.dD_partial),
          sum_over_batch(buf.dbias_partial)};
}

}  // namespace

TORCH_LIBRARY_IMPL(dermomamba, CPU, m) {
  m.impl("selective_scan_fwd", &selective_scan_fwd_cpu);
  m.impl("selective_scan_bwd", &selective_scan_bwd_cpu);
  m.impl("multiaxial_scan_fwd", &multiaxial_scan_fwd_cpu);
  m.impl("multiaxial_scan_bwd", &multiaxial_scan_bwd_cpu);
}

}  // namespace dermomamba
