// Argument checks of the adam8 ops, shared by the CPU and CUDA kernels: each function raises the
// exception its op's fake implementation (ops_registry) raises for the same mistake, before the
// op changes anything. Defined in checks.cpp, compiled once by the host compiler.
#pragma once

#include <ATen/ATen.h>

#include <array>

#include "adam8_math.h"

namespace adam8 {

// The dtypes of parameters (and of their gradients) the Adam ops take.
constexpr std::array<at::ScalarType, 3> kParamDtypes = {at::kFloat, at::kHalf, at::kBFloat16};

void check_quantize_blockwise(const at::Tensor& x, const at::Tensor& code, int64_t blocksize);

void check_dequantize_blockwise(const at::Tensor& q, const at::Tensor& absmax, const at::Tensor& code,
                                int64_t blocksize, at::ScalarType dtype);

void check_adam_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                     at::TensorList max_exp_avg_sqs, at::TensorList steps, const at::Tensor& lr,
                     const at::Tensor& betas, const c10::optional<at::Tensor>& gnorm_scales,
                     const c10::optional<at::Tensor>& found_inf, double eps, double weight_decay, double max_unorm);

void check_adam8bit_step(at::TensorList params, at::TensorList grads, at::TensorList state1, at::TensorList state2,
                         at::TensorList state3, at::TensorList steps, at::TensorList absmax1, at::TensorList absmax2,
                         at::TensorList absmax3, const at::Tensor& qmap1, const at::Tensor& qmap2, const at::Tensor& lr,
                         const at::Tensor& betas, const c10::optional<at::Tensor>& gnorm_scales,
                         const c10::optional<at::Tensor>& found_inf, double eps, double weight_decay, double max_unorm,
                         bool block_wise);

void check_percentile_clipping(at::TensorList grads, at::TensorList gnorm_vecs, at::TensorList steps,
                               int64_t percentile, const at::Tensor& scales);

// adam8.prefetch / adam8.page_out: dense tensors (each a whole range of memory), on one device.
void check_paged_list(const char* op, at::TensorList tensors);

// adam8.zeros_managed: sizes >= 0, a state dtype, a CPU or CUDA device.
void check_zeros_managed(at::IntArrayRef size, at::ScalarType dtype, const at::Device& device);

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace adam8
