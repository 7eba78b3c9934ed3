/* The fused online softmax of locality's denoisers (see native/__init__.py): one call folds a
 * chunk of K candidates into the running (max, normaliser, weighted sums) of R = G*B rows.
 *
 * Row r = g*B + b (g < G, b < B). Its logits over the chunk are
 *   digits > 0:  l[k] = quad[g*ldq + k] + sum_j coef[j] * (float)sums[g*sg + j*sj + b*ls + k]
 *                (int8 kernels: the exact int32 sums of each digit, combined in float32, high
 *                digits first, as the torch path combines them)
 *   digits == 0: l[k] = logits[r*ldl + k]
 * and its values are val[g*svg + c*svc + k], c < V (svg = 0: every row shares them).
 * in units where the weights are 2^((l - max)*to_base2) (to_base2 = 1 for base-2 logits,
 * log2(e) for natural ones). The state is float64, max in the logits' units: mx[r], nrm[r],
 * acc[r*V + c]. Weights are raised to 2^-floor_log2 (subnormals run ~100x slower on x86), summed in float32
 * over blocks of SUM_BLOCK candidates and added in float64 (the drift of a float32 sum grows
 * with its length). Compiled with the machine's own instruction set (-march=native): every
 * loop over k vectorises.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define SUM_BLOCK 512
#define MAX_VALUES 64

/* 2^x for x in [-126, 0] (callers clamp): Cephes exp2f's polynomial on [-1/2, 1/2], relative
 * error below 2e-7, vectorisable (no libm call) */
static inline float exp2_nonpositive(float x) {
    float n = floorf(x + 0.5f);
    float f = x - n;
    float p = ((((1.535336188319500e-4f * f + 1.339887440266574e-3f) * f + 9.618437357674640e-3f) * f
                + 5.550332471162809e-2f) * f + 2.402264791363012e-1f) * f + 6.931472028550421e-1f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float s;
    memcpy(&s, &bits, sizeof s);
    return (1.0f + f * p) * s;
}

/* the weights 2^((buf[k] - shift) * to_base2) (at least 2^-floor_log2) of buf[k0, k1), in place;
 * returns their float32 sum */
static inline float weights_in_place(float *restrict buf, int64_t k0, int64_t k1, float shift, float to_base2,
                                     float floor_log2) {
    float sn = 0.0f;
    #pragma omp simd reduction(+:sn)
    for (int64_t k = k0; k < k1; k++) {
        float x = (buf[k] - shift) * to_base2;
        float w = exp2_nonpositive(x < -floor_log2 ? -floor_log2 : x);
        buf[k] = w;
        sn += w;
    }
    return sn;
}

/* row r's logits into buf; returns their maximum */
static float row_logits(float *restrict buf, int64_t K, int64_t g, int64_t b, int64_t r,
                        const int32_t *sums, int64_t sg, int64_t sj, int64_t ls, int digits, const float *coef,
                        const float *quad, int64_t ldq, const float *logits, int64_t ldl) {
    float m = -INFINITY;
    if (digits == 0) {
        const float *restrict l = logits + r * ldl;
        #pragma omp simd reduction(max:m)
        for (int64_t k = 0; k < K; k++) { buf[k] = l[k]; m = l[k] > m ? l[k] : m; }
        return m;
    }
    const float *restrict q = quad + g * ldq;
    const int32_t *s[5];
    float c[5] = {0, 0, 0, 0, 0};
    for (int j = 0; j < 5; j++) {
        s[j] = sums + g * sg + (j < digits ? j : 0) * sj + b * ls;
        c[j] = j < digits ? coef[j] : 0.0f;
    }
    const int32_t *restrict s0 = s[0], *restrict s1 = s[1], *restrict s2 = s[2], *restrict s3 = s[3], *restrict s4 = s[4];
    switch (digits) {
    case 1:
        #pragma omp simd reduction(max:m)
        for (int64_t k = 0; k < K; k++) {
            float l = q[k] + c[0] * (float)s0[k];
            buf[k] = l; m = l > m ? l : m;
        }
        break;
    case 2:
        #pragma omp simd reduction(max:m)
        for (int64_t k = 0; k < K; k++) {
            float l = (q[k] + c[1] * (float)s1[k]) + c[0] * (float)s0[k];
            buf[k] = l; m = l > m ? l : m;
        }
        break;
    case 3:
        #pragma omp simd reduction(max:m)
        for (int64_t k = 0; k < K; k++) {
            float l = ((q[k] + c[2] * (float)s2[k]) + c[1] * (float)s1[k]) + c[0] * (float)s0[k];
            buf[k] = l; m = l > m ? l : m;
        }
        break;
    case 4:
        #pragma omp simd reduction(max:m)
        for (int64_t k = 0; k < K; k++) {
            float l = (((q[k] + c[3] * (float)s3[k]) + c[2] * (float)s2[k]) + c[1] * (float)s1[k]) + c[0] * (float)s0[k];
            buf[k] = l; m = l > m ? l : m;
        }
        break;
    default:
        #pragma omp simd reduction(max:m)
        for (int64_t k = 0; k < K; k++) {
            float l = ((((q[k] + c[4] * (float)s4[k]) + c[3] * (float)s3[k]) + c[2] * (float)s2[k])
                       + c[1] * (float)s1[k]) + c[0] * (float)s0[k];
            buf[k] = l; m = l > m ? l : m;
        }
    }
    return m;
}

