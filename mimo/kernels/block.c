/* Decoder blocks for a few new tokens a row (decode, MTP's draft and verify steps) in one call: everything
 * between the products (norms, RoPE, the KV-cache writes, attention over the cache, SiLU, the residual adds)
 * runs here instead of as ~30 torch ops a block (at MiMo-7B's 36 blocks ~8 ms a step, 5-6% of an int4 step on
 * 2 cores), and the products are gemv.c's (mimo_gemv), so a step's weights are read exactly as before.
 * mimo/inference/block_kernel.py calls it; its torch twin is ModelRunner._block.
 *
 * Math (each line what ModelRunner._block computes; activations fp32 or bf16, rounded to bf16 where torch
 * rounds a bf16 tensor):
 *   h = rms_norm(x) * w_in                     bf16: w * bf16(x / rms(x)), as the model's RMSNorm
 *   q, k, v = h Wq + bq, h Wk + bk, h Wv + bv  (mimo_gemv)
 *   q, k = q cos + roll(q, D / 2) sin          sin with rotate_half's sign folded in (ModelRunner.sin)
 *   cache[slot, :, position] = k, v
 *   a = softmax(q k_s / sqrt(D) over cached s <= position) v_s, in fp32; query head h reads key/value head
 *       h / (Hq / Hkv)
 *   x = x + a Wo;  h = rms_norm(x) * w_post;  x = x + (silu(h Wgate) * h Wup) Wdown
 * Attention runs one chunk per (row, key/value head) on gemv.c's thread pool; the rest is a few microseconds
 * of work a block and stays on the calling thread. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#define BLOCK_AVX512 1  /* attention's dot products and weighted sums in 512-bit registers */
#endif

typedef void (*chunk_fn)(void *ctx, int64_t i);
void mimo_parallel_for(chunk_fn fn, void *ctx, int64_t n, int nth);                       /* gemv.c */
int mimo_gemv(int fmt, const void *w, int64_t n, int64_t k, const void *x, int xdt, int64_t m, void *y, int ydt,
              const void *bias, int bdt, int nth);                                        /* gemv.c */

enum { ACT_F32 = 0, ACT_BF16 = 1 };  /* gemv.c's DT_F32, DT_BF16 */
#define LANES 16                     /* partial sums a dot product keeps: vectorized without reassociation */

typedef struct { const void *w, *bias; int64_t n, k; int32_t fmt, bias_dt; } mimo_linear;  /* bias_dt -1: none */

typedef struct {
    mimo_linear q, k, v, o, gate, up, down;
    const void *input_norm, *post_norm;  /* [H], the activations' dtype */
    void *k_cache, *v_cache;             /* [slots, Hkv, capacity, D], the activations' dtype */
} mimo_block;

typedef struct {
    const int64_t *positions;  /* [b, T] */
    const int64_t *slots;      /* [b] cache slots; NULL: rows 0..b-1 use slots 0..b-1 */
    const void *cos, *sin;     /* [capacity, D] */
    int64_t rows, tokens, hidden, heads, kv_heads, head_dim, capacity, ffn;
    float eps;
    int32_t dt, nth;
} mimo_step;

static inline float bf16_f32(uint16_t h) { uint32_t w = (uint32_t)h << 16; float f; memcpy(&f, &w, 4); return f; }

