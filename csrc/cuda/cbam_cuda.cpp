// CUDA implementations of the fused CBAM ops (schemas and shapes in csrc/ops.cpp): argument checks,
// allocation of outputs and scratch, tiling, and the dispatch on x's dtype. The kernels live in
// cbam_*.cu (no torch headers there).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "cuda/cbam_params.h"

namespace dermomamba {
namespace {

using cuda::CbamOutTensor;
using cuda::CbamParams;
using cuda::CbamTensor;

constexpr int64_t kChanRows = 3;   // avg, max, 1 / ties over HW
constexpr int64_t kPixRows = 4;    // max, mean, 1 / ties over C, conv output z
constexpr int64_t kBpixRows = 3;   // d spatial logit, d max-map / ties, d mean-map / C
constexpr int64_t kHidRows = 3;    // relu sums, d pre-activation of the avg and the max pool
constexpr int64_t kStatsLen = 4;   // mean and 1/std that normalised, batch mean, unbiased batch variance
constexpr int64_t kMaxGridY = 65535;

// Tests set DERMOMAMBA_CBAM_POISON=1: every output and scratch buffer then starts as NaN, so an
// element that a kernel forgets to write shows up instead of reusing a stale allocation's value.
constexpr const char* kPoisonEnvVar = "DERMOMAMBA_CBAM_POISON";

bool poison_requested() {
  const char* value = std::getenv(kPoisonEnvVar);
  return value != nullptr && value[0] == '1';
}

void poison(std::initializer_list<at::Tensor> tensors) {
  for (const at::Tensor& t : tensors) t.fill_(std::numeric_limits<double>::quiet_NaN());
}

bool on_kernel_device(const at::Tensor& t) { return t.is_cuda(); }

void* current_stream(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.get_device()).stream(); }

int multiprocessors(const at::Tensor& t) { return cuda::cbam_multiprocessor_count(t.get_device()); }

int kind_of(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::kCbamFloat32;
    case at::kHalf: return cuda::kCbamFloat16;
    case at::kBFloat16: return cuda::kCbamBFloat16;
    case at::kDouble: return cuda::kCbamFloat64;
    default: TORCH_CHECK(false, op, ": ", name, " must be a floating tensor, got ", t.scalar_type());
  }
}

// Which kernels run a call: the pass structure (cbam_passes.cuh, any shape) or the small-shape path
// (cbam_small.cu: one cooperative kernel per direction, for small images). "passes" is the default until
// the small path is measured on a GPU; "small" forces it (a clear error where it cannot run the shape, so
// tests of it never fall back silently); "auto" takes it where the rule below allows.
constexpr const char* kPathEnvVar = "DERMOMAMBA_CBAM_CUDA_PATH";

enum class PathRequest { kPasses, kSmall, kAuto };

PathRequest requested_path(const char* op) {
  const char* value = std::getenv(kPathEnvVar);
  if (value == nullptr || value[0] == '\0') return PathRequest::kPasses;
  const std::string v(value);
  if (v == "passes") return PathRequest::kPasses;
  if (v == "small") return PathRequest::kSmall;
  if (v == "auto") return PathRequest::kAuto;
  TORCH_CHECK(false, op, ": ", kPathEnvVar, " must be 'passes', 'small' or 'auto', got '", v, "'");
}

// cuda::cbam_small_blocks_per_sm, remembered: the occupancy queries cost more than a small launch.
int small_blocks_per_sm(int device, int kind, bool vector_loads, int64_t bytes) {
  static std::mutex mutex;
  static std::map<std::tuple<int, int, bool, int64_t>, int> known;
  const auto key = std::make_tuple(device, kind, vector_loads, bytes);
  const std::lock_guard<std::mutex> lock(mutex);
  const auto found = known.find(key);
  if (found != known.end()) return found->second;
  const int blocks = cuda::cbam_small_blocks_per_sm(device, kind, vector_loads, bytes);
  known.emplace(key, blocks);
  return blocks;
}

struct SmallPlan {
  bool use = false;
  int groups = 0, group_channels = 0;
  std::string why_not;  // when it cannot run
};

