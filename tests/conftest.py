import os

# Every buffer a kernel must write is NaN-filled first (csrc/common/poison.h: poison_if_enabled), so an element
# that no kernel wrote shows up as a NaN in the results. Must be set before the extension loads.
os.environ.setdefault("MTL_KERNELS_POISON", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import mtl_kernels  # noqa: E402
from helpers import cpu_code_paths  # noqa: E402


def _run_description():
    """Which CPU-specific code runs here (tests of a path the CPU lacks skip, saying so), and where
    mtl_kernels was imported from (the checkout, or an installed wheel)."""
    return [f"mtl_kernels {mtl_kernels.__version__} from {os.path.dirname(mtl_kernels.__file__)}; "
            f"torch {torch.__version__}",
            "CPU code paths: " + "; ".join(f"{k}: {v}" for k, v in cpu_code_paths().items())]


def pytest_report_header(config):
    return _run_description()


def pytest_terminal_summary(terminalreporter):
    # also under -q, which prints no header: CI's log says which CPU kind ran the suite
    for line in _run_description():
        terminalreporter.write_line(line)


if os.environ.get("MTL_KERNELS_EXPECT_INSTALLED") == "1":
    # The wheel check (.ci/wheel_check.sh): the tests must see the installed package, not a
    # checkout, so that a file missing from the wheel fails them.
    _here = os.path.realpath(mtl_kernels.__file__)
    assert "site-packages" in _here, f"mtl_kernels imported from {_here}, not an installed wheel"

# Every device-parametrised test runs on both recurrence paths: the whole sequence in one kernel
# call (the persistent kernel on a GPU, where its plan fits; rows in parallel on the CPU) and the
# per-step path.
CUDA_PATHS = ["sequence", "per_step"]
DEVICES = ["cpu", "cpu-per_step"] + (
    [f"cuda-{p}" for p in CUDA_PATHS] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    kind, _, path = request.param.partition("-")
    with mtl_kernels.recurrence_path(path or "sequence"):
        yield torch.device(kind)


@pytest.fixture
def small_chunks():
    """Inference chunks of a few steps, so that a short test sequence spans several (and an odd
    last one)."""
    mtl_kernels._C._set_inference_chunk_bytes(1)  # two steps per chunk
    yield
    mtl_kernels._C._set_inference_chunk_bytes(8 << 20)


@pytest.fixture(params=CUDA_PATHS, ids=[f"cuda-{p}" for p in CUDA_PATHS])
def cuda_path(request):
    """For GPU-only tests: run them on both recurrence paths (ids "cuda-sequence", "cuda-per_step",
    as the device fixture's, so `-k 'not cuda-sequence'` leaves out every GPU sequence-path run)."""
    with mtl_kernels.recurrence_path(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _no_tf32():
    # Parity tolerances assume full fp32 matmuls on the GPU (cuDNN uses TF32 unless told not to).
    if torch.cuda.is_available():
        old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        yield
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    else:
        yield
