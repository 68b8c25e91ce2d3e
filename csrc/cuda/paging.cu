// CUDA side of the paged states: managed (unified) memory that the driver migrates between host
// and GPU on demand, and the prefetch / page-out ops that migrate it ahead of time on the current
// stream. Prefetching cannot be captured in a CUDA graph (it would invalidate the capture), so
// both ops do nothing while the stream is capturing; the optimizer prefetches before a replay.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <mutex>
#include <vector>

#include "../checks.h"
#include "../kernels.h"

namespace adam8 {
namespace cuda {
namespace {

// Paging needs the GPU to access managed memory while the host may too (Linux, Pascal or newer);
// without it every access would fault the whole allocation over.
void require_concurrent_managed_access(const char* op, int device) {
  int concurrent = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&concurrent, cudaDevAttrConcurrentManagedAccess, device));
  TORCH_CHECK(concurrent != 0, op, ": cuda:", device, " has no concurrent managed access (Windows, or a GPU "
              "older than Pascal), so paged optimizer states cannot live on it; use Adam8bit / Adam32bit");
}

bool capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

// Migrates each tensor's memory to `location` (CUDA 13's cudaMemLocation signature).
void migrate(const char* op, at::TensorList tensors, bool to_host) {
  check_paged_list(op, tensors);
  if (tensors.empty()) return;
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (capturing(stream)) return;
  cudaMemLocation location{};
  location.type = to_host ? cudaMemLocationTypeHost : cudaMemLocationTypeDevice;
  location.id = to_host ? 0 : tensors[0].device().index();
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (tensors[i].numel() == 0) continue;
    const void* ptr = tensors[i].data_ptr();
    cudaPointerAttributes attributes{};
    C10_CUDA_CHECK(cudaPointerGetAttributes(&attributes, ptr));
    // Device memory stays on its GPU (a copy of a paged tensor is one): nothing to migrate.
    if (attributes.type != cudaMemoryTypeManaged) continue;
#if CUDART_VERSION >= 13000
    C10_CUDA_CHECK(cudaMemPrefetchAsync(ptr, tensors[i].nbytes(), location, 0, stream));
#else  // CUDA 12: a device ordinal, cudaCpuDeviceId for the host
    C10_CUDA_CHECK(cudaMemPrefetchAsync(ptr, tensors[i].nbytes(), to_host ? cudaCpuDeviceId : location.id, stream));
#endif
  }
}

// Managed memory whose tensor died while the current stream was capturing a CUDA graph: cudaFree
// is not allowed then (it would invalidate the capture), so it waits here for the next free or
// allocation outside a capture. Only this thread's current stream is asked: a paged state that
// dies on another thread, or under another stream, during a global-mode capture still invalidates
// it (no CUDA call tells of captures elsewhere), and a graph must not be replayed after a state it
// read has died (as for any tensor a CUDA graph uses).
std::mutex deferred_mutex;
std::vector<void*> deferred_frees;

void free_deferred() {
  std::vector<void*> ready;
  {
    const std::lock_guard<std::mutex> lock(deferred_mutex);
    ready.swap(deferred_frees);
  }
  // cudaFree waits for the device, so no kernel still using the memory is cut short.
  for (void* p : ready) C10_CUDA_CHECK_WARN(cudaFree(p));
}

void free_managed(void* p) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  const cudaError_t err = cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(), &status);
  // A failed query may mean a capture elsewhere (the legacy stream's, during a global-mode capture
  // on another stream): wait too. The error is cleared, so no later check reports it.
  if (err != cudaSuccess) (void)cudaGetLastError();
  if (err != cudaSuccess || status != cudaStreamCaptureStatusNone) {
    const std::lock_guard<std::mutex> lock(deferred_mutex);
    deferred_frees.push_back(p);
    return;
  }
  free_deferred();
  C10_CUDA_CHECK_WARN(cudaFree(p));
}

}  // namespace

at::Tensor zeros_managed(at::IntArrayRef size, at::ScalarType dtype, const at::Device& device) {
  const c10::cuda::CUDAGuard guard(device);
  const int index = c10::cuda::current_device();
  const at::TensorOptions options = at::TensorOptions().dtype(dtype).device(at::kCUDA, index);
  int64_t numel = 1;
  for (int64_t s : size) numel *= s;
  if (numel == 0) return at::zeros(size, options);
  TORCH_CHECK(!capturing(c10::cuda::getCurrentCUDAStream()), "adam8.zeros_managed: cannot allocate managed memory "
              "while a CUDA graph is being captured; run one step before capturing, so the states exist");
  require_concurrent_managed_access("adam8.zeros_managed", index);
  free_deferred();
  void* ptr = nullptr;
  C10_CUDA_CHECK(cudaMallocManaged(&ptr, static_cast<size_t>(numel) * c10::elementSize(dtype), cudaMemAttachGlobal));
  at::Tensor out = at::from_blob(ptr, size, free_managed, options);
  C10_CUDA_CHECK(cudaMemsetAsync(ptr, 0, out.nbytes(), c10::cuda::getCurrentCUDAStream()));
  return out;
}

void prefetch(at::TensorList tensors) { migrate("adam8.prefetch", tensors, /*to_host=*/false); }

void page_out(at::TensorList tensors) { migrate("adam8.page_out", tensors, /*to_host=*/true); }

}  // namespace cuda
}  // namespace adam8