// The small path's channel groups per image. A block stages (C / G) x H x W values of x (and of grad_out)
// in shared memory, so G >= C * H * W / kCbamSmallMaxStagedValues; all B x G blocks must be resident at once
// (cooperative launch). Within that, G aims at one block per SM (B x G ~ SMs), at most
// kCbamSmallMaxGroups and C. Larger G first: more blocks stream x; each step down retries the occupancy.
SmallPlan plan_small(const CbamParams& p, const at::Tensor& x) {
  SmallPlan plan;
  const int64_t hw = p.hw, channels = p.channels, batch = p.batch;
  if (hw > cuda::kCbamSmallMaxStagedValues) {
    plan.why_not = "one channel of H x W exceeds the shared-memory staging of a block";
    return plan;
  }
  const int sms = multiprocessors(x);
  const int64_t fewest = (channels * hw + cuda::kCbamSmallMaxStagedValues - 1) / cuda::kCbamSmallMaxStagedValues;
  int64_t most = std::min<int64_t>({channels, static_cast<int64_t>(cuda::kCbamSmallMaxGroups),
                                    std::max<int64_t>(1, sms / batch)});
  most = std::max(most, fewest);
  const int kind = kind_of(x, "cbam", "x");
  for (int64_t groups = most; groups >= fewest; --groups) {
    const int64_t group_channels = (channels + groups - 1) / groups;
    const int64_t used_groups = (channels + group_channels - 1) / group_channels;  // no empty group
    const int64_t bytes = static_cast<int64_t>(sizeof(float)) *
                          cuda::cbam_small_layout(p.channels, p.hw, p.hidden, p.ksize,
                                                  static_cast<int>(group_channels), /*backward=*/true).total;
    const int per_sm = small_blocks_per_sm(x.get_device(), kind, p.vector_loads, bytes);
    if (per_sm > 0 && batch * used_groups <= static_cast<int64_t>(per_sm) * sms) {
      plan.use = true;
      plan.groups = static_cast<int>(used_groups);
      plan.group_channels = static_cast<int>(group_channels);
      return plan;
    }
  }
  plan.why_not = "its " + std::to_string(batch) + " x (channel groups) blocks do not fit the GPU at once";
  return plan;
}

// The path of one call (see kPathEnvVar); raises when "small" is forced and cannot run.
SmallPlan choose_path(const CbamParams& p, const at::Tensor& x, const char* op) {
  const PathRequest request = requested_path(op);
  if (request == PathRequest::kPasses) return SmallPlan{};
  if (request == PathRequest::kAuto && p.hw > cuda::kCbamSmallMaxAutoPixels) return SmallPlan{};
  SmallPlan plan = plan_small(p, x);
  TORCH_CHECK(plan.use || request == PathRequest::kAuto, op, ": ", kPathEnvVar,
              "=small, but the small-shape kernels cannot run x of shape ", x.sizes(), ": ", plan.why_not);
  return plan;
}

void check_device(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(on_kernel_device(t), op, ": ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device());
}

void check_param(const at::Tensor& t, const at::Tensor& x, at::IntArrayRef shape, const char* op, const char* name) {
  check_device(t, x, op, name);
  kind_of(t, op, name);
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
}

void check_fp32_map(const at::Tensor& t, const at::Tensor& x, at::IntArrayRef shape, const char* op,
                    const char* name) {
  check_device(t, x, op, name);
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32 (a map saved by cbam_fwd), got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, " (as cbam_fwd returns it), got ",
              t.sizes());
}

// H and W indexed as one pixel axis (NCHW, channels-last and their slices along B or C).
// Review fix: with W == 1 the pixel axis is H, and stride(3) is arbitrary (torch ignores the strides
// of size-1 dims: x.transpose(2, 3) of a (B, C, 1, W) tensor is is_contiguous() with stride(3) == W,
// so contiguous() returned it unchanged and the kernels read pixel h at h * W, out of bounds). The
// pixel stride comes from pixel_stride() below; cuda_ops.flattenable mirrors this for the fakes.
bool flattenable(const at::Tensor& t) {
  return t.size(2) == 1 || t.size(3) == 1 || t.stride(2) == t.size(3) * t.stride(3);
}

