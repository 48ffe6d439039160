// Backward of the multiaxial selective scan, "lane" form (scan v3, benchmarks/notes/scan.md, "v3
// backward"): a lane owns one (sequence, state n) pair, as in the lane forward
// (scan_lane_kernels.cuh, whose role, shape, state and butterfly helpers it reuses unchanged).
//
// Why: the warp-form backward (scan_kernels.cuh, scan_bwd_main) rebuilds each chunk's states with
// a 5-round shuffle scan per state, runs a second reverse scan for the adjoint, and stages B / C
// and reduces dB / dC behind block barriers per pair of states: about 3x the forward's time. Here
// both recurrences are sequential in one lane (one FMA of latency per step), and the block meets
// at one barrier per block of positions for all N states at once.
//
// Math (per sequence, state n; a_t = exp(delta_t A_n), h_t = a_t h_{t-1} + delta_t u_t B_t[n]):
//   g_t = dL/dh_t = C_t[n] dy_t + a_{t+1} g_{t+1}   (o_t = a_{t+1} g_{t+1}: the adjoint carry)
//   dB_t[n] += g_t delta_t u_t        dC_t[n] += dy_t h_t        (summed over a direction's channels)
//   du_t    += sum_n g_t delta_t B_t[n] (+ D dy_t)
//   ddelta_t = softplus'(raw) * sum_n g_t (u_t B_t[n] + A_n a_t h_{t-1})
//   dA_n    += g_t delta_t a_t h_{t-1}, dD += dy_t u_t, ddelta_bias += ddelta_t.
//
// Order of work. The adjoint runs right to left, so splits are walked right to left too: a split
// is a run of whole chunks (the forward's split layout, scratch and carry kernel):
//   (1) scan_lane_bwd_split_aggregate: each split's composed right-to-left map of o per (sequence,
//       state): o_left = exp(A sum delta) o_right + sum_t (prod_{s <= t} a_s) C_t dy_t. It needs
//       no forward state, so it reads only delta, dy and C;
//   (2) the warp form's scan_bwd_split_carry (unchanged): o entering each split from its right;
//   (3) scan_lane_bwd_main: chunks right to left. Per chunk the lane restarts h from chunk_states
//       and walks the chunk forward once, storing h at the start of every position block (a
//       checkpoint per kBlock positions, in shared memory private to the lane); then it walks the
//       blocks right to left: it rebuilds the block's h_{t-1} and a_t in registers from the
//       checkpoint and runs the adjoint back over them. Per block the sums over states (du, ddelta)
//       come from the forward's transposed butterfly (lane n ends with position t0 + n), and the
//       sums over a direction's channels (dB, dC) go through shared memory: every lane writes its
//       (position, state) value, one __syncthreads, then the block's threads add the warps' and
//       groups' values in a fixed order and store one value per (position, state) and block.
//   So every pair costs 3 exps (aggregate, chunk walk, block rebuild), as v2 does, and no h_t ever
//   leaves the chip.
//
// Determinism: dx by fp32 atomics, or one plane per direction (summed by the host in order);
// dB / dC by plain stores when one block covers a direction's channels, else fp32 atomics or
// per-block partials (summed by the host); dA, dD, ddelta_bias per-chunk partials (host sums).
// The reductions inside a block are in a fixed order.
//
// All warps of a block scan channels of one direction over the same split, so they walk the same
// chunks and blocks and meet at the same barriers (idle groups and idle warps run along with zero
// dy, which makes every contribution of theirs zero, and store nothing).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "scan_params.h"
#include "dtype_convert.cuh"
#include "scan_lane_kernels.cuh"

