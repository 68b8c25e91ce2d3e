// CPU kernels of adam8::prefetch and adam8::page_out: a paged tensor on the CPU is ordinary host
// memory, so after the checks there is nothing to move.
#include "../checks.h"
#include "../kernels.h"

namespace adam8 {
namespace cpu {

void prefetch(at::TensorList tensors) { check_paged_list("adam8.prefetch", tensors); }

void page_out(at::TensorList tensors) { check_paged_list("adam8.page_out", tensors); }

}  // namespace cpu
}  // namespace adam8
