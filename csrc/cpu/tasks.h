// Splitting a list of tensors into parallel tasks for at::parallel_for.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "../adam8_math.h"

namespace adam8 {
namespace cpu {

// Elements per task: a multiple of kStateBlock, large enough that scheduling costs little and
// small enough that a few large tensors still spread over every thread.
constexpr int64_t kTaskElems = 32 * 1024;
static_assert(kTaskElems % kStateBlock == 0, "a task must hold whole blocks");

struct Task {
  int64_t tensor, begin, end;  // elements [begin, end) of tensors[tensor]
};

inline std::vector<Task> split_tasks(at::TensorList tensors, int64_t chunk) {
  std::vector<Task> tasks;
  for (int64_t i = 0; i < static_cast<int64_t>(tensors.size()); ++i) {
    const int64_t n = tensors[i].numel();
    for (int64_t b = 0; b < n; b += chunk) tasks.push_back({i, b, std::min(n, b + chunk)});
  }
  return tasks;
}

}  // namespace cpu
}  // namespace adam8
