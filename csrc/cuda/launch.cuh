// The multi-tensor launcher of the CUDA kernels, apart from their math: tensors are packed into a
// kernel argument (graph-capturable, no host-to-device copy), each CUDA block finds its tensor by a
// binary search over the pack's block prefix, and a list longer than one pack is launched in
// several. Plus the lane loads and stores the kernels share.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <array>
#include <vector>

#include "../adam8_math.h"

namespace adam8 {
namespace cuda {

constexpr int kThreads = 256;
// Consecutive elements per thread: 32 bytes of fp32, so one warp covers one 256-value state block
// and a block's absmax is a warp reduction.
constexpr int kPerThread = 8;
constexpr int64_t kBlockElems = kThreads * kPerThread;
static_assert(kPerThread * 32 == kStateBlock, "one warp per state block");

// Up to kMax tensors of kLists parallel lists (params, grads, states, ...). CUDA 12.1+ accepts
// kernel arguments up to 32 KB on sm_70 and newer; the packs stay well under.
template <int kLists, int kMax>
struct Pack {
  void* ptr[kLists][kMax];  // nullptr for a list not passed (amsgrad's, without amsgrad)
  float* step[kMax];        // the tensor's step count (the Adam ops' prologue advances it)
  float* scale[kMax];  // the tensor's slot of a per-parameter float vector (gnorm factors), or nullptr
  int64_t numel[kMax];
  int32_t first_block[kMax + 1];  // first CUDA block of each tensor; [count] = grid size
  bool aligned[kMax];             // every pointer 16-byte aligned: vector loads and stores
  int32_t count;
};

// The tensor of CUDA block `block`.
template <class P>
__device__ __forceinline__ int pack_tensor(const P& pack, int32_t block) {
  int lo = 0, hi = pack.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (pack.first_block[mid] <= block) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// The first element of this thread in its chunk, and how many of its kPerThread lanes exist.
template <class P>
__device__ __forceinline__ int lanes_of(const P& pack, int t, int32_t chunk, int64_t* start) {
  *start = static_cast<int64_t>(chunk - pack.first_block[t]) * kBlockElems +
           static_cast<int64_t>(threadIdx.x) * kPerThread;
  const int64_t left = pack.numel[t] - *start;
  return left <= 0 ? 0 : left < kPerThread ? static_cast<int>(left) : kPerThread;
}

// Packs the tensors (lists[l][i] is tensor i of list l; undefined for a list not passed) and calls
// launch(pack, grid) per pack. scales[i] is tensor i's float slot (or nullptr).
template <int kLists, int kMax, class Launch>
void for_each_pack(const std::array<std::vector<at::Tensor>, kLists>& lists, const std::vector<at::Tensor>& steps,
                   const std::vector<float*>& scales, Launch&& launch) {
  using P = Pack<kLists, kMax>;
  P pack;
  pack.count = 0;
  pack.first_block[0] = 0;
  auto flush = [&] {
    if (pack.count == 0) return;
    launch(pack, pack.first_block[pack.count]);
    pack.count = 0;
  };
  constexpr int64_t kMaxGrid = int64_t{1} << 30;
  for (size_t i = 0; i < steps.size(); ++i) {
    const int64_t n = lists[0][i].numel();
    if (n == 0) continue;
    const int64_t blocks = (n + kBlockElems - 1) / kBlockElems;
    TORCH_CHECK(blocks < kMaxGrid, "adam8: a tensor of ", n, " elements needs more than 2^30 CUDA blocks");
    if (pack.count == kMax || pack.first_block[pack.count] + blocks >= kMaxGrid) flush();
    const int c = pack.count;
    bool aligned = true;
    for (int l = 0; l < kLists; ++l) {
      pack.ptr[l][c] = lists[l][i].defined() ? lists[l][i].data_ptr() : nullptr;
      aligned = aligned && reinterpret_cast<uintptr_t>(pack.ptr[l][c]) % 16 == 0;
    }
    pack.step[c] = steps[i].data_ptr<float>();
    pack.scale[c] = scales[i];
    pack.numel[c] = n;
    pack.aligned[c] = aligned;
    pack.first_block[c + 1] = pack.first_block[c] + static_cast<int32_t>(blocks);
    pack.count = c + 1;
  }
  flush();
}

// Calls f(T{}) with T the C++ type of a float dtype the ops take.
template <class F>
void dispatch_float(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(at::Half{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    default: TORCH_INTERNAL_ASSERT(false, "dtype passed unchecked");
  }
}

// ---------------------------------------------------------------- lanes
// c10's conversions, as on the CPU: round to nearest even.
template <class T>
__device__ __forceinline__ float to_float(T x) { return static_cast<float>(x); }
template <class T>
__device__ __forceinline__ T from_float(float x) { return static_cast<T>(x); }

// kPerThread values of T at p[0..valid) into out (16-byte vector loads when `vec`).
template <class T>
__device__ __forceinline__ void load_lanes(const T* p, int valid, bool vec, float (&out)[kPerThread]) {
  constexpr int kPerVec = 16 / sizeof(T);
  if (vec && valid == kPerThread) {
#pragma unroll
    for (int v = 0; v < kPerThread / kPerVec; ++v) {
      const uint4 raw = reinterpret_cast<const uint4*>(p)[v];
      const T* t = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int j = 0; j < kPerVec; ++j) out[v * kPerVec + j] = to_float(t[j]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) out[j] = j < valid ? to_float(p[j]) : 0.0f;
  }
}

template <class T>
__device__ __forceinline__ void store_lanes(T* p, int valid, bool vec, const float (&in)[kPerThread]) {
  constexpr int kPerVec = 16 / sizeof(T);
  if (vec && valid == kPerThread) {
#pragma unroll
    for (int v = 0; v < kPerThread / kPerVec; ++v) {
      uint4 raw;
      T* t = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int j = 0; j < kPerVec; ++j) t[j] = from_float<T>(in[v * kPerVec + j]);
      reinterpret_cast<uint4*>(p)[v] = raw;
    }
  } else {
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      if (j < valid) p[j] = from_float<T>(in[j]);
    }
  }
}

// kPerThread codes (8 bytes) at q[0..valid).
__device__ __forceinline__ void load_codes(const uint8_t* q, int valid, bool vec, int32_t (&out)[kPerThread]) {
  if (vec && valid == kPerThread) {
    const uint2 raw = *reinterpret_cast<const uint2*>(q);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      out[j] = (raw.x >> (8 * j)) & 0xff;
      out[4 + j] = (raw.y >> (8 * j)) & 0xff;
    }
  } else {
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) out[j] = j < valid ? q[j] : 0;
  }
}

