/* Tile products of the attention core on BLIS's own micro-kernel.
 *
 * The tiles are small (at most BQ x BK, inner size head_dim or a tile side),
 * so a BLIS call per product spends much of its time on setup, partitioning
 * and fetching pack buffers. Here the operands are packed once into the
 * micro-kernel's layout (k-major panels) and reused: Q and dO of a query
 * tile serve every key tile. The micro-kernel, its register block and its
 * preferred storage of C are the ones BLIS picked for this CPU, read from
 * its context at run time: a product whose C is stored the other way runs
 * transposed (masa_orient), so the kernel never takes its slow path of a
 * temporary C copied out element by element.
 *
 * Causal tiles: multiplying a masked probability 0 by a future token's value
 * would still turn a NaN or an inf there into a NaN here, so masked entries
 * are never read. Each panel of C's rows runs the micro-kernel over the
 * inner range all its rows see (packed panels are k-major, so a k range is
 * a pointer offset) and adds the remaining triangle of at most width - 1
 * terms a row by hand.
 *
 * Packing and the triangle's axpy have AVX-512 versions, chosen at run time
 * (the library is built for the baseline x86-64). */
#include <stdint.h>
#include <string.h>

#include <blis.h>

#include "attention/attention_core.h"

static size_t clamp(ptrdiff_t v, size_t hi)
{
    return v < 0 ? 0 : (size_t)v > hi ? hi : (size_t)v;
}

size_t masa__mask_row_len(masa_tile_mask mask, size_t r, size_t n)
{
    return mask.masked ? clamp((ptrdiff_t)r + mask.diag + 1, n) : n;
}

size_t masa__mask_col_start(masa_tile_mask mask, size_t j, size_t m)
{
    return mask.masked ? clamp((ptrdiff_t)j - mask.diag, m) : 0;
}

static masa_orient orient(const masa_ukr *u, bool c_by_cols)
{
    bool swap = c_by_cols != u->prefers_cols;
    return (masa_orient){swap ? u->nr : u->mr, swap ? u->mr : u->nr, swap};
}

void masa__ukr_query(masa_ukr *u)
{
    masa__blis_init();
    cntx_t *cntx = bli_gks_query_cntx();
    u->cntx = cntx;
    u->fn = (void (*)(void))bli_cntx_get_l3_nat_ukr_dt(BLIS_FLOAT,
                                                        BLIS_GEMM_UKR, cntx);
    u->mr = (size_t)bli_cntx_get_blksz_def_dt(BLIS_FLOAT, BLIS_MR, cntx);
    u->nr = (size_t)bli_cntx_get_blksz_def_dt(BLIS_FLOAT, BLIS_NR, cntx);
    u->kc = (size_t)bli_cntx_get_blksz_def_dt(BLIS_FLOAT, BLIS_KC, cntx);
    u->prefers_cols =
        bli_cntx_l3_nat_ukr_prefers_cols_dt(BLIS_FLOAT, BLIS_GEMM_UKR, cntx);
    u->c_rows = orient(u, false);
    u->c_cols = orient(u, true);
}

static size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

float *masa__attn_carve(float **at, size_t n)
{
    uintptr_t p = ((uintptr_t)*at + 63) & ~(uintptr_t)63;
    *at = (float *)p + n;
    return (float *)p;
}

size_t masa__pack_floats(const masa_ukr *u, size_t outer, size_t k)
{
    size_t by_mr = round_up(outer, u->mr), by_nr = round_up(outer, u->nr);
    return (by_mr > by_nr ? by_mr : by_nr) * k;
}

/* One panel of `lines` (<= w) lines of k floats, each contiguous (a row of
 * A, a column of B stored by rows of memory); w a constant where inlined
 * with one, so the interleave unrolls. */
static inline void pack_lines(size_t w, size_t lines, size_t k,
                              const float *x, size_t rs, float *dst)
{
    if (lines < w)
        memset(dst, 0, w * k * sizeof(float));
    for (size_t i = 0; i < lines; i++) {
        const float *src = x + i * rs;
        for (size_t l = 0; l < k; l++)
            dst[l * w + i] = src[l];
    }
}

