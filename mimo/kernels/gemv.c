/* mimo's CPU kernels for weight-only quantized (GGML Q4_0 / Q8_0 blocks) and bf16 linears.
 *
 * Built on first use by mimo/kernels/__init__.py (cc -O3 -march=native -shared -fPIC -ffp-contract=off -pthread)
 * and called through ctypes (which drops the GIL).
 *
 * Threads: a small pool of its own (mimo_threads - 1 workers, started on first use; the caller is the other
 * thread). Work goes in chunks claimed from a shared counter, and the caller only ever waits for chunks some
 * thread has claimed: a worker that is not running (its core taken by another process) simply claims nothing,
 * so a busy machine degrades to the threads that do run instead of stalling on a barrier. Idle workers spin
 * briefly (yielding the core to anything else runnable on it), then sleep on a futex. OpenMP is not used: a
 * second OpenMP runtime would fight torch's, and torch's own team ends every region on a barrier that waits for
 * all its threads (with libgomp's long spin-waits, ~8 ms a call when two of them end up on one core).
 * Build with -DMIMO_OPENMP -fopenmp to run the same chunks on OpenMP instead (for comparison).
 *
 * Formats (exactly ggml's, ggml-common.h):
 *   Q8_0: blocks of 32 weights along the input dim: fp16 d, int8 qs[32]            (34 bytes), w = d * q
 *   Q4_0: blocks of 32: fp16 d, uint8 qs[16]; element j < 16 is the low nibble of qs[j], element j + 16 the high
 *         nibble                                                                   (18 bytes), w = d * (q - 8)
 * A weight [n, k] is n rows of k / 32 blocks, rows one after another (a GGUF tensor's bytes).
 *
 * Products (mimo_gemv): the activations x [m, k] (fp32, bf16 or fp16) are quantized once per call to int8 blocks
 * of 32 with one fp32 scale each (as llama.cpp's Q8_0 activations, with an fp32 rather than fp16 scale), then every
 * block is an integer dot product (AVX2 maddubs/madd) scaled by the two scales and accumulated in fp32. With AVX2,
 * tiles of 8 weight rows put the rows in the lanes: each block's 8 row sums come out of a transpose-and-add, so
 * the 8 rows' scales are converted, multiplied and accumulated as one vector. Each weight block is read from
 * memory once for all m rows (a tile is re-read from L1 for every activation row), and each tile prefetches the
 * next. bf16 weights multiply fp32 activations (bf16 -> fp32 by a shift and a mask).
 * The quantizers (mimo_quantize_*) reproduce ggml's quantize_row_q{4,8}_0_ref bit for bit (needs
 * -ffp-contract=off: x * id + 8.5f must not become an FMA).
 */
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef MIMO_OPENMP
#include <omp.h>
#else
#include <pthread.h>
#include <sched.h>
#include <time.h>
#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define MIMO_AVX2 1
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define MIMO_AVX512 1  /* the Q4_0 / Q8_0 tiles below in 512-bit integer dot products (vpdpbusd) */
#endif
#endif

#define QK 32
#define MIMO_ABI 4

#pragma pack(push, 1)
typedef struct { uint16_t d; uint8_t qs[QK / 2]; } block_q4_0;
typedef struct { uint16_t d; int8_t qs[QK]; } block_q8_0;
#pragma pack(pop)

/* FMT_Q4_0_X8: Q4_0 tiled by 8 rows (mimo_tile_q4_0): for each 8 rows and each block, the 8 rows' fp16 scales (16
 * bytes) then their 16 bytes of nibbles one row after another (128 bytes); the same 144 bytes as 8 GGML blocks,
 * and 8 rows take the same n * rb bytes, so a tile of rows r..r+7 starts at w + r * rb as in the row layout.
 * Used where the AVX-512 tiles are built (mimo_simd() == 2), for weights of a multiple of 8 rows. */
enum { FMT_Q8_0 = 0, FMT_Q4_0 = 1, FMT_BF16 = 2, FMT_Q4_0_X8 = 3 };
enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };

int mimo_abi_version(void) { return MIMO_ABI; }

int mimo_simd(void) {  /* 0: portable C, 1: AVX2, 2: AVX2 + AVX-512 VNNI tiles */
#ifdef MIMO_AVX512
    return 2;
#elif defined(MIMO_AVX2)
    return 1;
#else
    return 0;
#endif
}

int mimo_openmp(void) {
#ifdef MIMO_OPENMP
    return 1;
#else
    return 0;
#endif
}

/* ---- threads ---------------------------------------------------------------------------------------------
 * parallel_for(fn, ctx, n, nth): fn(ctx, i) for i in [0, n) on up to nth threads (the caller and nth - 1
 * workers). */

typedef void (*chunk_fn)(void *ctx, int64_t i);

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

#ifdef MIMO_OPENMP
static void parallel_for(chunk_fn fn, void *ctx, int64_t n, int nth) {
    if (nth > n) nth = (int)n;
#pragma omp parallel for num_threads(nth) schedule(dynamic, 1) if (nth > 1)
    for (int64_t i = 0; i < n; i++) fn(ctx, i);
}
int mimo_pool_workers(void) { return 0; }
void mimo_set_spin_us(int us) { (void)us; }
#else
#define MAX_WORKERS 255

static struct {
    pthread_mutex_t job_lock, start_lock;
    int nworkers;
    _Atomic uint32_t gen;      /* futex word: bumped for every job */
    _Atomic uint64_t next;     /* (gen << 32) | next chunk index */
    _Atomic int64_t done;      /* chunks finished in the current job */
    _Atomic int64_t n;         /* chunks in the current job */
    _Atomic int active;        /* workers that may take part (nth - 1) */
    _Atomic int sleepers;
    chunk_fn fn;
    void *ctx;
} pool = {.job_lock = PTHREAD_MUTEX_INITIALIZER, .start_lock = PTHREAD_MUTEX_INITIALIZER};

static int spin_us = 100;  /* how long an idle worker spins (yielding) before it sleeps */

void mimo_set_spin_us(int us) { spin_us = us < 0 ? 0 : us; }
int mimo_pool_workers(void) { return pool.nworkers; }

static inline uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static void futex_wait(_Atomic uint32_t *addr, uint32_t val) {
#ifdef __linux__
    syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAIT_PRIVATE, val, NULL, NULL, 0);
#else
    struct timespec t = {0, 50000};
    if (atomic_load(addr) == val) nanosleep(&t, NULL);
#endif
}

static void futex_wake_all(_Atomic uint32_t *addr) {
#ifdef __linux__
    syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAKE_PRIVATE, 0x7fffffff, NULL, NULL, 0);
#else
    (void)addr;
#endif
}

/* claim and run chunks of job g until none are left (or another job started) */
static void run_chunks(uint32_t g) {
    for (;;) {
        uint64_t v = atomic_load_explicit(&pool.next, memory_order_acquire);
        if ((uint32_t)(v >> 32) != g || (int64_t)(v & 0xffffffffu) >= atomic_load_explicit(&pool.n, memory_order_relaxed))
            return;
        if (!atomic_compare_exchange_weak_explicit(&pool.next, &v, v + 1, memory_order_acq_rel, memory_order_relaxed))
            continue;
        pool.fn(pool.ctx, (int64_t)(v & 0xffffffffu));  /* job g cannot finish before this chunk: fn, ctx are g's */
        atomic_fetch_add_explicit(&pool.done, 1, memory_order_release);
    }
}

static void *worker_main(void *arg) {
    const int id = (int)(intptr_t)arg;
    uint32_t seen = atomic_load(&pool.gen);
    for (;;) {
        uint32_t g = atomic_load_explicit(&pool.gen, memory_order_acquire);
        if (g == seen) {
            const uint64_t until = now_ns() + (uint64_t)spin_us * 1000u;
            for (;;) {
                for (int i = 0; i < 64 && (g = atomic_load_explicit(&pool.gen, memory_order_acquire)) == seen; i++)
                    cpu_relax();
                if (g != seen || now_ns() > until) break;
                sched_yield();  /* let anything else runnable on this core go first */
            }
            while (g == seen) {
                atomic_fetch_add(&pool.sleepers, 1);
                futex_wait(&pool.gen, seen);
                atomic_fetch_sub(&pool.sleepers, 1);
                g = atomic_load(&pool.gen);
            }
        }
        seen = g;
        if (id < atomic_load_explicit(&pool.active, memory_order_relaxed)) run_chunks(g);
    }
    return NULL;
}

static void start_workers(int want) {
    if (want > MAX_WORKERS) want = MAX_WORKERS;
    pthread_mutex_lock(&pool.start_lock);
    while (pool.nworkers < want) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&attr, 256 * 1024);
        const int ok = pthread_create(&t, &attr, worker_main, (void *)(intptr_t)pool.nworkers) == 0;
        pthread_attr_destroy(&attr);
        if (!ok) break;
        pool.nworkers++;
    }
    pthread_mutex_unlock(&pool.start_lock);
}

static void after_fork_child(void) {  /* the workers did not come along */
    pthread_mutex_init(&pool.job_lock, NULL);
    pthread_mutex_init(&pool.start_lock, NULL);
    pool.nworkers = 0;
}

static void parallel_for(chunk_fn fn, void *ctx, int64_t n, int nth) {
    static int atfork = 0;
    if (nth > n) nth = (int)n;
    if (nth <= 1 || pthread_mutex_trylock(&pool.job_lock) != 0) {  /* one thread, or the pool is busy */
        for (int64_t i = 0; i < n; i++) fn(ctx, i);
        return;
    }
    if (!atfork) { pthread_atfork(NULL, NULL, after_fork_child); atfork = 1; }
    if (pool.nworkers < nth - 1) start_workers(nth - 1);
    uint32_t g = atomic_load(&pool.gen) + 1;
    /* First retire the last job's claims: a worker late in run_chunks for it may have read its `next` (all of its
     * chunks claimed) and then read this job's larger `n`; its claim must fail, not run a chunk of this job with
     * the last job's index or count it in this job's `done` (which let a job end while a chunk still ran). */
    atomic_store(&pool.next, ((uint64_t)g << 32) | 0xffffffffu);
    pool.fn = fn;
    pool.ctx = ctx;
    atomic_store(&pool.n, n);
    atomic_store(&pool.done, 0);
    atomic_store(&pool.active, nth - 1);
    atomic_store(&pool.next, (uint64_t)g << 32);
    atomic_store(&pool.gen, g);
    if (atomic_load(&pool.sleepers) > 0) futex_wake_all(&pool.gen);
    run_chunks(g);
    for (int spins = 0; atomic_load_explicit(&pool.done, memory_order_acquire) < n; spins++) {
        cpu_relax();
        if ((spins & 255) == 255) sched_yield();  /* a claimed chunk's thread may need this core */
    }
    pthread_mutex_unlock(&pool.job_lock);
}
#endif

