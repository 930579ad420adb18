// CPU kernels of the blocked KV cache: the store, and a ragged attention that reads the blocks in
// place (no per-layer copy of anyone's context); and a linear layer over weights packed in panels.
// Registered as torch operators (the end of this file), built by kernels/cpu.py with -fopenmp so that
// they share the OpenMP runtime torch has already loaded.
// Shapes and the batch contract are those of kernels/reference.py.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <span>
#include <type_traits>
#include <vector>
#include <omp.h>
#include <unistd.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

// bf16 is the top half of an fp32: widening is a shift, narrowing rounds to nearest even.
struct bf16 { uint16_t bits; };

inline float widen(float x) { return x; }
inline float widen(bf16 x) {
    uint32_t u = uint32_t(x.bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
// The fp32 bits u (a uint32_t, or a vector of them) rounded to bf16's, in the top half: nearest even, a NaN stays
// a NaN (made quiet). Without branches, so that loops of it vectorize.
template <typename U>
inline U bf16_bits(U u) {
    return (u & 0x7fffffffu) > 0x7f800000u ? (u | 0x400000u) & 0xffff0000u : (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
}
inline void narrow(float x, float* out) { *out = x; }
inline void narrow(float x, bf16* out) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    out->bits = uint16_t(bf16_bits(u) >> 16);
}

// 8-wide vectors that the compiler maps onto the machine's (AVX2 or wider, or NEON pairs).
typedef float v8f __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));

inline v8f load8(const float* p) { v8f v; std::memcpy(&v, p, sizeof v); return v; }
#if defined(__AVX2__)
// Spelled out where the compiler's generic lowering is poor: it widens bf16 in 128-bit halves (eight
// shuffles where one instruction does) and broadcasts a scalar through an add of zero and a register
// shuffle, both on the pipes the FMAs need; here a broadcast is a plain load.
inline v8f load8(const bf16* p) {
    return (v8f)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
}
inline v8f splat(const float* p) { return (v8f)_mm256_set1_ps(*p); }
#else
inline v8f load8(const bf16* p) {
    v8h h;
    std::memcpy(&h, p, sizeof h);
    v8u u = __builtin_convertvector(h, v8u) << 16;
    v8f f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}
inline v8f splat(const float* p) { return v8f{} + *p; }
#endif
// a * b + c. The build turns the compiler's own contraction off (cpu.py, -ffp-contract=off): which
// products it fused into an add depended on how it unrolled each instantiation, so one row got other
// bits in a register tile of another row count. Fused here by hand, the same in every instantiation.
inline v8f fma8(v8f a, v8f b, v8f c) {
#if defined(__FMA__)
    return (v8f)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
    return a * b + c;
#endif
}
// 16 values: fp32 as they are; bf16 packed with columns c and 8 + c in one 32-bit lane (low half, high
// half), so that one load, one shift and one mask widen them.
inline void load16(const float* p, v8f& lo, v8f& hi) {
    lo = load8(p);
    hi = load8(p + 8);
}
inline void load16(const bf16* p, v8f& lo, v8f& hi) {
    v8u u;
    std::memcpy(&u, p, sizeof u);
    const v8u a = u << 16, b = u & 0xffff0000u;
    std::memcpy(&lo, &a, sizeof lo);
    std::memcpy(&hi, &b, sizeof hi);
}
template <typename V>
inline float hsum(V v) {
    float s = 0.f;
    for (size_t e = 0; e < sizeof(V) / sizeof(float); ++e) s += v[e];
    return s;
}

// Query rows (new tokens x the query heads of one KV head) that one work item carries.
constexpr int MAX_ROWS = 48;

struct Item {
    int seq, kv_head;
    int heads;  // KV heads from kv_head on: 1, or several for a decode (a block holds their rows contiguously)
    int row;    // flat row of the item's first token
    int pos;    // its position in the sequence
    int count;  // consecutive new tokens
    bool keep;  // its sequence's chunk is several items a KV head, which share what they pack (attend_heads)
};

struct Shape {
    int hq, hkv, dim, block_size, max_blocks;
    float scale;
    int window;
};

// Where row r of an item's KV head kv_head starts in q (and out): rows run over its tokens, then the
// query heads of that KV head.
inline int64_t query_row(const Item& it, const Shape& sh, int kv_head, int r) {
    const int group = sh.hq / sh.hkv;
    return (int64_t(it.row + r / group) * sh.hq + kv_head * group + r % group) * sh.dim;
}

// Where the item's KV head's row of a key (a position in its sequence) starts in the caches.
inline int64_t key_row(const Item& it, const Shape& sh, const int32_t* block_tables, int key) {
    const int32_t block = block_tables[int64_t(it.seq) * sh.max_blocks + key / sh.block_size];
    return ((int64_t(block) * sh.block_size + key % sh.block_size) * sh.hkv + it.kv_head) * sh.dim;
}

template <typename T>
void store_kv(const T* key, int64_t key_stride, const T* value, int64_t value_stride, T* k_cache, T* v_cache,
              const int32_t* slots, int64_t num_tokens, int64_t row) {
#pragma omp parallel for if (num_tokens * row > (1 << 16))
    for (int64_t t = 0; t < num_tokens; ++t) {
        if (slots[t] < 0) continue;
        std::memcpy(k_cache + slots[t] * row, key + t * key_stride, row * sizeof(T));
        std::memcpy(v_cache + slots[t] * row, value + t * value_stride, row * sizeof(T));
    }
}

// exp for the softmax, a vector at a time in plain vector arithmetic (libm's is scalar): V is v8f or v16f,
// I its integer lanes, F its fused multiply-add. Range reduction to 2^n * e^r, |r| <= ln2/2, and a degree-6
// polynomial: within 2 ulp of expf.
typedef int32_t v8i __attribute__((vector_size(32)));

template <typename V, typename I, V (*F)(V, V, V)>
inline V exp_vector(V x) {
    x = x < -87.f ? V{} - 87.f : x;
    x = x > 88.f ? V{} + 88.f : x;
    const float shift = 12582912.f;  // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer
    const V n = F(x, V{} + 1.44269504f, V{} + shift) - shift;
    const V r = F(n, V{} + 2.12194440e-4f, F(-n, V{} + 0.693359375f, x));
    V p = V{} + 1.f / 720;
    for (const float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = F(p, r, V{} + c);
    I bits;
    std::memcpy(&bits, &p, sizeof bits);
    bits += __builtin_convertvector(n, I) << 23;
    std::memcpy(&p, &bits, sizeof p);
    return p;
}

inline v8f exp8(v8f x) { return exp_vector<v8f, v8i, fma8>(x); }

#if defined(__AVX512F__)
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

inline v16f fma16(v16f a, v16f b, v16f c) { return (v16f)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c); }
inline v16f exp16(v16f x) { return exp_vector<v16f, v16i, fma16>(x); }
#endif

// The build's widest vectors, for the passes over every value of a row (finish_row, add_rms_norm).
#if defined(__AVX512F__)
typedef v16f vwide;
inline vwide load_wide(const bf16* p) {
    return (v16f)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
}
inline vwide fma_wide(vwide a, vwide b, vwide c) { return fma16(a, b, c); }
inline vwide exp_wide(vwide x) { return exp16(x); }
#else
typedef v8f vwide;
inline vwide load_wide(const bf16* p) { return load8(p); }
inline vwide fma_wide(vwide a, vwide b, vwide c) { return fma8(a, b, c); }
inline vwide exp_wide(vwide x) { return exp8(x); }
#endif
constexpr int64_t WIDE = sizeof(vwide) / sizeof(float);
typedef uint32_t vwide_bits __attribute__((vector_size(sizeof(vwide))));
inline vwide load_wide(const float* p) { vwide v; std::memcpy(&v, p, sizeof v); return v; }
inline void store_wide(float* p, vwide v) { std::memcpy(p, &v, sizeof v); }
// v rounded to T's precision, still in fp32: widen(narrow(v)) of each value.
inline vwide rounded(vwide v, float*) { return v; }
inline vwide rounded(vwide v, bf16*) {
    vwide_bits u;
    std::memcpy(&u, &v, sizeof u);
    u = bf16_bits(u);
    std::memcpy(&v, &u, sizeof v);
    return v;
}
// v stored as T's values: bf16 rounded to nearest even, by the CPU's own conversion where it has one.
inline void store_narrow(float* p, vwide v) { store_wide(p, v); }
inline void store_narrow(bf16* p, vwide v) {
#if defined(__AVX512BF16__)
    const __m256bh b = _mm512_cvtneps_pbh((__m512)v);
    std::memcpy(p, &b, sizeof b);
#else
    typedef uint16_t H __attribute__((vector_size(sizeof(vwide) / 2)));
    vwide_bits u;
    std::memcpy(&u, &v, sizeof u);
    const H h = __builtin_convertvector(bf16_bits(u) >> 16, H);
    std::memcpy(p, &h, sizeof h);
#endif
}

inline float fast_exp(float x) { return exp8(v8f{} + x)[0]; }

constexpr float MASKED = -1e30f;  // finite, so masked scores never make inf - inf

inline void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof v); }

// Widens (or copies) one cache row of dim values, dim a multiple of 8 (cpu.py checks).
template <typename T>
inline void copy_row(const T* src, float* dst, int dim) {
    for (int d = 0; d < dim; d += 8) store8(dst + d, load8(src + d));
}

// Calls f(std::integral_constant<int, n>()) for n in 1..6: the row counts of the register tiles below.
template <typename F>
inline void with_count(int n, F f) {
    switch (n) {
        case 1: f(std::integral_constant<int, 1>()); break;
        case 2: f(std::integral_constant<int, 2>()); break;
        case 3: f(std::integral_constant<int, 3>()); break;
        case 4: f(std::integral_constant<int, 4>()); break;
        case 5: f(std::integral_constant<int, 5>()); break;
        default: f(std::integral_constant<int, 6>()); break;
    }
}
constexpr int TILE = 6;  // 6 x 2 accumulators + 2 loaded vectors + a broadcast fit 16 vector registers

