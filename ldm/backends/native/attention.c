/* softmax(q k^T * scale) v for float32 heads of up to 64 channels on the CPU's threads: one kernel for
   AVX-512 (`attention_f32`) and one for AVX2 with FMA (`attention_f32_avx2`), each function compiled for
   its instruction set by a target attribute, so the library builds anywhere and each entry runs where
   the CPU has its ISA (the caller checks).

   Built by ldm/backends/native (cc -O2 -shared), called through ctypes. Each work item is a block of
   QB queries of one (sample, head): their scores against every key are computed into a buffer of the
   calling thread (QB x M floats: in L2 at 4096 keys) and each row's maximum kept; then, a chunk of keys
   at a time, the chunk's exp(s - max) in place (and into the row's sum) and its products with the
   values are summed into the output rows, at the end scaled by 1 / sum. The reference's sum in another
   order, with no running rescale as in a streaming (flash) kernel: a whole row of scores fits in cache.

   Layouts (elements; the last dimension of q, v and out is contiguous):
     q    [B, H, N, D] at strides qs (b, h, n)
     kp   [B, H, M / 32, D, 32] contiguous: keys packed by tiles of 32, channel-major within a tile
     v    [B, H, M, D] at strides vs (b, h, m)
     out  [B, H, N, D] at strides os (b, h, n)
   M must be a multiple of 32 and D at most 64 (the entries refuse others).  */

#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>

#define AVX512 __attribute__((target("avx512f,fma")))
#define AVX2 __attribute__((target("avx2,fma")))

#define R 8         /* query rows of one AVX-512 register tile */
#define R2 4        /* query rows of one AVX2 register tile */
#ifndef QB
#define QB 64       /* query rows of one work item: each tile of keys serves 8 row tiles from L1 */
#endif
#define KT 32       /* keys of one packed tile */
#ifndef VCHUNK
#define VCHUNK 64   /* keys of the values kept in L1 while every row tile of a block takes them */
#endif

typedef struct job job_t;
typedef void (*block_fn)(const job_t *job, int64_t b, int64_t h, int64_t n0, float *s, int64_t ld, float *o);

struct job {
    const float *q, *kp, *v;
    float *out;
    int64_t B, H, N, M, D;
    int64_t qs[3], vs[3], os[3];
    float scale;
    int threads;
    int failed;
    int64_t next;   /* the next work item to take */
    block_fn block;
};

typedef struct {
    job_t *job;
    int tid;
} arg_t;

/* what both ISAs' blocks start from: the (sample, head)'s keys and values, the block's query rows (padded to
   whole register tiles of `tile` rows: rows past the end repeat the last one, computed but not written) */
typedef struct {
    const float *k, *v, *qrows[QB];
    float *out;
    int64_t rows, tiles;
} block_t;

static void block_setup(const job_t *job, int64_t b, int64_t h, int64_t n0, int tile, block_t *blk) {
    const float *qbase = job->q + b * job->qs[0] + h * job->qs[1];
    blk->k = job->kp + (b * job->H + h) * job->M * job->D;
    blk->v = job->v + b * job->vs[0] + h * job->vs[1];
    blk->out = job->out + b * job->os[0] + h * job->os[1] + n0 * job->os[2];
    blk->rows = job->N - n0 < QB ? job->N - n0 : QB;
    blk->tiles = (blk->rows + tile - 1) / tile;
    for (int64_t r = 0; r < blk->tiles * tile; r++)
        blk->qrows[r] = qbase + (n0 + (r < blk->rows ? r : blk->rows - 1)) * job->qs[2];
}

/* -------------------------------------------------------------------------------------- AVX-512 */

/* e^x for x <= 0 (and any x: above 88 it saturates at FLT_MAX-ish, below -87 it flushes to ~0):
   2^n * e^r with n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2], e^r by its Taylor series to r^7
   (truncation below 1e-8 relative). NaN stays NaN (max/min return their second operand on NaN). */
static inline AVX512 __m512 exp_ps(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(-87.0f), x);
    x = _mm512_min_ps(_mm512_set1_ps(88.0f), x);
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);   /* ln 2, high part: exact n * hi */
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.4286068203094172e-06f), r);      /* ln 2, low part */
    __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* scores of R query rows (pointers rows[]) against one packed tile of KT keys: s[r * ld + j]; rmax[r], the
   running maximum of row r's scores by lane, takes them in */
