// The code lookup tables of adam8_math.h, built on the GPU (reading a code on the host would sync).
#include "launch.cuh"

namespace adam8 {
namespace cuda {
namespace {

struct Codes {
  const float* code[2];
};

// Block (x, y): kThreads buckets of code y; its last ints count the buckets it could not represent.
__global__ void __launch_bounds__(kThreads) build_lut_kernel(Codes codes, int32_t* tables) {
  __shared__ float bounds[kCodeSize - 1];
  load_bounds(codes.code[blockIdx.y], bounds);
  __syncthreads();
  int32_t* table = tables + blockIdx.y * kLutStride;
  const int32_t key = blockIdx.x * kThreads + threadIdx.x;  // < kLutSize: kLutBuildBlocks blocks
  bool ok = true;
  table[key] = lut_entry(bounds, key, &ok);
  const int bad = __syncthreads_count(!ok);
  if (threadIdx.x == 0) table[kLutSize + blockIdx.x] = bad;
}

}  // namespace

at::Tensor build_luts(const std::vector<at::Tensor>& codes) {
  TORCH_INTERNAL_ASSERT(!codes.empty() && codes.size() <= 2);
  Codes args{};
  for (size_t i = 0; i < codes.size(); ++i) args.code[i] = codes[i].data_ptr<float>();
  at::Tensor luts = at::empty({static_cast<int64_t>(codes.size()), kLutStride}, codes[0].options().dtype(at::kInt));
  const dim3 grid(kLutBuildBlocks, static_cast<unsigned>(codes.size()));
  build_lut_kernel<<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(args, luts.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return luts;
}

}  // namespace cuda
}  // namespace adam8
