// The device-agnostic recurrence driver: see driver.h.
#include "recurrence/driver.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <map>
#include <mutex>
#include <sstream>
#include <cstring>
#include <string>
#include <utility>

#include "cells/cell.h"
#include "common/checks.h"
#include "common/poison.h"
#include "recurrence/sequence.h"

namespace mtl_kernels {

// ---- the switches and counters ----------------------------------------------------------------
EnvSetting<RecurrencePath, 3>& recurrence_path_setting() {
  static EnvSetting<RecurrencePath, 3> setting("MTL_KERNELS_LSTM_PATH", "recurrence path",
                                               {"auto", "sequence", "per_step"});
  return setting;
}

EnvSetting<MmaMode, 2>& mma_mode_setting() {
  static EnvSetting<MmaMode, 2> setting("MTL_KERNELS_MMA", "tensor-core mode (MTL_KERNELS_MMA)",
                                        {"auto", "off"});
  return setting;
}

namespace {

std::atomic<int64_t> g_forward_sequence{0}, g_forward_per_step{0}, g_backward_sequence{0},
    g_backward_per_step{0};
std::atomic<int64_t> g_tc_forward{0}, g_tc_backward{0};

}  // namespace

TensorCoreCounts tensor_core_counts() { return {g_tc_forward.load(), g_tc_backward.load()}; }

void count_tensor_core_run(bool backward) { ++(backward ? g_tc_backward : g_tc_forward); }

PathCounts path_counts() {
  return {g_forward_sequence.load(), g_forward_per_step.load(), g_backward_sequence.load(),
          g_backward_per_step.load()};
}

namespace {

// The CPU's `auto`: the first time a recurrence shape (cell, phase, G, B, H, dtype) runs, both
// paths are timed on scratch inputs of that shape (a few steps, 3-9 rounds: best_times),
// and from then on every call of that shape runs the faster one. Real calls therefore always run
// one path per shape: the same inputs give the same results, bit for bit.
class PathTuner {
 public:
  // Whether the shape `key` runs the sequence path; calibrate() -> {sequence s, per-step s} on
  // the first call.
  template <typename Calibrate>
  bool sequence(const std::string& key, const Calibrate& calibrate) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = entries_.find(key);
      if (it != entries_.end()) return it->second.sequence;
    }
    const std::pair<double, double> t = calibrate();  // outside the lock: it runs the op
    std::lock_guard<std::mutex> lock(mutex_);
    const TunedPath entry{key, t.first, t.second, t.first <= t.second};
    return entries_.emplace(key, entry).first->second.sequence;
  }

  std::vector<TunedPath> decided() {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<TunedPath> out;
    for (const auto& [key, e] : entries_) out.push_back(e);
    return out;
  }

  void reset() {
    std::lock_guard<std::mutex> lock(mutex_);
    entries_.clear();
  }

 private:
  std::mutex mutex_;
  std::map<std::string, TunedPath> entries_;
};

PathTuner& tuner() {
  static auto* t = new PathTuner();  // never destroyed: calls may come during interpreter exit
  return *t;
}

// A path the calibration forces on its own calls (this thread only): -1 none, else a
// RecurrencePath.
thread_local int t_forced_path = -1;

struct ForcedPath {
  int old;
  explicit ForcedPath(RecurrencePath p) : old(t_forced_path) { t_forced_path = static_cast<int>(p); }
  ~ForcedPath() { t_forced_path = old; }
};

// The seconds f() takes on the sequence path and on the per-step path: one warm-up run on each,
// then rounds of one run on each, alternating which goes first, and the best run of each.
// Interleaved so that a slow spell of the machine (other processes, a VM's stolen time) hits both
// paths rather than one: measured one after the other, the multitask shape's choice flipped in
// some processes on this 2-core VM though the per-step path is 30% faster there. Three rounds
// where one path is clearly faster (by more than kClearWin), up to kMaxRounds where they are
// close: at seed-tasks the sequence path's backward is ~7-9% faster (best and median of 400
// interleaved runs), and three rounds picked the per-step path in some processes.
template <typename F>
std::pair<double, double> best_times(const F& f) {
  constexpr int kMinRounds = 3, kMaxRounds = 9;
  constexpr double kClearWin = 1.15;
  const auto on = [&](RecurrencePath p) {
    const ForcedPath forced(p);
    return f();
  };
  on(RecurrencePath::kSequence);
  on(RecurrencePath::kPerStep);
  double sequence = std::numeric_limits<double>::infinity(), per_step = sequence;
  for (int round = 0; round < kMaxRounds; ++round) {
    if (round % 2 == 0) {
      sequence = std::min(sequence, on(RecurrencePath::kSequence));
      per_step = std::min(per_step, on(RecurrencePath::kPerStep));
    } else {
      per_step = std::min(per_step, on(RecurrencePath::kPerStep));
      sequence = std::min(sequence, on(RecurrencePath::kSequence));
    }
    if (round + 1 >= kMinRounds &&
        std::max(sequence, per_step) > kClearWin * std::min(sequence, per_step))
      break;
  }
  return {sequence, per_step};
}

