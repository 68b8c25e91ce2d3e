// The Python module of the kernel library (torchadam8._extension.host()): helpers for the
// optimizer's eager step that read only tensor metadata, so they are plain functions, not ops (a
// compiled step runs them at trace time, in _init_group). One call checks the gradients and states
// of every parameter, where Python spent about 2 us per parameter on a dozen attribute reads.
#include <torch/extension.h>

#include <algorithm>

#include "checks.h"

namespace {

bool is_param_dtype(at::ScalarType t) {
  return std::find(adam8::kParamDtypes.begin(), adam8::kParamDtypes.end(), t) != adam8::kParamDtypes.end();
}

// Whether parameter p steps on the fast path: a dense gradient like p (dtype, shape, device), p of a
// supported dtype, and a first moment of p's shape, device and strides (strides may differ where
// p has at most one element). Anything else (an error to raise, a state to make or to move to a new
// layout) is for the optimizer's Python, which names the parameter.
bool usual(const at::Tensor& p, const at::Tensor& g, PyObject* moment) {
  if (g.layout() != at::kStrided || g.scalar_type() != p.scalar_type() || !is_param_dtype(p.scalar_type()) ||
      g.sizes() != p.sizes() || g.device() != p.device()) {
    return false;
  }
  if (!THPVariable_Check(moment)) return false;  // no state yet (None)
  const at::Tensor& m = THPVariable_Unpack(moment);
  return m.sizes() == p.sizes() && m.device() == p.device() && (m.strides() == p.strides() || p.numel() <= 1);
}

// For parallel lists (a parameter, its .grad or None, its first moment or None): the index of the
// first parameter with a gradient that is not usual (-1 if none), and whether any gradient has
// strides unlike its parameter's (the step copies those to the parameter's layout).
std::tuple<int64_t, bool> scan_params(const py::list& params, const py::list& grads, const py::list& moments) {
  const Py_ssize_t n = PyList_GET_SIZE(params.ptr());
  TORCH_CHECK(PyList_GET_SIZE(grads.ptr()) == n && PyList_GET_SIZE(moments.ptr()) == n,
              "scan_params: the three lists must have one entry per parameter");
  bool strided = false;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* grad = PyList_GET_ITEM(grads.ptr(), i);
    if (grad == Py_None) continue;
    PyObject* param = PyList_GET_ITEM(params.ptr(), i);
    TORCH_CHECK(THPVariable_Check(param) && THPVariable_Check(grad), "scan_params: parameters and gradients "
                "must be tensors");
    const at::Tensor& p = THPVariable_Unpack(param);
    const at::Tensor& g = THPVariable_Unpack(grad);
    if (!usual(p, g, PyList_GET_ITEM(moments.ptr(), i))) return {i, strided};
    strided = strided || (g.strides() != p.strides() && p.numel() > 1);
  }
  return {-1, strided};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("scan_params", &scan_params, py::arg("params"), py::arg("grads"), py::arg("moments"),
        "(first unusual index or -1, any gradient strided unlike its parameter)");
}