// Keys per step of the online softmax, for prompt and decode items alike, in blocks aligned to multiples
// of LANES key positions: a query row then gets the same bits whichever item carries it (a prompt chunk
// of any size, or a decode), since every sum over keys runs in one order (attend_rows spells out the
// decode's). That makes a request's outputs independent of the batch and of how its prompt was chunked.
constexpr int LANES = 16;
// Keys a prompt item gathers and multiplies at a time: two blocks (with one, a 256-token prompt's
// attention took 5-15% longer, measured).
constexpr int CHUNK = 2 * LANES;

// acc[i] += x[i][.] @ b: NR rows of x (row stride ldx) times b's 16 columns (row stride ldb) over K: the
// register tile of the matrix products here, scores and linear layers alike.
template <int NR, typename W>
inline void tile_product(const float* x, int64_t ldx, const W* b, int64_t ldb, int64_t K, v8f (&acc)[NR][2]) {
#pragma GCC unroll 4  // fewer loop instructions per FMA; with load16, 1.03-1.15x (measured)
    for (int64_t k = 0; k < K; ++k) {
        v8f b0, b1;
        load16(b + k * ldb, b0, b1);
        for (int i = 0; i < NR; ++i) {
            const v8f xi = splat(x + i * ldx + k);
            acc[i][0] = fma8(xi, b0, acc[i][0]);
            acc[i][1] = fma8(xi, b1, acc[i][1]);
        }
    }
}

// Over n keys, block by block of LANES keys b: acc[i][0 .. 8 NV) = acc[i] * rescale[b * ldr + i] + sum over the
// block's keys j of p[j * pj + i * pi] * values[j * ldv][0 .. 8 NV), NR rows of acc (row stride lda). The
// blocks' rescales are applied in registers, with the bits of one call per block.
template <int NR, int NV>
inline void value_tile(const float* p, int pj, int pi, const float* values, int64_t ldv, int n, const float* rescale,
                       int ldr, float* acc, int lda) {
    v8f a[NR][NV];
    for (int i = 0; i < NR; ++i)
        for (int v = 0; v < NV; ++v) a[i][v] = load8(acc + i * lda + 8 * v);
    for (int j0 = 0; j0 < n; j0 += LANES) {
        for (int i = 0; i < NR; ++i)
            for (int v = 0; v < NV; ++v) a[i][v] *= rescale[j0 / LANES * ldr + i];
        for (int j = j0; j < std::min(n, j0 + LANES); ++j) {
            v8f x[NV];
            for (int v = 0; v < NV; ++v) x[v] = load8(values + j * ldv + 8 * v);
            for (int i = 0; i < NR; ++i) {
                const v8f w = splat(p + j * pj + i * pi);
                for (int v = 0; v < NV; ++v) a[i][v] = fma8(w, x[v], a[i][v]);
            }
        }
    }
    for (int i = 0; i < NR; ++i)
        for (int v = 0; v < NV; ++v) store8(acc + i * lda + 8 * v, a[i][v]);
}

// acc (NR rows of dim) = acc * rescale + p @ values over n keys, block by block, 16 columns at a time (then 8).
template <int NR>
inline void weighted_values(const float* p, int pj, int pi, const float* values, int64_t ldv, int n,
                            const float* rescale, int ldr, float* acc, int dim) {
    int d0 = 0;
    for (; d0 + 16 <= dim; d0 += 16) value_tile<NR, 2>(p, pj, pi, values + d0, ldv, n, rescale, ldr, acc + d0, dim);
    if (d0 < dim) value_tile<NR, 1>(p, pj, pi, values + d0, ldv, n, rescale, ldr, acc + d0, dim);
}

// An item of several row groups (a prompt's tokens x the query heads of one KV head), flash style over
// chunks of CHUNK keys gathered into fp32 scratch: scores and weighted values are two small matrix
// products over register tiles, and the online softmax steps through the chunk's blocks of LANES keys.
template <typename T>
void attend_rows(const Item& it, const Shape& sh, const T* q, const T* k_cache, const T* v_cache,
                 const int32_t* block_tables, T* out, std::vector<float>& scratch) {
    constexpr int BLOCKS = CHUNK / LANES;
    const int group = sh.hq / sh.hkv, dim = sh.dim;
    const int rows = it.count * group, padded = (rows + LANES - 1) / LANES * LANES;
    scratch.assign(size_t(padded) * (2 * dim + CHUNK + 2 + BLOCKS) + size_t(CHUNK) * 2 * dim, 0.f);
    float* qt = scratch.data();          // [dim][padded] queries transposed and scaled; padding rows 0
    float* acc = qt + padded * dim;      // [padded][dim]
    float* s = acc + padded * dim;       // [CHUNK][padded] scores, then softmax weights
    float* m = s + CHUNK * padded;       // running max per row
    float* l = m + padded;               // running sum per row
    float* rescale = l + padded;         // [BLOCKS][padded] each block's factor on the sums before it
    float* kf = rescale + BLOCKS * padded;  // the chunk's keys [CHUNK][dim]
    float* vf = kf + CHUNK * dim;        // and values
    for (int r = 0; r < rows; ++r) {
        const T* src = q + query_row(it, sh, it.kv_head, r);
        for (int d = 0; d < dim; ++d) qt[d * padded + r] = widen(src[d]) * sh.scale;
    }
    std::fill(m, m + padded, MASKED);
    const int last = it.pos + it.count - 1;
    const int lo = sh.window > 0 ? std::max(0, it.pos - sh.window + 1) : 0;
    for (int c0 = lo / LANES * LANES; c0 <= last; c0 += CHUNK) {
        const int n = std::min(CHUNK, last + 1 - c0);  // keys c0 .. c0 + n - 1
        for (int j = 0; j < n; ++j) {
            const int64_t at = key_row(it, sh, block_tables, c0 + j);
            copy_row(k_cache + at, kf + j * dim, dim);
            copy_row(v_cache + at, vf + j * dim, dim);
        }
        for (int j0 = 0; j0 < n; j0 += TILE)
            with_count(std::min(TILE, n - j0), [&](auto nk) {  // scores [key][row], 16 rows at a time
                constexpr int NK = decltype(nk)::value;
                for (int r0 = 0; r0 < padded; r0 += LANES) {
                    v8f a[NK][2] = {};
                    tile_product(kf + j0 * dim, dim, qt + r0, padded, dim, a);
                    for (int j = 0; j < NK; ++j) {
                        store8(s + (j0 + j) * padded + r0, a[j][0]);
                        store8(s + (j0 + j) * padded + r0 + 8, a[j][1]);
                    }
                }
            });
        for (int r = 0; r < padded; r += 8) {  // the online softmax, eight rows per vector
            v8i pos;  // each row's position: it sees keys in (pos - window, pos]; padding rows repeat the last
            for (int e = 0; e < 8; ++e) pos[e] = it.pos + std::min(r + e, rows - 1) / group;
            const v8i from = sh.window > 0 ? pos - (sh.window - 1) : v8i{} + lo;
            for (int b0 = 0; b0 < n; b0 += LANES) {  // a block: what attend_decode does with its keys' lanes
                const int nb = std::min(LANES, n - b0);
                float* sb = s + b0 * padded + r;
                const v8f before = load8(m + r);
                v8f top = before;
                for (int j = 0; j < nb; ++j) {
                    const v8i key = v8i{} + (c0 + b0 + j);
                    v8f x = load8(sb + j * padded);
                    x = ((key >= from) & (key <= pos)) ? x : v8f{} + MASKED;
                    top = x > top ? x : top;
                    store8(sb + j * padded, x);
                }
                for (int j = 0; j < nb; ++j) {
                    const v8f x = load8(sb + j * padded);
                    store8(sb + j * padded, x == MASKED ? v8f{} : exp8(x - top));
                }
                v8f sum = {};  // in attend_decode's order: hsum over lanes j of keys j + (8 + j)
                for (int j = 0; j < 8; ++j)
                    sum += (j < nb ? load8(sb + j * padded) : v8f{}) + (j + 8 < nb ? load8(sb + (j + 8) * padded) : v8f{});
                const v8f factor = exp8(before - top);
                store8(rescale + b0 / LANES * padded + r, factor);
                store8(m + r, top);
                store8(l + r, load8(l + r) * factor + sum);
            }
        }
        for (int r0 = 0; r0 < rows; r0 += TILE)
            with_count(std::min(TILE, rows - r0), [&](auto nr) {
                weighted_values<decltype(nr)::value>(s + r0, padded, 1, vf, dim, n, rescale + r0, padded,
                                                     acc + r0 * dim, dim);
            });
    }
    for (int r = 0; r < rows; ++r) {
        T* dst = out + query_row(it, sh, it.kv_head, r);
        const float inv = 1.f / l[r];
        for (int d = 0; d < dim; ++d) narrow(acc[r * dim + d] * inv, dst + d);
    }
}

// Eight rows of eight become eight columns: the classic three rounds of shuffles.
inline void transpose8(v8f (&r)[8]) {
    v8f t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
        t[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
    }
    for (int i = 0; i < 8; i += 4)
        for (int h = 0; h < 2; ++h) {
            u[i + 2 * h] = __builtin_shufflevector(t[i + h], t[i + h + 2], 0, 1, 8, 9, 4, 5, 12, 13);
            u[i + 2 * h + 1] = __builtin_shufflevector(t[i + h], t[i + h + 2], 2, 3, 10, 11, 6, 7, 14, 15);
        }
    for (int i = 0; i < 4; ++i) {
        r[i] = __builtin_shufflevector(u[i], u[i + 4], 0, 1, 2, 3, 8, 9, 10, 11);
        r[i + 4] = __builtin_shufflevector(u[i], u[i + 4], 4, 5, 6, 7, 12, 13, 14, 15);
    }
}

