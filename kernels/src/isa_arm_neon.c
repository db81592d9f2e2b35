/* ARM NEON paths: aarch64 armv8-a, aarch64 armv8.2-a dot product, 32-bit ARM NEON.
 * (Being written; on other targets these paths are absent: name NULL.) */
#include "dl_kernels.h"

#if !defined(__aarch64__)
const dl_isa dl_isa_neon = {0};
const dl_isa dl_isa_neon_dotprod = {0};
#endif
#if !defined(__arm__)
const dl_isa dl_isa_armhf_neon = {0};
#endif