/* fold a chunk's normaliser dn and weighted sums da (weights relative to ref) into row r */
static void merge_row(int64_t r, int64_t V, double ref, double dn, const double *da, double *mx, double *nrm,
                      double *acc, float to_base2, int first) {
    if (first) {
        nrm[r] = dn;
        for (int64_t c = 0; c < V; c++) acc[r * V + c] = da[c];
        mx[r] = ref;
        return;
    }
    double newmax = fmax(mx[r], ref);
    double old_scale = exp2((mx[r] - newmax) * to_base2), new_scale = exp2((ref - newmax) * to_base2);
    nrm[r] = nrm[r] * old_scale + dn * new_scale;
    for (int64_t c = 0; c < V; c++) acc[r * V + c] = acc[r * V + c] * old_scale + da[c] * new_scale;
    mx[r] = newmax;
}

int online_softmax_max_values(void) { return MAX_VALUES; }

/* returns 0; -1 when a row buffer could not be allocated (the state is then undefined: the caller
 * raises MemoryError); -2 for V or digits out of range */
int online_softmax_update(int64_t G, int64_t B, int64_t K,
                          const int32_t *sums, int64_t sg, int64_t sj, int64_t ls, int digits, const float *coef,
                          const float *quad, int64_t ldq, const float *logits, int64_t ldl,
                          const float *val, int64_t svg, int64_t svc, int64_t V,
                          double *mx, double *nrm, double *acc, float to_base2, float floor_log2, int first,
                          int threads) {
    int failed = 0;
    if (V < 1 || V > MAX_VALUES || digits < 0 || digits > 5) return -2;
    #pragma omp parallel num_threads(threads) reduction(|:failed)
    {
        float *buf = (float *)malloc((size_t)(K > 0 ? K : 1) * sizeof(float));
        if (!buf) failed = 1;
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < G * B; r++) {
            if (!buf) continue;
            int64_t g = r / B, b = r % B;
            float m = row_logits(buf, K, g, b, r, sums, sg, sj, ls, digits, coef, quad, ldq, logits, ldl);
            /* the chunk's weights are relative to shift, a float: the merge below uses exactly it */
            float shift = (float)(first ? (double)m : fmax(mx[r], (double)m));
            double dn = 0.0, da[MAX_VALUES];
            for (int64_t c = 0; c < V; c++) da[c] = 0.0;
            for (int64_t k0 = 0; k0 < K; k0 += SUM_BLOCK) {
                int64_t k1 = k0 + SUM_BLOCK < K ? k0 + SUM_BLOCK : K;
                float sn = 0.0f;
                if (V == 1) {  /* one value per row (pca_locality): weights never leave registers */
                    const float *restrict v = val + g * svg;
                    float sa = 0.0f;
                    #pragma omp simd reduction(+:sn, sa)
                    for (int64_t k = k0; k < k1; k++) {
                        float x = (buf[k] - shift) * to_base2;
                        float w = exp2_nonpositive(x < -floor_log2 ? -floor_log2 : x);
                        sn += w;
                        sa += w * v[k];
                    }
                    dn += sn;
                    da[0] += sa;
                    continue;
                }
                dn += weights_in_place(buf, k0, k1, shift, to_base2, floor_log2);
                for (int64_t c = 0; c < V; c++) {
                    const float *restrict v = val + g * svg + c * svc;
                    float sa = 0.0f;
                    #pragma omp simd reduction(+:sa)
                    for (int64_t k = k0; k < k1; k++) sa += buf[k] * v[k];
                    da[c] += sa;
                }
            }
            merge_row(r, V, (double)shift, dn, da, mx, nrm, acc, to_base2, first);
        }
        free(buf);
    }
    return failed ? -1 : 0;
}

