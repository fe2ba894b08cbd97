// The CUDA sources of conv2d.cu, compiled by the host compiler against the CUDA emulator (cuda_emulator.h).
#include "../cuda/conv2d.cu"
