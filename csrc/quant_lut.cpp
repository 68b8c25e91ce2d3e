#include "quant_lut.h"

#include <algorithm>

namespace adam8 {

HostLut build_lut(const float* code) {
  HostLut lut;
  std::copy(code, code + kCodeSize, lut.code.begin());
  for (int i = 0; i + 1 < kCodeSize; ++i) lut.bounds[i] = (code[i] + code[i + 1]) * 0.5f;
  lut.entry.resize(kLutSize);
  bool ok = true;
  for (int32_t key = 0; key < kLutSize; ++key) lut.entry[key] = lut_entry(lut.bounds.data(), key, &ok);
  lut.fast = ok;
  return lut;
}

}  // namespace adam8
