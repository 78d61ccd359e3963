// Intel AMX tile helpers shared by conv_wgrad.cpp and conv_fwd.cpp (reslab's kernels' build:
// reslab/models/bn_act.py). RESLAB_AMX is defined where the build targets a CPU with AMX tiles,
// AVX-512 BW and BF16 (every CPU with AMX has both) and Linux (the OS grants tile state per
// process); elsewhere this defines nothing.
#pragma once

#include <cstdint>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BW__) && \
    defined(__AVX512BF16__) && defined(__linux__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define RESLAB_AMX 1
#endif

#ifdef RESLAB_AMX
namespace reslab_amx {

// Linux hands a process AMX's tile state only when asked (arch_prctl ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA); torch's oneDNN asks too, this makes the kernels not depend on it.
inline bool amx_permitted() {
  static const bool ok = [] {
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette_id = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// The tile instructions name their registers in the opcode; gcc's intrinsics paste the number
// as a token, so templates go through asm with the number as an immediate.
template <int T>
inline void tile_load(const void* p, int64_t stride) {
  asm volatile("tileloadd (%0,%1,1), %%tmm%c2" ::"r"(p), "r"(stride), "i"(T) : "memory");
}
template <int T>
inline void tile_store(void* p, int64_t stride) {
  asm volatile("tilestored %%tmm%c2, (%0,%1,1)" ::"r"(p), "r"(stride), "i"(T) : "memory");
}
template <int T>
inline void tile_zero() {
  asm volatile("tilezero %%tmm%c0" ::"i"(T));
}
template <int C, int A, int B>
inline void tile_dot() {  // C[m][n] += sum_k A[m][2k..2k+1] . B[k][2n..2n+1], bf16 -> fp32
  asm volatile("tdpbf16ps %%tmm%c2, %%tmm%c1, %%tmm%c0" ::"i"(C), "i"(A), "i"(B));
}

}  // namespace reslab_amx
#endif  // RESLAB_AMX
