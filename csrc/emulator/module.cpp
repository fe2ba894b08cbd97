// cnn_ext._cuda_emulator: the CUDA kernels of csrc/cuda/, compiled for the CPU against the emulator, and the switch
// that makes them serve cnn_ext's operators on CPU tensors (used through cnn_ext.cuda_emulation).
//
// Switching on registers two libraries for the CPU dispatch key, replacing the CPU kernels until they are
// destroyed: first the composite kernels that a CUDA build runs where it has no kernel of its own (the CPU build has
// its own fused backward ops), then the CUDA sources' own registrations (CNN_EXT_CUDA_KERNELS blocks), which win where
// both exist. Switching off destroys them, and the CPU kernels serve again.
#include <Python.h>

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <memory>
#include <string>
#include <vector>

#include "../composite.h"
#include "emulator_options.h"
#include "registration.h"

namespace cnn_ext::emu {
namespace {

std::vector<Registration>& registrations() {
  static std::vector<Registration> list;
  return list;
}

struct Installed {
  std::unique_ptr<torch::Library> composites, kernels;
};

Installed& installed() {
  static Installed state;
  return state;
}

// Replacing a kernel is what this module is for: torch's one-time warning about it is dropped, others pass on.
class DropOverrideWarning : public c10::WarningHandler {
 public:
  explicit DropOverrideWarning(c10::WarningHandler* next) : next_(next) {}
  void process(const c10::Warning& warning) override {
    if (warning.msg().find("Overriding a previously registered kernel") == std::string::npos) next_->process(warning);
  }

 private:
  c10::WarningHandler* next_;
};

void install() {
  if (installed().kernels) return;
  DropOverrideWarning handler(c10::WarningUtils::get_warning_handler());
  const c10::WarningUtils::WarningHandlerGuard guard(&handler);
  auto composites = std::make_unique<torch::Library>(torch::Library::IMPL, "cnn_ext", c10::DispatchKey::CPU,
                                                     __FILE__, __LINE__);
  composites->impl("conv2d_maxpool_relu_backward_pool", &conv2d_maxpool_relu_backward_pool);
  composites->impl("conv2d_maxpool_relu_backward", &conv2d_maxpool_relu_backward_composite);
  auto kernels = std::make_unique<torch::Library>(torch::Library::IMPL, "cnn_ext", c10::DispatchKey::CPU, __FILE__,
                                                  __LINE__);
  for (Registration registration : registrations()) registration(*kernels);
  installed() = {std::move(composites), std::move(kernels)};
}

void uninstall() {
  installed().kernels.reset();
  installed().composites.reset();
}

// ---------------------------------------------------------------------------------------------------------------
// Python functions.
// ---------------------------------------------------------------------------------------------------------------

const char* order_name(Order order) {
  switch (order) {
    case Order::kForward: return "forward";
    case Order::kReverse: return "reverse";
    case Order::kRandom: return "random";
  }
  return "?";
}

// Runs f, turning a C++ exception into a Python one.
template <typename F>
PyObject* guarded(F&& f) {
  try {
    return f();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

PyObject* py_enable(PyObject*, PyObject*) {
  return guarded([] {
    install();
    Py_RETURN_NONE;
  });
}

PyObject* py_disable(PyObject*, PyObject*) {
  return guarded([] {
    uninstall();
    Py_RETURN_NONE;
  });
}

PyObject* py_is_enabled(PyObject*, PyObject*) { return PyBool_FromLong(installed().kernels != nullptr); }

PyObject* py_options(PyObject*, PyObject*) {
  const Options& o = options();
  return Py_BuildValue("{s:s,s:K,s:i,s:O,s:O,s:O}", "order", order_name(o.order), "seed",
                       static_cast<unsigned long long>(o.seed), "multiprocessor_count", o.multiprocessor_count,
                       "force_int64_indices", o.force_int64_indices ? Py_True : Py_False, "drop_barriers",
                       o.drop_barriers ? Py_True : Py_False, "record_launches",
                       o.record_launches ? Py_True : Py_False);
}

PyObject* py_set_options(PyObject*, PyObject* args, PyObject* kwargs) {
  static const char* keywords[] = {"order",         "seed",           "multiprocessor_count", "force_int64_indices",
                                   "drop_barriers", "record_launches", nullptr};
  const char* order = nullptr;
  unsigned long long seed = options().seed;
  int multiprocessor_count = options().multiprocessor_count;
  int force_int64 = options().force_int64_indices;
  int drop_barriers = options().drop_barriers;
  int record_launches = options().record_launches;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|$zKippp", const_cast<char**>(keywords), &order, &seed,
                                   &multiprocessor_count, &force_int64, &drop_barriers, &record_launches)) {
    return nullptr;
  }
  Order parsed = options().order;
  if (order != nullptr) {
    const std::string name = order;
    if (name == "forward") {
      parsed = Order::kForward;
    } else if (name == "reverse") {
      parsed = Order::kReverse;
    } else if (name == "random") {
      parsed = Order::kRandom;
    } else {
      PyErr_Format(PyExc_ValueError, "order must be 'forward', 'reverse' or 'random', got '%s'", order);
      return nullptr;
    }
  }
  if (multiprocessor_count < 1) {
    PyErr_Format(PyExc_ValueError, "multiprocessor_count must be positive, got %d", multiprocessor_count);
    return nullptr;
  }
  options() = {parsed, seed, multiprocessor_count, force_int64 != 0, drop_barriers != 0, record_launches != 0};
  Py_RETURN_NONE;
}

PyObject* py_take_launch_record(PyObject*, PyObject*) {
  return guarded([]() -> PyObject* {
    const std::vector<LaunchRecord> launches = take_launch_record();
    PyObject* list = PyList_New(static_cast<Py_ssize_t>(launches.size()));
    if (list == nullptr) return nullptr;
    for (size_t i = 0; i < launches.size(); ++i) {
      const LaunchRecord& l = launches[i];
      PyObject* item = Py_BuildValue("(s(III)(III))", l.kernel.c_str(), l.grid[0], l.grid[1], l.grid[2], l.block[0],
                                     l.block[1], l.block[2]);
      if (item == nullptr) {
        Py_DECREF(list);
        return nullptr;
      }
      PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), item);
    }
    return list;
  });
}

PyMethodDef methods[] = {
    {"enable", py_enable, METH_NOARGS, "Serve cnn_ext's operators on CPU tensors with the emulated CUDA kernels."},
    {"disable", py_disable, METH_NOARGS, "Serve them with the CPU kernels again."},
    {"is_enabled", py_is_enabled, METH_NOARGS, "Whether the emulated CUDA kernels serve cnn_ext's operators."},
    {"options", py_options, METH_NOARGS, "The emulator's options, as a dict."},
    {"set_options", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_set_options)),
     METH_VARARGS | METH_KEYWORDS,
     "set_options(*, order=None, seed=None, multiprocessor_count=None, force_int64_indices=None, "
     "drop_barriers=None, record_launches=None)"},
    {"take_launch_record", py_take_launch_record, METH_NOARGS,
     "The (kernel, grid, block) of every launch recorded since the last call, oldest first."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_cuda_emulator", nullptr, -1, methods};

}  // namespace

bool add_registration(Registration registration) {
  registrations().push_back(registration);
  return true;
}

}  // namespace cnn_ext::emu

extern "C" PyObject* PyInit__cuda_emulator(void) { return PyModule_Create(&cnn_ext::emu::module_def); }
