/* One fused pass over a chunk of (base, variant) weights: the statistics of weights.DiffStats.
 *
 * Compiled on first use by mechinterp/analysis/diffkernel.py (cc -O3, loaded with ctypes, so the
 * calls release the GIL and several threads can run it on parts of a chunk). Per entry, in one
 * read of both inputs:
 *   d = float(v) - float(b)                 (float32; 16-bit inputs widened per entry only)
 *   sq[0] += double(d)^2, sq[1] += double(b)^2   (products and sums in float64)
 *   changed += bits(v) != bits(b)
 *   optionally the sparsity bin of |d| / max(|b|, 1e-10): the float32 ratio's bit pattern >> 13
 *   indexes `lut` (diffkernel.bin_table); cells near an edge are decided in float64 against
 *   `edges`, as bucketize(right=True) / np.histogram do; non-finite ratios count as above (101).
 * These are the operations of weights.chunk_stats_torch, entry for entry, so the bin counts and
 * changed counts are identical; the sums of squares are more exact (float64 products and sums).
 */
#define _GNU_SOURCE
#include <math.h>
#include <stdint.h>
#include <string.h>

#define LANES 16
#define BLOCK 512 /* ratios are formed for BLOCK entries (L1-resident), then binned */
#define N_BINS 102 /* below, 100 bins, above */
#define N_EDGES 101
#define LUT_SHIFT 13 /* must match diffkernel.LUT_SHIFT */

static inline uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

/* Bin one block of ratios |d| / max(|b|, 1e-10) through the table; table cells that hold an edge
 * (or lie within 2 ulps of one) store -(e + 1) for that edge e, and their entries are decided
 * against it in float64: bin = e + (r >= edges[e]). */
static void bin_block(const float *fd, const float *fb, int m, const int8_t *lut,
                      const double *edges, int64_t sub[4][N_BINS]) {
    uint32_t rb[BLOCK];
    for (int k = 0; k < m; k++) {
        float ab = fabsf(fb[k]);
        float den = ab < 1e-10f ? 1e-10f : ab; /* float32 clamp_min(1e-10); NaN stays NaN */
        rb[k] = f32_bits(fabsf(fd[k]) / den) & 0x7fffffffu;
    }
    for (int i = 0; i < m; i += 4) { /* four sub-histograms, so that repeated bins do not serialise */
        int top = m - i < 4 ? m - i : 4;
        for (int k = 0; k < top; k++) {
            int bin = lut[rb[i + k] >> LUT_SHIFT];
            if (bin < 0) {
                double ab = fabs((double)fb[i + k]);
                double r = fabs((double)fd[i + k]) / (ab < 1e-10 ? 1e-10 : ab);
                bin = -bin - 1;
                bin += r >= edges[bin];
            }
            sub[k][bin]++;
        }
    }
}

/* Sums of squares and changed count of one block of widened entries (x base, y variant); the
 * ratios' bins too when `sub` is not NULL. Lanes keep independent float64 accumulators, so the
 * loop vectorises without reordering any sum. */
static inline void block(const float *restrict x, const float *restrict y, int m, double *accd,
                         double *accb, int64_t *chl, int count_bits, const int8_t *lut,
                         const double *edges, int64_t sub[4][N_BINS]) {
    float fd[BLOCK];
    const uint32_t *xb = (const uint32_t *)x, *yb = (const uint32_t *)y;
    int i = 0;
    for (; i + LANES <= m; i += LANES) {
        for (int j = 0; j < LANES; j++) {
            float d = y[i + j] - x[i + j];
            accd[j] += (double)d * (double)d;
            accb[j] += (double)x[i + j] * (double)x[i + j];
            if (count_bits) chl[j] += xb[i + j] != yb[i + j];
            fd[i + j] = d;
        }
    }
    for (; i < m; i++) {
        float d = y[i] - x[i];
        accd[0] += (double)d * (double)d;
        accb[0] += (double)x[i] * (double)x[i];
        if (count_bits) chl[0] += xb[i] != yb[i];
        fd[i] = d;
    }
    if (sub) bin_block(fd, x, m, lut, edges, sub);
}

/* sq[0] += sum d^2, sq[1] += sum b^2, *changed += #(bits differ), counts[102] += bin counts (when
 * not NULL). KIND 0: float32, 1: bfloat16, 2: float16 (16-bit inputs widened a block at a time). */
