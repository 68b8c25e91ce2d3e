// Binds the CPU kernels to the adam8 ops; the schemas are defined from ops_registry.
#include <torch/library.h>

#include "../kernels.h"

TORCH_LIBRARY_IMPL(adam8, CPU, m) { ADAM8_BIND_KERNELS(adam8::cpu) }