void mimo_parallel_for(chunk_fn fn, void *ctx, int64_t n, int nth) { parallel_for(fn, ctx, n, nth); }  /* lora.c */

/* ---- scalar conversions ------------------------------------------------------------------------------- */

static inline float f32_from_bits(uint32_t w) { float f; memcpy(&f, &w, 4); return f; }
static inline uint32_t f32_to_bits(float f) { uint32_t w; memcpy(&w, &f, 4); return w; }

static inline float fp16_to_fp32(uint16_t h) {
#ifdef __F16C__
    return _cvtsh_ss(h);
#else  /* ggml_compute_fp16_to_fp32 (the FP16 library's) */
    const uint32_t w = (uint32_t)h << 16, sign = w & 0x80000000u, two_w = w + w;
    const float normalized = f32_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = f32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
    return f32_from_bits(sign | (two_w < (1u << 27) ? f32_to_bits(denormalized) : f32_to_bits(normalized)));
#endif
}

static inline uint16_t fp32_to_fp16(float f) {  /* round to nearest even, as numpy's astype(float16) */
#ifdef __F16C__
    return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else  /* ggml_compute_fp32_to_fp16 */
    float base = (fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = f32_to_bits(f), shl1_w = w + w, sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = f32_from_bits((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = f32_to_bits(base);
    const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
#endif
}

static inline float bf16_to_fp32(uint16_t h) { return f32_from_bits((uint32_t)h << 16); }

static inline uint16_t fp32_to_bf16(float f) {  /* round to nearest even, NaN stays NaN (torch's) */
    uint32_t u = f32_to_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

/* ---- the reference quantizers (ggml-quants.c quantize_row_q{4,8}_0_ref), bit for bit ------------------- */

static void quantize_row_q8_0_ref(const float *x, block_q8_0 *y, int64_t k) {
    for (int64_t i = 0; i < k / QK; i++) {
        float amax = 0.0f;
        for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(x[i * QK + j]));
        const float d = amax / ((1 << 7) - 1);
        const float id = d ? 1.0f / d : 0.0f;
        y[i].d = fp32_to_fp16(d);
        for (int j = 0; j < QK; j++) y[i].qs[j] = (int8_t)roundf(x[i * QK + j] * id);
    }
}

static void quantize_row_q4_0_ref(const float *x, block_q4_0 *y, int64_t k) {
    for (int64_t i = 0; i < k / QK; i++) {
        float amax = 0.0f, max = 0.0f;
        for (int j = 0; j < QK; j++) {
            const float v = x[i * QK + j];
            if (amax < fabsf(v)) { amax = fabsf(v); max = v; }
        }
        const float d = max / -8;
        const float id = d ? 1.0f / d : 0.0f;
        y[i].d = fp32_to_fp16(d);
        for (int j = 0; j < QK / 2; j++) {
            const float x0 = x[i * QK + j] * id, x1 = x[i * QK + QK / 2 + j] * id;
            const int8_t a = (int8_t)(x0 + 8.5f), b = (int8_t)(x1 + 8.5f);
            const uint8_t xi0 = a < 15 ? a : 15, xi1 = b < 15 ? b : 15;
            y[i].qs[j] = xi0 | (uint8_t)(xi1 << 4);
        }
    }
}

typedef struct { int fmt; const float *x; uint8_t *y; int64_t rows, k, row_bytes, per; } quant_job;

static void quantize_chunk(void *ctx, int64_t c) {
    const quant_job *j = (const quant_job *)ctx;
    for (int64_t r = c * j->per; r < (c + 1) * j->per && r < j->rows; r++) {
        if (j->fmt == FMT_Q8_0)
            quantize_row_q8_0_ref(j->x + r * j->k, (block_q8_0 *)(j->y + r * j->row_bytes), j->k);
        else
            quantize_row_q4_0_ref(j->x + r * j->k, (block_q4_0 *)(j->y + r * j->row_bytes), j->k);
    }
}

/* x [rows, k] fp32 -> blocks [rows, k / 32] */
void mimo_quantize(int fmt, const float *x, void *y, int64_t rows, int64_t k, int nth) {
    quant_job j = {fmt, x, (uint8_t *)y, rows, k,
                   (k / QK) * (fmt == FMT_Q8_0 ? (int64_t)sizeof(block_q8_0) : (int64_t)sizeof(block_q4_0)), 0};
    j.per = (1 << 16) / (k > 0 ? k : 1) + 1;
    parallel_for(quantize_chunk, &j, (rows + j.per - 1) / j.per, nth);
}

/* ---- dequantization: weight rows [r0, r1) -> y [(r1 - r0), k] in fp32 ---------------------------------- */

static void dequantize_row(int fmt, const uint8_t *w, float *y, int64_t k) {
    const int64_t nb = k / QK;
    if (fmt == FMT_BF16) {
        const uint16_t *h = (const uint16_t *)w;
        int64_t j = 0;
#ifdef MIMO_AVX2
        for (; j + 8 <= k; j += 8) {
            __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(h + j)));
            _mm256_storeu_ps(y + j, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
        }
#endif
        for (; j < k; j++) y[j] = bf16_to_fp32(h[j]);
    } else if (fmt == FMT_Q8_0) {
        const block_q8_0 *b = (const block_q8_0 *)w;
        for (int64_t i = 0; i < nb; i++) {
            const float d = fp16_to_fp32(b[i].d);
#ifdef MIMO_AVX2
            const __m256 vd = _mm256_set1_ps(d);
            for (int j = 0; j < QK; j += 8) {
                __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(b[i].qs + j)));
                _mm256_storeu_ps(y + i * QK + j, _mm256_mul_ps(vd, _mm256_cvtepi32_ps(q)));
            }
#else
            for (int j = 0; j < QK; j++) y[i * QK + j] = d * b[i].qs[j];
#endif
        }
    } else {
        const block_q4_0 *b = (const block_q4_0 *)w;
        for (int64_t i = 0; i < nb; i++) {
            const float d = fp16_to_fp32(b[i].d);
#ifdef MIMO_AVX2
            const __m256 vd = _mm256_set1_ps(d);
            const __m128i t = _mm_loadu_si128((const __m128i *)b[i].qs), m4 = _mm_set1_epi8(0x0F), e8 = _mm_set1_epi8(8);
            const __m128i lo = _mm_sub_epi8(_mm_and_si128(t, m4), e8);
            const __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(t, 4), m4), e8);
            _mm256_storeu_ps(y + i * QK + 0, _mm256_mul_ps(vd, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo))));
            _mm256_storeu_ps(y + i * QK + 8, _mm256_mul_ps(vd, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)))));
            _mm256_storeu_ps(y + i * QK + 16, _mm256_mul_ps(vd, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi))));
            _mm256_storeu_ps(y + i * QK + 24, _mm256_mul_ps(vd, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)))));
#else
            for (int j = 0; j < QK / 2; j++) {
                y[i * QK + j] = d * ((b[i].qs[j] & 0x0F) - 8);
                y[i * QK + QK / 2 + j] = d * ((b[i].qs[j] >> 4) - 8);
            }
#endif
        }
    }
}

static int64_t row_bytes_of(int fmt, int64_t k) {
    if (fmt == FMT_BF16) return 2 * k;
    return (k / QK) * (fmt == FMT_Q8_0 ? (int64_t)sizeof(block_q8_0) : (int64_t)sizeof(block_q4_0));
}

/* blocks [b0, b1) of row r of a FMT_Q4_0_X8 weight of nb blocks a row, as GGML Q4_0 blocks at out */
static void untile_row(const uint8_t *w, int64_t r, int64_t nb, int64_t b0, int64_t b1, uint8_t *out) {
    const uint8_t *t = w + (r / 8) * nb * 144;
    const int i = (int)(r % 8);
    for (int64_t b = b0; b < b1; b++) {
        memcpy(out + (b - b0) * 18, t + b * 144 + 2 * i, 2);
        memcpy(out + (b - b0) * 18 + 2, t + b * 144 + 16 + 16 * i, 16);
    }
}

typedef struct { const uint8_t *src; uint8_t *dst; int64_t nb; int untile; } tile_job;

static void tile_chunk(void *ctx, int64_t c) {  /* rows [8c, 8c + 8) */
    const tile_job *j = (const tile_job *)ctx;
    const int64_t nb = j->nb, rb = nb * 18;
    for (int64_t r = 8 * c; r < 8 * c + 8; r++) {
        if (j->untile) { untile_row(j->src, r, nb, 0, nb, j->dst + r * rb); continue; }
        const uint8_t *row = j->src + r * rb;
        uint8_t *t = j->dst + (r / 8) * nb * 144;
        const int i = (int)(r % 8);
        for (int64_t b = 0; b < nb; b++) {
            memcpy(t + b * 144 + 2 * i, row + b * 18, 2);
            memcpy(t + b * 144 + 16 + 16 * i, row + b * 18 + 2, 16);
        }
    }
}

/* Q4_0 rows [n, k / 32 blocks] <-> FMT_Q4_0_X8 (n a multiple of 8; src and dst do not overlap), on nth threads */
void mimo_tile_q4_0(const void *src, void *dst, int64_t n, int64_t k, int untile, int nth) {
    tile_job j = {(const uint8_t *)src, (uint8_t *)dst, k / QK, untile};
    parallel_for(tile_chunk, &j, n / 8, nth);
}