namespace dermomamba {
namespace cuda {
namespace lane {

// Warps per block of the backward, by lanes per sequence: the dB / dC reduction rows (two
// buffers x (dB, dC) x warps x kBlock positions x kWarpSize lanes floats) must fit the 48 KB of
// static shared memory with the staging rows and checkpoints.
template <int kGroup>
struct BwdBlock {
  static constexpr int kWarps = kGroup <= kNarrowGroup ? 4 : 2;
};

// Largest number of position blocks in one chunk (chunk_size <= kMaxChunkSize).
template <typename S>
struct BwdCheckpoints {
  static constexpr int kMaxBlocks = (kMaxChunkSize + S::kBlock - 1) / S::kBlock;
};

// What a lane stages for one position of a block (kRows == 1 in the lane shapes the backward
// supports: one position per lane and block), read back by every lane of its group as two 16-byte
// broadcasts: (delta, delta u, B offset, C offset) and (u, dy, native index, unused).
template <typename S>
struct BwdStageRows {
  float4 step[2][S::kSeqsPerWarp][S::kBlock];
  float4 grad[2][S::kSeqsPerWarp][S::kBlock];
};

// The raw inputs of one position, with dy and the softplus slope.
struct BwdPosition {
  OwnPosition in;
  float delta, slope, dy;
};

__device__ __forceinline__ float step_with_slope(const OwnPosition& o, float bias, bool softplus, float& slope) {
  slope = 0.f;
  if (!o.valid) return 0.f;
  const float raw = o.delta_raw + bias;
  if (!softplus || raw > kSoftplusLimit) {
    slope = 1.f;
    return raw;
  }
  const float e = __expf(raw);
  slope = e / (1.f + e);
  return log1pf(e);
}

// Lane n of a group loads position t (< end, else masked) of its sequence. Idle groups load valid
// memory (the last channel's) but see dy = 0: all their contributions vanish.
template <typename S>
__device__ __forceinline__ BwdPosition load_bwd_position(const ScanParams& p, const LaneRole<S>& r, int t, int end,
                                                         float bias) {
  BwdPosition b;
  b.in = load_own_position<S>(p, r, t, end);
  b.delta = step_with_slope(b.in, bias, p.delta_softplus, b.slope);
  b.dy = 0.f;
  if (b.in.valid && r.seq_ok) {
    const int h = b.in.native / p.width;
    const int w = b.in.native - h * p.width;
    b.dy = load_kind(p.dout,
                         r.batch * p.dout_batch_stride + r.channel * p.dout_dim_stride + h * p.dout_h_stride +
                             w * p.dout_w_stride,
                         p.dout_kind);
  }
  return b;
}

template <typename S>
__device__ __forceinline__ void stage_step(const BwdPosition& b, int n, float4* step_row) {
  step_row[n] = make_float4(b.delta, b.delta * b.in.u, __int_as_float(b.in.offset_B), __int_as_float(b.in.offset_C));
}

template <typename S>
__device__ __forceinline__ void stage_bwd(const BwdPosition& b, int n, float4* step_row, float4* grad_row) {
  step_row[n] = make_float4(b.delta, b.delta * b.in.u, __int_as_float(b.in.offset_B), __int_as_float(b.in.offset_C));
  grad_row[n] = make_float4(b.in.u, b.dy, __int_as_float(b.in.native), 0.f);
}

// Blocks of chunk c: positions [chunk begin + k kBlock, ...), the last one possibly shorter.
struct ChunkSpan {
  int begin, end, blocks;
};

template <int kBlock>
__device__ __forceinline__ ChunkSpan chunk_span(const ScanParams& p, int c) {
  ChunkSpan s;
  s.begin = c * p.chunk_size;
  s.end = min(s.begin + p.chunk_size, p.length);
  s.blocks = (s.end - s.begin + kBlock - 1) / kBlock;
  return s;
}

// Pass (1): per (sequence, state) and split, the right-to-left map of the adjoint carry over the
// split: split_decay = exp(A sum delta), split_state = the carry leaving the split's left end
// from a zero carry at its right end.
template <typename bc_t, typename S>
__global__ void __launch_bounds__(BwdBlock<S::kGroup>::kWarps* kWarpSize) scan_lane_bwd_split_aggregate(ScanParams p) {
  static_assert(S::kRows == 1, "the lane backward stages one position per lane and block");
  constexpr int kWarps = BwdBlock<S::kGroup>::kWarps;
  __shared__ BwdStageRows<S> stage_all[kWarps];
  const LaneRole<S> r(p);
  BwdStageRows<S>& stage = stage_all[r.warp];
  const LaneStates<bc_t, S> ls(p, r);
  const float bias = p.delta_bias ? p.delta_bias[r.seq] : 0.f;
  const int split = blockIdx.x;
  const int c_begin = split * p.chunks_per_split;
  const int c_end = min(c_begin + p.chunks_per_split, p.num_chunks);
  const float A2 = ls.A2[0];
  const bool state_ok = ls.ok[0];

  float o = 0.f, delta_sum = 0.f;
  int buffer = 0;
  for (int c = c_end - 1; c >= c_begin; --c) {
    const ChunkSpan span = chunk_span<S::kBlock>(p, c);
    for (int k = span.blocks - 1; k >= 0; --k) {
      const int t0 = span.begin + k * S::kBlock;
      const int end = min(t0 + S::kBlock, span.end);
      const BwdPosition own = load_bwd_position<S>(p, r, t0 + r.n, end, bias);
      stage_bwd<S>(own, r.n, stage.step[buffer][r.group], stage.grad[buffer][r.group]);
      __syncwarp();
      const float4* step = stage.step[buffer][r.group];
      const float4* grad = stage.grad[buffer][r.group];
#pragma unroll
      for (int j = S::kBlock - 1; j >= 0; --j) {
        if (j < end - t0) {
          const float4 s = step[j];
          float Cv = to_float(ls.C[0][__float_as_int(s.w)]);
          Cv = state_ok ? Cv : 0.f;
          const float a = exp2f(s.x * A2);
          o = a * (o + grad[j].y * Cv);
          delta_sum += s.x;
        }
      }
      buffer ^= 1;
    }
  }
  if (state_ok) {
    const int64_t out = (r.seq_index * p.num_splits + split) * p.dstate + r.state(0);
    p.split_decay[out] = exp2f(A2 * delta_sum);
    p.split_state[out] = o;
  }
}

// Sum over the kGroup lanes of a group (every lane gets the total).
template <typename S>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
  for (int offset = S::kGroup / 2; offset >= 1; offset /= 2) v += __shfl_xor_sync(kAllLanes, v, offset);
  return v;
}

// Shared memory of the main pass (48 KB for kGroup 16 x 4 warps: the static limit).
template <typename S>
struct BwdShared {
  static constexpr int kWarps = BwdBlock<S::kGroup>::kWarps;
  // Staging rows of each warp. The chunk's forward walk uses only the step rows (its warp's own,
  // __syncwarp); the backward walk both, and the block's reducers read warp 0's grad rows (the
  // native index of each position) after the block barrier.
  BwdStageRows<S> stage[kWarps];
  float checkpoint[kWarps][BwdCheckpoints<S>::kMaxBlocks][kWarpSize];
  // [buffer][dB, dC][warp][position of the block][lane]: lane = group * kGroup + n.
  float reduce[2][2][kWarps][S::kBlock][kWarpSize];
};

// Pass (3): every gradient.
template <typename bc_t, typename S>
__global__ void __launch_bounds__(BwdBlock<S::kGroup>::kWarps* kWarpSize) scan_lane_bwd_main(ScanParams p) {
  static_assert(S::kRows == 1, "the lane backward stages one position per lane and block");
  static_assert(S::kStates == 1, "the lane backward owns one state per lane");
  __shared__ BwdShared<S> sh;
  const LaneRole<S> r(p);
  const LaneStates<bc_t, S> ls(p, r);
  const int N = p.dstate;
  const float bias = p.delta_bias ? p.delta_bias[r.seq] : 0.f;
  const float Dv = p.D ? p.D[r.seq] : 0.f;
  const float A2 = ls.A2[0];
  const bool state_ok = ls.ok[0];
  const float An = state_ok ? p.A[static_cast<int64_t>(r.seq) * N + r.state(0)] : 0.f;
  const bool writer = state_ok;  // ls.ok includes seq_ok
  const int split = blockIdx.x;
  const int c_begin = split * p.chunks_per_split;
  const int c_end = min(c_begin + p.chunks_per_split, p.num_chunks);
  const float* states = p.chunk_states + r.seq_index * p.num_chunks * N;
  float* checkpoint = sh.checkpoint[r.warp][0] + r.lane;  // [block * kWarpSize]
  const int warps = blockDim.x / kWarpSize;

  // Where this block's dB / dC go: blocks of a direction cover consecutive channels.
  const int channels_per_block = warps * S::kSeqsPerWarp;
  const int channel_blocks = (p.dim + channels_per_block - 1) / channels_per_block;
  const int block_in_group = blockIdx.y - r.direction * channel_blocks;
  const int64_t bc_plane =
      p.grad_bc_mode == kGradBCPartials
          ? ((static_cast<int64_t>(r.batch) * p.num_bc_groups + r.direction) * channel_blocks + block_in_group) * N
          : (static_cast<int64_t>(r.batch) * p.num_bc_groups + r.direction) * N;
  const int64_t x_plane = static_cast<int64_t>(p.batch) * p.dim * p.length;
  const int64_t x_base = (static_cast<int64_t>(r.batch) * p.dim + r.channel) * p.length;

  // The adjoint carry entering the split from its right (zero at the sequence's end).
  float o = 0.f;
  if (split != p.num_splits - 1 && state_ok)
    o = p.reverse_carry[(r.seq_index * p.num_splits + split) * N + r.state(0)];

  int fwd_buffer = 0;
  int bwd_counter = 0;  // backward blocks walked so far: buffer parity, continuous over chunks
  for (int c = c_end - 1; c >= c_begin; --c) {
    const ChunkSpan span = chunk_span<S::kBlock>(p, c);
    // Forward walk of the chunk: checkpoints of h at every block start.
    // Each block's own position is loaded one block ahead, so the loads' latency overlaps a block
    // of steps.
    float h = state_ok ? states[static_cast<int64_t>(c) * N + r.state(0)] : 0.f;
    BwdPosition next = {};
    if (span.blocks > 1) next = load_bwd_position<S>(p, r, span.begin + r.n, span.begin + S::kBlock, bias);
    for (int k = 0; k < span.blocks; ++k) {
      checkpoint[k * kWarpSize] = h;
      if (k + 1 == span.blocks) break;  // the last block's end state is never needed
      const BwdPosition own = next;
      float4* step_row = sh.stage[r.warp].step[fwd_buffer][r.group];
      stage_step<S>(own, r.n, step_row);
      __syncwarp();
      if (k + 2 < span.blocks) {
        const int t_next = span.begin + (k + 1) * S::kBlock;  // a full block: only the last is short
        next = load_bwd_position<S>(p, r, t_next + r.n, t_next + S::kBlock, bias);
      }
      // Every block but the chunk's last is full.
#pragma unroll
      for (int j = 0; j < S::kBlock; ++j) {
        const float4 s = step_row[j];
        float Bv = to_float(ls.B[0][__float_as_int(s.z)]);
        Bv = state_ok ? Bv : 0.f;
        h = exp2f(s.x * A2) * h + s.y * Bv;
      }
      fwd_buffer ^= 1;
    }
    // The backward walk below rewrites step rows this walk's lanes may still be reading.
    __syncwarp();

    float dA = 0.f, dD = 0.f, dbias = 0.f;
    {
      const int t_last = span.begin + (span.blocks - 1) * S::kBlock;
      next = load_bwd_position<S>(p, r, t_last + r.n, span.end, bias);
    }
    for (int k = span.blocks - 1; k >= 0; --k, ++bwd_counter) {
      const int buffer = bwd_counter & 1;
      const int t0 = span.begin + k * S::kBlock;
      const int end = min(t0 + S::kBlock, span.end);
      const int length = end - t0;
      const BwdPosition own = next;
      float4* step_row = sh.stage[r.warp].step[buffer][r.group];
      float4* grad_row = sh.stage[r.warp].grad[buffer][r.group];
      stage_bwd<S>(own, r.n, step_row, grad_row);
      __syncwarp();
      if (k > 0) {
        const int t_next = t0 - S::kBlock;  // a full block
        next = load_bwd_position<S>(p, r, t_next + r.n, t_next + S::kBlock, bias);
      }

      // Rebuild h_{t-1} and a_t of the block from its checkpoint.
      float h_prev[S::kBlock], decay[S::kBlock];
      float hb = checkpoint[k * kWarpSize];
#pragma unroll
      for (int j = 0; j < S::kBlock; ++j) {
        const float4 s = step_row[j];
        float Bv = 0.f;
        if (j < length) Bv = to_float(ls.B[0][__float_as_int(s.z)]);
        Bv = state_ok ? Bv : 0.f;
        h_prev[j] = hb;
        decay[j] = exp2f(s.x * A2);
        hb = decay[j] * hb + s.y * Bv;
      }

      // The adjoint, right to left over the block.
      float v_du[S::kBlock], v_dd[S::kBlock];
      float* red_B = sh.reduce[buffer][0][r.warp][0] + r.lane;
      float* red_C = sh.reduce[buffer][1][r.warp][0] + r.lane;
#pragma unroll
      for (int j = S::kBlock - 1; j >= 0; --j) {
        const float4 s = step_row[j];
        const float4 gr = grad_row[j];
        float Bv = 0.f, Cv = 0.f;
        if (j < length) {
          Bv = to_float(ls.B[0][__float_as_int(s.z)]);
          Cv = to_float(ls.C[0][__float_as_int(s.w)]);
        }
        Bv = state_ok ? Bv : 0.f;
        Cv = state_ok ? Cv : 0.f;
        // Masked positions have delta 0 (decay 1) and dy 0: g = o passes through unchanged.
        const float g = gr.y * Cv + o;
        const float decayed_prev = decay[j] * h_prev[j];
        const float h_j = decayed_prev + s.y * Bv;
        const float g_delta = g * s.x;
        red_B[j * kWarpSize] = g * s.y;
        red_C[j * kWarpSize] = gr.y * h_j;
        v_du[j] = g_delta * Bv;
        v_dd[j] = g * (gr.x * Bv + An * decayed_prev);
        dA += g_delta * decayed_prev;
        o = decay[j] * g;
      }
      transposed_group_sum<S>(v_du, r.n);
      transposed_group_sum<S>(v_dd, r.n);
      if (own.in.valid) {
        const float du = v_du[0] + Dv * own.dy;
        const float ddelta_raw = v_dd[0] * own.slope;
        dD += own.dy * own.in.u;
        dbias += ddelta_raw;
        if (r.seq_ok) {
          store_kind(p.ddelta, r.seq_index * p.length + own.in.native, p.delta_kind, ddelta_raw);
          if (p.dx_per_direction != nullptr) {
            p.dx_per_direction[r.direction * x_plane + x_base + own.in.native] = du;
          } else {
            atomicAdd(p.dx_accum + x_base + own.in.native, du);
          }
        }
      }

      // dB / dC of the block: sum over the block's sequences (warps, then groups), fixed order.
      __syncthreads();
      const float4* native_row = sh.stage[0].grad[buffer][0];
      for (int e = threadIdx.x; e < N * length; e += blockDim.x) {
        const int n = e / length, j = e - n * length;
        float sum_B = 0.f, sum_C = 0.f;
        for (int w = 0; w < warps; ++w) {
#pragma unroll
          for (int q = 0; q < S::kSeqsPerWarp; ++q) {
            sum_B += sh.reduce[buffer][0][w][j][q * S::kGroup + n];
            sum_C += sh.reduce[buffer][1][w][j][q * S::kGroup + n];
          }
        }
        const int64_t index = (bc_plane + n) * p.length + __float_as_int(native_row[j].z);
        store_grad_bc<bc_t>(p, index, sum_B, sum_C);
      }
      // No second barrier: the next block writes the other buffers, and the one after that waits
      // at the barrier above until every thread has read these.
    }
    if (writer) p.dA_partial[(r.seq_index * p.num_chunks + c) * N + r.state(0)] = dA;
    dD = group_sum<S>(dD);
    dbias = group_sum<S>(dbias);
    if (r.seq_ok && r.n == 0) {
      if (p.dD_partial) p.dD_partial[r.seq_index * p.num_chunks + c] = dD;
      if (p.ddelta_bias_partial) p.ddelta_bias_partial[r.seq_index * p.num_chunks + c] = dbias;
    }
  }
}

}  // namespace lane

#ifdef __CUDACC__
// Launcher of the lane-form multiaxial backward (needs scan_kernels.cuh for the split carry pass).
// The host computes the same channel blocks (lane_backward_channel_blocks) for the dB / dC
// partials' shape.
template <typename bc_t, typename S>
int launch_backward_lane(const ScanParams& p, cudaStream_t stream) {
  constexpr int kWarps = lane::BwdBlock<S::kGroup>::kWarps;
  const int warps_needed = (p.dim + S::kSeqsPerWarp - 1) / S::kSeqsPerWarp;
  const int warps = warps_needed < kWarps ? warps_needed : kWarps;
  const int channels_per_block = warps * S::kSeqsPerWarp;
  const int channel_blocks = (p.dim + channels_per_block - 1) / channels_per_block;
  const dim3 grid(p.num_splits, p.num_directions * channel_blocks, p.batch);
  const dim3 block(warps * kWarpSize);
  if (p.num_splits > 1) {
    lane::scan_lane_bwd_split_aggregate<bc_t, S><<<grid, block, 0, stream>>>(p);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return static_cast<int>(err);
    scan_bwd_split_carry<<<carry_blocks(p), kCarryBlock, 0, stream>>>(p);
  }
  lane::scan_lane_bwd_main<bc_t, S><<<grid, block, 0, stream>>>(p);
  return static_cast<int>(cudaGetLastError());
}

template <typename bc_t>
int scan_backward_multiaxial_lane(const ScanParams& p, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  if (p.dstate > lane::kMaxLaneStateDim || p.chunk_size > kMaxChunkSize) return static_cast<int>(cudaErrorInvalidValue);
  return lane::group_size_for(p.dstate) == lane::kNarrowGroup
             ? launch_backward_lane<bc_t, lane::LaneShape<lane::kNarrowGroup, 1>>(p, s)
             : launch_backward_lane<bc_t, lane::LaneShape<kWarpSize, 1>>(p, s);
}
#endif  // __CUDACC__

}  // namespace cuda
}  // namespace dermomamba