int64_t pixel_stride(const at::Tensor& t) { return t.size(3) == 1 ? t.stride(2) : t.stride(3); }

at::Tensor pixel_flat(const at::Tensor& t) { return flattenable(t) ? t : t.contiguous(); }

// Like x (its memory format kept), H and W flattenable; the fake implementations do the same.
at::Tensor empty_like_pixels(const at::Tensor& x) {
  at::Tensor out = at::empty_like(x);
  return flattenable(out) ? out : at::empty_like(x, at::MemoryFormat::Contiguous);
}

// One 16-byte load per lane slot needs the slot's pixels dense and 16-byte aligned in every image and
// channel. Only the load instruction depends on this: which lane reads which pixel does not (the
// layout comes from the shape), so strided and dense tensors give the same result bits.
bool vector_loads_ok(const at::Tensor& t, int64_t vector_width) {
  if (vector_width <= 1) return false;
  const int64_t vector_bytes = vector_width * static_cast<int64_t>(t.element_size());
  const auto address = reinterpret_cast<std::uintptr_t>(t.data_ptr());
  return pixel_stride(t) == 1 && (t.size(1) == 1 || t.stride(1) % vector_width == 0) &&
         (t.size(0) == 1 || t.stride(0) % vector_width == 0) && address % static_cast<std::uintptr_t>(vector_bytes) == 0;
}

struct Sizes {
  int64_t batch, channels, height, width, hidden, ksize;
};

// Checks shared by forward and backward; returns the problem size.
Sizes check_inputs(const char* op, const at::Tensor& x, const at::Tensor& mlp1_w, const at::Tensor& mlp1_b,
                   const at::Tensor& mlp2_w, const at::Tensor& mlp2_b, const at::Tensor& conv_w,
                   const at::Tensor& bn_weight, const at::Tensor& bn_bias) {
  TORCH_CHECK(on_kernel_device(x), op, ": x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 4, op, ": x must be (B, C, H, W), got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, op,
              ": x must be float32, float16 or bfloat16, got ", x.scalar_type());
  Sizes s{x.size(0), x.size(1), x.size(2), x.size(3), 0, 0};
  TORCH_CHECK(s.batch > 0 && s.channels > 0 && s.height > 0 && s.width > 0, op,
              ": every dimension of x must be non-empty, got shape ", x.sizes());
  TORCH_CHECK(s.batch <= kMaxGridY, op, ": the CUDA kernels take a batch of at most ", kMaxGridY, ", got ", s.batch);
  // indices inside one image's maps (kPixRows rows of H * W) and channel indices are 32-bit
  TORCH_CHECK(kPixRows * s.height * s.width < (int64_t{1} << 31) && s.channels < (int64_t{1} << 31), op,
              ": x has too many pixels or channels for the CUDA kernels, shape ", x.sizes());
  TORCH_CHECK(mlp1_w.dim() == 2 && mlp1_w.size(1) == s.channels && mlp1_w.size(0) > 0, op,
              ": mlp1_w must be (hidden, ", s.channels, ") with hidden > 0, got shape ", mlp1_w.sizes());
  s.hidden = mlp1_w.size(0);
  TORCH_CHECK(conv_w.dim() == 4 && conv_w.size(0) == 1 && conv_w.size(1) == 2 && conv_w.size(2) == conv_w.size(3), op,
              ": conv_w must be (1, 2, k, k), got shape ", conv_w.sizes());
  s.ksize = conv_w.size(3);
  TORCH_CHECK(s.ksize % 2 == 1 && s.ksize <= cuda::kCbamMaxKernelSize, op,
              ": conv_w's kernel size must be odd and at most ", cuda::kCbamMaxKernelSize, " for the CUDA kernels, got ",
              s.ksize);
  check_param(mlp1_w, x, {s.hidden, s.channels}, op, "mlp1_w");
  check_param(mlp1_b, x, {s.hidden}, op, "mlp1_b");
  check_param(mlp2_w, x, {s.channels, s.hidden}, op, "mlp2_w");
  check_param(mlp2_b, x, {s.channels}, op, "mlp2_b");
  check_param(conv_w, x, {1, 2, s.ksize, s.ksize}, op, "conv_w");
  check_param(bn_weight, x, {1}, op, "bn_weight");
  check_param(bn_bias, x, {1}, op, "bn_bias");
  return s;
}

