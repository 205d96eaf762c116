/* 4- and 8-bit weights (MatMulNBits layout) x int8 (dynamically quantized activations) GEMM/GEMV,
   AVX512-VNNI. Every 8-k step of a column is two dwords of u8 codes against two dwords of s8 activations:
   4-bit, the low nibbles (even k) and the high nibbles (odd k); 8-bit, bytes k0..3 and k4..7. */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"
#include "vec_math.h"

/* MR rows x NB 16-column panels per C micro-kernel: 3 x 4, chosen by measurement (docs/design-measurements.md) */
#define MR 3
#define NB 4
#define PANEL_BYTES 32768  /* a 16-column sub-panel's share of a tile's packed K chunk: 4096 k of 4-bit, 2048 of 8-bit */
#define KC_MAX 4096        /* deepest K chunk (4-bit) */

/* The zero point of weights without zero points: 8 (4-bit), 128 (8-bit). */
static inline int default_zero(int bits) { return 1 << (bits - 1); }

/* Quantize rows [m0, m1) of A [M, K] (row stride lda) per row and block of `bs` k to symmetric int8.
   Aq [M, ldq]: for 4-bit weights the bytes inside each 8-k step are a[k0 k2 k4 k6 k1 k3 k5 k7] (the order the
   nibble split yields), for 8-bit in order; as [M, ldq/bs] scales; zsum [M, ldq/bs] the block's quantized
   values summed times -default_zero(bits): where the GEMM's int32 sums of weight codes x values start, so that
   they come out zero-corrected. ldq > K writes a column range of wider rows (Aq, as and zsum pointing at its
   first column). */
void nbits_quantize_rows(int bits, int m0, int m1, int K, int bs, const float *A, int lda, int8_t *Aq, int ldq,
                         float *as, int32_t *zsum) {
    const __m128i order = bits == 4 ? _mm_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15)
                                    : _mm_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const int kb = K / bs, ldb = ldq / bs;
    for (int m = m0; m < m1; m++) {
        for (int b = 0; b < kb; b++) {
            const float *a = A + (size_t)m * lda + (size_t)b * bs;
            int8_t *q = Aq + (size_t)m * ldq + (size_t)b * bs;
            __m512 mx = _mm512_setzero_ps();
            for (int k = 0; k < bs; k += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(a + k)));
            float amax = _mm512_reduce_max_ps(mx);
            __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
            __m512i sum = _mm512_setzero_si512();
            for (int k = 0; k < bs; k += 16) {
                __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(a + k), inv));
                sum = _mm512_add_epi32(sum, v);
                _mm_storeu_si128((__m128i *)(q + k), _mm_shuffle_epi8(_mm512_cvtsepi32_epi8(v), order));
            }
            as[(size_t)m * ldb + b] = amax / 127.f;
            zsum[(size_t)m * ldb + b] = -default_zero(bits) * _mm512_reduce_add_epi32(sum);
        }
    }
}

/* Zero point of column n, block b of kb: 4-bit packed two per byte (rows of ceil(kb/2) bytes), 8-bit one byte
   each. */
static inline float zero_of(int bits, const uint8_t *zp, int kb, int n, int b) {
    if (bits == 8) return (float)zp[(size_t)n * kb + b];
    uint8_t z = zp[(size_t)n * ((kb + 1) / 2) + b / 2];
    return (float)((b & 1) ? z >> 4 : z & 15);
}

static inline __mmask16 live_columns(int n_end, int n0) {
    return n_end - n0 >= 16 ? 0xFFFF : n_end <= n0 ? 0 : (__mmask16)((1u << (n_end - n0)) - 1);
}

/* Pack 16 columns n0.. of a kc-deep K chunk of B (row stride ldb bytes) by 8-k steps, lane j = column n0+j (0
   past n_end), as sub-panel t of a tile: a row of 64 bytes per step (4-bit: a lane's 8 nibbles) or two (8-bit:
   a lane's k0..3, then k4..7), the NB sub-panels' rows interleaved (row i of sub-panel t at (i * NB + t) * 64)
   so the micro-kernel reads one stream instead of four. 16 dwords of each column at a time, transposed in
   registers, so each column's weights are read as whole lines rather than gathered a lane at a time. */
