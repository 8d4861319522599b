"""Loads the compiled ops (``mindskip_ext._C``) after checking they match the running torch.

``setup.py`` records what the build had in ``mindskip_ext/_build_info.py``. A compiled
extension only works with the exact torch it was built against, so a mismatch is reported here
with both versions and the command that rebuilds it, instead of an undefined-symbol error.
"""

from __future__ import annotations

import importlib

import torch

REBUILD_COMMAND = "pip install --no-build-isolation -e .  (or: bash scripts/install.sh)"


class BuildMismatchError(ImportError):
    """The compiled ops are missing or were built for another torch."""


def check_build_info(info, torch_version: str, torch_cuda: str | None) -> None:
    """Raise :class:`BuildMismatchError` unless ``info`` was recorded for this torch."""
    built = (info.TORCH_VERSION, info.TORCH_CUDA_VERSION)
    running = (torch_version, torch_cuda)
    if built != running:
        raise BuildMismatchError(
            "mindskip_ext's compiled ops were built against torch "
            f"{built[0]} (CUDA {built[1] or 'none'}), but torch {running[0]} "
            f"(CUDA {running[1] or 'none'}) is installed. Rebuild them with: {REBUILD_COMMAND}"
        )


def build_info():
    """The recorded build info module (``mindskip_ext._build_info``)."""
    try:
        return importlib.import_module("mindskip_ext._build_info")
    except ImportError as exc:
        raise BuildMismatchError(
            "mindskip_ext's compiled ops are not built (mindskip_ext/_build_info.py is missing). "
            f"Build them with: {REBUILD_COMMAND}"
        ) from exc


def cuda_kernels_built() -> bool:
    """Whether this build compiled the CUDA kernels."""
    return bool(build_info().WITH_CUDA)


def load() -> None:
    """Check the build against the running torch, then register ``torch.ops.mindskip``."""
    info = build_info()
    check_build_info(info, torch.__version__, torch.version.cuda)
    try:
        importlib.import_module("mindskip_ext._C")
    except ImportError as exc:
        raise BuildMismatchError(
            f"mindskip_ext._C failed to load ({exc}). It was built against torch "
            f"{info.TORCH_VERSION} (CUDA {info.TORCH_CUDA_VERSION or 'none'}). "
            f"Rebuild it with: {REBUILD_COMMAND}"
        ) from exc