typedef struct { int fmt; const uint8_t *w; float *y; int64_t r0, r1, k, rb, per; } dequant_job;

static void dequantize_chunk(void *ctx, int64_t c) {
    const dequant_job *j = (const dequant_job *)ctx;
    uint8_t row[(1 << 15) / QK * 18];  /* one untiled row (k <= 32768) */
    for (int64_t r = j->r0 + c * j->per; r < j->r0 + (c + 1) * j->per && r < j->r1; r++) {
        if (j->fmt == FMT_Q4_0_X8) {
            const int64_t nb = j->k / QK;
            for (int64_t b0 = 0; b0 < nb; b0 += (1 << 15) / QK) {  /* a long row in pieces of 32768 weights */
                const int64_t b1 = nb - b0 < (1 << 15) / QK ? nb : b0 + (1 << 15) / QK;
                untile_row(j->w, r, nb, b0, b1, row);
                dequantize_row(FMT_Q4_0, row, j->y + (r - j->r0) * j->k + b0 * QK, (b1 - b0) * QK);
            }
            continue;
        }
        dequantize_row(j->fmt, j->w + r * j->rb, j->y + (r - j->r0) * j->k, j->k);
    }
}

void mimo_dequantize(int fmt, const void *w, float *y, int64_t r0, int64_t r1, int64_t k, int nth) {
    dequant_job j = {fmt, (const uint8_t *)w, y, r0, r1, k, row_bytes_of(fmt, k), (1 << 15) / (k > 0 ? k : 1) + 1};
    parallel_for(dequantize_chunk, &j, (r1 - r0 + j.per - 1) / j.per, nth);
}

/* ---- activations ---------------------------------------------------------------------------------------
 * Quantized activation rows: qs [m][k] int8, d [m][nb] fp32 scale, s [m][nb] int32 = -8 * (sum of the block's qs),
 * Q4_0's offset: sum((q - 8) * a) = sum(q * a) - 8 * sum(a).
 * Scale: d = amax / 127, q = round-half-even(x * (127 / amax)), as llama.cpp's AVX2 quantize_row_q8_0. */

typedef struct { int8_t *qs; float *d; int32_t *s; int64_t k, nb; } qact;

static __thread void *ws_ptr = NULL;
static __thread size_t ws_size = 0;

static void *workspace(size_t bytes) {
    if (bytes > ws_size) {
        free(ws_ptr);
        ws_size = (bytes + 4095) & ~(size_t)4095;
        if (posix_memalign(&ws_ptr, 64, ws_size) != 0) { ws_ptr = NULL; ws_size = 0; }
    }
    return ws_ptr;
}

static inline void load_row_f32(const void *x, int xdt, int64_t k, float *tmp) {
    if (xdt == DT_F32) { memcpy(tmp, x, k * sizeof(float)); return; }
    if (xdt == DT_BF16) { dequantize_row(FMT_BF16, (const uint8_t *)x, tmp, k); return; }
    const uint16_t *h = (const uint16_t *)x;
    int64_t i = 0;
#ifdef MIMO_AVX2
    for (; i + 8 <= k; i += 8) _mm256_storeu_ps(tmp + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
#endif
    for (; i < k; i++) tmp[i] = fp16_to_fp32(h[i]);
}

static void quantize_act_row(const float *x, int8_t *qs, float *dd, int32_t *ss, int64_t k) {
    for (int64_t i = 0; i < k / QK; i++) {
        const float *v = x + i * QK;
#ifdef MIMO_AVX2
        const __m256 sign = _mm256_set1_ps(-0.0f);
        __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8), v2 = _mm256_loadu_ps(v + 16),
               v3 = _mm256_loadu_ps(v + 24);
        __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                                  _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
        __m128 m4 = _mm_max_ps(_mm256_extractf128_ps(mx, 1), _mm256_castps256_ps128(mx));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float amax = _mm_cvtss_f32(m4);
        const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
        const __m256 vid = _mm256_set1_ps(id);
        const int rnd = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v0, vid), rnd));
        __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v1, vid), rnd));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v2, vid), rnd));
        __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v3, vid), rnd));
        __m256i sum = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(qs + i * QK), p);
        dd[i] = amax / 127.0f;
        ss[i] = -8 * _mm_cvtsi128_si32(s4);
#else
        float amax = 0.0f;
        for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(v[j]));
        const float d = amax / 127.0f;
        const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
        int32_t sum = 0;
        for (int j = 0; j < QK; j++) {
            const int q = (int)nearbyintf(v[j] * id);
            qs[i * QK + j] = (int8_t)q;
            sum += q;
        }
        dd[i] = d;
        ss[i] = -8 * sum;
#endif
    }
}

/* ---- Q4_0 / Q8_0 tiles: R weight rows x M activation rows ------------------------------------------- */

#ifdef MIMO_AVX2
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __m256i unpack_q4(const uint8_t *qs) {
    const __m128i t = _mm_loadu_si128((const __m128i *)qs);
    const __m256i v = _mm256_inserti128_si256(_mm256_castsi128_si256(t), _mm_srli_epi16(t, 4), 1);
    return _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
}

#define TILE_FN(NAME, FMT, R, M)                                                                                 \
    static void NAME(const uint8_t *w, int64_t rb, const qact *a, int64_t m0, float *out /* [R][M] */) {         \
        __m256 acc[R][M];                                                                                        \
        for (int r = 0; r < R; r++)                                                                              \
            for (int j = 0; j < M; j++) acc[r][j] = _mm256_setzero_ps();                                         \
        const __m256i ones = _mm256_set1_epi16(1);                                                               \
        const int64_t nb = a->nb, k = a->k;                                                                      \
        for (int64_t b = 0; b < nb; b++) {                                                                       \
            __m256i wv[R];                                                                                       \
            float wd[R];                                                                                         \
            for (int r = 0; r < R; r++) {                                                                        \
                if (FMT == FMT_Q4_0) {                                                                           \
                    const block_q4_0 *blk = (const block_q4_0 *)(w + r * rb) + b;                                \
                    wv[r] = unpack_q4(blk->qs);                                                                  \
                    wd[r] = fp16_to_fp32(blk->d);                                                                \
                } else {                                                                                         \
                    const block_q8_0 *blk = (const block_q8_0 *)(w + r * rb) + b;                                \
                    wv[r] = _mm256_loadu_si256((const __m256i *)blk->qs);                                        \
                    wd[r] = fp16_to_fp32(blk->d);                                                                \
                }                                                                                                \
            }                                                                                                    \
            for (int j = 0; j < M; j++) {                                                                        \
                const __m256i av = _mm256_load_si256((const __m256i *)(a->qs + (m0 + j) * k + b * QK));          \
                const float ad = a->d[(m0 + j) * nb + b];                                                        \
                for (int r = 0; r < R; r++) {                                                                    \
                    __m256i s;                                                                                   \
                    if (FMT == FMT_Q4_0) {                                                                       \
                        s = _mm256_madd_epi16(_mm256_maddubs_epi16(wv[r], av), ones);                            \
                        s = _mm256_add_epi32(s, _mm256_set1_epi32(a->s[(m0 + j) * nb + b] / 8));                     \
                    } else {                                                                                     \
                        s = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(wv[r], wv[r]),               \
                                                                   _mm256_sign_epi8(av, wv[r])), ones);          \
                    }                                                                                            \
                    acc[r][j] = _mm256_fmadd_ps(_mm256_set1_ps(wd[r] * ad), _mm256_cvtepi32_ps(s), acc[r][j]);   \
                }                                                                                                \
            }                                                                                                    \
        }                                                                                                        \
        for (int r = 0; r < R; r++)                                                                              \
            for (int j = 0; j < M; j++) out[r * M + j] = hsum8(acc[r][j]);                                       \
    }
#else
#define TILE_FN(NAME, FMT, R, M)                                                                                 \
    static void NAME(const uint8_t *w, int64_t rb, const qact *a, int64_t m0, float *out) {                      \
        const int64_t nb = a->nb, k = a->k;                                                                      \
        for (int r = 0; r < R; r++)                                                                              \
            for (int j = 0; j < M; j++) {                                                                        \
                float acc = 0.0f;                                                                                \
                const int8_t *aq = a->qs + (m0 + j) * k;                                                         \
                for (int64_t b = 0; b < nb; b++) {                                                               \
                    int32_t s = 0;                                                                               \
                    float wd;                                                                                    \
                    if (FMT == FMT_Q4_0) {                                                                       \
                        const block_q4_0 *blk = (const block_q4_0 *)(w + r * rb) + b;                            \
                        for (int t = 0; t < QK / 2; t++)                                                         \
                            s += (blk->qs[t] & 0x0F) * aq[b * QK + t] + (blk->qs[t] >> 4) * aq[b * QK + QK / 2 + t]; \
                        s += a->s[(m0 + j) * nb + b];                                                        \
                        wd = fp16_to_fp32(blk->d);                                                               \
                    } else {                                                                                     \
                        const block_q8_0 *blk = (const block_q8_0 *)(w + r * rb) + b;                            \
                        for (int t = 0; t < QK; t++) s += blk->qs[t] * aq[b * QK + t];                           \
                        wd = fp16_to_fp32(blk->d);                                                               \
                    }                                                                                            \
                    acc += (wd * a->d[(m0 + j) * nb + b]) * (float)s;                                            \
                }                                                                                                \
                out[r * M + j] = acc;                                                                            \
            }                                                                                                    \
    }
#endif

TILE_FN(q4_r1m1, FMT_Q4_0, 1, 1)
TILE_FN(q4_r1m2, FMT_Q4_0, 1, 2)
TILE_FN(q4_r1m3, FMT_Q4_0, 1, 3)
TILE_FN(q4_r1m4, FMT_Q4_0, 1, 4)
TILE_FN(q8_r1m1, FMT_Q8_0, 1, 1)
TILE_FN(q8_r1m2, FMT_Q8_0, 1, 2)
TILE_FN(q8_r1m3, FMT_Q8_0, 1, 3)
TILE_FN(q8_r1m4, FMT_Q8_0, 1, 4)
#ifndef MIMO_AVX2  /* with AVX2 the 8-row tiles below take their place */
TILE_FN(q4_r4m1, FMT_Q4_0, 4, 1)
TILE_FN(q4_r2m2, FMT_Q4_0, 2, 2)
TILE_FN(q4_r2m3, FMT_Q4_0, 2, 3)
TILE_FN(q4_r2m4, FMT_Q4_0, 2, 4)
TILE_FN(q8_r4m1, FMT_Q8_0, 4, 1)
TILE_FN(q8_r2m2, FMT_Q8_0, 2, 2)
TILE_FN(q8_r2m3, FMT_Q8_0, 2, 3)
TILE_FN(q8_r2m4, FMT_Q8_0, 2, 4)
#endif