// Parameters are tiny: contiguous copies (when needed) cost nothing next to a pass over x.
struct ParamViews {
  at::Tensor mlp1_w, mlp1_b, mlp2_w, mlp2_b, conv_w, bn_weight, bn_bias;
};

CbamTensor view_of(const at::Tensor& t, const char* op, const char* name) {
  return CbamTensor{t.data_ptr(), kind_of(t, op, name)};
}

CbamOutTensor out_view_of(const at::Tensor& t, const char* op, const char* name) {
  return CbamOutTensor{t.data_ptr(), kind_of(t, op, name)};
}

void set_common(CbamParams& p, const Sizes& s, const at::Tensor& x, ParamViews& keep, const at::Tensor& mlp1_w,
                const at::Tensor& mlp1_b, const at::Tensor& mlp2_w, const at::Tensor& mlp2_b, const at::Tensor& conv_w,
                const at::Tensor& bn_weight, const at::Tensor& bn_bias, bool use_batch_stats, const char* op) {
  p = CbamParams{};
  p.batch = static_cast<int>(s.batch);
  p.channels = static_cast<int>(s.channels);
  p.height = static_cast<int>(s.height);
  p.width = static_cast<int>(s.width);
  p.hw = static_cast<int>(s.height * s.width);
  p.hidden = static_cast<int>(s.hidden);
  p.ksize = static_cast<int>(s.ksize);
  p.use_batch_stats = use_batch_stats;
  const cuda::CbamTiling t = cuda::cbam_choose_tiling(p.batch, p.channels, p.height, p.width,
                                                      static_cast<int>(x.element_size()), multiprocessors(x));
  p.vector_width = t.vector_width;
  p.pixels_per_lane = t.pixels_per_lane;
  p.tile_pixels = t.tile_pixels;
  p.num_pixel_tiles = t.num_pixel_tiles;
  p.channel_groups = t.channel_groups;
  p.channel_splits = t.channel_splits;
  p.vector_loads = false;  // set once every x-sized tensor of the call is known (vector_loads_ok)
  p.conv_tiles_x = t.conv_tiles_x;
  p.conv_tiles_y = t.conv_tiles_y;
  p.num_conv_tiles = t.num_conv_tiles;
  p.x = x.data_ptr();
  p.x_batch_stride = x.stride(0);
  p.x_channel_stride = x.stride(1);
  p.x_pixel_stride = pixel_stride(x);
  keep = ParamViews{mlp1_w.contiguous(), mlp1_b.contiguous(), mlp2_w.contiguous(), mlp2_b.contiguous(),
                    conv_w.contiguous(), bn_weight.contiguous(), bn_bias.contiguous()};
  p.mlp1_w = view_of(keep.mlp1_w, op, "mlp1_w");
  p.mlp1_b = view_of(keep.mlp1_b, op, "mlp1_b");
  p.mlp2_w = view_of(keep.mlp2_w, op, "mlp2_w");
  p.mlp2_b = view_of(keep.mlp2_b, op, "mlp2_b");
  p.conv_w = view_of(keep.conv_w, op, "conv_w");
  p.bn_weight = view_of(keep.bn_weight, op, "bn_weight");
  p.bn_bias = view_of(keep.bn_bias, op, "bn_bias");
}

void check_launch(int code, const char* op) {
  TORCH_CHECK(code == 0, op, ": CUDA kernel launch failed: ", cuda::cbam_error_string(code));
}

// Carves one fp32 scratch allocation into the buffers of a call (one allocator round trip).
class Scratch {
 public:
  void add(float** slot, int64_t count) { requests_.push_back({slot, count}); }
  at::Tensor allocate(const at::Tensor& like) {
    int64_t total = 0;
    for (const auto& r : requests_) total += r.count;
    at::Tensor buffer = at::empty({total}, like.options().dtype(at::kFloat));
    float* base = buffer.data_ptr<float>();
    for (const auto& r : requests_) {
      *r.slot = base;
      base += r.count;
    }
    return buffer;
  }

