// CUDA kernels of adam8::adam_step and adam8::adam8bit_blockwise_step: the math of adam8_math.h,
// one launch per pack of up to kMaxTensors tensors of one parameter dtype (launch.cuh).
#include <mutex>
#include <unordered_map>

#include "../checks.h"
#include "../kernels.h"
#include "launch.cuh"

namespace adam8 {
namespace cuda {
namespace {

// Tensors per launch: a pack of 6 lists stays under the 32 KB kernel-argument limit (26.5 KB).
constexpr int kMaxTensors = 384;

struct Hyper {
  double beta1, beta2, eps, weight_decay;
};

// The constants of this step for every tensor of a pack, computed once per launch by a prologue
// kernel (two FP64 pows per tensor: done per block in the main kernel, they stalled every chunk).
// The step counts are advanced by the host, after the launch, to t + 1.
template <class P>
__global__ void scalars_kernel(P pack, const float* lr, Hyper h, AdamScalars* out) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t < pack.count) {
    out[t] = adam_scalars(*lr, static_cast<double>(*pack.step[t]) + 1.0, h.beta1, h.beta2, h.eps, h.weight_decay);
  }
}

template <class P>
const AdamScalars* launch_scalars(const P& pack, const at::Tensor& lr, const Hyper& h, at::Tensor& scratch,
                                  cudaStream_t stream) {
  scratch = at::empty({pack.count * static_cast<int64_t>(sizeof(AdamScalars))}, lr.options().dtype(at::kByte));
  auto* out = reinterpret_cast<AdamScalars*>(scratch.data_ptr());
  scalars_kernel<<<(pack.count + 127) / 128, 128, 0, stream>>>(pack, lr.data_ptr<float>(), h, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// Lists: params, grads, exp_avgs, exp_avg_sqs.
using Pack32 = Pack<4, kMaxTensors>;

template <class T>
__global__ void __launch_bounds__(kThreads) adam32_kernel(Pack32 pack, const AdamScalars* scalars) {
  const int t = pack_tensor(pack, blockIdx.x);
  const AdamScalars s = scalars[t];
  const int64_t start = static_cast<int64_t>(blockIdx.x - pack.first_block[t]) * kBlockElems +
                        static_cast<int64_t>(threadIdx.x) * kPerThread;
  const int64_t left = pack.numel[t] - start;
  if (left <= 0) return;
  const int valid = left < kPerThread ? static_cast<int>(left) : kPerThread;
  const bool vec = pack.aligned[t];
  T* p = static_cast<T*>(pack.ptr[0][t]) + start;
  const T* g = static_cast<const T*>(pack.ptr[1][t]) + start;
  float* m = static_cast<float*>(pack.ptr[2][t]) + start;
  float* v = static_cast<float*>(pack.ptr[3][t]) + start;
  float pv[kPerThread], gv[kPerThread], mv[kPerThread], vv[kPerThread];
  load_lanes(p, valid, vec, pv);
  load_lanes(g, valid, vec, gv);
  load_lanes(m, valid, vec, mv);
  load_lanes(v, valid, vec, vv);
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) adam_update(pv[j], gv[j], mv[j], vv[j], s);
  store_lanes(p, valid, vec, pv);
  store_lanes(m, valid, vec, mv);
  store_lanes(v, valid, vec, vv);
}

// Lists: params, grads, state1, state2, absmax1, absmax2.
using Pack8 = Pack<6, kMaxTensors>;

// The 8-bit kernel keeps both codes and their tables in shared memory: a quantization is one
// shared-memory read instead of a scattered global one. Its blocks are persistent (a grid of as
// many as fit on the GPU, each looping over chunks), so the 52 KB are loaded once per block.
struct Shared8 {
  int32_t lut[2][kLutSize];
  float code[2][kCodeSize];
  float bounds[2][kCodeSize - 1];
};

// One thread's kPerThread elements of one chunk; a warp holds one state block.
template <class T>
__device__ __forceinline__ void adam8bit_lanes(const Pack8& pack, int t, int64_t start, const AdamScalars& s,
                                               const QuantLut& lut1, const QuantLut& lut2) {
  const int64_t left = pack.numel[t] - start;
  const int valid = left <= 0 ? 0 : left < kPerThread ? static_cast<int>(left) : kPerThread;
  const bool vec = pack.aligned[t];
  const int64_t offset = valid > 0 ? start : 0;  // lanes past the end take part in the reduction only
  T* p = static_cast<T*>(pack.ptr[0][t]) + offset;
  const T* g = static_cast<const T*>(pack.ptr[1][t]) + offset;
  uint8_t* q1 = static_cast<uint8_t*>(pack.ptr[2][t]) + offset;
  uint8_t* q2 = static_cast<uint8_t*>(pack.ptr[3][t]) + offset;
  float* absmax1 = static_cast<float*>(pack.ptr[4][t]) + start / kStateBlock;
  float* absmax2 = static_cast<float*>(pack.ptr[5][t]) + start / kStateBlock;

  float pv[kPerThread], gv[kPerThread], m[kPerThread], v[kPerThread];
  int32_t c1[kPerThread], c2[kPerThread];
  load_lanes(p, valid, vec, pv);
  load_lanes(g, valid, vec, gv);
  load_codes(q1, valid, vec, c1);
  load_codes(q2, valid, vec, c2);
  const float a1 = *absmax1, a2 = *absmax2;
  float max1 = 0.0f, max2 = 0.0f;
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    m[j] = dequantize_one<float, int32_t>(c1[j], lut1.code, a1);
    v[j] = dequantize_one<float, int32_t>(c2[j], lut2.code, a2);
    adam_update(pv[j], gv[j], m[j], v[j], s);
    if (j < valid) {
      max1 = vmax(max1, vabs(m[j]));
      max2 = vmax(max2, v[j]);
    }
  }
  max1 = warp_max(max1);  // every lane has read the old absmax before lane 0 writes the new one
  max2 = warp_max(max2);
  if (threadIdx.x % 32 == 0) {
    *absmax1 = max1;
    *absmax2 = max2;
  }
  const float inv1 = inv_absmax(max1), inv2 = inv_absmax(max2);
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    c1[j] = lut1.fast ? code_index_lut<float, int32_t>(m[j] * inv1, lut1) : code_index_search(m[j] * inv1, lut1.bounds);
    c2[j] = lut2.fast ? code_index_lut<float, int32_t>(v[j] * inv2, lut2) : code_index_search(v[j] * inv2, lut2.bounds);
  }
  store_lanes(p, valid, vec, pv);
  store_codes(q1, valid, vec, c1);
  store_codes(q2, valid, vec, c2);
}

