// Where a CPU 8-bit Adam step spends its time: the block kernel's passes timed one by one, on one
// thread, with the kernels' own math (adam8_math.h) and table code (runs.h, quant_lut.cpp).
// Each row adds one pass to the one before; the differences are the passes' costs.
//
//   T=$(python -c 'import torch, os; print(os.path.dirname(torch.__file__))')
//   g++ -O3 -mavx2 -mfma -mf16c -ffp-contract=off -std=c++17 -Icsrc -I$T/include \
//       benchmarks/cpu_8bit_passes.cpp csrc/quant_lut.cpp -o /tmp/cpu_8bit_passes && /tmp/cpu_8bit_passes
//
// Needs the two dynamic maps as 512 floats (signed, then unsigned) in /tmp/adam8_maps.bin:
//   python -c "import torch; from torchadam8.qmap import create_dynamic_map as m; \
//              torch.cat([m(True), m(False)]).numpy().tofile('/tmp/adam8_maps.bin')"
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <vector>

#include "cpu/runs.h"
#include "quant_lut.h"

using namespace adam8;
using namespace adam8::cpu;

namespace {

constexpr int W = Lane<Wide>::kWidth;
int32_t v_first_positive = 0;  // the unsigned code's, set in main (the kernels' keep_positive rule)
using WI = Lane<Wide>::I;

// One 256-value block, fp32 parameters, blockwise scales; the passes up to `kLast` run:
// 0 update, 1 + dequantize, 2 + quantize keys and resolve (no table reads), 3 + table reads.
template <int kLast>
void block(float* p, const float* g, uint8_t* q1, uint8_t* q2, float* a1, float* a2, const QuantLut& c1,
           const QuantLut& c2, const AdamScalars& s) {
  alignas(64) static float stale[2][kStateBlock];  // the update's input when nothing dequantizes
  alignas(64) float fresh[2][kStateBlock];
  alignas(64) int32_t e[2][kStateBlock];
  float* m = kLast >= 1 ? fresh[0] : stale[0];
  float* v = kLast >= 1 ? fresh[1] : stale[1];
  if (kLast >= 1) {
    lookup_codes(q1, kStateBlock, c1.code, m);
    lookup_codes(q2, kStateBlock, c2.code, v);
  }
  Wide max1(0.0f), max2(0.0f), unused(0.0f);
  for (int64_t i = 0; i < kStateBlock; i += W) {
    Wide mv = Lane<Wide>::load(m + i) * Wide(*a1), vv = Lane<Wide>::load(v + i) * Wide(*a2);
    const auto update = adam_moments<false, true>(Lane<Wide>::load(g + i), mv, vv, unused, s, false);
    const Wide pv = Lane<Wide>::load(p + i);
    store_lane(p + i, vselect(update, adam_param(pv, adam_direction(mv, vv, s), s), pv));
    store_lane(m + i, mv);
    store_lane(v + i, vv);
    max1 = vmax(max1, vabs(mv));
    max2 = vmax(max2, vv);
  }
  *a1 = reduce_max(max1);
  *a2 = reduce_max(max2);
  if (kLast < 2) return;
  const Wide inv1(inv_absmax(*a1)), inv2(inv_absmax(*a2));
  for (int64_t i = 0; i < kStateBlock; i += W) {
    store_ints(e[0] + i, lut_key<Wide, WI>(Lane<Wide>::load(m + i) * inv1));
    store_ints(e[1] + i, lut_key<Wide, WI>(Lane<Wide>::load(v + i) * inv2));
  }
  if (kLast >= 3) {
    for (int64_t i = 0; i < kStateBlock; ++i) e[0][i] = c1.entry[e[0][i]];
    for (int64_t i = 0; i < kStateBlock; ++i) e[1][i] = c2.entry[e[1][i]];
  }
  for (int64_t i = 0; i < kStateBlock; i += W) {
    const WI k1 = load_ints(e[0] + i, static_cast<Wide*>(nullptr)), k2 = load_ints(e[1] + i, static_cast<Wide*>(nullptr));
    store_code(q1 + i, lut_resolve<Wide, WI>(Lane<Wide>::load(m + i) * inv1, k1));
    const Wide xv = Lane<Wide>::load(v + i) * inv2;
    store_code(q2 + i, keep_positive<Wide, WI>(lut_resolve<Wide, WI>(xv, k2), xv, v_first_positive));
  }
}

struct State {
  std::vector<float> p, g, a1, a2;
  std::vector<uint8_t> q1, q2;
};

using Block = void (*)(float*, const float*, uint8_t*, uint8_t*, float*, float*, const QuantLut&, const QuantLut&,
                       const AdamScalars&);

double step(Block f, State& x, const QuantLut& c1, const QuantLut& c2, const AdamScalars& s) {
  const auto t0 = std::chrono::steady_clock::now();
  for (size_t b = 0; b * kStateBlock < x.p.size(); ++b) {
    const size_t o = b * kStateBlock;
    f(&x.p[o], &x.g[o], &x.q1[o], &x.q2[o], &x.a1[b], &x.a2[b], c1, c2, s);
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main() {
  constexpr int64_t n = int64_t(1) << 24;
  std::vector<float> maps(2 * kCodeSize);
  FILE* file = std::fopen("/tmp/adam8_maps.bin", "rb");
  if (file == nullptr || std::fread(maps.data(), sizeof(float), maps.size(), file) != maps.size()) {
    std::fprintf(stderr, "no /tmp/adam8_maps.bin: see the header of this file\n");
    return 1;
  }
  std::fclose(file);
  const HostLut l1 = build_lut(maps.data()), l2 = build_lut(maps.data() + kCodeSize);
  const QuantLut c1 = l1.view(), c2 = l2.view();
  v_first_positive = l2.first_positive;
  // States as training leaves them: zero codes, then five steps with fresh Gaussian gradients.
  std::mt19937 rng(0);
  std::normal_distribution<float> normal;
  State x;
  x.p.resize(n);
  x.g.resize(n);
  for (auto& v : x.p) v = normal(rng);
  const uint8_t zero1 = std::find(maps.begin(), maps.begin() + kCodeSize, 0.0f) - maps.begin();
  x.q1.assign(n, zero1);
  x.q2.assign(n, 0);
  x.a1.assign(n / kStateBlock, 0.0f);
  x.a2.assign(n / kStateBlock, 0.0f);
  for (int t = 1; t <= 5; ++t) {
    for (auto& v : x.g) v = 0.01f * normal(rng);
    step(block<3>, x, c1, c2, adam_scalars(1e-3, t, 0.9, 0.999, 1e-8, 0.0, 1.0f));
  }
  const AdamScalars s = adam_scalars(1e-3, 6, 0.9, 0.999, 1e-8, 0.0, 1.0f);
  const char* names[] = {"update", "+ dequantize m, v", "+ quantize keys, resolve", "+ quantize table reads"};
  const Block blocks[] = {block<0>, block<1>, block<2>, block<3>};
  double best[4] = {1e9, 1e9, 1e9, 1e9};
  for (int rep = 0; rep < 10; ++rep) {
    for (int k = 0; k < 4; ++k) {
      State y = x;  // every variant starts from the same states
      best[k] = std::min(best[k], step(blocks[k], y, c1, c2, s));
    }
  }
  std::printf("| passes | ns per value | M values/s |\n|---|---:|---:|\n");
  for (int k = 0; k < 4; ++k) std::printf("| %s | %.3f | %.0f |\n", names[k], best[k] / n * 1e9, n / best[k] / 1e6);
}
