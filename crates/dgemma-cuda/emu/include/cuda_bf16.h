// Stand-in for CUDA's cuda_bf16.h when the kernel templates are compiled for the CPU emulator.
#pragma once
#include "../cuda_emu.hpp"
