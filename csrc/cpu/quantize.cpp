// CPU kernels of adam8::quantize_blockwise and adam8::dequantize_blockwise.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <tuple>

#include "../checks.h"
#include "../quant_lut.h"
#include "runs.h"
#include "tasks.h"

namespace adam8 {
namespace cpu {
namespace {

constexpr int64_t kMaxBlock = 4096;

template <class T>
void quantize_block(const T* x, int64_t n, const QuantLut& lut, uint8_t* out, float* absmax) {
  alignas(64) float xf[kMaxBlock];
  constexpr int W = Lane<Wide>::kWidth;
  Wide wmax(0.0f);
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    Wide v = Lane<Wide>::load(x + i);
    store_lane(xf + i, v);
    wmax = vmax(wmax, vabs(v));
  }
  float amax = reduce_max(wmax);
  for (; i < n; ++i) {
    xf[i] = load_lane(x + i);
    amax = vmax(amax, vabs(xf[i]));
  }
  *absmax = amax;
  quantize_run(xf, n, inv_absmax(amax), out, lut);
}

// Blocks per parallel task, so that one task holds about kTaskElems elements.
int64_t block_grain(int64_t blocksize) { return std::max<int64_t>(1, kTaskElems / blocksize); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_cpu(const at::Tensor& x, const at::Tensor& code,
                                                          int64_t blocksize) {
  const char* op = "adam8.quantize_blockwise";
  check_dtype(op, {"x"}, x, kParamDtypes);
  check_code(op, "code", code, x.device());
  check_blocksize(op, blocksize);
  const at::Tensor xc = x.contiguous();
  const int64_t n = xc.numel();
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({ceil_div(n, blocksize)}, x.options().dtype(at::kFloat));
  const HostLut lut = build_lut(code.contiguous().data_ptr<float>());
  ADAM8_DISPATCH_FLOAT(xc.scalar_type(), [&] {
    const T* xp = xc.data_ptr<T>();
    uint8_t* qp = q.data_ptr<uint8_t>();
    float* ap = absmax.data_ptr<float>();
    at::parallel_for(0, absmax.numel(), block_grain(blocksize), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t off = b * blocksize;
        quantize_block(xp + off, std::min(blocksize, n - off), lut.view(), qp + off, ap + b);
      }
    });
  });
  return {q, absmax};
}

at::Tensor dequantize_blockwise_cpu(const at::Tensor& q, const at::Tensor& absmax, const at::Tensor& code,
                                    int64_t blocksize, at::ScalarType dtype) {
  const char* op = "adam8.dequantize_blockwise";
  check_dtype(op, {"q"}, q, at::kByte);
  check_device(op, {"absmax"}, absmax, q.device());
  check_dtype(op, {"absmax"}, absmax, at::kFloat);
  check_blocksize(op, blocksize);
  check_numel(op, {"absmax"}, absmax, ceil_div(q.numel(), blocksize));
  check_code(op, "code", code, q.device());
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op, ": dtype is ",
                   dtype_name(dtype), "; expected ", dtype_list(kParamDtypes));
  const at::Tensor qc = q.contiguous(), ac = absmax.contiguous(), cc = code.contiguous();
  const int64_t n = qc.numel();
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(dtype));
  ADAM8_DISPATCH_FLOAT(dtype, [&] {
    const uint8_t* qp = qc.data_ptr<uint8_t>();
    const float* ap = ac.data_ptr<float>();
    const float* cp = cc.data_ptr<float>();
    T* op_ = out.data_ptr<T>();
    at::parallel_for(0, ac.numel(), block_grain(blocksize), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t off = b * blocksize;
        dequantize_run(qp + off, std::min(blocksize, n - off), cp, ap[b], op_ + off);
      }
    });
  });
  return out;
}

}  // namespace cpu
}  // namespace adam8