template <class T>
__global__ void __launch_bounds__(kThreads) adam8bit_kernel(Pack8 pack, const AdamScalars* scalars, const float* code1,
                                                            const float* code2, const int32_t* luts) {
  extern __shared__ __align__(16) unsigned char smem[];
  Shared8& sh = *reinterpret_cast<Shared8*>(smem);
  for (int c = 0; c < 2; ++c) {
    const int4* src = reinterpret_cast<const int4*>(luts + c * kLutStride);
    int4* dst = reinterpret_cast<int4*>(sh.lut[c]);
    for (int i = threadIdx.x; i < kLutSize / 4; i += kThreads) dst[i] = src[i];
    const float* code = c == 0 ? code1 : code2;
    for (int i = threadIdx.x; i < kCodeSize; i += kThreads) sh.code[c][i] = code[i];
    load_bounds(code, sh.bounds[c]);
  }
  __syncthreads();
  const QuantLut lut1{sh.code[0], sh.bounds[0], sh.lut[0], luts[kLutSize] == 0};
  const QuantLut lut2{sh.code[1], sh.bounds[1], sh.lut[1], luts[kLutStride + kLutSize] == 0};
  const int32_t chunks = pack.first_block[pack.count];
  for (int32_t chunk = blockIdx.x; chunk < chunks; chunk += gridDim.x) {
    const int t = pack_tensor(pack, chunk);
    const AdamScalars s = scalars[t];
    const int64_t start = static_cast<int64_t>(chunk - pack.first_block[t]) * kBlockElems +
                          static_cast<int64_t>(threadIdx.x) * kPerThread;
    if (pack.numel[t] > start - (threadIdx.x % 32) * kPerThread) {  // the warp's state block exists
      adam8bit_lanes<T>(pack, t, start, s, lut1, lut2);
    }
  }
}