#ifdef MIMO_AVX2
/* 8 weight rows x M activation rows with the rows in the lanes: per block, each row's integer dot product is
 * summed to one int32 (a tree of hadds over the 8 rows), so the scales of 8 rows are converted, multiplied and
 * accumulated as one vector (the 8 fp16 scales gathered through integer registers), instead of per row. */
static inline __m256i sum8_epi32(__m256i s0, __m256i s1, __m256i s2, __m256i s3, __m256i s4, __m256i s5, __m256i s6,
                                 __m256i s7) {
    /* a transpose-and-add: lane r of the result (r < 8) is the sum of the 8 lanes of s_r */
    const __m256i t01 = _mm256_add_epi32(_mm256_unpacklo_epi32(s0, s1), _mm256_unpackhi_epi32(s0, s1));
    const __m256i t23 = _mm256_add_epi32(_mm256_unpacklo_epi32(s2, s3), _mm256_unpackhi_epi32(s2, s3));
    const __m256i t45 = _mm256_add_epi32(_mm256_unpacklo_epi32(s4, s5), _mm256_unpackhi_epi32(s4, s5));
    const __m256i t67 = _mm256_add_epi32(_mm256_unpacklo_epi32(s6, s7), _mm256_unpackhi_epi32(s6, s7));
    const __m256i a = _mm256_add_epi32(_mm256_unpacklo_epi64(t01, t23), _mm256_unpackhi_epi64(t01, t23));
    const __m256i b = _mm256_add_epi32(_mm256_unpacklo_epi64(t45, t67), _mm256_unpackhi_epi64(t45, t67));
    return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

static inline __m256 scales8(const uint8_t *w, int64_t rb, int64_t off, const int interleaved) {
    /* the 8 rows' fp16 scales, gathered in integer registers (cheap there) and converted at once; lanes in row
     * order 0..7, or 0 2 4 6 1 3 5 7 (interleaved) */
    uint64_t lo = 0, hi = 0;
    for (int r = 0; r < 4; r++) {
        uint16_t a, b;
        memcpy(&a, w + (interleaved ? 2 * r : r) * rb + off, 2);
        memcpy(&b, w + (interleaved ? 2 * r + 1 : r + 4) * rb + off, 2);
        lo |= (uint64_t)a << (16 * r);
        hi |= (uint64_t)b << (16 * r);
        __asm__("" : "+r"(lo), "+r"(hi));  /* keep gcc from vectorizing this into shuffles */
    }
    return _mm256_cvtph_ps(_mm_set_epi64x((long long)hi, (long long)lo));
}

/* Q4_0, two rows at once: [row r | row r + 1] in the two 128-bit halves, low and high nibbles against the
 * activation block's two halves broadcast to both (alo, ahi): 8 int16 partial sums per row, each of 4 products
 * (|sum| <= 4 * 15 * 127 = 7620) */
static inline __attribute__((always_inline)) __m256i dot_q4_pair(const uint8_t *q0, const uint8_t *q1, __m256i alo,
                                                                 __m256i ahi) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m256i v = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)q0)),
                                              _mm_loadu_si128((const __m128i *)q1), 1);
    return _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(v, m4), alo),
                            _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 4), m4), ahi));
}

/* four dot_q4_pair results [r0 | r1], [r2 | r3], [r4 | r5], [r6 | r7] -> int32 row sums [r0 r2 r4 r6 | r1 r3 r5 r7]:
 * two transpose-and-add steps in int16 (sums of up to 16 products, |.| <= 30480, still fit) keep each row's values
 * in adjacent int16 pairs, which one madd with ones sums into int32 */
static inline __attribute__((always_inline)) __m256i reduce_q4(__m256i p01, __m256i p23, __m256i p45, __m256i p67) {
    const __m256i u0 = _mm256_add_epi16(_mm256_unpacklo_epi32(p01, p23), _mm256_unpackhi_epi32(p01, p23));
    const __m256i u1 = _mm256_add_epi16(_mm256_unpacklo_epi32(p45, p67), _mm256_unpackhi_epi32(p45, p67));
    const __m256i v = _mm256_add_epi16(_mm256_unpacklo_epi64(u0, u1), _mm256_unpackhi_epi64(u0, u1));
    return _mm256_madd_epi16(v, _mm256_set1_epi16(1));
}

static inline __attribute__((always_inline)) __m256i dot8(const int fmt, const uint8_t *q, __m256i av) {
    /* one row's block (qs at q) against the activation block av: 8 int32 partial sums */
    const __m256i ones = _mm256_set1_epi16(1);
    if (fmt == FMT_Q4_0) {
        const __m256i w = _mm256_and_si256(_mm256_srlv_epi32(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)q)),
                                                             _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)),
                                           _mm256_set1_epi8(0x0F));
        return _mm256_madd_epi16(_mm256_maddubs_epi16(w, av), ones);
    }
    const __m256i w = _mm256_loadu_si256((const __m256i *)q);
    return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(av, w)), ones);
}

static inline __attribute__((always_inline)) __m256i pair4(__m256i s0, __m256i s1) {
    return _mm256_add_epi32(_mm256_unpacklo_epi32(s0, s1), _mm256_unpackhi_epi32(s0, s1));
}

static inline __attribute__((always_inline)) __m256i quad(__m256i t01, __m256i t23) {
    return _mm256_add_epi32(_mm256_unpacklo_epi64(t01, t23), _mm256_unpackhi_epi64(t01, t23));
}

/* 8 weight rows x activation row j: out[r * M] (r < 8). Rows are streamed one at a time and reduced as they come
 * (few live registers: with all 8 unpacked rows held for several activation rows gcc kept the loop-carried
 * accumulator on the stack, 3x slower); several activation rows each stream the 8 rows again (from L1). */
/* Prefetching: the 8 rows of a tile are one contiguous stretch of memory, the next tile's the next stretch; each
 * block step prefetches its share of the next tile (8 blocks' bytes). Rows of a few KB are too short for the
 * hardware's stream prefetchers to ramp up on 8 interleaved streams (Q4_0 rows of 4096 weights, 2.3 KB, read at
 * ~60% of the bandwidth without this). Into L2, not L1: the next tile (18-32 KB) beside the current one overflows
 * a 32 KB L1; on a 2-core Zen 4, T1 instead of T0 took decode products from 25-26 to 29-33 GB/s (Q4_0, bf16;
 * bench/gemv_bandwidth.py) and a 7B int4 decode from 4.5-5.5 to 5.6-6.0 tokens/s (MIMO_KERNEL_FLAGS="-O3
 * -march=native -DMIMO_PREFETCH_HINT=_MM_HINT_T0" builds the old hint). */
#ifndef MIMO_PREFETCH_HINT
#define MIMO_PREFETCH_HINT _MM_HINT_T1
#endif
static inline __attribute__((always_inline)) void prefetch_next(const uint8_t *next, int64_t bytes) {
    for (int64_t l = 0; l < bytes; l += 64) _mm_prefetch((const char *)next + l, MIMO_PREFETCH_HINT);
}

static inline __attribute__((always_inline)) void tile8(const int fmt, const uint8_t *w, int64_t rb, const qact *a,
                                                       int64_t j, float *out, int M, const int pf) {
    __m256 acc = _mm256_setzero_ps();
    const int64_t nb = a->nb, bs = fmt == FMT_Q4_0 ? 18 : 34;
    const int8_t *aq = a->qs + j * a->k;
    const float *ad = a->d + j * nb;
    const int32_t *as8 = a->s + j * nb;  /* -8 * sum(qs): Q4_0's offset */
    if (fmt == FMT_Q4_0) {
        for (int64_t b = 0; b < nb; b++) {
            const __m256i alo = _mm256_broadcastsi128_si256(_mm_load_si128((const __m128i *)(aq + b * QK)));
            const __m256i ahi = _mm256_broadcastsi128_si256(_mm_load_si128((const __m128i *)(aq + b * QK + 16)));
            const uint8_t *q = w + b * bs + 2;
            if (pf) prefetch_next(w + 8 * rb + b * 8 * 18, 8 * 18);
            const __m256i d01 = dot_q4_pair(q, q + rb, alo, ahi), d23 = dot_q4_pair(q + 2 * rb, q + 3 * rb, alo, ahi);
            const __m256i d45 = dot_q4_pair(q + 4 * rb, q + 5 * rb, alo, ahi);
            const __m256i d67 = dot_q4_pair(q + 6 * rb, q + 7 * rb, alo, ahi);
            /* [r0 r2 r4 r6 | r1 r3 r5 r7] */
            const __m256i t = _mm256_add_epi32(reduce_q4(d01, d23, d45, d67), _mm256_set1_epi32(as8[b]));
            const __m256 wd = scales8(w, rb, b * bs, 1);
            acc = _mm256_fmadd_ps(_mm256_mul_ps(wd, _mm256_set1_ps(ad[b])), _mm256_cvtepi32_ps(t), acc);
        }
        float tmp[8];
        _mm256_storeu_ps(tmp, acc);
        for (int r = 0; r < 4; r++) {
            out[2 * r * M] = tmp[r];
            out[(2 * r + 1) * M] = tmp[4 + r];
        }
        return;
    }
    for (int64_t b = 0; b < nb; b++) {
        const __m256i av = _mm256_load_si256((const __m256i *)(aq + b * QK));
        const uint8_t *q = w + b * bs + 2;
        if (pf) prefetch_next(w + 8 * rb + b * 8 * 34, 8 * 34);
        const __m256i t01 = pair4(dot8(fmt, q, av), dot8(fmt, q + rb, av));
        const __m256i t23 = pair4(dot8(fmt, q + 2 * rb, av), dot8(fmt, q + 3 * rb, av));
        const __m256i lo = quad(t01, t23);
        const __m256i t45 = pair4(dot8(fmt, q + 4 * rb, av), dot8(fmt, q + 5 * rb, av));
        const __m256i t67 = pair4(dot8(fmt, q + 6 * rb, av), dot8(fmt, q + 7 * rb, av));
        const __m256i hi = quad(t45, t67);
        __m256i t = _mm256_add_epi32(_mm256_permute2x128_si256(lo, hi, 0x20), _mm256_permute2x128_si256(lo, hi, 0x31));
        const __m256 wd = scales8(w, rb, b * bs, 0);
        acc = _mm256_fmadd_ps(_mm256_mul_ps(wd, _mm256_set1_ps(ad[b])), _mm256_cvtepi32_ps(t), acc);
    }
    float tmp[8];
    _mm256_storeu_ps(tmp, acc);
    for (int r = 0; r < 8; r++) out[r * M] = tmp[r];
}

