/* Placeholders for dl_isa paths whose source file is not in kernels/src yet, so the
 * harness links while those files are being written (the Makefile passes one
 * DL_HARNESS_STUB_* define per missing file). A placeholder has name NULL: dispatch
 * never offers it. */
#include "dl_kernels.h"

#ifdef DL_HARNESS_STUB_SCALAR
const dl_isa dl_isa_scalar = {0};
#endif
#ifdef DL_HARNESS_STUB_AVX2
const dl_isa dl_isa_avx2 = {0};
#endif
#ifdef DL_HARNESS_STUB_AVX512
const dl_isa dl_isa_avx512vnni = {0};
#endif
