/* What the library says about itself (see flexunet.h): its constants, read by native.py. */
#include "simd.h"

const int flexunet_panel = NR;
const int flexunet_mr = MR;

int flexunet_has_bf16(void) { return HAS_BF16; }
