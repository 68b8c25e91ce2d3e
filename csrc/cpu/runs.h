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

// out[i] = index of the code nearest to x[i] * inv; x is scratch and is overwritten.
inline void quantize_run(float* x, int64_t n, float inv, uint8_t* out, const QuantLut& lut) {
  if (!lut.fast) {
    for (int64_t i = 0; i < n; ++i) store_code(out + i, code_index_search(x[i] * inv, lut.bounds));
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
    store_code(out + i, lut_resolve<Wide, WI>(Lane<Wide>::load(x + i), load_ints(entry + i, static_cast<Wide*>(nullptr))));
  }
  for (; i < n; ++i) store_code(out + i, lut_resolve<float, int32_t>(x[i], entry[i]));
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
