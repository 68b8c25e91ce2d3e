// CPU kernels of adam8::adam_step and adam8::adam8bit_step: the math of adam8_math.h run over a
// list of tensors, split into tasks that at::parallel_for spreads over the threads. When the update
// needs per-tensor sums or maxima first (max_unorm; 8-bit states with one scale per tensor), a
// pre-pass computes the same moments without writing anything.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <type_traits>
#include <vector>

#include "../checks.h"
#include "../kernels.h"
#include "../quant_lut.h"
#include "runs.h"
#include "tasks.h"

namespace adam8 {
namespace cpu {
namespace {

constexpr int W = Lane<Wide>::kWidth;

// Calls f(std::true_type{}) or f(std::false_type{}): a runtime flag as a template argument.
template <class F>
void dispatch_bool(bool flag, F&& f) {
  if (flag) f(std::true_type{}); else f(std::false_type{});
}

// Running sums and maxima of a pre-pass over lanes of type F.
template <class F>
struct LaneStats {
  using I = typename Lane<F>::I;
  F dir_sq{0.0f}, p_sq{0.0f};
  I max1{0}, max2{0}, max3{0};  // abs_bits

  template <bool kAmsgrad, class M>
  void add(F p, F m, F v, F vm, M update, const AdamScalars& s) {
    const F d = adam_direction(m, kAmsgrad ? vm : v, s);
    dir_sq = dir_sq + vselect(update, d * d, F(0.0f));
    p_sq = p_sq + p * p;
    max1 = max_abs_bits<F, I>(max1, m);
    max2 = max_abs_bits<F, I>(max2, v);
    max3 = max_abs_bits<F, I>(max3, vm);
  }
  // Adds these lanes to `out` (sums in double, so a long tensor loses nothing).
  void flush(StepStats& out) const {
    out.dir_sq += reduce_sum(dir_sq);
    out.p_sq += reduce_sum(p_sq);
    out.max1 = max_abs(out.max1, float_of(reduce_imax(max1)));
    out.max2 = max_abs(out.max2, float_of(reduce_imax(max2)));
    out.max3 = max_abs(out.max3, float_of(reduce_imax(max3)));
  }
};

void merge(StepStats& into, const StepStats& s) {
  into.dir_sq += s.dir_sq;
  into.p_sq += s.p_sq;
  into.max1 = max_abs(into.max1, s.max1);
  into.max2 = max_abs(into.max2, s.max2);
  into.max3 = max_abs(into.max3, s.max3);
}

// Runs body(task, stats of that task) over every task in parallel, then returns the stats summed
// per tensor in task order (the same result whatever the thread count).
template <class Body>
std::vector<StepStats> per_tensor_stats(const std::vector<Task>& tasks, size_t tensors, Body&& body) {
  std::vector<StepStats> per_task(tasks.size(), StepStats{0.0, 0.0, 0.0f, 0.0f, 0.0f});
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) body(tasks[t], per_task[t]);
  });
  std::vector<StepStats> out(tensors, StepStats{0.0, 0.0, 0.0f, 0.0f, 0.0f});
  for (size_t t = 0; t < tasks.size(); ++t) merge(out[tasks[t].tensor], per_task[t]);
  return out;
}

// GradScaler found an inf or NaN gradient: the step changes nothing, step counts included
// (found_inf is in host memory: no sync).
bool skipped(const c10::optional<at::Tensor>& found_inf) {
  return found_inf.has_value() && *found_inf->data_ptr<float>() != 0.0f;
}