inline float hmax(v8f v) {
    float best = v[0];
    for (int e = 1; e < 8; ++e) best = std::max(best, v[e]);
    return best;
}

// A decode item: NR rows per KV head (a token or two times the query heads of one KV head) against
// LANES keys at a time, one key per vector lane. The keys' and values' rows are first copied (widened)
// into fp32 scratch, in turn: from memory that streams faster than computing on the cache in place
// (measured). Each head's keys are then transposed into kt [dim][LANES], so the scores are a register
// tile_product of the rows against them (no horizontal sum per key), and the online softmax runs on
// those registers.
template <typename T, int NR>
void attend_decode(const Item& it, const Shape& sh, const T* q, const T* k_cache, const T* v_cache,
                   const int32_t* block_tables, T* out, std::vector<float>& scratch) {
    const int group = sh.hq / sh.hkv, dim = sh.dim, total = it.heads * NR;
    const int width = it.heads * dim;  // of a key's (and a value's) row in kf (vf)
    scratch.assign(size_t(total) * (2 * dim + 2) + size_t(dim + NR) * LANES + size_t(2 * LANES) * width, 0.f);
    float* qf = scratch.data();       // [heads][NR][dim] scaled queries
    float* acc = qf + total * dim;    // [heads][NR][dim]
    float* m = acc + total * dim;     // running max per row
    float* l = m + total;             // running sum per row
    float* kt = l + total;            // one head's keys [dim][LANES]
    float* p = kt + dim * LANES;      // their softmax weights [NR][LANES]
    float* kf = p + NR * LANES;       // the keys' rows [LANES][width]
    float* vf = kf + LANES * width;   // and the values'
    for (int r = 0; r < total; ++r) {  // row r: head r / NR, token (r % NR) / group
        const int hh = r / NR, i = r % NR;
        const T* src = q + query_row(it, sh, it.kv_head + hh, i);
        for (int d = 0; d < dim; ++d) qf[r * dim + d] = widen(src[d]) * sh.scale;
    }
    std::fill(m, m + total, MASKED);
    const int last = it.pos + it.count - 1;
    const int lo = sh.window > 0 ? std::max(0, it.pos - sh.window + 1) : 0;
    const int64_t stride = int64_t(sh.hkv) * dim;  // between consecutive keys of a block
    for (int j0 = lo / LANES * LANES; j0 <= last; j0 += LANES) {
        const int n = std::min(LANES, last + 1 - j0);  // keys j0 .. j0 + n - 1, all in one block
        const int64_t first = key_row(it, sh, block_tables, j0);
        for (int j = 0; j < n; ++j) {
            copy_row(k_cache + first + j * stride, kf + j * width, width);
            copy_row(v_cache + first + j * stride, vf + j * width, width);
        }
        for (int hh = 0; hh < it.heads; ++hh) {
            const float* keys = kf + hh * dim;
            for (int j = 0; j < n; j += 8)
                for (int d0 = 0; d0 < dim; d0 += 8) {
                    v8f r[8];
                    for (int e = 0; e < 8; ++e) r[e] = j + e < n ? load8(keys + (j + e) * width + d0) : v8f{};
                    transpose8(r);
                    for (int e = 0; e < 8; ++e) store8(kt + (d0 + e) * LANES + j, r[e]);
                }
            v8f s[NR][2] = {};
            const float* rows = qf + hh * NR * dim;
            tile_product(rows, dim, kt, LANES, dim, s);
            float rescale[NR];
            for (int i = 0; i < NR; ++i) {
                const int pos = it.pos + i / group;  // this row sees keys in (pos - window, pos]
                const int from = sh.window > 0 ? pos - sh.window + 1 : 0;
                float* mi = m + hh * NR + i;
                v8f top = v8f{} + *mi;
                for (int h = 0; h < 2; ++h) {
                    const v8i key = v8i{0, 1, 2, 3, 4, 5, 6, 7} + (j0 + 8 * h);
                    s[i][h] = ((key >= from) & (key <= pos)) ? s[i][h] : v8f{} + MASKED;
                    top = s[i][h] > top ? s[i][h] : top;
                }
                const float best = hmax(top);
                v8f sum = {};
                for (int h = 0; h < 2; ++h) {
                    const v8f e = s[i][h] == MASKED ? v8f{} : exp8(s[i][h] - best);
                    store8(p + i * LANES + 8 * h, e);
                    sum += e;
                }
                rescale[i] = fast_exp(*mi - best);
                *mi = best;
                l[hh * NR + i] = l[hh * NR + i] * rescale[i] + hsum(sum);
            }
            weighted_values<NR>(p, 1, LANES, vf + hh * dim, width, n, rescale, 0, acc + hh * NR * dim, dim);
        }
    }
    for (int r = 0; r < total; ++r) {
        const int hh = r / NR, i = r % NR;
        T* dst = out + query_row(it, sh, it.kv_head + hh, i);
        const float inv = 1.f / l[r];
        for (int d = 0; d < dim; ++d) narrow(acc[r * dim + d] * inv, dst + d);
    }
}

// Whether ATen's brgemm multiplies bf16 pairs here. oneDNN can be capped below it (ONEDNN_MAX_CPU_ISA=AVX2) or
// turned off; ATen then throws, which inside a parallel region ends the process. Tried once, outside any.
bool brgemm_takes_bf16() {
    static const bool takes = [] {
        std::vector<at::BFloat16> a(2, 1.f), b(2 * 16, 1.f);
        float c[16];
        try {
            at::native::cpublas::brgemm(1, 16, 2, 2, 16, 16, false, a.data(), b.data(), c, true);
            at::native::cpublas::brgemm_release();
            return true;
        } catch (const c10::Error&) {
            return false;
        }
    }();
    return takes;
}

#if defined(__AVX512BF16__)
// bf16 attention through ATen's batch-reduce GEMM (oneDNN's micro-kernels: AMX tiles, or AVX-512 BF16 dot
// products), reading the cache unwidened. One function serves every item, a decode or a prompt chunk of any
// size, and a query row gets the same bits in each: the GEMMs give a row the same bits at any row count
// (tests/test_batch_invariance.py), and the softmax is the row's own vector code. Keys go in spans of SPAN
// aligned to key 0, each one step of the online softmax: the span's scores in one product, the weights rounded
// to bf16 (as flash attention does in bf16), and the weighted values added to the rescaled sums in a second.
// A span's keys past the item's last are zero and a row's unseen keys weigh 0, so neither adds anything.
constexpr int SPAN = 256;
constexpr float LOG2E = 1.44269504f;
// A product's rows are padded to a multiple of this, so that fewer kernels are generated. Not of 16: a decode
// of 3 query heads a KV head padded to 16 rows took 1.3x as long on AVX-512 BF16 (measured, without AMX).
constexpr int GEMM_ROWS = 4;
constexpr int PROMPT_ROWS = 96;  // query rows of a prompt item (a product of more rows ran slower per row)

// Sixteen rows of sixteen 32-bit values become sixteen columns: pairs of 32 bits, then of 64, then 128-bit lanes.
inline void transpose16(__m512i (&r)[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    __m512i u[16];  // u[4 g + c]: rows 4 g .. 4 g + 3 of columns 4 L + c, in 128-bit lane L
    for (int g = 0; g < 4; ++g) {
        const __m512i *a = t + 4 * g, *b = t + 4 * g + 2;
        u[4 * g] = _mm512_unpacklo_epi64(a[0], b[0]);
        u[4 * g + 1] = _mm512_unpackhi_epi64(a[0], b[0]);
        u[4 * g + 2] = _mm512_unpacklo_epi64(a[1], b[1]);
        u[4 * g + 3] = _mm512_unpackhi_epi64(a[1], b[1]);
    }
    for (int c = 0; c < 4; ++c) {
        const __m512i ab_lo = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44), ab_hi = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xee);
        const __m512i cd_lo = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44);
        const __m512i cd_hi = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xee);
        r[c] = _mm512_shuffle_i32x4(ab_lo, cd_lo, 0x88);
        r[4 + c] = _mm512_shuffle_i32x4(ab_lo, cd_lo, 0xdd);
        r[8 + c] = _mm512_shuffle_i32x4(ab_hi, cd_hi, 0x88);
        r[12 + c] = _mm512_shuffle_i32x4(ab_hi, cd_hi, 0xdd);
    }
}

// Sixteen keys of one head (n of them from `first`, the rest zero) as the scores' right operand (VNNI,
// pairs of dims): kt[p * ld + j] holds key j's dims 2 p and 2 p + 1.
inline void pack_keys(const bf16* first, int64_t stride, int n, int dim, uint32_t* kt, int64_t ld) {
    for (int p0 = 0; p0 < dim / 2; p0 += 16) {
        __m512i r[16];
        for (int j = 0; j < 16; ++j) r[j] = j < n ? _mm512_loadu_si512(first + j * stride + 2 * p0) : _mm512_setzero_si512();
        transpose16(r);
        for (int p = 0; p < 16; ++p) _mm512_storeu_si512(kt + (p0 + p) * ld, r[p]);
    }
}

// And their values as the weighted sum's right operand: row j of vv holds keys 2 j and 2 j + 1 side by side
// for every dim. The unpacks interleave within 128-bit lanes, so the products' columns come out of dim order
// (attend_heads puts them back).
inline void pack_values(const bf16* first, int64_t stride, int n, int dim, uint32_t* vv) {
    for (int j = 0; j < 8; ++j)
        for (int c = 0; c < dim; c += 32) {
            const __m512i a = 2 * j < n ? _mm512_loadu_si512(first + 2 * j * stride + c) : _mm512_setzero_si512();
            const __m512i b = 2 * j + 1 < n ? _mm512_loadu_si512(first + (2 * j + 1) * stride + c) : _mm512_setzero_si512();
            _mm512_storeu_si512(vv + j * dim + c, _mm512_unpacklo_epi16(a, b));
            _mm512_storeu_si512(vv + j * dim + c + 16, _mm512_unpackhi_epi16(a, b));
        }
}

