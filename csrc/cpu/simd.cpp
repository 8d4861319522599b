#include "simd.h"

#include <cstdlib>
#include <cstring>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define MINDSKIP_X86_SIMD 1
#include <immintrin.h>
#endif

namespace mindskip::cpu {
namespace {

// ---------------------------------------------------------------------------------------------
// Portable versions.

template <typename scalar_t, typename acc_t>
acc_t dot_scalar(const scalar_t* x, const acc_t* w, int64_t n) {
  acc_t acc = 0;
  for (int64_t i = 0; i < n; ++i) {
    acc += static_cast<acc_t>(x[i]) * w[i];
  }
  return acc;
}

template <typename scalar_t, typename acc_t>
void axpy_scalar(acc_t* acc, acc_t a, const scalar_t* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    acc[i] += a * static_cast<acc_t>(x[i]);
  }
}

template <typename scalar_t, typename acc_t>
void add_scalar(scalar_t* dst, const scalar_t* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    dst[i] = static_cast<scalar_t>(static_cast<acc_t>(dst[i]) + static_cast<acc_t>(src[i]));
  }
}

#ifdef MINDSKIP_X86_SIMD
// ---------------------------------------------------------------------------------------------
// AVX + FMA + F16C versions. Only 128-bit integer instructions are used, so AVX2 is not needed.

#define MINDSKIP_AVX __attribute__((target("avx,fma,f16c")))

MINDSKIP_AVX inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 8 bf16 -> 8 fp32: a bf16 is the high half of an fp32.
MINDSKIP_AVX inline __m256 load_bf16(const c10::BFloat16* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i zero = _mm_setzero_si128();
  const __m128 lo = _mm_castsi128_ps(_mm_unpacklo_epi16(zero, v));
  const __m128 hi = _mm_castsi128_ps(_mm_unpackhi_epi16(zero, v));
  return _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1);
}

// 4 fp32 -> 4 bf16 (in the low 16 bits of each lane), round to nearest even, NaN -> 0x7FC0.
MINDSKIP_AVX inline __m128i round_bf16(__m128 f) {
  const __m128i bits = _mm_castps_si128(f);
  const __m128i lsb = _mm_and_si128(_mm_srli_epi32(bits, 16), _mm_set1_epi32(1));
  __m128i rounded = _mm_add_epi32(bits, _mm_add_epi32(lsb, _mm_set1_epi32(0x7FFF)));
  const __m128i is_nan = _mm_castps_si128(_mm_cmpunord_ps(f, f));
  rounded = _mm_blendv_epi8(rounded, _mm_set1_epi32(0x7FC00000), is_nan);
  return _mm_srli_epi32(rounded, 16);
}

MINDSKIP_AVX inline void store_bf16(c10::BFloat16* p, __m256 f) {
  const __m128i lo = round_bf16(_mm256_castps256_ps128(f));
  const __m128i hi = round_bf16(_mm256_extractf128_ps(f, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm_packus_epi32(lo, hi));
}

MINDSKIP_AVX inline __m256 load_f16(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

MINDSKIP_AVX inline void store_f16(c10::Half* p, __m256 f) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

MINDSKIP_AVX inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
MINDSKIP_AVX inline __m256 load8(const c10::BFloat16* p) { return load_bf16(p); }
MINDSKIP_AVX inline __m256 load8(const c10::Half* p) { return load_f16(p); }
MINDSKIP_AVX inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
MINDSKIP_AVX inline void store8(c10::BFloat16* p, __m256 v) { store_bf16(p, v); }
MINDSKIP_AVX inline void store8(c10::Half* p, __m256 v) { store_f16(p, v); }

// Four independent accumulators hide the FMA latency; the tail goes through the scalar loop.
template <typename scalar_t>
MINDSKIP_AVX float dot_avx(const scalar_t* x, const float* w, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    a0 = _mm256_fmadd_ps(load8(x + i), _mm256_loadu_ps(w + i), a0);
    a1 = _mm256_fmadd_ps(load8(x + i + 8), _mm256_loadu_ps(w + i + 8), a1);
    a2 = _mm256_fmadd_ps(load8(x + i + 16), _mm256_loadu_ps(w + i + 16), a2);
    a3 = _mm256_fmadd_ps(load8(x + i + 24), _mm256_loadu_ps(w + i + 24), a3);
  }
  for (; i + 8 <= n; i += 8) {
    a0 = _mm256_fmadd_ps(load8(x + i), _mm256_loadu_ps(w + i), a0);
  }
  float acc = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  return acc + dot_scalar<scalar_t, float>(x + i, w + i, n - i);
}

template <typename scalar_t>
MINDSKIP_AVX void axpy_avx(float* acc, float a, const scalar_t* x, int64_t n) {
  const __m256 va = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(va, load8(x + i), _mm256_loadu_ps(acc + i)));
  }
  axpy_scalar<scalar_t, float>(acc + i, a, x + i, n - i);
}

