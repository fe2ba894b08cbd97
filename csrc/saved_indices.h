// Max-pool indices that autograd saved from cnn_ext's own forward are valid by construction: an in-place change to
// them fails autograd's version check before any backward runs. While a SavedIndicesScope is alive on a thread, the
// CUDA max-pool backward trusts the indices it is given: its check reads a verdict back from the GPU, a copy that
// waits for the stream and so stalled every backward pass through a max-pool (twice per step of the seed model, whose
// fused layers' backward is a composite over it). Direct calls of the backward operators, with indices from
// anywhere, are always checked, on every device.
#pragma once

namespace cnn_ext {

class SavedIndicesScope {
 public:
  SavedIndicesScope() : previous_(flag()) { flag() = true; }
  ~SavedIndicesScope() { flag() = previous_; }
  SavedIndicesScope(const SavedIndicesScope&) = delete;
  SavedIndicesScope& operator=(const SavedIndicesScope&) = delete;

  static bool active() { return flag(); }

 private:
  static bool& flag() {
    static thread_local bool value = false;
    return value;
  }
  bool previous_;
};

}  // namespace cnn_ext
