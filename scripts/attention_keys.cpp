// Times the AVX2 library's attention kernel alone: one row of the default model's shape
// (3 K/V heads of 64 dims, 3 query heads each) over N cached keys, for L layers' K/V.
// With L = 1 the K/V stay in cache; with L = 30 (23 MB at N = 1024) they stream from
// memory, as in a forward. Prints nanoseconds per key and K/V head (a "key-job").
//
//   g++ -O3 -march=native -fopenmp -std=c++17 scripts/attention_keys.cpp -o /tmp/attention_keys
//   /tmp/attention_keys 1024 1 5; /tmp/attention_keys 1024 30 3
#include "../src/specserve/model/csrc/decode_avx2.cpp"

#include <stdio.h>
#include <stdlib.h>

#include <chrono>

int main(int argc, char** argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: %s KEYS LAYERS REPETITIONS\n", argv[0]);
    return 2;
  }
  const int n = atoi(argv[1]), layers = atoi(argv[2]), reps = atoi(argv[3]);
  const int D = 64, Hkv = 3, group = 3, Hq = 9;
  const int64_t P = n + 8;
  std::vector<std::vector<bf16>> K(layers), V(layers);
  srand(1);
  for (int l = 0; l < layers; l++) {
    K[l].resize(Hkv * P * D);
    V[l].resize(Hkv * P * D);
    for (auto& x : K[l]) x = 0x3f80 + (rand() & 0x7f);  // bf16 values in [1, 2)
    for (auto& x : V[l]) x = 0x3f80 + (rand() & 0x7f);
  }
  std::vector<float> qf(Hq * D), ao(Hq * D);
  for (auto& x : qf) x = (rand() % 100) / 1000.0f;
  AttnScratch ws;
  for (int rep = 0; rep < reps; rep++) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int l = 0; l < layers; l++)
      for (int g = 0; g < Hkv; g++) {
        const SeqView sv{K[l].data() + g * P * D, V[l].data() + g * P * D, 0, nullptr, n - 1, n, nullptr};
        attend(D, sv, qf.data(), ao.data(), 0, 0, g, group, Hq, 0.125f, ws);
      }
    const double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
    printf("keys %d, layers %d: %.0f us, %.1f ns per key and K/V head\n", n, layers, us, us * 1000 / (layers * Hkv * n));
  }
  return 0;
}
