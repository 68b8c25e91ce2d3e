// Argument checks of every op, shared by the CPU and CUDA kernels (and compiled once, by the host
// compiler). Each sentence is the one the op's fake implementation in ops_registry/checks.py
// raises, so eager, compiled and fake calls fail alike.
#include "checks.h"

#include <array>
#include <ostream>
#include <string>

namespace adam8 {
namespace {

// "torch.float32", as Python prints a dtype.
std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kByte: return "torch.uint8";
    case at::kChar: return "torch.int8";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kBool: return "torch.bool";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(t);
  }
}

using Dtypes = c10::ArrayRef<at::ScalarType>;

std::string dtype_list(Dtypes allowed) {
  std::string s;
  for (size_t i = 0; i < allowed.size(); ++i) {
    if (i > 0) s += (i + 1 == allowed.size()) ? " or " : ", ";
    s += dtype_name(allowed[i]);
  }
  return s;
}

// An argument's name in messages: "lr", or "params[3]" for an item of a list. Formatted only
// when a check fails, so checking thousands of tensors costs no string building.
struct Arg {
  const char* name;
  int64_t index = -1;
};
std::ostream& operator<<(std::ostream& os, const Arg& a) {
  os << a.name;
  if (a.index >= 0) os << "[" << a.index << "]";
  return os;
}

// A list argument must hold one tensor per parameter.
void check_length(const char* op, const char* name, size_t got, const char* ref, size_t want) {
  TORCH_CHECK_VALUE(got == want, op, ": ", name, " has ", got, " tensors but ", ref, " has ", want,
                    "; pass one per parameter");
}

bool is_one_of(at::ScalarType dtype, Dtypes allowed) {
  for (auto a : allowed) {
    if (dtype == a) return true;
  }
  return false;
}

void check_dtype(const char* op, Arg what, const at::Tensor& t, Dtypes allowed) {
  TORCH_CHECK_TYPE(is_one_of(t.scalar_type(), allowed), op, ": ", what, " has dtype ", dtype_name(t.scalar_type()),
                   "; expected ", dtype_list(allowed));
}

// A dtype argument (not a tensor's).
void check_dtype_arg(const char* op, at::ScalarType dtype, Dtypes allowed) {
  TORCH_CHECK_TYPE(is_one_of(dtype, allowed), op, ": dtype is ", dtype_name(dtype), "; expected ", dtype_list(allowed));
}

// `ref` names the argument that sets the call's device.
void check_device(const char* op, Arg what, const at::Tensor& t, const at::Device& device,
                  const char* ref = "the parameters") {
  TORCH_CHECK_VALUE(t.device() == device, op, ": ", what, " is on ", t.device().str(), " but ", ref, " ",
                    std::string(ref) == "the parameters" ? "are" : "is", " on ", device.str(),
                    "; all tensors of one call must be on one device");
}

// `t` must match `ref` (a parameter) in shape and strides; `same_dtype` also asks for its dtype.
void check_like(const char* op, Arg what, const at::Tensor& t, Arg ref_what, const at::Tensor& ref,
                       bool same_dtype) {
  TORCH_CHECK_TYPE(!same_dtype || t.scalar_type() == ref.scalar_type(), op, ": ", what, " has dtype ",
                   dtype_name(t.scalar_type()), " but ", ref_what, " has dtype ",
                   dtype_name(ref.scalar_type()), "; they must match");
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), op, ": ", what, " has shape ", t.sizes(), " but ", ref_what,
                    " has shape ", ref.sizes(), "; they must match");
  TORCH_CHECK_VALUE(t.numel() <= 1 || t.strides() == ref.strides(), op, ": ", what, " has strides ",
                    t.strides(), " but ", ref_what, " has strides ", ref.strides(), "; they must match");
}

// An amsgrad list holds one tensor per parameter, or none when amsgrad is off.
void check_optional_length(const char* op, const char* name, size_t got, size_t want) {
  TORCH_CHECK_VALUE(got == 0 || got == want, op, ": ", name, " has ", got, " tensors but params has ", want,
                    "; pass one per parameter with amsgrad, none without");
}

