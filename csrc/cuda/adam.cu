// CUDA kernels of adam8::adam_step and adam8::adam8bit_step: the math of adam8_math.h, one launch
// per pack of tensors of one parameter dtype (launch.cuh). Per pack: a prologue computes each
// tensor's constants; when the update needs per-tensor sums or maxima first (max_unorm; 8-bit
// states with one scale per tensor), a stats kernel computes the same moments without writing them
// and a second prologue folds the result in; then the update; then, for per-tensor scales, the new
// scales are stored (after every block has read the old ones).
#include <mutex>
#include <type_traits>
#include <unordered_map>

#include "../checks.h"
#include "../kernels.h"
#include "launch.cuh"

namespace adam8 {
namespace cuda {
namespace {

// torch.amp.GradScaler found an inf or NaN gradient (found_inf != 0): every kernel of the step
// returns at once, read on the device (no sync). `skip` is nullptr without a GradScaler.
__device__ __forceinline__ bool skip_step(const float* skip) { return skip != nullptr && *skip != 0.0f; }

struct Hyper {
  double eps, weight_decay, max_unorm;
};

// The prologue: each tensor's constants for its next step count, and the count advanced (unless
// GradScaler skips the step), one thread per tensor.
template <class P>
__global__ void scalars_kernel(P pack, const float* lr, const double* betas, Hyper h, const float* skip,
                               AdamScalars* out) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t < pack.count) {
    const float grad_scale = pack.scale[t] != nullptr ? *pack.scale[t] : 1.0f;
    const float step = *pack.step[t] + 1.0f;  // as torch's step += 1, in float
    out[t] = adam_scalars(*lr, step, betas[0], betas[1], h.eps, h.weight_decay, grad_scale);
    if (!skip_step(skip)) *pack.step[t] = step;
  }
}

__global__ void unorm_kernel(int count, const StepStats* stats, double max_unorm, AdamScalars* scalars) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t < count) scalars[t].step_size *= unorm_scale(stats[t].dir_sq, stats[t].p_sq, scalars[t].bc1, max_unorm);
}

// One pack's slots of the scratch: each tensor's constants and, when the update needs them, its stats.
struct PackScratch {
  AdamScalars* scalars;
  StepStats* stats;
};

// Scratch of one op call, its slots taken pack by pack (the stats zeroed: they are accumulated). One
// buffer for all packs, so a pack costs no allocation or memset.
class Scratch {
 public:
  Scratch(int64_t n, bool with_stats, const at::TensorOptions& options) {
    // The stats follow the constants, at their alignment (their doubles are updated atomically).
    constexpr int64_t align = alignof(StepStats);
    const int64_t scalar_bytes = (n * static_cast<int64_t>(sizeof(AdamScalars)) + align - 1) / align * align;
    const int64_t stat_bytes = with_stats ? n * static_cast<int64_t>(sizeof(StepStats)) : 0;
    bytes_ = at::empty({scalar_bytes + stat_bytes}, options.dtype(at::kByte));
    scalars_ = reinterpret_cast<AdamScalars*>(bytes_.data_ptr());
    stats_ = with_stats ? reinterpret_cast<StepStats*>(bytes_.data_ptr<uint8_t>() + scalar_bytes) : nullptr;
    if (with_stats) bytes_.narrow(0, scalar_bytes, stat_bytes).zero_();
  }

  // The next `count` slots.
  PackScratch take(int64_t count) {
    const PackScratch s{scalars_ + used_, stats_ == nullptr ? nullptr : stats_ + used_};
    used_ += count;
    return s;
  }

 private:
  at::Tensor bytes_;
  AdamScalars* scalars_;
  StepStats* stats_;
  int64_t used_ = 0;
};

// A pack's slots of the scratch, its constants launched into them.
template <class P>
PackScratch launch_scalars(const P& pack, const at::Tensor& lr, const at::Tensor& betas, const Hyper& h,
                           const float* skip, Scratch& scratch, cudaStream_t stream) {
  const PackScratch s = scratch.take(pack.count);
  scalars_kernel<<<(pack.count + 127) / 128, 128, 0, stream>>>(pack, lr.data_ptr<float>(), betas.data_ptr<double>(), h,
                                                                skip, s.scalars);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return s;
}

