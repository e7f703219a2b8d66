// The CPU tiles' products alone (csrc/recurrence/cpu_tiles.h), AVX2 and AVX-512 variants side by
// side on the shapes the benchmark configs give them, against a float64 loop for correctness:
// out (n, N) = 0.5 + x (n, K) @ W (K, N), one thread, best of 5 timed batches of calls each.
//   TI=$(python3 -c "import torch, os; print(os.path.dirname(torch.__file__))")
//   g++ -O3 -std=c++20 -I csrc -I $TI/include benchmarks/bench_cpu_tiles.cpp -o /tmp/bench_cpu_tiles \
//       -L $TI/lib -lc10 -Wl,-rpath,$TI/lib && /tmp/bench_cpu_tiles
// (from the repository root; on a CPU without AVX-512F only the AVX2 column means anything).
#include "recurrence/cpu_tiles.h"
#include <chrono>
#include <cstdio>
#include <random>
#include <vector>
using namespace mtl_kernels::cpu_tiles;
int main() {
  if (!supported512()) std::printf("# this CPU has no AVX-512F: the avx512 column runs nothing valid\n");
  struct S { int64_t n, K, N; const char* what; };
  S shapes[] = {{32, 50, 200, "seed fwd rec"}, {32, 100, 200, "seed in-proj"}, {32, 200, 50, "seed bwd rec"},
                {32, 20, 80, "branches rec"}, {32, 80, 20, "branches bwd"}, {16, 64, 256, "many-small"},
                {16, 256, 64, "many-small bwd"}, {64, 256, 1024, "multitask"}, {64, 1024, 256, "multitask bwd"},
                {43, 128, 512, "ragged"}, {7, 33, 37, "odd"}, {1, 1, 1, "one"}};  // (n, K, N): n rows, K deep, N columns
  std::mt19937 rng(0); std::uniform_real_distribution<float> u(-1, 1);
  for (auto s : shapes) {
    std::vector<float> x(s.n * s.K), w(s.K * s.N), packed(packed_size(s.K, s.N));
    for (auto& v : x) v = u(rng); for (auto& v : w) v = u(rng);
    pack_panels(w.data(), s.K, s.N, s.N, 1, packed.data());
    std::vector<float> ref(s.n * s.N), o2(s.n * s.N + 5, 7.f), o5(s.n * s.N + 5, 7.f);
    for (int r = 0; r < s.n; ++r) for (int c = 0; c < s.N; ++c) { double a = 0.5; for (int k = 0; k < s.K; ++k) a += double(x[r*s.K+k]) * w[k*s.N+c]; ref[r*s.N+c] = a; }
    for (int r = 0; r < s.n * s.N; ++r) { o2[r] = 0.5f; o5[r] = 0.5f; }
    rows_times_packed(x.data(), s.n, s.K, 1, packed.data(), s.K, s.N, o2.data(), s.N, true, Variant::kAvx2);
    rows_times_packed(x.data(), s.n, s.K, 1, packed.data(), s.K, s.N, o5.data(), s.N, true, Variant::kAvx512);
    double e2 = 0, e5 = 0; for (int i = 0; i < s.n * s.N; ++i) { e2 = std::max(e2, (double)std::abs(o2[i]-ref[i])); e5 = std::max(e5, (double)std::abs(o5[i]-ref[i])); }
    bool tail_ok = o5[s.n*s.N] == 7.f && o2[s.n*s.N] == 7.f;
    double t[2];
    for (int v = 0; v < 2; ++v) {
      Variant var = v ? Variant::kAvx512 : Variant::kAvx2;
      int reps = std::max<int64_t>(10, 200000000 / (2 * s.n * s.K * s.N + 1));
      for (int i = 0; i < reps / 10; ++i) rows_times_packed(x.data(), s.n, s.K, 1, packed.data(), s.K, s.N, o2.data(), s.N, false, var);
      double best = 1e9;
      for (int rr = 0; rr < 5; ++rr) {
        auto t0 = std::chrono::steady_clock::now();
        for (int i = 0; i < reps; ++i) rows_times_packed(x.data(), s.n, s.K, 1, packed.data(), s.K, s.N, o2.data(), s.N, false, var);
        best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps);
      }
      t[v] = best;
    }
    double fl = 2.0 * s.n * s.K * s.N;
    printf("%-16s n=%3ld K=%4ld N=%4ld  err avx2 %.1e avx512 %.1e tail %d  avx2 %6.1f GF/s  avx512 %6.1f GF/s  ratio %.2f\n", s.what, s.n, s.K, s.N, e2, e5, tail_ok, fl/t[0]/1e9, fl/t[1]/1e9, t[0]/t[1]);
  }
}