template <typename F>
double seconds(const F& f) {
  const auto start = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// Whether choose_and_run tries the sequence path first (the switch, or the tuner's choice).
// calibrate(): see PathTuner (called for `auto` on a backend with AutoPath::kTuned only). The
// scratch inputs have one input feature, so the choice weighs the recurrences alone, not the input
// projection (which the CPU's sequence path may run in its tiles and the per-step path by MKL's
// GEMM).
template <typename Calibrate>
bool sequence_chosen(const RecurrenceKernels& kernels, bool has_sequence, const std::string& key,
                     const Calibrate& calibrate) {
  const RecurrencePath path =
      t_forced_path >= 0 ? static_cast<RecurrencePath>(t_forced_path) : recurrence_path();
  if (!has_sequence || path == RecurrencePath::kPerStep) return false;
  if (path == RecurrencePath::kSequence) return true;
  switch (kernels.auto_path) {
    case AutoPath::kTuned:
      return tuner().sequence(key, calibrate);
    case AutoPath::kSequence:
      return true;
    case AutoPath::kPerStep:
      break;
  }
  return false;
}

// Counts one recurrence run on a path (mtl_kernels.path_counts()); the calibration's own runs, made
// under a ForcedPath, are not counted.
inline void count_run(std::atomic<int64_t>& count) {
  if (t_forced_path < 0) ++count;
}

// Runs one recurrence on the path the switch, the tuner or the sizes choose: run_sequence() returns
// false when the sequence path cannot run these sizes; run_per_step() always runs.
template <typename SequenceFn, typename PerStepFn, typename Calibrate>
void choose_and_run(const RecurrenceKernels& kernels, bool has_sequence, const std::string& key,
                    const SequenceFn& run_sequence, const PerStepFn& run_per_step,
                    const Calibrate& calibrate, std::atomic<int64_t>& sequence_count,
                    std::atomic<int64_t>& per_step_count) {
  const bool try_sequence = sequence_chosen(kernels, has_sequence, key, calibrate);
  if (try_sequence && run_sequence()) {
    count_run(sequence_count);
    return;
  }
  run_per_step();
  count_run(per_step_count);
}

// Scratch inputs of a shape, for the calibration: a shared input of one feature, a few steps.
struct ScratchInputs {
  at::Tensor input, weight_ih, weight_hh, bias, bias_hh, h0, c0;
  std::optional<at::Tensor> bias_opt, bias_hh_opt, c0_opt, none;
  ForwardArgs args() const {
    return ForwardArgs{input, weight_ih, weight_hh, bias_opt, bias_hh_opt, none, h0, c0_opt, none,
                       false};
  }
};

template <class Cell>
ScratchInputs scratch_inputs(int64_t G, int64_t B, int64_t H, const at::TensorOptions& opts) {
  constexpr int64_t K = Cell::kGates;
  const int64_t T = 16;  // enough steps that the sequence path's one fork/join is amortised
  ScratchInputs s;
  s.input = at::randn({T, B, 1}, opts);
  s.weight_ih = at::randn({G, K * H, 1}, opts);
  s.weight_hh = at::randn({G, K * H, H}, opts).mul_(1.0 / std::sqrt(double(H)));
  s.bias = at::randn({G, K * H}, opts);
  s.bias_opt = s.bias;
  if (Cell::kRecBias) s.bias_hh_opt = at::randn({G, K * H}, opts);
  s.h0 = at::zeros({G, B, H}, opts);
  if (Cell::kCellState) s.c0_opt = at::zeros({G, B, H}, opts);
  return s;
}

template <class Cell>
std::string tune_key(const char* phase, int64_t G, int64_t B, int64_t H, at::ScalarType dtype) {
  std::ostringstream os;
  os << Cell::kName << ' ' << phase << ' ' << G << ' ' << B << ' ' << H << ' ' << dtype;
  return os.str();
}

}  // namespace

std::vector<TunedPath> tuned_paths() { return tuner().decided(); }
void reset_tuned_paths() { tuner().reset(); }