// Advances every step count by one and returns each tensor's constants for the new count
// (lr, betas, step and gnorm_scales tensors are in host memory: no sync).
std::vector<AdamScalars> advance_steps(at::TensorList steps, const at::Tensor& lr, const at::Tensor& betas,
                                       const c10::optional<at::Tensor>& gnorm_scales, double eps,
                                       double weight_decay) {
  const double lr_value = *lr.data_ptr<float>();
  const at::Tensor b = betas.contiguous();
  const double beta1 = b.data_ptr<double>()[0], beta2 = b.data_ptr<double>()[1];
  const float* scales = gnorm_scales.has_value() ? gnorm_scales->data_ptr<float>() : nullptr;
  std::vector<AdamScalars> out;
  out.reserve(steps.size());
  float last_t = 0.0f;
  for (size_t i = 0; i < steps.size(); ++i) {
    float& t = *steps[i].data_ptr<float>();
    t += 1.0f;
    const float scale = scales ? scales[i] : 1.0f;
    // The tensors of a group usually share their step count: the constants of the previous
    // tensor's count are reused (three pow()s fewer per tensor).
    if (i > 0 && t == last_t && bits_of(scale) == bits_of(out.back().grad_scale)) {
      out.push_back(out.back());
    } else {
      out.push_back(adam_scalars(lr_value, t, beta1, beta2, eps, weight_decay, scale));
      last_t = t;
    }
  }
  return out;
}

// Folds max_unorm's factor into each tensor's step size.
void apply_unorm(std::vector<AdamScalars>& scalars, const std::vector<StepStats>& stats, double max_unorm) {
  for (size_t i = 0; i < scalars.size(); ++i) {
    scalars[i].step_size *= unorm_scale(stats[i].dir_sq, stats[i].p_sq, scalars[i].bc1, max_unorm);
  }
}

// ---------------------------------------------------------------- 32-bit states
template <bool kAmsgrad, class T>
struct Span32 {
  T* p;
  const T* g;
  float *m, *v, *vm;  // vm: nullptr unless kAmsgrad
};

template <bool kAmsgrad, class F, class T>
inline void adam32_lanes(const Span32<kAmsgrad, T>& x, int64_t i, const AdamScalars& s, bool skip_zeros) {
  F p = Lane<F>::load(x.p + i), m = Lane<F>::load(x.m + i), v = Lane<F>::load(x.v + i);
  F vm = kAmsgrad ? Lane<F>::load(x.vm + i) : F(0.0f);
  adam_update<kAmsgrad, false>(p, Lane<F>::load(x.g + i), m, v, vm, s, skip_zeros);
  store_lane(x.p + i, p);
  store_lane(x.m + i, m);
  store_lane(x.v + i, v);
  if (kAmsgrad) store_lane(x.vm + i, vm);
}

template <bool kAmsgrad, class F, class T>
inline void adam32_stats_lanes(const Span32<kAmsgrad, T>& x, int64_t i, const AdamScalars& s, bool skip_zeros,
                               LaneStats<F>& acc) {
  F p = Lane<F>::load(x.p + i), m = Lane<F>::load(x.m + i), v = Lane<F>::load(x.v + i);
  F vm = kAmsgrad ? Lane<F>::load(x.vm + i) : F(0.0f);
  const auto update = adam_moments<kAmsgrad, false>(Lane<F>::load(x.g + i), m, v, vm, s, skip_zeros);
  acc.template add<kAmsgrad>(p, m, v, vm, update, s);
}

template <bool kAmsgrad, class T>
void adam32_range(const Span32<kAmsgrad, T>& x, int64_t n, const AdamScalars& s_ref, bool skip_zeros) {
  const AdamScalars s = s_ref;  // a local copy: stores through float pointers may alias the caller's
  int64_t i = 0;
  for (; i + W <= n; i += W) adam32_lanes<kAmsgrad, Wide>(x, i, s, skip_zeros);
  for (; i < n; ++i) adam32_lanes<kAmsgrad, float>(x, i, s, skip_zeros);
}

template <bool kAmsgrad, class T>
void adam32_stats(const Span32<kAmsgrad, T>& x, int64_t n, const AdamScalars& s_ref, bool skip_zeros, StepStats& out) {
  const AdamScalars s = s_ref;
  LaneStats<Wide> wide;
  LaneStats<float> narrow;
  int64_t i = 0;
  for (; i + W <= n; i += W) adam32_stats_lanes<kAmsgrad, Wide>(x, i, s, skip_zeros, wide);
  for (; i < n; ++i) adam32_stats_lanes<kAmsgrad, float>(x, i, s, skip_zeros, narrow);
  wide.flush(out);
  narrow.flush(out);
}