static void pack_panel(int bits, const uint8_t *B, int ldb, int n0, int n_end, int k0, int kc, int t,
                       uint8_t *panel) {
    const int cols = n_end - n0 < 16 ? n_end - n0 : 16, dwords = kc / 8 * (bits / 4);
    const uint8_t *base = B + (size_t)n0 * ldb + (size_t)k0 * bits / 8;
    for (int d0 = 0; d0 < dwords; d0 += 16) {
        const int n = dwords - d0 < 16 ? dwords - d0 : 16;
        const __mmask16 m = n == 16 ? 0xFFFF : (__mmask16)((1u << n) - 1);
        __m512 r[16];
        for (int j = 0; j < 16; j++) {
            _mm_prefetch((const char *)(base + (size_t)j * ldb + (d0 + 64) * 4), _MM_HINT_T0);  /* 4 lines ahead */
            r[j] = j < cols ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi32(m, base + (size_t)j * ldb + d0 * 4))
                            : _mm512_setzero_ps();
        }
        transpose16(r);  /* r[i]: dword d0+i of the 16 columns */
        for (int i = 0; i < n; i++) _mm512_storeu_ps(panel + ((size_t)(d0 + i) * NB + t) * 64, r[i]);
    }
}

/* 8 vpdpbusd of one row: its two dwords of an 8-k step (at A and A4) against the four panels' low nibbles
   (zmm20-23) and high nibbles (zmm24-27), into sums S0..S3. */
#define ROW_STEP(A, A4, S0, S1, S2, S3) \
    "vpbroadcastd " A ", %%zmm28\n\t" "vpbroadcastd " A4 ", %%zmm29\n\t" \
    "vpdpbusd %%zmm28, %%zmm20, %%zmm" S0 "\n\t" "vpdpbusd %%zmm28, %%zmm21, %%zmm" S1 "\n\t" \
    "vpdpbusd %%zmm28, %%zmm22, %%zmm" S2 "\n\t" "vpdpbusd %%zmm28, %%zmm23, %%zmm" S3 "\n\t" \
    "vpdpbusd %%zmm29, %%zmm24, %%zmm" S0 "\n\t" "vpdpbusd %%zmm29, %%zmm25, %%zmm" S1 "\n\t" \
    "vpdpbusd %%zmm29, %%zmm26, %%zmm" S2 "\n\t" "vpdpbusd %%zmm29, %%zmm27, %%zmm" S3 "\n\t"
/* The panel row at OFF: its low nibbles into zmm L, its high into zmm H (loaded there first). */
#define NIBBLES(OFF, L, H) \
    "vmovdqu64 " OFF "(%[pp]), %%zmm" H "\n\t" "vpandd %%zmm30, %%zmm" H ", %%zmm" L "\n\t" \
    "vpsrlw $4, %%zmm" H ", %%zmm" H "\n\t" "vpandd %%zmm30, %%zmm" H ", %%zmm" H "\n\t"
/* Start sums S0..S3 at the row's zsum (at Z). */
#define ROW_START(Z, S0, S1, S2, S3) \
    "vpbroadcastd " Z ", %%zmm" S0 "\n\t" "vpbroadcastd " Z ", %%zmm" S1 "\n\t" \
    "vpbroadcastd " Z ", %%zmm" S2 "\n\t" "vpbroadcastd " Z ", %%zmm" S3 "\n\t"
/* accf at OFF += float(sum S) * (the block's weight scales at W x the row's scale in zmm28): one panel. */
#define SCALE(S, W, OFF) \
    "vcvtdq2ps %%zmm" S ", %%zmm" S "\n\t" "vmulps " W "(%[ws]), %%zmm28, %%zmm29\n\t" \
    "vfmadd213ps " OFF "(%[accf]), %%zmm29, %%zmm" S "\n\t" "vmovaps %%zmm" S ", " OFF "(%[accf])\n\t"
/* One row's four panels: its scale at AS, sums S0..S3, accf row at OFF0 (+64 per panel). */
#define ROW_SCALE(AS, S0, S1, S2, S3, OFF0, OFF1, OFF2, OFF3) \
    "vbroadcastss " AS ", %%zmm28\n\t" \
    SCALE(S0, "0", OFF0) SCALE(S1, "64", OFF1) SCALE(S2, "128", OFF2) SCALE(S3, "192", OFF3)