// c[M, N] (row stride ldc) = a[M, K] (row stride lda) @ b, b [K / 2][ldb][2] (its first N columns), plus c where add.
inline void gemm(int64_t M, int64_t N, int64_t K, const void* a, int64_t lda, const void* b, int64_t ldb, float* c,
                 int64_t ldc, bool add) {
    at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, static_cast<const at::BFloat16*>(a),
                                static_cast<const at::BFloat16*>(b), c, true);
}

// The spans of keys and values a thread packed for the KV head of a sequence it attended last, kept for its next
// items of that head (paged_attention hands a thread a head's items in a run): an item sees every key up to its
// own last, so packing within the items packed a 384-token prompt's first span 12 times, a quarter of a prompt
// step's attention (measured, Xeon with AMX). A span's keys packed for a later item than the one at hand are
// real keys past its last, which its weights mask. An item that shares nothing (a decode's) packs each span into
// its own scratch instead: through here, a decode of 4000 keys took 1.2-1.5x as long.
struct PackedSpans {
    int seq = -1, kv_head = -1;
    std::vector<int> keys;         // per span: how many of its keys are packed
    std::vector<uint32_t> data;    // per span: kt [dim / 2][SPAN], then vv [SPAN / 2][dim]
};

// 2^t for the softmax weights, which are rounded to bf16 (8 bits of mantissa) right after: t = n + f with n an
// integer and |f| <= 1/2, 2^f by its degree-5 Taylor polynomial (relative error under 3e-6, far below bf16's
// 2^-9), and scalef for 2^n, which also takes a masked key's huge negative t to 0. Half the instructions of
// exp16, in the loop that bounds a prompt's attention (measured).
inline __m512 exp2_for_bf16(__m512 t) {
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(1.33335581e-3f);  // (ln 2)^k / k!, k = 5 down to 0
    for (const float c : {9.61812911e-3f, 5.55041087e-2f, 2.40226507e-1f, 6.93147181e-1f, 1.f})
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
    return _mm512_scalef_ps(p, n);
}

// The rows of an item (its tokens x the query heads of each of its KV heads), span by span. A decode carries
// all the KV heads: a key group's rows are then packed for every head at once, so that the cache's lines (each
// holding a key of several heads) stream from memory once, where packing one head's span after another read
// them in strided passes that took 1.8-2.3x as long as the same heads with the cache in L2 (measured, Xeon with
// AMX). An item carries at most HEADS_TOGETHER heads (paged_attention), so that the scratch of a model with
// many KV heads stays in L2.
constexpr int HEADS_TOGETHER = 4;
void attend_heads(const Item& it, const Shape& sh, const bf16* q, const bf16* k_cache, const bf16* v_cache,
                  const int32_t* block_tables, bf16* out, std::vector<float>& scratch, PackedSpans& packed) {
    const int group = sh.hq / sh.hkv, dim = sh.dim, rows = it.count * group, heads = it.heads;
    const int padded = (rows + GEMM_ROWS - 1) / GEMM_ROWS * GEMM_ROWS;
    // A head's parts, in floats, each rounded up to 64 bytes; kt and vv are in `packed` where the item keeps them
    // (an item of one head: a chunk of several items a head has more than TILE rows in each).
    const bool keep = it.keep;
    const size_t spans = keep ? 0 : size_t(dim) * SPAN / 2;
    const size_t sizes[] = {size_t(padded) * dim / 2, size_t(padded) * SPAN, size_t(padded) * SPAN / 2, spans, spans,
                            size_t(padded) * dim, size_t(padded), size_t(padded)};
    size_t each = 0;
    for (const size_t n : sizes) each += (n + 15) / 16 * 16;
    if (scratch.size() < heads * each + 16) scratch.resize(heads * each + 16);
    float* base = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(scratch.data()) + 63) & ~uintptr_t(63));
    struct Head {
        bf16* queries;   // [padded][dim]
        float* scores;   // [padded][SPAN]
        bf16* weights;   // [padded][SPAN]: its padding rows stay zero
        uint32_t* kt;    // [dim / 2][width], unless kept
        uint32_t* vv;    // [width / 2][dim], unless kept
        float *acc, *m, *l;  // [padded][dim], [padded], [padded]
    };
    Head state[HEADS_TOGETHER];
    for (int h = 0; h < heads; ++h) {
        float* part[8];
        float* at = base + h * each;
        for (int i = 0; i < 8; ++i, at += (sizes[i - 1] + 15) / 16 * 16) part[i] = at;
        Head& hd = state[h];
        hd = {reinterpret_cast<bf16*>(part[0]), part[1], reinterpret_cast<bf16*>(part[2]),
              reinterpret_cast<uint32_t*>(part[3]), reinterpret_cast<uint32_t*>(part[4]), part[5], part[6], part[7]};
        for (int r = 0; r < rows; ++r)
            std::memcpy(hd.queries + r * dim, q + query_row(it, sh, it.kv_head + h, r), dim * sizeof(bf16));
        std::memset(static_cast<void*>(hd.queries + rows * dim), 0, size_t(padded - rows) * dim * sizeof(bf16));
        std::memset(static_cast<void*>(hd.weights + rows * SPAN), 0, size_t(padded - rows) * SPAN * sizeof(bf16));
        std::fill(hd.acc, hd.acc + size_t(padded) * dim, 0.f);
        std::fill(hd.m, hd.m + padded, MASKED);
        std::fill(hd.l, hd.l + padded, 0.f);
    }
    const int last = it.pos + it.count - 1;
    const int lo = sh.window > 0 ? std::max(0, it.pos - sh.window + 1) : 0;
    const int64_t stride = int64_t(sh.hkv) * dim;  // between consecutive keys of a block
    const int64_t span_size = int64_t(dim) * SPAN;  // a packed span's kt and vv, in pairs of bf16
    const v16i lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    if (keep && (packed.seq != it.seq || packed.kv_head != it.kv_head)) {
        packed.seq = it.seq, packed.kv_head = it.kv_head;
        packed.keys.clear();
    }
    if (keep && packed.keys.size() <= size_t(last / SPAN)) {
        packed.keys.resize(last / SPAN + 1);
        packed.data.resize(packed.keys.size() * span_size);
    }
    for (int s0 = lo / SPAN * SPAN; s0 <= last; s0 += SPAN) {
        const int n = std::min(SPAN, last + 1 - s0), width = (n + 31) / 32 * 32;  // keys s0 .. s0 + n - 1, then zeros
        // Each head's span of keys and values as the products' operands, from key group `from` on packed here,
        // and the keys' leading dimension: in `packed` where the item keeps them (only its keys not packed yet),
        // else in the heads' scratch.
        uint32_t *kt[HEADS_TOGETHER], *vv[HEADS_TOGETHER];
        int ld = width, from = 0;
        if (keep) {
            kt[0] = packed.data.data() + s0 / SPAN * span_size, vv[0] = kt[0] + span_size / 2, ld = SPAN;
            int& done = packed.keys[s0 / SPAN];
            from = done < n ? done / 16 * 16 : width;
            done = std::max(done, n);
        } else {
            for (int h = 0; h < heads; ++h) kt[h] = state[h].kt, vv[h] = state[h].vv;
        }
        for (int j0 = from; j0 < width; j0 += 16) {
            const int valid = std::clamp(n - j0, 0, 16);
            const int64_t first = valid > 0 ? key_row(it, sh, block_tables, s0 + j0) : 0;
            // The next 16 keys' rows (of every head: contiguous), requested a head's share at a time while this
            // group's heads are packed, so that the cache's blocks, scattered in memory, stream without a stall
            // at each one; the last group's request overlaps the span's products. 48 decodes of 410 keys took
            // 0.85 against 0.96-1.05 ms a layer (Xeon with AMX). Only items of every KV head (decodes; a prompt
            // item too where the model has one) prefetch: a prompt item of one head reads keys just stored, from
            // cache.
            const int ahead = heads == sh.hkv ? std::clamp(last + 1 - (s0 + j0 + 16), 0, 16) : 0;
            const char* next_k = nullptr;
            const char* next_v = nullptr;
            if (ahead > 0) {
                const int64_t next = key_row(it, sh, block_tables, s0 + j0 + 16);
                next_k = reinterpret_cast<const char*>(k_cache + next);
                next_v = reinterpret_cast<const char*>(v_cache + next);
            }
            const int64_t lines = (ahead * stride * int64_t(sizeof(bf16)) + 63) / 64;
            for (int h = 0; h < heads; ++h) {
                for (int64_t line = h * lines / heads; line < (h + 1) * lines / heads; ++line) {
                    _mm_prefetch(next_k + 64 * line, _MM_HINT_T0);
                    _mm_prefetch(next_v + 64 * line, _MM_HINT_T0);
                }
                pack_keys(k_cache + first + h * dim, stride, valid, dim, kt[h] + j0, ld);
                pack_values(v_cache + first + h * dim, stride, valid, dim, vv[h] + j0 / 2 * dim);
            }
        }
        // The heads' score products one after another, then their softmax, then their value products: a
        // product of another shape than the last reconfigures the tiles.
        for (int h = 0; h < heads; ++h) gemm(padded, width, dim, state[h].queries, dim, kt[h], ld, state[h].scores, SPAN, false);
        for (const Head& hd : std::span(state, heads)) {
            for (int r = 0; r < rows; ++r) {
                // The span's keys [begin, end) that this row sees: its window, up to its own position.
                const int pos = it.pos + r / group, from = sh.window > 0 ? pos - sh.window + 1 : 0;
                const int begin = std::clamp(from - s0, 0, width), end = std::clamp(pos + 1 - s0, begin, width);
                const float* row = hd.scores + r * SPAN;
                bf16* w = hd.weights + r * SPAN;
                if (begin == end) {  // none: the sums stand as they are
                    std::memset(static_cast<void*>(w), 0, width * sizeof(bf16));
                    continue;
                }
                // Only the vectors that straddle begin or end are masked; the max is over raw scores (scale > 0).
                auto seen = [&](int j) { return (lane + j >= begin) & (lane + j < end); };
                v16f most = v16f{} + MASKED;
                for (int j = begin / 16 * 16; j < end; j += 16) {
                    const v16f x = (v16f)_mm512_loadu_ps(row + j);
                    most = (v16f)_mm512_max_ps((__m512)most, (__m512)(j < begin || j + 16 > end ? (seen(j) ? x : most) : x));
                }
                const float top = std::max(hd.m[r], _mm512_reduce_max_ps((__m512)most) * sh.scale);
                // The weights e^(score * scale - top) as 2^(score * scale log2(e) - top log2(e)), 32 keys at a time,
                // and their sum by the bf16 dot product with ones: the sum of the weights the values are weighted by.
                const __m512 slope = _mm512_set1_ps(sh.scale * LOG2E), offset = _mm512_set1_ps(top * LOG2E);
                const __m512bh ones = (__m512bh)_mm512_set1_epi16(0x3f80);
                __m512 sum = _mm512_setzero_ps();
                for (int j = 0; j < width; j += 32) {
                    __m256bh e[2];
                    for (int half = 0; half < 2; ++half) {
                        const int at = j + 16 * half;
                        e[half] = (__m256bh)_mm256_setzero_si256();
                        if (at + 16 > begin && at < end) {
                            const v16f x = (v16f)exp2_for_bf16(_mm512_fmsub_ps(_mm512_loadu_ps(row + at), slope, offset));
                            e[half] = _mm512_cvtneps_pbh((__m512)(at < begin || at + 16 > end ? (seen(at) ? x : v16f{}) : x));
                        }
                    }
                    const __m512bh both = (__m512bh)_mm512_inserti64x4(_mm512_castsi256_si512((__m256i)e[0]), (__m256i)e[1], 1);
                    _mm512_storeu_si512(w + j, (__m512i)both);
                    sum = _mm512_dpbf16_ps(sum, both, ones);
                }
                const float factor = exp16(v16f{} + (hd.m[r] - top))[0];  // on the sums before this span
                hd.m[r] = top;
                hd.l[r] = hd.l[r] * factor + _mm512_reduce_add_ps(sum);
                float* a = hd.acc + r * dim;
                for (int d = 0; d < dim; d += 16) _mm512_storeu_ps(a + d, _mm512_mul_ps(_mm512_loadu_ps(a + d), _mm512_set1_ps(factor)));
            }
        }
        for (int h = 0; h < heads; ++h) gemm(padded, dim, width, state[h].weights, SPAN, vv[h], dim, state[h].acc, dim, true);
    }
    // Back from pack_values' order: of 32 columns, the first 16 hold each 8 dims' first four, the next 16
    // their last four, so the 64-bit groups of the two halves interleave.
    const __m512i order = _mm512_setr_epi64(0, 4, 1, 5, 2, 6, 3, 7);
    for (int h = 0; h < heads; ++h)
        for (int r = 0; r < rows; ++r) {
            bf16* dst = out + query_row(it, sh, it.kv_head + h, r);
            const float* a = state[h].acc + r * dim;
            const __m512 inv = _mm512_set1_ps(1.f / state[h].l[r]);
            for (int c = 0; c < dim; c += 32) {
                const __m256bh lo = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(a + c), inv));
                const __m256bh hi = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(a + c + 16), inv));
                const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512((__m256i)lo), (__m256i)hi, 1);
                _mm512_storeu_si512(dst + c, _mm512_permutexvar_epi64(order, both));
            }
        }
}
#endif