// ---------------------------------------------------------------- 8-bit states
struct Codes {
  QuantLut m, v;  // signed code of the first moment, unsigned code of the second (and of its max)
  int32_t v_first_positive;  // keep_positive's index for the second moment's code
};

// One block of at most kStateBlock values of one tensor: codes, their scales before the step, and
// the scales to requantize with (per tensor: known from the pre-pass; blockwise: found here).
template <bool kAmsgrad, class T>
struct Block8 {
  T* p;
  const T* g;
  uint8_t* q[3];
  float scale[3];
  int64_t n;
};

// Dequantized moments of a block in L1-resident buffers: code values times the block's scales.
template <bool kAmsgrad, class T>
struct Moments8 {
  alignas(64) float m[kStateBlock];
  alignas(64) float v[kStateBlock];
  alignas(64) float vm[kAmsgrad ? kStateBlock : 1];

  Moments8(const Block8<kAmsgrad, T>& b, const Codes& c) {
    lookup_codes(b.q[0], b.n, c.m.code, m);
    lookup_codes(b.q[1], b.n, c.v.code, v);
    if (kAmsgrad) lookup_codes(b.q[2], b.n, c.v.code, vm);
  }

  // Lanes i.. of the block through the moment update; update(...) gets them and the update mask.
  template <class F, class Fn>
  inline void lanes(const Block8<kAmsgrad, T>& b, int64_t i, const AdamScalars& s, bool skip_zeros, Fn&& fn) {
    F mv = Lane<F>::load(m + i) * F(b.scale[0]), vv = Lane<F>::load(v + i) * F(b.scale[1]);
    F vmv = kAmsgrad ? Lane<F>::load(vm + i) * F(b.scale[2]) : F(0.0f);
    const auto update = adam_moments<kAmsgrad, true>(Lane<F>::load(b.g + i), mv, vv, vmv, s, skip_zeros);
    fn(i, mv, vv, vmv, update);
  }
};

// The pre-pass of a block: its contribution to the tensor's sums and maxima.
template <bool kAmsgrad, class T>
void adam8_stats_block(const Block8<kAmsgrad, T>& b, const Codes& c, const AdamScalars& s, bool skip_zeros,
                       StepStats& out) {
  Moments8<kAmsgrad, T> x(b, c);
  LaneStats<Wide> wide;
  LaneStats<float> narrow;
  int64_t i = 0;
  for (; i + W <= b.n; i += W) {
    x.template lanes<Wide>(b, i, s, skip_zeros, [&](int64_t j, Wide m, Wide v, Wide vm, auto update) {
      wide.template add<kAmsgrad>(Lane<Wide>::load(b.p + j), m, v, vm, update, s);
    });
  }
  for (; i < b.n; ++i) {
    x.template lanes<float>(b, i, s, skip_zeros, [&](int64_t j, float m, float v, float vm, bool update) {
      narrow.template add<kAmsgrad>(Lane<float>::load(b.p + j), m, v, vm, update, s);
    });
  }
  wide.flush(out);
  narrow.flush(out);
}

