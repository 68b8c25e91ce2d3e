// The math of every adam8 kernel, written once.
//
// Each function is a template over the lane type: `float` (CUDA threads and the CPU's scalar tail)
// or a CPU SIMD vector (cpu/simd.h overloads the few primitives used here). CPU and CUDA therefore
// compute the same expressions in the same order; the build turns off FMA contraction on both so
// the only fused multiply-adds are the explicit `fmadd` calls below.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define ADAM8_HD __host__ __device__ __forceinline__
#else
#define ADAM8_HD inline
#endif

namespace adam8 {

// One fp32 absmax per 256 state values, as bitsandbytes' blockwise 8-bit optimizers.
constexpr int64_t kStateBlock = 256;
// Entries of a quantization code (the dynamic maps have 256).
constexpr int kCodeSize = 256;

// ---------------------------------------------------------------- scalar lane primitives
ADAM8_HD float fmadd(float a, float b, float c) { return fmaf(a, b, c); }
ADAM8_HD float vsqrt(float x) { return sqrtf(x); }
ADAM8_HD float vabs(float x) { return fabsf(x); }
// a > b ? a : b, the semantics of x86 maxps, so scalar and vector reductions agree.
ADAM8_HD float vmax(float a, float b) { return a > b ? a : b; }
ADAM8_HD int32_t imin(int32_t a, int32_t b) { return a < b ? a : b; }
ADAM8_HD int32_t imax(int32_t a, int32_t b) { return a > b ? a : b; }
ADAM8_HD int32_t bits_of(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_int(x);
#else
  int32_t i;
  std::memcpy(&i, &x, sizeof(i));
  return i;
#endif
}
ADAM8_HD float float_of(int32_t b) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(b);
#else
  float f;
  std::memcpy(&f, &b, sizeof(f));
  return f;
#endif
}
ADAM8_HD int32_t gt_as_int(int32_t a, int32_t b) { return a > b ? 1 : 0; }
ADAM8_HD int32_t positive_as_int(float x) { return x > 0.0f ? 1 : 0; }
ADAM8_HD float gather(const float* table, int32_t i) { return table[i]; }
ADAM8_HD int32_t gather(const int32_t* table, int32_t i) { return table[i]; }

// Lane masks: bool for float lanes, an all-ones/all-zeros vector for SIMD lanes.
ADAM8_HD bool vlt(float a, float b) { return a < b; }
ADAM8_HD bool vne(float a, float b) { return a != b; }
ADAM8_HD bool mand(bool a, bool b) { return a && b; }
ADAM8_HD float vselect(bool mask, float a, float b) { return mask ? a : b; }

// ---------------------------------------------------------------- Adam
// Per-tensor constants of one step, derived in double from the step count and the learning rate
// (both read from tensors, so neither is baked into a compiled graph).
struct AdamScalars {
  float beta1, one_minus_beta1, beta2, one_minus_beta2, eps;
  float step_size;     // lr / (1 - beta1^t), times the max_unorm scale once it is known
  float inv_sqrt_bc2;  // 1 / sqrt(1 - beta2^t)
  float decay;         // 1 - lr * weight_decay: decoupled decay, as torch.optim.AdamW
  float grad_scale;    // percentile clipping's factor on the gradient (1: none)
  float bc1;           // 1 - beta1^t
  float v_floor;       // 1 / K of the moment bound below (0: no bound)
};

