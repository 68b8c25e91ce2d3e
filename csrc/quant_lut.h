// Host-side construction of the code lookup table of adam8_math.h (QuantLut).
#pragma once

#include <array>
#include <memory>
#include <vector>

#include "adam8_math.h"

namespace adam8 {

// Owns a code's table; view() gives the QuantLut the kernels read.
struct HostLut {
  std::array<float, kCodeSize> code;
  std::array<float, kCodeSize - 1> bounds;
  std::vector<int32_t> entry;  // kLutSize
  bool fast = false;
  int32_t first_positive = 0;  // first_positive_code(code): keep_positive's index for this code

  QuantLut view() const { return {code.data(), bounds.data(), entry.data(), fast}; }
};

// Builds the table of `code` (kCodeSize floats, ascending; not checked here). `fast` is false when
// the table cannot represent the code (a bucket with two bounds, a bound in a clamped bucket);
// kernels then search the bounds instead.
HostLut build_lut(const float* code);

// build_lut of `code`, kept for the next calls with the same code (compared bit for bit): a table
// costs about 0.1 ms to build, as much as an 8-bit step of 30k parameters on one core.
std::shared_ptr<const HostLut> cached_lut(const float* code);

}  // namespace adam8