// The update of a block in three passes over L1-resident buffers (dequantize, update, requantize),
// so each loop has short dependency chains that the core can overlap. `requant` holds the scales to
// quantize with, or is nullptr for blockwise scales, which are then the block's new maxima and
// are written to `new_scale`.
template <bool kAmsgrad, class T>
void adam8_block(const Block8<kAmsgrad, T>& b, const Codes& c, const AdamScalars& s_ref, bool skip_zeros,
                 const float* requant, float* new_scale) {
  const AdamScalars s = s_ref;  // a local copy: stores through float pointers may alias the caller's
  Moments8<kAmsgrad, T> x(b, c);
  using WideI = typename Lane<Wide>::I;
  WideI wmax[3] = {WideI(0), WideI(0), WideI(0)};  // abs_bits
  int32_t bmax[3];
  int64_t i = 0;
  for (; i + W <= b.n; i += W) {
    x.template lanes<Wide>(b, i, s, skip_zeros, [&](int64_t j, Wide m, Wide v, Wide vm, auto update) {
      Wide p = Lane<Wide>::load(b.p + j);
      store_lane(b.p + j, vselect(update, adam_param(p, adam_direction(m, kAmsgrad ? vm : v, s), s), p));
      store_lane(x.m + j, m);
      store_lane(x.v + j, v);
      if (kAmsgrad) store_lane(x.vm + j, vm);
      wmax[0] = max_abs_bits<Wide, WideI>(wmax[0], m);
      wmax[1] = max_abs_bits<Wide, WideI>(wmax[1], v);
      wmax[2] = max_abs_bits<Wide, WideI>(wmax[2], vm);
    });
  }
  for (int k = 0; k < 3; ++k) bmax[k] = reduce_imax(wmax[k]);
  for (; i < b.n; ++i) {
    x.template lanes<float>(b, i, s, skip_zeros, [&](int64_t j, float m, float v, float vm, bool update) {
      const float p = Lane<float>::load(b.p + j);
      store_lane(b.p + j, update ? adam_param(p, adam_direction(m, kAmsgrad ? vm : v, s), s) : p);
      x.m[j] = m;
      x.v[j] = v;
      if (kAmsgrad) x.vm[j] = vm;
      bmax[0] = max_abs_bits<float, int32_t>(bmax[0], m);
      bmax[1] = max_abs_bits<float, int32_t>(bmax[1], v);
      bmax[2] = max_abs_bits<float, int32_t>(bmax[2], vm);
    });
  }
  if (requant == nullptr) {
    for (int k = 0; k < 3; ++k) new_scale[k] = float_of(bmax[k]);
    requant = new_scale;
  }
  quantize_run(x.m, b.n, normaliser(x.m, b.n, requant[0]), b.q[0], c.m);
  quantize_run(x.v, b.n, normaliser(x.v, b.n, requant[1]), b.q[1], c.v, c.v_first_positive);
  if (kAmsgrad) quantize_run(x.vm, b.n, normaliser(x.vm, b.n, requant[2]), b.q[2], c.v, c.v_first_positive);
}

}  // namespace

void adam_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
               at::TensorList max_exp_avg_sqs, at::TensorList steps, const at::Tensor& lr, const at::Tensor& betas,
               const c10::optional<at::Tensor>& gnorm_scales, const c10::optional<at::Tensor>& found_inf, double eps,
               double weight_decay, double max_unorm, bool skip_zeros) {
  check_adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, betas, gnorm_scales, found_inf, eps,
                  weight_decay, max_unorm);
  if (skipped(found_inf)) return;
  auto scalars = advance_steps(steps, lr, betas, gnorm_scales, eps, weight_decay);
  const auto tasks = split_tasks(params, kTaskElems);
  dispatch_bool(!max_exp_avg_sqs.empty(), [&](auto amsgrad) {
    constexpr bool A = decltype(amsgrad)::value;
    auto run = [&](const Task& task, auto&& body) {
      const int64_t i = task.tensor, b = task.begin;
      ADAM8_DISPATCH_FLOAT(params[i].scalar_type(), [&] {
        Span32<A, T> x{params[i].data_ptr<T>() + b, grads[i].data_ptr<T>() + b, exp_avgs[i].data_ptr<float>() + b,
                       exp_avg_sqs[i].data_ptr<float>() + b, A ? max_exp_avg_sqs[i].data_ptr<float>() + b : nullptr};
        body(x, task.end - b, scalars[i]);
      });
    };
    if (max_unorm > 0.0) {
      const auto stats = per_tensor_stats(tasks, params.size(), [&](const Task& task, StepStats& out) {
        run(task, [&](const auto& x, int64_t n, const AdamScalars& s) { adam32_stats(x, n, s, skip_zeros, out); });
      });
      apply_unorm(scalars, stats, max_unorm);
    }
    at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        run(tasks[t], [&](const auto& x, int64_t n, const AdamScalars& s) { adam32_range(x, n, s, skip_zeros); });
      }
    });
  });
}

