/* stub, being written */
#include "dl_kernels.h"
const dl_isa dl_isa_avx512vnni = {0};