/* One panel whose k-th slice is contiguous (lines are adjacent floats). */
static inline void pack_slices(size_t w, size_t lines, size_t k,
                               const float *x, size_t rs_inner, float *dst)
{
    for (size_t l = 0; l < k; l++) {
        float *d = dst + l * w;
        const float *src = x + l * rs_inner;
        for (size_t i = 0; i < lines; i++)
            d[i] = src[i];
        for (size_t i = lines; i < w; i++)
            d[i] = 0.0f;
    }
}

void masa__pack_portable(size_t w, size_t outer, size_t k, const float *x,
                         size_t rs_outer, size_t rs_inner, float *dst)
{
    for (size_t o0 = 0; o0 < outer; o0 += w, dst += w * k) {
        size_t lines = outer - o0 < w ? outer - o0 : w;
        const float *src = x + o0 * rs_outer;
        if (rs_inner == 1) {
            /* the widths of BLIS's sgemm kernels, unrolled */
            if (w == 6)
                pack_lines(6, lines, k, src, rs_outer, dst);
            else if (w == 8)
                pack_lines(8, lines, k, src, rs_outer, dst);
            else if (w == 12)
                pack_lines(12, lines, k, src, rs_outer, dst);
            else if (w == 16)
                pack_lines(16, lines, k, src, rs_outer, dst);
            else
                pack_lines(w, lines, k, src, rs_outer, dst);
        } else if (rs_outer == 1) {
            if (w == 16 && lines == 16)
                pack_slices(16, 16, k, src, rs_inner, dst);
            else
                pack_slices(w, lines, k, src, rs_inner, dst);
        } else {
            for (size_t l = 0; l < k; l++)
                for (size_t i = 0; i < w; i++)
                    dst[l * w + i] =
                        i < lines ? src[i * rs_outer + l * rs_inner] : 0.0f;
        }
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define AVX512 __attribute__((target("avx512f")))

/* In-register transpose of 16 x 16 floats: r[i] lane j <- r[j] lane i. */
AVX512 static inline void transpose16(__m512 r[16])
{
    __m512 t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    /* r[4i + j], 128-bit lane q: column 4q + j of rows 4i .. 4i + 3 */
    for (int i = 0; i < 4; i++) {
        r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
        r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    /* 4 x 4 transpose of the 128-bit lanes of r[j], r[4+j], r[8+j], r[12+j] */
    for (int j = 0; j < 4; j++) {
        t[j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88);
        t[4 + j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xDD);
        t[8 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88);
        t[12 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xDD);
    }
    for (int j = 0; j < 4; j++) {
        r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
        r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xDD);
        r[4 + j] = _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0x88);
        r[12 + j] = _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0xDD);
    }
}

AVX512 static inline __mmask16 lanes(size_t n)
{
    return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1);
}

/* Contiguous lines: 16 lines x 16 floats in, transposed, out as 16 slices
 * of the panel (masked to the panel's width and the lines present). */
AVX512 static void pack_lines_avx512(size_t w, size_t lines, size_t k,
                                     const float *x, size_t rs, float *dst)
{
    for (size_t i0 = 0; i0 < w; i0 += 16) {
        size_t have = lines > i0 ? lines - i0 : 0;
        if (have > 16)
            have = 16;
        __mmask16 store = lanes(w - i0);
        for (size_t l0 = 0; l0 < k; l0 += 16) {
            size_t nl = k - l0 < 16 ? k - l0 : 16;
            __mmask16 load = lanes(nl);
            __m512 r[16];
            for (size_t i = 0; i < 16; i++)
                r[i] = i < have ? _mm512_maskz_loadu_ps(
                                      load, x + (i0 + i) * rs + l0)
                                : _mm512_setzero_ps();
            transpose16(r);
            for (size_t l = 0; l < nl; l++)
                _mm512_mask_storeu_ps(dst + (l0 + l) * w + i0, store, r[l]);
        }
    }
}

