// A process-wide enum setting of the extension (the recurrence path, the tensor-core switch, the
// CPU tiles switch): one atomic, set from Python (mtl_kernels._C.set_<name>, each wrapped as a
// context manager in mtl_kernels/paths.py), whose default is read once from an environment
// variable.
#pragma once

#include <c10/util/Exception.h>

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <string>

namespace mtl_kernels {

// Value i of E is named names[i]; value 0 is the default (also for an unset or empty variable).
// An invalid environment value raises at every get() until set() replaces it.
template <typename E, size_t N>
class EnvSetting {
 public:
  EnvSetting(const char* env, const char* what, std::array<const char*, N> names)
      : env_(env), what_(what), names_(names) {}

  E get() const {
    int v = value_.load(std::memory_order_relaxed);
    if (v < 0) {  // first use: the environment's default
      v = static_cast<int>(parse(std::getenv(env_)));
      int expected = -1;
      value_.compare_exchange_strong(expected, v);
      v = value_.load();
    }
    return static_cast<E>(v);
  }

  void set(E value) { value_.store(static_cast<int>(value)); }

  E parse(const char* name) const {
    if (name == nullptr || *name == '\0') return static_cast<E>(0);
    for (size_t i = 0; i < N; ++i)
      if (std::strcmp(name, names_[i]) == 0) return static_cast<E>(i);
    std::string allowed;  // 'a', 'b' or 'c'
    for (size_t i = 0; i < N; ++i)
      allowed += std::string(i == 0 ? "" : i + 1 == N ? " or " : ", ") + "'" + names_[i] + "'";
    TORCH_CHECK(false, what_, " must be ", allowed, ", got '", name, "'");
  }

  const char* name(E value) const { return names_[static_cast<size_t>(value)]; }

 private:
  const char* env_;
  const char* what_;  // for the error message
  std::array<const char*, N> names_;
  mutable std::atomic<int> value_{-1};  // -1: not yet read from the environment
};

}  // namespace mtl_kernels
