"""The build: recorded build info and its import-time check, import on a machine without a GPU,
and the CMake build of the same sources (loaded with torch.ops.load_library)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from mindskip_ext import _extension

ROOT = Path(__file__).resolve().parents[1]


def test_build_info_matches_the_running_torch():
    info = _extension.build_info()
    assert torch.__version__ == info.TORCH_VERSION
    assert torch.version.cuda == info.TORCH_CUDA_VERSION
    if os.environ.get("MINDSKIP_CUDA") == "1":
        assert _extension.cuda_kernels_built(), "MINDSKIP_CUDA=1 but the CUDA kernels were not built"
    if _extension.cuda_kernels_built():
        assert torch._C._dispatch_has_kernel_for_dispatch_key("mindskip::router_gate", "CUDA")


def test_mismatched_build_fails_with_both_versions_and_the_rebuild_command():
    info = types.SimpleNamespace(TORCH_VERSION="2.10.0+cu128", TORCH_CUDA_VERSION="12.8")
    with pytest.raises(_extension.BuildMismatchError) as err:
        _extension.check_build_info(info, "2.14.1+cpu", None)
    message = str(err.value)
    assert "torch 2.10.0+cu128 (CUDA 12.8)" in message
    assert "torch 2.14.1+cpu (CUDA none)" in message
    assert "pip install --no-build-isolation -e ." in message
    _extension.check_build_info(info, "2.10.0+cu128", "12.8")  # a match passes


def test_import_works_without_a_gpu():
    script = textwrap.dedent(
        """
        import torch, mindskip_ext
        from mindskip_ext import ops
        assert not torch.cuda.is_available()
        score, keep, order, k = ops.router_gate(torch.randn(2, 3, 4), None, torch.randn(4), 0.0, 0.5)
        print("ok", int(k))
        """
    )
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr


# Runs in a fresh interpreter: mindskip_ext must not be imported there, or its _C would register
# the same ops a second time. The reference is loaded from its file instead.
LOAD_AND_CALL = """
import importlib.util, sys, torch
torch.ops.load_library(sys.argv[1])
spec = importlib.util.spec_from_file_location("reference", sys.argv[2])
ref = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ref)
torch.manual_seed(0)
h, w = torch.randn(5, 7, 33), torch.randn(33)
mask = torch.rand(5, 7) < 0.7
got = torch.ops.mindskip.router_gate(h, mask, w, torch.tensor(0.1), 0.5)
want = ref.router_gate(h, mask, w, 0.1, 0.5)
torch.testing.assert_close(got[0], want[0], atol=2e-6, rtol=0)
assert torch.equal(got[2], want[2])
k = int(got[3])
y = torch.randn(k, 7, 33)
r = torch.randn(5, 7, 33)
expected = ref.scatter_add_kept_(r.clone(), y, got[2])
torch.ops.mindskip.scatter_add_kept_(r, y, got[2])
assert torch.equal(r, expected)
print("ok", sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("mindskip::")))
"""


@pytest.mark.slow
def test_cmake_build_loads_and_runs(tmp_path):
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed, so the CMake build cannot be checked")
    cuda_home = _extension.build_info().CUDA_HOME
    if torch.version.cuda is not None and cuda_home is None:
        pytest.skip("torch is a CUDA build: its CMake package needs a CUDA toolkit, and none was found")
    with_cuda = os.environ.get("MINDSKIP_CUDA") == "1"
    configure = [cmake, "-S", str(ROOT), "-B", str(tmp_path), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    configure.append(f"-DMINDSKIP_CUDA={'ON' if with_cuda else 'OFF'}")
    if cuda_home is not None:
        configure += [
            f"-DCUDA_TOOLKIT_ROOT_DIR={cuda_home}",
            f"-DCMAKE_CUDA_COMPILER={Path(cuda_home) / 'bin' / 'nvcc'}",
        ]
    for cmd in (configure, [cmake, "--build", str(tmp_path), "-j", str(os.cpu_count() or 2)]):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
        assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    (library,) = tmp_path.glob("libmindskip_ops.*")
    run = subprocess.run(
        [sys.executable, "-c", LOAD_AND_CALL, str(library), str(ROOT / "mindskip_ext" / "reference.py")],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0 and run.stdout.startswith("ok"), run.stderr
    assert "mindskip::pack_plan" in run.stdout


# Run in a fresh interpreter: every import statement that a mindskip_ext module executes while `import mindskip_ext`
# runs, as (importing module, top-level package imported); then the mindskip_ext modules loaded, and the top-level
# packages that `import mindskip_ext` adds to those torch and transformers load themselves.
RECORD_IMPORTS = """
import builtins, json, sys
direct = set()
real_import = builtins.__import__

def recording_import(name, globals=None, locals=None, fromlist=(), level=0):
    importer = (globals or {}).get("__name__", "")
    if level == 0 and importer.split(".")[0] == "mindskip_ext":
        direct.add((importer, name.split(".")[0]))
    return real_import(name, globals, locals, fromlist, level)

import torch, transformers.cache_utils
before = {m.split(".")[0] for m in sys.modules}
builtins.__import__ = recording_import
import mindskip_ext
builtins.__import__ = real_import
print(json.dumps({"direct": sorted(direct), "loaded": sorted(m for m in sys.modules if m.startswith("mindskip_ext")),
                  "added": sorted({m.split(".")[0] for m in sys.modules} - before)}))
"""
CORE_MODULES = {"mindskip_ext." + m for m in ("_C", "_build_info", "_extension", "_io", "architectures", "attention",
                                              "cache", "config", "hf_compat", "layer", "model", "ops")}


def test_importing_the_package_loads_the_core_only():
    """``import mindskip_ext`` runs no import beyond the standard library, torch and transformers (tqdm, which torch
    and transformers load themselves, is imported where a progress bar is drawn), loads the core modules only, and
    adds none of the tooling's dependencies to what torch and transformers import."""
    proc = subprocess.run([sys.executable, "-c", RECORD_IMPORTS], capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    outside = [(importer, name) for importer, name in result["direct"]
               if name not in sys.stdlib_module_names and name not in {"torch", "transformers", "mindskip_ext"}]
    assert not outside, outside
    assert {name for _, name in result["direct"]} >= {"torch", "transformers"}  # the recording saw the imports
    assert set(result["loaded"]) == CORE_MODULES | {"mindskip_ext"}
    added = set(result["added"])
    assert "mindskip_ext" in added
    assert not added & {"lm_eval", "datasets", "gguf", "matplotlib", "tqdm", "accelerate", "safetensors"}, added