void adam8bit_step(at::TensorList params, at::TensorList grads, at::TensorList state1, at::TensorList state2,
                   at::TensorList state3, at::TensorList steps, at::TensorList absmax1, at::TensorList absmax2,
                   at::TensorList absmax3, const at::Tensor& qmap1, const at::Tensor& qmap2, const at::Tensor& lr,
                   const at::Tensor& betas, const c10::optional<at::Tensor>& gnorm_scales,
                   const c10::optional<at::Tensor>& found_inf, double eps, double weight_decay, double max_unorm,
                   bool skip_zeros, bool block_wise) {
  check_adam8bit_step(params, grads, state1, state2, state3, steps, absmax1, absmax2, absmax3, qmap1, qmap2, lr,
                      betas, gnorm_scales, found_inf, eps, weight_decay, max_unorm, block_wise);
  if (skipped(found_inf)) return;
  auto scalars = advance_steps(steps, lr, betas, gnorm_scales, eps, weight_decay);
  const auto lut1 = cached_lut(qmap1.contiguous().data_ptr<float>());
  const auto lut2 = cached_lut(qmap2.contiguous().data_ptr<float>());
  const Codes codes{lut1->view(), lut2->view(), lut2->first_positive};
  const auto tasks = split_tasks(params, kTaskElems);  // kTaskElems is a multiple of kStateBlock
  const bool amsgrad = !state3.empty();
  dispatch_bool(amsgrad, [&](auto amsgrad_tag) {
    constexpr bool A = decltype(amsgrad_tag)::value;
    // Calls body(block, absmax pointers at the block's scale) for each state block of a task.
    auto blocks = [&](const Task& task, auto&& body) {
      const int64_t i = task.tensor;
      ADAM8_DISPATCH_FLOAT(params[i].scalar_type(), [&] {
        // Pointers read once per task: data_ptr() costs as much as a fifth of a block's work.
        float* am[3] = {absmax1[i].data_ptr<float>(), absmax2[i].data_ptr<float>(),
                        A ? absmax3[i].data_ptr<float>() : nullptr};
        T* p = params[i].data_ptr<T>();
        const T* g = grads[i].data_ptr<T>();
        uint8_t* q[3] = {state1[i].data_ptr<uint8_t>(), state2[i].data_ptr<uint8_t>(),
                         A ? state3[i].data_ptr<uint8_t>() : nullptr};
        for (int64_t b = task.begin; b < task.end; b += kStateBlock) {
          const int64_t k = block_wise ? b / kStateBlock : 0;
          Block8<A, T> blk{p + b, g + b, {q[0] + b, q[1] + b, A ? q[2] + b : nullptr},
                           {am[0][k], am[1][k], A ? am[2][k] : 0.0f}, std::min(kStateBlock, task.end - b)};
          body(blk, i, k, am);
        }
      });
    };
    std::vector<StepStats> stats;
    if (max_unorm > 0.0 || !block_wise) {
      stats = per_tensor_stats(tasks, params.size(), [&](const Task& task, StepStats& out) {
        blocks(task, [&](const auto& blk, int64_t i, int64_t, float**) {
          adam8_stats_block(blk, codes, scalars[i], skip_zeros, out);
        });
      });
      apply_unorm(scalars, stats, max_unorm);
    }
    at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        blocks(tasks[t], [&](const auto& blk, int64_t i, int64_t k, float** am) {
          if (block_wise) {
            float fresh[3];
            adam8_block(blk, codes, scalars[i], skip_zeros, nullptr, fresh);
            for (int s = 0; s < (A ? 3 : 2); ++s) am[s][k] = fresh[s];
          } else {
            const float requant[3] = {stats[i].max1, stats[i].max2, stats[i].max3};
            adam8_block(blk, codes, scalars[i], skip_zeros, requant, nullptr);
          }
        });
      }
    });
    if (!block_wise) {  // every block has read the old per-tensor scales
      for (size_t i = 0; i < params.size(); ++i) {
        *absmax1[i].data_ptr<float>() = stats[i].max1;
        *absmax2[i].data_ptr<float>() = stats[i].max2;
        if (A) *absmax3[i].data_ptr<float>() = stats[i].max3;
      }
    }
  });
}

}  // namespace cpu
}  // namespace adam8
