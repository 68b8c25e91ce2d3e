// CUDA kernels of adam8::quantize_blockwise and adam8::dequantize_blockwise.
#include <tuple>

#include "../checks.h"
#include "../kernels.h"
#include "launch.cuh"

namespace adam8 {
namespace cuda {
namespace {

constexpr int kMaxBlock = 4096;

// One CUDA block per quantization block of `blocksize` (64..4096) values.
template <class T>
__global__ void __launch_bounds__(kThreads) quantize_kernel(const T* x, int64_t n, int64_t blocksize,
                                                            const float* code, const int32_t* table,
                                                            uint8_t* q, float* absmax) {
  __shared__ float bounds[kCodeSize - 1];
  __shared__ int32_t warp_maxima[kThreads / 32];  // abs_bits
  const QuantLut lut = device_lut(code, table, bounds);
  if (!lut.fast) load_bounds(code, bounds);
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * blocksize;
  const int64_t len = n - begin < blocksize ? n - begin : blocksize;
  constexpr int kMaxPer = kMaxBlock / kThreads;
  float xs[kMaxPer];
  int32_t bits = 0;
#pragma unroll
  for (int j = 0; j < kMaxPer; ++j) {
    const int64_t i = threadIdx.x + static_cast<int64_t>(j) * kThreads;
    xs[j] = i < len ? to_float(x[begin + i]) : 0.0f;
    bits = imax(bits, abs_bits<float, int32_t>(xs[j]));
  }
  bits = warp_max_bits(bits);
  if (threadIdx.x % 32 == 0) warp_maxima[threadIdx.x / 32] = bits;
  __syncthreads();
  bits = 0;
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) bits = imax(bits, warp_maxima[w]);
  const float amax = float_of(bits);
  if (threadIdx.x == 0) absmax[blockIdx.x] = amax;
  const float inv = inv_absmax(amax), pre = block_prescale(amax);
#pragma unroll
  for (int j = 0; j < kMaxPer; ++j) {
    const int64_t i = threadIdx.x + static_cast<int64_t>(j) * kThreads;
    if (i < len) {
      const float xn = inv == 0.0f ? 0.0f : xs[j] * pre * inv;  // (a NaN or inf in the block: 0 for all)
      q[begin + i] = static_cast<uint8_t>(lut.fast ? code_index_lut<float, int32_t>(xn, lut)
                                                   : code_index_search(xn, lut.bounds));
    }
  }
}

template <class T>
__global__ void dequantize_kernel(const uint8_t* q, int64_t n, int64_t blocksize, const float* code,
                                  const float* absmax, T* out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    out[i] = from_float<T>(dequantize_one<float, int32_t>(q[i], code, absmax[i / blocksize]));
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> quantize_blockwise(const at::Tensor& x, const at::Tensor& code,
                                                      int64_t blocksize) {
  check_quantize_blockwise(x, code, blocksize);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), cc = code.contiguous();
  const int64_t n = xc.numel(), blocks = ceil_div(n, blocksize);
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({blocks}, x.options().dtype(at::kFloat));
  if (n == 0) return {q, absmax};
  TORCH_CHECK(blocks < (int64_t{1} << 31), "adam8.quantize_blockwise: too many blocks (", blocks, ")");
  const at::Tensor lut = build_luts({cc});
  dispatch_float(xc.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    quantize_kernel<T><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        xc.data_ptr<T>(), n, blocksize, cc.data_ptr<float>(), lut.data_ptr<int32_t>(), q.data_ptr<uint8_t>(),
        absmax.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {q, absmax};
}

at::Tensor dequantize_blockwise(const at::Tensor& q, const at::Tensor& absmax, const at::Tensor& code,
                                int64_t blocksize, at::ScalarType dtype) {
  check_dequantize_blockwise(q, absmax, code, blocksize, dtype);
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor qc = q.contiguous(), ac = absmax.contiguous(), cc = code.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(dtype));
  const int64_t n = qc.numel();
  if (n == 0) return out;
  const int64_t grid = std::min<int64_t>(ceil_div(n, kThreads), 65536);
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    dequantize_kernel<T><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        qc.data_ptr<uint8_t>(), n, blocksize, cc.data_ptr<float>(), ac.data_ptr<float>(), out.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace cuda
}  // namespace adam8
