// The CUDA sources of pool2d.cu, compiled by the host compiler against the CUDA emulator (cuda_emulator.h).
#include "../cuda/pool2d.cu"