// Kernels walk memory linearly, so a tensor must cover its elements without gaps or overlap.
void check_dense(const char* op, Arg what, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.is_non_overlapping_and_dense(), op, ": ", what, " with shape ", t.sizes(),
                    " and strides ", t.strides(),
                    " is not dense; pass a contiguous (or permuted contiguous) tensor");
}

void check_numel(const char* op, Arg what, const at::Tensor& t, int64_t want) {
  TORCH_CHECK_VALUE(t.numel() == want, op, ": ", what, " has ", t.numel(), " elements; expected ", want);
}

void check_nonnegative(const char* op, const char* name, double value) {
  TORCH_CHECK_VALUE(value >= 0.0, op, ": ", name, " must be >= 0, got ", value);
}

void check_blocksize(const char* op, int64_t blocksize) {
  TORCH_CHECK_VALUE(blocksize >= 64 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0, op,
                    ": blocksize must be a power of two in [64, 4096], got ", blocksize);
}

// ---------------------------------------------------------------- per-op checks

// The checks every Adam op runs on params, grads, its per-parameter states and its scalars.
// `states` name the per-parameter lists after grads, each with the dtype it must have.
struct StateList {
  const char* name;
  at::TensorList tensors;
  at::ScalarType dtype;
  bool optional = false;  // may be empty (amsgrad off)
};

void check_adam_common(const char* op, at::TensorList params, at::TensorList grads,
                              std::initializer_list<StateList> states, at::TensorList steps,
                              const at::Tensor& lr, const at::Tensor& betas, double eps,
                              double weight_decay) {
  const size_t n = params.size();
  check_length(op, "grads", grads.size(), "params", n);
  for (const auto& s : states) {
    if (s.optional) {
      check_optional_length(op, s.name, s.tensors.size(), n);
    } else {
      check_length(op, s.name, s.tensors.size(), "params", n);
    }
  }
  check_length(op, "steps", steps.size(), "params", n);
  check_nonnegative(op, "eps", eps);
  check_nonnegative(op, "weight_decay", weight_decay);
  check_dtype(op, {"lr"}, lr, at::kFloat);
  check_numel(op, {"lr"}, lr, 1);
  // [beta1, beta2] in float64, read by the kernels like lr (a tensor, so a scheduler changing
  // beta1 does not recompile a compiled step); like lr's, its values are not checked here: on
  // CUDA that would synchronize (the optimizer classes check them).
  check_dtype(op, {"betas"}, betas, at::kDouble);
  check_numel(op, {"betas"}, betas, 2);
  if (n == 0) return;
  const at::Device device = params[0].device();
  check_device(op, {"lr"}, lr, device);
  check_device(op, {"betas"}, betas, device);
  for (size_t i = 0; i < n; ++i) {
    const Arg p{"params", static_cast<int64_t>(i)};
    check_dtype(op, p, params[i], kParamDtypes);
    check_device(op, p, params[i], device);
    check_dense(op, p, params[i]);
    const Arg g{"grads", p.index};
    check_device(op, g, grads[i], device);
    check_like(op, g, grads[i], p, params[i], /*same_dtype=*/true);
    for (const auto& s : states) {
      if (s.tensors.empty()) continue;
      const Arg what{s.name, p.index};
      check_device(op, what, s.tensors[i], device);
      check_dtype(op, what, s.tensors[i], s.dtype);
      check_like(op, what, s.tensors[i], p, params[i], /*same_dtype=*/false);
    }
    const Arg t{"steps", p.index};
    check_device(op, t, steps[i], device);
    check_dtype(op, t, steps[i], at::kFloat);
    check_numel(op, t, steps[i], 1);
  }
}

// Checks of a quantization code argument.
void check_code(const char* op, const char* name, const at::Tensor& code, const at::Device& device,
                const char* ref = "the parameters") {
  check_device(op, {name}, code, device, ref);
  check_dtype(op, {name}, code, at::kFloat);
  check_numel(op, {name}, code, 256);
}