/* The micro-kernel's blocks for ASM_ROWS (5) rows of 4-bit weights without zero points, in assembly, so the
   20 sums stay in fixed registers (GCC's intrinsics version copied sums between registers every step). Rows
   a + r lda of Aq against a tile's packed panel, over `blocks` blocks of `steps` 8-k steps; zsum and as point
   at the rows' first block (row stride ldb bytes), ws at the blocks' [NB * 16] weight scales. Per block:
   int32 sums from zsum, then accf [5][64] += float(sum) * (weight scale x row scale). Registers: sums
   zmm0-19 (row r, panel t: 4r + t), nibbles zmm20-27, activations zmm28-29 (then the scale product), 0x0F
   bytes zmm30. Rows 3 and 4 are addressed from a3 = a + 3 lda (and from zs / as + 3 ldb in `left`, free
   outside the step loop). */
#define ASM_ROWS 5
_Static_assert(NB == 4 && MR <= ASM_ROWS, "rows5_4bit reads 4 sub-panels (256-byte rows); micro's accf holds MR rows");
static void rows5_4bit(const uint8_t *panel, const int8_t *a, size_t lda, const int32_t *zsum, const float *as,
                       size_t ldb, const float *ws, int steps, int blocks, float *accf) {
    const int8_t *a3 = a + 3 * lda;
    size_t left;
    __asm__ volatile(
        "vpternlogd $0xff, %%zmm30, %%zmm30, %%zmm30\n\t"
        "vpsrlw $12, %%zmm30, %%zmm30\n\t"
        "vpbroadcastb %%xmm30, %%zmm30\n\t"  /* 0x0F bytes */
        "2:\n\t"
        "lea (%[zs],%[ldb],2), %[left]\n\t" "add %[ldb], %[left]\n\t"  /* row 3's zsum */
        ROW_START("(%[zs])", "0", "1", "2", "3")
        ROW_START("(%[zs],%[ldb],1)", "4", "5", "6", "7")
        ROW_START("(%[zs],%[ldb],2)", "8", "9", "10", "11")
        ROW_START("(%[left])", "12", "13", "14", "15")
        ROW_START("(%[left],%[ldb],1)", "16", "17", "18", "19")
        "mov %[steps], %k[left]\n\t"
        "1:\n\t"
        NIBBLES("0", "20", "24") NIBBLES("64", "21", "25") NIBBLES("128", "22", "26") NIBBLES("192", "23", "27")
        ROW_STEP("(%[a])", "4(%[a])", "0", "1", "2", "3")
        ROW_STEP("(%[a],%[lda],1)", "4(%[a],%[lda],1)", "4", "5", "6", "7")
        ROW_STEP("(%[a],%[lda],2)", "4(%[a],%[lda],2)", "8", "9", "10", "11")
        ROW_STEP("(%[a3])", "4(%[a3])", "12", "13", "14", "15")
        ROW_STEP("(%[a3],%[lda],1)", "4(%[a3],%[lda],1)", "16", "17", "18", "19")
        "add $256, %[pp]\n\t" "add $8, %[a]\n\t" "add $8, %[a3]\n\t"
        "dec %k[left]\n\t" "jnz 1b\n\t"
        "lea (%[as],%[ldb],2), %[left]\n\t" "add %[ldb], %[left]\n\t"  /* row 3's scale */
        ROW_SCALE("(%[as])", "0", "1", "2", "3", "0", "64", "128", "192")
        ROW_SCALE("(%[as],%[ldb],1)", "4", "5", "6", "7", "256", "320", "384", "448")
        ROW_SCALE("(%[as],%[ldb],2)", "8", "9", "10", "11", "512", "576", "640", "704")
        ROW_SCALE("(%[left])", "12", "13", "14", "15", "768", "832", "896", "960")
        ROW_SCALE("(%[left],%[ldb],1)", "16", "17", "18", "19", "1024", "1088", "1152", "1216")
        "add $4, %[zs]\n\t" "add $4, %[as]\n\t" "add $256, %[ws]\n\t"
        "dec %[blocks]\n\t" "jnz 2b\n\t"
        : [pp] "+r"(panel), [a] "+r"(a), [a3] "+r"(a3), [zs] "+r"(zsum), [as] "+r"(as), [ws] "+r"(ws),
          [blocks] "+r"(blocks), [left] "=&r"(left)
        : [lda] "r"(lda), [ldb] "r"(ldb), [steps] "m"(steps), [accf] "r"(accf)
        : "cc", "memory", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10",
          "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21",
          "xmm22", "xmm23", "xmm24", "xmm25", "xmm26", "xmm27", "xmm28", "xmm29", "xmm30");
}
#undef ROW_STEP
#undef NIBBLES
#undef ROW_START
#undef SCALE
#undef ROW_SCALE