void launch_unorm(const PackScratch& s, int count, double max_unorm, cudaStream_t stream) {
  if (max_unorm <= 0.0) return;
  unorm_kernel<<<(count + 127) / 128, 128, 0, stream>>>(count, s.stats, max_unorm, s.scalars);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Sums and maxima of one thread's lanes, reduced over the warp, then added to the tensor's stats.
struct ThreadStats {
  double dir_sq = 0.0, p_sq = 0.0;
  int32_t max1 = 0, max2 = 0, max3 = 0;  // abs_bits

  template <bool kAmsgrad>
  __device__ void add(float p, float m, float v, float vm, bool update, const AdamScalars& s) {
    const float d = adam_direction(m, kAmsgrad ? vm : v, s);
    dir_sq += update ? static_cast<double>(d * d) : 0.0;
    p_sq += static_cast<double>(p * p);
    max1 = max_abs_bits<float, int32_t>(max1, m);
    max2 = max_abs_bits<float, int32_t>(max2, v);
    max3 = max_abs_bits<float, int32_t>(max3, vm);
  }
  __device__ void flush(StepStats* out) {
    dir_sq = warp_sum(dir_sq);
    p_sq = warp_sum(p_sq);
    max1 = warp_max_bits(max1);
    max2 = warp_max_bits(max2);
    max3 = warp_max_bits(max3);
    if (threadIdx.x % 32 == 0) {
      atomicAdd(&out->dir_sq, dir_sq);
      atomicAdd(&out->p_sq, p_sq);
      atomic_max_bits(&out->max1, max1);
      atomic_max_bits(&out->max2, max2);
      atomic_max_bits(&out->max3, max3);
    }
  }
};

// A pre-pass thread's share: the moments of its loaded lanes (x: Lanes32 or Lanes8), not stored.
template <bool kAmsgrad, class X>
__device__ __forceinline__ void add_stats(X& x, int valid, const AdamScalars& s, bool skip_zeros, ThreadStats& acc) {
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const bool update = adam_moments<kAmsgrad, X::kQuantized>(x.g[j], x.m[j], x.v[j], x.vm[j], s, skip_zeros);
    if (j < valid) acc.add<kAmsgrad>(x.p[j], x.m[j], x.v[j], x.vm[j], update, s);
  }
}

// ---------------------------------------------------------------- 32-bit states
// Lists: params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs. A pack of 5 lists of 384 tensors
// stays under the 32 KB kernel-argument limit (26.5 KB).
using Pack32 = Pack<5, 384>;

template <bool kAmsgrad, class T>
struct Lanes32 {
  static constexpr bool kQuantized = false;
  float p[kPerThread], g[kPerThread], m[kPerThread], v[kPerThread], vm[kPerThread];

  __device__ void load(const Pack32& pack, int t, int64_t start, int valid, bool vec) {
    load_lanes(static_cast<const T*>(pack.ptr[0][t]) + start, valid, vec, p);
    load_lanes(static_cast<const T*>(pack.ptr[1][t]) + start, valid, vec, g);
    load_lanes(static_cast<const float*>(pack.ptr[2][t]) + start, valid, vec, m);
    load_lanes(static_cast<const float*>(pack.ptr[3][t]) + start, valid, vec, v);
    if (kAmsgrad) {
      load_lanes(static_cast<const float*>(pack.ptr[4][t]) + start, valid, vec, vm);
    } else {
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) vm[j] = 0.0f;
    }
  }
};

template <bool kAmsgrad, class T>
__global__ void __launch_bounds__(kThreads) adam32_kernel(Pack32 pack, const AdamScalars* scalars, bool skip_zeros,
                                                          const float* skip) {
  if (skip_step(skip)) return;
  const int t = pack_tensor(pack, blockIdx.x);
  const AdamScalars s = scalars[t];
  int64_t start;
  const int valid = lanes_of(pack, t, blockIdx.x, &start);
  if (valid == 0) return;
  const bool vec = pack.aligned[t];
  Lanes32<kAmsgrad, T> x;
  x.load(pack, t, start, valid, vec);
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    adam_update<kAmsgrad, false>(x.p[j], x.g[j], x.m[j], x.v[j], x.vm[j], s, skip_zeros);
  }
  store_lanes(static_cast<T*>(pack.ptr[0][t]) + start, valid, vec, x.p);
  store_lanes(static_cast<float*>(pack.ptr[2][t]) + start, valid, vec, x.m);
  store_lanes(static_cast<float*>(pack.ptr[3][t]) + start, valid, vec, x.v);
  if (kAmsgrad) store_lanes(static_cast<float*>(pack.ptr[4][t]) + start, valid, vec, x.vm);
}