// The scales of an 8-bit state list: one float32 per block of each parameter, or one per tensor.
void check_absmax_list(const char* op, const char* name, at::TensorList params, at::TensorList absmax,
                       bool block_wise) {
  for (size_t i = 0; i < absmax.size(); ++i) {
    const Arg what{name, static_cast<int64_t>(i)};
    check_device(op, what, absmax[i], params[i].device());
    check_dtype(op, what, absmax[i], at::kFloat);
    check_numel(op, what, absmax[i], block_wise ? ceil_div(params[i].numel(), kStateBlock) : 1);
    check_dense(op, what, absmax[i]);
  }
}

// The per-parameter gradient factors of percentile clipping: a float32 vector, one per parameter.
void check_gnorm_scales(const char* op, const c10::optional<at::Tensor>& scales, size_t n, const at::Device& device) {
  if (!scales.has_value()) return;
  check_device(op, {"gnorm_scales"}, *scales, device);
  check_dtype(op, {"gnorm_scales"}, *scales, at::kFloat);
  check_numel(op, {"gnorm_scales"}, *scales, static_cast<int64_t>(n));
  check_dense(op, {"gnorm_scales"}, *scales);
}

// torch.amp.GradScaler's flag: a float32 scalar, nonzero when a gradient held an inf or NaN.
void check_found_inf(const char* op, const c10::optional<at::Tensor>& found_inf, const at::Device& device) {
  if (!found_inf.has_value()) return;
  check_device(op, {"found_inf"}, *found_inf, device);
  check_dtype(op, {"found_inf"}, *found_inf, at::kFloat);
  check_numel(op, {"found_inf"}, *found_inf, 1);
}

}  // namespace

void check_quantize_blockwise(const at::Tensor& x, const at::Tensor& code, int64_t blocksize) {
  const char* op = "adam8.quantize_blockwise";
  check_dtype(op, {"x"}, x, kParamDtypes);
  check_code(op, "code", code, x.device(), "x");
  check_blocksize(op, blocksize);
}

void check_dequantize_blockwise(const at::Tensor& q, const at::Tensor& absmax, const at::Tensor& code,
                                int64_t blocksize, at::ScalarType dtype) {
  const char* op = "adam8.dequantize_blockwise";
  check_dtype(op, {"q"}, q, at::kByte);
  check_device(op, {"absmax"}, absmax, q.device(), "q");
  check_dtype(op, {"absmax"}, absmax, at::kFloat);
  check_blocksize(op, blocksize);
  check_numel(op, {"absmax"}, absmax, ceil_div(q.numel(), blocksize));
  check_code(op, "code", code, q.device(), "q");
  check_dtype_arg(op, dtype, kParamDtypes);
}

void check_adam_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                     at::TensorList max_exp_avg_sqs, at::TensorList steps, const at::Tensor& lr,
                     const at::Tensor& betas, const c10::optional<at::Tensor>& gnorm_scales,
                     const c10::optional<at::Tensor>& found_inf, double eps, double weight_decay, double max_unorm) {
  const char* op = "adam8.adam_step";
  check_adam_common(op, params, grads,
                    {{"exp_avgs", exp_avgs, at::kFloat},
                     {"exp_avg_sqs", exp_avg_sqs, at::kFloat},
                     {"max_exp_avg_sqs", max_exp_avg_sqs, at::kFloat, true}},
                    steps, lr, betas, eps, weight_decay);
  check_nonnegative(op, "max_unorm", max_unorm);
  const at::Device device = params.empty() ? lr.device() : params[0].device();
  check_gnorm_scales(op, gnorm_scales, params.size(), device);
  check_found_inf(op, found_inf, device);
}

