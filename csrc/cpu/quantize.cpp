// CPU kernels of adam8::quantize_blockwise and adam8::dequantize_blockwise.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <tuple>

#include "../checks.h"
#include "../kernels.h"
#include "../quant_lut.h"
#include "runs.h"
#include "tasks.h"

namespace adam8 {
namespace cpu {
namespace {

template <class T>
void quantize_block(const T* x, int64_t n, const QuantLut& lut, uint8_t* out, float* absmax) {
  alignas(64) float xf[kMaxRun];
  using L = Lane<Wide>;
  constexpr int W = L::kWidth;
  typename L::I wmax(0);
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    Wide v = L::load(x + i);
    store_lane(xf + i, v);
    wmax = imax(wmax, abs_bits<Wide, typename L::I>(v));
  }
  int32_t bits = reduce_imax(wmax);
  for (; i < n; ++i) {
    xf[i] = load_lane(x + i);
    bits = imax(bits, abs_bits<float, int32_t>(xf[i]));
  }
  const float amax = float_of(bits);
  *absmax = amax;
  quantize_run(xf, n, normaliser(xf, n, amax), out, lut);
}

// Blocks per parallel task, so that one task holds about kTaskElems elements.
int64_t block_grain(int64_t blocksize) { return std::max<int64_t>(1, kTaskElems / blocksize); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> quantize_blockwise(const at::Tensor& x, const at::Tensor& code,
                                                      int64_t blocksize) {
  check_quantize_blockwise(x, code, blocksize);
  const at::Tensor xc = x.contiguous();
  const int64_t n = xc.numel();
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({ceil_div(n, blocksize)}, x.options().dtype(at::kFloat));
  const auto lut = cached_lut(code.contiguous().data_ptr<float>());
  ADAM8_DISPATCH_FLOAT(xc.scalar_type(), [&] {
    const T* xp = xc.data_ptr<T>();
    uint8_t* qp = q.data_ptr<uint8_t>();
    float* ap = absmax.data_ptr<float>();
    at::parallel_for(0, absmax.numel(), block_grain(blocksize), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t off = b * blocksize;
        quantize_block(xp + off, std::min(blocksize, n - off), lut->view(), qp + off, ap + b);
      }
    });
  });
  return {q, absmax};
}

at::Tensor dequantize_blockwise(const at::Tensor& q, const at::Tensor& absmax, const at::Tensor& code,
                                int64_t blocksize, at::ScalarType dtype) {
  check_dequantize_blockwise(q, absmax, code, blocksize, dtype);
  const at::Tensor qc = q.contiguous(), ac = absmax.contiguous(), cc = code.contiguous();
  const int64_t n = qc.numel();
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(dtype));
  ADAM8_DISPATCH_FLOAT(dtype, [&] {
    const uint8_t* qp = qc.data_ptr<uint8_t>();
    const float* ap = ac.data_ptr<float>();
    const float* cp = cc.data_ptr<float>();
    T* out_ptr = out.data_ptr<T>();
    at::parallel_for(0, ac.numel(), block_grain(blocksize), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t off = b * blocksize;
        dequantize_run(qp + off, std::min(blocksize, n - off), cp, ap[b], out_ptr + off);
      }
    });
  });
  return out;
}

}  // namespace cpu
}  // namespace adam8
