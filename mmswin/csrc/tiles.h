// AMX building blocks of the kernels (see use_amx in kernels.h): the tile configuration every kernel on tiles
// takes, and the layout of a right operand packed for them.
//
// A tile product C += A B reads A as 16 rows of 32 bf16 (the reduction axis along the row) and B as 16 rows of
// 16 words, each word a pair of bf16 along the reduction axis for one output column: B's rows are pairs of rows.
#pragma once

#include "kernels.h"

#ifdef MMSWIN_AMX

#include <immintrin.h>

#include <cstdint>

namespace mmswin {
namespace tiles {

// Palette 1: eight tiles of 16 rows of 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t bytes_per_row[16];
  uint8_t rows[16];
};

// Loads the configuration of eight tiles of 16 rows of 64 bytes: 16 x 16 fp32, 16 x 32 bf16 or 16 x 16 words.
MMSWIN_AMX inline void configure() {
  TileConfig config{};
  config.palette = 1;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = 16;
    config.bytes_per_row[t] = 64;
  }
  _tile_loadconfig(&config);
}

}  // namespace tiles
}  // namespace mmswin

#endif  // MMSWIN_AMX