/* C rows [0, mr) x the tile's NB*16 columns n0.. (those below n_end; C points at column n0 of row 0) over k in
   [k0, k0+kc): accumulate into C (first: start from 0); last: add the bias, then FastGelu when gelu. panel: the
   tile's packed K chunk (pack_panel); ws: [block][NB*16] weight scales; zs: [block][NB*16] zero points /
   default_zero(bits), read only when has_zp. */
static inline __attribute__((always_inline)) void micro(
        const int bits, const int mr, const int has_zp, int K, int bs, int k0, int kc, const int8_t *Aq,
        const float *as, const int32_t *zsum, const uint8_t *panel, const float *ws, const float *zs,
        const float *bias, int n_end, int n0, float *C, int ldc, int first, int last, int gelu) {
    const int kb = K / bs, rows_per_step = bits / 4;  /* 64-byte panel rows per 8-k step */
    float accf[ASM_ROWS][NB * 16] __attribute__((aligned(64)));  /* MR <= ASM_ROWS */
    _Pragma("GCC unroll 8") for (int r = 0; r < mr; r++)
        _Pragma("GCC unroll 4") for (int t = 0; t < NB; t++)
            _mm512_store_ps(accf[r] + 16 * t, first ? _mm512_setzero_ps()
                            : _mm512_maskz_loadu_ps(live_columns(n_end, n0 + 16 * t), C + (size_t)r * ldc + 16 * t));
    if (bits == 4 && mr == ASM_ROWS && !has_zp) {
        rows5_4bit(panel, Aq + k0, (size_t)K, zsum + k0 / bs, as + k0 / bs, (size_t)kb * sizeof(float), ws, bs / 8,
                   kc / bs, &accf[0][0]);
    } else {
        const __m512i low = _mm512_set1_epi8(0x0F);
        for (int b0 = k0; b0 < k0 + kc; b0 += bs) {
            const int b = b0 / bs, blk = b - k0 / bs;
            __m512i acc[MR][NB];
            _Pragma("GCC unroll 8") for (int r = 0; r < mr; r++)  /* with zero points, corrected after */
                _Pragma("GCC unroll 4") for (int t = 0; t < NB; t++)
                    acc[r][t] = has_zp ? _mm512_setzero_si512() : _mm512_set1_epi32(zsum[(size_t)r * kb + b]);
            const uint8_t *pp = panel + (size_t)(b0 - k0) / 8 * rows_per_step * NB * 64;
            for (int p = 0; p < bs / 8; p++) {
                __m512i lo[NB], hi[NB];
                _Pragma("GCC unroll 4") for (int t = 0; t < NB; t++) {
                    const uint8_t *row = pp + ((size_t)p * rows_per_step * NB + t) * 64;
                    if (bits == 4) {
                        const __m512i v = _mm512_loadu_si512(row);
                        lo[t] = _mm512_and_si512(v, low);
                        hi[t] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
                    } else {
                        lo[t] = _mm512_loadu_si512(row);
                        hi[t] = _mm512_loadu_si512(row + NB * 64);
                    }
                }
                _Pragma("GCC unroll 8") for (int r = 0; r < mr; r++) {
                    const int32_t *a = (const int32_t *)(Aq + (size_t)r * K + b0 + p * 8);
                    const __m512i a_lo = _mm512_set1_epi32(a[0]), a_hi = _mm512_set1_epi32(a[1]);
                    _Pragma("GCC unroll 4") for (int t = 0; t < NB; t++) {
                        acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], lo[t], a_lo);
                        acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], hi[t], a_hi);
                    }
                }
            }
            _Pragma("GCC unroll 4") for (int t = 0; t < NB; t++) {
                const __m512 w = _mm512_loadu_ps(ws + (size_t)blk * NB * 16 + t * 16);
                _Pragma("GCC unroll 8") for (int r = 0; r < mr; r++) {
                    __m512 d = _mm512_cvtepi32_ps(acc[r][t]);
                    if (has_zp)  /* - z * sum(a) = (z / zero) * zsum */
                        d = _mm512_fmadd_ps(_mm512_loadu_ps(zs + (size_t)blk * NB * 16 + t * 16),
                                            _mm512_set1_ps((float)zsum[(size_t)r * kb + b]), d);
                    _mm512_store_ps(accf[r] + 16 * t, _mm512_fmadd_ps(d, _mm512_mul_ps(w, _mm512_set1_ps(as[(size_t)r * kb + b])),
                                                                      _mm512_load_ps(accf[r] + 16 * t)));
                }
            }
        }
    }
    _Pragma("GCC unroll 8") for (int r = 0; r < mr; r++)
        _Pragma("GCC unroll 4") for (int t = 0; t < NB; t++) {
            const __mmask16 live = live_columns(n_end, n0 + 16 * t);
            __m512 o = _mm512_load_ps(accf[r] + 16 * t);
            if (last && bias) o = _mm512_add_ps(o, _mm512_maskz_loadu_ps(live, bias + n0 + 16 * t));
            if (last && gelu) o = gelu_tanh512(o);
            _mm512_mask_storeu_ps(C + (size_t)r * ldc + 16 * t, live, o);
        }
}

