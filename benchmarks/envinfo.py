"""What a benchmark ran on, for RESULTS.md: card, driver, torch, CUDA, cuDNN, CPU threads, and the
code's commit.

The commit: `git rev-parse HEAD` where the checkout has its .git; else $MTL_COMMIT; and always a
fingerprint of the sources that build and run the kernels (sha256 over csrc/**, mtl_kernels/*.py,
setup.py: path and content). A lent GPU machine gets a copy of the working tree without .git, so
compare its fingerprint with `python3 benchmarks/envinfo.py` run here at a known commit.

  python3 benchmarks/envinfo.py [--device cuda]
"""
import hashlib
import os
import platform
import subprocess

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def source_fingerprint(root=ROOT):
    h = hashlib.sha256()
    files = []
    for top in ("csrc", "mtl_kernels"):
        for d, _, names in os.walk(os.path.join(root, top)):
            for n in names:
                if top == "csrc" or n.endswith(".py"):
                    files.append(os.path.relpath(os.path.join(d, n), root))
    if os.path.isfile(os.path.join(root, "setup.py")):
        files.append("setup.py")
    for rel in sorted(f for f in files if "__pycache__" not in f):
        with open(os.path.join(root, rel), "rb") as fh:
            h.update(rel.encode() + b"\0" + hashlib.sha256(fh.read()).digest())
    return h.hexdigest()[:16]


def commit(root=ROOT):
    try:
        out = subprocess.run(["git", "-C", root, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return out.stdout.strip() + ("+local-changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("MTL_COMMIT", "unknown (no .git here; set MTL_COMMIT)")


def driver_version():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def describe(device=None):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    env = {"device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                      else platform.processor() or "cpu"),
           "threads": torch.get_num_threads(), "torch": torch.__version__}
    if device.type == "cuda":
        env.update({"driver": driver_version(), "cuda": torch.version.cuda,
                    "cudnn": torch.backends.cudnn.version()})
    env.update({"commit": commit(), "sources": source_fingerprint()})
    return env


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None)
    print(describe(ap.parse_args().device))