namespace {

// The public op's name for messages: grouped_lstm_forward, grouped_gru_backward, ...
template <class Cell>
std::string op_name(bool backward) {
  const std::string cell = Cell::kName;
  const std::string family = cell.rfind("rnn", 0) == 0 ? "rnn" : cell;
  return "grouped_" + family + (backward ? "_backward" : "_forward");
}

struct Shape {
  int64_t G, T, B, C, H;
  int64_t R;  // the width of h: H, or P with a projection
  bool shared;
};

// Checks input, weight_ih, weight_hh and weight_hr and reads the sizes from them.
template <class Cell>
Shape check_input_and_weights(const char* op, const at::Tensor& input, const at::Tensor& weight_ih,
                              const at::Tensor& weight_hh, const at::Tensor& weight_hr) {
  constexpr int64_t K = Cell::kGates;
  check_dense_floating(input, op, "input");
  TORCH_CHECK(input.dim() == 3 || input.dim() == 4, op,
              ": input must be (T, B, C) shared by the groups or (G, T, B, C) one per group, got shape ",
              input.sizes());
  check_dense_floating(weight_ih, op, "weight_ih");
  TORCH_CHECK(weight_ih.dim() == 3 && weight_ih.size(1) % K == 0 && weight_ih.size(1) > 0 &&
                  weight_ih.size(0) > 0,
              op, ": weight_ih must be (G, ", K, "*hidden_size, input_size) with G, hidden_size >= 1, got ",
              weight_ih.sizes());
  Shape s;
  s.shared = input.dim() == 3;
  s.G = weight_ih.size(0);
  s.H = weight_ih.size(1) / K;
  s.C = weight_ih.size(2);
  s.T = input.size(s.shared ? 0 : 1);
  s.B = input.size(s.shared ? 1 : 2);
  s.R = s.H;
  const at::ScalarType dtype = input.scalar_type();
  const at::Device device = input.device();
  const std::vector<int64_t> in_shape =
      s.shared ? std::vector<int64_t>{s.T, s.B, s.C} : std::vector<int64_t>{s.G, s.T, s.B, s.C};
  TORCH_CHECK(s.shared || input.size(0) == s.G, op, ": input has ", input.size(0),
              " groups but weight_ih has ", s.G);
  check_arg(input, {op, "input", in_shape, dtype, device});
  check_arg(weight_ih, {op, "weight_ih", {s.G, K * s.H, s.C}, dtype, device});
  if (weight_hr.defined()) {
    TORCH_CHECK(Cell::kCellState, op, ": weight_hr (a projection) is for the LSTM only");
    TORCH_CHECK(weight_hr.dim() == 3 && weight_hr.size(1) >= 1, op,
                ": weight_hr must be (G, proj_size, hidden_size), got ", weight_hr.sizes());
    s.R = weight_hr.size(1);
    check_arg(weight_hr, {op, "weight_hr", {s.G, s.R, s.H}, dtype, device});
  }
  check_arg(weight_hh, {op, "weight_hh", {s.G, K * s.H, s.R}, dtype, device});
  TORCH_CHECK(s.T >= 1, op, ": input must have at least one time step, got shape ", input.sizes());
  return s;
}

GateLayout gate_layout(const Shape& s, int64_t KH) {
  if (s.shared) return GateLayout{KH, s.B * s.G * KH, s.G * KH};  // (T, B, G, KH)
  return GateLayout{s.T * s.B * KH, s.B * KH, KH};               // (G, T, B, KH)
}

// The layout of a gates tensor with unit stride along KH (a view of a larger buffer too).
GateLayout gate_layout_of(const at::Tensor& gates, bool shared) {
  if (shared) return GateLayout{gates.stride(2), gates.stride(0), gates.stride(1)};  // (T, B, G, KH)
  return GateLayout{gates.stride(0), gates.stride(1), gates.stride(2)};              // (G, T, B, KH)
}

at::Tensor optional_arg(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? *t : at::Tensor();
}

// The gates of step t as (G, B, KH): a strided view in either layout.
at::Tensor gates_at(const at::Tensor& gates, bool shared, int64_t t) {
  return shared ? gates.select(0, t).transpose(0, 1) : gates.select(1, t);
}

// A (G, n, B, W) view of one (G, B, W) buffer with a zero stride over n: the per-step kernels of
// the projected LSTM write (and read) their unprojected h rows there at every step.
at::Tensor every_step(const at::Tensor& row, int64_t n) {
  return row.unsqueeze(1).expand({row.size(0), n, row.size(1), row.size(2)});
}

// The LSTM with a projection (nn.LSTM's proj_size), on the per-step path: per step the recurrent
// GEMM over h_{t-1} (P wide), the cell kernel (lengths left out: it writes the unprojected
// o * tanh(c_t) into a scratch row), the projection GEMM h_t = W_hr (o * tanh(c_t)), and where
// lengths are given the hold of the padded rows (h, c) and their zero output in ATen ops.
void projected_forward(const ForwardSequence& seq, const at::Tensor& weight_hr,
                       const RecurrenceKernels& kernels) {
  const int64_t G = seq.G, T = seq.T, B = seq.B, H = seq.H;
  const auto opts = seq.h_states.options();
  // o * tanh(c_t), (G, B, H): the cell kernel writes it as h_t into one of two slots (read
  // from no other) and as its output into a third buffer (distinct __restrict__ pointers)
  at::Tensor raw_h = at::zeros({G, 2, B, H}, opts), raw_out = at::empty({G, B, H}, opts);
  ForwardSequence cell = seq;
  cell.h_states = raw_h;
  cell.output = every_step(raw_out, T);
  cell.lengths = at::Tensor();
  cell.H = H;
  at::Tensor hproj = at::empty({G, B, seq.gates.size(-1)}, opts);  // (G, B, KH)
  const at::Tensor w_hh_t = seq.weight_hh.transpose(1, 2);        // (G, P, KH)
  const at::Tensor w_hr_t = weight_hr.transpose(1, 2);            // (G, H, P)
  for (int64_t step = 0; step < T; ++step) {
    const int64_t t = forward_time(step, T, seq.reverse);
    const int64_t prev = prev_slot(t, seq.reverse), next = next_slot(t, seq.reverse);
    at::bmm_out(hproj, seq.h_states.select(1, prev), w_hh_t);
    kernels.forward_step(cell, hproj, t);
    at::Tensor h_next = seq.h_states.select(1, next);
    at::bmm_out(h_next, raw_out, w_hr_t);
    if (seq.lengths.defined()) {
      const at::Tensor valid = valid_rows(seq.lengths, t, at::kBool);
      h_next.copy_(at::where(valid, h_next, seq.h_states.select(1, prev)));
      at::Tensor c_next = seq.aux.select(1, next);
      c_next.copy_(at::where(valid, c_next, seq.aux.select(1, prev)));
      seq.output.select(1, t).copy_(h_next.masked_fill(valid.logical_not(), 0));
    } else {
      seq.output.select(1, t).copy_(h_next);
    }
  }
}

// Its backward, per step: dh_t (P wide) splits into the valid rows' part, which goes through W_hr
// to the cell (dW_hr accumulates dh^T (o * tanh(c_t)), recomputed from the saved o and c), and the
// padded rows' part, which passes to h_{t-1}; the cell kernel (with lengths: padded rows hold dc
// and get no dgates) and dh_{t-1} += drec_t W_hh. Returns grad_weight_hr.
at::Tensor projected_backward(const BackwardSequence& seq, bool shared, const at::Tensor& weight_hr,
                              at::Tensor& grad_h0, at::Tensor& grad_c0,
                              const RecurrenceKernels& kernels) {
  const int64_t G = seq.G, T = seq.T, B = seq.B, H = seq.H, P = weight_hr.size(1);
  const auto opts = seq.grad_output.options();
  const at::ScalarType acc = seq.aux.scalar_type();
  at::Tensor d_hr = at::empty({G, B, H}, opts);  // dh_t W_hr, the cell's incoming gradient
  const at::Tensor zeros = at::zeros({G, B, H}, opts);
  const at::Tensor pass = at::empty({G, B, H}, opts);  // the kernel's dh_pass (0 here)
  BackwardSequence cell = seq;
  cell.grad_output = every_step(d_hr, T);
  cell.h_states = every_step(zeros, T + 1);  // read by no LSTM step
  cell.H = H;
  at::Tensor dh = seq.grad_h_n.clone();  // (G, B, P)
  at::Tensor dc = seq.grad_c_n.clone();  // (G, B, H) acc dtype
  at::Tensor grad_w_hr = at::zeros({G, P, H}, opts.dtype(acc));
  for (int64_t step = 0; step < T; ++step) {
    const int64_t t = backward_time(step, T, seq.reverse);
    // A padded row's output was the constant 0: its gradient is dropped, dh passes through.
    at::Tensor dh_valid = dh + seq.grad_output.select(1, t), dh_held;  // (G, B, P)
    if (seq.lengths.defined()) {
      const at::Tensor valid = valid_rows(seq.lengths, t, dh.scalar_type());
      dh_valid = dh_valid * valid;
      dh_held = dh * at::rsub(valid, 1);
    }
    const at::Tensor o = gates_at(seq.gates, shared, t).narrow(-1, 3 * H, H);  // (G, B, H)
    const at::Tensor h_raw = (o.to(acc) * at::tanh(seq.aux.select(1, next_slot(t, seq.reverse))));
    grad_w_hr.baddbmm_(dh_valid.transpose(1, 2).to(acc), h_raw);
    at::bmm_out(d_hr, dh_valid, weight_hr);
    kernels.backward_step(cell, zeros, pass, dc, t);
    const at::Tensor dr_t = gates_at(seq.drec, shared, t);  // (G, B, KH)
    dh = at::bmm(dr_t, seq.weight_hh);                      // (G, B, P)
    if (dh_held.defined()) dh.add_(dh_held);
  }
  grad_h0 = dh;
  grad_c0 = dc;
  return grad_w_hr.to(opts.dtype());
}

// The forward's arguments, checked (shape, dtype, device, layout; the cell's own ones) and made
// contiguous.
struct ForwardInputs {
  Shape s;
  at::Tensor input, weight_ih, weight_hh, bias, bias_hh, weight_hr, c0, lengths;
};

template <class Cell>
ForwardInputs check_forward(const char* op, const ForwardArgs& a) {
  constexpr int64_t K = Cell::kGates;
  ForwardInputs f;
  const at::Tensor weight_hr = optional_arg(a.weight_hr);
  f.s = check_input_and_weights<Cell>(op, a.input, a.weight_ih, a.weight_hh, weight_hr);
  const int64_t G = f.s.G, B = f.s.B, H = f.s.H, KH = K * H;
  const at::ScalarType dtype = a.input.scalar_type();
  const at::Device device = a.input.device();
  f.bias = optional_arg(a.bias);
  f.bias_hh = optional_arg(a.bias_hh);
  if (f.bias.defined()) check_arg(f.bias, {op, "bias", {G, KH}, dtype, device});
  if constexpr (Cell::kRecBias) {
    TORCH_CHECK(f.bias.defined() == f.bias_hh.defined(), op,
                ": bias_ih and bias_hh must be given together (or neither)");
    if (f.bias_hh.defined()) check_arg(f.bias_hh, {op, "bias_hh", {G, KH}, dtype, device});
  } else if (f.bias_hh.defined()) {
    // b_hh adds to the same pre-activation as b_ih: folded here, so that the modules pass both
    // parameters as they are (no add of their own, and no autograd node for it; the backward's
    // bias gradient is both's)
    TORCH_CHECK(f.bias.defined(), op, ": bias_hh is given without bias (bias_ih)");
    check_arg(f.bias_hh, {op, "bias_hh", {G, KH}, dtype, device});
    f.bias = f.bias + f.bias_hh;
    f.bias_hh = at::Tensor();
  }
  check_arg(a.h0, {op, "h0", {G, B, f.s.R}, dtype, device});
  f.c0 = optional_arg(a.c0);
  if constexpr (Cell::kCellState) {
    TORCH_CHECK(f.c0.defined(), op, ": c0 is required");
    check_arg(f.c0, {op, "c0", {G, B, H}, dtype, device});
  } else {
    TORCH_CHECK(!f.c0.defined(), op, ": this cell has no cell state, c0 must be None");
  }
  f.lengths = checked_lengths(a.lengths, op, G, B, f.s.T, device);
  if (f.bias.defined()) f.bias = f.bias.contiguous();
  if (f.bias_hh.defined()) f.bias_hh = f.bias_hh.contiguous();
  f.input = a.input.contiguous();
  f.weight_ih = a.weight_ih.contiguous();
  f.weight_hh = a.weight_hh.contiguous();
  if (weight_hr.defined()) f.weight_hr = weight_hr.contiguous();
  return f;
}

// Whether a forward of B rows may run on the sequence path: the backend has a sequence kernel and
// there are rows to run it over (kernel_projects_input and run_recurrence ask the same).
inline bool forward_sequence_possible(const RecurrenceKernels& kernels, int64_t B) {
  return B > 0 && kernels.forward_sequence != nullptr;
}

// Whether this call's sequence kernel projects the input itself (both forwards): the backend takes
// this input (RecurrenceKernels::projects_input), the call has no projection of h (the projected
// LSTM keeps the per-step path), and the sequence path is the one chosen (the switch or the
// tuner's key / calibrate, as choose_and_run would choose).
template <typename Calibrate>
bool kernel_projects_input(const RecurrenceKernels& kernels, const ForwardInputs& f,
                           const std::string& key, const Calibrate& calibrate) {
  const bool has_sequence = forward_sequence_possible(kernels, f.s.B);
  return has_sequence && !f.weight_hr.defined() && kernels.projects_input &&
         kernels.projects_input(f.input) && sequence_chosen(kernels, has_sequence, key, calibrate);
}

// The input projection of steps [t0, t0 + n): x W_ih^T, one GEMM, into `out` when given (a
// reused buffer of at least n steps) -> (n, B, G, KH) for a shared input, (G, n, B, KH) per group.
at::Tensor input_projection(const ForwardInputs& f, int64_t t0, int64_t n, at::Tensor out = {}) {
  const Shape& s = f.s;
  const int64_t G = s.G, B = s.B, C = s.C, KH = f.weight_ih.size(1);
  const at::Tensor w = f.weight_ih;
  if (s.shared) {  // x (n*B, C) @ W_ih^T (C, G*KH)
    const at::Tensor x = f.input.narrow(0, t0, n).view({n * B, C});
    const at::Tensor wt = w.view({G * KH, C}).t();
    if (!out.defined()) return at::mm(x, wt).view({n, B, G, KH});
    at::Tensor o = out.narrow(0, 0, n);
    at::Tensor o2 = o.view({n * B, G * KH});
    at::mm_out(o2, x, wt);
    return o;
  }
  // per group: (G, n*B, C) @ (G, C, KH)
  const at::Tensor x = f.input.narrow(1, t0, n).view({G, n * B, C});
  if (!out.defined()) return at::bmm(x, w.transpose(1, 2)).view({G, n, B, KH});
  at::Tensor o = out.narrow(1, 0, n);
  at::Tensor o3 = o.view({G, n * B, KH});
  at::bmm_out(o3, x, w.transpose(1, 2));
  return o;
}

// Runs the recurrence of `seq` (its first state slot filled) on the path chosen by
// choose_and_run. key, calibrate: its shape and calibration, for the CPU's tuner.
template <typename Calibrate>
void run_recurrence(const ForwardSequence& seq, const RecurrenceKernels& kernels, const char* op,
                    const std::string& key, const Calibrate& calibrate) {
  const auto per_step = [&] {
    TORCH_CHECK(kernels.forward_step, op, ": this call needs the per-step kernels");
    const int64_t nslot = seq.h_states.size(1);
    at::Tensor hproj = at::empty({seq.G, seq.B, seq.gates.size(-1)}, seq.h_states.options());
    const at::Tensor w_hh_t = seq.weight_hh.transpose(1, 2);  // (G, H, KH)
    for (int64_t step = 0; step < seq.T; ++step) {
      const int64_t t = forward_time(step, seq.T, seq.reverse);
      at::bmm_out(hproj, seq.h_states.select(1, prev_slot(t, seq.reverse) % nslot), w_hh_t);
      kernels.forward_step(seq, hproj, t);
    }
  };
  choose_and_run(kernels, forward_sequence_possible(kernels, seq.B), key,
                 [&] { return kernels.forward_sequence(seq); }, per_step, calibrate,
                 g_forward_sequence, g_forward_per_step);
}

}  // namespace

