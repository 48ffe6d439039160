// Work layout of the "flat" multiaxial forward (scan v6, scan_flat_kernels.cuh), shared by the kernels and
// the host glue (which sizes the segment scratch from it). No CUDA headers needed on the host.
#pragma once

#ifdef __CUDACC__
#define DERMOMAMBA_FLAT_HOST_DEVICE __host__ __device__
#else
#define DERMOMAMBA_FLAT_HOST_DEVICE
#endif

namespace dermomamba {
namespace cuda {
namespace flat {

// States one thread keeps in registers: the kernels take N <= kStates (idle states have A = B = C = 0).
constexpr int kStates = 16;
// Lines (rows or columns) per warp, one per lane.
constexpr int kLanes = 32;
// Warps (channels) per block. Each warp has ~11-14 KB of static shared memory (its row tile and gathered B / C
// rows, scan_flat_kernels.cuh): two warps keep a block under the 48 KB static limit in every dtype.
constexpr int kWarps = 2;
constexpr int kThreads = kWarps * kLanes;
// Positions per segment of a line. Shorter segments: more threads and a longer carry; 64 gives a
// DermoMamba first stage (batch 48, 192x256, 8 channels) ~1.2 M threads and a carry of 768 segments per
// sequence.
constexpr int kSegment = 64;
// Steps between flushes of the row directions' y transpose: one per lane of a warp.
constexpr int kWindow = kLanes;
constexpr int kCarryThreads = 256;

// Lines, their length and segments for one direction: rows (W long) for directions 0 and 2, columns (H long)
// for 1 and 3.
struct Geometry {
  int lines, length, segments, line_groups;
};

DERMOMAMBA_FLAT_HOST_DEVICE inline Geometry geometry(int height, int width, int direction) {
  Geometry g;
  const bool rows = (direction & 1) == 0;
  g.lines = rows ? height : width;
  g.length = rows ? width : height;
  g.segments = (g.length + kSegment - 1) / kSegment;
  g.line_groups = (g.lines + kLanes - 1) / kLanes;
  return g;
}

// Segments per (batch, sequence) in the scratch: the larger of the two line orientations.
DERMOMAMBA_FLAT_HOST_DEVICE inline int max_segments(int height, int width) {
  const Geometry r = geometry(height, width, 0), c = geometry(height, width, 1);
  const int a = r.lines * r.segments, b = c.lines * c.segments;
  return a > b ? a : b;
}

// Blocks along grid.x: (line group, segment) pairs of the orientation with more of them.
DERMOMAMBA_FLAT_HOST_DEVICE inline int blocks_per_direction(int height, int width) {
  const Geometry r = geometry(height, width, 0), c = geometry(height, width, 1);
  const int a = r.line_groups * r.segments, b = c.line_groups * c.segments;
  return a > b ? a : b;
}

}  // namespace flat
}  // namespace cuda
}  // namespace dermomamba