#define MICRO_CALL(BITS, R, ZP) micro(BITS, R, ZP, K, bs, k0, kc, Aq + (size_t)m * K, as + (size_t)m * kb, \
        zsum + (size_t)m * kb, panel, ws, zs, bias, n_end, n0, C + (size_t)m * ldc + (n0 - n_begin), ldc, k0 == 0, \
        k0 + kc >= K, gelu)
#define MICRO_CASE(BITS, R, ZP) case R: MICRO_CALL(BITS, R, ZP); break;
#define MICRO_CASES(BITS, ZP) switch (M - m < MR ? M - m : MR) { \
    MICRO_CASE(BITS, 1, ZP) MICRO_CASE(BITS, 2, ZP) MICRO_CASE(BITS, 3, ZP) }

/* C[M, N] = A @ W^T (+ bias), FastGelu'd when gelu, for columns [n_begin, n_end) (multiples of 16 except at N):
   C (row stride ldc) points at column n_begin of row 0. Aq, as, zsum: A quantized by nbits_quantize_rows
   (ldq = K). B uint8 [N, K * bits / 8] (MatMulNBits, block bs), scales [N, K/bs], zp (see zero_of) or NULL.
   scratch: nbits_scratch_bytes. */
void nbits_gemm(int bits, int M, int K, int bs, int n_begin, int n_end, const int8_t *Aq, const float *as,
                const int32_t *zsum, const uint8_t *B, const float *scales, const uint8_t *zp, const float *bias,
                int gelu, float *C, int ldc, uint8_t *scratch) {
    const int kb = K / bs, kc_max = PANEL_BYTES / (16 * bits) * 8;  /* 4096 k (4-bit), 2048 k (8-bit) */
    /* K in chunks of at most kc_max (whole blocks): the tile's panels stay in L1/L2 */
    const int chunks = (K + kc_max - 1) / kc_max, kc_step = ((K / chunks + bs - 1) / bs) * bs;
    uint8_t *panel = scratch;
    float *ws = (float *)(scratch + NB * PANEL_BYTES), *zs = ws + (KC_MAX / 16) * NB * 16;
    for (int n0 = n_begin; n0 < n_end; n0 += NB * 16) {
        for (int k0 = 0; k0 < K; k0 += kc_step) {
            const int kc = K - k0 < kc_step ? K - k0 : kc_step;
            for (int t = 0; t < NB; t++) pack_panel(bits, B, K * bits / 8, n0 + 16 * t, n_end, k0, kc, t, panel);
            for (int b = k0 / bs; b < (k0 + kc) / bs; b++)
                for (int j = 0; j < NB * 16; j++) {
                    const int n = n0 + j < n_end ? n0 + j : n_end - 1;
                    ws[(size_t)(b - k0 / bs) * NB * 16 + j] = scales[(size_t)n * kb + b];
                    if (zp) zs[(size_t)(b - k0 / bs) * NB * 16 + j] = zero_of(bits, zp, kb, n, b) / default_zero(bits);
                }
            int m = 0;  /* 4-bit without zero points: the assembly kernel's rows first */
            if (bits == 4 && !zp)
                for (; M - m >= ASM_ROWS; m += ASM_ROWS) MICRO_CALL(4, ASM_ROWS, 0);
            for (; m < M; m += MR) {  /* a specialized kernel per bit width, row count and zero points */
                if (zp) { if (bits == 4) MICRO_CASES(4, 1) else MICRO_CASES(8, 1) }
                else if (bits == 4) MICRO_CASES(4, 0) else MICRO_CASES(8, 0)
            }
        }
    }
}

