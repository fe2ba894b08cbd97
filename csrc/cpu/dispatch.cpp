// The CPU dispatch tables: for each direction, its algorithms in order; a call takes the first one that can compute
// it and whose rule prefers it (the last row of each table always does). A forced algorithm serves every call it
// can compute. "lanes" needs float32 and an ISA with lanes kernels (isa.h); its rules are in conv2d_lanes.cpp.
//
// | direction         | algorithm    | chosen when                                        | why                              |
// |-------------------|--------------|----------------------------------------------------|----------------------------------|
// | fprop             | lanes        | lanes::suits: 16+ images, small planes/channels,   | per-image GEMMs too small to fill tiles |
// |                   |              | unless winograd's rule holds                       |                                   |
// |                   | depthwise    | one input and one output channel per group         | R·S multiply-adds per output, no GEMM |
// |                   | winograd_4x4 | winograd's rule, kernel's 36·in·out transformed    | F(4x4, 3x3): 4x fewer             |
// |                   |              | values within 384 per 4x4 output tile; float32     | multiplications, as 36 GEMMs      |
// |                   |              | only below 'highest' float32 matmul precision      |                                   |
// |                   | winograd     | stride 1, undilated 3x3, 32+ channels each side    | F(2x2, 3x3): 2.25x fewer          |
// |                   |              | and 96 in all (or 28+ output columns), 192+ tiles; | multiplications, as 16 GEMMs      |
// |                   |              | 48+ tiles with 128+ each side; 64+ each side with  |                                   |
// |                   |              | over 2 output channels per tile (from 8 tiles, or  |                                   |
// |                   |              | 4 with at most 256x256 channels)                   |                                   |
// |                   | implicit     | always (strides via stride-phase windows)          | no im2col: B read from padded windows |
// |                   | explicit     | always (only when forced: implicit serves all)     | im2col panels, the reference form |
// | dgrad             | lanes        | lanes::suits_dgrad: as fprop, stride 1, C >= 8;    | as fprop                          |
// |                   |              | not where dcol's column rule holds, 128+ channels  |                                   |
// |                   | depthwise    | as fprop's depthwise                               | the same rows read backwards      |
// |                   | winograd_4x4 | as winograd, and fprop's winograd_4x4 rule         | fprop's on dY, kernel flipped     |
// |                   | winograd     | as fprop's (dY's channels as input), padding <= 2, | fprop's on dY, kernel flipped     |
// |                   |              | not where dcol's rule holds for wasted columns     |                                   |
// |                   | dcol         | stride 1, implicit would compute > 1.5x the useful | no wasted columns: Wᵀ·dY in place |
// |                   |              | columns or repack > 4 MiB of W for too few images, | (images side by side), col2im as  |
// |                   |              | dcol fits in 1 MiB                                 | contiguous row adds               |
// |                   | implicit     | stride 1, Cg fills at least half the row tiles     | the fprop machinery on flipped taps |
// |                   | explicit     | always                                             | Wᵀ·dY panels + col2im             |
// | wgrad             | lanes        | lanes::suits, unless winograd's rule holds         | as fprop                          |
// |                   | depthwise    | as fprop's depthwise                               | a dot product per tap and channel |
// |                   | winograd_4x4 | winograd's rule, 4x4 tiles multiplying <= 2/3 as   | F(3x3, 4x4): 36 GEMMs             |
// |                   |              | much as 2x2 ones (padding); by runs of tiles or    |                                   |
// |                   |              | whole GEMMs (M within half of V's re-reads): 3/4,  |                                   |
// |                   |              | 36·in·out sums within 16384 per 4x4 tile (131072   |                                   |
// |                   |              | at 2/3); on the blocks only where 2x2 tiles are or |                                   |
// |                   |              | 128+ channels each side; any float32 precision     |                                   |
// |                   | winograd     | 32+ channels each side, from 64 tiles, at most     | F(3x3, 2x2): GEMMs over the tiles |
// |                   |              | 4096 weights·16 per tile; or 128+ channels each    |                                   |
// |                   |              | side from 48 tiles                                 |                                   |
// |                   | transposed   | Kg >= 32 (16 for 1x1), CgRS >= 32, not 1x1 stride  | dWᵀ = windows·dYᵀ: A rows read in |
// |                   |              | 1 with Kg > Cg; <= 128 weights per position, or    | place from the windows, no colᵀ   |
// |                   |              | R·S > 1, 128+ positions and several threads        |                                   |
// |                   | dot_tiles    | Kg <= 32, or <= 64 with a 1x1 kernel on 1024+      | few output channels: no transposed gather |
// |                   |              | output positions                                   |                                   |
// |                   | gemm         | always                                             | dY·colᵀ over a channels-last gather |
// | fused_forward     | lanes        | lanes::suits                                       | as fprop, pooled in registers     |
// |                   | gemm_pool    | always                                             | fprop rows into scratch, pooled there |
// | fused_backward    | lanes        | lanes::suits (and suits_dgrad for grad_input)      | unpooled dY built in the lanes layout, never stored |
// |                   | composite    | always (and after lanes meets a foreign index)     | backward_pool, then dgrad/wgrad/bias |
// | max_pool_forward  | tiled_2x2    | 2x2 windows with stride 2 tiling the input         | a row pair's windows as vector    |
// |                   |              |                                                    | lanes: no branch on the data      |
// |                   | fixed_window | column stride 1 or 2                               | compile-time windows vectorise    |
// |                   | general      | always                                             | any window                        |
// | avg_pool_forward  | tiled_2x2    | 2x2 windows tiling the input, stride 2, divisor 4  | one flat loop over row pairs      |
// |                   | fixed_window | column stride 1 or 2                               | as max pooling                    |
// |                   | general      | always                                             | any window                        |
// | avg_pool_backward | tiled_2x2    | as avg_pool_forward                                | one flat loop over row pairs      |
// |                   | general      | always                                             | gathers every covering window     |
//
// The thresholds were measured on the 2-core AVX-512 development machine (see each rule).
#include "dispatch.h"

