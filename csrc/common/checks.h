// Argument checks for the ops: every tensor argument is checked for shape, dtype, device and
// layout, and every failure names the op and the argument. Called directly with anything wrong,
// an op raises; it never reads out of bounds and never answers wrong.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <string>
#include <optional>
#include <vector>

namespace mtl_kernels {

// What an argument must be; the first mismatch raises "<op>: <name> must ...".
struct ArgSpec {
  const char* op;
  const char* name;
  std::vector<int64_t> shape;  // exact sizes
  at::ScalarType dtype;
  at::Device device;
};

// "torch.float32", as Python spells dtypes.
inline std::string dtype_name(at::ScalarType t) {
  return "torch." + std::string(c10::getDtypeNames(t).first);
}

inline void check_arg(const at::Tensor& t, const ArgSpec& s) {
  TORCH_CHECK(t.defined(), s.op, ": ", s.name, " is undefined");
  TORCH_CHECK(t.layout() == at::kStrided, s.op, ": ", s.name, " must be a dense (strided) tensor, got ",
              t.layout());
  TORCH_CHECK(t.sizes() == at::IntArrayRef(s.shape), s.op, ": ", s.name, " must have shape ",
              at::IntArrayRef(s.shape), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == s.dtype, s.op, ": ", s.name, " must have dtype ", dtype_name(s.dtype),
              ", got ", dtype_name(t.scalar_type()));
  TORCH_CHECK(t.device() == s.device, s.op, ": ", s.name, " must be on ", s.device, ", got ",
              t.device());
}

inline void check_dense_floating(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, " must be a dense (strided) tensor, got ",
              t.layout());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
              " must be a floating-point tensor, got ", dtype_name(t.scalar_type()));
}

// lengths: (B,) or (G, B) int64 on `device`, values in [1, T] or [0, T] (below). The values are
// checked where that needs no device synchronisation (a CPU tensor); on a GPU the Python modules
// check them (a sync inside the op would break CUDA-graph capture), and the kernels clamp nothing:
// a length above T reads as "every step valid", a length below 1 as "no step valid", both within
// bounds.
inline at::Tensor checked_lengths(const std::optional<at::Tensor>& lengths, const char* op,
                                  int64_t G, int64_t B, int64_t T, const at::Device& device) {
  if (!lengths.has_value() || !lengths->defined()) return at::Tensor();
  const at::Tensor& l = *lengths;
  // (B,): one length per row, shared by the groups, in [1, T] (nn.LSTM's packed sequences);
  // (G, B): per (group, row), in [0, T]: each group's own batch (ragged multi-task calls), rows
  // past a group's batch holding no sequence (length 0: output 0, h_n = h0)
  const bool per_group = l.dim() == 2;
  check_arg(l, {op, "lengths", per_group ? std::vector<int64_t>{G, B} : std::vector<int64_t>{B},
                at::kLong, device});
  if (l.device().is_cpu() && l.numel() > 0) {
    const int64_t lo = l.min().item<int64_t>(), hi = l.max().item<int64_t>();
    const int64_t least = per_group ? 0 : 1;
    TORCH_CHECK(lo >= least && hi <= T, op, ": lengths must lie in [", least, ", ", T,
                "] (the number of time steps), got values in [", lo, ", ", hi, "]");
  }
  return l.contiguous();  // the kernels index lengths[g * B + b] through a raw pointer
}

}  // namespace mtl_kernels
