// What every AMX kernel needs before its first tile instruction: the process's permission and a tile configuration.
#pragma once
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

namespace slipstream::amx {

// Linux gives a process the tiles' state only once asked (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA); without it
// the first tile instruction kills the process.
inline bool tiles_permitted() {
  static const bool permitted = [] {
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return permitted;
}

// Palette 1's configuration: rows and bytes a row of each of the eight tiles (unused ones zero).
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};

  TileConfig& tile(int t, int rows_, int bytes) {
    rows[t] = static_cast<uint8_t>(rows_);
    bytes_per_row[t] = static_cast<uint16_t>(bytes);
    return *this;
  }
  void load() const { _tile_loadconfig(this); }
};

}  // namespace slipstream::amx