/* The GEMV reads B in chunks of 64 bytes per column: 128 k of 4-bit or 64 k of 8-bit, 16 lanes of 8 or 4 k. */
static inline int chunk_k(int bits) { return 512 / bits; }

/* How many chunks a K-deep row takes: ag holds 128 bytes per chunk, lane_scale and lane_sum 16 floats. */
int nbits_gemv_chunks(int bits, int K) { return (K + chunk_k(bits) - 1) / chunk_k(bits); }

/* GEMV operands for one quantized row, per chunk: 4-bit, the even then the odd dwords of Aq (lane l of a B
   chunk holds k 8l..8l+7 as nibbles); 8-bit, Aq's 64 bytes; each lane's scale (of its block) and the sum of
   its values. */
void nbits_gemv_prepare(int bits, int K, int bs, const int8_t *aq, const float *as, int8_t *ag, float *lane_scale,
                        float *lane_sum) {
    const int chunks = nbits_gemv_chunks(bits, K), ck = chunk_k(bits), lane_k = ck / 16;
    memset(ag, 0, (size_t)chunks * 128);
    for (int c = 0; c < chunks; c++)
        for (int l = 0; l < 16; l++) {
            const int k = c * ck + lane_k * l;
            int32_t *dwords = (int32_t *)(ag + (size_t)c * 128);
            float sum = 0.f, scale = 0.f;
            if (k < K) {  /* K is a multiple of 16: a lane is all inside or all past it */
                memcpy(dwords + l, aq + k, 4);
                if (bits == 4) memcpy(dwords + 16 + l, aq + k + 4, 4);
                for (int i = 0; i < lane_k; i++) sum += aq[k + i];
                scale = as[k / bs];
            }
            lane_scale[c * 16 + l] = scale;
            lane_sum[c * 16 + l] = sum;
        }
}

/* Column n's scales (or zero points) v for the lanes of a chunk starting at block b0, which spans per_chunk
   blocks (a constant after inlining; lane_block maps lanes to them). Full chunks load exactly the chunk's
   blocks; the last, partial chunk masks the load to its nblk blocks. */
static inline __attribute__((always_inline)) __m512 lane_values(const float *v, int b0, int nblk, int per_chunk,
                                                                int full, __m512i lane_block) {
    if (per_chunk == 1) return _mm512_set1_ps(v[b0]);
    if (!full) return _mm512_permutexvar_ps(lane_block, _mm512_maskz_loadu_ps((__mmask16)((1u << nblk) - 1), v + b0));
    if (per_chunk == 2)
        return _mm512_permutexvar_ps(lane_block, _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd((const double *)(v + b0)))));
    if (per_chunk == 4) return _mm512_permutexvar_ps(lane_block, _mm512_castps128_ps512(_mm_loadu_ps(v + b0)));
    return _mm512_permutexvar_ps(lane_block, _mm512_castps256_ps512(_mm256_loadu_ps(v + b0)));  /* 8 */
}

#define GEMV_COLS 4
#define GEMV_PREFETCH_ROWS 8   /* two column groups ahead */

