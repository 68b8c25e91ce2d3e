// Kernels of the sparse dispatch keys for every adam8 op that takes tensors: the ops take strided
// (dense) tensors only, and without these a sparse argument got the dispatcher's "Could not run
// 'adam8::adam_step' with arguments from the 'SparseCPU' backend", which names no argument.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <string>

namespace adam8 {
namespace {

// torch's Python name of a layout (C++ streams kSparse as "Sparse").
const char* layout_name(at::Layout layout) {
  switch (layout) {
    case at::kSparse: return "torch.sparse_coo";
    case at::kSparseCsr: return "torch.sparse_csr";
    case at::kSparseCsc: return "torch.sparse_csc";
    case at::kSparseBsr: return "torch.sparse_bsr";
    case at::kSparseBsc: return "torch.sparse_bsc";
    default: return "not strided";
  }
}

void refuse_sparse(const c10::OperatorHandle& op, c10::DispatchKeySet, torch::jit::Stack* stack) {
  std::string name = op.schema().name();
  name.replace(name.find("::"), 2, ".");
  const auto& arguments = op.schema().arguments();
  const size_t first = stack->size() - arguments.size();
  auto refuse = [&](const at::Tensor& t, const std::string& what) {
    TORCH_CHECK_VALUE(!t.defined() || t.layout() == at::kStrided, name, ": ", what, " has layout ", layout_name(t.layout()),
                      "; the kernels take dense (strided) tensors");
  };
  for (size_t i = 0; i < arguments.size(); ++i) {
    const c10::IValue& value = (*stack)[first + i];
    if (value.isTensor()) {
      refuse(value.toTensor(), arguments[i].name());
    } else if (value.isTensorList()) {
      int64_t index = 0;
      for (const at::Tensor& t : value.toTensorList()) refuse(t, arguments[i].name() + "[" + std::to_string(index++) + "]");
    }
  }
  TORCH_CHECK(false, name, ": dispatched to a sparse kernel without a sparse argument");
}

void register_sparse(torch::Library& m) {
  for (const char* name : {"adam_step", "adam8bit_step", "percentile_clipping", "quantize_blockwise",
                           "dequantize_blockwise", "prefetch", "page_out"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&refuse_sparse>());
  }
}

}  // namespace
}  // namespace adam8

TORCH_LIBRARY_IMPL(adam8, SparseCPU, m) { adam8::register_sparse(m); }
TORCH_LIBRARY_IMPL(adam8, SparseCUDA, m) { adam8::register_sparse(m); }
TORCH_LIBRARY_IMPL(adam8, SparseCsrCPU, m) { adam8::register_sparse(m); }
TORCH_LIBRARY_IMPL(adam8, SparseCsrCUDA, m) { adam8::register_sparse(m); }