template <class Cell>
ForwardResult recurrence_forward(const ForwardArgs& a, const RecurrenceKernels& kernels) {
  constexpr int64_t K = Cell::kGates;
  const std::string op_s = op_name<Cell>(false);
  const char* op = op_s.c_str();
  const ForwardInputs f = check_forward<Cell>(op, a);
  const Shape& s = f.s;
  const int64_t G = s.G, T = s.T, B = s.B, H = s.H, R = s.R, KH = K * H;
  const at::ScalarType dtype = a.input.scalar_type();
  const auto opts = a.input.options();
  const auto acc_opts = opts.dtype(acc_dtype(dtype));

  const std::string key = tune_key<Cell>("forward", G, B, H, dtype);
  const auto calibrate = [&] {
    const ScratchInputs x = scratch_inputs<Cell>(G, B, H, opts);
    const auto run = [&] { return seconds([&] { recurrence_forward<Cell>(x.args(), kernels); }); };
    return best_times(run);
  };

  // ---- (1) the input projection for all steps: one GEMM, or inside the sequence kernel -------
  // (where the backend's takes it, as the inference forward's: each thread projects its own rows
  // step by step into the gates, which the cell pass then reads from that thread's cache)
  const bool project_in_kernel = kernel_projects_input(kernels, f, key, calibrate);
  at::Tensor gates = !project_in_kernel ? input_projection(f, 0, T)
                     : s.shared         ? at::empty({T, B, G, KH}, opts)
                                        : at::empty({G, T, B, KH}, opts);
  if (project_in_kernel) poison_if_enabled(gates);  // every element is the kernel's to write

  // ---- (2) the recurrence, keeping every step's states for backward ----------------------------
  at::Tensor h_states = at::empty({G, T + 1, B, R}, opts);
  at::Tensor output = at::empty({G, T, B, R}, opts);
  at::Tensor aux = Cell::kAux ? at::empty({G, T + 1, B, H}, acc_opts) : at::Tensor();
  poison_if_enabled(h_states);
  poison_if_enabled(output);
  poison_if_enabled(aux);
  const int64_t first = first_slot(T, a.reverse);
  h_states.select(1, first).copy_(a.h0);
  if constexpr (Cell::kCellState) {
    aux.select(1, first).copy_(f.c0);
  } else if constexpr (Cell::kAux) {
    aux.select(1, first).zero_();  // read by no step, but returned: keep it clean
  }

  ForwardSequence seq{gates,  gate_layout(s, KH), f.weight_hh, f.bias,    f.bias_hh, h_states,
                      aux,    output,             f.lengths,   a.reverse, G,         T,
                      B,      H};
  if (project_in_kernel) {
    seq.projected_input = f.input;
    seq.weight_ih = f.weight_ih;
  }
  if (f.weight_hr.defined()) {
    count_run(g_forward_per_step);
    projected_forward(seq, f.weight_hr, kernels);
  } else if (project_in_kernel && kernels.forward_sequence(seq)) {
    count_run(g_forward_sequence);
  } else {
    if (project_in_kernel) {  // the kernel declined these sizes: the GEMM after all
      input_projection(f, 0, T, gates);
      seq.projected_input = seq.weight_ih = at::Tensor();
    }
    run_recurrence(seq, kernels, op, key, calibrate);
  }
  const int64_t last = last_slot(T, a.reverse);
  at::Tensor h_n = h_states.select(1, last).clone();
  at::Tensor c_n = Cell::kCellState ? aux.select(1, last).to(dtype, false, /*copy=*/true)
                                    : at::empty({0}, opts);
  if (!aux.defined()) aux = at::empty({0}, acc_opts);
  return {output, h_n, c_n, gates, h_states, aux};
}

