// CPU lanes for the templates of adam8_math.h: `float` everywhere, plus an 8-wide AVX2 vector
// when the build targets it. Only the primitives the math uses are defined here; the math itself
// stays in adam8_math.h.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../adam8_math.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define ADAM8_HAVE_AVX2 1
#include <immintrin.h>
#endif

namespace adam8 {

#ifdef ADAM8_HAVE_AVX2
// The vector lanes live in namespace adam8 beside the scalar primitives they overload.
struct VecI {
  __m256i v;
  VecI() = default;
  VecI(__m256i x) : v(x) {}
  explicit VecI(int32_t x) : v(_mm256_set1_epi32(x)) {}
};
inline VecI operator+(VecI a, VecI b) { return _mm256_add_epi32(a.v, b.v); }
inline VecI operator-(VecI a, VecI b) { return _mm256_sub_epi32(a.v, b.v); }
inline VecI operator&(VecI a, VecI b) { return _mm256_and_si256(a.v, b.v); }
inline VecI operator^(VecI a, VecI b) { return _mm256_xor_si256(a.v, b.v); }
inline VecI operator>>(VecI a, int n) { return _mm256_srai_epi32(a.v, n); }
inline VecI imin(VecI a, VecI b) { return _mm256_min_epi32(a.v, b.v); }
inline VecI imax(VecI a, VecI b) { return _mm256_max_epi32(a.v, b.v); }

struct VecF {
  __m256 v;
  VecF() = default;
  VecF(__m256 x) : v(x) {}
  explicit VecF(float x) : v(_mm256_set1_ps(x)) {}
};
inline VecF operator+(VecF a, VecF b) { return _mm256_add_ps(a.v, b.v); }
inline VecF operator-(VecF a, VecF b) { return _mm256_sub_ps(a.v, b.v); }
inline VecF operator*(VecF a, VecF b) { return _mm256_mul_ps(a.v, b.v); }
inline VecF operator/(VecF a, VecF b) { return _mm256_div_ps(a.v, b.v); }
inline VecF fmadd(VecF a, VecF b, VecF c) { return _mm256_fmadd_ps(a.v, b.v, c.v); }
inline VecF vsqrt(VecF x) { return _mm256_sqrt_ps(x.v); }
inline VecF vabs(VecF x) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x.v); }
inline VecF vmax(VecF a, VecF b) { return _mm256_max_ps(a.v, b.v); }
// Masks are VecF lanes of all ones or all zeros.
inline VecF vlt(VecF a, VecF b) { return _mm256_cmp_ps(a.v, b.v, _CMP_LT_OQ); }
inline VecF vne(VecF a, VecF b) { return _mm256_cmp_ps(a.v, b.v, _CMP_NEQ_OQ); }
inline VecF mand(VecF a, VecF b) { return _mm256_and_ps(a.v, b.v); }
inline VecF vselect(VecF mask, VecF a, VecF b) { return _mm256_blendv_ps(b.v, a.v, mask.v); }
inline VecI bits_of(VecF x) { return _mm256_castps_si256(x.v); }
inline VecI gt_as_int(VecI a, VecI b) { return _mm256_srli_epi32(_mm256_cmpgt_epi32(a.v, b.v), 31); }
inline VecI positive_as_int(VecF x) {
  return _mm256_srli_epi32(_mm256_castps_si256(_mm256_cmp_ps(x.v, _mm256_setzero_ps(), _CMP_GT_OQ)), 31);
}
inline VecF gather(const float* table, VecI i) { return _mm256_i32gather_ps(table, i.v, 4); }
inline VecI gather(const int32_t* table, VecI i) {
  return _mm256_i32gather_epi32(reinterpret_cast<const int*>(table), i.v, 4);
}
#endif  // ADAM8_HAVE_AVX2

namespace cpu {

// ---------------------------------------------------------------- scalar loads and stores
inline float load_lane(const float* p) { return *p; }
inline float load_lane(const c10::Half* p) { return static_cast<float>(*p); }
inline float load_lane(const c10::BFloat16* p) { return static_cast<float>(*p); }
inline void store_lane(float* p, float x) { *p = x; }
inline void store_lane(c10::Half* p, float x) { *p = c10::Half(x); }  // round to nearest even
inline void store_lane(c10::BFloat16* p, float x) { *p = c10::BFloat16(x); }
inline void store_ints(int32_t* p, int32_t x) { *p = x; }
inline int32_t load_ints(const int32_t* p, float*) { return *p; }
inline void store_code(uint8_t* p, int32_t q) { *p = static_cast<uint8_t>(q); }
inline int32_t reduce_imax(int32_t x) { return x; }
inline double reduce_sum(float x) { return x; }

#ifdef ADAM8_HAVE_AVX2
inline int32_t reduce_imax(VecI x) {
  alignas(32) int32_t v[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(v), x.v);
  int32_t m = v[0];
  for (int32_t i : v) m = i > m ? i : m;
  return m;
}

inline double reduce_sum(VecF x) {
  alignas(32) float v[8];
  _mm256_store_ps(v, x.v);
  double sum = 0.0;
  for (float f : v) sum += f;
  return sum;
}

// Loads and stores of 8 lanes. `VecF*` tags pick the vector overloads.
inline VecF load_lane(const float* p, VecF*) { return _mm256_loadu_ps(p); }
inline VecF load_lane(const c10::Half* p, VecF*) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline VecF load_lane(const c10::BFloat16* p, VecF*) {
  __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
inline void store_lane(float* p, VecF x) { _mm256_storeu_ps(p, x.v); }
inline void store_lane(c10::Half* p, VecF x) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x.v, _MM_FROUND_TO_NEAREST_INT));
}
inline void store_lane(c10::BFloat16* p, VecF x) {
  // Round to nearest even, NaN to 0x7fc0: the rounding of c10::BFloat16(float).
  __m256i u = _mm256_castps_si256(x.v);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x.v, x.v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
  __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}
inline void store_ints(int32_t* p, VecI x) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), x.v); }
inline VecI load_ints(const int32_t* p, VecF*) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline void store_code(uint8_t* p, VecI q) {
  __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(q.v), _mm256_extracti128_si256(q.v, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packus_epi16(w, w));
}
#endif  // ADAM8_HAVE_AVX2

// Runs the lambda given as __VA_ARGS__ with T bound to the C++ type of a float dtype the ops take.
#define ADAM8_DISPATCH_FLOAT(dtype, ...)                                   \
  switch (dtype) {                                                         \
    case at::kFloat: { using T = float; __VA_ARGS__(); break; }            \
    case at::kHalf: { using T = c10::Half; __VA_ARGS__(); break; }         \
    case at::kBFloat16: { using T = c10::BFloat16; __VA_ARGS__(); break; } \
    default: TORCH_INTERNAL_ASSERT(false, "dtype passed unchecked");      \
  }

// Lane traits: the float and index types of a lane, its width and its loads.
template <class F>
struct Lane;
template <>
struct Lane<float> {
  using I = int32_t;
  static constexpr int kWidth = 1;
  template <class T>
  static float load(const T* p) { return load_lane(p); }
};
#ifdef ADAM8_HAVE_AVX2
template <>
struct Lane<VecF> {
  using I = VecI;
  static constexpr int kWidth = 8;
  template <class T>
  static VecF load(const T* p) { return load_lane(p, static_cast<VecF*>(nullptr)); }
};
using Wide = VecF;
#else
using Wide = float;
#endif

}  // namespace cpu
}  // namespace adam8
