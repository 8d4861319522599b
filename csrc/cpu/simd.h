// Vectorised CPU inner loops with runtime dispatch.
//
// On x86 each function has an AVX + FMA + F16C version (compiled with a GCC target attribute,
// so the rest of the library keeps the baseline ISA) chosen once at run time with
// __builtin_cpu_supports, and a portable scalar version used everywhere else (or when the
// environment sets MINDSKIP_CPU_SIMD=0). Both versions accumulate in fp32 and round exactly like
// c10's conversions (round to nearest even).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace mindskip::cpu {

// sum_i x[i] * w[i], accumulated in fp32 (fp64 for double).
float dot(const float* x, const float* w, int64_t n);
float dot(const c10::BFloat16* x, const float* w, int64_t n);
float dot(const c10::Half* x, const float* w, int64_t n);
double dot(const double* x, const double* w, int64_t n);

// acc[i] += a * x[i], in fp32 (fp64 for double); acc is an fp32 (fp64) accumulator.
void axpy(float* acc, float a, const float* x, int64_t n);
void axpy(float* acc, float a, const c10::BFloat16* x, int64_t n);
void axpy(float* acc, float a, const c10::Half* x, int64_t n);
void axpy(double* acc, double a, const double* x, int64_t n);

// dst[i] = dst[i] + src[i], computed in fp32 (fp64 for double) and rounded once.
void add_inplace(float* dst, const float* src, int64_t n);
void add_inplace(c10::BFloat16* dst, const c10::BFloat16* src, int64_t n);
void add_inplace(c10::Half* dst, const c10::Half* src, int64_t n);
void add_inplace(double* dst, const double* src, int64_t n);

}  // namespace mindskip::cpu
