// The CPU tiles' products alone (csrc/recurrence/cpu_tiles.h), AVX2 and AVX-512 variants side by
// side on the shapes the benchmark configs give them, against a float64 loop for correctness:
// out (n, N) = 0.5 + x (n, K) @ W (K, N), one thread, best of 5 timed batches of calls each.
//   TI=$(python3 -c "import torch, os; print(os.path.dirname(torch.__file__))")
//   g++ -O3 -std=c++20 -I csrc -I $TI/include benchmarks/bench_cpu_tiles.cpp -o /tmp/bench_tiles
//       -L $TI/lib -lc10 -Wl,-rpath,$TI/lib      (one line)
//   /tmp/bench_tiles
// (from the repository root). `err`: the largest absolute error against float64; `tail`: 1 when
// the floats past the output are untouched; on a CPU without AVX-512F that variant is skipped.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "recurrence/cpu_tiles.h"

using namespace mtl_kernels::cpu_tiles;

namespace {

struct Shape {
  int64_t n, K, N;  // n rows, K deep, N columns
  const char* what;
};

// The seconds of one call: the best of 5 batches, each about 0.1 GFLOP.
double seconds_per_call(const std::vector<float>& x, const std::vector<float>& packed, const Shape& s,
                        std::vector<float>& out, Variant variant) {
  const int64_t reps = std::max<int64_t>(10, 200000000 / (2 * s.n * s.K * s.N + 1));
  const auto call = [&] {
    rows_times_packed(x.data(), s.n, s.K, 1, packed.data(), s.K, s.N, out.data(), s.N, false, variant);
  };
  for (int64_t i = 0; i < reps / 10; ++i) call();  // warm-up
  double best = 1e9;
  for (int round = 0; round < 5; ++round) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < reps; ++i) call();
    const std::chrono::duration<double> dt = std::chrono::steady_clock::now() - t0;
    best = std::min(best, dt.count() / reps);
  }
  return best;
}

}  // namespace

int main() {
  if (!supported()) {
    std::printf("this CPU has no AVX2 + FMA: the tiles do not run here\n");
    return 0;
  }
  const bool wide = supported512();
  const Shape shapes[] = {{32, 50, 200, "seed fwd rec"},    {32, 100, 200, "seed in-proj"},
                          {32, 200, 50, "seed bwd rec"},    {32, 20, 80, "branches rec"},
                          {32, 80, 20, "branches bwd"},     {16, 64, 256, "many-small"},
                          {16, 256, 64, "many-small bwd"},  {64, 256, 1024, "multitask"},
                          {64, 1024, 256, "multitask bwd"}, {43, 128, 512, "ragged"},
                          {7, 33, 37, "odd"},               {1, 1, 1, "one"}};
  std::mt19937 rng(0);
  std::uniform_real_distribution<float> u(-1, 1);
  for (const Shape& s : shapes) {
    std::vector<float> x(s.n * s.K), w(s.K * s.N), packed(packed_size(s.K, s.N));
    for (auto& v : x) v = u(rng);
    for (auto& v : w) v = u(rng);
    pack_panels(w.data(), s.K, s.N, s.N, 1, packed.data());
    std::vector<double> ref(s.n * s.N, 0.5);
    for (int64_t r = 0; r < s.n; ++r)
      for (int64_t k = 0; k < s.K; ++k)
        for (int64_t c = 0; c < s.N; ++c) ref[r * s.N + c] += double(x[r * s.K + k]) * w[k * s.N + c];
    double err[2] = {0, 0}, gflops[2] = {0, 0};
    bool tail_ok = true;
    for (int v = 0; v < (wide ? 2 : 1); ++v) {
      const Variant variant = v ? Variant::kAvx512 : Variant::kAvx2;
      std::vector<float> out(s.n * s.N + 5, 7.f);  // 5 floats past the output, which must stay 7
      std::fill(out.begin(), out.begin() + s.n * s.N, 0.5f);
      rows_times_packed(x.data(), s.n, s.K, 1, packed.data(), s.K, s.N, out.data(), s.N, true, variant);
      for (int64_t i = 0; i < s.n * s.N; ++i) err[v] = std::max(err[v], std::abs(out[i] - ref[i]));
      tail_ok = tail_ok && std::all_of(out.end() - 5, out.end(), [](float f) { return f == 7.f; });
      gflops[v] = 2.0 * s.n * s.K * s.N / seconds_per_call(x, packed, s, out, variant) / 1e9;
    }
    std::printf("%-16s n=%3ld K=%4ld N=%4ld  err avx2 %.1e avx512 %.1e tail %d  avx2 %6.1f GF/s  ",
                s.what, long(s.n), long(s.K), long(s.N), err[0], err[1], int(tail_ok), gflops[0]);
    if (wide)
      std::printf("avx512 %6.1f GF/s  ratio %.2f\n", gflops[1], gflops[1] / gflops[0]);
    else
      std::printf("avx512      - (no AVX-512F)\n");
  }
}