/* GEMV for one bit width and block size (constants after inlining). */
static inline __attribute__((always_inline)) void gemv_bs(
        const int bits, const int bs, int K, int n_begin, int n_end, const int8_t *ag, const float *lane_scale,
        const float *lane_sum, const uint8_t *B, const float *scales, const uint8_t *zp, const float *bias, int gelu,
        float *y) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    const int ck = chunk_k(bits), kb = K / bs, chunks = nbits_gemv_chunks(bits, K), ldb = K * bits / 8;
    const int per_chunk = ck / bs > 1 ? ck / bs : 1;
    const __m512i lane_block = per_chunk > 1 ? _mm512_srli_epi32(_mm512_slli_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), __builtin_ctz(ck / 16)),
        __builtin_ctz(bs)) : _mm512_setzero_si512();
    const int tail_bytes = (K - (chunks - 1) * ck) * bits / 8;
    const __mmask64 tail = tail_bytes >= 64 ? ~0ULL : ((1ULL << tail_bytes) - 1);
    float zeros[8];
    for (int n = n_begin; n < n_end; n += GEMV_COLS) {
        const int cols = n_end - n < GEMV_COLS ? n_end - n : GEMV_COLS;
        __m512 acc[GEMV_COLS];
        _Pragma("GCC unroll 4") for (int j = 0; j < GEMV_COLS; j++) acc[j] = _mm512_setzero_ps();
        for (int c = 0; c < chunks; c++) {
            const int8_t *a = ag + (size_t)c * 128;
            const __m512i a0 = _mm512_loadu_si512(a), a1 = bits == 4 ? _mm512_loadu_si512(a + 64) : a0;
            const __m512 lsc = _mm512_loadu_ps(lane_scale + c * 16), lzs = _mm512_loadu_ps(lane_sum + c * 16);
            const int b0 = c * ck / bs, full = c + 1 < chunks || tail_bytes == 64;
            const int nblk = kb - b0 < per_chunk ? kb - b0 : per_chunk;
            _Pragma("GCC unroll 4") for (int j = 0; j < GEMV_COLS; j++) {
                if (j < cols) {
                    const uint8_t *b = B + (size_t)(n + j) * ldb + (size_t)c * 64;
                    _mm_prefetch((const char *)(b + (size_t)GEMV_PREFETCH_ROWS * ldb), _MM_HINT_T0);
                    const __m512i v = full ? _mm512_loadu_si512(b) : _mm512_maskz_loadu_epi8(tail, b);
                    __m512i dot;
                    if (bits == 4)
                        dot = _mm512_dpbusd_epi32(
                            _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(v, low), a0),
                            _mm512_and_si512(_mm512_srli_epi16(v, 4), low), a1);
                    else
                        dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v, a0);
                    const __m512 w = lane_values(scales + (size_t)(n + j) * kb, b0, nblk, per_chunk, full, lane_block);
                    __m512 z = _mm512_set1_ps(default_zero(bits));
                    if (zp) {
                        for (int i = 0; i < nblk; i++) zeros[i] = zero_of(bits, zp, kb, n + j, b0 + i);
                        z = lane_values(zeros, 0, nblk, per_chunk, 0, lane_block);
                    }
                    const __m512 t = _mm512_fnmadd_ps(z, lzs, _mm512_cvtepi32_ps(dot));
                    acc[j] = _mm512_fmadd_ps(t, _mm512_mul_ps(w, lsc), acc[j]);
                }
            }
        }
        for (int j = 0; j < cols; j++) {
            const float out = _mm512_reduce_add_ps(acc[j]) + (bias ? bias[n + j] : 0.f);
            y[n - n_begin + j] = gelu ? gelu_tanh(out) : out;
        }
    }
}

#define GEMV_CASES(BITS) switch (bs) { \
    case 16: gemv_bs(BITS, 16, K, n_begin, n_end, ag, lane_scale, lane_sum, B, scales, zp, bias, gelu, y); break; \
    case 32: gemv_bs(BITS, 32, K, n_begin, n_end, ag, lane_scale, lane_sum, B, scales, zp, bias, gelu, y); break; \
    case 64: gemv_bs(BITS, 64, K, n_begin, n_end, ag, lane_scale, lane_sum, B, scales, zp, bias, gelu, y); break; \
    default: gemv_bs(BITS, bs, K, n_begin, n_end, ag, lane_scale, lane_sum, B, scales, zp, bias, gelu, y); break; }

/* y[n - n_begin] = a . W[n] (+ bias), FastGelu'd when gelu, for n in [n_begin, n_end), one prepared row (see
   nbits_gemv_prepare). */
void nbits_gemv(int bits, int K, int bs, int n_begin, int n_end, const int8_t *ag, const float *lane_scale,
                const float *lane_sum, const uint8_t *B, const float *scales, const uint8_t *zp, const float *bias,
                int gelu, float *y) {
    if (bits == 4) GEMV_CASES(4) else GEMV_CASES(8)
}

const size_t nbits_scratch_bytes = NB * (PANEL_BYTES + 2 * (KC_MAX / 16) * 16 * sizeof(float));