 private:
  struct Request {
    float** slot;
    int64_t count;
  };
  std::vector<Request> requests_;
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cbam_fwd_cuda(
    const at::Tensor& x_in, const at::Tensor& mlp1_w, const at::Tensor& mlp1_b, const at::Tensor& mlp2_w,
    const at::Tensor& mlp2_b, const at::Tensor& conv_w, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    bool use_batch_stats, double eps) {
  const char* op = "cbam_fwd";
  const Sizes s = check_inputs(op, x_in, mlp1_w, mlp1_b, mlp2_w, mlp2_b, conv_w, bn_weight, bn_bias);
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(), op,
              ": running_mean and running_var: give both or neither");
  if (running_mean) {
    check_param(*running_mean, x_in, {1}, op, "running_mean");
    check_param(*running_var, x_in, {1}, op, "running_var");
  }
  TORCH_CHECK(use_batch_stats || running_mean, op,
              ": running_mean and running_var are required when use_batch_stats=False (they normalise)");
  TORCH_CHECK(!use_batch_stats || s.batch * s.height * s.width > 1, op,
              ": batch statistics need more than one value per channel, got x of shape ", x_in.sizes());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = pixel_flat(x_in);
  CbamParams p;
  ParamViews keep;
  set_common(p, s, x, keep, mlp1_w, mlp1_b, mlp2_w, mlp2_b, conv_w, bn_weight, bn_bias, use_batch_stats, op);
  p.eps = static_cast<float>(eps);
  at::Tensor running_mean_c, running_var_c;
  if (running_mean) {
    running_mean_c = running_mean->contiguous();
    running_var_c = running_var->contiguous();
    p.running_mean = view_of(running_mean_c, op, "running_mean");
    p.running_var = view_of(running_var_c, op, "running_var");
  }