/* The weights alone, for rows whose values are too many for the sums above (V > MAX_VALUES:
 * pspc's rectangles): float32 logits l[r*ldl + k] are overwritten with their weights
 * 2^((l - shift)*to_base2) (at least 2^-floor_log2), shift the new running maximum (a float, as in
 * online_softmax_update); the normaliser and maximum are updated, and rescale[r] is the factor
 * 2^((old max - shift)*to_base2) by which the caller multiplies its weighted sums before adding
 * the chunk's (weights @ values, summed over the same blocks of SUM_BLOCK); 0 on the first chunk. */
int softmax_weights_update(int64_t R, int64_t K, float *logits, int64_t ldl, double *mx, double *nrm,
                           double *rescale, float to_base2, float floor_log2, int first, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < R; r++) {
        float *restrict l = logits + r * ldl;
        float m = -INFINITY;
        #pragma omp simd reduction(max:m)
        for (int64_t k = 0; k < K; k++) m = l[k] > m ? l[k] : m;
        float shift = (float)(first ? (double)m : fmax(mx[r], (double)m));
        double dn = 0.0;
        for (int64_t k0 = 0; k0 < K; k0 += SUM_BLOCK) {
            int64_t k1 = k0 + SUM_BLOCK < K ? k0 + SUM_BLOCK : K;
            dn += weights_in_place(l, k0, k1, shift, to_base2, floor_log2);
        }
        if (first) {
            rescale[r] = 0.0;
            nrm[r] = dn;
        } else {
            rescale[r] = exp2((mx[r] - (double)shift) * to_base2);
            nrm[r] = nrm[r] * rescale[r] + dn;
        }
        mx[r] = (double)shift;
    }
    return 0;
}

/* Softmax averages over logits of direct differences, in float64 (no cancellation: the
 * low-noise steps, where 1/(2(1-abar)) reaches 5000):
 *   l[k] = -scale * sum_i (x[g*sxg + b*sxb + i] - a*y[i*ldy + k])^2
 * over the inputs i of group g: indices[indptr[g] .. indptr[g+1]) (pca_locality's sparse step,
 * the CSR of M^T), or every i < ndim when indptr is NULL (els' windows of ndim values). Values
 * val[g*svg + c*svc + k] (float64), c < V. The weights are 2^((l - max)*to_base2): the difference
 * is taken in float64, then rounded to float32 for the exp2 polynomial (relative error below
 * 87 * 2^-24 + 2e-7 < 6e-6 of a weight; its effect on the average is below that times max|y|).
 * bias (NULL or float64 [>= K]) is added to each candidate's logit: log2 of how many identical
 * windows one candidate stands for (els' merged duplicates). State as for online_softmax_update. */