/* Q4_0, 8 weight rows x M >= 2 activation rows (speculative decoding's verify step, small batches): each pair of
 * rows is loaded and unpacked once for all M rows, and reduced as in tile8 half by half (rows 0-3, then 4-7), so
 * few registers stay live. Streaming the rows again per activation row (tile8 M times) made a 2-row product 1.43x
 * a 1-row one on the 7B layer shapes, compute-bound, where the weights' bytes are the same. */
static inline __attribute__((always_inline)) void tile8_q4_shared(const uint8_t *w, int64_t rb, const qact *a,
                                                                  int64_t m0, float *out, const int M) {
    __m256 acc[4];
    for (int j = 0; j < M; j++) acc[j] = _mm256_setzero_ps();
    const int64_t nb = a->nb, k = a->k;
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *q = w + b * 18 + 2;
        prefetch_next(w + 8 * rb + b * 8 * 18, 8 * 18);
        __m256i u[2][4];  /* [rows 0-3 | rows 4-7][j]: int16 sums after the first transpose-and-add step */
        for (int h = 0; h < 2; h++) {
            __m256i p[2][4];  /* [pair][j]: dot_q4_pair's result */
            for (int t = 0; t < 2; t++) {
                const uint8_t *q0 = q + (4 * h + 2 * t) * rb;
                const __m256i v = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)q0)),
                                                          _mm_loadu_si128((const __m128i *)(q0 + rb)), 1);
                const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                for (int j = 0; j < M; j++) {
                    const int8_t *aq = a->qs + (m0 + j) * k + b * QK;
                    const __m256i alo = _mm256_broadcastsi128_si256(_mm_load_si128((const __m128i *)aq));
                    const __m256i ahi = _mm256_broadcastsi128_si256(_mm_load_si128((const __m128i *)(aq + 16)));
                    p[t][j] = _mm256_add_epi16(_mm256_maddubs_epi16(lo, alo), _mm256_maddubs_epi16(hi, ahi));
                }
            }
            for (int j = 0; j < M; j++)
                u[h][j] = _mm256_add_epi16(_mm256_unpacklo_epi32(p[0][j], p[1][j]), _mm256_unpackhi_epi32(p[0][j], p[1][j]));
        }
        const __m256 wd = scales8(w, rb, b * 18, 1);
        for (int j = 0; j < M; j++) {
            const __m256i v = _mm256_add_epi16(_mm256_unpacklo_epi64(u[0][j], u[1][j]), _mm256_unpackhi_epi64(u[0][j], u[1][j]));
            const __m256i t = _mm256_add_epi32(_mm256_madd_epi16(v, _mm256_set1_epi16(1)),
                                               _mm256_set1_epi32(a->s[(m0 + j) * nb + b]));
            acc[j] = _mm256_fmadd_ps(_mm256_mul_ps(wd, _mm256_set1_ps(a->d[(m0 + j) * nb + b])), _mm256_cvtepi32_ps(t),
                                     acc[j]);
        }
    }
    for (int j = 0; j < M; j++) {  /* lanes [r0 r2 r4 r6 | r1 r3 r5 r7] */
        float tmp[8];
        _mm256_storeu_ps(tmp, acc[j]);
        for (int r = 0; r < 4; r++) {
            out[2 * r * M + j] = tmp[r];
            out[(2 * r + 1) * M + j] = tmp[4 + r];
        }
    }
}

/* Q8_0, 8 weight rows x M >= 2 activation rows: each row's block is loaded and made absolute once for all M rows
 * (the sign trick moves the weight's sign onto the activation), then reduced pair by pair as in tile8. */
static inline __attribute__((always_inline)) void tile8_q8_shared(const uint8_t *w, int64_t rb, const qact *a,
                                                                  int64_t m0, float *out, const int M) {
    __m256 acc[4];
    for (int j = 0; j < M; j++) acc[j] = _mm256_setzero_ps();
    const int64_t nb = a->nb, k = a->k;
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *q = w + b * 34 + 2;
        prefetch_next(w + 8 * rb + b * 8 * 34, 8 * 34);
        __m256i half[2][4];  /* [rows 0-3 | rows 4-7][j]: quad()'s result */
        for (int h = 0; h < 2; h++) {
            __m256i pr[2][4];  /* [row pair][j]: pair4()'s result */
            for (int t = 0; t < 2; t++) {
                const __m256i w0 = _mm256_loadu_si256((const __m256i *)(q + (4 * h + 2 * t) * rb));
                const __m256i w1 = _mm256_loadu_si256((const __m256i *)(q + (4 * h + 2 * t + 1) * rb));
                const __m256i a0 = _mm256_sign_epi8(w0, w0), a1 = _mm256_sign_epi8(w1, w1);
                for (int j = 0; j < M; j++) {
                    const __m256i av = _mm256_load_si256((const __m256i *)(a->qs + (m0 + j) * k + b * QK));
                    pr[t][j] = pair4(_mm256_madd_epi16(_mm256_maddubs_epi16(a0, _mm256_sign_epi8(av, w0)), ones),
                                     _mm256_madd_epi16(_mm256_maddubs_epi16(a1, _mm256_sign_epi8(av, w1)), ones));
                }
            }
            for (int j = 0; j < M; j++) half[h][j] = quad(pr[0][j], pr[1][j]);
        }
        const __m256 wd = scales8(w, rb, b * 34, 0);
        for (int j = 0; j < M; j++) {
            const __m256i lo = half[0][j], hi = half[1][j];
            const __m256i t = _mm256_add_epi32(_mm256_permute2x128_si256(lo, hi, 0x20),
                                               _mm256_permute2x128_si256(lo, hi, 0x31));
            acc[j] = _mm256_fmadd_ps(_mm256_mul_ps(wd, _mm256_set1_ps(a->d[(m0 + j) * nb + b])), _mm256_cvtepi32_ps(t),
                                     acc[j]);
        }
    }
    for (int j = 0; j < M; j++) {
        float tmp[8];
        _mm256_storeu_ps(tmp, acc[j]);
        for (int r = 0; r < 8; r++) out[r * M + j] = tmp[r];
    }
}

#ifdef MIMO_AVX512
/* ---- AVX-512 VNNI: 8 weight rows x M activation rows, 512-bit integer dot products --------------------------
 * Each zmm holds whole blocks of several rows (Q4_0: 4 rows x 16 bytes, Q8_0: 2 rows x 32 bytes) against the
 * activation block broadcast to every row's lanes; vpdpbusd (u8 x s8, four products summed into each int32 lane)
 * replaces AVX2's maddubs + madd, and each lane keeps its own fp32 sum across blocks (the block's scales spread to
 * the row's lanes), so a tile's rows are reduced once, at the end, not once a block (the 8 fp16 scales as in the
 * AVX2 tiles: a gather instruction made the tiles 2x slower on Zen 4). Q4_0's nibbles are u8 already (the -8
 * offset: the activation sums, as in the AVX2 tiles); Q8_0's weights are made u8 by flipping the sign bit (w +
 * 128), and 128 x sum(a) taken off the same way. Measured on a 2-core Zen 4 (bench/gemv_bandwidth.py;
 * MIMO_KERNEL_FLAGS="-O3 -march=native -mno-avx512f" for the AVX2 tiles): Q8_0 decode products 19.2-21.0 ->
 * 21.2-24.7 GB/s from memory, a 2-row Q8_0 product (the MTP verify step) 1.35x faster from cache; Q4_0 the same as
 * AVX2. Q4_0 in GGML's rows was then bound by its own instructions, not by memory: from cache one core read 18-20
 * GB/s of Q4_0 (as many weights a second as Q8_0's 35 GB/s), about what 2 cores read from memory; tiled by 8 rows
 * (FMT_Q4_0_X8) the same core reads 30-35 GB/s. */

static inline __attribute__((always_inline)) __m512i load_rows_x4(const uint8_t *q, int64_t rb) {
    /* 16 bytes of each of rows 0..3 (q, q + rb, ...) -> one zmm, a row a 128-bit lane */
    __m512i v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)q));
    v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(q + rb)), 1);
    v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(q + 2 * rb)), 2);
    return _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(q + 3 * rb)), 3);
}

static inline __attribute__((always_inline)) void store_rows(__m512 acc, int lanes, float *out, int r0, int M) {
    /* acc: 16 / lanes rows of `lanes` consecutive lanes each -> out[(r0 + i) * M] */
    float tmp[16];
    _mm512_storeu_ps(tmp, acc);
    for (int i = 0; i < 16 / lanes; i++) {
        float s = 0.0f;
        for (int l = 0; l < lanes; l++) s += tmp[i * lanes + l];
        out[(r0 + i) * M] = s;
    }
}

/* tiled: FMT_Q4_0_X8, each block's 8 scales and 4 rows' nibbles a load each (1.8x the row layout's products from
 * cache on a Zen 4 core: no inserts, no scales gathered from 8 rows) */