// Persistent grid of the 8-bit kernel: as many blocks as are resident at once (at most `chunks`).
// (The shared-memory attribute is set per device on first use, before any capture.)
template <class T>
int adam8bit_grid(int32_t chunks) {
  static std::mutex mutex;
  static std::unordered_map<int, int> resident;  // by device
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  std::lock_guard<std::mutex> lock(mutex);
  auto it = resident.find(device);
  if (it == resident.end()) {
    auto kernel = adam8bit_kernel<T>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, sizeof(Shared8)));
    int per_sm = 0, sms = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, sizeof(Shared8)));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    TORCH_CHECK(per_sm > 0, "adam8: the 8-bit kernel's ", sizeof(Shared8), " bytes of shared memory do not fit this GPU");
    it = resident.emplace(device, per_sm * sms).first;
  }
  return std::min<int32_t>(chunks, it->second);
}

// Runs `per_dtype(dtype, indices)` for the indices of the parameters of each dtype.
template <class F>
void by_param_dtype(at::TensorList params, F&& per_dtype) {
  for (at::ScalarType dtype : {at::kFloat, at::kHalf, at::kBFloat16}) {
    std::vector<size_t> idx;
    for (size_t i = 0; i < params.size(); ++i) {
      if (params[i].scalar_type() == dtype) idx.push_back(i);
    }
    if (!idx.empty()) per_dtype(dtype, idx);
  }
}

template <int kLists>
std::array<std::vector<at::Tensor>, kLists> gather_lists(std::array<at::TensorList, kLists> lists,
                                                        const std::vector<size_t>& idx) {
  std::array<std::vector<at::Tensor>, kLists> out;
  for (int l = 0; l < kLists; ++l) {
    for (size_t i : idx) out[l].push_back(lists[l][i]);
  }
  return out;
}

std::vector<at::Tensor> select(at::TensorList list, const std::vector<size_t>& idx) {
  std::vector<at::Tensor> out;
  for (size_t i : idx) out.push_back(list[i]);
  return out;
}

}  // namespace

void adam_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
               at::TensorList exp_avg_sqs, at::TensorList steps, const at::Tensor& lr, double beta1,
               double beta2, double eps, double weight_decay) {
  check_adam_step(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Hyper h{beta1, beta2, eps, weight_decay};
  by_param_dtype(params, [&](at::ScalarType dtype, const std::vector<size_t>& idx) {
    dispatch_float(dtype, [&](auto tag) {
      using T = decltype(tag);
      for_each_pack<4, kMaxTensors>(gather_lists<4>({params, grads, exp_avgs, exp_avg_sqs}, idx), select(steps, idx),
                                    [&](const Pack32& pack, int32_t grid) {
                                      at::Tensor scratch;
                                      const AdamScalars* s = launch_scalars(pack, lr, h, scratch, stream);
                                      adam32_kernel<T><<<grid, kThreads, 0, stream>>>(pack, s);
                                      C10_CUDA_KERNEL_LAUNCH_CHECK();
                                    });
    });
  });
  at::_foreach_add_(steps, 1.0);
}

void adam8bit_blockwise_step(at::TensorList params, at::TensorList grads, at::TensorList state1,
                             at::TensorList state2, at::TensorList steps, at::TensorList absmax1,
                             at::TensorList absmax2, const at::Tensor& qmap1, const at::Tensor& qmap2,
                             const at::Tensor& lr, double beta1, double beta2, double eps,
                             double weight_decay) {
  check_adam8bit_blockwise_step(params, grads, state1, state2, steps, absmax1, absmax2, qmap1, qmap2, lr, beta1, beta2,
                                eps, weight_decay);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor code1 = qmap1.contiguous(), code2 = qmap2.contiguous();
  const at::Tensor luts = build_luts({code1, code2});
  const Hyper h{beta1, beta2, eps, weight_decay};
  by_param_dtype(params, [&](at::ScalarType dtype, const std::vector<size_t>& idx) {
    dispatch_float(dtype, [&](auto tag) {
      using T = decltype(tag);
      for_each_pack<6, kMaxTensors>(
          gather_lists<6>({params, grads, state1, state2, absmax1, absmax2}, idx), select(steps, idx),
          [&](const Pack8& pack, int32_t chunks) {
            at::Tensor scratch;
            const AdamScalars* s = launch_scalars(pack, lr, h, scratch, stream);
            adam8bit_kernel<T><<<adam8bit_grid<T>(chunks), kThreads, sizeof(Shared8), stream>>>(
                pack, s, code1.data_ptr<float>(), code2.data_ptr<float>(), luts.data_ptr<int32_t>());
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
    });
  });
  at::_foreach_add_(steps, 1.0);
}

}  // namespace cuda
}  // namespace adam8