// Work units [0, n) shared out among the threads: each streams a contiguous run of its own front to back (in
// pieces of `step` units), then takes pieces from the back of the longest run left, single units at the end.
// The two cores of a shared machine ran a linear up to 1.5x apart, and with a static split the faster waited
// for the slower; handing out single units in turn interleaved the threads' reads, which then streamed about
// 1.1x slower from memory. `body(next)` runs once on each thread; next(first, count) hands it a piece, false
// once none is left.
template <typename Body>
void share_out(int64_t n, int64_t step, Body body) {
    if (n <= 0) return;
    const int threads = int(std::min<int64_t>(omp_get_max_threads(), n));
    // A run's front and back in one word, so that its owner and a thief never take the same unit.
    std::vector<std::atomic<uint64_t>> runs(threads);
    for (int t = 0; t < threads; ++t)
        runs[t] = uint64_t(n * t / threads) | uint64_t(n * (t + 1) / threads) << 32;
    auto take = [&](std::atomic<uint64_t>& run, bool back, int64_t& first, int64_t& count) {
        uint64_t span = run.load();
        for (;;) {
            const int64_t front = int64_t(span & 0xffffffff), end = int64_t(span >> 32);
            // Pieces aligned to step: the front's always, the back's while much is left (then single units).
            const int64_t piece = back ? (end - front > 2 * step && end % step == 0 ? step : 1) : step - front % step;
            count = std::min(piece, end - front);
            if (count <= 0) return false;
            first = back ? end - count : front;
            const uint64_t left = back ? uint64_t(front) | uint64_t(end - count) << 32
                                       : uint64_t(front + count) | uint64_t(end) << 32;
            if (run.compare_exchange_weak(span, left)) return true;
        }
    };
#pragma omp parallel num_threads(threads)
    {
        const int me = omp_get_thread_num();
        body([&](int64_t& first, int64_t& count) {
            if (take(runs[me], false, first, count)) return true;
            for (;;) {
                int longest = -1;
                int64_t most = 0;
                for (int t = 0; t < threads; ++t) {
                    const uint64_t span = runs[t].load();
                    const int64_t left = int64_t(span >> 32) - int64_t(span & 0xffffffff);
                    if (left > most) longest = t, most = left;
                }
                if (longest < 0) return false;
                if (take(runs[longest], true, first, count)) return true;
            }
        });
    }
}

template <typename T>
void paged_attention(const T* q, const T* k_cache, const T* v_cache, const int32_t* block_tables,
                     const int32_t* seq_lens, const int32_t* query_start_loc, int num_seqs, int num_rows,
                     const Shape& sh, T* out) {
    const int group = sh.hq / sh.hkv;
#if defined(__AVX512BF16__)
    // bf16 over cache blocks that hold whole runs of 16 keys: the GEMM path above.
    const bool gemm_path =
        std::is_same_v<T, bf16> && sh.dim % 32 == 0 && sh.block_size % 16 == 0 && brgemm_takes_bf16();
    const int tile = std::max(1, (gemm_path ? PROMPT_ROWS : MAX_ROWS) / group);  // tokens per item
    const int together = gemm_path ? HEADS_TOGETHER : sh.hkv;
#else
    const int tile = std::max(1, MAX_ROWS / group);  // tokens per item
    const int together = sh.hkv;
#endif
    // With sequences enough to share out, a decode is one item for its KV heads (up to `together` of them): it
    // copies each block whole, one contiguous run that streams from memory, where one head's rows are strided.
    const bool whole = num_seqs >= 2 * omp_get_max_threads();
    std::vector<Item> items;  // a KV head's items in a run, in order (attend_heads keeps what they share)
    for (int seq = 0; seq < num_seqs; ++seq) {
        const int start = query_start_loc[seq], n = query_start_loc[seq + 1] - start;
        const int heads = whole && n * group <= TILE ? together : 1;
        for (int h = 0; h < sh.hkv; h += heads)
            for (int t = 0; t < n; t += tile)
                items.push_back({seq, h, std::min(heads, sh.hkv - h), start + t, seq_lens[seq] - n + t,
                                 std::min(tile, n - t), n > tile});
    }
    const int used = query_start_loc[num_seqs];
    std::memset(static_cast<void*>(out + int64_t(used) * sh.hq * sh.dim), 0,
                size_t(num_rows - used) * sh.hq * sh.dim * sizeof(T));  // padding rows
    share_out(int64_t(items.size()), 1, [&](auto next) {
        std::vector<float> scratch;
#if defined(__AVX512BF16__)
        PackedSpans packed;
#endif
        for (int64_t first, count; next(first, count);)
            for (const Item& it : std::span(items.data() + first, count)) {
#if defined(__AVX512BF16__)
                if constexpr (std::is_same_v<T, bf16>)
                    if (gemm_path) {
                        attend_heads(it, sh, q, k_cache, v_cache, block_tables, out, scratch, packed);
                        continue;
                    }
#endif
                if (it.count * group > TILE)
                    attend_rows(it, sh, q, k_cache, v_cache, block_tables, out, scratch);
                else
                    with_count(it.count * group, [&](auto nr) {
                        attend_decode<T, decltype(nr)::value>(it, sh, q, k_cache, v_cache, block_tables, out, scratch);
                    });
            }
#if defined(__AVX512BF16__)
        if (gemm_path) at::native::cpublas::brgemm_release();
#endif
    });
}


// out[M, N] = x[M, K] @ w[N, K]^T (+ bias), fp32 accumulation, over w packed as [N / 16][K][16] (zero
// rows pad N) in fp32 or bf16 (its rows' columns interleaved: load16). Each panel streams through once
// for all rows of x (a step of few tokens is bound by reading the weights), 16 outputs wide, in 8-wide
// vectors kept in registers. Gated: out = silu(x @ gate^T + bias[:N]) * (x @ up^T + bias[N:]) over gate
// and up panels in turn ([2 N / 16][K][16]), the MLP's first half in one pass that writes neither product.
constexpr int PANEL = 16;

template <int ROWS, typename W>
inline void linear_tile(const float* x, const W* panel, const float* bias, float* out, int64_t N, int64_t K,
                        int cols) {
    v8f acc[ROWS][2] = {};
    tile_product(x, K, panel, PANEL, K, acc);
    for (int m = 0; m < ROWS; ++m) {
        float row[PANEL];
        std::memcpy(row, &acc[m][0], sizeof(v8f));
        std::memcpy(row + 8, &acc[m][1], sizeof(v8f));
        for (int c = 0; c < cols; ++c) out[m * N + c] = row[c] + (bias ? bias[c] : 0.0f);
    }
}