static inline AVX512 void qk_tile(const float *const *rows, const float *kt, int64_t D, float scale, float *s,
                                  int64_t ld, __m512 *rmax) {
    __m512 acc[R][2];
    _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t c = 0; c < D; c++) {
        __m512 k0 = _mm512_loadu_ps(kt + c * KT), k1 = _mm512_loadu_ps(kt + c * KT + 16);
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {
            __m512 qb = _mm512_set1_ps(rows[r][c]);
            acc[r][0] = _mm512_fmadd_ps(qb, k0, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(qb, k1, acc[r][1]);
        }
    }
    __m512 sc = _mm512_set1_ps(scale);
    _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {
        __m512 s0 = _mm512_mul_ps(acc[r][0], sc), s1 = _mm512_mul_ps(acc[r][1], sc);
        _mm512_storeu_ps(s + r * ld, s0);
        _mm512_storeu_ps(s + r * ld + 16, s1);
        rmax[r] = _mm512_max_ps(rmax[r], _mm512_max_ps(s0, s1));
    }
}

/* o[r] (+)= sum over keys j0..j1 of p[r * ld + j] * v[j], for RR rows and NV vectors of 16 channels: the
   accumulators start from zero (first) or from o, a scratch of 64 floats a row, and go back to it */
#define PV_TILE(NAME, RR, NV)                                                                          \
    static AVX512 void NAME(const float *p, int64_t ld, const float *v, int64_t vstride, int64_t j0,   \
                            int64_t j1, float *o, const __mmask16 *mask, int first) {                 \
        __m512 acc[RR][NV];                                                                           \
        _Pragma("GCC unroll 8") for (int r = 0; r < RR; r++)                                          \
            _Pragma("GCC unroll 4") for (int t = 0; t < NV; t++)                                      \
                acc[r][t] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(o + r * 64 + 16 * t);       \
        for (int64_t j = j0; j < j1; j++) {                                                           \
            __m512 vv[NV];                                                                            \
            _Pragma("GCC unroll 4") for (int t = 0; t < NV; t++)                                      \
                vv[t] = _mm512_maskz_loadu_ps(mask[t], v + j * vstride + 16 * t);                     \
            _Pragma("GCC unroll 8") for (int r = 0; r < RR; r++) {                                    \
                __m512 pb = _mm512_set1_ps(p[r * ld + j]);                                            \
                _Pragma("GCC unroll 4") for (int t = 0; t < NV; t++)                                  \
                    acc[r][t] = _mm512_fmadd_ps(pb, vv[t], acc[r][t]);                                \
            }                                                                                         \
        }                                                                                             \
        _Pragma("GCC unroll 8") for (int r = 0; r < RR; r++)                                          \
            _Pragma("GCC unroll 4") for (int t = 0; t < NV; t++)                                      \
                _mm512_storeu_ps(o + r * 64 + 16 * t, acc[r][t]);                                     \
    }

PV_TILE(pv_8x1, R, 1)
PV_TILE(pv_8x2, R, 2)
PV_TILE(pv_8x3, R, 3)
PV_TILE(pv_4x4, R / 2, 4)

/* one register tile of R rows: R x NV accumulators (24 at most; 64 channels take two passes of 4 rows) */
static AVX512 void pv_rows(const float *p, int64_t ld, const float *v, int64_t vstride, int64_t j0, int64_t j1,
                           float *o, const __mmask16 *mask, int first, int nv) {
    switch (nv) {
    case 1: pv_8x1(p, ld, v, vstride, j0, j1, o, mask, first); break;
    case 2: pv_8x2(p, ld, v, vstride, j0, j1, o, mask, first); break;
    case 3: pv_8x3(p, ld, v, vstride, j0, j1, o, mask, first); break;
    default:
        pv_4x4(p, ld, v, vstride, j0, j1, o, mask, first);
        pv_4x4(p + (R / 2) * ld, ld, v, vstride, j0, j1, o + (R / 2) * 64, mask, first);
    }
}