static inline __attribute__((always_inline)) void tile8_q4_512(const uint8_t *w, int64_t rb, const qact *a,
                                                               int64_t m0, float *out, const int M,
                                                               const int tiled) {
    __m512 acc[4][2];  /* [j][rows 0-3 | rows 4-7], 4 lanes a row */
    for (int j = 0; j < M; j++) acc[j][0] = acc[j][1] = _mm512_setzero_ps();
    const int64_t nb = a->nb, k = a->k;
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const __m512i spread_lo = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    const __m512i spread_hi = _mm512_setr_epi32(4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *q = w + b * 18 + 2, *t = w + b * 144;
        prefetch_next(w + 8 * rb + b * 8 * 18, 8 * 18);
        const __m512i v0 = tiled ? _mm512_loadu_si512(t + 16) : load_rows_x4(q, rb);
        const __m512i v1 = tiled ? _mm512_loadu_si512(t + 80) : load_rows_x4(q + 4 * rb, rb);
        const __m512i lo0 = _mm512_and_si512(v0, m4), hi0 = _mm512_and_si512(_mm512_srli_epi16(v0, 4), m4);
        const __m512i lo1 = _mm512_and_si512(v1, m4), hi1 = _mm512_and_si512(_mm512_srli_epi16(v1, 4), m4);
        const __m512 wd = _mm512_castps256_ps512(tiled ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)t))
                                                       : scales8(w, rb, b * 18, 0));
        for (int j = 0; j < M; j++) {
            const int8_t *aq = a->qs + (m0 + j) * k + b * QK;
            const __m512i alo = _mm512_broadcast_i32x4(_mm_load_si128((const __m128i *)aq));
            const __m512i ahi = _mm512_broadcast_i32x4(_mm_load_si128((const __m128i *)(aq + 16)));
            const __m512i off = _mm512_set1_epi32(a->s[(m0 + j) * nb + b] / 4);  /* -8 sum(a), a quarter a lane */
            const __m512i s0 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(off, lo0, alo), hi0, ahi);
            const __m512i s1 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(off, lo1, alo), hi1, ahi);
            const __m512 d = _mm512_mul_ps(wd, _mm512_set1_ps(a->d[(m0 + j) * nb + b]));
            acc[j][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s0), _mm512_permutexvar_ps(spread_lo, d), acc[j][0]);
            acc[j][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s1), _mm512_permutexvar_ps(spread_hi, d), acc[j][1]);
        }
    }
    for (int j = 0; j < M; j++) {
        store_rows(acc[j][0], 4, out + j, 0, M);
        store_rows(acc[j][1], 4, out + j, 4, M);
    }
}

static inline __attribute__((always_inline)) void tile8_q8_512(const uint8_t *w, int64_t rb, const qact *a,
                                                               int64_t m0, float *out, const int M) {
    __m512 acc[4][4];  /* [j][rows 0-1 | 2-3 | 4-5 | 6-7], 8 lanes a row */
    for (int j = 0; j < M; j++)
        for (int p = 0; p < 4; p++) acc[j][p] = _mm512_setzero_ps();
    const int64_t nb = a->nb, k = a->k;
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *q = w + b * 34 + 2;
        prefetch_next(w + 8 * rb + b * 8 * 34, 8 * 34);
        __m512i u[4];  /* rows 2p, 2p + 1: w + 128 as u8 */
        for (int p = 0; p < 4; p++) {
            const __m512i v = _mm512_inserti64x4(
                _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(q + 2 * p * rb))),
                _mm256_loadu_si256((const __m256i *)(q + (2 * p + 1) * rb)), 1);
            u[p] = _mm512_xor_si512(v, flip);
        }
        const __m512 wd = _mm512_castps256_ps512(scales8(w, rb, b * 34, 0));
        for (int j = 0; j < M; j++) {
            const __m512i av = _mm512_broadcast_i64x4(_mm256_load_si256((const __m256i *)(a->qs + (m0 + j) * k + b * QK)));
            const __m512i off = _mm512_set1_epi32(2 * a->s[(m0 + j) * nb + b]);  /* -128 sum(a), an eighth a lane */
            const __m512 d = _mm512_mul_ps(wd, _mm512_set1_ps(a->d[(m0 + j) * nb + b]));
            for (int p = 0; p < 4; p++) {
                const __m512i idx = _mm512_setr_epi32(2 * p, 2 * p, 2 * p, 2 * p, 2 * p, 2 * p, 2 * p, 2 * p,
                                                      2 * p + 1, 2 * p + 1, 2 * p + 1, 2 * p + 1, 2 * p + 1,
                                                      2 * p + 1, 2 * p + 1, 2 * p + 1);
                acc[j][p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(off, u[p], av)),
                                            _mm512_permutexvar_ps(idx, d), acc[j][p]);
            }
        }
    }
    for (int j = 0; j < M; j++)
        for (int p = 0; p < 4; p++) store_rows(acc[j][p], 8, out + j, 2 * p, M);
}

#define TILE8_FN(NAME, FMT, M)                                                                                   \
    static void NAME(const uint8_t *w, int64_t rb, const qact *a, int64_t m0, float *out) {                      \
        if (FMT == FMT_Q4_0 || FMT == FMT_Q4_0_X8) tile8_q4_512(w, rb, a, m0, out, M, FMT == FMT_Q4_0_X8);       \
        else tile8_q8_512(w, rb, a, m0, out, M);                                                                 \
    }
#else
#define TILE8_FN(NAME, FMT, M)                                                                                   \
    static void NAME(const uint8_t *w, int64_t rb, const qact *a, int64_t m0, float *out) {                      \
        if (FMT == FMT_Q4_0 && M > 1) tile8_q4_shared(w, rb, a, m0, out, M);                                     \
        else if (M > 1) tile8_q8_shared(w, rb, a, m0, out, M);                                                   \
        else for (int j = 0; j < M; j++) tile8(FMT, w, rb, a, m0 + j, out + j, M, j == 0);                       \
    }
#endif

TILE8_FN(q4_r8m1, FMT_Q4_0, 1)
TILE8_FN(q4_r8m2, FMT_Q4_0, 2)
TILE8_FN(q4_r8m3, FMT_Q4_0, 3)
TILE8_FN(q4_r8m4, FMT_Q4_0, 4)
TILE8_FN(q8_r8m1, FMT_Q8_0, 1)
TILE8_FN(q8_r8m2, FMT_Q8_0, 2)
TILE8_FN(q8_r8m3, FMT_Q8_0, 3)
TILE8_FN(q8_r8m4, FMT_Q8_0, 4)
#ifdef MIMO_AVX512
TILE8_FN(q4x8_r8m1, FMT_Q4_0_X8, 1)
TILE8_FN(q4x8_r8m2, FMT_Q4_0_X8, 2)
TILE8_FN(q4x8_r8m3, FMT_Q4_0_X8, 3)
TILE8_FN(q4x8_r8m4, FMT_Q4_0_X8, 4)
#endif
#define TILE_ROWS 8
#else
#define TILE_ROWS 4
#endif

typedef void (*tile_fn)(const uint8_t *, int64_t, const qact *, int64_t, float *);
/* [fmt][M - 1]: the tile for R rows (R = 4 for M = 1, else 2) and for 1 row (the last rows of a chunk) */
#ifdef MIMO_AVX2
static const tile_fn tiles_r[2][4] = {{q8_r8m1, q8_r8m2, q8_r8m3, q8_r8m4}, {q4_r8m1, q4_r8m2, q4_r8m3, q4_r8m4}};
#else
static const tile_fn tiles_r[2][4] = {{q8_r4m1, q8_r2m2, q8_r2m3, q8_r2m4}, {q4_r4m1, q4_r2m2, q4_r2m3, q4_r2m4}};
#endif
static const tile_fn tiles_1[2][4] = {{q8_r1m1, q8_r1m2, q8_r1m3, q8_r1m4}, {q4_r1m1, q4_r1m2, q4_r1m3, q4_r1m4}};
#ifdef MIMO_AVX512
static const tile_fn tiles_x8[4] = {q4x8_r8m1, q4x8_r8m2, q4x8_r8m3, q4x8_r8m4};  /* FMT_Q4_0_X8: whole tiles only */
#endif

/* ---- bf16 tiles: R weight rows x M fp32 activation rows ----------------------------------------------
 * Activations are stored permuted per 16: [x0 x2 .. x14 | x1 x3 .. x15], so that the 8 dwords of 16 bf16
 * weights give the even weights by a shift and the odd ones by a mask. */

#ifdef MIMO_AVX2
#define BF16_TILE_FN(NAME, R, M)                                                                                 \
    static void NAME(const uint8_t *w, int64_t rb, const float *xp, int64_t k, int64_t m0, float *out) {          \
        __m256 acc[R][M], acc2[R][M];                                                                            \
        for (int r = 0; r < R; r++)                                                                              \
            for (int j = 0; j < M; j++) acc[r][j] = acc2[r][j] = _mm256_setzero_ps();                            \
        const __m256i hi = _mm256_set1_epi32((int)0xFFFF0000u);                                                  \
        const int64_t k16 = k & ~(int64_t)15;                                                                    \
        for (int64_t i = 0; i < k16; i += 16) {                                                                  \
            __m256 we[R], wo[R];                                                                                 \
            prefetch_next(w + R * rb + i * 2 * R, 32 * R);                                                       \
            for (int r = 0; r < R; r++) {                                                                        \
                const __m256i v = _mm256_loadu_si256((const __m256i *)(w + r * rb + 2 * i));                     \
                we[r] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));                                           \
                wo[r] = _mm256_castsi256_ps(_mm256_and_si256(v, hi));                                            \
            }                                                                                                    \
            for (int j = 0; j < M; j++) {                                                                        \
                const __m256 xe = _mm256_load_ps(xp + (m0 + j) * k + i);                                         \
                const __m256 xo = _mm256_load_ps(xp + (m0 + j) * k + i + 8);                                     \
                for (int r = 0; r < R; r++) {                                                                    \
                    acc[r][j] = _mm256_fmadd_ps(we[r], xe, acc[r][j]);                                           \
                    acc2[r][j] = _mm256_fmadd_ps(wo[r], xo, acc2[r][j]);                                         \
                }                                                                                                \
            }                                                                                                    \
        }                                                                                                        \
        for (int r = 0; r < R; r++)                                                                              \
            for (int j = 0; j < M; j++) {                                                                        \
                float s = hsum8(_mm256_add_ps(acc[r][j], acc2[r][j]));                                           \
                const uint16_t *h = (const uint16_t *)(w + r * rb);                                              \
                for (int64_t i = k16; i < k; i++) s += bf16_to_fp32(h[i]) * xp[(m0 + j) * k + i];                \
                out[r * M + j] = s;                                                                              \
            }                                                                                                    \
    }