template <int ROWS, typename W>
inline void gated_tile(const float* x, const W* gate, const W* up, const float* bias, const float* up_bias,
                       float* out, int64_t N, int64_t K, int cols) {
    float g[ROWS][PANEL] = {}, u[ROWS][PANEL] = {};
    linear_tile<ROWS>(x, gate, bias, g[0], PANEL, K, cols);
    linear_tile<ROWS>(x, up, up_bias, u[0], PANEL, K, cols);
    for (int m = 0; m < ROWS; ++m) {
        float row[PANEL];
        for (int c = 0; c < PANEL; c += 8) {
            const v8f a = load8(g[m] + c);
            store8(row + c, a / (1.f + exp8(-a)) * load8(u[m] + c));
        }
        std::memcpy(out + m * N, row, cols * sizeof(float));
    }
}

template <typename W>
void packed_linear(const float* x, const W* w, const float* bias, float* out, int64_t M, int64_t N, int64_t K,
                   bool gated) {
    const int64_t panels = (N + PANEL - 1) / PANEL, panel_size = K * PANEL;
    auto panel = [&](int64_t p) {
        const int64_t n0 = p * PANEL;
        const int cols = int(std::min<int64_t>(PANEL, N - n0));
        const float* b = bias ? bias + n0 : nullptr;
        for (int64_t m = 0; m < M; m += TILE)
            with_count(int(std::min<int64_t>(TILE, M - m)), [&](auto rows) {
                constexpr int R = decltype(rows)::value;
                if (gated)
                    gated_tile<R>(x + m * K, w + 2 * p * panel_size, w + (2 * p + 1) * panel_size, b,
                                  bias ? bias + N + n0 : nullptr, out + m * N + n0, N, K, cols);
                else
                    linear_tile<R>(x + m * K, w + p * panel_size, b, out + m * N + n0, N, K, cols);
            });
    };
    if (M * N * K <= (1 << 18)) {  // too little to share
        for (int64_t p = 0; p < panels; ++p) panel(p);
        return;
    }
    share_out(panels, 1, [&](auto next) {
        for (int64_t p, count; next(p, count);) panel(p);
    });
}

// out[M, N] = x[M, K] @ w[N, K]^T (+ bias) for bf16 x and w, through ATen's batch-reduce GEMM (oneDNN's
// micro-kernels: AMX tiles or AVX-512 BF16 dot products, whichever the CPU has), fp32 accumulation. w is
// packed in chunks of CHUNK_N outputs, each [K / 2][CHUNK_N][2] and contiguous: pairs of k side by side (the
// VNNI layout both instruction sets read), zero outputs padding N to whole chunks; gated, gate's chunks then
// up's (out = silu(x @ gate^T + bias[:N]) * (x @ up^T + bias[N:])). The chunks are shared out among the
// threads, each one micro-kernel call per BLOCK_M rows (or two, for a chunk two threads share); a step of a few
// rows takes dot_product instead where that gives a row the same bits.
constexpr int64_t BLOCK_M = 64, CHUNK_N = 64;  // CHUNK_N: reference.BRGEMM_CHUNK

// One row of a chunk's products: bias added, gated where up is given, stored (narrowed where Out is bf16).
template <typename Out>
inline void finish_row(const float* acc, const float* bias, const float* up, const float* up_bias, Out* out,
                       int64_t cols) {
    int64_t j = 0;
    for (; j + WIDE <= cols; j += WIDE) {
        vwide v = load_wide(acc + j) + (bias ? load_wide(bias + j) : vwide{});
        if (up) v = v / (1.f + exp_wide(-v)) * (load_wide(up + j) + (up_bias ? load_wide(up_bias + j) : vwide{}));
        store_narrow(out + j, v);
    }
    for (; j < cols; ++j) {
        const float v = acc[j] + (bias ? bias[j] : 0.f);
        narrow(up ? v / (1.f + std::exp(-v)) * (up[j] + (up_bias ? up_bias[j] : 0.f)) : v, out + j);
    }
}

#if defined(__AVX512BF16__)
// A step of a few rows (a lone decode) is bound by reading the weights once. At one row, ATen's brgemm read a
// linear's chunks at 0.73-0.77x the speed of a plain sum over them on an AVX-512 BF16 machine, this loop at
// 0.85-1.0x (measured without AMX).
constexpr int64_t DOT_ROWS = 4;  // at 6 rows the two measured alike

// c [R][CHUNK_N] = R rows of x (row stride K) @ NV 16-column vectors of a chunk from b, pair of k by pair of k
// in order with AVX-512 BF16's dot product: the instruction and order of oneDNN's AVX-512 BF16 micro-kernel.
template <int R, int NV>
inline void dot_product(const at::BFloat16* x, int64_t K, const at::BFloat16* b, float* c) {
    const uint32_t *xp = reinterpret_cast<const uint32_t*>(x), *bp = reinterpret_cast<const uint32_t*>(b);
    __m512 acc[R][NV];
    for (int r = 0; r < R; ++r)
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
    for (int64_t p = 0; p < K / 2; ++p) {
        __m512bh w[NV];
        for (int v = 0; v < NV; ++v) w[v] = (__m512bh)_mm512_loadu_si512(bp + p * CHUNK_N + 16 * v);
        for (int r = 0; r < R; ++r) {
            const __m512bh a = (__m512bh)_mm512_set1_epi32(int(xp[r * K / 2 + p]));
            for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], a, w[v]);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + r * CHUNK_N + 16 * v, acc[r][v]);
}

// Whether dot_product gives a row the bits ATen's brgemm gives it on this machine: where oneDNN runs the same
// instruction in the same order, not where it runs AMX tiles, whose sums differ in the last bits. A row's bits
// must not depend on the row count (tests/test_batch_invariance.py). Checked once, on one chunk.
bool dot_matches_brgemm() {
    static const bool same = [] {
        constexpr int64_t K = 256;
        std::vector<at::BFloat16> x(DOT_ROWS * K), w(K * CHUNK_N);
        for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.37f * i) * float(1 + i % 5);
        for (size_t i = 0; i < w.size(); ++i) w[i] = std::cos(0.11f * i) * float(1 + i % 7);
        std::vector<float> library(DOT_ROWS * CHUNK_N), ours(DOT_ROWS * CHUNK_N);
        at::native::cpublas::brgemm(DOT_ROWS, CHUNK_N, K, K, CHUNK_N, CHUNK_N, false, x.data(), w.data(),
                                    library.data(), true);
        at::native::cpublas::brgemm_release();
        dot_product<DOT_ROWS, CHUNK_N / 16>(x.data(), K, w.data(), ours.data());
        return std::memcmp(library.data(), ours.data(), ours.size() * sizeof(float)) == 0;
    }();
    return same;
}
#endif

// acc [rows][CHUNK_N] = rows of x (row stride K) @ the first cols columns of a chunk at b.
inline void chunk_product(int64_t rows, int64_t cols, int64_t K, const at::BFloat16* x, const at::BFloat16* b,
                          float* acc, bool dot) {
#if defined(__AVX512BF16__)
    if (dot)
        return with_count(int(rows), [&](auto r) {
            constexpr int R = decltype(r)::value;
            if (cols > CHUNK_N / 2)
                dot_product<R, CHUNK_N / 16>(x, K, b, acc);
            else
                dot_product<R, CHUNK_N / 32>(x, K, b, acc);
        });
#endif
    at::native::cpublas::brgemm(rows, cols, K, K, CHUNK_N, CHUNK_N, false, x, b, acc, true);
}

// The rows of x that one pass over a linear's chunks multiplies: as many as fit in half the core's L2, so that
// each chunk's products read them from there. Read from L3 for every chunk, x of 2048 and 4096 rows took the
// linears 3.2-3.4 us a token a layer, against 2.6 at 512 rows (Xeon with AMX, bf16).
inline int64_t rows_per_pass(int64_t M, int64_t K) {
    static const int64_t budget = std::max<int64_t>(sysconf(_SC_LEVEL2_CACHE_SIZE), 1 << 20) / 2;  // bytes of x
    const int64_t passes = std::max<int64_t>(1, (M * K * int64_t(sizeof(at::BFloat16)) + budget - 1) / budget);
    return std::max<int64_t>(BLOCK_M, (M / passes + BLOCK_M - 1) / BLOCK_M * BLOCK_M);
}

template <typename Out>
void brgemm_linear(const at::BFloat16* x, const at::BFloat16* w, const float* bias, Out* out, int64_t M, int64_t N,
                   int64_t K, bool gated) {
    // Shared out in half chunks, so that the threads can finish close together; a thread's own run goes a
    // whole chunk a call. A unit is a half chunk of one pass's rows, pass by pass.
    constexpr int64_t HALF = CHUNK_N / 2;
    const int64_t chunks = (N + CHUNK_N - 1) / CHUNK_N, halves = (N + HALF - 1) / HALF;
    const int64_t pass_rows = rows_per_pass(M, K), passes = (M + pass_rows - 1) / pass_rows;
#if defined(__AVX512BF16__)
    const bool dot = M <= DOT_ROWS && dot_matches_brgemm();
#else
    const bool dot = false;
#endif
    share_out(passes * halves, 2, [&](auto next) {
        std::vector<float> buffer(2 * BLOCK_M * CHUNK_N);
        float *acc = buffer.data(), *up = gated ? acc + BLOCK_M * CHUNK_N : nullptr;
        for (int64_t u, count; next(u, count);)
            for (const int64_t end = u + count; u < end;) {  // within one chunk of one pass a call
                const int64_t h = u % halves, span = std::min({end - u, halves - h, 2 - h % 2});
                const int64_t first = u / halves * pass_rows;
                const int64_t n0 = h * HALF, cols = std::min(span * HALF, N - n0);
                const at::BFloat16* b = w + h / 2 * K * CHUNK_N + 2 * (h % 2) * HALF;  // pairs: two values a column
                for (int64_t m0 = first; m0 < std::min(M, first + pass_rows); m0 += BLOCK_M) {
                    const int64_t rows = std::min(BLOCK_M, M - m0);
                    chunk_product(rows, cols, K, x + m0 * K, b, acc, dot);
                    if (gated) chunk_product(rows, cols, K, x + m0 * K, b + chunks * K * CHUNK_N, up, dot);
                    for (int64_t m = 0; m < rows; ++m)
                        finish_row(acc + m * CHUNK_N, bias ? bias + n0 : nullptr, gated ? up + m * CHUNK_N : nullptr,
                                   gated && bias ? bias + N + n0 : nullptr, out + (m0 + m) * N + n0, cols);
                }
                u += span;
            }
        at::native::cpublas::brgemm_release();
    });
}

