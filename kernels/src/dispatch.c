/* Choosing the instruction-set path at run time, and portable f16 conversion. */
#include <string.h>

#include "dl_kernels.h"

#if defined(__aarch64__) || defined(__arm__)
#include <sys/auxv.h>
#if defined(__aarch64__)
#include <asm/hwcap.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#else
#ifndef HWCAP_NEON
#define HWCAP_NEON (1 << 12)
#endif
#endif
#endif

/* Best last: dl_isa_best walks this from the end. */
const dl_isa *const dl_isa_all[] = {
    &dl_isa_scalar,
    &dl_isa_armhf_neon,
    &dl_isa_neon,
    &dl_isa_neon_dotprod,
    &dl_isa_avx2,
    &dl_isa_avx512vnni,
    NULL,
};

static int cpu_has(const dl_isa *isa) {
    if (isa == &dl_isa_scalar) return 1;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    if (isa == &dl_isa_avx2)
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
               __builtin_cpu_supports("f16c");
    if (isa == &dl_isa_avx512vnni)
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
               __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx512f") &&
               __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx512vnni");
#elif defined(__aarch64__)
    if (isa == &dl_isa_neon) return 1;
    if (isa == &dl_isa_neon_dotprod) return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#elif defined(__arm__)
    if (isa == &dl_isa_armhf_neon) return (getauxval(AT_HWCAP) & HWCAP_NEON) != 0;
#endif
    return 0;
}

int dl_isa_supported(const dl_isa *isa) {
    return isa != NULL && isa->name != NULL && cpu_has(isa);
}

const dl_isa *dl_isa_best(void) {
    const dl_isa *best = &dl_isa_scalar;
    for (int i = 0; dl_isa_all[i] != NULL; i++)
        if (dl_isa_supported(dl_isa_all[i])) best = dl_isa_all[i];
    return best;
}

const dl_isa *dl_isa_by_name(const char *name) {
    for (int i = 0; dl_isa_all[i] != NULL; i++) {
        const dl_isa *isa = dl_isa_all[i];
        if (isa->name != NULL && strcmp(isa->name, name) == 0)
            return dl_isa_supported(isa) ? isa : NULL;
    }
    return NULL;
}

float dl_f16_to_f32(dl_f16 h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t mant = h & 0x3ff;
    uint32_t bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            exp = 127 - 15 + 1;
            while ((mant & 0x400) == 0) { mant <<= 1; exp--; }
            mant &= 0x3ff;
            bits = sign | (exp << 23) | (mant << 13);
        }
    } else if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

dl_f16 dl_f32_to_f16(float f) {
    /* round to nearest even, as numpy's astype(float16) and F16C do */
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    uint32_t sign = (x >> 16) & 0x8000;
    uint32_t absx = x & 0x7fffffffu;
    if (absx >= 0x7f800000u) /* inf or nan */
        return (dl_f16)(sign | 0x7c00 | (absx > 0x7f800000u ? 0x200 : 0));
    if (absx >= 0x477ff000u) /* rounds to >= 65520: overflow to inf */
        return (dl_f16)(sign | 0x7c00);
    if (absx < 0x38800000u) { /* below the smallest normal f16: subnormal or zero */
        if (absx < 0x33000000u) return (dl_f16)sign;
        uint32_t e = absx >> 23;
        uint32_t m = (absx & 0x7fffff) | 0x800000;
        uint32_t shift = 126 - e; /* 14..24 */
        uint32_t r = m >> shift;
        uint32_t rem = m & ((1u << shift) - 1);
        uint32_t half = 1u << (shift - 1);
        if (rem > half || (rem == half && (r & 1))) r++;
        return (dl_f16)(sign | r);
    }
    uint32_t r = absx - 0x38000000u; /* rebias exponent 127 -> 15, still in f32 mantissa */
    uint32_t lsb = (r >> 13) & 1;
    r += 0xfff + lsb;
    return (dl_f16)(sign | (r >> 13));
}