#else
#define BF16_TILE_FN(NAME, R, M)                                                                                 \
    static void NAME(const uint8_t *w, int64_t rb, const float *xp, int64_t k, int64_t m0, float *out) {          \
        for (int r = 0; r < R; r++)                                                                              \
            for (int j = 0; j < M; j++) {                                                                        \
                const uint16_t *h = (const uint16_t *)(w + r * rb);                                              \
                float s = 0.0f;                                                                                  \
                for (int64_t i = 0; i < k; i++) s += bf16_to_fp32(h[i]) * xp[(m0 + j) * k + i];                  \
                out[r * M + j] = s;                                                                              \
            }                                                                                                    \
    }
#endif

/* a family of bf16 tiles from TILE_FN(NAME, R, M): R = 4 rows for one activation row, 2 for 2-4, and 1-row tiles
 * for a chunk's last rows; P_tiles_r / P_tiles_1 [M - 1] pick them (of type FN_TYPE) */
#define BF16_TILE_SET(TILE_FN, P, FN_TYPE)                                                                        \
    TILE_FN(P##_r4m1, 4, 1)                                                                                      \
    TILE_FN(P##_r1m1, 1, 1)                                                                                      \
    TILE_FN(P##_r2m2, 2, 2)                                                                                      \
    TILE_FN(P##_r1m2, 1, 2)                                                                                      \
    TILE_FN(P##_r2m3, 2, 3)                                                                                      \
    TILE_FN(P##_r1m3, 1, 3)                                                                                      \
    TILE_FN(P##_r2m4, 2, 4)                                                                                      \
    TILE_FN(P##_r1m4, 1, 4)                                                                                      \
    static const FN_TYPE P##_tiles_r[4] = {P##_r4m1, P##_r2m2, P##_r2m3, P##_r2m4};                               \
    static const FN_TYPE P##_tiles_1[4] = {P##_r1m1, P##_r1m2, P##_r1m3, P##_r1m4};

typedef void (*bf_tile_fn)(const uint8_t *, int64_t, const float *, int64_t, int64_t, float *);
BF16_TILE_SET(BF16_TILE_FN, bf, bf_tile_fn)

#if defined(MIMO_AVX512) && defined(__AVX512BF16__)
#define MIMO_AVX512BF16 1
/* bf16 activations (a bf16 model's) against bf16 weights by vdpbf16ps: 32 weight x activation products an
 * instruction, summed in pairs into 16 fp32 lanes, read straight from both tensors (no unpacking, no permuted
 * copy). A quarter of the instructions per weight byte of the shift-and-mask tiles above, so more of the next
 * weights are in flight: on a 2-core Zen 4 a 7B bf16 decode read ~27 GB/s through those tiles where llama.cpp's
 * vdpbf16ps loop read up to 43 in the same minute. Activations in fp32 keep the tiles above (rounding them to
 * bf16 would change the product). */
#define BF16DP_TILE_FN(NAME, R, M)                                                                               \
    static void NAME(const uint8_t *w, int64_t rb, const uint16_t *xb, int64_t k, int64_t m0, float *out) {       \
        __m512 acc[R][M];                                                                                        \
        for (int r = 0; r < R; r++)                                                                              \
            for (int j = 0; j < M; j++) acc[r][j] = _mm512_setzero_ps();                                         \
        const int64_t k32 = k & ~(int64_t)31;                                                                    \
        for (int64_t i = 0; i < k32; i += 32) {                                                                  \
            __m512bh wv[R];                                                                                      \
            prefetch_next(w + R * rb + i * 2 * R, 64 * R);                                                       \
            for (int r = 0; r < R; r++) wv[r] = (__m512bh)_mm512_loadu_si512(w + r * rb + 2 * i);                \
            for (int j = 0; j < M; j++) {                                                                        \
                const __m512bh xv = (__m512bh)_mm512_loadu_si512(xb + (m0 + j) * k + i);                        \
                for (int r = 0; r < R; r++) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], wv[r], xv);                  \
            }                                                                                                    \
        }                                                                                                        \
        for (int r = 0; r < R; r++)                                                                              \
            for (int j = 0; j < M; j++) {                                                                        \
                float s = _mm512_reduce_add_ps(acc[r][j]);                                                       \
                const uint16_t *h = (const uint16_t *)(w + r * rb), *x = xb + (m0 + j) * k;                      \
                for (int64_t i = k32; i < k; i++) s += bf16_to_fp32(h[i]) * bf16_to_fp32(x[i]);                  \
                out[r * M + j] = s;                                                                              \
            }                                                                                                    \
    }

typedef void (*bd_tile_fn)(const uint8_t *, int64_t, const uint16_t *, int64_t, int64_t, float *);
BF16_TILE_SET(BF16DP_TILE_FN, bd, bd_tile_fn)
#endif

static void permute_bf16_act(const float *x, float *xp, int64_t k) {
    const int64_t k16 = k & ~(int64_t)15;
#ifdef MIMO_AVX2
    for (int64_t i = 0; i < k16; i += 16) {
        for (int t = 0; t < 8; t++) {
            xp[i + t] = x[i + 2 * t];
            xp[i + 8 + t] = x[i + 2 * t + 1];
        }
    }
    for (int64_t i = k16; i < k; i++) xp[i] = x[i];
#else
    (void)k16;
    memcpy(xp, x, k * sizeof(float));
#endif
}

/* ---- the product ----------------------------------------------------------------------------------------
 * y [m, n] = x [m, k] @ W[n, k]^T (+ bias [n]); x fp32, bf16 or fp16 (xdt), y likewise (ydt), bias NULL or of
 * dtype bdt. Any m: activation rows go in groups of up to 4 through each chunk of weight rows, so a chunk
 * (L1/L2-resident) is read from memory once for all m rows. */

#define CHUNK_BYTES (256 * 1024)

static inline void store_out(void *y, int ydt, int64_t idx, float v) {
    if (ydt == DT_F32) ((float *)y)[idx] = v;
    else if (ydt == DT_BF16) ((uint16_t *)y)[idx] = fp32_to_bf16(v);
    else ((uint16_t *)y)[idx] = fp32_to_fp16(v);
}

static inline float bias_at(const void *bias, int bdt, int64_t i) {
    if (!bias) return 0.0f;
    if (bdt == DT_F32) return ((const float *)bias)[i];
    const uint16_t h = ((const uint16_t *)bias)[i];
    return bdt == DT_BF16 ? bf16_to_fp32(h) : fp16_to_fp32(h);
}

typedef struct {
    int fmt;
    const uint8_t *w;
    int64_t n, rb, chunk, m;
    const qact *a;
    const float *xp;
    const uint16_t *xb;  /* bf16 activations as given, for the vdpbf16ps tiles (NULL: xp) */
    int64_t k;
    void *y;
    int ydt;
    const void *bias;
    int bdt;
} gemv_job;

static void gemv_chunk(void *ctx, int64_t c) {
    const gemv_job *jb = (const gemv_job *)ctx;
    const int fmt = jb->fmt;
    const int64_t r0 = c * jb->chunk, r1 = r0 + jb->chunk < jb->n ? r0 + jb->chunk : jb->n, m = jb->m;
    float out[32];
    for (int64_t j0 = 0; j0 < m; j0 += 4) {
        const int mm = m - j0 < 4 ? (int)(m - j0) : 4;
        const int R = fmt == FMT_BF16 ? (mm == 1 ? 4 : 2) : TILE_ROWS == 8 ? 8 : (mm == 1 ? 4 : 2);
        for (int64_t r = r0; r < r1;) {
            int rr;
            const uint8_t *wr = jb->w + r * jb->rb;
            if (r + R <= r1) {
                rr = R;
#ifdef MIMO_AVX512BF16
                if (jb->xb) bd_tiles_r[mm - 1](wr, jb->rb, jb->xb, jb->k, j0, out);
                else
#endif
#ifdef MIMO_AVX512
                if (fmt == FMT_Q4_0_X8) tiles_x8[mm - 1](wr, jb->rb, jb->a, j0, out);
                else
#endif
                if (fmt == FMT_BF16) bf_tiles_r[mm - 1](wr, jb->rb, jb->xp, jb->k, j0, out);
                else tiles_r[fmt][mm - 1](wr, jb->rb, jb->a, j0, out);
            } else {
                rr = 1;
#ifdef MIMO_AVX512BF16
                if (jb->xb) bd_tiles_1[mm - 1](wr, jb->rb, jb->xb, jb->k, j0, out);
                else
#endif
                if (fmt == FMT_BF16) bf_tiles_1[mm - 1](wr, jb->rb, jb->xp, jb->k, j0, out);
                else tiles_1[fmt][mm - 1](wr, jb->rb, jb->a, j0, out);
            }
            for (int i = 0; i < rr; i++)
                for (int j = 0; j < mm; j++)
                    store_out(jb->y, jb->ydt, (j0 + j) * jb->n + r + i,
                              out[i * mm + j] + bias_at(jb->bias, jb->bdt, r + i));
            r += rr;
        }
    }
}

#ifdef MIMO_AVX2
/* ---- many activation rows (prefill): GEMM tiles ------------------------------------------------------------
 * A thread takes 8 weight rows at a time, unpacks them once into an L1/L2-resident buffer (Q4_0: each pair of rows'
 * low and high nibbles as bytes, [row 2p | row 2p + 1] per vector; Q8_0: |w| and w per row; the 8 scales of each
 * block as fp32, in the order the reduction leaves the rows), then runs every activation row against the buffer
 * (the activations, m * k int8 bytes, stay in L2/L3). The same arithmetic as the GEMV tiles, without re-unpacking
 * the weights for every activation row. */
#define GEMM_MIN_ROWS 8

static __thread void *tile_ptr = NULL;
static __thread size_t tile_size = 0;

static void *tile_buffer(size_t bytes) {
    if (bytes > tile_size) {
        free(tile_ptr);
        tile_size = (bytes + 4095) & ~(size_t)4095;
        if (posix_memalign(&tile_ptr, 64, tile_size) != 0) { tile_ptr = NULL; tile_size = 0; }
    }
    return tile_ptr;
}

static void unpack_tile8(const int fmt, const uint8_t *w, int64_t rb, int64_t nb, __m256i *buf, float *sc) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    for (int64_t b = 0; b < nb; b++) {
        if (fmt != FMT_Q8_0) {
            const int tiled = fmt == FMT_Q4_0_X8;
            for (int p = 0; p < 4; p++) {
                const uint8_t *q0 = tiled ? w + b * 144 + 16 + 32 * p : w + 2 * p * rb + b * 18 + 2;
                const uint8_t *q1 = tiled ? q0 + 16 : q0 + rb;
                const __m256i v = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)q0)),
                                                          _mm_loadu_si128((const __m128i *)q1), 1);
                _mm256_store_si256(buf + b * 8 + 2 * p, _mm256_and_si256(v, m4));
                _mm256_store_si256(buf + b * 8 + 2 * p + 1, _mm256_and_si256(_mm256_srli_epi16(v, 4), m4));
            }
            _mm256_store_ps(sc + b * 8, tiled ? _mm256_permutevar8x32_ps(  /* rows 0 2 4 6 1 3 5 7 */
                                                    _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + b * 144))),
                                                    _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7))
                                              : scales8(w, rb, b * 18, 1));
        } else {
            for (int r = 0; r < 8; r++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(w + r * rb + b * 34 + 2));
                _mm256_store_si256(buf + b * 16 + 2 * r, _mm256_sign_epi8(v, v));
                _mm256_store_si256(buf + b * 16 + 2 * r + 1, v);
            }
            _mm256_store_ps(sc + b * 8, scales8(w, rb, b * 34, 0));
        }
    }
}