/* Contiguous slices: a masked copy of each (zeros past the lines). */
AVX512 static void pack_slices_avx512(size_t w, size_t lines, size_t k,
                                      const float *x, size_t rs_inner,
                                      float *dst)
{
    for (size_t l = 0; l < k; l++)
        for (size_t i0 = 0; i0 < w; i0 += 16) {
            __m512 v = _mm512_maskz_loadu_ps(
                lanes(lines > i0 ? lines - i0 : 0), x + l * rs_inner + i0);
            _mm512_mask_storeu_ps(dst + l * w + i0, lanes(w - i0), v);
        }
}

AVX512 void masa__pack_avx512(size_t w, size_t outer, size_t k,
                              const float *x, size_t rs_outer,
                              size_t rs_inner, float *dst)
{
    if (rs_inner != 1 && rs_outer != 1) {
        masa__pack_portable(w, outer, k, x, rs_outer, rs_inner, dst);
        return;
    }
    for (size_t o0 = 0; o0 < outer; o0 += w, dst += w * k) {
        size_t lines = outer - o0 < w ? outer - o0 : w;
        if (rs_inner == 1)
            pack_lines_avx512(w, lines, k, x + o0 * rs_outer, rs_outer, dst);
        else
            pack_slices_avx512(w, lines, k, x + o0, rs_inner, dst);
    }
}

AVX512 static void axpy_avx512(size_t n, float a, const float *x, float *y)
{
    __m512 va = _mm512_set1_ps(a);
    for (size_t i = 0; i < n; i += 16) {
        __mmask16 m = lanes(n - i);
        __m512 v = _mm512_maskz_loadu_ps(m, y + i);
        v = _mm512_fmadd_ps(va, _mm512_maskz_loadu_ps(m, x + i), v);
        _mm512_mask_storeu_ps(y + i, m, v);
    }
}
#define HAVE_AVX512 1
#else
#define HAVE_AVX512 0
void masa__pack_avx512(size_t w, size_t outer, size_t k, const float *x,
                       size_t rs_outer, size_t rs_inner, float *dst)
{
    masa__pack_portable(w, outer, k, x, rs_outer, rs_inner, dst);
}
#endif

static void pack(size_t w, size_t outer, size_t k, const float *x,
                 size_t rs_outer, size_t rs_inner, float *dst)
{
    if (HAVE_AVX512 && masa__cpu_has_avx512())
        masa__pack_avx512(w, outer, k, x, rs_outer, rs_inner, dst);
    else
        masa__pack_portable(w, outer, k, x, rs_outer, rs_inner, dst);
}

void masa__pack_a(size_t w, size_t m, size_t k, const float *a, size_t rsa,
                  size_t csa, float *dst)
{
    pack(w, m, k, a, rsa, csa, dst);
}

void masa__pack_b(size_t w, size_t k, size_t n, const float *b, size_t rsb,
                  size_t csb, float *dst)
{
    pack(w, n, k, b, csb, rsb, dst);
}

void masa__pack_key_tile(const masa_attn_args *a, const masa_ukr *u,
                         size_t b, size_t g, size_t t, float *ka, float *va,
                         float *vb, float *kb)
{
    const masa_layer *L = a->layer;
    size_t T = a->seq, hd = L->head_dim, j0 = t * MASA_FLASH_BK;
    size_t n = T - j0 < MASA_FLASH_BK ? T - j0 : MASA_FLASH_BK;
    const float *k = a->k + (b * T + j0) * L->dkv + g * hd;
    const float *v = a->v + (b * T + j0) * L->dkv + g * hd;
    size_t wa = u->c_cols.wa, wb = u->c_rows.wb;
    if (ka)
        masa__pack_a(wa, n, hd, k, L->dkv, 1, ka);
    if (va)
        masa__pack_a(wa, n, hd, v, L->dkv, 1, va);
    if (vb)
        masa__pack_b(wb, n, hd, v, L->dkv, 1, vb);
    if (kb)
        masa__pack_b(wb, n, hd, k, L->dkv, 1, kb);
}

