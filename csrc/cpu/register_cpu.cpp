// Binds the CPU kernels to the adam8 ops; the schemas are defined from ops_registry.
#include <torch/library.h>

#include <tuple>

namespace adam8 {
namespace cpu {

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_cpu(const at::Tensor& x, const at::Tensor& code,
                                                          int64_t blocksize);
at::Tensor dequantize_blockwise_cpu(const at::Tensor& q, const at::Tensor& absmax, const at::Tensor& code,
                                    int64_t blocksize, at::ScalarType dtype);
void adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, at::TensorList steps, const at::Tensor& lr, double beta1,
                   double beta2, double eps, double weight_decay);
void adam8bit_blockwise_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList state1,
                                 at::TensorList state2, at::TensorList steps, at::TensorList absmax1,
                                 at::TensorList absmax2, const at::Tensor& qmap1, const at::Tensor& qmap2,
                                 const at::Tensor& lr, double beta1, double beta2, double eps,
                                 double weight_decay);

TORCH_LIBRARY_IMPL(adam8, CPU, m) {
  m.impl("quantize_blockwise", &quantize_blockwise_cpu);
  m.impl("dequantize_blockwise", &dequantize_blockwise_cpu);
  m.impl("adam_step", &adam_step_cpu);
  m.impl("adam8bit_blockwise_step", &adam8bit_blockwise_step_cpu);
}

}  // namespace cpu
}  // namespace adam8