// sum = x + residual (in T), out = weight * (sum / rms(sum)) (the normalised row narrowed to T before the
// weight, as Hugging Face's RMSNorm does), a row at a time: one pass over the row storing the sum and adding up
// its squares, one reading the sum back from L1 for the norm. Inductor made three passes over the whole step,
// each from L3 at a 2048-token step.
template <typename T>
void add_rms_norm(const T* x, const T* residual, const T* weight, T* sum, T* out, int64_t rows, int64_t dim,
                  float eps) {
#pragma omp parallel for schedule(static) if (rows * dim > (1 << 14))
    for (int64_t t = 0; t < rows; ++t) {
        const T *a = x + t * dim, *b = residual + t * dim;
        T *s = sum + t * dim, *o = out + t * dim;
        vwide squares{};
        float tail = 0.f;
        int64_t d = 0;
        for (; d + WIDE <= dim; d += WIDE) {
            const vwide v = rounded(load_wide(a + d) + load_wide(b + d), s);
            store_narrow(s + d, v);  // exact: v holds T's values
            squares = fma_wide(v, v, squares);
        }
        for (; d < dim; ++d) {
            narrow(widen(a[d]) + widen(b[d]), s + d);
            tail += widen(s[d]) * widen(s[d]);
        }
        const float inv = 1.f / std::sqrt((hsum(squares) + tail) / float(dim) + eps);
        for (d = 0; d + WIDE <= dim; d += WIDE)
            store_narrow(o + d, load_wide(weight + d) * rounded(load_wide(s + d) * inv, s));
        for (; d < dim; ++d) {
            T n;
            narrow(widen(s[d]) * inv, &n);
            narrow(widen(weight[d]) * widen(n), o + d);
        }
    }
}

// q [T, hq, D] and k [T, hk, D] (a token's rows tq and tk apart, their heads hq_stride and hk_stride) turned by
// their tokens' positions: x cos + rotate_half(x) sin over cos and sin [P, D] (fp32, the halves repeated), in fp32
// and rounded once into contiguous outputs. One pass over the step's q and k, where Inductor's code made one for
// each half and one for the sum: 0.84 ms a layer at 4096 tokens, most of a prompt step's own elementwise time.
template <typename T>
void rotary(const T* q, int64_t tq, int64_t hq_stride, const T* k, int64_t tk, int64_t hk_stride,
            const int32_t* positions, const float* cos, const float* sin, T* q_out, T* k_out, int64_t tokens, int hq,
            int hk, int dim) {
    const int half = dim / 2;
#pragma omp parallel for schedule(static) if (tokens * (hq + hk) * dim > (1 << 14))
    for (int64_t t = 0; t < tokens; ++t) {
        const float *c = cos + int64_t(positions[t]) * dim, *s = sin + int64_t(positions[t]) * dim;
        for (int h = 0; h < hq + hk; ++h) {
            const T* x = h < hq ? q + t * tq + h * hq_stride : k + t * tk + (h - hq) * hk_stride;
            T* out = h < hq ? q_out + (t * hq + h) * dim : k_out + (t * hk + h - hq) * dim;
            int d = 0;
            for (; d + WIDE <= half; d += WIDE) {
                const vwide a = load_wide(x + d), b = load_wide(x + half + d);
                store_narrow(out + d, a * load_wide(c + d) - b * load_wide(s + d));
                store_narrow(out + half + d, b * load_wide(c + half + d) + a * load_wide(s + half + d));
            }
            for (; d < half; ++d) {
                const float a = widen(x[d]), b = widen(x[half + d]);
                narrow(a * c[d] - b * s[d], out + d);
                narrow(b * c[half + d] + a * s[half + d], out + half + d);
            }
        }
    }
}

}  // namespace

// The torch operators splitfuse_cpu::* (schemas in kernels/schemas.py): a compiled step reaches them through
// the dispatcher without entering Python, which cost about 25 us a call.
namespace {

// f(float()) or f(bf16()): the element type of t (the two cpu.py lets through).
template <typename F>
void with_type(const at::Tensor& t, F f) {
    if (t.scalar_type() == at::kBFloat16)
        f(bf16());
    else
        f(float());
}

// The two element types with_type dispatches on; anything else would be read as fp32.
void check_type(const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device().is_cpu() && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16),
                name, " must be an fp32 or bf16 CPU tensor, not ", t.scalar_type(), " on ", t.device());
}

template <typename T>
T* data(const at::Tensor& t) { return static_cast<T*>(t.data_ptr()); }

// A layer's key and value caches, each contiguous [blocks, block_size, Hkv, D], in the whole cache
// [layers, 2, blocks, block_size, Hkv, D].
struct LayerCache {
    void* k;
    void* v;
};

LayerCache layer_cache(const at::Tensor& kv_cache, int64_t layer, at::ScalarType dtype, const char* op) {
    TORCH_CHECK(kv_cache.dim() == 6 && kv_cache.size(1) == 2 && kv_cache.is_contiguous(), op,
                ": the cache must be contiguous [layers, 2, blocks, block_size, Hkv, D]");
    TORCH_CHECK(kv_cache.scalar_type() == dtype, op, ": the cache must have the dtype of the keys and queries");
    TORCH_CHECK(layer >= 0 && layer < kv_cache.size(0), op, ": layer ", layer, " of a cache of ", kv_cache.size(0));
    char* k = static_cast<char*>(kv_cache.data_ptr()) + layer * kv_cache.stride(0) * kv_cache.element_size();
    return {k, k + kv_cache.stride(1) * kv_cache.element_size()};
}

void store_kv_op(const at::Tensor& key, const at::Tensor& value, const at::Tensor& kv_cache, int64_t layer,
                 const at::Tensor& slot_mapping) {
    check_type(key, "key");
    TORCH_CHECK(key.dim() == 3 && value.sizes() == key.sizes(), "store_kv: key and value must be [T, Hkv, D] alike");
    TORCH_CHECK(value.scalar_type() == key.scalar_type(), "store_kv: keys and values must share a dtype");
    const LayerCache cache = layer_cache(kv_cache, layer, key.scalar_type(), "store_kv");
    TORCH_CHECK(key.size(1) == kv_cache.size(4) && key.size(2) == kv_cache.size(5),
                "store_kv: key rows [Hkv, D] must match the cache's");
    TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == key.size(0), "store_kv: one slot per key row");
    // A token's row contiguous; the rows may lie apart (columns of the step's projections).
    auto rows = [](const at::Tensor& t) { return t.stride(2) == 1 && t.stride(1) == t.size(2) ? t : t.contiguous(); };
    const at::Tensor k = rows(key), v = rows(value), slots = slot_mapping.to(at::kInt).contiguous();
    with_type(k, [&](auto t) {
        using T = decltype(t);
        store_kv(data<T>(k), k.stride(0), data<T>(v), v.stride(0), static_cast<T*>(cache.k), static_cast<T*>(cache.v),
                 data<int32_t>(slots), k.size(0), k.size(1) * k.size(2));
    });
}

at::Tensor paged_attention_op(const at::Tensor& q, const at::Tensor& kv_cache, int64_t layer,
                              const at::Tensor& block_tables, const at::Tensor& seq_lens,
                              const at::Tensor& query_start_loc, double scale, int64_t sliding_window) {
    check_type(q, "q");
    TORCH_CHECK(q.dim() == 3, "paged_attention: q must be [T, Hq, D]");
    const LayerCache cache = layer_cache(kv_cache, layer, q.scalar_type(), "paged_attention");
    const int64_t kv_heads = kv_cache.size(4);
    TORCH_CHECK(q.size(2) == kv_cache.size(5) && q.size(2) % 8 == 0 && kv_heads > 0 && q.size(1) % kv_heads == 0,
                "paged_attention: head sizes must match (a multiple of 8), and the query heads must be a multiple "
                "of the key heads");
    TORCH_CHECK(block_tables.dim() == 2 && seq_lens.dim() == 1 && block_tables.size(0) == seq_lens.size(0)
                && query_start_loc.dim() == 1 && query_start_loc.size(0) == seq_lens.size(0) + 1,
                "paged_attention: one block table row and one length per sequence, and sequences + 1 query starts");
    const at::Tensor qc = q.contiguous(), tables = block_tables.to(at::kInt).contiguous();
    const at::Tensor lens = seq_lens.to(at::kInt).contiguous(), starts = query_start_loc.to(at::kInt).contiguous();
    at::Tensor out = at::empty_like(qc);
    const Shape sh{int(q.size(1)), int(kv_heads), int(q.size(2)), int(kv_cache.size(3)), int(tables.size(1)),
                   float(scale), int(sliding_window)};
    with_type(qc, [&](auto t) {
        using T = decltype(t);
        paged_attention(data<T>(qc), static_cast<const T*>(cache.k), static_cast<const T*>(cache.v),
                        data<int32_t>(tables), data<int32_t>(lens), data<int32_t>(starts), int(lens.size(0)),
                        int(q.size(0)), sh, data<T>(out));
    });
    return out;
}

