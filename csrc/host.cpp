// The Python module of the kernel library (torchadam8._extension.host()): helpers for the
// optimizer's eager step that read only tensor metadata, so they are plain functions, not ops (a
// compiled step runs them at trace time, in _init_group). One call checks the gradients and states
// of every parameter, where Python spent about 2 us per parameter on a dozen attribute reads.
#include <torch/extension.h>

#include <algorithm>
#include <array>
#include <unordered_set>
#include <vector>

#include "checks.h"

namespace {

bool is_param_dtype(at::ScalarType t) {
  return std::find(adam8::kParamDtypes.begin(), adam8::kParamDtypes.end(), t) != adam8::kParamDtypes.end();
}

// The state keys the scan and batch_group read, interned once.
struct StateKeys {
  PyObject *state1, *state2, *state3, *step, *absmax1, *absmax2, *absmax3, *gnorm_vec;
};
const StateKeys& state_keys() {
  static const StateKeys keys{PyUnicode_InternFromString("state1"),  PyUnicode_InternFromString("state2"),
                              PyUnicode_InternFromString("state3"),  PyUnicode_InternFromString("step"),
                              PyUnicode_InternFromString("absmax1"), PyUnicode_InternFromString("absmax2"),
                              PyUnicode_InternFromString("absmax3"), PyUnicode_InternFromString("gnorm_vec")};
  return keys;
}

// state[key] as a tensor on `device` of `dtype` and `numel` elements (numel < 0: any), or nullptr.
const at::Tensor* entry(PyObject* state, PyObject* key, const at::Device& device, at::ScalarType dtype,
                        int64_t numel = -1) {
  PyObject* value = PyDict_GetItem(state, key);  // borrowed
  if (value == nullptr || !THPVariable_Check(value)) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(value);
  return t.device() == device && t.scalar_type() == dtype && (numel < 0 || t.numel() == numel) ? &t : nullptr;
}

// Whether the state of p holds what an op call needs, each entry as the optimizer makes it: moments
// of p's shape, strides (where p has more than one element) and device, all float32 or all (8-bit)
// uint8, a float32 scalar step, 8-bit scales (all per block or all per tensor), a clipping history
// of 100. (amsgrad's state3 and the history may be absent: the step adds them.) Anything else goes
// to the Python checks: no state yet, moments to move to p's new layout, or an error naming the
// entry (a state edited by hand), raised before the step changes anything.
bool state_usual(const at::Tensor& p, PyObject* state) {
  if (state == Py_None || !PyDict_Check(state)) return false;
  const StateKeys& k = state_keys();
  PyObject* first = PyDict_GetItem(state, k.state1);
  if (first == nullptr || !THPVariable_Check(first)) return false;
  const at::ScalarType kind = THPVariable_Unpack(first).scalar_type();
  if (kind != at::kFloat && kind != at::kByte) return false;
  const at::Device device = p.device();
  auto moment = [&](PyObject* key) {
    const at::Tensor* m = entry(state, key, device, kind);
    return m != nullptr && m->sizes() == p.sizes() && (m->strides() == p.strides() || p.numel() <= 1);
  };
  const bool amsgrad = PyDict_GetItem(state, k.state3) != nullptr;
  if (!moment(k.state1) || !moment(k.state2) || (amsgrad && !moment(k.state3)) ||
      entry(state, k.step, device, at::kFloat, 1) == nullptr ||
      (PyDict_GetItem(state, k.gnorm_vec) != nullptr &&
       entry(state, k.gnorm_vec, device, at::kFloat, adam8::kGnormHistory) == nullptr)) {
    return false;
  }
  if (kind == at::kByte) {
    const at::Tensor* scales = entry(state, k.absmax1, device, at::kFloat);
    if (scales == nullptr) return false;
    const int64_t n = scales->numel();
    if ((n != 1 && n != (p.numel() + adam8::kStateBlock - 1) / adam8::kStateBlock) ||
        entry(state, k.absmax2, device, at::kFloat, n) == nullptr ||
        (amsgrad && entry(state, k.absmax3, device, at::kFloat, n) == nullptr)) {
      return false;
    }
  }
  return true;
}

// Whether parameter p steps on the fast path: a dense gradient like p (dtype, shape, device), p of a
// supported dtype, and a usual state. Anything else (an error to raise, a state to make or to move
// to a new layout) is for the optimizer's Python, which names the parameter.
bool usual(const at::Tensor& p, const at::Tensor& g, PyObject* state) {
  return g.layout() == at::kStrided && g.scalar_type() == p.scalar_type() && is_param_dtype(p.scalar_type()) &&
         g.sizes() == p.sizes() && g.device() == p.device() && state_usual(p, state);
}

// For parallel lists (a parameter, its .grad or None, its state dict or None): the index of the
// first parameter with a gradient that is not usual or repeats an earlier one (-1 if none), and
// whether any gradient has strides unlike its parameter's (the step copies those to the
// parameter's layout).
std::tuple<int64_t, bool> scan_params(const py::list& params, const py::list& grads, const py::list& states) {
  const Py_ssize_t n = PyList_GET_SIZE(params.ptr());
  TORCH_CHECK(PyList_GET_SIZE(grads.ptr()) == n && PyList_GET_SIZE(states.ptr()) == n,
              "scan_params: the three lists must have one entry per parameter");
  bool strided = false;
  std::unordered_set<PyObject*> seen;  // (one op call updating a tensor twice races)
  seen.reserve(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* grad = PyList_GET_ITEM(grads.ptr(), i);
    if (grad == Py_None) continue;
    PyObject* param = PyList_GET_ITEM(params.ptr(), i);
    if (!seen.insert(param).second) return {i, strided};
    TORCH_CHECK(THPVariable_Check(param) && THPVariable_Check(grad), "scan_params: parameters and gradients "
                "must be tensors");
    const at::Tensor& p = THPVariable_Unpack(param);
    const at::Tensor& g = THPVariable_Unpack(grad);
    if (!usual(p, g, PyList_GET_ITEM(states.ptr(), i))) return {i, strided};
    strided = strided || (g.strides() != p.strides() && p.numel() > 1);
  }
  return {-1, strided};
}

// Appends state[key] to `list`; false where the state has no such entry.
bool append_entry(PyObject* list, PyObject* state, PyObject* key) {
  PyObject* value = PyDict_GetItem(state, key);  // borrowed
  return value != nullptr && PyList_Append(list, value) == 0;
}

// One op call's argument lists (params, grads, state1, state2, state3, step, absmax1, absmax2,
// absmax3, gnorm_vec; the optional ones empty where absent) and the batch indices of gradients
// strided unlike their parameter, for parameters of one state kind on one device.
struct Batch {
  Batch(bool eight_bit, bool block_wise, at::Device device)
      : eight_bit(eight_bit), block_wise(block_wise), device(device) {}
  bool eight_bit, block_wise;
  at::Device device;
  std::array<py::list, 10> lists;
  py::list strided;
};

// The batching of a group's step (optim.py's _init_group, fast path), for parallel lists (a
// parameter, its .grad or None, its state dict or None) of a group without per-parameter overrides
// whose parameters the scan found usual: one (lists, eight_bit, block_wise, strided) per batch, in
// the order of their first parameters. None when anything needs the Python loop: a state of
// another kind than the group's options make (amsgrad or clipping switched since it was made), a
// missing entry, a parameter with a gradient and no state.
py::object batch_group(const py::list& params, const py::list& grads, const py::list& states, bool amsgrad,
                       bool clipping) {
  const Py_ssize_t n = PyList_GET_SIZE(params.ptr());
  TORCH_CHECK(PyList_GET_SIZE(grads.ptr()) == n && PyList_GET_SIZE(states.ptr()) == n,
              "batch_group: the three lists must have one entry per parameter");
  const StateKeys& k = state_keys();
  std::vector<Batch> batches;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* state = PyList_GET_ITEM(states.ptr(), i);
    if (state != Py_None && !PyDict_Check(state)) return py::none();
    const bool has_state = state != Py_None && PyDict_GET_SIZE(state) > 0;
    // As the Python loop: amsgrad switched, or clipping turned off, changes the state of a parameter
    // without a gradient too; clipping turned on adds its history to one with a gradient only.
    const bool has_history = has_state && PyDict_GetItem(state, k.gnorm_vec) != nullptr;
    if (has_state && ((PyDict_GetItem(state, k.state3) != nullptr) != amsgrad || (has_history && !clipping))) {
      return py::none();
    }
    PyObject* grad = PyList_GET_ITEM(grads.ptr(), i);
    if (grad == Py_None) continue;
    if (has_history != clipping) return py::none();
    PyObject* param = PyList_GET_ITEM(params.ptr(), i);
    PyObject* state1 = has_state ? PyDict_GetItem(state, k.state1) : nullptr;
    if (state1 == nullptr || !THPVariable_Check(state1) || !THPVariable_Check(param) || !THPVariable_Check(grad)) {
      return py::none();
    }
    const at::Tensor& p = THPVariable_Unpack(param);
    const bool eight = THPVariable_Unpack(state1).scalar_type() == at::kByte;
    bool blocks = true;  // as _init_group: the state's layout decides
    if (eight) {
      PyObject* absmax1 = PyDict_GetItem(state, k.absmax1);
      if (absmax1 == nullptr || !THPVariable_Check(absmax1)) return py::none();
      blocks = THPVariable_Unpack(absmax1).numel() != 1 || (p.numel() > 0 && p.numel() <= adam8::kStateBlock);
    }
    auto b = std::find_if(batches.begin(), batches.end(), [&](const Batch& b) {
      return b.eight_bit == eight && b.block_wise == blocks && b.device == p.device();
    });
    if (b == batches.end()) b = batches.emplace(batches.end(), eight, blocks, p.device());
    auto& lists = b->lists;
    const Py_ssize_t index = PyList_GET_SIZE(lists[0].ptr());
    const bool ok = PyList_Append(lists[0].ptr(), param) == 0 && PyList_Append(lists[1].ptr(), grad) == 0 &&
                    PyList_Append(lists[2].ptr(), state1) == 0 && append_entry(lists[3].ptr(), state, k.state2) &&
                    (!amsgrad || append_entry(lists[4].ptr(), state, k.state3)) &&
                    append_entry(lists[5].ptr(), state, k.step) &&
                    (!eight || (append_entry(lists[6].ptr(), state, k.absmax1) &&
                                append_entry(lists[7].ptr(), state, k.absmax2) &&
                                (!amsgrad || append_entry(lists[8].ptr(), state, k.absmax3)))) &&
                    (!clipping || append_entry(lists[9].ptr(), state, k.gnorm_vec));
    if (!ok) {
      PyErr_Clear();
      return py::none();
    }
    if (p.numel() > 1 && THPVariable_Unpack(grad).strides() != p.strides()) b->strided.append(index);
  }
  py::list out;
  for (const Batch& b : batches) {
    py::tuple lists(b.lists.size());
    for (size_t i = 0; i < b.lists.size(); ++i) lists[i] = b.lists[i];
    out.append(py::make_tuple(lists, b.eight_bit, b.block_wise, b.strided));
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("scan_params", &scan_params, py::arg("params"), py::arg("grads"), py::arg("states"),
        "(first unusual index or -1, any gradient strided unlike its parameter)");
  m.def("batch_group", &batch_group, py::arg("params"), py::arg("grads"), py::arg("states"), py::arg("amsgrad"),
        py::arg("clipping"), "[(lists, eight_bit, block_wise, strided) of each op call of a group] or None");
}
