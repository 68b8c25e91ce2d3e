// The ADInplaceOrView kernel of the mutating adam8 ops: bumps the version counter of every tensor
// the op writes (the arguments its schema in ops_registry marks `(a!)`), as ATen's in-place ops do,
// so autograd refuses a backward through a parameter the step has changed since the forward read
// it, instead of silently using the new values. In C++ rather than Python: a step passes hundreds
// of tensors, and a Python kernel converted every one of them to and from Python objects.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <vector>

namespace adam8 {
namespace {

void bump(const at::Tensor& t) {
  // Inference tensors have no version counter (torch.autograd.graph.increment_version skips them).
  if (t.defined() && !t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
}

// After the kernel returns, as ATen's in-place ops: a call the kernel refuses changes nothing, its
// tensors' versions included. (The kernel consumes the stack: the written arguments are kept first.)
void bump_versions_of_mutated(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto& arguments = op.schema().arguments();
  const size_t first = stack->size() - arguments.size();
  std::vector<c10::IValue> written;  // tensors and tensor lists (a list's copy shares its elements)
  for (size_t i = 0; i < arguments.size(); ++i) {
    const auto* alias = arguments[i].alias_info();
    if (alias != nullptr && alias->isWrite()) written.push_back((*stack)[first + i]);
  }
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  for (const c10::IValue& value : written) {
    if (value.isTensor()) {
      bump(value.toTensor());
    } else if (value.isTensorList()) {
      for (const at::Tensor& t : value.toTensorList()) bump(t);
    }
  }
}

}  // namespace
}  // namespace adam8

TORCH_LIBRARY_IMPL(adam8, ADInplaceOrView, m) {
  // Every op whose schema mutates an argument (test_ops checks each one's versions).
  for (const char* name : {"adam_step", "adam8bit_step", "percentile_clipping", "prefetch", "page_out"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&adam8::bump_versions_of_mutated>());
  }
}
