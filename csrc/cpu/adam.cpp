// CPU kernels of adam8::adam_step and adam8::adam8bit_blockwise_step: the math of adam8_math.h run
// over a list of tensors, split into tasks that at::parallel_for spreads over the threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <vector>

#include "../checks.h"
#include "../kernels.h"
#include "../quant_lut.h"
#include "runs.h"
#include "tasks.h"

namespace adam8 {
namespace cpu {
namespace {

// ---------------------------------------------------------------- 32-bit states
template <class F, class T>
inline void adam32_lanes(T* p, const T* g, float* m, float* v, const AdamScalars& s) {
  F pv = Lane<F>::load(p), mv = Lane<F>::load(m), vv = Lane<F>::load(v);
  adam_update(pv, Lane<F>::load(g), mv, vv, s);
  store_lane(p, pv);
  store_lane(m, mv);
  store_lane(v, vv);
}

template <class T>
void adam32_range(T* p, const T* g, float* m, float* v, int64_t n, const AdamScalars& s_ref) {
  const AdamScalars s = s_ref;  // a local copy: stores through float pointers may alias the caller's
  constexpr int W = Lane<Wide>::kWidth;
  int64_t i = 0;
  for (; i + W <= n; i += W) adam32_lanes<Wide>(p + i, g + i, m + i, v + i, s);
  for (; i < n; ++i) adam32_lanes<float>(p + i, g + i, m + i, v + i, s);
}

// ---------------------------------------------------------------- 8-bit blockwise states
struct Codes {
  QuantLut m, v;  // signed code of the first moment, unsigned code of the second
};

// The update of one lane group: m / v hold code values, scaled here by the block's absmax
// (dequantize_one) and replaced by the new moments; the running maxima of |m| and v give the
// block's new absmax.
template <class F, class T>
inline void adam8_lanes(T* p, const T* g, float* m, float* v, F a1, F a2, F& max1, F& max2,
                        const AdamScalars& s) {
  F pv = Lane<F>::load(p), mv = Lane<F>::load(m) * a1, vv = Lane<F>::load(v) * a2;
  adam_update(pv, Lane<F>::load(g), mv, vv, s);
  store_lane(p, pv);
  store_lane(m, mv);
  store_lane(v, vv);
  max1 = vmax(max1, vabs(mv));
  max2 = vmax(max2, vv);
}

// One block of at most kStateBlock values, in three passes over L1-resident buffers (dequantize,
// update, requantize) so each loop has short dependency chains that the core can overlap.
template <class T>
void adam8_block(T* p, const T* g, uint8_t* q1, uint8_t* q2, float* absmax1, float* absmax2, int64_t n,
                 const Codes& c, const AdamScalars& s_ref) {
  const AdamScalars s = s_ref;  // a local copy: stores through float pointers may alias the caller's
  alignas(64) float m[kStateBlock];
  alignas(64) float v[kStateBlock];
  lookup_codes(q1, n, c.m.code, m);
  lookup_codes(q2, n, c.v.code, v);
  const float a1 = *absmax1, a2 = *absmax2;
  constexpr int W = Lane<Wide>::kWidth;
  Wide wmax1(0.0f), wmax2(0.0f);
  int64_t i = 0;
  for (; i + W <= n; i += W) adam8_lanes<Wide>(p + i, g + i, m + i, v + i, Wide(a1), Wide(a2), wmax1, wmax2, s);
  float max1 = reduce_max(wmax1), max2 = reduce_max(wmax2);
  for (; i < n; ++i) adam8_lanes<float>(p + i, g + i, m + i, v + i, a1, a2, max1, max2, s);
  *absmax1 = max1;
  *absmax2 = max2;
  quantize_run(m, n, inv_absmax(max1), q1, c.m);
  quantize_run(v, n, inv_absmax(max2), q2, c.v);
}

// Advances every step count by one and returns each tensor's constants for the new count
// (the lr and step tensors are in host memory: no sync).
std::vector<AdamScalars> advance_steps(at::TensorList steps, const at::Tensor& lr, double beta1, double beta2,
                                       double eps, double weight_decay) {
  const double lr_value = *lr.data_ptr<float>();
  std::vector<AdamScalars> out;
  out.reserve(steps.size());
  for (const auto& step : steps) {
    float& t = *step.data_ptr<float>();
    t += 1.0f;
    out.push_back(adam_scalars(lr_value, t, beta1, beta2, eps, weight_decay));
  }
  return out;
}

}  // namespace

void adam_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
               at::TensorList exp_avg_sqs, at::TensorList steps, const at::Tensor& lr, double beta1,
               double beta2, double eps, double weight_decay) {
  check_adam_step(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay);
  const auto scalars = advance_steps(steps, lr, beta1, beta2, eps, weight_decay);
  const auto tasks = split_tasks(params, kTaskElems);
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const Task& task = tasks[t];
      const int64_t i = task.tensor, b = task.begin;
      ADAM8_DISPATCH_FLOAT(params[i].scalar_type(), [&] {
        adam32_range(params[i].data_ptr<T>() + b, grads[i].data_ptr<T>() + b, exp_avgs[i].data_ptr<float>() + b,
                     exp_avg_sqs[i].data_ptr<float>() + b, task.end - b, scalars[i]);
      });
    }
  });
}

void adam8bit_blockwise_step(at::TensorList params, at::TensorList grads, at::TensorList state1,
                             at::TensorList state2, at::TensorList steps, at::TensorList absmax1,
                             at::TensorList absmax2, const at::Tensor& qmap1, const at::Tensor& qmap2,
                             const at::Tensor& lr, double beta1, double beta2, double eps,
                             double weight_decay) {
  check_adam8bit_blockwise_step(params, grads, state1, state2, steps, absmax1, absmax2, qmap1, qmap2, lr, beta1, beta2,
                                eps, weight_decay);

  const auto scalars = advance_steps(steps, lr, beta1, beta2, eps, weight_decay);
  const HostLut lut1 = build_lut(qmap1.contiguous().data_ptr<float>());
  const HostLut lut2 = build_lut(qmap2.contiguous().data_ptr<float>());
  const Codes codes{lut1.view(), lut2.view()};
  const auto tasks = split_tasks(params, kTaskElems);  // kTaskElems is a multiple of kStateBlock
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const Task& task = tasks[t];
      const int64_t i = task.tensor;
      ADAM8_DISPATCH_FLOAT(params[i].scalar_type(), [&] {
        T* p = params[i].data_ptr<T>();
        const T* g = grads[i].data_ptr<T>();
        uint8_t* q1 = state1[i].data_ptr<uint8_t>();
        uint8_t* q2 = state2[i].data_ptr<uint8_t>();
        float* am1 = absmax1[i].data_ptr<float>();
        float* am2 = absmax2[i].data_ptr<float>();
        for (int64_t b = task.begin; b < task.end; b += kStateBlock) {
          const int64_t blk = b / kStateBlock;
          adam8_block(p + b, g + b, q1 + b, q2 + b, am1 + blk, am2 + blk, std::min(kStateBlock, task.end - b),
                      codes, scalars[i]);
        }
      });
    }
  });
}

}  // namespace cpu
}  // namespace adam8