int direct_softmax_update(int64_t G, int64_t B, int64_t K, const double *x, int64_t sxg, int64_t sxb,
                          const double *y, int64_t ldy, const int64_t *indptr, const int64_t *indices,
                          int64_t ndim, double a, double scale, const double *bias, const double *val,
                          int64_t svg, int64_t svc,
                          int64_t V, double *mx, double *nrm, double *acc, float to_base2, float floor_log2,
                          int first, int threads) {
    int failed = 0;
    if (V < 1 || V > MAX_VALUES) return -2;
    #pragma omp parallel num_threads(threads) reduction(|:failed)
    {
        double *buf = (double *)malloc((size_t)(K > 0 ? K : 1) * sizeof(double));
        if (!buf) failed = 1;
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < G * B; r++) {
            if (!buf) continue;
            int64_t g = r / B, b = r % B;
            const double *xr = x + g * sxg + b * sxb;
            int64_t j0 = indptr ? indptr[g] : 0, j1 = indptr ? indptr[g + 1] : ndim;
            /* four inputs per pass over buf (a candidate's partial sum stays in a register
             * across them), then the rest one by one */
            int64_t j = j0;
            for (int64_t k = 0; k < K; k++) buf[k] = 0.0;
            for (; j + 4 <= j1; j += 4) {
                int64_t i0 = indptr ? indices[j] : j, i1 = indptr ? indices[j + 1] : j + 1;
                int64_t i2 = indptr ? indices[j + 2] : j + 2, i3 = indptr ? indices[j + 3] : j + 3;
                const double *restrict y0 = y + i0 * ldy, *restrict y1 = y + i1 * ldy;
                const double *restrict y2 = y + i2 * ldy, *restrict y3 = y + i3 * ldy;
                double x0 = xr[i0], x1 = xr[i1], x2 = xr[i2], x3 = xr[i3];
                #pragma omp simd
                for (int64_t k = 0; k < K; k++) {
                    double d0 = x0 - a * y0[k], d1 = x1 - a * y1[k], d2 = x2 - a * y2[k], d3 = x3 - a * y3[k];
                    buf[k] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
                }
            }
            for (; j < j1; j++) {
                int64_t i = indptr ? indices[j] : j;
                const double *restrict yi = y + i * ldy;
                double xi = xr[i];
                #pragma omp simd
                for (int64_t k = 0; k < K; k++) {
                    double d = xi - a * yi[k];
                    buf[k] += d * d;
                }
            }
            double m = -INFINITY;
            if (bias) {
                const double *restrict bk = bias;
                #pragma omp simd reduction(max:m)
                for (int64_t k = 0; k < K; k++) {
                    buf[k] = bk[k] - scale * buf[k];
                    m = buf[k] > m ? buf[k] : m;
                }
            } else {
                #pragma omp simd reduction(max:m)
                for (int64_t k = 0; k < K; k++) {
                    buf[k] *= -scale;
                    m = buf[k] > m ? buf[k] : m;
                }
            }
            double ref = first ? m : fmax(mx[r], m);
            double dn = 0.0, da[MAX_VALUES];
            for (int64_t c = 0; c < V; c++) da[c] = 0.0;
            float w[SUM_BLOCK];
            for (int64_t k0 = 0; k0 < K; k0 += SUM_BLOCK) {
                int64_t n = (k0 + SUM_BLOCK < K ? k0 + SUM_BLOCK : K) - k0;
                float sn = 0.0f;
                if (V == 1) {  /* one value per row: weights never leave registers */
                    const double *restrict v = val + g * svg + k0;
                    float sa = 0.0f;
                    #pragma omp simd reduction(+:sn, sa)
                    for (int64_t k = 0; k < n; k++) {
                        float xk = (float)(buf[k0 + k] - ref) * to_base2;
                        float wk = exp2_nonpositive(xk < -floor_log2 ? -floor_log2 : xk);
                        sn += wk;
                        sa += wk * (float)v[k];
                    }
                    dn += sn;
                    da[0] += sa;
                    continue;
                }
                #pragma omp simd reduction(+:sn)
                for (int64_t k = 0; k < n; k++) {
                    float xk = (float)(buf[k0 + k] - ref) * to_base2;
                    w[k] = exp2_nonpositive(xk < -floor_log2 ? -floor_log2 : xk);
                    sn += w[k];
                }
                dn += sn;
                for (int64_t c = 0; c < V; c++) {
                    const double *restrict v = val + g * svg + c * svc + k0;
                    float sa = 0.0f;
                    #pragma omp simd reduction(+:sa)
                    for (int64_t k = 0; k < n; k++) sa += w[k] * (float)v[k];
                    da[c] += sa;
                }
            }
            merge_row(r, V, ref, dn, da, mx, nrm, acc, to_base2, first);
        }
        free(buf);
    }
    return failed ? -1 : 0;
}