template <typename scalar_t>
MINDSKIP_AVX void add_avx(scalar_t* dst, const scalar_t* src, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    store8(dst + i, _mm256_add_ps(load8(dst + i), load8(src + i)));
  }
  add_scalar<scalar_t, float>(dst + i, src + i, n - i);
}

bool use_avx() {
  static const bool enabled = [] {
    const char* env = std::getenv("MINDSKIP_CPU_SIMD");
    if (env != nullptr && std::strcmp(env, "0") == 0) {
      return false;
    }
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
  }();
  return enabled;
}

#define MINDSKIP_DISPATCH(avx_call, scalar_call) \
  if (use_avx()) {                               \
    return avx_call;                             \
  }                                              \
  return scalar_call;
#else
#define MINDSKIP_DISPATCH(avx_call, scalar_call) return scalar_call;
#endif

}  // namespace

float dot(const float* x, const float* w, int64_t n) {
  MINDSKIP_DISPATCH(dot_avx(x, w, n), (dot_scalar<float, float>(x, w, n)))
}
float dot(const c10::BFloat16* x, const float* w, int64_t n) {
  MINDSKIP_DISPATCH(dot_avx(x, w, n), (dot_scalar<c10::BFloat16, float>(x, w, n)))
}
float dot(const c10::Half* x, const float* w, int64_t n) {
  MINDSKIP_DISPATCH(dot_avx(x, w, n), (dot_scalar<c10::Half, float>(x, w, n)))
}
double dot(const double* x, const double* w, int64_t n) {
  return dot_scalar<double, double>(x, w, n);
}

void axpy(float* acc, float a, const float* x, int64_t n) {
  MINDSKIP_DISPATCH(axpy_avx(acc, a, x, n), (axpy_scalar<float, float>(acc, a, x, n)))
}
void axpy(float* acc, float a, const c10::BFloat16* x, int64_t n) {
  MINDSKIP_DISPATCH(axpy_avx(acc, a, x, n), (axpy_scalar<c10::BFloat16, float>(acc, a, x, n)))
}
void axpy(float* acc, float a, const c10::Half* x, int64_t n) {
  MINDSKIP_DISPATCH(axpy_avx(acc, a, x, n), (axpy_scalar<c10::Half, float>(acc, a, x, n)))
}
void axpy(double* acc, double a, const double* x, int64_t n) {
  axpy_scalar<double, double>(acc, a, x, n);
}

void add_inplace(float* dst, const float* src, int64_t n) {
  MINDSKIP_DISPATCH(add_avx(dst, src, n), (add_scalar<float, float>(dst, src, n)))
}
void add_inplace(c10::BFloat16* dst, const c10::BFloat16* src, int64_t n) {
  MINDSKIP_DISPATCH(add_avx(dst, src, n), (add_scalar<c10::BFloat16, float>(dst, src, n)))
}
void add_inplace(c10::Half* dst, const c10::Half* src, int64_t n) {
  MINDSKIP_DISPATCH(add_avx(dst, src, n), (add_scalar<c10::Half, float>(dst, src, n)))
}
void add_inplace(double* dst, const double* src, int64_t n) {
  add_scalar<double, double>(dst, src, n);
}

}  // namespace mindskip::cpu