template <bool kAmsgrad, class T>
__global__ void __launch_bounds__(kThreads) adam32_stats_kernel(Pack32 pack, const AdamScalars* scalars,
                                                                bool skip_zeros, StepStats* stats,
                                                                const float* skip) {
  if (skip_step(skip)) return;
  const int t = pack_tensor(pack, blockIdx.x);  // one tensor per CUDA block: the warps agree on t
  const AdamScalars s = scalars[t];
  int64_t start;
  const int valid = lanes_of(pack, t, blockIdx.x, &start);
  ThreadStats acc;
  if (valid > 0) {
    Lanes32<kAmsgrad, T> x;
    x.load(pack, t, start, valid, pack.aligned[t]);
    add_stats<kAmsgrad>(x, valid, s, skip_zeros, acc);
  }
  acc.flush(stats + t);
}

// ---------------------------------------------------------------- 8-bit states
// Lists: params, grads, state1, state2, state3, absmax1, absmax2, absmax3 (8 lists of 256 tensors:
// 23.8 KB of kernel arguments).
using Pack8 = Pack<8, 256>;

// The 8-bit kernels keep both codes and their tables in shared memory: a quantization is one
// shared-memory read instead of a scattered global one. Their blocks are persistent (a grid of as
// many as fit on the GPU, each looping over chunks), so the 52 KB are loaded once per block.
struct Shared8 {
  int32_t lut[2][kLutSize];
  float code[2][kCodeSize];
  float bounds[2][kCodeSize - 1];
};

// Fills `sh` and returns each code's view (the bounds only for a code its table cannot represent).
__device__ void load_shared(Shared8& sh, const float* code1, const float* code2, const int32_t* luts,
                           QuantLut (&view)[2]) {
  for (int c = 0; c < 2; ++c) {
    const int32_t* table = luts + c * kLutStride;
    const int4* src = reinterpret_cast<const int4*>(table);
    int4* dst = reinterpret_cast<int4*>(sh.lut[c]);
    for (int i = threadIdx.x; i < kLutSize / 4; i += kThreads) dst[i] = src[i];
    const float* code = c == 0 ? code1 : code2;
    for (int i = threadIdx.x; i < kCodeSize; i += kThreads) sh.code[c][i] = code[i];
    view[c] = {sh.code[c], sh.bounds[c], sh.lut[c], lut_is_fast(table)};
    if (!view[c].fast) load_bounds(code, sh.bounds[c]);
  }
  __syncthreads();
}

// One thread's kPerThread elements of one chunk, dequantized; a warp holds one state block.
template <bool kAmsgrad, class T>
struct Lanes8 {
  static constexpr bool kQuantized = true;
  float p[kPerThread], g[kPerThread], m[kPerThread], v[kPerThread], vm[kPerThread];
  int32_t c1[kPerThread], c2[kPerThread], c3[kPerThread];
  int valid;
  bool vec;
  int64_t offset, scale_index;