/* pspc's step (SPEC: windows of ph x pw anchored at (r, c), 0 <= r <= H-ph, 0 <= c <= W-pw; for
 * window R, m_R = sum_k w_k(R) y_k[R], w = softmax_k(-|x[R] - a y_k[R]|^2 / (2 s^2)); x0[i, j] =
 * the mean of m_R[i, j] over the windows R containing (i, j)), by box sums instead of GEMMs:
 *   D_k(R) = box sum over R of d_k[i, j] = sum_c (x[c, i, j] - a y_k[c, i, j])^2   (float64 direct
 *            differences: no cancellation at the low-noise steps),
 *   x0[c, i, j] = (1 / count(i, j)) sum_k y_k[c, i, j] sum_{R containing (i, j)} w_k(R),
 * the inner sum a box sum of the normalised weights over the anchors. Two passes over the
 * images per sample: the first keeps each window's running maximum and normaliser, the second
 * sums the normalised weights. O(C*H*W) work per image and sample, against the GEMMs' p^2 per
 * window. Images are taken in blocks of LANES, transposed so that every loop runs over them
 * (vectorised); samples run in parallel. logit = -scale2 * D (scale2 = log2(e) / (2 s^2): base 2);
 * weights 2^(l - max), at least 2^-floor_log2, as in the kernels above. Returns 0, -1 without
 * memory, -2 for bad sizes. */
#define LANES 32

/* Sliding sums of p consecutive vectors of LANES, the one loop of every box sum below:
 * out[o*os] = scale * (sum of in[i*is] over i in [o + first - p + 1, o + first], clipped to
 * [0, n)), o < n_out. first = p - 1: the n - p + 1 sums of p neighbours (distances of windows);
 * first = 0: the n + p - 1 sums spreading each input over the p outputs from it on (weights of
 * the windows covering a pixel). Strides in doubles. */
static inline void window_sums(const double *in, int64_t is, int64_t n, int64_t p, double *out, int64_t os,
                        int64_t first, int64_t n_out, double scale) {
    double s[LANES];
    for (int64_t kk = 0; kk < LANES; kk++) s[kk] = 0.0;
    for (int64_t i = 0; i < first && i < n; i++) {
        const double *restrict v = in + i * is;
        #pragma omp simd
        for (int64_t kk = 0; kk < LANES; kk++) s[kk] += v[kk];
    }
    /* o gains in[o + first] while o < n - first and loses in[o + first - p] from o = p - first:
     * three runs of o, each without a branch (gains only; both, or neither when p > n; losses) */
    int64_t gain_end = n - first, loss_start = p - first;
    int64_t b1 = gain_end < loss_start ? gain_end : loss_start, b2 = gain_end < loss_start ? loss_start : gain_end;
    b1 = b1 < 0 ? 0 : (b1 > n_out ? n_out : b1);
    b2 = b2 < b1 ? b1 : (b2 > n_out ? n_out : b2);
    int both = gain_end > loss_start;
    int64_t o = 0;
    for (; o < b1; o++) {
        const double *restrict v = in + (o + first) * is;
        double *restrict w = out + o * os;
        #pragma omp simd
        for (int64_t kk = 0; kk < LANES; kk++) { s[kk] += v[kk]; w[kk] = scale * s[kk]; }
    }
    for (; o < b2; o++) {
        double *restrict w = out + o * os;
        if (both) {
            const double *restrict v = in + (o + first) * is, *restrict u = in + (o + first - p) * is;
            #pragma omp simd
            for (int64_t kk = 0; kk < LANES; kk++) s[kk] += v[kk] - u[kk];
        }
        #pragma omp simd
        for (int64_t kk = 0; kk < LANES; kk++) w[kk] = scale * s[kk];
    }
    for (; o < n_out; o++) {
        const double *restrict u = in + (o + first - p) * is;
        double *restrict w = out + o * os;
        #pragma omp simd
        for (int64_t kk = 0; kk < LANES; kk++) { s[kk] -= u[kk]; w[kk] = scale * s[kk]; }
    }
}