ADAM8_HD AdamScalars adam_scalars(double lr, double step, double beta1, double beta2, double eps,
                                  double weight_decay, float grad_scale) {
  AdamScalars s;
  s.beta1 = static_cast<float>(beta1);
  s.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  s.beta2 = static_cast<float>(beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  s.eps = static_cast<float>(eps);
  s.bc1 = static_cast<float>(1.0 - pow(beta1, step));
  s.step_size = static_cast<float>(lr / (1.0 - pow(beta1, step)));
  s.inv_sqrt_bc2 = static_cast<float>(1.0 / sqrt(1.0 - pow(beta2, step)));
  s.decay = static_cast<float>(1.0 - lr * weight_decay);
  s.grad_scale = grad_scale;
  const double r = beta1 * beta1 / beta2;  // beta2 > 0 whenever r < 1 is tested
  s.v_floor = beta2 > 0.0 && r < 1.0
                  ? static_cast<float>((1.0 - beta2) * (1.0 - r) / ((1.0 - beta1) * (1.0 - beta1)))
                  : 0.0f;
  return s;
}

// The moment bound of quantized states. Exact Adam keeps m^2 <= K v: by Cauchy-Schwarz over the
// gradients so far, m_t^2 <= (1-b1)^2 / (1-b2) * sum_j (b1^2/b2)^j * v_t, and the sum stays below
// 1 / (1 - b1^2/b2) when b1^2 < b2. 8-bit states can break it: a v far below its block's largest
// rounds to code 0 while m keeps a code (the signed map reaches smaller values relative to its
// block), and the next step with a small gradient then moves the parameter by about lr * m / eps,
// thousands of times lr. So with quantized states the new v is raised to m^2 / K where it fell
// below, which exact arithmetic never does (with constant betas).
//
// The new moments of one lane, in place; returns where the parameter is updated. A non-finite
// gradient element (NaN or inf after scaling, or one whose square overflows float32: its v would be
// inf, and an inf absmax turns a whole 8-bit block into NaN) updates nothing and resets its m and v
// to 0 (bitsandbytes' rule for its 8-bit states, applied to every variant); with skip_zeros, an
// element whose gradient is exactly 0 keeps p, m, v as they were. `vm` is amsgrad's running maximum of v,
// untouched unless kAmsgrad.
template <bool kAmsgrad, bool kQuantized, class V>
ADAM8_HD auto adam_moments(V g, V& m, V& v, V& vm, const AdamScalars& s, bool skip_zeros) {
  g = g * V(s.grad_scale);
  const V g2 = g * g;
  const auto finite = vlt(g2, V(INFINITY));  // false for NaN, inf and an overflowing square
  const auto update = skip_zeros ? mand(finite, vne(g, V(0.0f))) : finite;
  const V m_new = fmadd(V(s.beta1), m, V(s.one_minus_beta1) * g);
  V v_new = fmadd(V(s.beta2), v, V(s.one_minus_beta2) * g2);
  if (kQuantized) v_new = vmax(v_new, m_new * m_new * V(s.v_floor));
  m = vselect(update, m_new, vselect(finite, m, V(0.0f)));
  v = vselect(update, v_new, vselect(finite, v, V(0.0f)));
  if (kAmsgrad) vm = vselect(update, vmax(vm, v_new), vm);
  return update;
}

// Adam's direction m / (sqrt(v)/sqrt(1 - beta2^t) + eps), v being the running max under amsgrad
// (Kingma & Ba, Algorithm 1; torch.optim.AdamW's amsgrad).
template <class V>
ADAM8_HD V adam_direction(V m, V v, const AdamScalars& s) {
  return m / fmadd(vsqrt(v), V(s.inv_sqrt_bc2), V(s.eps));
}

// The new parameter: decoupled decay (Loshchilov & Hutter), then the step along `direction`.
template <class V>
ADAM8_HD V adam_param(V p, V direction, const AdamScalars& s) {
  return p * V(s.decay) - V(s.step_size) * direction;
}

// One Adam step on one lane (moments, then the parameter where it is updated).
template <bool kAmsgrad, bool kQuantized, class V>
ADAM8_HD void adam_update(V& p, V g, V& m, V& v, V& vm, const AdamScalars& s, bool skip_zeros) {
  const auto update = adam_moments<kAmsgrad, kQuantized>(g, m, v, vm, s, skip_zeros);
  p = vselect(update, adam_param(p, adam_direction(m, kAmsgrad ? vm : v, s), s), p);
}

// Per-tensor sums and maxima of a step, gathered before the update when the update needs them:
// bitsandbytes' max_unorm (the update's norm against the parameter's) and per-tensor 8-bit scales.
struct StepStats {
  double dir_sq;  // sum of squared directions of updated elements
  double p_sq;    // sum of squared parameters before the step
  float max1, max2, max3;  // new max |m|, max v, max vmax
};

// max_unorm's factor on the step: the update m_hat / (sqrt(v_hat) + eps) may have at most
// max_unorm times the parameter's norm (bitsandbytes' rule; 1 when max_unorm is 0).
ADAM8_HD float unorm_scale(double dir_sq, double p_sq, float bc1, double max_unorm) {
  if (max_unorm <= 0.0) return 1.0f;
  const double unorm = sqrt(dir_sq) / bc1, limit = max_unorm * sqrt(p_sq);
  return unorm > limit ? static_cast<float>(limit / unorm) : 1.0f;
}

// ---------------------------------------------------------------- percentile clipping
constexpr int kGnormHistory = 100;

// Records the squared gradient norm of step t (>= 1) in the history (slot t mod 100; step 1, or a
// history with nothing recorded yet, marked by a negative slot 0, fills every slot) and returns
// the factor on the gradient: clip / norm when the norm exceeds the clip, the square root of the
// `percentile`-th smallest recorded value (bitsandbytes 0.49's rule).
ADAM8_HD float record_gnorm(float* history, double norm_sq, double t, int64_t percentile) {
  const float value = static_cast<float>(norm_sq);
  if (t <= 1.0 || history[0] < 0.0f) {  // first record (negative: a history made mid-training)
    for (int i = 0; i < kGnormHistory; ++i) history[i] = value;
  } else {
    const double slot = fmod(t, static_cast<double>(kGnormHistory));  // NaN for a NaN or inf count:
    history[slot >= 0.0 && slot < kGnormHistory ? static_cast<int64_t>(slot) : 0] = value;  // slot 0
  }
  float kth = value;  // the value with `percentile` smaller ones before it in sorted order
  for (int i = 0; i < kGnormHistory; ++i) {
    int below = 0, at_or_below = 0;
    for (int j = 0; j < kGnormHistory; ++j) {
      below += history[j] < history[i];
      at_or_below += history[j] <= history[i];
    }
    if (below <= percentile && percentile < at_or_below) kth = history[i];
  }
  const float clip = sqrtf(kth), norm = sqrtf(value);
  return norm > clip ? clip / norm : 1.0f;
}

// ---------------------------------------------------------------- 8-bit codes
// Nearest-code quantization without a search. |x| is bucketed by its float exponent and its top
// kLutMantBits mantissa bits. When no bucket holds more than one decision bound (a midpoint
// between neighbouring codes), the code index is the number of bounds below the bucket plus one
// if x exceeds the bound inside it. x and that bound share their top 16 bits, so the comparison
// needs only their low 16 bits: one 32-bit table entry per bucket holds both numbers, and a
// quantization costs one table read instead of eight dependent ones of a binary search. Both of
// bitsandbytes' dynamic maps qualify with 7 mantissa bits (the unsigned map's codes are 0.007
// apart near 1; its buckets there are 0.0039 wide). lut_entry below builds the table, on the
// host (quant_lut.cpp) or on the GPU, and says when a code does not qualify.
constexpr int kLutMantBits = 7;
constexpr int kLutMinExp = -23;  // |x| < 2^-23 shares the lowest bucket
constexpr int kLutMaxExp = 0;    // |x| >= 2 shares the highest bucket
constexpr int kLutBuckets = (kLutMaxExp - kLutMinExp + 1) << kLutMantBits;  // per sign
constexpr int kLutSize = 2 * kLutBuckets;  // positive buckets, then negative ones
constexpr int32_t kLutKeyBias = (127 + kLutMinExp) << kLutMantBits;
// Entry = index << 16 | low 16 bits of the bound, in the order of |x| for positive buckets and
// reversed (complemented) for negative ones; kNoBound where x never exceeds a bound in the bucket.
constexpr int32_t kNoBound = 0xffff;

// Read-only view of a code and its lookup table.
struct QuantLut {
  const float* code;     // kCodeSize values, ascending
  const float* bounds;   // kCodeSize - 1 midpoints (code[i] + code[i+1]) / 2
  const int32_t* entry;  // kLutSize entries
  bool fast;             // the table is valid for this code
};

// Bucket of x: its table entry's index.
template <class F, class I>
ADAM8_HD I lut_key(F x) {
  I bits = bits_of(x);
  I key = ((bits & I(0x7fffffff)) >> (23 - kLutMantBits)) - I(kLutKeyBias);
  return imin(imax(key, I(0)), I(kLutBuckets - 1)) + ((bits >> 31) & I(kLutBuckets));
}

// Code index of x from its bucket's entry.
template <class F, class I>
ADAM8_HD I lut_resolve(F x, I entry) {
  I bits = bits_of(x);
  I low = (bits ^ (bits >> 31)) & I(0xffff);  // complemented for negative x
  return (entry >> 16) + gt_as_int(low, entry & I(0xffff));
}

// Index of the code nearest to x (ties to the lower index), i.e. the number of bounds below x.
template <class F, class I>
ADAM8_HD I code_index_lut(F x, const QuantLut& q) {
  return lut_resolve<F, I>(x, gather(q.entry, lut_key<F, I>(x)));
}

// ---------------------------------------------------------------- building the table
// #bounds < x and #bounds <= x in an ascending array.
ADAM8_HD int32_t count_below(const float* bounds, int32_t n, float x) {
  int32_t lo = 0;
  while (n > 0) {
    const int32_t half = n / 2;
    if (bounds[lo + half] < x) { lo += half + 1; n -= half + 1; } else { n = half; }
  }
  return lo;
}
ADAM8_HD int32_t count_at_or_below(const float* bounds, int32_t n, float x) {
  int32_t lo = 0;
  while (n > 0) {
    const int32_t half = n / 2;
    if (bounds[lo + half] <= x) { lo += half + 1; n -= half + 1; } else { n = half; }
  }
  return lo;
}

// Lower edge of positive bucket k: the smallest float that lut_key puts there.
ADAM8_HD float lut_bucket_edge(int32_t k) { return float_of((k + kLutKeyBias) << (23 - kLutMantBits)); }

// The table entry of bucket `key` for the kCodeSize - 1 ascending `bounds`. Clears *ok when the
// entry cannot be exact: two bounds in the bucket, or any bound in one of the first and last
// buckets, which also hold every value clamped into them.
ADAM8_HD int32_t lut_entry(const float* bounds, int32_t key, bool* ok) {
  constexpr int32_t n = kCodeSize - 1;
  const bool negative = key >= kLutBuckets;
  const int32_t k = negative ? key - kLutBuckets : key;
  const bool clamped = k == 0 || k == kLutBuckets - 1;
  const float a = k == 0 ? 0.0f : lut_bucket_edge(k);
  const float b = k == kLutBuckets - 1 ? INFINITY : lut_bucket_edge(k + 1);
  int32_t first, last, low = kNoBound;
  if (!negative) {  // x in [a, b): #bounds < a, plus one if x exceeds the bound in [a, b)
    first = count_below(bounds, n, a);
    last = count_below(bounds, n, b);
    if (last > first) low = bits_of(bounds[first]) & 0xffff;
  } else {  // x in (-b, -a]: #bounds <= -b, plus one if x exceeds the bound in (-b, -a]
    first = count_at_or_below(bounds, n, -b);
    last = count_at_or_below(bounds, n, -a);
    if (last > first) low = ~bits_of(bounds[first]) & 0xffff;
  }
  if (last - first > (clamped ? 0 : 1)) *ok = false;
  return first << 16 | low;
}

// The same index by binary search over the 255 bounds, for codes the tables do not fit.
ADAM8_HD int32_t code_index_search(float x, const float* bounds) {
  int32_t pos = 0;
  for (int32_t step = kCodeSize / 2; step >= 1; step >>= 1) {
    if (bounds[pos + step - 1] < x) pos += step;
  }
  return pos;
}

// The second moment's codes (v, and amsgrad's maximum) never round a positive value to a code <= 0:
// a stored v of 0 under a nonzero m is what makes the next small-gradient step jump (see the
// moment bound above), and even with the bound such an element steps about sqrt(K) ~ 7 times
// further than exact Adam at every step while m keeps its code. The smallest positive code
// instead makes it step less than exact Adam: the usual loss of 8 bits (a v below about 1.6e-7 of
// its block's largest is not representable), erring on the safe side. `first_positive` is the
// index of the code's smallest positive value (first_positive_code), 0 for no such rule.
ADAM8_HD int32_t first_positive_code(const float* code) {
  const int32_t n = count_at_or_below(code, kCodeSize, 0.0f);
  return n < kCodeSize ? n : kCodeSize - 1;
}
template <class F, class I>
ADAM8_HD I keep_positive(I index, F x, int32_t first_positive) {
  return imax(index, I(first_positive) & (I(0) - positive_as_int(x)));
}

// A block is normalised as (x * block_prescale(absmax)) * inv_absmax(absmax). The prescale is 2^64
// for a block below 2^-64, else 1: the inverse of a subnormal absmax would overflow (every nonzero
// value would get a full-scale code), and as scaling by a power of two is exact, the result is
// x * (1 / absmax) bit for bit wherever that does not overflow.
ADAM8_HD float block_prescale(float absmax) { return absmax < 0x1p-64f ? 0x1p64f : 1.0f; }
// The inverse, or 0, for which every value of the block gets the code nearest 0 (and a positive
// second moment keep_positive's code: its sign is then read from the value itself, not from the
// normalised 0): an all-zero block, and a block with a NaN or inf (absmax NaN or inf: it
// dequantizes to NaN, 0 * inf).
ADAM8_HD float inv_absmax(float absmax) {
  return absmax > 0.0f ? 1.0f / (absmax * block_prescale(absmax)) : 0.0f;  // (NaN: 0; inf: 1 / inf = 0)
}

// |x|'s bits, whose integer maximum over a block is its absmax: for |x| the integer order is the
// float order, and a NaN (its sign cleared) sorts above inf, so a block holding a NaN gets absmax
// NaN wherever it sits (a float maximum keeps or drops a NaN depending on the operands' order).
// (The sign is masked off the bits: the absolute value of a NaN may keep it on some hardware.)
template <class F, class I>
ADAM8_HD I abs_bits(F x) { return bits_of(x) & I(0x7fffffff); }

// A running block maximum of |x| kept as abs_bits (the 8-bit step's new absmax), and two such
// maxima as floats merged: the same float maximum for finite values, NaN wherever a NaN sits.
template <class F, class I>
ADAM8_HD I max_abs_bits(I acc, F x) { return imax(acc, abs_bits<F, I>(x)); }
ADAM8_HD float max_abs(float a, float b) { return float_of(max_abs_bits<float, int32_t>(abs_bits<float, int32_t>(a), b)); }

template <class F, class I>
ADAM8_HD F dequantize_one(I q, const float* code, F absmax) {
  return gather(code, q) * absmax;
}

}  // namespace adam8
