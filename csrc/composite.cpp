// Kernels for calls the dispatcher cannot route by a tensor argument (CompositeExplicitAutograd:
// used when no CPU or CUDA kernel is picked): zeros_managed has no tensor argument, so it branches
// on its device; prefetch / page_out of an empty list have nothing to move.
#include <torch/library.h>

#include "checks.h"
#include "kernels.h"

namespace adam8 {
namespace {

at::Tensor zeros_managed(at::IntArrayRef size, at::ScalarType dtype, at::Device device) {
  check_zeros_managed(size, dtype, device);
  if (device.is_cpu()) return at::zeros(size, at::TensorOptions().dtype(dtype));  // host memory already
#ifdef ADAM8_WITH_CUDA
  return cuda::zeros_managed(size, dtype, device);
#else
  TORCH_CHECK(false, "adam8.zeros_managed: torchadam8 was built without its CUDA kernels (torch is a CPU build "
              "or nvcc was not found), so it cannot allocate managed memory on ", device.str());
#endif
}

// Reached with an empty list, or with tensors of a device that has no kernel here.
template <const char* kOp>
void migrate_nothing(at::TensorList tensors) {
  TORCH_CHECK(tensors.empty(), kOp, ": no kernel for tensors on ", tensors[0].device().str(),
              " (torchadam8 has CPU and CUDA kernels)");
}
constexpr char kPrefetch[] = "adam8.prefetch";
constexpr char kPageOut[] = "adam8.page_out";

}  // namespace
}  // namespace adam8

TORCH_LIBRARY_IMPL(adam8, CompositeExplicitAutograd, m) {
  m.impl("zeros_managed", &adam8::zeros_managed);
  m.impl("prefetch", &adam8::migrate_nothing<adam8::kPrefetch>);
  m.impl("page_out", &adam8::migrate_nothing<adam8::kPageOut>);
}
