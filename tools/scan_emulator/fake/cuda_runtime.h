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
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
struct int2 { int x, y; };
inline float2 make_float2(float a, float b) { return {a, b}; }
inline int2 make_int2(int a, int b) { return {a, b}; }
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
struct uint3 { unsigned x, y, z; };
struct dim3 { unsigned x, y, z; dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {} };
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
float __shfl_sync(unsigned mask, float v, int src);
void __syncwarp(unsigned mask = 0xffffffffu);
void __syncthreads();
float atomicAdd(float* address, float value);
int atomicAdd(int* address, int value);
int atomicExch(int* address, int value);
void __threadfence();
void __nanosleep(unsigned ns);
float __ldcg(const float* address);
void __stcg(float* address, float value);
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
typedef void* cudaStream_t;
#define __maxnreg__(...)
