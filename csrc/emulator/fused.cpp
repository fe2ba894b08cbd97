// The CUDA sources of fused.cu, compiled by the host compiler against the CUDA emulator (cuda_emulator.h).
#include "../cuda/fused.cu"