void check_adam8bit_step(at::TensorList params, at::TensorList grads, at::TensorList state1, at::TensorList state2,
                         at::TensorList state3, at::TensorList steps, at::TensorList absmax1, at::TensorList absmax2,
                         at::TensorList absmax3, const at::Tensor& qmap1, const at::Tensor& qmap2, const at::Tensor& lr,
                         const at::Tensor& betas, const c10::optional<at::Tensor>& gnorm_scales,
                         const c10::optional<at::Tensor>& found_inf, double eps, double weight_decay, double max_unorm,
                         bool block_wise) {
  const char* op = "adam8.adam8bit_step";
  check_adam_common(op, params, grads,
                    {{"state1", state1, at::kByte}, {"state2", state2, at::kByte}, {"state3", state3, at::kByte, true}},
                    steps, lr, betas, eps, weight_decay);
  check_length(op, "absmax1", absmax1.size(), "params", params.size());
  check_length(op, "absmax2", absmax2.size(), "params", params.size());
  check_length(op, "absmax3", absmax3.size(), "state3", state3.size());
  check_absmax_list(op, "absmax1", params, absmax1, block_wise);
  check_absmax_list(op, "absmax2", params, absmax2, block_wise);
  check_absmax_list(op, "absmax3", params, absmax3, block_wise);
  const at::Device device = params.empty() ? lr.device() : params[0].device();
  check_code(op, "qmap1", qmap1, device);
  check_code(op, "qmap2", qmap2, device);
  check_nonnegative(op, "max_unorm", max_unorm);
  check_gnorm_scales(op, gnorm_scales, params.size(), device);
  check_found_inf(op, found_inf, device);
}

void check_percentile_clipping(at::TensorList grads, at::TensorList gnorm_vecs, at::TensorList steps,
                               int64_t percentile, const at::Tensor& scales) {
  const char* op = "adam8.percentile_clipping";
  const size_t n = grads.size();
  check_length(op, "gnorm_vecs", gnorm_vecs.size(), "grads", n);
  check_length(op, "steps", steps.size(), "grads", n);
  TORCH_CHECK_VALUE(percentile >= 0 && percentile < kGnormHistory, op, ": percentile must be in [0, 100), got ",
                    percentile);
  const at::Device device = n == 0 ? scales.device() : grads[0].device();
  check_device(op, {"scales"}, scales, device, "grads[0]");
  check_dtype(op, {"scales"}, scales, at::kFloat);
  check_numel(op, {"scales"}, scales, static_cast<int64_t>(n));
  check_dense(op, {"scales"}, scales);
  for (size_t i = 0; i < n; ++i) {
    const Arg g{"grads", static_cast<int64_t>(i)}, h{"gnorm_vecs", g.index}, t{"steps", g.index};
    check_dtype(op, g, grads[i], kParamDtypes);
    check_device(op, g, grads[i], device, "grads[0]");
    check_dense(op, g, grads[i]);
    check_device(op, h, gnorm_vecs[i], device, "grads[0]");
    check_dtype(op, h, gnorm_vecs[i], at::kFloat);
    check_numel(op, h, gnorm_vecs[i], kGnormHistory);
    check_dense(op, h, gnorm_vecs[i]);
    check_device(op, t, steps[i], device, "grads[0]");
    check_dtype(op, t, steps[i], at::kFloat);
    check_numel(op, t, steps[i], 1);
  }
}

void check_paged_list(const char* op, at::TensorList tensors) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    const Arg t{"tensors", static_cast<int64_t>(i)};
    check_device(op, t, tensors[i], tensors[0].device(), "tensors[0]");
    check_dense(op, t, tensors[i]);
  }
}

constexpr std::array<at::ScalarType, 4> kPagedDtypes = {at::kFloat, at::kHalf, at::kBFloat16, at::kByte};

void check_zeros_managed(at::IntArrayRef size, at::ScalarType dtype, const at::Device& device) {
  const char* op = "adam8.zeros_managed";
  for (size_t i = 0; i < size.size(); ++i) {
    TORCH_CHECK_VALUE(size[i] >= 0, op, ": size[", i, "] is ", size[i], "; sizes must be >= 0");
  }
  check_dtype_arg(op, dtype, kPagedDtypes);
  TORCH_CHECK_VALUE(device.is_cpu() || device.is_cuda(), op, ": device is ", device.str(),
                    "; expected a cpu or cuda device");
}

}  // namespace adam8