#include <ATen/Context.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <limits>
#include <mutex>

#include "conv2d_lanes.h"
#include "conv_common.h"
#include "conv_depthwise.h"
#include "isa.h"

namespace cnn_ext::cpu {
namespace {

// Row of a table: the algorithm's name and the prose of the comment above.
struct Entry {
  const char* name;
  const char* when;
  const char* why;
};

struct Table {
  const char* direction;
  std::vector<Entry> rows;
};

const std::array<Table, static_cast<int>(Direction::kCount)>& tables() {
  static const std::array<Table, static_cast<int>(Direction::kCount)> t = {{
      {"fprop",
       {{"lanes",
         "float32, 16+ images, small planes and channel counts (lanes::suits), unless winograd's rule holds",
         "per-image GEMMs too small to fill register tiles; 16 images share every instruction"},
        {"depthwise", "one input and one output channel per group (groups = channels), scratch within a few planes",
         "R·S multiply-adds per output along contiguous rows (column strides as phases): no GEMM to form"},
        {"winograd_4x4",
         "winograd's rule, with its kernel's 36 transformed values per channel pair within 384 per 4x4 output tile; "
         "for float32 only where torch.set_float32_matmul_precision allows less than 'highest' (its error)",
         "F(4x4, 3x3): 4x fewer multiplications (1.78x fewer than F(2x2, 3x3)), as 36 GEMMs over 6x6 tiles"},
        {"winograd",
         "stride 1, undilated 3x3, 32+ channels each side and 96 in all (or 28+ output columns), 192+ output tiles "
         "(2x2); or 48+ tiles with 128+ channels each side; or 64+ channels each side with over twice as many "
         "output channels as tiles, 8+ tiles (4+ with at most 256 channels each side)",
         "F(2x2, 3x3): 2.25x fewer multiplications, as 16 GEMMs over transformed tiles"},
        {"implicit", "always (strided convolutions through stride-phase windows)",
         "no im2col: GEMM B rows read in place from zero-padded input windows"},
        {"explicit", "always (only when forced: implicit serves every call)",
         "im2col panels: the reference form, R·S times the windows' copying"}}},
      {"dgrad",
       {{"lanes",
         "float32, as fprop's lanes, stride 1 and 8+ input channels (lanes::suits_dgrad); not where dcol's column "
         "rule (over 1.5x the useful columns) holds with 128+ channels in all",
         "as fprop"},
        {"depthwise", "as fprop's depthwise", "fprop's rows read backwards: each dX row gathers its taps' dY rows"},
        {"winograd_4x4",
         "as fprop's winograd_4x4 (dY's channels as its input), padding <= 2, not where dcol's column rule holds",
         "fprop's F(4x4, 3x3) on dY with the kernel flipped and transposed, padded by 2 - pad"},
        {"winograd",
         "as fprop's winograd (dY's channels as its input), padding <= 2, not where dcol's column rule holds",
         "fprop's Winograd on dY with the kernel flipped and transposed, padded by 2 - pad"},
        {"dcol",
         "stride 1, the implicit product would compute over 1.5x the useful columns or pack over 4 MiB of weights "
         "for too few images, dcol within 1 MiB",
         "Wᵀ·dY with no wasted columns, several images' dY planes side by side as its columns; col2im as contiguous "
         "row adds into a padded plane"},
        {"implicit", "stride 1 and the input channels fill at least half of each GEMM row tile",
         "the fprop machinery on dY's zero-padded windows with flipped taps: no col2im"},
        {"explicit", "always", "Wᵀ·dY panels, then col2im"}}},
      {"wgrad",
       {{"lanes", "float32, as fprop's lanes", "as fprop"},
        {"depthwise", "as fprop's depthwise", "a dot product of dY with the input rows per tap and channel"},
        {"winograd_4x4",
         "winograd's rule with its 36 transformed in × out sums within 16384 per 4x4 tile (131072 at 2/3), where "
         "its tiles multiply at most 2/3 as much as the 2x2 ones (planes padded to multiples of 4), 3/4 with more "
         "tiles than twice the output channels or with the GEMMs whole on few tiles (their M within half of what the "
         "blocks would re-read of V); at any float32 precision (its error stays within 2x torch's own weight "
         "gradient's)",
         "F(3x3, 4x4): 1.78x fewer multiplications than F(3x3, 2x2), as 36 GEMMs over the transformed 6x6 tiles"},
        {"winograd", "32+ channels each side from 64 output tiles (no kernels to transform), with at most 4096 of the "
         "16 transformed in × out sums per tile; or 128+ channels each side from 48 tiles",
         "F(3x3, 2x2): 2.25x fewer multiplications, as 16 GEMMs whose reduction runs over the transformed tiles"},
        {"transposed",
         "32+ output channels (16+ for 1x1) and 32+ taps·channels, not a 1x1, stride-1 kernel with Kg > Cg; the "
         "kernel at most 128 weights per output position (of all the images), or more than one tap, 128+ positions "
         "and several threads",
         "dWᵀ = windows·dYᵀ: the GEMM's A rows read in place from the input's windows (a 1x1, stride-1 kernel's: the "
         "input itself), only dYᵀ gathered, no colᵀ"},
        {"dot_tiles",
         "at most 32 output channels per group, or 64 with a 1x1 kernel on 1024+ output positions (any stride: "
         "stride-phase windows)",
         "few output channels: reduces dY against the input windows in place, no transposed gather"},
        {"gemm", "always", "dY·colᵀ over a channels-last copy of the input, for many channels or strides"}}},
      {"fused_forward",
       {{"lanes", "float32, lanes::suits", "as fprop, pooled and ReLU'd straight from the registers' rows"},
        {"gemm_pool", "always", "fprop rows into item scratch, pooled and ReLU'd there: never stored"}}},
      {"fused_backward",
       {{"lanes", "float32, lanes::suits (and suits_dgrad, when the input's gradient is wanted)",
         "the convolution's output gradient built block by block in the lanes layout, never stored"},
        {"composite", "always, and when lanes meets an index outside its window",
         "conv2d_maxpool_relu_backward_pool, then the convolution's backward ops"}}},
      {"max_pool_forward",
       {{"tiled_2x2", "2x2 windows with stride 2 tiling the input, no padding, rows under 2^31 elements",
         "a row pair's windows are the lanes of vectors (deinterleaved columns): no branch on the data, which the "
         "per-window compare-and-select of short rows compiled to"},
        {"fixed_window", "column stride 1 or 2 (2x2 and 3x3 undilated windows computed in registers)",
         "compile-time window and stride: the row loops vectorise"},
        {"general", "always", "any window"}}},
      {"avg_pool_forward",
       {{"tiled_2x2", "2x2 windows with stride 2 tiling the input, no padding, divisor 4",
         "the row pairs of all planes are one flat loop"},
        {"fixed_window", "column stride 1 or 2", "as max pooling"},
        {"general", "always", "any window"}}},
      {"avg_pool_backward",
       {{"tiled_2x2", "as avg_pool_forward's tiled_2x2", "the row pairs of all planes are one flat loop"},
        {"general", "always", "each input position gathers the windows covering it"}}},
  }};
  return t;
}

constexpr int kNotForced = -1;
// The forced algorithm of each direction, plus one (zero-initialised: none forced).
std::array<std::atomic<int>, static_cast<int>(Direction::kCount)> forced_plus_one{};

std::atomic<bool> recording{false};
std::mutex record_mutex;
struct Recorded {
  int direction, algorithm;
  Isa isa;
};
std::vector<Recorded> record_list;

// One row of a call's table: whether the algorithm can compute the call, and whether its rule prefers it.
struct Option {
  bool can, preferred;
};

// The forced algorithm if it can serve the call, else the first that can and is preferred.
template <typename Algorithm>
Algorithm choose(Direction direction, std::initializer_list<Option> options) {
  const int wanted = forced_plus_one[static_cast<int>(direction)].load(std::memory_order_relaxed) - 1;
  int chosen = -1, i = 0;
  for (const Option& o : options) {
    if (o.can && (i == wanted || (chosen < 0 && o.preferred && wanted == kNotForced))) chosen = i;
    ++i;
  }
  if (chosen < 0) {  // the forced one cannot serve this call: the usual rule
    i = 0;
    for (const Option& o : options) {
      if (chosen < 0 && o.can && o.preferred) chosen = i;
      ++i;
    }
  }
  TORCH_INTERNAL_ASSERT(chosen >= 0, "cnn_ext: no CPU algorithm for ", tables()[static_cast<int>(direction)].direction);
  record(direction, chosen);
  return static_cast<Algorithm>(chosen);
}

bool float32(at::ScalarType dtype) { return dtype == at::kFloat; }

// Winograd F(2x2, 3x3) (winograd.h): stride 1, an undilated 3x3 kernel; dgrad's padding becomes 2 - pad.
bool winograd_can(const Conv& cv) {
  return cv.unit_stride() && cv.r == 3 && cv.s == 3 && cv.dil_h == 1 && cv.dil_w == 1;
}
bool winograd_dgrad_can(const Conv& cv) { return winograd_can(cv) && cv.pad_h <= 2 && cv.pad_w <= 2; }

// Preferred where the 16 GEMMs are long enough to pay for the transforms: at least 32 channels on each side and 96
// in all, and at least 192 output tiles (2x2) per call, which amortise the weight transform (16·in·out values per
// call). Measured on the 2-core AVX-512 machine against implicit: 0.67-0.93x the time on ResNet's 3x3 64/128/256
// layers at batch 8 and 0.8x on DeepMNIST's 64-channel layer; on 196 tiles (one 28x28 image, four 14x14), since
// its buffers stopped costing page faults (scratch.h), 0.75-0.79x implicit's time at 128-256 channels (torch's:
// 0.75-0.84 against 1.02-1.11) and 0.66-0.71x at 4x256@14; slower with 16 channels or on 98 tiles and fewer
// (2x256@14: 2.05 vs 1.37x torch's time). At 32 channels each side, since then, too, on planes of 28+ columns
// (the transforms run over whole vectors of 16 tile columns, so narrower planes waste most of them): 128x32@28
// 0.50 / 0.49x torch's time forward / input gradient (implicit 0.65 / 0.62), 8x32@56 0.79 / 0.69 (0.94 / 0.81);
// on 14x14 still slower (128x32@14: 0.55 / 0.52 against the lanes kernels' 0.54 / 0.42).
// With many channels or few tiles: since the tiles became the GEMMs' rows where they are few (winograd.cpp's
// winograd_oriented), measured against the default (implicit, dgrad's dcol where its rule holds; ms, forward /
// input gradient, batch 1 unless given): 128@14 0.36 -> 0.20 / 0.41 -> 0.19, 2x128@14 0.40 -> 0.23 / 0.44 ->
// 0.22, 256@7 0.30 -> 0.25 / 0.90 -> 0.29, 2x256@7 0.53 -> 0.39 / 1.01 -> 0.38, 8x512@7 6.9 -> 3.9 / 8.6 -> 3.9,
// 128@8 0.11 -> 0.11 / 0.22 -> 0.12, 64@7 0.048 -> 0.048 / 0.077 -> 0.053, 256@4 0.14 -> 0.13 / 0.22 -> 0.13; slower
// on 2x2 planes (one tile: 256@2 0.13 -> 0.15 / 0.13 -> 0.18), 512@4's input gradient (dcol 0.39 -> 0.65), and
// with fewer output channels than twice the tiles under 128 each side (64@14 forward 0.093 -> 0.11, 2x48@10
// 0.060 -> 0.087), which keep the rules above.
bool winograd_channels(int64_t in, int64_t out) { return in >= 32 && out >= 32 && in + out >= 96; }
bool winograd_preferred(const Conv& cv, int64_t in, int64_t out, int64_t out_h, int64_t out_w) {
  const int64_t tiles = cv.n * ceil_div(out_h, 2) * ceil_div(out_w, 2);
  const bool many_channels = in >= 128 && out >= 128 && tiles >= 48;
  const bool few_tiles =
      in >= 64 && out >= 64 && out > 2 * tiles && (tiles >= 8 || (tiles >= 4 && in * out <= 256 * 256));
  return ((winograd_channels(in, out) || (in >= 32 && out >= 32 && out_w >= 28)) && tiles >= 192) ||
         many_channels || few_tiles;
}

// F(4x4, 3x3) (winograd.h) multiplies 1.78x less than F(2x2, 3x3) (36 products per 16 outputs instead of 64) but
// transforms a 2.25x larger kernel (36·in·out values) and pads planes to multiples of 4: preferred where F(2x2)'s
// rule holds and that kernel stays within 384 values per 4x4 output tile. Measured on the 2-core AVX-512 machine,
// ratio to torch's time forward / input gradient, F(4x4) against F(2x2): 8x64@56 0.56 / 0.37 against 0.69 / 0.42,
// 1x64@56 0.59 / 0.60 (0.83 / 0.85), 8x128@28 0.49 / 0.47 (0.65 / 0.58), 1x128@28 0.76 / 0.81 (0.84 / 0.87),
// 8x128@14 0.79 / 0.76 (1.02 / 1.04), 4x256@28 0.44 / 0.38 (0.63 / 0.59), 128x32@28 0.36 / 0.35 (0.41 / 0.40),
// 128x64@14 0.76 / 0.69 (0.92 / 0.84); past 384 values per tile a tie or slower: 8x256@14 (512) 0.98x F(2x2)'s
// time forward (its items at least 64 tiles; 1.07x with 28), 1x256@14 1.38 / 1.98 (1.01 / 1.11).
//
// Its float32 error, though, about 2.5e-6 of the outputs' scale (2-3x the implicit GEMM's; F(2x2)'s is below the
// GEMM's), exceeds the suite's parity tolerance (1e-4 absolute plus relative) once outputs reach a scale of about
// 40: tests/test_conv_parity.py's 67-channel layer with unscaled weights (outputs up to 100) measured 1.0-1.6x that
// tolerance. So float32 takes it only where the user allowed reduced internal precision for float32 products,
// torch.set_float32_matmul_precision("high" or "medium") (which allows TF32, some 100x that error); float64 always
// (its error is about 1e-15 of the scale; 8x64@56 measured 8.0 ms against F(2x2)'s 11.8).
bool winograd_4x4_precision(at::ScalarType dtype) {
  return dtype == at::kDouble ||
         at::globalContext().float32MatmulPrecision() != at::Float32MatmulPrecision::HIGHEST;
}
bool winograd_4x4_preferred(const Conv& cv, int64_t in, int64_t out, int64_t out_h, int64_t out_w,
                            at::ScalarType dtype) {
  const int64_t tiles = cv.n * ceil_div(out_h, 4) * ceil_div(out_w, 4);
  return winograd_4x4_precision(dtype) && winograd_preferred(cv, in, out, out_h, out_w) && in * out <= 384 * tiles;
}

// The weight gradient transforms no kernels, so it pays from fewer tiles: measured 0.55-0.95x the time of the GEMM
// and dot tiles on ResNet's 3x3 64/128/256 layers at batch 8 and on 64/128 channels at batch 1 (196-6272 tiles),
// a tie at 256 channels on 49 tiles, 1.3x the GEMM's time on 512 channels and 16 tiles (each thread's 16 blocks of
// in × out sums then outweigh its products). So at most 4096 of those sums per tile: 8x512@7 (128 tiles, 32768
// sums per tile) measured 3.4x torch's time, transposed 1.4x; 8x256@14 (392 tiles, 2675 per tile) 1.11x,
// transposed 1.39x. Since its threads take equal shares and its last pass runs in vectors, with 128+ channels each
// side from 48 tiles whatever the sums: 1x256@14 0.52-0.89x torch's time (transposed 0.75-1.14), 4x256@14
// 0.75-0.81 (1.04-1.18), 8x512@7 0.84 (1.05), 1x512@14 0.62 (0.80); not 2x512@7 (32 tiles: 0.84 against the
// GEMM's 0.46), nor 64 channels on 49 tiles (0.98 against transposed's 0.75). With 32 channels each side too
// (side by side in one process, against transposed's time): 128x32@28 0.79-0.85, 8x32@56 0.82-0.86, 2x32@28
// 0.76-0.84; 32x32@8 0.81x torch's time where the lanes kernels took 1.4-1.6x.
bool winograd_wgrad_preferred(const Conv& cv) {
  const int64_t tiles = cv.n * ceil_div(cv.p, 2) * ceil_div(cv.q, 2);
  return (cv.cg >= 32 && cv.kg >= 32 && tiles >= 64 && 16 * cv.cg * cv.kg <= 4096 * tiles) ||
         (cv.cg >= 128 && cv.kg >= 128 && tiles >= 48);
}

// F(3x3, 4x4) (winograd.h) where F(3x3, 2x2)'s rule holds, its 36 in × out sums stay within 16384 per 4x4 tile
// (a part's M, written once per item, then outweighs the products saved) and its tiles multiply at most 2/3 as
// much as the 2x2 ones (36 products per 4x4 tile against 16 per 2x2 one: a 5x5 or 6x6 plane pads to 8x8 and
// saves nothing; 14x14 pads to 16x16 and multiplies 0.73 as much). Side by side in one process, time against
// F(3x3, 2x2)'s: 8x64@56 0.75-0.84, 8x128@28 0.73-0.80, 1x64@56 0.75-0.87, 1x128@28 0.90-0.95, 2x128@28 0.79-0.93,
// 128x32@28 0.82-1.22 (0.92-1.00 in four of five runs on the AMD machine); past 16384 sums per tile 8x256@14
// (18432) 1.05-1.17, 4x256@14 1.03-1.15; on 5x5 outputs 128x64->128 (valid, 7x7 input) 1.1-1.4. On 14x14 planes
// (0.73 the products) it lost on the AMD machine: 128x64@14 1.00-1.06, 128x32->64@14 1.18-1.25, 32x64@14 1.29,
// 8x128@14 1.15 (0.94-1.03 on the Intel machine before), hence 2/3. Since its runs of tiles copy the rows they read
// themselves (winograd.cpp), 14x14 planes (up to 3/4 as much) pay on those runs, i.e. with more 4x4 tiles than twice
// the output channels: 128x32->64@14 0.84-0.95, 128x64@14 0.81-0.84, 32x64@14 0.82-0.89, 16x64@14 0.84-0.85; not on
// the blocks of output channels (8x64@14 1.36-1.37, 8x128@14 1.05-1.50).
// The bound on the sums per tile is the runs' alone: on the blocks (few tiles, winograd_wgrad_needs_channels_last)
// nothing is summed across parts and each block's M is written once. But below 128 channels a side the 4x4 tiles
// take the blocks only where the 2x2 ones do too: having 4x fewer tiles, they reach the blocks' bound (tiles <=
// twice the output channels) on planes where the 2x2 tiles run by runs, and there the blocks, of 16-24 output
// channels at 64-96 channels, measured 1.3-2.2x the runs' time: 1x64@28 0.266 against 0.136-0.140 ms, 2x64@28 0.459
// / 0.266, 4x64@16 0.343 / 0.170, 8x64@16 0.599 / 0.328, 1x96@28 0.446 / 0.306, 1x32@28 0.127 / 0.058, 16x32->64@8
// 0.221 / 0.117, 2x128->64@28 0.770 / 0.547, 2x64->128@28 0.621 / 0.505; with 128 each side they won (2x128@28
// 1.03-1.08 / 1.07-1.19, 3x128@28 1.54 / 1.61, 4x128@28 2.01 / 2.15). Where both run on the blocks, on 7x7, 8x8,
// 16x16 and 28x28 planes (at most 0.56 the products), side by side in one process, ms, F(3x3, 2x2) -> F(3x3, 4x4):
// 3x256@7 0.59 -> 0.55, 8x256@7 1.32 -> 1.09, 4x512@7 2.52 -> 2.12, 8x512@7 5.16-5.33 -> 3.68-3.70, 16x512@7 8.7 ->
// 7.1, 32x256@7 4.58 -> 3.59, 4x256@8 0.72 -> 0.62, 8x256@8 1.29 -> 1.04, 8x128@8 0.43 -> 0.37, 4x128@8 0.240 ->
// 0.244, 1x256@28 2.00 -> 1.64, 2x256@28 3.73 -> 2.87, 1x128@16 0.244 -> 0.241, 1x256@16 0.705 -> 0.686, 1x128@32
// 0.91 -> 0.69 (torch: 0.74, 1.54, 3.79, 6.65-6.73, 12.5, 5.30, 1.07, 1.90, 0.50, 0.30, 2.64, 5.08, 0.29, 1.01,
// 0.95).
// Since the GEMMs on few tiles run whole where V outgrows what the blocks share (winograd.cpp's
// winograd_wgrad_whole), the 4x4 tiles pay there on 14x14 planes too (up to 3/4 the products), where M is within
// half of the blocks' re-reads of V (margin 2); side by side in one process, ms, F(3x3, 2x2) -> F(3x3, 4x4): 8x256@14
// 2.87-2.91 -> 2.33-2.40, 4x256@14 1.50-1.53 -> 1.33-1.48, 8x192@14 2.11-2.15 -> 1.47-1.51, 8x128@14 0.99-1.09 ->
// 0.84-0.88, 16x128@14 1.99-2.01 -> 1.65 (torch: 4.68-4.76, 2.51-3.01, 2.75-2.77, 1.29-1.33, 2.43-2.46); not with M
// beyond half of them: 2x256@14 0.80-0.82 -> 0.84-0.88, 4x128@14 0.46 -> 0.47-0.48.
// On the runs, where the 4x4 tiles multiply at most 2/3 as much (7x7, 8x8, 12x12 planes: 0.56), the products
// they save outweigh M up to 131072 sums per tile: side by side in one process, ms, F(3x3, 2x2) -> F(3x3, 4x4)
// (torch): 32x512@7 (73728 sums per tile) 16.0-16.3 -> 13.1-13.5 (22.7), 64x512@7 (36864) 32.4-32.9 -> 26.2-27.0
// (45.6-46.0), 48x512@7 23.8-24.2 -> 20.1-22.6 (34.0-34.3), 16x512@12 (65536) 18.8-18.9 -> 15.0-15.9 (28.1), 64x384@7
// 18.6-18.7 -> 12.6-12.9 (25.0); a tie at 32x768@7 (165888: 42.6-47.4 -> 44.2-44.4), 32x1024@7 (294912) 90.9-91.2
// -> 78.9-80.1 (92.3-93.2), but 16x1024@7 (589824) 44.7-47.5 -> 81.3-82.8 (47.1-47.2). At 3/4 (14x14) the bound
// stays: 8x512@14 (73728) 12.6-12.7 -> 13.5-13.6. Their error against float64 there, 3.2e-4 at 32x512@7 and 4.8e-4
// at 16x512@12, is torch's own float32 weight gradient's (2.7e-4, 4.9e-4).
// Unlike the forward's (winograd_4x4_precision), its float32 error needs no precision condition: the weight
// gradient's tolerance scales with its own values, and against float64 it measured 1.1-2.0x the error of torch's
// own float32 weight gradient (ResNet-like layers at batch 2-16, and the 67-channel layer with unscaled weights;
// 1.7-2.6x on 4-16x512@7 and 8x256@8), at most 0.11 of the suite's tolerance (tests/test_winograd.py bounds it at
// 0.25).
bool winograd_4x4_wgrad_preferred(const Conv& cv, at::ScalarType dtype) {
  const int64_t tiles = cv.n * ceil_div(cv.p, 4) * ceil_div(cv.q, 4);
  const int64_t tiles_2x2 = cv.n * ceil_div(cv.p, 2) * ceil_div(cv.q, 2);
  const Winograd3x3 wp = winograd_problem(cv);
  const auto by_blocks = [&](int64_t tile) {
    return dtype == at::kDouble ? winograd_wgrad_needs_channels_last<double>(wp, tile)
                                : winograd_wgrad_needs_channels_last<float>(wp, tile);
  };
  const bool blocks = by_blocks(4);
  const bool whole = blocks && (dtype == at::kDouble ? winograd_wgrad_whole_gemms<double>(wp, 4, 2)
                                                     : winograd_wgrad_whole_gemms<float>(wp, 4, 2));
  return winograd_wgrad_preferred(cv) && (!blocks || by_blocks(2) || (cv.cg >= 128 && cv.kg >= 128)) &&
         (blocks || 36 * cv.cg * cv.kg <= 16384 * tiles ||
          (3 * 36 * tiles <= 2 * 16 * tiles_2x2 && 36 * cv.cg * cv.kg <= 131072 * tiles)) &&
         (3 * 36 * tiles <= 2 * 16 * tiles_2x2 || ((!blocks || whole) && 4 * 36 * tiles <= 3 * 16 * tiles_2x2));
}

// dcol's rule: the implicit product computes H rows of W + (S-1)·dil columns for P·Q useful ones; dcol pays no
// wasted columns but a col2im, and its dcol buffer must stay within the scratch budget. Also, dcol reads Wᵀ in
// place where the implicit product packs it per call: that pays where the kernel matrix is large and one image
// cannot amortise it (batch 1 at 512 channels on 7x7, 9 MiB: dcol 1.4x torch's time, implicit 1.8x; at 2.3 MiB
// they measured even).
bool implicit_dgrad_wastes_columns(const Conv& cv) {
  return double(cv.h) * Window::cols_of(cv, true) > 1.5 * double(cv.pq);
}

bool dcol_preferred(const Conv& cv, at::ScalarType dtype) {
  const int64_t element_bytes = int64_t(c10::elementSize(dtype));
  const DcolPlan d = dcol_plan(cv, element_bytes);
  const bool large_weights = dgrad_split(cv, element_bytes).m_parts > 1 && cv.k * cv.crs * element_bytes > (4 << 20);
  return (implicit_dgrad_wastes_columns(cv) || large_weights) &&
         d.cc * cv.rs * cv.pq * element_bytes <= 2 * kScratchBytes;
}

// The implicit dgrad's GEMM has only Cg rows: worth it unless most of each micro-kernel row tile is padding.
bool dgrad_implicit_preferred(const Conv& cv, at::ScalarType dtype) {
  const ImplicitSplit split = dgrad_split(cv, int64_t(c10::elementSize(dtype)));
  const int64_t n = split.rows * Window::cols_of(cv, true), m = ceil_div(cv.cg, split.m_parts);
  const int mr = dtype == at::kFloat ? pick_micro_kernel<float>(m, n).mr : pick_micro_kernel<double>(m, n).mr;
  return detail::round_up(cv.cg, mr) <= 2 * cv.cg;
}

// 2x2 windows with stride 2 tiling the whole input with no padding (the MNIST models' pooling), and for average
// pooling a divisor of 4: row pair m of the stacked planes (N*C*H rows) is output row m.
bool is_tiled_2x2(const PoolShape<int64_t>& s, c10::optional<int64_t> divisor_override) {
  return s.kh == 2 && s.kw == 2 && s.stride_h == 2 && s.stride_w == 2 && s.pad_h == 0 && s.pad_w == 0 &&
         s.h == 2 * s.p && s.w == 2 * s.q && (!divisor_override.has_value() || *divisor_override == 4);
}

// The tiled max-pooling kernel holds in-window offsets (up to W + 1) in lanes as wide as float's.
bool max_tiled_2x2(const PoolShape<int64_t>& s) {
  return is_tiled_2x2(s, c10::nullopt) && s.w < std::numeric_limits<int32_t>::max();
}

// Windows fixed at compile time exist for column strides 1 and 2 (pool2d.cpp's dispatch_fixed_window).
bool has_fixed_window(const PoolShape<int64_t>& s) { return s.stride_w == 1 || s.stride_w == 2; }

}  // namespace

// The lanes kernels come first in their tables, but where Winograd's rule holds it is faster: DeepMNIST's 32 -> 64
// layer at 14x14, batch 128, measured 12.0 (lanes) / 12.1 ms forward and 15.4 / 8.9 ms weight gradient.
Fprop choose_fprop(const ConvShape<int64_t>& s, at::ScalarType dtype) {
  const Conv cv(s);
  const bool winograd = winograd_can(cv) && winograd_preferred(cv, cv.cg, cv.kg, cv.p, cv.q);
  const bool winograd_4x4 = winograd && winograd_4x4_preferred(cv, cv.cg, cv.kg, cv.p, cv.q, dtype);
  return choose<Fprop>(Direction::kFprop, {{float32(dtype) && lanes::supports(s), lanes::suits(s) && !winograd},
                                           {depthwise_serves(cv), true},
                                           {winograd_can(cv), winograd_4x4},
                                           {winograd_can(cv), winograd},
                                           {true, true},
                                           {true, true}});
}

Dgrad choose_dgrad(const ConvShape<int64_t>& s, at::ScalarType dtype) {
  const Conv cv(s);
  const bool stride1 = cv.unit_stride();
  // Where dcol's rule holds for the implicit product's wasted columns (valid convolutions on small planes),
  // Winograd's tiles cover dY padded by 2 on each side and multiply more than the direct product's useful taps;
  // dcol, with several images per GEMM, measured 0.6-0.8x Winograd's time and 0.55-0.9x the lanes kernels' from 128
  // channels in all (DeepMNIST's 64 -> 128 at 7x7, batch 128: 2.7 vs 3.5-3.6 ms), the lanes kernels 0.6x dcol's
  // below (32 -> 64 at 9x9: 0.87 vs 1.41 ms).
  const bool dcol = stride1 && dcol_preferred(cv, dtype);
  const bool small_planes = dcol && implicit_dgrad_wastes_columns(cv);
  const bool winograd =
      winograd_dgrad_can(cv) && winograd_preferred(cv, cv.kg, cv.cg, cv.h, cv.w) && !small_planes;
  const bool winograd_4x4 = winograd && winograd_4x4_preferred(cv, cv.kg, cv.cg, cv.h, cv.w, dtype);
  const bool lanes = lanes::suits_dgrad(s) && !winograd && !(small_planes && cv.cg + cv.kg >= 128);
  return choose<Dgrad>(Direction::kDgrad,
                       {{float32(dtype) && lanes::supports_dgrad(s), lanes},
                        {depthwise_serves(cv), true},
                        {winograd_dgrad_can(cv), winograd_4x4},
                        {winograd_dgrad_can(cv), winograd},
                        {stride1, dcol},
                        {stride1, stride1 && dgrad_implicit_preferred(cv, dtype)},
                        {true, true}});
}

Wgrad choose_wgrad(const ConvShape<int64_t>& s, at::ScalarType dtype) {
  const Conv cv(s);
  // Dot tiles copy only the input windows but pay the wasted columns and a horizontal sum per tile and batch, which
  // dominate for many channels on small images (measured: dot tiles 1.4x faster at Kg = 20 on 8x8 outputs, the GEMM
  // 1.3-2x faster at Kg >= 64 on ResNet 3x3 shapes). A 1x1 kernel has no wasted columns and its GEMM pays the
  // channels-last copy of the whole input (its B rows then read in place): dot tiles measured faster up to Kg = 64
  // on large planes (8x256->64@56: 1.14 vs 1.52x torch's time), the GEMM on 28x28 and smaller planes
  // (1x384->64@14: 1.02 vs 2.69x) and from Kg = 128 (8x128->512@28: 1.01 vs 2.21x; 1x960->160@7: 0.77 vs 7.2x).
  // Before both, transposed gathers only the windows (about Cg per output position) and dYᵀ (Kg), a full GEMM tile
  // wide in Kg, where the GEMM gathers Cg·R·S: the stem at batch 1/8 1.18/1.00x torch's time (GEMM 1.51/1.57, dot
  // tiles 1.50/1.46), 1x256->64@56 0.81 (1.56, 1.53), 8x64->128@56 1x1 stride 2 0.86 (1.26, 1.54), 4x16->32@30 5x5
  // 0.95 (dot tiles 1.26), 8x24->32@12 0.69 (0.93). Its per-thread dWᵀ partials lose where the kernel outweighs the
  // positions (1x128->256@28 1x1 stride 2, 167 weights per position: 0.90 vs the GEMM's 0.78; 1x256->256@14 3x3:
  // 3.3 vs 1.45), so there the threads (if several) share out the input channels: with 128+ positions, a kernel of
  // more than one tap beats the GEMM's colᵀ (1x256->256@14 1.18 vs 1.39; 8x512@7 1.43 vs 1.67; 1x128->256@28
  // stride 2 1.03 vs 1.27), with 49 the GEMM, which writes dW itself, wins (1x512@7 1.06 vs 0.93; 1x256->512@14
  // stride 2 1.03 vs 0.83), as it does on 1x1 kernels (their colᵀ is only Cg per position). Narrow tiles lose to
  // the dot tiles (8x16->16@32: 1.57 vs 1.30; 128x1->32@28: 1.19 vs 0.90), and for a 1x1, stride-1 kernel with
  // Kg > Cg the GEMM's copy of the input is the smaller gather (1x/8x64->256@56: 1.21/1.13 vs 0.91/0.96).
  const bool winograd = winograd_can(cv) && winograd_wgrad_preferred(cv);
  const bool winograd_4x4 = winograd && winograd_4x4_wgrad_preferred(cv, dtype);
  const bool transposed = (cv.kg >= 32 || (cv.rs == 1 && cv.kg >= 16)) && cv.crs >= 32 &&
                          !(cv.rs == 1 && cv.unit_stride() && cv.kg > cv.cg) &&
                          (cv.crs * cv.kg <= kTransposedWeightsPerPosition * cv.n * cv.pq ||
                           (cv.rs > 1 && cv.n * cv.pq >= 128 && num_threads() > 1));
  return choose<Wgrad>(Direction::kWgrad, {{float32(dtype) && lanes::supports(s), lanes::suits(s) && !winograd},
                                           {depthwise_serves(cv), true},
                                           {winograd_can(cv), winograd_4x4},
                                           {winograd_can(cv), winograd},
                                           {true, transposed},
                                           {true, cv.kg <= 32 || (cv.rs == 1 && cv.kg <= 64 && cv.pq >= 1024)},
                                           {true, true}});
}

FusedForward choose_fused_forward(const ConvShape<int64_t>& s, at::ScalarType dtype) {
  return choose<FusedForward>(Direction::kFusedForward,
                              {{float32(dtype) && lanes::supports(s), lanes::suits(s)}, {true, true}});
}

FusedBackward choose_fused_backward(const ConvShape<int64_t>& s, at::ScalarType dtype, bool grad_input) {
  const bool can = float32(dtype) && lanes::supports(s) && (!grad_input || lanes::supports_dgrad(s));
  const bool preferred = lanes::suits(s) && (!grad_input || lanes::suits_dgrad(s));
  return choose<FusedBackward>(Direction::kFusedBackward, {{can, preferred}, {true, true}});
}

MaxPoolForward choose_max_pool_forward(const PoolShape<int64_t>& s) {
  return choose<MaxPoolForward>(Direction::kMaxPoolForward,
                                {{max_tiled_2x2(s), true}, {has_fixed_window(s), true}, {true, true}});
}

AvgPoolForward choose_avg_pool_forward(const PoolShape<int64_t>& s, c10::optional<int64_t> divisor_override) {
  return choose<AvgPoolForward>(Direction::kAvgPoolForward,
                                {{is_tiled_2x2(s, divisor_override), true}, {has_fixed_window(s), true}, {true, true}});
}

AvgPoolBackward choose_avg_pool_backward(const PoolShape<int64_t>& s, c10::optional<int64_t> divisor_override) {
  return choose<AvgPoolBackward>(Direction::kAvgPoolBackward, {{is_tiled_2x2(s, divisor_override), true}, {true, true}});
}

void record(Direction direction, int algorithm) {
  if (!recording.load(std::memory_order_relaxed)) return;
  std::lock_guard<std::mutex> lock(record_mutex);
  record_list.push_back({static_cast<int>(direction), algorithm, isa()});
}

std::vector<std::pair<std::string, std::vector<TableRow>>> dispatch_tables() {
  std::vector<std::pair<std::string, std::vector<TableRow>>> out;
  for (const Table& t : tables()) {
    std::vector<TableRow> rows;
    for (const Entry& e : t.rows) rows.push_back({e.name, e.when, e.why});
    out.emplace_back(t.direction, std::move(rows));
  }
  return out;
}

bool set_forced(const std::string& direction, const std::string& algorithm) {
  for (size_t d = 0; d < tables().size(); ++d) {
    if (direction != tables()[d].direction) continue;
    if (algorithm.empty()) {
      forced_plus_one[d] = 0;
      return true;
    }
    const auto& rows = tables()[d].rows;
    for (size_t a = 0; a < rows.size(); ++a) {
      if (algorithm == rows[a].name) {
        forced_plus_one[d] = static_cast<int>(a) + 1;
        return true;
      }
    }
  }
  return false;
}

std::vector<std::pair<std::string, std::string>> forced_algorithms() {
  std::vector<std::pair<std::string, std::string>> out;
  for (size_t d = 0; d < tables().size(); ++d) {
    const int a = forced_plus_one[d].load() - 1;
    if (a != kNotForced) out.emplace_back(tables()[d].direction, tables()[d].rows[a].name);
  }
  return out;
}

void set_recording(bool on) { recording = on; }

std::vector<RecordedCall> take_record() {
  std::lock_guard<std::mutex> lock(record_mutex);
  std::vector<RecordedCall> out;
  for (const Recorded& r : record_list) {
    out.push_back({tables()[r.direction].direction, tables()[r.direction].rows[r.algorithm].name, isa_name(r.isa)});
  }
  record_list.clear();
  return out;
}

}  // namespace cnn_ext::cpu