  at::Tensor out = empty_like_pixels(x);
  p.out = out.data_ptr();
  p.out_batch_stride = out.stride(0);
  p.out_channel_stride = out.stride(1);
  p.out_pixel_stride = pixel_stride(out);
  p.vector_loads = vector_loads_ok(x, p.vector_width) && vector_loads_ok(out, p.vector_width);
  const auto fp32 = x.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous);
  at::Tensor cs = at::empty({s.batch, s.channels}, fp32);
  at::Tensor chan = at::empty({s.batch, kChanRows, s.channels}, fp32);
  at::Tensor pix = at::empty({s.batch, kPixRows, s.height * s.width}, fp32);
  at::Tensor stats = at::empty({kStatsLen}, fp32);
  p.cs = cs.data_ptr<float>();
  p.chan = chan.data_ptr<float>();
  p.pix = pix.data_ptr<float>();
  p.stats = stats.data_ptr<float>();
  const SmallPlan plan = choose_path(p, x, op);
  Scratch scratch;
  if (plan.use) {
    p.small_groups = plan.groups;
    p.small_group_channels = plan.group_channels;
    scratch.add(&p.small_parts, 3 * static_cast<int64_t>(plan.groups) * s.batch * s.height * s.width);
    scratch.add(&p.small_image, 3 * s.batch);
  } else {
    scratch.add(&p.pool_parts, 3 * s.batch * s.channels * p.num_pixel_tiles);
    scratch.add(&p.conv_parts, 3 * s.batch * p.num_conv_tiles);
    scratch.add(&p.hidden_buf, s.batch * s.hidden);
    scratch.add(&p.pixel_parts, p.channel_splits > 1 ? 3 * p.channel_splits * s.batch * s.height * s.width : 0);
  }
  const at::Tensor keep_scratch = scratch.allocate(x);
  if (poison_requested()) poison({out, cs, chan, pix, stats, keep_scratch});
  const int dtype_code = kind_of(x, op, "x");
  void* stream = current_stream(x);
  int status = 0;
  if (plan.use) {
    status = cuda::cbam_small_forward(p, dtype_code, stream);
  } else {
    switch (dtype_code) {
      case cuda::kCbamFloat16: status = cuda::cbam_forward_half(p, stream); break;
      case cuda::kCbamBFloat16: status = cuda::cbam_forward_bfloat16(p, stream); break;
      default: status = cuda::cbam_forward_float(p, stream);
    }
  }
  check_launch(status, op);
  return {out, cs, chan, pix, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
cbam_bwd_cuda(const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& mlp1_w, const at::Tensor& mlp1_b,
              const at::Tensor& mlp2_w, const at::Tensor& mlp2_b, const at::Tensor& conv_w,
              const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& cs_in,
              const at::Tensor& chan_in, const at::Tensor& pix_in, const at::Tensor& stats_in, bool use_batch_stats) {
  const char* op = "cbam_bwd";
  const Sizes s = check_inputs(op, x_in, mlp1_w, mlp1_b, mlp2_w, mlp2_b, conv_w, bn_weight, bn_bias);
  check_device(grad_in, x_in, op, "grad_out");
  TORCH_CHECK(grad_in.sizes() == x_in.sizes(), op, ": grad_out must have x's shape ", x_in.sizes(), ", got ",
              grad_in.sizes());
  TORCH_CHECK(grad_in.scalar_type() == x_in.scalar_type(), op, ": grad_out must have x's dtype ", x_in.scalar_type(),
              ", got ", grad_in.scalar_type());
  const int64_t hw = s.height * s.width;
  check_fp32_map(cs_in, x_in, {s.batch, s.channels}, op, "cs");
  check_fp32_map(chan_in, x_in, {s.batch, kChanRows, s.channels}, op, "chan");
  check_fp32_map(pix_in, x_in, {s.batch, kPixRows, hw}, op, "pix");
  check_fp32_map(stats_in, x_in, {kStatsLen}, op, "stats");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = pixel_flat(x_in), grad = pixel_flat(grad_in);
  const at::Tensor cs = cs_in.contiguous(), chan = chan_in.contiguous(), pix = pix_in.contiguous(),
                   stats = stats_in.contiguous();
  CbamParams p;
  ParamViews keep;
  set_common(p, s, x, keep, mlp1_w, mlp1_b, mlp2_w, mlp2_b, conv_w, bn_weight, bn_bias, use_batch_stats, op);
  p.grad = grad.data_ptr();
  p.grad_batch_stride = grad.stride(0);
  p.grad_channel_stride = grad.stride(1);
  p.grad_pixel_stride = pixel_stride(grad);
  // read only by the kernels (the saved maps are inputs of this op)
  p.cs = const_cast<float*>(cs.data_ptr<float>());
  p.chan = const_cast<float*>(chan.data_ptr<float>());
  p.pix = const_cast<float*>(pix.data_ptr<float>());
  p.stats = const_cast<float*>(stats.data_ptr<float>());

  at::Tensor dx = empty_like_pixels(x);
  p.out = dx.data_ptr();
  p.out_batch_stride = dx.stride(0);
  p.out_channel_stride = dx.stride(1);
  p.out_pixel_stride = pixel_stride(dx);
  p.vector_loads = vector_loads_ok(x, p.vector_width) && vector_loads_ok(grad, p.vector_width) &&
                   vector_loads_ok(dx, p.vector_width);
  auto grad_like = [](const at::Tensor& param) { return at::empty(param.sizes(), param.options()); };
  at::Tensor d_mlp1_w = grad_like(mlp1_w), d_mlp1_b = grad_like(mlp1_b), d_mlp2_w = grad_like(mlp2_w),
             d_mlp2_b = grad_like(mlp2_b), d_conv_w = grad_like(conv_w), d_bn_weight = grad_like(bn_weight),
             d_bn_bias = grad_like(bn_bias);
  p.d_mlp1_w = out_view_of(d_mlp1_w, op, "mlp1_w");
  p.d_mlp1_b = out_view_of(d_mlp1_b, op, "mlp1_b");
  p.d_mlp2_w = out_view_of(d_mlp2_w, op, "mlp2_w");
  p.d_mlp2_b = out_view_of(d_mlp2_b, op, "mlp2_b");
  p.d_conv_w = out_view_of(d_conv_w, op, "conv_w");
  p.d_bn_weight = out_view_of(d_bn_weight, op, "bn_weight");
  p.d_bn_bias = out_view_of(d_bn_bias, op, "bn_bias");
  const SmallPlan plan = choose_path(p, x, op);
  Scratch scratch;
  if (plan.use) {
    p.small_groups = plan.groups;
    p.small_group_channels = plan.group_channels;
    scratch.add(&p.small_parts, static_cast<int64_t>(plan.groups) * s.batch * hw);
    scratch.add(&p.small_image, 2 * s.batch);
    scratch.add(&p.conv_wparts, 2 * s.ksize * s.ksize * s.batch);
    scratch.add(&p.d_logit, s.batch * s.channels);
    scratch.add(&p.hidden_buf, kHidRows * s.batch * s.hidden);
  } else {
    scratch.add(&p.bpix, kBpixRows * s.batch * hw);
    scratch.add(&p.dcs_parts, s.batch * s.channels * p.num_pixel_tiles);
    scratch.add(&p.dcs_parts2, s.batch * s.channels * p.num_pixel_tiles);
    scratch.add(&p.pixel_parts, p.channel_splits > 1 ? p.channel_splits * s.batch * hw : 0);
    scratch.add(&p.bn_parts, 2 * s.batch * p.num_pixel_tiles);
    scratch.add(&p.coef, 3);
    scratch.add(&p.conv_wparts, 2 * s.ksize * s.ksize * s.batch * p.num_conv_tiles);
    scratch.add(&p.d_logit, s.batch * s.channels);
    scratch.add(&p.dchan, 2 * s.batch * s.channels);
    scratch.add(&p.hidden_buf, kHidRows * s.batch * s.hidden);
  }
  const at::Tensor keep_scratch = scratch.allocate(x);
  if (poison_requested())
    poison({dx, d_mlp1_w, d_mlp1_b, d_mlp2_w, d_mlp2_b, d_conv_w, d_bn_weight, d_bn_bias, keep_scratch});
  const int dtype_code = kind_of(x, op, "x");
  void* stream = current_stream(x);
  int status = 0;
  if (plan.use) {
    status = cuda::cbam_small_backward(p, dtype_code, stream);
  } else {
    switch (dtype_code) {
      case cuda::kCbamFloat16: status = cuda::cbam_backward_half(p, stream); break;
      case cuda::kCbamBFloat16: status = cuda::cbam_backward_bfloat16(p, stream); break;
      default: status = cuda::cbam_backward_float(p, stream);
    }
  }
  check_launch(status, op);
  return {dx, d_mlp1_w, d_mlp1_b, d_mlp2_w, d_mlp2_b, d_conv_w, d_bn_weight, d_bn_bias};
}

void cbam_update_running_stats_cuda(const at::Tensor& running_mean, const at::Tensor& running_var,
                                    const at::Tensor& stats, double momentum) {
  const char* op = "cbam_update_running_stats";
  TORCH_CHECK(on_kernel_device(stats), op, ": stats must be a CUDA tensor, got ", stats.device());
  check_param(running_mean, stats, {1}, op, "running_mean");
  check_param(running_var, stats, {1}, op, "running_var");
  TORCH_CHECK(running_mean.is_contiguous() && running_var.is_contiguous(), op,
              ": running_mean and running_var must be contiguous (they are updated in place)");
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.sizes() == at::IntArrayRef{kStatsLen}, op,
              ": stats must be the float32 (4,) statistics returned by cbam_fwd, got ", stats.scalar_type(), " ",
              stats.sizes());
  const c10::cuda::CUDAGuard guard(stats.device());
  const at::Tensor stats_c = stats.contiguous();
  check_launch(cuda::cbam_update_running_stats(out_view_of(running_mean, op, "running_mean"),
                                               out_view_of(running_var, op, "running_var"),
                                               stats_c.data_ptr<float>(), static_cast<float>(momentum),
                                               current_stream(stats)),
               op);
}

}  // namespace

TORCH_LIBRARY_IMPL(dermomamba, CUDA, m) {
  m.impl("cbam_fwd", &cbam_fwd_cuda);
  m.impl("cbam_bwd", &cbam_bwd_cuda);
  m.impl("cbam_update_running_stats", &cbam_update_running_stats_cuda);
}

}  // namespace dermomamba