static AVX512 void block512(const job_t *job, int64_t b, int64_t h, int64_t n0, float *s, int64_t ld, float *o) {
    const int64_t M = job->M, D = job->D;
    block_t blk;
    block_setup(job, b, h, n0, R, &blk);
    const float *kbase = blk.k, *vbase = blk.v, *const *qrows = blk.qrows;
    const int64_t rows = blk.rows, tiles = blk.tiles;
    /* scores: each tile of keys (in L1) against every row tile of the block, and each row's maximum */
    __m512 rmax[QB];
    for (int64_t r = 0; r < tiles * R; r++) rmax[r] = _mm512_set1_ps(-INFINITY);
    for (int64_t jt = 0; jt < M / KT; jt++)
        for (int64_t t = 0; t < tiles; t++)
            qk_tile(qrows + t * R, kbase + jt * KT * D, D, job->scale, s + t * R * ld + jt * KT, ld, rmax + t * R);
    __m512 mx[QB], sum[QB];
    for (int64_t r = 0; r < tiles * R; r++) {
        mx[r] = _mm512_set1_ps(_mm512_reduce_max_ps(rmax[r]));
        sum[r] = _mm512_setzero_ps();
    }
    /* a chunk of keys at a time (its values in L1) for every row tile: the chunk's softmax numerators
       exp(s - max) in place and into the row sums, then their products with the values into o */
    const int nv = (int)((D + 15) / 16);
    __mmask16 mask[4];
    for (int t = 0; t < 4; t++) {
        int64_t lanes = D - 16 * t;
        mask[t] = lanes >= 16 ? (__mmask16)0xFFFF : lanes <= 0 ? 0 : (__mmask16)((1u << lanes) - 1);
    }
    for (int64_t j0 = 0; j0 < M; j0 += VCHUNK) {
        int64_t j1 = j0 + VCHUNK < M ? j0 + VCHUNK : M;
        for (int64_t t = 0; t < tiles; t++) {
            for (int64_t r = t * R; r < (t + 1) * R; r++) {
                float *row = s + r * ld;
                for (int64_t j = j0; j < j1; j += 16) {
                    __m512 e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(row + j), mx[r]));
                    _mm512_storeu_ps(row + j, e);
                    sum[r] = _mm512_add_ps(sum[r], e);
                }
            }
            pv_rows(s + t * R * ld, ld, vbase, job->vs[2], j0, j1, o + t * R * 64, mask, j0 == 0, nv);
        }
    }
    for (int64_t r = 0; r < rows; r++) {
        float *dst = blk.out + r * job->os[2];
        __m512 sc = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum[r]));
        for (int t = 0; t < nv; t++)
            _mm512_mask_storeu_ps(dst + 16 * t, mask[t], _mm512_mul_ps(_mm512_loadu_ps(o + r * 64 + 16 * t), sc));
    }
}

/* ------------------------------------------------------------------------------------------ AVX2 */