__device__ __forceinline__ void store_codes(uint8_t* q, int valid, bool vec, const int32_t (&in)[kPerThread]) {
  if (vec && valid == kPerThread) {
    uint2 raw;
    raw.x = in[0] | in[1] << 8 | in[2] << 16 | static_cast<uint32_t>(in[3]) << 24;
    raw.y = in[4] | in[5] << 8 | in[6] << 16 | static_cast<uint32_t>(in[7]) << 24;
    *reinterpret_cast<uint2*>(q) = raw;
  } else {
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      if (j < valid) q[j] = static_cast<uint8_t>(in[j]);
    }
  }
}

// The warp's maximum of abs_bits values (one REDUX instruction from sm_80 on).
__device__ __forceinline__ int32_t warp_max_bits(int32_t x) {
#if __CUDA_ARCH__ >= 800
  return __reduce_max_sync(0xffffffffu, x);
#else
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x = imax(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
#endif
}

__device__ __forceinline__ double warp_sum(double x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// The maximum of a float's abs_bits and `bits` (non-negative, so their int order is the float order).
__device__ __forceinline__ void atomic_max_bits(float* address, int32_t bits) {
  atomicMax(reinterpret_cast<int*>(address), bits);
}

// ---------------------------------------------------------------- host helpers
// Runs `per_dtype(dtype, indices)` for the indices of the tensors of each float dtype.
template <class F>
void by_dtype(at::TensorList tensors, F&& per_dtype) {
  for (at::ScalarType dtype : {at::kFloat, at::kHalf, at::kBFloat16}) {
    std::vector<size_t> idx;
    for (size_t i = 0; i < tensors.size(); ++i) {
      if (tensors[i].scalar_type() == dtype) idx.push_back(i);
    }
    if (!idx.empty()) per_dtype(dtype, idx);
  }
}

// lists[l][idx...]: undefined tensors for a list not passed (empty).
template <int kLists>
std::array<std::vector<at::Tensor>, kLists> gather_lists(std::array<at::TensorList, kLists> lists,
                                                        const std::vector<size_t>& idx) {
  std::array<std::vector<at::Tensor>, kLists> out;
  for (int l = 0; l < kLists; ++l) {
    for (size_t i : idx) out[l].push_back(lists[l].empty() ? at::Tensor() : lists[l][i]);
  }
  return out;
}

inline std::vector<at::Tensor> select(at::TensorList list, const std::vector<size_t>& idx) {
  std::vector<at::Tensor> out;
  for (size_t i : idx) out.push_back(list[i]);
  return out;
}

// Slot i of a per-parameter float vector for each index, or nullptrs when there is none.
inline std::vector<float*> slots(const c10::optional<at::Tensor>& vec, const std::vector<size_t>& idx) {
  std::vector<float*> out;
  for (size_t i : idx) out.push_back(vec.has_value() ? vec->data_ptr<float>() + i : nullptr);
  return out;
}

// ---------------------------------------------------------------- code tables on the device
// Per code: kLutSize entries, then one count per CUDA block of the build of the buckets the table
// cannot represent (all zero: fast). Per-block counts need no zeroed counter, so a build is one
// launch. The stride keeps every table 16-byte aligned.
constexpr int kLutBuildBlocks = kLutSize / kThreads;
static_assert(kLutSize % kThreads == 0 && (kLutSize + kLutBuildBlocks) % 4 == 0, "lut layout");
constexpr int64_t kLutStride = kLutSize + kLutBuildBlocks;

// Builds the tables of `codes` (each kCodeSize floats, at most 2) on the current stream.
at::Tensor build_luts(const std::vector<at::Tensor>& codes);

// Whether the table built by build_luts represents its code (every block found no bad bucket).
__device__ __forceinline__ bool lut_is_fast(const int32_t* table) {
  int32_t bad = 0;
#pragma unroll
  for (int i = 0; i < kLutBuildBlocks; ++i) bad |= table[kLutSize + i];
  return bad == 0;
}

// A code's view for the kernels; `bounds` points to shared memory filled by load_bounds.
__device__ __forceinline__ QuantLut device_lut(const float* code, const int32_t* table, const float* bounds) {
  return {code, bounds, table, lut_is_fast(table)};
}

// Fills bounds[0..254] from code, for the binary search of codes the table cannot represent.
__device__ __forceinline__ void load_bounds(const float* code, float* bounds) {
  for (int i = threadIdx.x; i < kCodeSize - 1; i += blockDim.x) bounds[i] = (code[i] + code[i + 1]) * 0.5f;
}

}  // namespace cuda
}  // namespace adam8