  // scale_index: the state block's absmax (blockwise) or 0 (one scale per tensor).
  __device__ void load(const Pack8& pack, int t, int64_t start, int n_valid, bool block_wise, const QuantLut& lut1,
                       const QuantLut& lut2) {
    valid = n_valid;
    vec = pack.aligned[t];
    offset = valid > 0 ? start : 0;  // lanes past the end take part in the reductions only
    scale_index = block_wise ? start / kStateBlock : 0;
    load_lanes(static_cast<const T*>(pack.ptr[0][t]) + offset, valid, vec, p);
    load_lanes(static_cast<const T*>(pack.ptr[1][t]) + offset, valid, vec, g);
    load_codes(static_cast<const uint8_t*>(pack.ptr[2][t]) + offset, valid, vec, c1);
    load_codes(static_cast<const uint8_t*>(pack.ptr[3][t]) + offset, valid, vec, c2);
    if (kAmsgrad) load_codes(static_cast<const uint8_t*>(pack.ptr[4][t]) + offset, valid, vec, c3);
    const float a1 = static_cast<const float*>(pack.ptr[5][t])[scale_index];
    const float a2 = static_cast<const float*>(pack.ptr[6][t])[scale_index];
    const float a3 = kAmsgrad ? static_cast<const float*>(pack.ptr[7][t])[scale_index] : 0.0f;
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      m[j] = dequantize_one<float, int32_t>(c1[j], lut1.code, a1);
      v[j] = dequantize_one<float, int32_t>(c2[j], lut2.code, a2);
      vm[j] = kAmsgrad ? dequantize_one<float, int32_t>(c3[j], lut2.code, a3) : 0.0f;
    }
  }
};

__device__ __forceinline__ int32_t quantize_one(float x, const QuantLut& lut) {
  return lut.fast ? code_index_lut<float, int32_t>(x, lut) : code_index_search(x, lut.bounds);
}

template <bool kAmsgrad, class T>
__device__ __forceinline__ void adam8bit_lanes(const Pack8& pack, int t, int64_t start, int valid,
                                               const AdamScalars& s, bool skip_zeros, const StepStats* tensor_scales,
                                               const QuantLut& lut1, const QuantLut& lut2, int32_t v_first_positive) {
  const bool block_wise = tensor_scales == nullptr;
  Lanes8<kAmsgrad, T> x;
  x.load(pack, t, start, valid, block_wise, lut1, lut2);
  int32_t bits1 = 0, bits2 = 0, bits3 = 0;  // abs_bits
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    adam_update<kAmsgrad, true>(x.p[j], x.g[j], x.m[j], x.v[j], x.vm[j], s, skip_zeros);
    if (j < valid) {
      bits1 = max_abs_bits<float, int32_t>(bits1, x.m[j]);
      bits2 = max_abs_bits<float, int32_t>(bits2, x.v[j]);
      bits3 = max_abs_bits<float, int32_t>(bits3, x.vm[j]);
    }
  }
  float max1, max2, max3;
  if (block_wise) {
    // (every lane has read the old absmax before lane 0 writes the new one)
    max1 = float_of(warp_max_bits(bits1));
    max2 = float_of(warp_max_bits(bits2));
    max3 = float_of(warp_max_bits(bits3));
    if (threadIdx.x % 32 == 0) {
      static_cast<float*>(pack.ptr[5][t])[x.scale_index] = max1;
      static_cast<float*>(pack.ptr[6][t])[x.scale_index] = max2;
      if (kAmsgrad) static_cast<float*>(pack.ptr[7][t])[x.scale_index] = max3;
    }
  } else {
    max1 = tensor_scales->max1;
    max2 = tensor_scales->max2;
    max3 = tensor_scales->max3;
  }
  const float inv1 = inv_absmax(max1), inv2 = inv_absmax(max2), inv3 = inv_absmax(max3);
  // Blocks below 2^-64 (block_prescale; the same for the whole warp, rarely taken)
  const float pre1 = block_prescale(max1), pre2 = block_prescale(max2), pre3 = block_prescale(max3);
  if (pre1 != 1.0f || pre2 != 1.0f || pre3 != 1.0f) {
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      x.m[j] *= pre1;
      x.v[j] *= pre2;
      x.vm[j] *= pre3;
    }
  }
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    x.c1[j] = quantize_one(x.m[j] * inv1, lut1);
    const float v = x.v[j] * inv2, vm = x.vm[j] * inv3;
    // (a block normalised by 0, inv_absmax: the sign from the value itself)
    x.c2[j] = keep_positive<float, int32_t>(quantize_one(v, lut2), inv2 == 0.0f ? x.v[j] : v, v_first_positive);
    if (kAmsgrad) {
      x.c3[j] = keep_positive<float, int32_t>(quantize_one(vm, lut2), inv3 == 0.0f ? x.vm[j] : vm, v_first_positive);
    }
  }
  store_lanes(static_cast<T*>(pack.ptr[0][t]) + x.offset, valid, x.vec, x.p);
  store_codes(static_cast<uint8_t*>(pack.ptr[2][t]) + x.offset, valid, x.vec, x.c1);
  store_codes(static_cast<uint8_t*>(pack.ptr[3][t]) + x.offset, valid, x.vec, x.c2);
  if (kAmsgrad) store_codes(static_cast<uint8_t*>(pack.ptr[4][t]) + x.offset, valid, x.vec, x.c3);
}

