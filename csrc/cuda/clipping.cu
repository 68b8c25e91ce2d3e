// CUDA kernel of adam8::percentile_clipping: each gradient's squared norm (finite elements only,
// warp sums added in double per tensor), then one thread per tensor records it in the history and
// writes the gradient factor (adam8_math.h: record_gnorm).
#include "../checks.h"
#include "../kernels.h"
#include "launch.cuh"

namespace adam8 {
namespace cuda {
namespace {

// Lists: grads, gnorm_vecs (2 lists of 512 tensors: 22.5 KB of kernel arguments).
using PackClip = Pack<2, 512>;

template <class T>
__global__ void __launch_bounds__(kThreads) sum_squares_kernel(PackClip pack, double* sums) {
  const int t = pack_tensor(pack, blockIdx.x);
  int64_t start;
  const int valid = lanes_of(pack, t, blockIdx.x, &start);
  float g[kPerThread];
  load_lanes(static_cast<const T*>(pack.ptr[0][t]) + (valid > 0 ? start : 0), valid, pack.aligned[t], g);
  double sum = 0.0;  // squares exact in double, as on the CPU: both round to the same float norm
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    sum += vlt(g[j] * g[j], INFINITY) ? static_cast<double>(g[j]) * static_cast<double>(g[j]) : 0.0;
  }
  const double total = warp_sum(sum);
  if (threadIdx.x % 32 == 0) atomicAdd(sums + t, total);
}

__global__ void record_kernel(PackClip pack, const double* sums, int64_t percentile) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t < pack.count) {
    const double step = static_cast<double>(*pack.step[t]) + 1.0;  // this step's count
    *pack.scale[t] = record_gnorm(static_cast<float*>(pack.ptr[1][t]), sums[t], step, percentile);
  }
}

}  // namespace

void percentile_clipping(at::TensorList grads, at::TensorList gnorm_vecs, at::TensorList steps, int64_t percentile,
                         const at::Tensor& scales) {
  check_percentile_clipping(grads, gnorm_vecs, steps, percentile, scales);
  if (grads.empty()) return;
  const c10::cuda::CUDAGuard guard(grads[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  by_dtype(grads, [&](at::ScalarType dtype, const std::vector<size_t>& idx) {
    dispatch_float(dtype, [&](auto tag) {
      using T = decltype(tag);
      // Every tensor gets a record, the empty ones included (for_each_pack skips those).
      std::vector<size_t> empty, nonempty;
      for (size_t i : idx) (grads[i].numel() == 0 ? empty : nonempty).push_back(i);
      auto run = [&](const std::vector<size_t>& which, bool sum) {
        if (which.empty()) return;
        std::vector<at::Tensor> g = select(grads, which), h = select(gnorm_vecs, which);
        std::vector<at::Tensor> dummy(which.size(), scales);  // a non-empty stand-in for an empty grad (never read)
        for_each_pack<2, 512>({sum ? g : dummy, h}, select(steps, which), slots(scales, which),
                              [&](const PackClip& pack, int32_t grid) {
                                at::Tensor sums = at::zeros({pack.count}, scales.options().dtype(at::kDouble));
                                if (sum) {
                                  sum_squares_kernel<T><<<grid, kThreads, 0, stream>>>(pack, sums.data_ptr<double>());
                                  C10_CUDA_KERNEL_LAUNCH_CHECK();
                                }
                                record_kernel<<<(pack.count + 127) / 128, 128, 0, stream>>>(
                                    pack, sums.data_ptr<double>(), percentile);
                                C10_CUDA_KERNEL_LAUNCH_CHECK();
                              });
      };
      run(nonempty, true);
      run(empty, false);
    });
  });
}

}  // namespace cuda
}  // namespace adam8