static inline uint16_t f32_bf16(float f) {  /* round to nearest even, NaN stays NaN (torch's); branch-free */
    uint32_t w;
    memcpy(&w, &f, 4);
    const uint32_t rounded = (w + 0x7fffu + ((w >> 16) & 1u)) >> 16, nan = (w >> 16) | 0x40u;
    return (uint16_t)((w & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

/* The loops below are written so that -O3 vectorizes them: one dtype a loop, no calls, no reassociated sums. */

static void to_f32(const void *p, int dt, int64_t off, int64_t n, float *out) {
    if (dt == ACT_F32) { memcpy(out, (const float *)p + off, (size_t)n * 4); return; }
    const uint16_t *h = (const uint16_t *)p + off;
    for (int64_t i = 0; i < n; i++) out[i] = bf16_f32(h[i]);
}

static void from_f32(const float *v, int64_t n, int dt, void *p, int64_t off) {
    if (dt == ACT_F32) { memcpy((float *)p + off, v, (size_t)n * 4); return; }
    uint16_t *h = (uint16_t *)p + off;
    for (int64_t i = 0; i < n; i++) h[i] = f32_bf16(v[i]);
}

static void round_to(int dt, float *v, int64_t n) {  /* what storing in the activations' dtype keeps */
    if (dt == ACT_F32) return;
    for (int64_t i = 0; i < n; i++) v[i] = bf16_f32(f32_bf16(v[i]));
}

/* e^x within ~1 ulp for x in [-87, 88] (clamped there: silu and a softmax need nothing outside): Cephes' expf
 * polynomial, 2^n built from bits; round-to-nearest by the 1.5 * 2^23 trick so that it vectorizes. */
static inline float exp_f32(float x) {
    x = x < -87.0f ? -87.0f : x > 88.0f ? 88.0f : x;
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    const uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

/* a . b in fp32, LANES partial sums added as a tree (lora.c's products too) */
float mimo_dot(const float *a, const float *b, int64_t n) {
    float acc[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += a[i + l] * b[i + l];
    float s = 0.0f;
    for (; i < n; i++) s += a[i] * b[i];
    for (int w = LANES / 2; w > 0; w /= 2)  /* a tree, not a chain of LANES dependent adds */
        for (int l = 0; l < w; l++) acc[l] += acc[l + w];
    return s + acc[0];
}

/* out[row] = rms_norm(x[row]) * w for m rows of n; f: 2n floats of scratch */
static void rms_norm(const void *x, const void *w, void *out, int64_t m, int64_t n, float eps, int dt, float *f) {
    float *xf = f, *wf = f + n;
    to_f32(w, dt, 0, n, wf);
    for (int64_t r = 0; r < m; r++) {
        to_f32(x, dt, r * n, n, xf);
        const float inv = 1.0f / sqrtf(mimo_dot(xf, xf, n) / (float)n + eps);
        for (int64_t i = 0; i < n; i++) xf[i] *= inv;
        round_to(dt, xf, n);  /* bf16: the model's RMSNorm scales the bf16 normalised values */
        for (int64_t i = 0; i < n; i++) xf[i] *= wf[i];
        from_f32(xf, n, dt, out, r * n);
    }
}

/* RoPE in place on `heads` vectors of D at x (one token, at position pos); f: 4D floats of scratch */
static void rope(void *x, int64_t heads, int64_t D, const void *cos, const void *sin, int64_t pos, int dt, float *f) {
    const int64_t half = D / 2;
    float *v = f, *c = f + D, *s = f + 2 * D, *y = f + 3 * D;
    to_f32(cos, dt, pos * D, D, c);
    to_f32(sin, dt, pos * D, D, s);
    for (int64_t h = 0; h < heads; h++) {
        to_f32(x, dt, h * D, D, v);
        for (int64_t i = 0; i < D; i++) y[i] = v[i] * c[i];
        round_to(dt, y, D);  /* torch: q * cos (rounded), then + roll(q) * sin */
        for (int64_t i = 0; i < half; i++) y[i] += v[i + half] * s[i];
        for (int64_t i = half; i < D; i++) y[i] += v[i - half] * s[i];
        from_f32(y, D, dt, x, h * D);
    }
}

#ifdef BLOCK_AVX512
/* 16 cached values from p + off (fp32 or bf16) as fp32, in a register: converting a row into a scratch buffer
 * and loading it back stalled every load on the store just before it */
static inline __m512 load16(const void *p, int dt, int64_t off) {
    if (dt == ACT_F32) return _mm512_loadu_ps((const float *)p + off);
    const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)p + off));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* a[0, 16 NV) += sum over kk < n of w[kk] v[kk], the value rows at vc + off, D apart: NV independent
 * accumulators, each value row read once, in order */
static inline __attribute__((always_inline)) void weighted_sum(float *a, const float *w, int64_t n, const void *vc,
                                                               int dt, int64_t off, int64_t D, const int NV) {
    __m512 r[8];
    for (int v = 0; v < NV; v++) r[v] = _mm512_loadu_ps(a + 16 * v);
    for (int64_t kk = 0; kk < n; kk++) {
        const __m512 wk = _mm512_set1_ps(w[kk]);
        for (int v = 0; v < NV; v++) r[v] = _mm512_fmadd_ps(wk, load16(vc, dt, off + kk * D + 16 * v), r[v]);
    }
    for (int v = 0; v < NV; v++) _mm512_storeu_ps(a + 16 * v, r[v]);
}
#endif

typedef struct { const mimo_block *blk; const mimo_step *s; const void *q; void *out; int failed; } attn_job;

static __thread float *attn_ws = NULL;
static __thread size_t attn_ws_size = 0;

#define KEY_BLOCK 32  /* value rows converted to fp32 at a time, for the weighted sums */

/* one (row, key/value head): its G query heads x T tokens over the row's cached positions */
static void attn_chunk(void *ctx, int64_t c) {
    attn_job *j = (attn_job *)ctx;
    const mimo_step *s = j->s;
    const int dt = s->dt;
    const int64_t D = s->head_dim, T = s->tokens, Hkv = s->kv_heads, G = s->heads / Hkv, cap = s->capacity;
    const int64_t r = c / Hkv, g = c % Hkv, slot = s->slots ? s->slots[r] : r;
    const int64_t *pos = s->positions + r * T;
    int64_t S = 0;
    for (int64_t t = 0; t < T; t++) if (pos[t] + 1 > S) S = pos[t] + 1;
    const int64_t nq = G * T;  /* query (head g * G + i, token t) is row i * T + t */
    const size_t need = (size_t)(2 * nq * D + nq * S + KEY_BLOCK * D + nq);
    if (need > attn_ws_size) {
        free(attn_ws);
        attn_ws = (float *)malloc(need * sizeof(float));
        attn_ws_size = attn_ws ? need : 0;
        if (!attn_ws) { j->failed = 1; return; }
    }
    float *qf = attn_ws, *acc = qf + nq * D, *p = acc + nq * D, *vb = p + nq * S;
    int32_t *seen = (int32_t *)(vb + KEY_BLOCK * D);  /* keys [0, seen[qi]) are visible to query qi */
    const float scale = 1.0f / sqrtf((float)D);
    for (int64_t t = 0; t < T; t++)
        for (int64_t i = 0; i < G; i++) {
            to_f32(j->q, dt, ((r * T + t) * s->heads + g * G + i) * D, D, qf + (i * T + t) * D);
            seen[i * T + t] = (int32_t)(pos[t] + 1);
        }
    const int64_t base = (slot * Hkv + g) * cap;
    const int64_t es = dt == ACT_F32 ? 4 : 2;  /* bytes a cached value */
    (void)es;
    for (int64_t k = 0; k < S; k++) {  /* scores */
#ifdef BLOCK_AVX512
        if (D % 16 == 0) {
            const void *kc = j->blk->k_cache;
            const int64_t row = (base + k) * D;
            const char *ahead = (const char *)j->blk->k_cache + (base + k + 8) * D * es;  /* 8 rows ahead */
            for (int64_t l = 0; l < D * es; l += 64) _mm_prefetch(ahead + l, _MM_HINT_T0);
            for (int64_t qi = 0; qi < nq; qi++) {
                if (k >= seen[qi]) continue;
                __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();  /* two chains */
                int64_t d = 0;
                for (; d + 32 <= D; d += 32) {
                    a = _mm512_fmadd_ps(load16(kc, dt, row + d), _mm512_loadu_ps(qf + qi * D + d), a);
                    b = _mm512_fmadd_ps(load16(kc, dt, row + d + 16), _mm512_loadu_ps(qf + qi * D + d + 16), b);
                }
                if (d < D) a = _mm512_fmadd_ps(load16(kc, dt, row + d), _mm512_loadu_ps(qf + qi * D + d), a);
                p[qi * S + k] = _mm512_reduce_add_ps(_mm512_add_ps(a, b)) * scale;
            }
            continue;
        }
#endif
        to_f32(j->blk->k_cache, dt, (base + k) * D, D, vb);
        for (int64_t qi = 0; qi < nq; qi++)
            if (k < seen[qi]) p[qi * S + k] = mimo_dot(qf + qi * D, vb, D) * scale;
    }
    for (int64_t qi = 0; qi < nq; qi++) {  /* softmax over the visible keys (position 0 always is) */
        float *pr = p + qi * S, mx[LANES], sum[LANES] = {0};
        const int64_t n = seen[qi], n16 = n - n % LANES;
        /* LANES partial maxima and sums, so that the loops vectorize (a sum or maximum carried through one
         * variable does not, without reassociation) */
        for (int l = 0; l < LANES; l++) mx[l] = pr[0];
        for (int64_t k = 0; k < n16; k += LANES)
            for (int l = 0; l < LANES; l++) mx[l] = pr[k + l] > mx[l] ? pr[k + l] : mx[l];
        for (int64_t k = n16; k < n; k++) mx[0] = pr[k] > mx[0] ? pr[k] : mx[0];
        for (int l = 1; l < LANES; l++) mx[0] = mx[l] > mx[0] ? mx[l] : mx[0];
        for (int64_t k = 0; k < n; k++) pr[k] = exp_f32(pr[k] - mx[0]);
        for (int64_t k = 0; k < n16; k += LANES)
            for (int l = 0; l < LANES; l++) sum[l] += pr[k + l];
        for (int64_t k = n16; k < n; k++) sum[0] += pr[k];
        for (int w = LANES / 2; w > 0; w /= 2)
            for (int l = 0; l < w; l++) sum[l] += sum[l + w];
        const float inv = 1.0f / sum[0];
        for (int64_t k = 0; k < n; k++) pr[k] *= inv;
    }
    memset(acc, 0, (size_t)(nq * D) * sizeof(float));
    const int64_t D16 = D - D % LANES;
    for (int64_t k0 = 0; k0 < S; k0 += KEY_BLOCK) {  /* weighted sums of the values, KEY_BLOCK rows at a time */
        const int64_t nk = S - k0 < KEY_BLOCK ? S - k0 : KEY_BLOCK;
#ifdef BLOCK_AVX512
        const char *ahead = (const char *)j->blk->v_cache + (base + k0 + KEY_BLOCK) * D * es;  /* the next block */
        for (int64_t l = 0; l < KEY_BLOCK * D * es; l += 64) _mm_prefetch(ahead + l, _MM_HINT_T0);
        const void *vc = j->blk->v_cache;
        const int64_t v0 = (base + k0) * D;
        const int in_registers = D % 16 == 0;  /* weighted_sum reads the cache itself */
#else
        const int in_registers = 0;
#endif
        if (!in_registers) to_f32(j->blk->v_cache, dt, (base + k0) * D, nk * D, vb);
        for (int64_t qi = 0; qi < nq; qi++) {
            const int64_t n = seen[qi] - k0 < nk ? seen[qi] - k0 : nk;
            const float *w = p + qi * S + k0;
            float *a = acc + qi * D;
#ifdef BLOCK_AVX512
            if (in_registers) {
                for (int64_t d0 = 0, nv; d0 < D; d0 += 16 * nv) {  /* 8, 4, 2 or 1 registers of 16 at a time */
                    nv = (D - d0) / 16 >= 8 ? 8 : (D - d0) / 16 >= 4 ? 4 : (D - d0) / 16 >= 2 ? 2 : 1;
                    if (nv == 8) weighted_sum(a + d0, w, n, vc, dt, v0 + d0, D, 8);
                    else if (nv == 4) weighted_sum(a + d0, w, n, vc, dt, v0 + d0, D, 4);
                    else if (nv == 2) weighted_sum(a + d0, w, n, vc, dt, v0 + d0, D, 2);
                    else weighted_sum(a + d0, w, n, vc, dt, v0 + d0, D, 1);
                }
                continue;
            }
#endif
            for (int64_t d0 = 0; d0 < D16; d0 += LANES) {
                float a16[LANES];
                for (int l = 0; l < LANES; l++) a16[l] = a[d0 + l];
                for (int64_t kk = 0; kk < n; kk++)
                    for (int l = 0; l < LANES; l++) a16[l] += w[kk] * vb[kk * D + d0 + l];
                for (int l = 0; l < LANES; l++) a[d0 + l] = a16[l];
            }
            for (int64_t d = D16; d < D; d++)
                for (int64_t kk = 0; kk < n; kk++) a[d] += w[kk] * vb[kk * D + d];
        }
    }
    for (int64_t t = 0; t < T; t++)
        for (int64_t i = 0; i < G; i++)
            from_f32(acc + (i * T + t) * D, D, dt, j->out, ((r * T + t) * s->heads + g * G + i) * D);
}

static __thread uint8_t *step_ws = NULL;
static __thread size_t step_ws_size = 0;

static int linear(const mimo_linear *l, const void *x, int64_t m, void *y, int dt, int nth) {
    return mimo_gemv(l->fmt, l->w, l->n, l->k, x, dt, m, y, dt, l->bias_dt < 0 ? NULL : l->bias, l->bias_dt, nth);
}

/* x += y, n values in the activations' dtype; f: 2 * chunk floats of scratch */
static void add_into(void *x, const void *y, int64_t n, int dt, float *f, int64_t chunk) {
    for (int64_t i0 = 0; i0 < n; i0 += chunk) {
        const int64_t c = n - i0 < chunk ? n - i0 : chunk;
        to_f32(x, dt, i0, c, f);
        to_f32(y, dt, i0, c, f + chunk);
        for (int64_t i = 0; i < c; i++) f[i] += f[chunk + i];
        from_f32(f, c, dt, x, i0);
    }
}

/* g = silu(g) * u, n values in the activations' dtype (bf16: silu rounded, then the product) */
static void silu_mul(void *g, const void *u, int64_t n, int dt, float *f, int64_t chunk) {
    for (int64_t i0 = 0; i0 < n; i0 += chunk) {
        const int64_t c = n - i0 < chunk ? n - i0 : chunk;
        float *gf = f, *uf = f + chunk;
        to_f32(g, dt, i0, c, gf);
        to_f32(u, dt, i0, c, uf);
        for (int64_t i = 0; i < c; i++) gf[i] = gf[i] / (1.0f + exp_f32(-gf[i]));
        round_to(dt, gf, c);
        for (int64_t i = 0; i < c; i++) gf[i] *= uf[i];
        from_f32(gf, c, dt, g, i0);
    }
}

static int block_step(const mimo_block *blk, const mimo_step *s, void *x) {
    const int dt = s->dt, nth = s->nth;
    const int64_t m = s->rows * s->tokens, H = s->hidden, D = s->head_dim, F = s->ffn;
    const int64_t qd = s->heads * D, kvd = s->kv_heads * D, es = dt == ACT_F32 ? 4 : 2;
    const int64_t chunk = 1024, nf = 2 * (H > chunk ? H : chunk) + 4 * D;  /* float scratch */
    const size_t need = (size_t)(m * (H + 2 * qd + 2 * kvd + 2 * F) * es) + (size_t)nf * 4 + 64;
    if (need > step_ws_size) {
        free(step_ws);
        step_ws = (uint8_t *)malloc(need);
        step_ws_size = step_ws ? need : 0;
        if (!step_ws) return -2;
    }
    uint8_t *h = step_ws, *q = h + m * H * es, *k = q + m * qd * es, *v = k + m * kvd * es, *a = v + m * kvd * es,
            *g = a + m * qd * es, *u = g + m * F * es;
    float *f = (float *)(((uintptr_t)(u + m * F * es) + 63) & ~(uintptr_t)63);
    int rc;
    rms_norm(x, blk->input_norm, h, m, H, s->eps, dt, f);
    if ((rc = linear(&blk->q, h, m, q, dt, nth)) || (rc = linear(&blk->k, h, m, k, dt, nth)) ||
        (rc = linear(&blk->v, h, m, v, dt, nth)))
        return rc;
    for (int64_t i = 0; i < m; i++) {
        const int64_t r = i / s->tokens, pos = s->positions[i], slot = s->slots ? s->slots[r] : r;
        rope(q + i * qd * es, s->heads, D, s->cos, s->sin, pos, dt, f);
        rope(k + i * kvd * es, s->kv_heads, D, s->cos, s->sin, pos, dt, f);
        for (int64_t hd = 0; hd < s->kv_heads; hd++) {
            const int64_t at = ((slot * s->kv_heads + hd) * s->capacity + pos) * D * es;
            memcpy((uint8_t *)blk->k_cache + at, k + (i * kvd + hd * D) * es, (size_t)(D * es));
            memcpy((uint8_t *)blk->v_cache + at, v + (i * kvd + hd * D) * es, (size_t)(D * es));
        }
    }
    attn_job job = {blk, s, q, a, 0};
    mimo_parallel_for(attn_chunk, &job, s->rows * s->kv_heads, nth);
    if (job.failed) return -2;
    if ((rc = linear(&blk->o, a, m, h, dt, nth))) return rc;
    add_into(x, h, m * H, dt, f, chunk);
    rms_norm(x, blk->post_norm, h, m, H, s->eps, dt, f);
    if ((rc = linear(&blk->gate, h, m, g, dt, nth)) || (rc = linear(&blk->up, h, m, u, dt, nth))) return rc;
    silu_mul(g, u, m * F, dt, f, chunk);
    if ((rc = linear(&blk->down, g, m, h, dt, nth))) return rc;
    add_into(x, h, m * H, dt, f, chunk);
    return 0;
}

/* x [b, T, H] (the residual stream, updated in place) through blocks[0..n); 0, or -1 for shapes it does not
 * take, -2 out of memory, or mimo_gemv's error */
int mimo_blocks_step(const mimo_block *blocks, int64_t n, const mimo_step *s, void *x) {
    if ((s->dt != ACT_F32 && s->dt != ACT_BF16) || s->head_dim % 2 || s->kv_heads < 1 || s->heads % s->kv_heads)
        return -1;
    for (int64_t i = 0; i < n; i++) {
        const int rc = block_step(blocks + i, s, x);
        if (rc) return rc;
    }
    return 0;
}
