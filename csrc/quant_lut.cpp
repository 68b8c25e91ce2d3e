#include "quant_lut.h"

#include <algorithm>
#include <cstring>
#include <mutex>

namespace adam8 {

HostLut build_lut(const float* code) {
  HostLut lut;
  std::copy(code, code + kCodeSize, lut.code.begin());
  for (int i = 0; i + 1 < kCodeSize; ++i) lut.bounds[i] = (code[i] + code[i + 1]) * 0.5f;
  lut.entry.resize(kLutSize);
  bool ok = true;
  for (int32_t key = 0; key < kLutSize; ++key) lut.entry[key] = lut_entry(lut.bounds.data(), key, &ok);
  lut.fast = ok;
  lut.first_positive = first_positive_code(code);
  return lut;
}

std::shared_ptr<const HostLut> cached_lut(const float* code) {
  constexpr size_t kKept = 8;  // codes in use at once: two per optimizer, plus quantize calls
  static std::mutex mutex;
  static std::vector<std::shared_ptr<const HostLut>> kept;  // most recently used last
  std::lock_guard<std::mutex> lock(mutex);
  for (auto it = kept.begin(); it != kept.end(); ++it) {
    if (std::memcmp((*it)->code.data(), code, sizeof(float) * kCodeSize) == 0) {
      std::rotate(it, it + 1, kept.end());
      return kept.back();
    }
  }
  if (kept.size() == kKept) kept.erase(kept.begin());
  kept.push_back(std::make_shared<const HostLut>(build_lut(code)));
  return kept.back();
}

}  // namespace adam8
