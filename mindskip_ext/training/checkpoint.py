"""Atomic Router-Tuning checkpoints: the routers, the optimizer, scheduler and penalty state, and the RNGs.

Layout under the run's output folder::

    checkpoints/step-00000100/   a router directory (mindskip_config.json, routers.safetensors) + trainer_state.pt
    checkpoints/latest           the name of the newest complete checkpoint folder

Every file is written atomically and ``latest`` moves only after the folder is complete, so a crash at
any moment leaves the previous checkpoint usable.
"""

from __future__ import annotations

import io
import random
import shutil
from pathlib import Path

import torch

from .._io import atomic_write_bytes
from ..model import read_router_directory

CHECKPOINT_DIR = "checkpoints"
LATEST_NAME = "latest"
STATE_NAME = "trainer_state.pt"


def rng_state() -> dict:
    return {
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python_rng": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    random.setstate(state["python_rng"])


def save_checkpoint(output_dir: Path, step: int, model, state: dict) -> Path:
    """Write the routers and ``state`` (plus the RNG states) as the checkpoint of ``step``; drop older ones."""
    root = Path(output_dir) / CHECKPOINT_DIR
    folder = root / f"step-{step:08d}"
    model.save_pretrained(folder)
    buffer = io.BytesIO()
    torch.save({"step": step, **state, **rng_state()}, buffer)
    atomic_write_bytes(folder / STATE_NAME, buffer.getvalue())
    atomic_write_bytes(root / LATEST_NAME, folder.name.encode())
    for old in root.glob("step-*"):
        if old.is_dir() and old.name != folder.name:
            shutil.rmtree(old, ignore_errors=True)
    return folder


def load_checkpoint(output_dir: Path) -> tuple[Path, dict, dict] | None:
    """``(folder, router state dict, trainer state)`` of the newest checkpoint, or None when there is none."""
    root = Path(output_dir) / CHECKPOINT_DIR
    latest = root / LATEST_NAME
    if not latest.is_file():
        return None
    folder = root / latest.read_text().strip()
    _, _, routers = read_router_directory(folder)
    state = torch.load(folder / STATE_NAME, map_location="cpu", weights_only=True)
    return folder, routers, state


def remove_checkpoints(output_dir: Path) -> None:
    shutil.rmtree(Path(output_dir) / CHECKPOINT_DIR, ignore_errors=True)
