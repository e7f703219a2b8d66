"""Build mtl_kernels._C: the C++ ops always, the CUDA kernels wherever nvcc and a CUDA build of
torch are present (no GPU needed to compile them).

Environment overrides (see README):
  MTL_KERNELS_FORCE_CPU=1    build the C++ part only
  MTL_KERNELS_FORCE_CUDA=1   fail unless the CUDA kernels are built
  TORCH_CUDA_ARCH_LIST       GPU architectures (default: the visible GPU's, else "9.0" = H100/H200)
  MAX_JOBS                   parallel compile jobs (ninja)
  CUDA_HOME                  the CUDA toolkit (default: found from nvcc, see _find_cuda_home)
"""
import glob
import os
import shutil
import site
import subprocess
import sys

from setuptools import find_packages, setup


def _env_flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _find_cuda_home():
    """The toolkit root whose bin/nvcc is the real compiler.

    torch guesses CUDA_HOME from the first `nvcc` on PATH. On machines where that is a wrapper script
    outside the toolkit (e.g. /usr/local/bin/nvcc exec-ing /usr/local/cuda-13.0/bin/nvcc), the guess
    is /usr/local and the build fails, so look for the toolkit ourselves before torch is imported.
    """
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    candidates = ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for root in candidates:
        if os.path.isfile(os.path.join(root, "bin", "nvcc")) and os.path.isdir(os.path.join(root, "include")):
            return os.path.realpath(root)
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.isdir(os.path.join(root, "include")):
            return root
        try:  # a wrapper script: ask the compiler where it lives
            out = subprocess.run([nvcc, "--dryrun", "--version"], capture_output=True, text=True).stderr
            for line in out.splitlines():
                if "TOP=" in line:
                    return os.path.realpath(line.split("TOP=", 1)[1].strip())
        except OSError:
            pass
    return None


CUDA_HOME = None if _env_flag("MTL_KERNELS_FORCE_CPU") else _find_cuda_home()
if CUDA_HOME:
    os.environ["CUDA_HOME"] = CUDA_HOME  # must be set before torch.utils.cpp_extension is imported

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _cublas_include_dirs():
    """ATen/cuda/CUDAContext.h includes cublas_v2.h / cusparse.h. Some toolkits ship without them;
    the nvidia-* wheels that a CUDA build of torch pulls in carry them in site-packages/nvidia."""
    if CUDA_HOME and os.path.isfile(os.path.join(CUDA_HOME, "include", "cublas_v2.h")):
        return []
    dirs = []
    for sp in site.getsitepackages() + [site.getusersitepackages()]:
        for pattern in ("nvidia/cu*/include", "nvidia/cublas/include", "nvidia/cusparse/include",
                        "nvidia/cuda_runtime/include"):
            dirs += [d for d in sorted(glob.glob(os.path.join(sp, pattern))) if os.path.isdir(d)]
    return dirs


def _openmp_flags():
    """-fopenmp where the C++ compiler can build and link an OpenMP program, else -fopenmp-simd
    (a build without libgomp still works; the CPU kernels then run on one thread)."""
    import shlex
    import tempfile
    cxx = os.environ.get("CXX", "c++")
    src = "#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n"
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "omp_check.cpp")
        with open(path, "w") as f:
            f.write(src)
        try:
            ok = subprocess.run(shlex.split(cxx) + ["-fopenmp", path, "-o", os.path.join(d, "omp_check")],
                                capture_output=True).returncode == 0
        except OSError:
            ok = False
    if not ok:
        print(f"mtl_kernels: {cxx} cannot build OpenMP code: the CPU kernels will run on one thread")
    return ["-fopenmp"] if ok else ["-fopenmp-simd"]


def _want_cuda():
    if _env_flag("MTL_KERNELS_FORCE_CPU"):
        return False
    reasons = []
    if torch.version.cuda is None:
        reasons.append("torch is a CPU-only build")
    if not CUDA_HOME:
        reasons.append("no CUDA toolkit (nvcc) found")
    if reasons:
        if _env_flag("MTL_KERNELS_FORCE_CUDA"):
            sys.exit("MTL_KERNELS_FORCE_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(reasons))
        print("mtl_kernels: building the C++ (CPU) ops only: " + "; ".join(reasons))
        return False
    return True


def _extension():
    here = os.path.dirname(os.path.abspath(__file__))
    # csrc/ops.cpp (schemas), csrc/common, csrc/cells, csrc/recurrence, csrc/branch_attention
    cpp = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cu = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    # Say the C++ ABI out loud: recent torch no longer adds -D_GLIBCXX_USE_CXX11_ABI to extension
    # builds, and a compiler whose default differs from torch's (e.g. a devtoolset-style g++ that
    # defaults to the old ABI) then builds an extension whose std::string differs from libc10's.
    # Everything that passes a std::string across (TORCH_CHECK with a streamed message) then crashes
    # instead of raising: seen on the GPU machine (torch 2.11, /opt/gcc g++).
    abi = [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    # -fopenmp: at::parallel_for is an inline template over `#pragma omp parallel` (ATen's OpenMP
    # backend), so without it every parallel_for in our kernels silently runs on one thread. The
    # link pulls libgomp.so.1, which resolves to the copy torch has already loaded.
    omp = _openmp_flags()
    cxx = ["-O3", "-fno-math-errno", "-fno-trapping-math"] + omp + abi
    kwargs = dict(name="mtl_kernels._C", include_dirs=[os.path.join(here, "csrc")],
                  extra_link_args=[f for f in omp if f == "-fopenmp"])
    if _want_cuda():
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # cpp_extension needs an arch list when no GPU is visible; 9.0 = H100/H200.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
        print(f"mtl_kernels: building CUDA kernels (CUDA_HOME={CUDA_HOME}, "
              f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', 'visible GPU')})")
        kwargs["include_dirs"] += _cublas_include_dirs()
        return CUDAExtension(sources=cpp + cu, extra_compile_args={
            "cxx": cxx + ["-DMTL_KERNELS_WITH_CUDA"],
            "nvcc": ["-O3", "-lineinfo", "-DMTL_KERNELS_WITH_CUDA"] + abi,
        }, **kwargs)
    return CppExtension(sources=cpp, extra_compile_args={"cxx": cxx}, **kwargs)


# Name, version, dependencies and the tested torch range: pyproject.toml.
setup(
    packages=find_packages(include=["mtl_kernels", "mtl_kernels.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
)