// Blocks of the 8-bit update asked to fit on one SM (sm_90, 256 threads): left to itself the
// compiler takes 82-96 registers, so only 2 blocks fit, and on an H100 a 1B-value step took 11.4 ms;
// capped at 4 blocks (64 registers, 20-32 bytes of spill without amsgrad) it took 8.1 ms
// (benchmarks/RESULTS.md, session 11). amsgrad's kernel spills 100-128 bytes at 64 registers and
// none at 3 blocks (80). Overridable at build time (TORCHADAM8_CUDA_FLAGS) for tuning on a GPU.
#ifndef ADAM8_8BIT_MIN_BLOCKS
#define ADAM8_8BIT_MIN_BLOCKS 4
#endif
#ifndef ADAM8_8BIT_MIN_BLOCKS_AMSGRAD
#define ADAM8_8BIT_MIN_BLOCKS_AMSGRAD 3
#endif

// The update. `stats` (per-tensor scales) is nullptr for blockwise scales.
template <bool kAmsgrad, class T>
__global__ void __launch_bounds__(kThreads, kAmsgrad ? ADAM8_8BIT_MIN_BLOCKS_AMSGRAD : ADAM8_8BIT_MIN_BLOCKS)
    adam8bit_kernel(Pack8 pack, const AdamScalars* scalars, bool skip_zeros, const StepStats* stats,
                    const float* code1, const float* code2, const int32_t* luts, const float* skip) {
  if (skip_step(skip)) return;
  extern __shared__ __align__(16) unsigned char smem[];
  Shared8& sh = *reinterpret_cast<Shared8*>(smem);
  QuantLut view[2];
  load_shared(sh, code1, code2, luts, view);
  const QuantLut lut1 = view[0], lut2 = view[1];
  const int32_t v_first_positive = first_positive_code(lut2.code);  // (shared memory, after load_shared's sync)
  const int32_t chunks = pack.first_block[pack.count];
  for (int32_t chunk = blockIdx.x; chunk < chunks; chunk += gridDim.x) {
    const int t = pack_tensor(pack, chunk);
    int64_t start;
    const int valid = lanes_of(pack, t, chunk, &start);
    if (pack.numel[t] > start - (threadIdx.x % 32) * kPerThread) {  // the warp's state block exists
      adam8bit_lanes<kAmsgrad, T>(pack, t, start, valid, scalars[t], skip_zeros,
                                  stats == nullptr ? nullptr : stats + t, lut1, lut2, v_first_positive);
    }
  }
}

// The pre-pass: each tensor's sums and new maxima (codes only: no tables needed).
template <bool kAmsgrad, class T>
__global__ void __launch_bounds__(kThreads) adam8bit_stats_kernel(Pack8 pack, const AdamScalars* scalars,
                                                                  bool skip_zeros, bool block_wise,
                                                                  const float* code1, const float* code2,
                                                                  StepStats* stats, const float* skip) {
  if (skip_step(skip)) return;
  __shared__ float code[2][kCodeSize];
  for (int i = threadIdx.x; i < kCodeSize; i += kThreads) {
    code[0][i] = code1[i];
    code[1][i] = code2[i];
  }
  __syncthreads();
  const QuantLut lut1{code[0], nullptr, nullptr, false}, lut2{code[1], nullptr, nullptr, false};
  const int t = pack_tensor(pack, blockIdx.x);
  const AdamScalars s = scalars[t];
  int64_t start;
  const int valid = lanes_of(pack, t, blockIdx.x, &start);
  ThreadStats acc;
  if (valid > 0) {
    Lanes8<kAmsgrad, T> x;
    x.load(pack, t, start, valid, block_wise, lut1, lut2);
    add_stats<kAmsgrad>(x, valid, s, skip_zeros, acc);
  }
  acc.flush(stats + t);
}

