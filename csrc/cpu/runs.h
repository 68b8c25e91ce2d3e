// Loops over a run of values that the CPU kernels share. AVX2 gathers are slow on the CPUs we
// measured (about 14 cycles each on Zen 3), so table reads are plain scalar loads in passes of
// their own, between vector passes that do the arithmetic of adam8_math.h.
#pragma once

#include "simd.h"

namespace adam8 {
namespace cpu {

// Longest run: the largest quantization block.
constexpr int64_t kMaxRun = 4096;

// out[i] = code[q[i]].
inline void lookup_codes(const uint8_t* q, int64_t n, const float* code, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = code[q[i]];
}

// The inverse to quantize a block of scratch values x with (inv_absmax), x scaled by its prescale.
inline float normaliser(float* x, int64_t n, float absmax) {
  const float pre = block_prescale(absmax);
  if (pre != 1.0f) {
    for (int64_t i = 0; i < n; ++i) x[i] *= pre;
  }
  return inv_absmax(absmax);
}

// out[i] = index of the code nearest to x[i] * inv, or first_positive where that is larger and
// x[i] > 0 (keep_positive: the second moment's rule; 0 for none); x is scratch and is overwritten.
// inv == 0 (inv_absmax): the code nearest 0 for every value, whatever it is (NaN, inf).
inline void quantize_run(float* x, int64_t n, float inv, uint8_t* out, const QuantLut& lut,
                         int32_t first_positive = 0) {
  if (inv == 0.0f) {
    const int32_t zero = lut.fast ? code_index_lut<float, int32_t>(0.0f, lut) : code_index_search(0.0f, lut.bounds);
    for (int64_t i = 0; i < n; ++i) store_code(out + i, keep_positive<float, int32_t>(zero, x[i], first_positive));
    return;
  }
  if (!lut.fast) {
    for (int64_t i = 0; i < n; ++i) {
      const float xn = x[i] * inv;
      store_code(out + i, keep_positive<float, int32_t>(code_index_search(xn, lut.bounds), xn, first_positive));
    }
    return;
  }
  alignas(64) int32_t entry[kMaxRun];
  constexpr int W = Lane<Wide>::kWidth;
  using WI = Lane<Wide>::I;
  int64_t i = 0;
  for (; i + W <= n; i += W) {  // normalise and bucket
    Wide xn = Lane<Wide>::load(x + i) * Wide(inv);
    store_lane(x + i, xn);
    store_ints(entry + i, lut_key<Wide, WI>(xn));
  }
  for (; i < n; ++i) {
    x[i] *= inv;
    entry[i] = lut_key<float, int32_t>(x[i]);
  }
  const int32_t* table = lut.entry;
  for (i = 0; i < n; ++i) entry[i] = table[entry[i]];  // the table reads
  for (i = 0; i + W <= n; i += W) {
    const Wide xn = Lane<Wide>::load(x + i);
    const WI index = lut_resolve<Wide, WI>(xn, load_ints(entry + i, static_cast<Wide*>(nullptr)));
    store_code(out + i, keep_positive<Wide, WI>(index, xn, first_positive));
  }
  for (; i < n; ++i) {
    store_code(out + i, keep_positive<float, int32_t>(lut_resolve<float, int32_t>(x[i], entry[i]), x[i], first_positive));
  }
}

// out[i] = code[q[i]] * absmax, rounded to T.
template <class T>
void dequantize_run(const uint8_t* q, int64_t n, const float* code, float absmax, T* out) {
  alignas(64) float values[kMaxRun];
  lookup_codes(q, n, code, values);
  constexpr int W = Lane<Wide>::kWidth;
  int64_t i = 0;
  for (; i + W <= n; i += W) store_lane(out + i, Lane<Wide>::load(values + i) * Wide(absmax));
  for (; i < n; ++i) store_lane(out + i, values[i] * absmax);
}

}  // namespace cpu
}  // namespace adam8
