// The CPU kernel again, built by setup.py with -march=x86-64-v3 (AVX2 + FMA) into its own extension module, which
// pretrain.ops loads instead of the baseline build when torch reports an AVX2-capable CPU. A separate module rather than
// a second object in one module keeps the two builds' inline functions from being merged by the linker.
#include "dcnv3_cpu.cpp"