/* exp_ps's computation in 8 lanes: 2^n built in the exponent bits (n + 127 in 1..254 after the clamp) */
static inline AVX2 __m256 exp256(__m256 x) {
    x = _mm256_max_ps(_mm256_set1_ps(-87.0f), x);
    x = _mm256_min_ps(_mm256_set1_ps(88.0f), x);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.4426950408889634f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.4286068203094172e-06f), r);
    __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static inline AVX2 float hmax256(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

static inline AVX2 float hsum256(__m256 v) {
    __m128 m = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_add_ps(m, _mm_movehl_ps(m, m));
    m = _mm_add_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

/* scores of R2 rows against half a packed tile (16 keys at kt, row stride KT): 8 accumulators of 16 registers */
static inline AVX2 void qk_tile256(const float *const *rows, const float *kt, int64_t D, float scale, float *s,
                                   int64_t ld, __m256 *rmax) {
    __m256 acc[R2][2];
    _Pragma("GCC unroll 4") for (int r = 0; r < R2; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t c = 0; c < D; c++) {
        __m256 k0 = _mm256_loadu_ps(kt + c * KT), k1 = _mm256_loadu_ps(kt + c * KT + 8);
        _Pragma("GCC unroll 4") for (int r = 0; r < R2; r++) {
            __m256 qb = _mm256_broadcast_ss(rows[r] + c);
            acc[r][0] = _mm256_fmadd_ps(qb, k0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(qb, k1, acc[r][1]);
        }
    }
    __m256 sc = _mm256_set1_ps(scale);
    _Pragma("GCC unroll 4") for (int r = 0; r < R2; r++) {
        __m256 s0 = _mm256_mul_ps(acc[r][0], sc), s1 = _mm256_mul_ps(acc[r][1], sc);
        _mm256_storeu_ps(s + r * ld, s0);
        _mm256_storeu_ps(s + r * ld + 8, s1);
        rmax[r] = _mm256_max_ps(rmax[r], _mm256_max_ps(s0, s1));
    }
}

/* PV_TILE in 8 lanes: NV vectors of 8 channels, the last one loaded through `tail` (its lanes past D off) */
#define PV_TILE256(NAME, RR, NV)                                                                       \
    static AVX2 void NAME(const float *p, int64_t ld, const float *v, int64_t vstride, int64_t j0,     \
                          int64_t j1, float *o, __m256i tail, int first) {                            \
        __m256 acc[RR][NV];                                                                           \
        _Pragma("GCC unroll 4") for (int r = 0; r < RR; r++)                                          \
            _Pragma("GCC unroll 8") for (int t = 0; t < NV; t++)                                      \
                acc[r][t] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(o + r * 64 + 8 * t);        \
        for (int64_t j = j0; j < j1; j++) {                                                           \
            __m256 vv[NV];                                                                            \
            const float *vj = v + j * vstride;                                                        \
            _Pragma("GCC unroll 8") for (int t = 0; t < NV - 1; t++) vv[t] = _mm256_loadu_ps(vj + 8 * t); \
            vv[NV - 1] = _mm256_maskload_ps(vj + 8 * (NV - 1), tail);                                 \
            _Pragma("GCC unroll 4") for (int r = 0; r < RR; r++) {                                    \
                __m256 pb = _mm256_broadcast_ss(p + r * ld + j);                                      \
                _Pragma("GCC unroll 8") for (int t = 0; t < NV; t++)                                  \
                    acc[r][t] = _mm256_fmadd_ps(pb, vv[t], acc[r][t]);                                \
            }                                                                                         \
        }                                                                                             \
        _Pragma("GCC unroll 4") for (int r = 0; r < RR; r++)                                          \
            _Pragma("GCC unroll 8") for (int t = 0; t < NV; t++)                                      \
                _mm256_storeu_ps(o + r * 64 + 8 * t, acc[r][t]);                                      \
    }

PV_TILE256(pv256_4x1, 4, 1)
PV_TILE256(pv256_4x2, 4, 2)
PV_TILE256(pv256_4x3, 4, 3)
PV_TILE256(pv256_2x4, 2, 4)
PV_TILE256(pv256_2x5, 2, 5)
PV_TILE256(pv256_2x6, 2, 6)
PV_TILE256(pv256_1x7, 1, 7)
PV_TILE256(pv256_1x8, 1, 8)

/* one register tile of R2 rows: at most 12 accumulators a call (wider heads take the rows in 2 or 4 calls) */
static AVX2 void pv_rows256(const float *p, int64_t ld, const float *v, int64_t vstride, int64_t j0, int64_t j1,
                            float *o, __m256i tail, int first, int nv) {
    switch (nv) {
    case 1: pv256_4x1(p, ld, v, vstride, j0, j1, o, tail, first); return;
    case 2: pv256_4x2(p, ld, v, vstride, j0, j1, o, tail, first); return;
    case 3: pv256_4x3(p, ld, v, vstride, j0, j1, o, tail, first); return;
    }
    for (int r = 0; r < R2; r += nv <= 6 ? 2 : 1) {
        const float *pr = p + r * ld;
        float *orow = o + r * 64;
        switch (nv) {
        case 4: pv256_2x4(pr, ld, v, vstride, j0, j1, orow, tail, first); break;
        case 5: pv256_2x5(pr, ld, v, vstride, j0, j1, orow, tail, first); break;
        case 6: pv256_2x6(pr, ld, v, vstride, j0, j1, orow, tail, first); break;
        case 7: pv256_1x7(pr, ld, v, vstride, j0, j1, orow, tail, first); break;
        default: pv256_1x8(pr, ld, v, vstride, j0, j1, orow, tail, first);
        }
    }
}

static AVX2 void block256(const job_t *job, int64_t b, int64_t h, int64_t n0, float *s, int64_t ld, float *o) {
    const int64_t M = job->M, D = job->D;
    block_t blk;
    block_setup(job, b, h, n0, R2, &blk);
    const float *kbase = blk.k, *vbase = blk.v, *const *qrows = blk.qrows;
    const int64_t rows = blk.rows, tiles = blk.tiles;
    __m256 rmax[QB];
    for (int64_t r = 0; r < tiles * R2; r++) rmax[r] = _mm256_set1_ps(-INFINITY);
    for (int64_t jt = 0; jt < M / KT; jt++)
        for (int half = 0; half < 2; half++)
            for (int64_t t = 0; t < tiles; t++)
                qk_tile256(qrows + t * R2, kbase + jt * KT * D + 16 * half, D, job->scale,
                           s + t * R2 * ld + jt * KT + 16 * half, ld, rmax + t * R2);
    __m256 mx[QB], sum[QB];
    for (int64_t r = 0; r < tiles * R2; r++) {
        mx[r] = _mm256_set1_ps(hmax256(rmax[r]));
        sum[r] = _mm256_setzero_ps();
    }
    const int nv = (int)((D + 7) / 8);
    const int64_t lanes = D - 8 * (nv - 1);   /* 1..8 channels in the last vector */
    const __m256i tail = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)lanes), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    for (int64_t j0 = 0; j0 < M; j0 += VCHUNK) {
        int64_t j1 = j0 + VCHUNK < M ? j0 + VCHUNK : M;
        for (int64_t t = 0; t < tiles; t++) {
            for (int64_t r = t * R2; r < (t + 1) * R2; r++) {
                float *row = s + r * ld;
                for (int64_t j = j0; j < j1; j += 8) {
                    __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(row + j), mx[r]));
                    _mm256_storeu_ps(row + j, e);
                    sum[r] = _mm256_add_ps(sum[r], e);
                }
            }
            pv_rows256(s + t * R2 * ld, ld, vbase, job->vs[2], j0, j1, o + t * R2 * 64, tail, j0 == 0, nv);
        }
    }
    for (int64_t r = 0; r < rows; r++) {
        float *dst = blk.out + r * job->os[2];
        __m256 sc = _mm256_set1_ps(1.0f / hsum256(sum[r]));
        for (int t = 0; t < nv - 1; t++)
            _mm256_storeu_ps(dst + 8 * t, _mm256_mul_ps(_mm256_loadu_ps(o + r * 64 + 8 * t), sc));
        _mm256_maskstore_ps(dst + 8 * (nv - 1), tail, _mm256_mul_ps(_mm256_loadu_ps(o + r * 64 + 8 * (nv - 1)), sc));
    }
}

