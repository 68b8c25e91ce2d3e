// The kernel of every adam8 op, declared once for each backend (adam8::cpu, adam8::cuda) with the
// C++ types of its schema in ops_registry; register_cpu.cpp / cuda/register_cuda.cpp bind them.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#define ADAM8_DECLARE_KERNELS                                                                                      \
  std::tuple<at::Tensor, at::Tensor> quantize_blockwise(const at::Tensor& x, const at::Tensor& code,               \
                                                        int64_t blocksize);                                        \
  at::Tensor dequantize_blockwise(const at::Tensor& q, const at::Tensor& absmax, const at::Tensor& code,           \
                                  int64_t blocksize, at::ScalarType dtype);                                        \
  void adam_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs, \
                 at::TensorList max_exp_avg_sqs, at::TensorList steps, const at::Tensor& lr,                       \
                 const at::Tensor& betas, const c10::optional<at::Tensor>& gnorm_scales,                           \
                 const c10::optional<at::Tensor>& found_inf, double eps, double weight_decay, double max_unorm,    \
                 bool skip_zeros);                                                                                 \
  void adam8bit_step(at::TensorList params, at::TensorList grads, at::TensorList state1, at::TensorList state2,    \
                     at::TensorList state3, at::TensorList steps, at::TensorList absmax1, at::TensorList absmax2,  \
                     at::TensorList absmax3, const at::Tensor& qmap1, const at::Tensor& qmap2,                     \
                     const at::Tensor& lr, const at::Tensor& betas, const c10::optional<at::Tensor>& gnorm_scales, \
                     const c10::optional<at::Tensor>& found_inf, double eps, double weight_decay,                  \
                     double max_unorm, bool skip_zeros, bool block_wise);                                          \
  void percentile_clipping(at::TensorList grads, at::TensorList gnorm_vecs, at::TensorList steps,                  \
                           int64_t percentile, const at::Tensor& scales);                                          \
  void prefetch(at::TensorList tensors);                                                                           \
  void page_out(at::TensorList tensors);

// Inside TORCH_LIBRARY_IMPL(adam8, <key>, m): binds every op to the kernels of namespace `ns`.
#define ADAM8_BIND_KERNELS(ns)                                   \
  m.impl("quantize_blockwise", &ns::quantize_blockwise);         \
  m.impl("dequantize_blockwise", &ns::dequantize_blockwise);     \
  m.impl("adam_step", &ns::adam_step);                           \
  m.impl("adam8bit_step", &ns::adam8bit_step);                   \
  m.impl("percentile_clipping", &ns::percentile_clipping);       \
  m.impl("prefetch", &ns::prefetch);                             \
  m.impl("page_out", &ns::page_out);

namespace adam8 {
namespace cpu {
ADAM8_DECLARE_KERNELS
}  // namespace cpu
namespace cuda {
ADAM8_DECLARE_KERNELS
// Managed (unified) memory on a CUDA device, freed with the tensor (adam8.zeros_managed).
at::Tensor zeros_managed(at::IntArrayRef size, at::ScalarType dtype, const at::Device& device);
}  // namespace cuda
}  // namespace adam8
