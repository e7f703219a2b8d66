"""How the grouped recurrences run: the path switch and the per-path counters."""
import contextlib

from . import _C

PATHS = ("auto", "sequence", "per_step")
TENSOR_CORE_MODES = ("auto", "off")
CPU_TILES_MODES = ("auto", "off", "avx2")


@contextlib.contextmanager
def _scoped_setting(setter, allowed, what: str, value: str):
    """Sets one of the extension's process-wide settings (common/setting.h) to `value` within a
    ``with`` block, restoring the previous value after it."""
    if value not in allowed:
        raise ValueError(f"{what} must be one of {allowed}, got {value!r}")
    old = setter(value)
    try:
        yield
    finally:
        setter(old)


def recurrence_path(path: str):
    """Choose how the grouped recurrences run, within a ``with`` block.

    ``"auto"`` (the default): the faster path. On the CPU it is measured: the first call of each
    recurrence shape (cell, forward / backward / inference, G, B, H, dtype) times both paths on
    scratch inputs of that shape, then every call of that shape runs the faster one
    (``tuned_paths()`` lists the choices; both paths give the same results up to floating-point
    rounding). On a GPU the per-step path: the persistent kernels are opt-in until a recorded GPU
    run verifies them at the current code (``auto_paths()`` says what ``auto`` runs on each
    backend). ``"sequence"``: the whole sequence in one kernel call wherever it can run: on a GPU
    the persistent kernel (all time steps in one launch) where its plan fits the device, on the
    CPU rows in parallel. ``"per_step"``: one batched GEMM and one cell kernel per step.

    The switch is one process-wide atomic setting of the extension
    (``mtl_kernels._C.set_recurrence_path``; every thread sees it); its default comes from the
    environment variable ``MTL_KERNELS_LSTM_PATH``, read once.
    """
    return _scoped_setting(_C.set_recurrence_path, PATHS, "recurrence_path", path)


def tuned_paths() -> list:
    """The CPU ``auto`` path's choices so far: ``[{"key", "sequence_s", "per_step_s",
    "sequence"}]``, one per recurrence shape timed on both paths (key: "cell phase G B H dtype")."""
    return [{"key": k, "sequence_s": s, "per_step_s": p, "sequence": c}
            for k, s, p, c in _C.tuned_paths()]


def auto_paths() -> dict:
    """What the ``auto`` recurrence path runs on each backend of this build: ``{"cpu": "tuned"}``
    (timed per shape, see :func:`tuned_paths`), plus ``"cuda": "per_step"`` where the CUDA kernels
    are built (``"sequence"`` once a GPU run has verified the persistent kernels)."""
    return dict(_C.auto_paths())


def path_counts() -> dict:
    """How many single-layer, single-direction recurrences ran on each path since import:
    ``{"forward_sequence", "forward_per_step", "backward_sequence", "backward_per_step"}``."""
    fs, fp, bs, bp = _C.path_counts()
    return {"forward_sequence": fs, "forward_per_step": fp, "backward_sequence": bs,
            "backward_per_step": bp}


def tensor_cores(mode: str):
    """Whether the GPU's persistent kernel (the sequence path) may run its tensor-core variant,
    within a ``with`` block.

    ``"auto"`` (the default): the recurrent products run on tensor cores (mma.sync, fp32
    accumulation) for bfloat16 and float16, and for float32 where the user allows TF32 for matmuls
    (``torch.backends.cuda.matmul.allow_tf32`` / ``torch.set_float32_matmul_precision("high")``),
    wherever that variant's plan fits; else the FP32-FMA variant. ``"off"``: always the FMA variant.
    One process-wide atomic setting (``mtl_kernels._C.set_tensor_cores``); its default comes from
    the environment variable ``MTL_KERNELS_MMA``, read once.
    """
    return _scoped_setting(_C.set_tensor_cores, TENSOR_CORE_MODES, "tensor_cores", mode)


def cpu_tiles(mode: str):
    """Whether the CPU's fp32 products may run on its register-tiled kernels
    (``csrc/recurrence/cpu_tiles.h``, on x86-64 CPUs with AVX2 and FMA), within a ``with`` block:
    the whole-sequence path's recurrent products and input projection, and on either path the
    backward's weight and input gradients.

    ``"auto"`` (the default): the tiles where the CPU supports them, in their AVX-512 variant where
    the CPU has AVX-512F; ``"avx2"``: the AVX2 variant even there; ``"off"``: the generic loops and
    MKL (the last two for comparisons in tests and benchmarks). One process-wide atomic setting
    (``mtl_kernels._C.set_cpu_tiles``); its default comes from the environment variable
    ``MTL_KERNELS_CPU_TILES``, read once.
    """
    return _scoped_setting(_C.set_cpu_tiles, CPU_TILES_MODES, "cpu_tiles", mode)


def tensor_core_counts() -> dict:
    """How many persistent-kernel launches ran the tensor-core variant since import (each is also
    counted as a sequence-path run by :func:`path_counts`): ``{"forward", "backward"}``."""
    f, b = _C.tensor_core_counts()
    return {"forward": f, "backward": b}
