/* The machine's fp32 FMA bound, measured: independent chains of fused multiply-adds in registers,
 * one function per ISA (AVX2+FMA: 8 lanes, AVX-512F: 16 lanes), run on 1 thread and on T threads
 * at once. Compiled and run by bench/peers.py (gcc -O2 -fopenmp bench/fma.c):
 *
 *     ./fma ISA THREADS SECONDS      ISA: avx2 or avx512
 *
 * prints "ISA THREADS GFLOPS" where GFLOPS is the total of all threads (2 flops per lane per FMA). */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHAINS 12 /* more than latency x ports (4 x 2) on current cores: the chains never wait on each other */

/* One function per ISA from the same body: VEC is the vector type, P the intrinsics' prefix (_mm256 / _mm512),
 * LANES the floats in a vector. CHAINS = 12 independent accumulators written out (not a loop over an array,
 * which the compiler need not keep in registers), each one FMA an iteration, each from another value (identical
 * chains would be merged). */
#define FMA_RUN(NAME, TARGET, VEC, P, LANES)                                                                         \
    __attribute__((target(TARGET))) static double NAME(long iters, float seed) {                                    \
        const VEC a = P##_set1_ps(0.999999f), b = P##_set1_ps(1e-7f);                                               \
        VEC c0 = P##_set1_ps(seed), c1 = P##_set1_ps(seed + 1), c2 = P##_set1_ps(seed + 2), c3 = P##_set1_ps(seed + 3), \
            c4 = P##_set1_ps(seed + 4), c5 = P##_set1_ps(seed + 5), c6 = P##_set1_ps(seed + 6),                       \
            c7 = P##_set1_ps(seed + 7), c8 = P##_set1_ps(seed + 8), c9 = P##_set1_ps(seed + 9),                       \
            c10 = P##_set1_ps(seed + 10), c11 = P##_set1_ps(seed + 11);                                             \
        for (long n = 0; n < iters; n++) {                                                                          \
            c0 = P##_fmadd_ps(c0, a, b); c1 = P##_fmadd_ps(c1, a, b); c2 = P##_fmadd_ps(c2, a, b);                    \
            c3 = P##_fmadd_ps(c3, a, b); c4 = P##_fmadd_ps(c4, a, b); c5 = P##_fmadd_ps(c5, a, b);                    \
            c6 = P##_fmadd_ps(c6, a, b); c7 = P##_fmadd_ps(c7, a, b); c8 = P##_fmadd_ps(c8, a, b);                    \
            c9 = P##_fmadd_ps(c9, a, b); c10 = P##_fmadd_ps(c10, a, b); c11 = P##_fmadd_ps(c11, a, b);                \
        }                                                                                                           \
        VEC all[CHAINS] = {c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11};                                       \
        float out[LANES], s = 0;                                                                                    \
        for (int i = 0; i < CHAINS; i++) {                                                                          \
            P##_storeu_ps(out, all[i]);                                                                             \
            s += out[0];                                                                                            \
        }                                                                                                           \
        return s;                                                                                                   \
    }

FMA_RUN(run_avx2, "avx2,fma", __m256, _mm256, 8)
FMA_RUN(run_avx512, "avx512f", __m512, _mm512, 16)

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: fma avx2|avx512 THREADS SECONDS\n");
        return 2;
    }
    int wide = strcmp(argv[1], "avx512") == 0;
    if (!wide && strcmp(argv[1], "avx2") != 0) {
        fprintf(stderr, "fma: unknown ISA %s (avx2 or avx512)\n", argv[1]);
        return 2;
    }
    if (wide ? !__builtin_cpu_supports("avx512f") : !(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) {
        fprintf(stderr, "fma: this CPU lacks %s\n", argv[1]);
        return 1;
    }
    int threads = atoi(argv[2]);
    double seconds = atof(argv[3]);
    int lanes = wide ? 16 : 8;
    /* calibrate: iterations for about `seconds` on one thread */
    long iters = 1 << 20;
    for (;;) {
        double t0 = omp_get_wtime();
        volatile double sink = wide ? run_avx512(iters, 1.0f) : run_avx2(iters, 1.0f);
        (void)sink;
        if (omp_get_wtime() - t0 > seconds / 4) break;
        iters *= 2;
    }
    iters *= 4;
    double best = 0;
    for (int rep = 0; rep < 3; rep++) { /* best of 3: a shared machine only ever slows a run down */
        double t0 = omp_get_wtime(), sink = 0;
#pragma omp parallel num_threads(threads) reduction(+ : sink)
        sink += wide ? run_avx512(iters, (float)omp_get_thread_num()) : run_avx2(iters, (float)omp_get_thread_num());
        double dt = omp_get_wtime() - t0;
        double gflops = 2.0 * lanes * CHAINS * (double)iters * threads / dt / 1e9;
        if (gflops > best) best = gflops;
        if (sink == 12345.678) printf("!");
    }
    printf("%s %d %.1f\n", argv[1], threads, best);
    return 0;
}
