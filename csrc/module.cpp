// The Python module cnn_ext._C: importing it loads the library, whose static initialisers register the operators
// (ops.cpp and the kernels' files); its functions expose the CPU kernels' ISA and dispatch tables to
// cnn_ext.cpu_dispatch, and the CPU output cache (cpu/output_cache.h) to cnn_ext.
#include <Python.h>

#include <string>
#include <utility>
#include <vector>

#include "cpu/dispatch.h"
#include "cpu/isa.h"
#include "cpu/output_cache.h"

namespace cnn_ext::cpu {
namespace {

PyObject* pairs_to_list(const std::vector<std::pair<std::string, std::string>>& pairs) {
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(pairs.size()));
  if (list == nullptr) return nullptr;
  for (size_t i = 0; i < pairs.size(); ++i) {
    PyObject* item = Py_BuildValue("(ss)", pairs[i].first.c_str(), pairs[i].second.c_str());
    if (item == nullptr) {
      Py_DECREF(list);
      return nullptr;
    }
    PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), item);
  }
  return list;
}

PyObject* py_cpu_isa(PyObject*, PyObject*) { return PyUnicode_FromString(isa_name(isa())); }
PyObject* py_machine_isa(PyObject*, PyObject*) { return PyUnicode_FromString(isa_name(machine_isa())); }

PyObject* py_set_cpu_isa_limit(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  for (Isa candidate : {Isa::kDefault, Isa::kAvx2, Isa::kAvx512}) {
    if (std::string(name) == isa_name(candidate)) return PyUnicode_FromString(isa_name(set_isa_limit(candidate)));
  }
  PyErr_Format(PyExc_ValueError, "unknown ISA '%s': choose default, avx2 or avx512", name);
  return nullptr;
}

PyObject* py_dispatch_tables(PyObject*, PyObject*) {
  const auto tables = dispatch_tables();
  PyObject* out = PyList_New(0);
  if (out == nullptr) return nullptr;
  for (const auto& [direction, rows] : tables) {
    PyObject* py_rows = PyList_New(0);
    for (const TableRow& row : rows) {
      PyObject* item = Py_BuildValue("(sss)", row.algorithm.c_str(), row.when.c_str(), row.why.c_str());
      PyList_Append(py_rows, item);
      Py_DECREF(item);
    }
    PyObject* entry = Py_BuildValue("(sN)", direction.c_str(), py_rows);
    PyList_Append(out, entry);
    Py_DECREF(entry);
  }
  return out;
}

PyObject* py_set_forced(PyObject*, PyObject* args) {
  const char* direction = nullptr;
  const char* algorithm = nullptr;
  if (!PyArg_ParseTuple(args, "sz", &direction, &algorithm)) return nullptr;
  if (!set_forced(direction, algorithm == nullptr ? "" : algorithm)) {
    PyErr_Format(PyExc_ValueError, "no CPU algorithm '%s' for direction '%s'", algorithm ? algorithm : "",
                 direction);
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyObject* py_forced(PyObject*, PyObject*) { return pairs_to_list(forced_algorithms()); }

PyObject* py_set_recording(PyObject*, PyObject* arg) {
  const int on = PyObject_IsTrue(arg);
  if (on < 0) return nullptr;
  set_recording(on != 0);
  Py_RETURN_NONE;
}

PyObject* py_take_record(PyObject*, PyObject*) {
  const auto calls = take_record();
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(calls.size()));
  if (list == nullptr) return nullptr;
  for (size_t i = 0; i < calls.size(); ++i) {
    PyObject* item = Py_BuildValue("(sss)", calls[i].direction.c_str(), calls[i].algorithm.c_str(), calls[i].isa.c_str());
    if (item == nullptr) {
      Py_DECREF(list);
      return nullptr;
    }
    PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), item);
  }
  return list;
}

PyObject* py_output_cache_info(PyObject*, PyObject*) {
  return Py_BuildValue("(nn)", static_cast<Py_ssize_t>(output_cache_bytes()),
                       static_cast<Py_ssize_t>(output_cache_budget()));
}

PyObject* py_set_output_cache_budget(PyObject*, PyObject* arg) {
  const Py_ssize_t bytes = PyNumber_AsSsize_t(arg, PyExc_OverflowError);
  if (bytes == -1 && PyErr_Occurred()) return nullptr;
  if (bytes < 0) {
    PyErr_SetString(PyExc_ValueError, "the output cache's budget must be >= 0 bytes");
    return nullptr;
  }
  set_output_cache_budget(static_cast<size_t>(bytes));
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"cpu_isa", py_cpu_isa, METH_NOARGS, "The ISA the CPU kernels use now."},
    {"machine_isa", py_machine_isa, METH_NOARGS, "The best ISA this CPU and ATEN_CPU_CAPABILITY allow."},
    {"set_cpu_isa_limit", py_set_cpu_isa_limit, METH_O, "Limit the kernels' ISA; returns the previous limit."},
    {"cpu_dispatch_tables", py_dispatch_tables, METH_NOARGS, "[(direction, [(algorithm, when, why), ...]), ...]"},
    {"set_cpu_forced", py_set_forced, METH_VARARGS, "set_cpu_forced(direction, algorithm or None)"},
    {"cpu_forced", py_forced, METH_NOARGS, "[(direction, algorithm)] currently forced."},
    {"set_cpu_recording", py_set_recording, METH_O, "Record which algorithm serves each call."},
    {"take_cpu_record", py_take_record, METH_NOARGS, "[(direction, algorithm, isa)] recorded since the last take."},
    {"output_cache_info", py_output_cache_info, METH_NOARGS, "(bytes held, budget) of the CPU output cache."},
    {"set_output_cache_budget", py_set_output_cache_budget, METH_O, "Set the CPU output cache's budget in bytes."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};

}  // namespace
}  // namespace cnn_ext::cpu

extern "C" PyObject* PyInit__C(void) { return PyModule_Create(&cnn_ext::cpu::module_def); }