/* ---------------------------------------------------------------------------------------- threads */

static void *worker(void *p) {
    arg_t *a = (arg_t *)p;
    job_t *job = a->job;
    const int64_t ld = job->M + 16;   /* a row's scores, padded: rows 16 KB apart would share L1 sets */
    float *s = aligned_alloc(64, (size_t)(QB * ld + QB * 64) * sizeof(float));
    if (!s) {
        job->failed = 1;
        return NULL;
    }
    float *o = s + QB * ld;
    const int64_t blocks = (job->N + QB - 1) / QB, items = job->B * job->H * blocks;
    /* items taken in order as threads come free: a core slowed by other work takes fewer (a fixed split
       would wait for it), and the threads work on the same (sample, head) at a time, its keys in cache */
    for (;;) {
        int64_t i = __atomic_fetch_add(&job->next, 1, __ATOMIC_RELAXED);
        if (i >= items) break;
        int64_t bh = i / blocks, n0 = (i % blocks) * QB;
        job->block(job, bh / job->H, bh % job->H, n0, s, ld, o);
    }
    free(s);
    return NULL;
}

static int run(block_fn block, const float *q, const float *kp, const float *v, float *out, int64_t B, int64_t H,
               int64_t N, int64_t M, int64_t D, const int64_t *qs, const int64_t *vs, const int64_t *os, float scale,
               int threads) {
    if (M % KT != 0 || D < 1 || D > 64 || threads < 1 || threads > 256) return 2;
    job_t job = {q, kp, v, out, B, H, N, M, D, {qs[0], qs[1], qs[2]}, {vs[0], vs[1], vs[2]}, {os[0], os[1], os[2]},
                 scale, threads, 0, 0, block};
    pthread_t tids[256];
    arg_t args[256];
    int started = 0;
    for (int t = 1; t < threads; t++) {
        args[t].job = &job;
        args[t].tid = t;
        if (pthread_create(&tids[t], NULL, worker, &args[t]) != 0) {
            job.failed = 1;
            break;
        }
        started = t;
    }
    args[0].job = &job;
    args[0].tid = 0;
    if (!job.failed) worker(&args[0]);
    for (int t = 1; t <= started; t++) pthread_join(tids[t], NULL);
    return job.failed;
}

/* 0 on success; nonzero when a thread or a buffer could not be had (the output is then incomplete) or the
   shapes are not taken (M not a multiple of 32, D above 64) */
int attention_f32(const float *q, const float *kp, const float *v, float *out, int64_t B, int64_t H, int64_t N,
                  int64_t M, int64_t D, const int64_t *qs, const int64_t *vs, const int64_t *os, float scale,
                  int threads) {
    return run(block512, q, kp, v, out, B, H, N, M, D, qs, vs, os, scale, threads);
}

int attention_f32_avx2(const float *q, const float *kp, const float *v, float *out, int64_t B, int64_t H, int64_t N,
                       int64_t M, int64_t D, const int64_t *qs, const int64_t *vs, const int64_t *os, float scale,
                       int threads) {
    return run(block256, q, kp, v, out, B, H, N, M, D, qs, vs, os, scale, threads);
}
