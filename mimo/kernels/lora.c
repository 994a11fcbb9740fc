/* Many LoRA adapters in one batch (mimo serve --adapter NAME=DIR ...): each row adds only its own adapter's
 * update, as punica's and S-LoRA's BGMV kernels do, instead of every row paying for every stacked adapter.
 *
 * The adapters are stacked along the rank (mimo/inference/lora.py): A [R, in] (each adapter's scaling folded in),
 * Bt [R, out] (B transposed, so that one rank slot's column of B is a contiguous row). Row i of x [n, in] uses
 * slots [off[i / per], off[i / per] + rank[i / per]) (per: rows per selection entry, e.g. a sequence's tokens;
 * rank 0: the base model, nothing added):
 *
 *     y[i] += Bt[slots].T @ (A[slots] @ x[i])           (rank x in, then rank x out multiply-adds)
 *
 * fp32 throughout; A's products by block.c's mimo_dot (lane-wise partial sums, vectorized without reassociating a
 * float sum: -ffp-contract=off, no -ffast-math). One row a chunk of gemv.c's thread pool. */
#include <stdint.h>

typedef void (*chunk_fn)(void *ctx, int64_t i);
void mimo_parallel_for(chunk_fn fn, void *ctx, int64_t n, int nth);  /* gemv.c */
float mimo_dot(const float *a, const float *b, int64_t n);              /* block.c */

#define MAX_RANK 1024

typedef struct {
    const float *x, *a, *bt;
    float *y;
    const int32_t *off, *rank;
    int64_t in, out, per;
} lora_job;

static void lora_row(void *ctx, int64_t i) {
    const lora_job *j = (const lora_job *)ctx;
    const int64_t e = i / j->per, off = j->off[e], r = j->rank[e];
    const float *x = j->x + i * j->in;
    float *y = j->y + i * j->out;
    float t[MAX_RANK];
    for (int64_t s = 0; s < r; s++) t[s] = mimo_dot(j->a + (off + s) * j->in, x, j->in);  /* A[slots] @ x */
    for (int64_t s = 0; s < r; s++) {                                                  /* y += t @ Bt[slots] */
        const float *b = j->bt + (off + s) * j->out, ts = t[s];
        for (int64_t o = 0; o < j->out; o++) y[o] += ts * b[o];
    }
}

/* y [n, out] += each row's own adapter's update of x [n, in]; returns -1 for a rank above MAX_RANK. */
int mimo_lora_add(const float *x, int64_t n, int64_t in, const float *a, const float *bt, int64_t out,
                  const int32_t *off, const int32_t *rank, int64_t per, float *y, int nth) {
    for (int64_t e = 0; e < (n + per - 1) / per; e++)
        if (rank[e] < 0 || rank[e] > MAX_RANK) return -1;
    lora_job j = {x, a, bt, y, off, rank, in, out, per};
    mimo_parallel_for(lora_row, &j, n, nth);
    return 0;
}
