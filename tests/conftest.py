import os

# Every buffer a kernel must write is NaN-filled first (see csrc/grouped_lstm.cpp), so an element
# that no kernel wrote shows up as a NaN in the results. Must be set before the extension loads.
os.environ.setdefault("MTL_KERNELS_POISON", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# On a GPU every device-parametrised test runs twice: with the persistent grouped-LSTM kernel
# (where its plan fits) and with the per-step path.
CUDA_PATHS = ["persistent", "per_step"]
DEVICES = ["cpu"] + ([f"cuda-{p}" for p in CUDA_PATHS] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request, monkeypatch):
    if request.param.startswith("cuda-"):
        monkeypatch.setenv("MTL_KERNELS_LSTM_PATH", request.param[len("cuda-"):])
        return torch.device("cuda")
    return torch.device(request.param)


@pytest.fixture(params=CUDA_PATHS)
def cuda_path(request, monkeypatch):
    """For GPU-only tests: run them on both recurrence paths."""
    monkeypatch.setenv("MTL_KERNELS_LSTM_PATH", request.param)
    return request.param


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