// Stores each tensor's new per-tensor scales.
__global__ void store_scales_kernel(Pack8 pack, const StepStats* stats, const float* skip) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t < pack.count && !skip_step(skip)) {
    *static_cast<float*>(pack.ptr[5][t]) = stats[t].max1;
    *static_cast<float*>(pack.ptr[6][t]) = stats[t].max2;
    if (pack.ptr[7][t] != nullptr) *static_cast<float*>(pack.ptr[7][t]) = stats[t].max3;
  }
}

// Persistent grid of the 8-bit kernel: as many blocks as are resident at once (at most `chunks`).
// (The shared-memory attribute is set per device on first use, before any capture.)
template <bool kAmsgrad, class T>
int adam8bit_grid(int32_t chunks) {
  static std::mutex mutex;
  static std::unordered_map<int, int> resident;  // by device
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  std::lock_guard<std::mutex> lock(mutex);
  auto it = resident.find(device);
  if (it == resident.end()) {
    auto kernel = adam8bit_kernel<kAmsgrad, T>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, sizeof(Shared8)));
    int per_sm = 0, sms = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, sizeof(Shared8)));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    TORCH_CHECK(per_sm > 0, "adam8: the 8-bit kernel's ", sizeof(Shared8), " bytes of shared memory do not fit this GPU");
    it = resident.emplace(device, per_sm * sms).first;
  }
  return std::min<int32_t>(chunks, it->second);
}

// Calls f(std::integral_constant<bool, flag>{}) and f(T{}) with T the parameter dtype's C++ type.
template <class F>
void dispatch(bool flag, at::ScalarType dtype, F&& f) {
  dispatch_float(dtype, [&](auto tag) {
    if (flag) f(std::true_type{}, tag); else f(std::false_type{}, tag);
  });
}

// The step counts of empty tensors (which no pack holds, so no prologue advances) advance by one,
// or stay where GradScaler skipped the step.
void advance_empty_steps(at::TensorList params, at::TensorList steps, const c10::optional<at::Tensor>& found_inf) {
  std::vector<at::Tensor> empty;
  for (size_t i = 0; i < params.size(); ++i) {
    if (params[i].numel() == 0) empty.push_back(steps[i]);
  }
  if (empty.empty()) return;
  if (found_inf.has_value()) {
    at::_foreach_add_(empty, found_inf->reshape({}).eq(0).to(at::kFloat));  // (1,) from GradScaler too
  } else {
    at::_foreach_add_(empty, 1.0);
  }
}

const float* skip_ptr(const c10::optional<at::Tensor>& found_inf) {
  return found_inf.has_value() ? found_inf->data_ptr<float>() : nullptr;
}

}  // namespace