/* the row sums hs[i][c] = sum over j in [c, c + pw) of d[i][j], d[i][j] = sum_ch (x - a y)^2, for
 * every lane (image) of the block: one row of d at a time, in a buffer that stays in L1 */
static void box_row_sums(int64_t C, int64_t H, int64_t W, int64_t pw, const double *xb, const double *yt,
                         double a, double *drow, double *hs) {
    int64_t HW = H * W, nc = W - pw + 1;
    for (int64_t i = 0; i < H; i++) {
        for (int64_t j = 0; j < W; j++) {
            double *restrict dd = drow + j * LANES;
            #pragma omp simd
            for (int64_t kk = 0; kk < LANES; kk++) dd[kk] = 0.0;
            for (int64_t c = 0; c < C; c++) {
                const double *restrict yy = yt + (c * HW + i * W + j) * LANES;
                double xv = xb[c * HW + i * W + j];
                #pragma omp simd
                for (int64_t kk = 0; kk < LANES; kk++) { double e = xv - a * yy[kk]; dd[kk] += e * e; }
            }
        }
        window_sums(drow, LANES, W, pw, hs + i * nc * LANES, LANES, pw - 1, nc, 1.0);
    }
}

int pspc_box_step(int64_t B, int64_t C, int64_t H, int64_t W, int64_t N, const double *x, const float *y,
                  int64_t ph, int64_t pw, double a, double scale2, double *out, float floor_log2, int threads) {
    if (B < 1 || C < 1 || H < 1 || W < 1 || N < 1 || ph < 1 || pw < 1 || ph > H || pw > W) return -2;
    int64_t HW = H * W, CHW = C * HW, nr = H - ph + 1, nc = W - pw + 1, nw = nr * nc;
    /* shared: the block of images transposed (images last), and per sample the windows' running
     * maxima and normalisers and the weighted sums, lane by lane */
    double *yt = malloc(sizeof(double) * CHW * LANES), *mx = malloc(sizeof(double) * B * nw);
    double *z = malloc(sizeof(double) * B * nw), *acc = calloc((size_t)(B * CHW * LANES), sizeof(double));
    int failed = !yt || !mx || !z || !acc;
    if (!failed) for (int64_t q = 0; q < B * nw; q++) { mx[q] = -INFINITY; z[q] = 0.0; }
    #pragma omp parallel num_threads(threads) if (!failed)
    {
        /* per thread: one row of distances, the row sums (then the weights spread down the
         * columns), one column's logits (then weights) */
        double *drow = malloc(sizeof(double) * W * LANES), *hs = malloc(sizeof(double) * H * nc * LANES);
        double *l = malloc(sizeof(double) * nr * LANES);
        int mine = !drow || !hs || !l;
        if (mine) {
            #pragma omp atomic write
            failed = 1;
        }
        for (int pass = 0; pass < 2; pass++) {
            for (int64_t k0 = 0; k0 < N; k0 += LANES) {
                int64_t kb = N - k0 < LANES ? N - k0 : LANES;
                /* missing lanes repeat the last image; their weights are never used */
                #pragma omp for schedule(static)
                for (int64_t q = 0; q < CHW; q++)
                    for (int64_t kk = 0; kk < LANES; kk++) yt[q * LANES + kk] = (double)y[(k0 + (kk < kb ? kk : kb - 1)) * CHW + q];
                #pragma omp for schedule(static)
                for (int64_t b = 0; b < B; b++) {
                    if (mine) continue;
                    double *bmx = mx + b * nw, *bz = z + b * nw;
                    box_row_sums(C, H, W, pw, x + b * CHW, yt, a, drow, hs);
                    for (int64_t c = 0; c < nc; c++) {
                        /* column c's window logits l[r] = -scale2 * (sum of hs[i][c], i in [r, r + ph)) */
                        window_sums(hs + c * LANES, nc * LANES, H, ph, l, LANES, ph - 1, nr, -scale2);
                        for (int64_t r = 0; r < nr; r++) {
                            double *restrict lr = l + r * LANES;
                            int64_t w = r * nc + c;
                            if (pass == 0) {  /* the window's running maximum and normaliser */
                                double m = -INFINITY;
                                #pragma omp simd reduction(max:m)
                                for (int64_t kk = 0; kk < kb; kk++) m = lr[kk] > m ? lr[kk] : m;
                                if (m > bmx[w]) {
                                    if (bz[w] > 0.0) bz[w] *= exp2(bmx[w] - m);
                                    bmx[w] = m;
                                }
                                double ref = bmx[w];
                                float sn = 0.0f;
                                #pragma omp simd reduction(+:sn)
                                for (int64_t kk = 0; kk < kb; kk++) {
                                    float e = (float)(lr[kk] - ref);
                                    sn += exp2_nonpositive(e < -floor_log2 ? -floor_log2 : e);
                                }
                                bz[w] += sn;
                            } else {  /* its normalised weights */
                                double ref = bmx[w], inv = 1.0 / bz[w];
                                #pragma omp simd
                                for (int64_t kk = 0; kk < LANES; kk++) {
                                    float e = (float)(lr[kk] - ref);
                                    double wk = (double)exp2_nonpositive(e < -floor_log2 ? -floor_log2 : e) * inv;
                                    lr[kk] = kk < kb ? wk : 0.0;
                                }
                            }
                        }
                        if (pass == 0) continue;
                        /* the weights spread down column c: row i gets the anchors r in
                         * [i - ph + 1, i] (into hs, whose column c is read) */
                        window_sums(l, LANES, nr, ph, hs + c * LANES, nc * LANES, 0, H, 1.0);
                    }
                    if (pass == 0) continue;
                    /* along each row: column j gets the anchors c in [j - pw + 1, j] (the same
                     * sliding sums as window_sums, kept in registers: they go straight into the
                     * weighted values, lane by lane; a pass through a buffer cost 7 % here) */
                    double *bacc = acc + b * CHW * LANES;
                    for (int64_t i = 0; i < H; i++) {
                        double s[LANES];
                        for (int64_t kk = 0; kk < LANES; kk++) s[kk] = 0.0;
                        for (int64_t j = 0; j < W; j++) {
                            if (j < nc) {
                                const double *restrict in = hs + (i * nc + j) * LANES;
                                #pragma omp simd
                                for (int64_t kk = 0; kk < LANES; kk++) s[kk] += in[kk];
                            }
                            if (j - pw >= 0) {
                                const double *restrict o = hs + (i * nc + j - pw) * LANES;
                                #pragma omp simd
                                for (int64_t kk = 0; kk < LANES; kk++) s[kk] -= o[kk];
                            }
                            for (int64_t ch = 0; ch < C; ch++) {
                                const double *restrict yy = yt + (ch * HW + i * W + j) * LANES;
                                double *restrict aa = bacc + (ch * HW + i * W + j) * LANES;
                                #pragma omp simd
                                for (int64_t kk = 0; kk < LANES; kk++) aa[kk] += s[kk] * yy[kk];
                            }
                        }
                    }
                }
            }
        }
        free(drow); free(hs); free(l);
    }
    if (!failed) {
        for (int64_t b = 0; b < B; b++)
            for (int64_t i = 0; i < H; i++) {
                int64_t rows = (i < nr - 1 ? i : nr - 1) - (i - ph + 1 > 0 ? i - ph + 1 : 0) + 1;
                for (int64_t j = 0; j < W; j++) {
                    int64_t cols = (j < nc - 1 ? j : nc - 1) - (j - pw + 1 > 0 ? j - pw + 1 : 0) + 1;
                    for (int64_t c = 0; c < C; c++) {
                        const double *aa = acc + (b * CHW + c * HW + i * W + j) * LANES;
                        double sum = 0.0;
                        for (int64_t kk = 0; kk < LANES; kk++) sum += aa[kk];
                        out[(b * C + c) * HW + i * W + j] = sum / (double)(rows * cols);
                    }
                }
            }
    }
    free(yt); free(mx); free(z); free(acc);
    return failed ? -1 : 0;
}