// The rows of x that hold tokens: those before `used` ([1], int32 or int64) where it is given, else all. The
// rows after them pad a step to its compiled shape; their outputs are zeros, and nothing is multiplied for them.
int64_t rows_used(const at::Tensor& x, const std::optional<at::Tensor>& used, at::Tensor& out) {
    if (!used) return x.size(0);
    TORCH_CHECK(used->numel() == 1 && used->device().is_cpu()
                && (used->scalar_type() == at::kInt || used->scalar_type() == at::kLong),
                "used: the count of rows in use must be one int32 or int64 on the CPU");
    const int64_t n = used->scalar_type() == at::kInt ? *data<int32_t>(*used) : *data<int64_t>(*used);
    TORCH_CHECK(n >= 0 && n <= x.size(0), "used: ", n, " rows in use of ", x.size(0));
    const int64_t row_bytes = out.size(1) * out.element_size();  // out is new, contiguous: a plain memset, no dispatch
    std::memset(static_cast<char*>(out.data_ptr()) + n * row_bytes, 0, (x.size(0) - n) * row_bytes);
    return n;
}

at::Tensor packed_linear_op(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                            int64_t out_features, bool gated, const std::optional<at::Tensor>& used) {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "packed_linear: x must be fp32 [M, K]");
    check_type(packed, "packed");
    TORCH_CHECK(packed.is_contiguous() && out_features > 0
                && packed.numel() == (gated ? 2 : 1) * ((out_features + PANEL - 1) / PANEL) * PANEL * x.size(1),
                "packed_linear: the packed weight must be contiguous and hold ", out_features, " x ", x.size(1),
                " weights in panels of ", PANEL, gated ? ", twice (gated)" : "");
    TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == (gated ? 2 : 1) * out_features),
                "packed_linear: the bias must hold one value per output", gated ? " of each half" : "");
    const at::Tensor xc = x.contiguous();
    const at::Tensor b = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
    at::Tensor out = at::empty({x.size(0), out_features}, xc.options());
    const int64_t M = rows_used(x, used, out);
    with_type(packed, [&](auto t) {
        packed_linear(data<float>(xc), data<decltype(t)>(packed), b.defined() ? data<float>(b) : nullptr,
                      data<float>(out), M, out_features, x.size(1), gated);
    });
    return out;
}

at::Tensor brgemm_linear_op(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                            int64_t out_features, bool gated, bool fp32_out, const std::optional<at::Tensor>& used) {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.device().is_cpu() && x.size(1) % 2 == 0,
                "brgemm_linear: x must be a bf16 CPU tensor [M, K] with K even");
    TORCH_CHECK(brgemm_takes_bf16(), "brgemm_linear: ATen's brgemm does not multiply bf16 here (oneDNN capped below "
                "AVX-512 or turned off); cpu.has_bf16_gemm() says so too");
    const int64_t K = x.size(1);
    const int64_t chunks = (gated ? 2 : 1) * ((out_features + CHUNK_N - 1) / CHUNK_N);
    TORCH_CHECK(packed.scalar_type() == at::kBFloat16 && packed.is_contiguous() && out_features > 0
                && packed.sizes() == at::IntArrayRef({chunks, K / 2, CHUNK_N, 2}),
                "brgemm_linear: the packed weight must be contiguous bf16 [", chunks, ", K / 2, ", CHUNK_N, ", 2] for ",
                out_features, gated ? " outputs of gate and up each" : " outputs", " and K = ", K);
    TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == (gated ? 2 : 1) * out_features),
                "brgemm_linear: the bias must hold one value per output", gated ? " of each half" : "");
    const at::Tensor xc = x.contiguous();
    const at::Tensor b = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
    at::Tensor out = at::empty({x.size(0), out_features}, xc.options().dtype(fp32_out ? at::kFloat : at::kBFloat16));
    const float* bp = b.defined() ? data<float>(b) : nullptr;
    const int64_t M = rows_used(x, used, out);
    if (fp32_out)
        brgemm_linear(data<at::BFloat16>(xc), data<at::BFloat16>(packed), bp, data<float>(out), M, out_features, K,
                      gated);
    else
        brgemm_linear(data<at::BFloat16>(xc), data<at::BFloat16>(packed), bp, data<bf16>(out), M, out_features, K,
                      gated);
    return out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_op(const at::Tensor& x, const at::Tensor& residual,
                                                   const at::Tensor& weight, double eps) {
    check_type(x, "add_rms_norm: x");
    TORCH_CHECK(x.dim() == 2 && x.sizes() == residual.sizes() && weight.dim() == 1 && weight.size(0) == x.size(1),
                "add_rms_norm: x and residual must be [T, D] and weight [D]");
    TORCH_CHECK(residual.scalar_type() == x.scalar_type() && weight.scalar_type() == x.scalar_type() &&
                residual.device().is_cpu() && weight.device().is_cpu(),
                "add_rms_norm: x, residual and weight must be CPU tensors of one dtype");
    const at::Tensor a = x.contiguous(), b = residual.contiguous(), w = weight.contiguous();
    at::Tensor sum = at::empty_like(a), out = at::empty_like(a);
    with_type(a, [&](auto zero) {
        using T = decltype(zero);
        add_rms_norm(data<T>(a), data<T>(b), data<T>(w), data<T>(sum), data<T>(out), a.size(0), a.size(1), float(eps));
    });
    return {sum, out};
}

std::tuple<at::Tensor, at::Tensor> rotary_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                                             const at::Tensor& cos, const at::Tensor& sin) {
    check_type(q, "rotary: q");
    TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && k.size(0) == q.size(0) && k.size(2) == q.size(2) &&
                    q.stride(2) == 1 && k.stride(2) == 1 && q.size(2) % 2 == 0,
                "rotary: q and k must be [T, H, D] with D even and contiguous");
    TORCH_CHECK(k.scalar_type() == q.scalar_type() && k.device().is_cpu(), "rotary: k must be a CPU tensor of q's dtype");
    TORCH_CHECK(positions.dim() == 1 && positions.size(0) == q.size(0) && positions.scalar_type() == at::kInt,
                "rotary: positions must be int32 [T]");
    TORCH_CHECK(cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(1) == q.size(2) &&
                    cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat,
                "rotary: cos and sin must be fp32 [P, D]");
    const at::Tensor pos = positions.contiguous(), c = cos.contiguous(), s = sin.contiguous();
    const int32_t* p = pos.data_ptr<int32_t>();
    TORCH_CHECK(std::all_of(p, p + pos.numel(), [&](int32_t at) { return at >= 0 && at < c.size(0); }),
                "rotary: a position outside the tables");
    at::Tensor q_out = at::empty(q.sizes(), q.options()), k_out = at::empty(k.sizes(), k.options());
    with_type(q, [&](auto zero) {
        using T = decltype(zero);
        rotary(data<T>(q), q.stride(0), q.stride(1), data<T>(k), k.stride(0), k.stride(1), p,
               c.data_ptr<float>(), s.data_ptr<float>(), data<T>(q_out), data<T>(k_out), q.size(0), int(q.size(1)),
               int(k.size(1)), int(q.size(2)));
    });
    return {q_out, k_out};
}

// Each row's first maximum, as torch's max(dim=-1).indices gives it (a NaN counts as the maximum): the greedy
// choice of a step's tokens. Four vectors of lanes keep each their first maximum (four, so that the compares
// do not wait on each other), then the lanes' maxima are compared; the rows are shared out among the threads.
// torch's took 1.0 ms for 48 rows of 49152 logits, this 0.2 (Xeon with AMX, two cores).
at::Tensor argmax_rows_op(const at::Tensor& rows) {
    TORCH_CHECK(rows.dim() == 2 && rows.scalar_type() == at::kFloat && rows.device().is_cpu() && rows.size(1) > 0,
                "argmax_rows: rows must be an fp32 CPU tensor [M, N] with N > 0");
    const at::Tensor r = rows.contiguous();
    const int64_t M = r.size(0), N = r.size(1);
    at::Tensor out = at::empty({M}, r.options().dtype(at::kLong));
    const float* x = data<float>(r);
    int64_t* index = data<int64_t>(out);
    constexpr int V = 4;
    const v8u lane = {0, 1, 2, 3, 4, 5, 6, 7};
#pragma omp parallel for schedule(static)
    for (int64_t m = 0; m < M; ++m) {
        const float* row = x + m * N;
        v8f best[V];
        v8u at[V], nan = v8u{};
        for (int k = 0; k < V; ++k) best[k] = v8f{} - INFINITY, at[k] = v8u{};
        int64_t j = 0;
        for (; j + 8 * V <= N; j += 8 * V)
            for (int k = 0; k < V; ++k) {
                const v8f v = load8(row + j + 8 * k);
                const v8u more = (v8u)(v > best[k]);
                best[k] = more ? v : best[k];
                at[k] = more ? lane + uint32_t(j + 8 * k) : at[k];
                nan |= (v8u)(v != v);
            }
        float top = -INFINITY;
        int64_t first = 0;
        for (int k = 0; k < V; ++k)
            for (int l = 0; l < 8; ++l)
                if (best[k][l] > top || (best[k][l] == top && at[k][l] < first)) top = best[k][l], first = at[k][l];
        bool has_nan = false;
        for (int l = 0; l < 8; ++l) has_nan |= nan[l] != 0;
        for (; j < N; ++j) {
            has_nan |= row[j] != row[j];
            if (row[j] > top) top = row[j], first = j;
        }
        if (has_nan)  // the first NaN, which torch's max propagates
            for (first = 0; row[first] == row[first]; ++first) {}
        index[m] = first;
    }
    return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(splitfuse_cpu, CPU, m) {
    m.impl("argmax_rows", &argmax_rows_op);
    m.impl("add_rms_norm", &add_rms_norm_op);
    m.impl("rotary", &rotary_op);
    m.impl("store_kv", &store_kv_op);
    m.impl("paged_attention", &paged_attention_op);
    m.impl("packed_linear", &packed_linear_op);
    m.impl("brgemm_linear", &brgemm_linear_op);
}
