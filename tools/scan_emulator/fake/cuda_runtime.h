// Host stand-ins for the CUDA device API (see emu.cpp): the kernels compile as C++; every GPU thread is a
// fiber of its block's OS thread; blocks run concurrently on several OS threads.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __shared__ static thread_local
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// Aligned as CUDA declares them (8 / 16 bytes): built with -fsanitize=alignment (build.sh), a float2 / float4 /
// uint4 access off its boundary, in shared or global memory, stops the run as it faults on the GPU.
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct int2 { int x, y; };
inline float2 make_float2(float a, float b) { return {a, b}; }
inline int2 make_int2(int a, int b) { return {a, b}; }
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
struct uint3 { unsigned x, y, z; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct dim3 { unsigned x, y, z; dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {} };
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
typedef void* cudaStream_t;
extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;
using std::max;
using std::min;
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline float __expf(float x) { return std::exp(x); }
float __shfl_xor_sync(unsigned mask, float v, int lane_mask);
float __shfl_up_sync(unsigned mask, float v, unsigned delta);
float __shfl_down_sync(unsigned mask, float v, unsigned delta);
// __shfl_sync of any 4- or 8-byte value (float, int, unsigned, long long, unsigned long long): a value
// exchange WITHOUT barrier or memory-ordering semantics (emu.cpp: each lane waits only for its source lane to
// reach the same shuffle), as CUDA promises; a warp relying on a shuffle to order its shared memory shows.
namespace emu {
unsigned long long shfl_bits(unsigned mask, unsigned long long bits, int src, int type_tag);
}
template <typename T>
T __shfl_sync(unsigned mask, T v, int src) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "4- or 8-byte shuffles only");
  unsigned long long bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  // The tag (size, integral, signed) lets the emulator check that every lane is at the same shuffle.
  bits = emu::shfl_bits(mask, bits, src, static_cast<int>(sizeof(T)) * 4 + (T(-1) < T(0)) * 2 + (T(1) / T(2) == T(0)));
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}
void __syncwarp(unsigned mask = 0xffffffffu);
void __syncthreads();
float atomicAdd(float* address, float value);
int atomicAdd(int* address, int value);
int atomicExch(int* address, int value);
void __threadfence();
void __nanosleep(unsigned ns);
float __ldcg(const float* address);
void __stcg(float* address, float value);
// 16-byte accesses (the flat forward's vector loads and scratch rows): a misaligned one faults on the GPU, so
// the emulator stops with exit code 4 (emu.cpp).
float4 __ldcg(const float4* address);
void __stcg(float4* address, float4 value);
float __ldg(const float* address);
float4 __ldg(const float4* address);
uint4 __ldg(const uint4* address);
using ::exp2f;
using ::log1pf;
// Launchers run on the emulated grid: make_host_copy.py --launchers turns `kernel<<<config>>>(args);` into
// `emu::Launch(config).run([&] { kernel(args); });` and each static `__shared__ T name[...];` into a reference
// to the block's NaN-filled static shared memory (one such array per kernel).
#include <functional>
namespace emu {
struct Launch {
  dim3 grid, block;
  Launch(dim3 g, dim3 b, size_t dynamic_shared = 0, cudaStream_t stream = nullptr);
  void run(const std::function<void()>& body) const;
};
unsigned char* block_static_shared(size_t bytes, size_t alignment);
template <typename T, size_t kAlign = alignof(T)>
T& static_shared() { return *reinterpret_cast<T*>(block_static_shared(sizeof(T), kAlign)); }
}  // namespace emu
cudaError_t cudaGetLastError();
#define __maxnreg__(...)