// Steps per chunk of an inference forward: the input projection of a chunk fills a buffer of
// about 8 MB (set_inference_chunk_bytes: a test hook), reused chunk after chunk (so that after the first call the
// allocator hands back the same pages: no page faults, and the buffer stays in cache), and an
// even count, so that the two state slots alternate across chunks as within one.
static std::atomic<int64_t> g_inference_chunk_bytes{int64_t(8) << 20};

void set_inference_chunk_bytes(int64_t bytes) { g_inference_chunk_bytes.store(std::max<int64_t>(bytes, 1)); }

static int64_t inference_chunk(int64_t T, int64_t row_bytes) {
  int64_t n = std::max<int64_t>(2, g_inference_chunk_bytes.load() / std::max<int64_t>(row_bytes, 1));
  n -= n % 2;
  return std::min(n, T);
}

template <class Cell>
InferenceResult recurrence_inference(const ForwardArgs& a, const RecurrenceKernels& kernels) {
  constexpr int64_t K = Cell::kGates;
  const std::string op_s = op_name<Cell>(false);
  const char* op = op_s.c_str();
  // the projected LSTM keeps its per-step path: the plain forward (which checks the arguments)
  if (optional_arg(a.weight_hr).defined()) {
    auto r = recurrence_forward<Cell>(a, kernels);
    return {std::get<0>(r), std::get<1>(r), std::get<2>(r)};
  }
  const ForwardInputs f = check_forward<Cell>(op, a);
  const Shape& s = f.s;
  const int64_t G = s.G, T = s.T, B = s.B, H = s.H, R = s.R, KH = K * H;
  const at::ScalarType dtype = a.input.scalar_type();
  const auto opts = a.input.options();
  at::Tensor h_states = at::empty({G, 2, B, R}, opts);  // the states alternate between two slots
  at::Tensor aux = Cell::kAux ? at::empty({G, 2, B, H}, opts.dtype(acc_dtype(dtype))) : at::Tensor();
  at::Tensor output = at::empty({G, T, B, R}, opts);
  poison_if_enabled(output);
  const auto result = [&](int64_t final_slot) -> InferenceResult {
    at::Tensor h_n = h_states.select(1, final_slot).clone();
    at::Tensor c_n = Cell::kCellState ? aux.select(1, final_slot).to(dtype, false, /*copy=*/true)
                                      : at::empty({0}, opts);
    return {output, h_n, c_n};
  };
  const std::string key = tune_key<Cell>("inference", G, B, H, dtype);
  const auto calibrate = [&] {
    const ScratchInputs x = scratch_inputs<Cell>(G, B, H, opts);
    const auto run = [&] { return seconds([&] { recurrence_inference<Cell>(x.args(), kernels); }); };
    return best_times(run);
  };

  // ---- a sequence kernel that projects the input itself, step by step --------------------------
  // (the CPU's tiled fp32 path): no chunks and no GEMM calls, and one step's gates instead of a
  // chunk's. Each thread projects its own rows just before their recurrent product, so x_t W_ih^T
  // runs in the same register tiles with W_ih packed once per call, where MKL's batched GEMM
  // packed W_ih again for every chunk, and the gates are read from the thread's cache.
  if (kernel_projects_input(kernels, f, key, calibrate)) {
    const int64_t first = first_slot(T, a.reverse) % 2;
    h_states.select(1, first).copy_(a.h0);
    if constexpr (Cell::kCellState) aux.select(1, first).copy_(f.c0);
    const at::Tensor step_gates = at::empty({G, B, KH}, opts);  // every step's, in turn
    ForwardSequence seq{step_gates, GateLayout{B * KH, 0, KH}, f.weight_hh, f.bias, f.bias_hh,
                        h_states,   aux,                       output,      f.lengths, a.reverse,
                        G,          T,                         B,           H};
    seq.projected_input = f.input;
    seq.weight_ih = f.weight_ih;
    if (kernels.forward_sequence(seq)) {
      count_run(g_forward_sequence);
      return result(last_slot(T, a.reverse) % 2);
    }
  }

  // ---- otherwise the projection by GEMMs, in chunks of steps into one reused buffer ------------
  const int64_t chunk = inference_chunk(T, B * G * KH * a.input.element_size());
  const at::Tensor gates_buf = s.shared ? at::empty({chunk, B, G, KH}, opts)
                                        : at::empty({G, chunk, B, KH}, opts);
  // Chunks in the direction's order; each runs as a sequence of its own (local steps 0..n-1 are
  // times t0..t0+n-1, its first state slot where the previous chunk left the state).
  int64_t left_slot = -1;  // where the previous chunk left the state
  // the sequence kernel's prepared W_hh, made once for all chunks
  const auto prepared_weight_hh = std::make_shared<at::Tensor>();
  for (int64_t c = 0; c < T; c += chunk) {
    const int64_t n = std::min(chunk, T - c);
    const int64_t t0 = a.reverse ? T - c - n : c;
    const int64_t first = first_slot(n, a.reverse) % 2;
    if (left_slot < 0) {
      h_states.select(1, first).copy_(a.h0);
      if constexpr (Cell::kCellState) aux.select(1, first).copy_(f.c0);
    } else if (left_slot != first) {  // an odd-length last chunk in the reverse direction
      h_states.select(1, first).copy_(h_states.select(1, left_slot));
      if constexpr (Cell::kCellState) aux.select(1, first).copy_(aux.select(1, left_slot));
    }
    const at::Tensor gates = input_projection(f, t0, n, gates_buf);
    ForwardSequence seq{gates,    gate_layout_of(gates, s.shared), f.weight_hh, f.bias,
                        f.bias_hh, h_states, aux, output.narrow(1, t0, n), f.lengths, a.reverse,
                        G,        n,        B,   H};
    seq.t0 = t0;
    seq.prepared_weight_hh = prepared_weight_hh;
    run_recurrence(seq, kernels, op, key, calibrate);
    left_slot = last_slot(n, a.reverse) % 2;
  }
  return result(left_slot);
}