void adam_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
               at::TensorList max_exp_avg_sqs, at::TensorList steps, const at::Tensor& lr, const at::Tensor& betas,
               const c10::optional<at::Tensor>& gnorm_scales, const c10::optional<at::Tensor>& found_inf, double eps,
               double weight_decay, double max_unorm, bool skip_zeros) {
  check_adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, betas, gnorm_scales, found_inf, eps,
                  weight_decay, max_unorm);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Hyper h{eps, weight_decay, max_unorm};
  const at::Tensor betas_c = betas.contiguous();  // read as [beta1, beta2]
  const bool with_stats = max_unorm > 0.0;
  const float* skip = skip_ptr(found_inf);
  Scratch scratch(static_cast<int64_t>(params.size()), with_stats, lr.options());
  by_dtype(params, [&](at::ScalarType dtype, const std::vector<size_t>& idx) {
    dispatch(!max_exp_avg_sqs.empty(), dtype, [&](auto amsgrad, auto tag) {
      constexpr bool A = decltype(amsgrad)::value;
      using T = decltype(tag);
      for_each_pack<5, 384>(
          gather_lists<5>({params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs}, idx), select(steps, idx),
          slots(gnorm_scales, idx), [&](const Pack32& pack, int32_t grid) {
            const PackScratch s = launch_scalars(pack, lr, betas_c, h, skip, scratch, stream);
            if (with_stats) {
              adam32_stats_kernel<A, T><<<grid, kThreads, 0, stream>>>(pack, s.scalars, skip_zeros, s.stats, skip);
              C10_CUDA_KERNEL_LAUNCH_CHECK();
              launch_unorm(s, pack.count, max_unorm, stream);
            }
            adam32_kernel<A, T><<<grid, kThreads, 0, stream>>>(pack, s.scalars, skip_zeros, skip);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
    });
  });
  advance_empty_steps(params, steps, found_inf);
}

void adam8bit_step(at::TensorList params, at::TensorList grads, at::TensorList state1, at::TensorList state2,
                   at::TensorList state3, at::TensorList steps, at::TensorList absmax1, at::TensorList absmax2,
                   at::TensorList absmax3, const at::Tensor& qmap1, const at::Tensor& qmap2, const at::Tensor& lr,
                   const at::Tensor& betas, const c10::optional<at::Tensor>& gnorm_scales,
                   const c10::optional<at::Tensor>& found_inf, double eps, double weight_decay, double max_unorm,
                   bool skip_zeros, bool block_wise) {
  check_adam8bit_step(params, grads, state1, state2, state3, steps, absmax1, absmax2, absmax3, qmap1, qmap2, lr,
                      betas, gnorm_scales, found_inf, eps, weight_decay, max_unorm, block_wise);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor code1 = qmap1.contiguous(), code2 = qmap2.contiguous();
  const at::Tensor luts = build_luts({code1, code2});
  const Hyper h{eps, weight_decay, max_unorm};
  const at::Tensor betas_c = betas.contiguous();  // read as [beta1, beta2]
  const bool with_stats = max_unorm > 0.0 || !block_wise;
  const float* skip = skip_ptr(found_inf);
  Scratch scratch(static_cast<int64_t>(params.size()), with_stats, lr.options());
  by_dtype(params, [&](at::ScalarType dtype, const std::vector<size_t>& idx) {
    dispatch(!state3.empty(), dtype, [&](auto amsgrad, auto tag) {
      constexpr bool A = decltype(amsgrad)::value;
      using T = decltype(tag);
      for_each_pack<8, 256>(
          gather_lists<8>({params, grads, state1, state2, state3, absmax1, absmax2, absmax3}, idx),
          select(steps, idx), slots(gnorm_scales, idx), [&](const Pack8& pack, int32_t chunks) {
            const PackScratch s = launch_scalars(pack, lr, betas_c, h, skip, scratch, stream);
            if (with_stats) {
              adam8bit_stats_kernel<A, T><<<chunks, kThreads, 0, stream>>>(
                  pack, s.scalars, skip_zeros, block_wise, code1.data_ptr<float>(), code2.data_ptr<float>(), s.stats,
                  skip);
              C10_CUDA_KERNEL_LAUNCH_CHECK();
              launch_unorm(s, pack.count, max_unorm, stream);
            }
            adam8bit_kernel<A, T><<<adam8bit_grid<A, T>(chunks), kThreads, sizeof(Shared8), stream>>>(
                pack, s.scalars, skip_zeros, block_wise ? nullptr : s.stats, code1.data_ptr<float>(),
                code2.data_ptr<float>(), luts.data_ptr<int32_t>(), skip);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
            if (!block_wise) {
              store_scales_kernel<<<(pack.count + 127) / 128, 128, 0, stream>>>(pack, s.stats, skip);
              C10_CUDA_KERNEL_LAUNCH_CHECK();
            }
          });
    });
  });
  if (!block_wise) {  // empty tensors have no pack entry: their per-tensor scale is 0, as on the CPU
    for (size_t i = 0; i < params.size(); ++i) {
      if (params[i].numel() != 0) continue;
      for (at::TensorList absmax : {absmax1, absmax2, absmax3}) {
        if (absmax.empty()) continue;
        if (found_inf.has_value()) {
          absmax[i].masked_fill_(found_inf->reshape({}).eq(0), 0.0);  // unless GradScaler skipped the step
        } else {
          absmax[i].zero_();
        }
      }
    }
  }
  advance_empty_steps(params, steps, found_inf);
}

}  // namespace cuda
}  // namespace adam8