static inline __attribute__((always_inline)) void
diff(int kind, const void *b, const void *v, int64_t n, const int8_t *lut, const double *edges,
     double *sq, int64_t *changed, int64_t *counts) {
    double accd[LANES] = {0}, accb[LANES] = {0};
    int64_t chl[LANES] = {0}, ch16 = 0;
    int64_t sub[4][N_BINS];
    memset(sub, 0, sizeof sub);
    float wb[BLOCK], wv[BLOCK];
    for (int64_t s = 0; s < n; s += BLOCK) {
        int m = (int)(n - s < BLOCK ? n - s : BLOCK);
        const float *x, *y;
        if (kind == 0) {
            x = (const float *)b + s;
            y = (const float *)v + s;
        } else if (kind == 1) { /* bf16 -> f32: the bits shifted up, exact and one-to-one */
            const uint16_t *hb = (const uint16_t *)b + s, *hv = (const uint16_t *)v + s;
            uint32_t *ub = (uint32_t *)wb, *uv = (uint32_t *)wv;
            for (int i = 0; i < m; i++) {
                ub[i] = (uint32_t)hb[i] << 16;
                uv[i] = (uint32_t)hv[i] << 16;
            }
            x = wb;
            y = wv;
        } else { /* f16 -> f32: exact; the changed count is taken on the 16-bit patterns */
            const _Float16 *hb = (const _Float16 *)b + s, *hv = (const _Float16 *)v + s;
            const uint16_t *rb = (const uint16_t *)b + s, *rv = (const uint16_t *)v + s;
            for (int i = 0; i < m; i++) {
                wb[i] = (float)hb[i];
                wv[i] = (float)hv[i];
                ch16 += rb[i] != rv[i];
            }
            x = wb;
            y = wv;
        }
        block(x, y, m, accd, accb, chl, kind != 2, lut, edges, counts ? sub : NULL);
    }
    for (int j = 0; j < LANES; j++) {
        sq[0] += accd[j];
        sq[1] += accb[j];
        *changed += chl[j];
    }
    *changed += ch16;
    if (counts)
        for (int k = 0; k < 4; k++)
            for (int j = 0; j < N_BINS; j++) counts[j] += sub[k][j];
}

void diff_f32(const void *b, const void *v, int64_t n, const int8_t *lut, const double *edges,
              double *sq, int64_t *changed, int64_t *counts) {
    diff(0, b, v, n, lut, edges, sq, changed, counts);
}

void diff_bf16(const void *b, const void *v, int64_t n, const int8_t *lut, const double *edges,
               double *sq, int64_t *changed, int64_t *counts) {
    diff(1, b, v, n, lut, edges, sq, changed, counts);
}

void diff_f16(const void *b, const void *v, int64_t n, const int8_t *lut, const double *edges,
              double *sq, int64_t *changed, int64_t *counts) {
    diff(2, b, v, n, lut, edges, sq, changed, counts);
}

/* The same statistics for n entries stored contiguously in two files (base at byte off_b of fd_b,
 * variant at off_v of fd_v), read with pread in blocks of READ_BYTES into two small buffers that
 * stay in cache: the file bytes cross memory once, as they do for `cat`. Several threads run this
 * on disjoint parts of a tensor (each with its own file descriptors), so one reads while another
 * computes. Returns 0, or -1 on a read error (errno set), or -2 when a file ends early.
 * kind + 8: read only, compute nothing (how the benchmark splits read time from compute). */
#include <errno.h>
#include <stdlib.h>
#include <unistd.h>

#define READ_BYTES (128 * 1024)

static int read_full(int fd, char *buf, size_t nbytes, int64_t off) {
    size_t done = 0;
    while (done < nbytes) {
        ssize_t got = pread(fd, buf + done, nbytes - done, (off_t)(off + (int64_t)done));
        if (got < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (got == 0) return -2;
        done += (size_t)got;
    }
    return 0;
}

int diff_files(int kind, int fd_b, int64_t off_b, int fd_v, int64_t off_v, int64_t n,
               const int8_t *lut, const double *edges, double *sq, int64_t *changed,
               int64_t *counts) {
    int read_only = kind >= 8;
    kind &= 7;
    int64_t item = kind == 0 ? 4 : 2, step = READ_BYTES / item;
    char *bb = aligned_alloc(64, READ_BYTES), *bv = aligned_alloc(64, READ_BYTES);
    int rc = (bb && bv) ? 0 : -1;
    for (int64_t s = 0; rc == 0 && s < n; s += step) {
        int64_t m = n - s < step ? n - s : step;
        rc = read_full(fd_b, bb, (size_t)(m * item), off_b + s * item);
        if (rc == 0) rc = read_full(fd_v, bv, (size_t)(m * item), off_v + s * item);
        if (rc == 0 && !read_only) {
            if (kind == 0) diff(0, bb, bv, m, lut, edges, sq, changed, counts);
            else if (kind == 1) diff(1, bb, bv, m, lut, edges, sq, changed, counts);
            else diff(2, bb, bv, m, lut, edges, sq, changed, counts);
        }
    }
    free(bb);
    free(bv);
    return rc;
}