static void axpy_portable(size_t n, float a, const float *x, float *y)
{
    for (size_t i = 0; i < n; i++)
        y[i] += a * x[i];
}

static void axpy(size_t n, float a, const float *x, float *y)
{
#if HAVE_AVX512
    if (masa__cpu_has_avx512()) {
        axpy_avx512(n, a, x, y);
        return;
    }
#endif
    axpy_portable(n, a, x, y);
}

/* One micro-tile: C (rows x cols) = alpha A B + beta C over k, from panel
 * a (width o.wa) and panel b (width o.wb), in blocks of KC along k; run
 * transposed when the orientation says so. */
static void micro_tile(const masa_ukr *u, masa_orient o, size_t rows,
                       size_t cols, size_t k, float alpha, const float *a,
                       const float *b, float beta, float *c, size_t rsc,
                       size_t csc, auxinfo_t *aux)
{
    sgemm_ukr_ft ukr = (sgemm_ukr_ft)u->fn;
    size_t l = 0;
    do {
        size_t kb = k - l < u->kc ? k - l : u->kc;
        float *ap = (float *)a + l * o.wa, *bp = (float *)b + l * o.wb;
        float bt = l == 0 ? beta : 1.0f;
        if (o.swap) {
            bli_auxinfo_set_next_ab(bp, ap, aux);
            ukr((dim_t)cols, (dim_t)rows, (dim_t)kb, &alpha, bp, ap, &bt, c,
                (inc_t)csc, (inc_t)rsc, aux, (cntx_t *)u->cntx);
        } else {
            bli_auxinfo_set_next_ab(ap, bp, aux);
            ukr((dim_t)rows, (dim_t)cols, (dim_t)kb, &alpha, ap, bp, &bt, c,
                (inc_t)rsc, (inc_t)csc, aux, (cntx_t *)u->cntx);
        }
        l += kb;
    } while (l < k);
}

void masa__tile_product(const masa_ukr *u, const masa_tile_product *p)
{
    masa_orient o = p->o;
    size_t wa = o.wa, wb = o.wb, m = p->m, n = p->n, k = p->k;
    float alpha = p->alpha, beta = p->beta;
    size_t bk = p->bp_k ? p->bp_k : k; /* B's panel stride / wb */
    size_t csc = p->csc ? p->csc : 1;
    auxinfo_t aux;
    memset(&aux, 0, sizeof aux);
    for (size_t r0 = 0; r0 < m; r0 += wa) {
        size_t rows = m - r0 < wa ? m - r0 : wa;
        /* the inner range every row of the panel sees */
        size_t klo = 0, khi = k;
        if (p->kind == MASA_PRODUCT_ROWS)
            khi = masa__mask_row_len(p->mask, r0, k);
        else
            klo = masa__mask_col_start(p->mask, r0 + rows - 1, k);
        const float *ap = p->ap + r0 * k + klo * wa;
        float *c = p->c + r0 * p->ldc;
        if (khi > klo || beta != 1.0f)
            for (size_t c0 = 0; c0 < n; c0 += wb)
                micro_tile(u, o, rows, n - c0 < wb ? n - c0 : wb, khi - klo,
                           alpha, ap, p->bp + c0 * bk + klo * wb, beta,
                           c + c0 * csc, p->ldc, csc, &aux);
        if (!p->mask.masked)
            continue;
        /* the triangle: row r of C meets inner indices [khi, its end) or
         * [its start, klo), from the unpacked operands */
        for (size_t r = r0; r < r0 + rows; r++) {
            float *cr = p->c + r * p->ldc;
            if (p->kind == MASA_PRODUCT_ROWS) {
                size_t end = masa__mask_row_len(p->mask, r, k);
                for (size_t j = khi; j < end; j++)
                    axpy(n, alpha * p->a[r * p->lda + j], p->b + j * p->ldb,
                         cr);
            } else {
                size_t start = masa__mask_col_start(p->mask, r, k);
                for (size_t i = start; i < klo; i++)
                    axpy(n, alpha * p->a[i * p->lda + r], p->b + i * p->ldb,
                         cr);
            }
        }
    }
}
