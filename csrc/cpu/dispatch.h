// Which CPU algorithm serves a call: one table per direction, in dispatch.cpp (its header comment lists every
// algorithm, when it is chosen and why). Any algorithm can be forced (CNN_EXT_CPU_ALGORITHMS, or
// cnn_ext.cpu_dispatch.forced() in Python): it then serves every call it can compute, and the usual rule the rest.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>
#include <utility>
#include <vector>

#include "../checks.h"

namespace cnn_ext::cpu {

enum class Direction : int {
  kFprop,
  kDgrad,
  kWgrad,
  kFusedForward,
  kFusedBackward,
  kMaxPoolForward,
  kAvgPoolForward,
  kAvgPoolBackward,
  kCount
};

// Each direction's algorithms, in the order of its table.
enum class Fprop : int { kLanes, kDepthwise, kWinograd4x4, kWinograd, kImplicit, kExplicit };
enum class Dgrad : int { kLanes, kDepthwise, kWinograd4x4, kWinograd, kDcol, kImplicit, kExplicit };
enum class Wgrad : int { kLanes, kDepthwise, kWinograd4x4, kWinograd, kTransposed, kDotTiles, kGemm };
enum class FusedForward : int { kLanes, kGemmPool };
enum class FusedBackward : int { kLanes, kComposite };
enum class MaxPoolForward : int { kTiled2x2, kFixedWindow, kGeneral };
enum class AvgPoolForward : int { kTiled2x2, kFixedWindow, kGeneral };
enum class AvgPoolBackward : int { kTiled2x2, kGeneral };

Fprop choose_fprop(const ConvShape<int64_t>& s, at::ScalarType dtype);
Dgrad choose_dgrad(const ConvShape<int64_t>& s, at::ScalarType dtype);
Wgrad choose_wgrad(const ConvShape<int64_t>& s, at::ScalarType dtype);
FusedForward choose_fused_forward(const ConvShape<int64_t>& s, at::ScalarType dtype);
// grad_input: whether the input's gradient is wanted (the lanes kernels then need dgrad's conditions too).
FusedBackward choose_fused_backward(const ConvShape<int64_t>& s, at::ScalarType dtype, bool grad_input);
MaxPoolForward choose_max_pool_forward(const PoolShape<int64_t>& s);
AvgPoolForward choose_avg_pool_forward(const PoolShape<int64_t>& s, c10::optional<int64_t> divisor_override);
AvgPoolBackward choose_avg_pool_backward(const PoolShape<int64_t>& s, c10::optional<int64_t> divisor_override);

// Records that `algorithm` served a call (choose_* do so themselves; a caller that falls back records again).
void record(Direction direction, int algorithm);

// For cnn_ext.cpu_dispatch: the tables, forcing, and the record of what ran.
struct TableRow {
  std::string algorithm, when, why;
};
std::vector<std::pair<std::string, std::vector<TableRow>>> dispatch_tables();
// Forces `algorithm` (a name from the table) for `direction`, or clears it (empty name); false if either is unknown.
bool set_forced(const std::string& direction, const std::string& algorithm);
std::vector<std::pair<std::string, std::string>> forced_algorithms();
void set_recording(bool on);
struct RecordedCall {
  std::string direction, algorithm, isa;
};
// Every call since the last take, oldest first.
std::vector<RecordedCall> take_record();

}  // namespace cnn_ext::cpu
