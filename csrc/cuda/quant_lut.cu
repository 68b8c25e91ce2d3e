// The code lookup tables of adam8_math.h, built on the GPU (reading a code on the host would sync).
#include "launch.cuh"

namespace adam8 {
namespace cuda {
namespace {

__global__ void build_lut_kernel(const float* code, int32_t* table) {
  __shared__ float bounds[kCodeSize - 1];
  load_bounds(code, bounds);
  __syncthreads();
  const int32_t key = blockIdx.x * blockDim.x + threadIdx.x;
  if (key >= kLutSize) return;
  bool ok = true;
  table[key] = lut_entry(bounds, key, &ok);
  if (!ok) atomicAdd(table + kLutSize, 1);
}

}  // namespace

at::Tensor build_luts(const std::vector<at::Tensor>& codes) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor luts = at::zeros({static_cast<int64_t>(codes.size()), kLutStride}, codes[0].options().dtype(at::kInt));
  for (size_t i = 0; i < codes.size(); ++i) {
    const int blocks = (kLutSize + kThreads - 1) / kThreads;
    build_lut_kernel<<<blocks, kThreads, 0, stream>>>(codes[i].data_ptr<float>(), luts[i].data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return luts;
}

}  // namespace cuda
}  // namespace adam8
