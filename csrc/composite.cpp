// adam8::zeros_managed for every device: it has no tensor argument, so the dispatcher cannot pick
// a backend from one; this kernel (CompositeExplicitAutograd) branches on the device instead.
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

}  // namespace
}  // namespace adam8

TORCH_LIBRARY_IMPL(adam8, CompositeExplicitAutograd, m) { m.impl("zeros_managed", &adam8::zeros_managed); }