template <class Cell>
BackwardResult recurrence_backward(const BackwardArgs& a, const RecurrenceKernels& kernels,
                                   bool in_place) {
  constexpr int64_t K = Cell::kGates;
  const std::string op_s = op_name<Cell>(true);
  const char* op = op_s.c_str();
  const at::Tensor weight_hr_arg = optional_arg(a.weight_hr);
  const Shape s = check_input_and_weights<Cell>(op, a.input, a.weight_ih, a.weight_hh, weight_hr_arg);
  const int64_t G = s.G, T = s.T, B = s.B, C = s.C, H = s.H, R = s.R, KH = K * H;
  const at::ScalarType dtype = a.input.scalar_type(), acc = acc_dtype(dtype);
  const at::Device device = a.input.device();
  const auto opts = a.input.options();

  check_arg(a.grad_output, {op, "grad_output", {G, T, B, R}, dtype, device});
  check_arg(a.grad_h_n, {op, "grad_h_n", {G, B, R}, dtype, device});
  const at::Tensor grad_c_n_arg = optional_arg(a.grad_c_n);
  if constexpr (Cell::kCellState) {
    TORCH_CHECK(grad_c_n_arg.defined(), op, ": grad_c_n is required");
    check_arg(grad_c_n_arg, {op, "grad_c_n", {G, B, H}, dtype, device});
  } else {
    TORCH_CHECK(!grad_c_n_arg.defined(), op, ": this cell has no cell state, grad_c_n must be None");
  }
  const std::vector<int64_t> gates_shape = s.shared ? std::vector<int64_t>{T, B, G, KH}
                                                    : std::vector<int64_t>{G, T, B, KH};
  check_arg(a.gates, {op, "gates", gates_shape, dtype, device});
  check_arg(a.h_states, {op, "h_states", {G, T + 1, B, R}, dtype, device});
  if constexpr (Cell::kAux) {
    check_arg(a.aux, {op, Cell::kCellState ? "c_states" : "aux_states", {G, T + 1, B, H}, acc, device});
  }
  const at::Tensor lengths = checked_lengths(a.lengths, op, G, B, T, device);

  // The kernels index all of these through raw pointers and the strides of the shapes above.
  const at::Tensor input = a.input.contiguous();
  const at::Tensor weight_ih = a.weight_ih.contiguous();
  const at::Tensor weight_hh = a.weight_hh.contiguous();
  const at::Tensor gates = a.gates.contiguous();
  const at::Tensor h_states = a.h_states.contiguous();
  const at::Tensor aux = Cell::kAux ? a.aux.contiguous() : at::Tensor();
  const at::Tensor grad_output = a.grad_output.contiguous();
  const GateLayout layout = gate_layout(s, KH);

  TORCH_CHECK(!in_place || a.gates.is_contiguous(), op, ": gates must be contiguous in place");
  at::Tensor dgates = in_place ? gates : at::empty(gates.sizes(), opts);
  at::Tensor drec = Cell::kSplitRecGrad ? at::empty(gates.sizes(), opts) : dgates;
  if (!in_place) poison_if_enabled(dgates);
  if (Cell::kSplitRecGrad) poison_if_enabled(drec);
  at::Tensor grad_h0 = at::empty({G, B, R}, opts);
  at::Tensor grad_c0 = Cell::kCellState ? at::empty({G, B, H}, opts.dtype(acc)) : at::Tensor();
  poison_if_enabled(grad_h0);
  poison_if_enabled(grad_c0);

  const BackwardSequence seq{gates,
                             dgates,
                             drec,
                             layout,
                             weight_hh,
                             h_states,
                             aux,
                             grad_output,
                             a.grad_h_n.contiguous(),
                             Cell::kCellState ? grad_c_n_arg.to(acc).contiguous() : at::Tensor(),
                             grad_h0,
                             grad_c0,
                             lengths,
                             a.reverse,
                             G,
                             T,
                             B,
                             H};
  at::Tensor grad_w_hr = at::empty({0}, opts);
  TORCH_CHECK(kernels.backward_step || kernels.backward_sequence, op, ": no kernel");
  if (weight_hr_arg.defined()) {
    count_run(g_backward_per_step);
    grad_w_hr = projected_backward(seq, s.shared, weight_hr_arg.contiguous(), grad_h0, grad_c0,
                                   kernels);
  } else {
    const auto per_step = [&] {
      TORCH_CHECK(kernels.backward_step, op, ": this call needs the per-step kernels");
      at::Tensor dh_in = seq.grad_h_n.clone();          // (G, B, H)
      at::Tensor dh_next = at::empty({G, B, H}, opts);  // the cell kernel writes dh_pass here
      at::Tensor dc = Cell::kCellState ? seq.grad_c_n.clone() : at::Tensor();  // (G, B, H)
      for (int64_t step = 0; step < T; ++step) {
        const int64_t t = backward_time(step, T, a.reverse);
        kernels.backward_step(seq, dh_in, dh_next, dc, t);
        dh_next.baddbmm_(gates_at(drec, s.shared, t), weight_hh);  // dh_{t-1} = dh_pass + drec_t W_hh
        std::swap(dh_in, dh_next);
      }
      grad_h0 = dh_in;
      grad_c0 = dc;
    };
    const auto calibrate = [&] {
      const ScratchInputs x = scratch_inputs<Cell>(G, B, H, opts);
      const auto [out, h_n, c_n, gates, h_states, aux] = [&] {
        const ForcedPath forced(RecurrencePath::kPerStep);  // a forward to differentiate, untimed
        return recurrence_forward<Cell>(x.args(), kernels);
      }();
      const at::Tensor g_out = at::randn_like(out), g_h = at::randn_like(h_n);
      std::optional<at::Tensor> g_c;
      if (Cell::kCellState) g_c = at::randn_like(h_n);
      const std::optional<at::Tensor> none;
      const auto run = [&] {
        const BackwardArgs b{g_out, g_h, g_c, x.input, x.weight_ih, x.weight_hh, none, gates,
                             h_states, aux, none, false};
        return seconds([&] { recurrence_backward<Cell>(b, kernels); });
      };
      return best_times(run);
    };
    choose_and_run(kernels, B > 0 && kernels.backward_sequence != nullptr,
                   tune_key<Cell>("backward", G, B, H, dtype),
                   [&] { return kernels.backward_sequence(seq); }, per_step, calibrate,
                   g_backward_sequence, g_backward_per_step);
  }

  // ---- weight, bias and input gradients: one (batched) GEMM or reduction each -----------------
  // per group as (G, T*B, KH): a view in both layouts
  const auto per_group = [&](const at::Tensor& d) {
    return s.shared ? d.view({T * B, G, KH}).transpose(0, 1) : d.view({G, T * B, KH});
  };
  const at::Tensor dg = per_group(dgates), dr = per_group(drec);
  // h_{t-1} for every step t, (G, T*B, R): slots 0..T-1 forward, 1..T reverse
  const at::Tensor h_prev = h_states.narrow(1, a.reverse ? 1 : 0, T).reshape({G, T * B, R});
  at::Tensor grad_bias = dg.sum(1);  // (G, KH)
  at::Tensor grad_bias_hh = Cell::kRecBias ? dr.sum(1) : at::empty({0}, opts);
  at::Tensor grad_w_hh, grad_w_ih, grad_input = at::empty({0}, opts);
  // A ragged call (per-(group, row) lengths, per-group input): group g's steps from its longest
  // row's length on are padding for all of its rows (dgates, drec 0 there), in either direction,
  // so its products run over its first T_g steps alone (T_g * B of the T * B rows). (On a GPU
  // reading the lengths would synchronise: the batched GEMMs run over all rows there.)
  const bool ragged =
      !s.shared && lengths.defined() && lengths.dim() == 2 && lengths.is_cpu() && B > 0;
  const at::Tensor group_rows = ragged ? (lengths.amax(1) * B).contiguous() : at::Tensor();  // (G,)
  GradientProducts products{dg,
                            dr,
                            s.shared ? input.view({T * B, C}) : input.view({G, T * B, C}),
                            h_prev,
                            weight_ih,
                            ragged ? group_rows.data_ptr<int64_t>() : nullptr,
                            s.shared,
                            a.input_grad};
  if (kernels.gradient_products && kernels.gradient_products(products)) {
    grad_w_ih = products.grad_w_ih;
    grad_w_hh = products.grad_w_hh;
    if (a.input_grad) grad_input = products.grad_input.view(input.sizes());
  } else if (ragged) {  // group by group, each over its first rows
    const int64_t* longest_rows = group_rows.data_ptr<int64_t>();
    grad_w_hh = at::zeros({G, KH, R}, dr.options());
    grad_w_ih = at::zeros({G, KH, C}, dg.options());
    if (a.input_grad) grad_input = at::zeros({G, T, B, C}, dg.options());
    const at::Tensor x = input.view({G, T * B, C});
    for (int64_t g = 0; g < G; ++g) {
      const int64_t n = longest_rows[g];
      if (n == 0) continue;
      const at::Tensor dg_g = dg.select(0, g).narrow(0, 0, n), dr_g = dr.select(0, g).narrow(0, 0, n);
      at::Tensor w_hh_g = grad_w_hh.select(0, g), w_ih_g = grad_w_ih.select(0, g);
      at::mm_out(w_hh_g, dr_g.t(), h_prev.select(0, g).narrow(0, 0, n));
      at::mm_out(w_ih_g, dg_g.t(), x.select(0, g).narrow(0, 0, n));
      if (a.input_grad) {
        at::Tensor gi = grad_input.select(0, g).view({T * B, C}).narrow(0, 0, n);
        at::mm_out(gi, dg_g, weight_ih.select(0, g));
      }
    }
  } else if (s.shared) {
    grad_w_hh = at::bmm(dr.transpose(1, 2), h_prev);  // (G, KH, R)
    const at::Tensor dg2 = dgates.view({T * B, G * KH});
    grad_w_ih = at::mm(dg2.t(), input.view({T * B, C})).view({G, KH, C});
    if (a.input_grad) {
      grad_input = at::mm(dg2, weight_ih.view({G * KH, C})).view({T, B, C});  // sums over groups
    }
  } else {
    grad_w_hh = at::bmm(dr.transpose(1, 2), h_prev);                     // (G, KH, R)
    grad_w_ih = at::bmm(dg.transpose(1, 2), input.view({G, T * B, C}));  // (G, KH, C)
    if (a.input_grad) grad_input = at::bmm(dg, weight_ih).view({G, T, B, C});
  }
  grad_c0 = Cell::kCellState ? grad_c0.to(dtype) : at::empty({0}, opts);
  return {grad_input, grad_w_ih, grad_w_hh, grad_bias, grad_bias_hh, grad_w_hr, grad_h0, grad_c0};
}

#define MTL_INSTANTIATE_DRIVER(Cell)                                                          \
  template ForwardResult recurrence_forward<Cell>(const ForwardArgs&, const RecurrenceKernels&);   \
  template InferenceResult recurrence_inference<Cell>(const ForwardArgs&,                         \
                                                      const RecurrenceKernels&);                  \
  template BackwardResult recurrence_backward<Cell>(const BackwardArgs&, const RecurrenceKernels&, \
                                                    bool);
MTL_INSTANTIATE_DRIVER(LstmCell)
MTL_INSTANTIATE_DRIVER(GruCell)
MTL_INSTANTIATE_DRIVER(RnnTanhCell)
MTL_INSTANTIATE_DRIVER(RnnReluCell)

}  // namespace mtl_kernels
