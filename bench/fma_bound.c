/* The machine's float32 FMA throughput for one vector ISA: independent FMA chains per thread, no memory traffic.

     gcc -O2 -mavx2 -mfma -fopenmp bench/fma_bound.c -o /tmp/fma_bound && OMP_NUM_THREADS=2 /tmp/fma_bound
     gcc -O2 -mavx2 -mfma -fopenmp -DCHAINS=10 ...   (the chains in flight: latency x FMA pipes is enough)

   AVX2 (8 floats a vector, 16 FLOP an FMA). Prints the best of 5 rounds in GFLOPS: the bound the AVX2
   figures of bench/README.md are put against. Each chain starts from another value (identical chains would
   be merged by the compiler); check with `objdump -d | grep -c 'vfmadd.*ymm'` that CHAINS FMAs remain. */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <time.h>

#ifndef CHAINS
#define CHAINS 8
#endif

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

int main(void) {
    const long iters = 80000000L;
    volatile float seed = 1.0f;
    double best = 0;
    for (int round = 0; round < 5; round++) {
        double t0 = now();
        float sink = 0;
#pragma omp parallel reduction(+ : sink)
        {
            __m256 a[CHAINS];
            float add[8] __attribute__((aligned(32)));
            for (int j = 0; j < 8; j++) add[j] = seed * 1e-7f;
            for (int j = 0; j < CHAINS; j++) a[j] = _mm256_set1_ps(seed + 0.01f * j + 0.001f * omp_get_thread_num());
            __m256 m = _mm256_set1_ps(seed * 0.999999f);
            for (long i = 0; i < iters; i++) {
#pragma GCC unroll 16
                for (int j = 0; j < CHAINS; j++) a[j] = _mm256_fmadd_ps(a[j], m, _mm256_load_ps(add));
            }
            float o[8];
            __m256 s = a[0];
            for (int j = 1; j < CHAINS; j++) s = _mm256_add_ps(s, a[j]);
            _mm256_storeu_ps(o, s);
            sink += o[0];
        }
        double dt = now() - t0, flop = (double)iters * CHAINS * 16 * omp_get_max_threads();
        if (flop / dt > best) best = flop / dt;
        if (sink == 12345.f) printf("-");  /* keep the result alive */
    }
    printf("AVX2 FMA: %d threads, %d chains: %.1f GFLOPS\n", omp_get_max_threads(), CHAINS, best * 1e-9);
    return 0;
}