/* activation row j against an unpacked tile: the 8 rows' results in tmp (row order 0..7) */
static inline __attribute__((always_inline)) void gemm_row(const int fmt, const __m256i *buf, const float *sc,
                                                          const qact *a, int64_t j, float *tmp) {
    const __m256i ones = _mm256_set1_epi16(1);
    const int64_t nb = a->nb;
    const int8_t *aq = a->qs + j * a->k;
    const float *ad = a->d + j * nb;
    const int32_t *as8 = a->s + j * nb;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m256i t;
        if (fmt == FMT_Q4_0) {
            const __m256i alo = _mm256_broadcastsi128_si256(_mm_load_si128((const __m128i *)(aq + b * QK)));
            const __m256i ahi = _mm256_broadcastsi128_si256(_mm_load_si128((const __m128i *)(aq + b * QK + 16)));
            const __m256i *q = buf + b * 8;
            __m256i d[4];
            for (int p = 0; p < 4; p++)
                d[p] = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_load_si256(q + 2 * p), alo),
                                        _mm256_maddubs_epi16(_mm256_load_si256(q + 2 * p + 1), ahi));
            t = _mm256_add_epi32(reduce_q4(d[0], d[1], d[2], d[3]), _mm256_set1_epi32(as8[b]));
        } else {
            const __m256i av = _mm256_load_si256((const __m256i *)(aq + b * QK));
            const __m256i *q = buf + b * 16;
            __m256i s[8];
            for (int r = 0; r < 8; r++)
                s[r] = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_load_si256(q + 2 * r),
                                                              _mm256_sign_epi8(av, _mm256_load_si256(q + 2 * r + 1))),
                                         ones);
            t = sum8_epi32(s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]);
        }
        acc = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_load_ps(sc + b * 8), _mm256_set1_ps(ad[b])), _mm256_cvtepi32_ps(t),
                              acc);
    }
    float v[8];
    _mm256_storeu_ps(v, acc);
    if (fmt == FMT_Q4_0)
        for (int r = 0; r < 4; r++) { tmp[2 * r] = v[r]; tmp[2 * r + 1] = v[4 + r]; }
    else
        for (int r = 0; r < 8; r++) tmp[r] = v[r];
}

typedef struct {
    int fmt;
    const uint8_t *w;
    int64_t n, rb, m;
    const qact *a;
    void *y;
    int ydt;
    const void *bias;
    int bdt;
} gemm_job;

static void gemm_chunk(void *ctx, int64_t c) {  /* chunk c: weight rows [8c, 8c + 8) */
    const gemm_job *jb = (const gemm_job *)ctx;
    const int fmt = jb->fmt;
    const int64_t nb = jb->a->nb, r0 = 8 * c, rows = jb->n - r0 < 8 ? jb->n - r0 : 8;
    const size_t wbytes = (size_t)nb * (fmt == FMT_Q8_0 ? 16 : 8) * 32;
    uint8_t *mem = (uint8_t *)tile_buffer(wbytes + (size_t)nb * 32);
#ifdef MIMO_AVX512
    if (!mem && fmt == FMT_Q4_0_X8) {  /* no memory: the GEMV tile, an activation row at a time */
        float out[8];
        for (int64_t j = 0; j < jb->m; j++) {
            tiles_x8[0](jb->w + r0 * jb->rb, jb->rb, jb->a, j, out);
            for (int r = 0; r < 8; r++) store_out(jb->y, jb->ydt, j * jb->n + r0 + r, out[r] + bias_at(jb->bias, jb->bdt, r0 + r));
        }
        return;
    }
#endif
    if (!mem || rows < 8) {  /* the last rows (or no memory): the one-row tiles */
        float out[4];
        for (int64_t r = r0; r < r0 + rows; r++)
            for (int64_t j = 0; j < jb->m; j++) {
                tiles_1[fmt][0](jb->w + r * jb->rb, jb->rb, jb->a, j, out);
                store_out(jb->y, jb->ydt, j * jb->n + r, out[0] + bias_at(jb->bias, jb->bdt, r));
            }
        return;
    }
    __m256i *buf = (__m256i *)mem;
    float *sc = (float *)(mem + wbytes);
    unpack_tile8(fmt, jb->w + r0 * jb->rb, jb->rb, nb, buf, sc);
    float bias[8], tmp[8];
    for (int r = 0; r < 8; r++) bias[r] = bias_at(jb->bias, jb->bdt, r0 + r);
    for (int64_t j = 0; j < jb->m; j++) {
        if (fmt == FMT_Q8_0) gemm_row(FMT_Q8_0, buf, sc, jb->a, j, tmp);
        else gemm_row(FMT_Q4_0, buf, sc, jb->a, j, tmp);
        for (int r = 0; r < 8; r++) store_out(jb->y, jb->ydt, j * jb->n + r0 + r, tmp[r] + bias[r]);
    }
}
#endif

int mimo_gemv(int fmt, const void *w, int64_t n, int64_t k, const void *x, int xdt, int64_t m, void *y, int ydt,
              const void *bias, int bdt, int nth) {
    if (fmt != FMT_BF16 && k % QK) return -1;
#ifndef MIMO_AVX512
    if (fmt == FMT_Q4_0_X8) return -3;  /* tiled only where the AVX-512 tiles are built */
#endif
    if (fmt == FMT_Q4_0_X8 && n % 8) return -3;
    const int64_t nb = k / QK, rb = row_bytes_of(fmt, k);
    const int64_t xrow = xdt == DT_F32 ? 4 * k : 2 * k;
    qact a = {0};
    float *xp = NULL;
    const uint16_t *xb = NULL;
#ifdef MIMO_AVX512BF16
    if (fmt == FMT_BF16 && xdt == DT_BF16) xb = (const uint16_t *)x;
    else
#endif
    if (fmt == FMT_BF16) {
        xp = (float *)workspace((size_t)(m * k + k) * sizeof(float) + 64);
        if (!xp) return -2;
        float *tmp = xp + m * k;
        for (int64_t j = 0; j < m; j++) {
            load_row_f32((const uint8_t *)x + j * xrow, xdt, k, tmp);
            permute_bf16_act(tmp, xp + j * k, k);
        }
    } else {
        const size_t qbytes = ((size_t)(m * k) + 63) & ~(size_t)63;
        uint8_t *p = (uint8_t *)workspace(qbytes + (size_t)m * nb * 8 + (size_t)k * 4 + 64);
        if (!p) return -2;
        a.qs = (int8_t *)p;
        a.d = (float *)(p + qbytes);
        a.s = (int32_t *)(a.d + m * nb);
        float *tmp = (float *)(a.s + m * nb);
        a.k = k;
        a.nb = nb;
        for (int64_t j = 0; j < m; j++) {
            const float *row = (const float *)((const uint8_t *)x + j * xrow);
            if (xdt != DT_F32) { load_row_f32(row, xdt, k, tmp); row = tmp; }
            quantize_act_row(row, a.qs + j * k, a.d + j * nb, a.s + j * nb, k);
        }
    }
#ifdef MIMO_AVX2
    if (fmt != FMT_BF16 && m >= GEMM_MIN_ROWS) {
        gemm_job g = {fmt, (const uint8_t *)w, n, rb, m, &a, y, ydt, bias, bdt};
        parallel_for(gemm_chunk, &g, (n + 7) / 8, nth);
        return 0;
    }
#endif
    /* chunks of ~CHUNK_BYTES of weights (few prefetcher cold starts), at least 4 per thread (balance) */
    int64_t chunk = CHUNK_BYTES / (rb > 0 ? rb : 1), most = (n + 4 * nth - 1) / (4 * (nth > 0 ? nth : 1));
    if (chunk > most) chunk = most;
    chunk = chunk < 8 ? 8 : (chunk + 7) & ~(int64_t)7;
    gemv_job j = {fmt, (const uint8_t *)w, n, rb, chunk, m, &a, xp, xb, k, y, ydt, bias, bdt};
    parallel_for(gemv_chunk, &j, (n + chunk - 1) / chunk, nth);
    return 0;
}
