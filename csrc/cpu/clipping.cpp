// CPU kernel of adam8::percentile_clipping: each gradient's squared norm (finite elements only,
// in double per task, then per tensor in task order), recorded in its history, and the
// gradient factor of this step (adam8_math.h: record_gnorm).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <vector>

#include "../checks.h"
#include "../kernels.h"
#include "simd.h"
#include "tasks.h"

namespace adam8 {
namespace cpu {
namespace {

// Sum of the squares of the finite elements (those whose float square is finite, as the update
// counts them), each square exact in double and added in double: the result rounds to the same
// float whatever the order of the additions (the CUDA kernel's differs).
template <class T>
double finite_sum_sq(const T* g, int64_t n) {
  double sum[4] = {0.0, 0.0, 0.0, 0.0};  // independent chains
  for (int64_t i = 0; i < n; ++i) {
    const float x = load_lane(g + i);
    if (vlt(x * x, INFINITY)) sum[i & 3] += static_cast<double>(x) * static_cast<double>(x);
  }
  return (sum[0] + sum[1]) + (sum[2] + sum[3]);
}

}  // namespace

void percentile_clipping(at::TensorList grads, at::TensorList gnorm_vecs, at::TensorList steps, int64_t percentile,
                         const at::Tensor& scales) {
  check_percentile_clipping(grads, gnorm_vecs, steps, percentile, scales);
  const auto tasks = split_tasks(grads, kTaskElems);
  std::vector<double> per_task(tasks.size(), 0.0);
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const Task& task = tasks[t];
      ADAM8_DISPATCH_FLOAT(grads[task.tensor].scalar_type(), [&] {
        per_task[t] = finite_sum_sq(grads[task.tensor].data_ptr<T>() + task.begin, task.end - task.begin);
      });
    }
  });
  std::vector<double> sums(grads.size(), 0.0);
  for (size_t t = 0; t < tasks.size(); ++t) sums[tasks[t].tensor] += per_task[t];
  float* out = scales.data_ptr<float>();
  for (size_t i = 0; i < grads.size(); ++i) {
    const double t = static_cast<double>(*steps[i].data_ptr<float>()) + 1.0;  // this step's count
    out[i] = record_gnorm(gnorm_vecs[i].data_ptr<float>(), sums[i], t, percentile);
  }
}

}  // namespace cpu
}  // namespace adam8
