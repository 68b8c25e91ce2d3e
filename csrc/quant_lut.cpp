#include "quant_lut.h"

#include <algorithm>

namespace adam8 {
namespace {

int32_t bits(float f) {
  int32_t b;
  std::memcpy(&b, &f, sizeof(b));
  return b;
}

// Lower edge of positive bucket k: the smallest float that code_index_lut puts in bucket k.
float bucket_edge(int32_t k) {
  const int32_t b = (k + kLutKeyBias) << (23 - kLutMantBits);
  float f;
  std::memcpy(&f, &b, sizeof(f));
  return f;
}

}  // namespace

HostLut build_lut(const float* code) {
  HostLut lut;
  std::copy(code, code + kCodeSize, lut.code.begin());
  for (int i = 0; i + 1 < kCodeSize; ++i) lut.bounds[i] = (code[i] + code[i + 1]) * 0.5f;
  lut.entry.assign(kLutSize, 0);
  const float* b0 = lut.bounds.data();
  const float* b1 = b0 + lut.bounds.size();
  // Values beyond the bucketed range are clamped into the first or last bucket, whose low bits then
  // mean nothing: exact only if no bound lies there or beyond.
  const float inner_lo = bucket_edge(1), inner_hi = bucket_edge(kLutBuckets - 1);
  bool fast = std::all_of(b0, b1, [&](float b) { return std::fabs(b) >= inner_lo && std::fabs(b) < inner_hi; });
  for (int32_t k = 0; k < kLutBuckets && fast; ++k) {
    const float a = bucket_edge(k), b = bucket_edge(k + 1);
    // x in [a, b): index = #bounds < a, plus one if x exceeds the bound inside [a, b).
    const float* pos_first = std::lower_bound(b0, b1, a);
    const float* pos_last = std::lower_bound(b0, b1, b);
    // x in (-b, -a]: index = #bounds <= -b, plus one if x exceeds the bound inside (-b, -a].
    const float* neg_first = std::upper_bound(b0, b1, -b);
    const float* neg_last = std::upper_bound(b0, b1, -a);
    if (pos_last - pos_first > 1 || neg_last - neg_first > 1) {
      fast = false;
      break;
    }
    const int32_t pos_low = pos_last != pos_first ? (bits(*pos_first) & 0xffff) : kNoBound;
    const int32_t neg_low = neg_last != neg_first ? (~bits(*neg_first) & 0xffff) : kNoBound;
    lut.entry[k] = static_cast<int32_t>(pos_first - b0) << 16 | pos_low;
    lut.entry[kLutBuckets + k] = static_cast<int32_t>(neg_first - b0) << 16 | neg_low;
  }
  lut.fast = fast;
  return lut;
}

}  // namespace adam8
