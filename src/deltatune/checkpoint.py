"""Adapter checkpoints in HF PEFT's layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

A tensor's key is ``base_model.model.<module path>.<name>`` where ``<name>`` is the adapter layer's
own name for it with the adapter name left out (``lora_A.weight``, ``lora_magnitude_vector``); a
trained copy of a module (``modules_to_save``) and a trained base bias are saved under the module's
own path. Each layer reports its tensors in that form (:meth:`AdapterLayer.adapter_state_dict`), so
this module knows no method.

Files are written atomically (a temporary file in the same directory, flushed, then renamed), so a
crash never leaves a half-written checkpoint. Only safetensors is read unless the caller opts into
pickle-based ``.bin`` files, which can run arbitrary code when loaded.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from deltatune import engine
from deltatune.allocation import AllocationBudgetExceeded, adapter_loading_budget
from deltatune.atomic import atomic_write_bytes, file_mode, temporary_beside
from deltatune.config import CONFIG_NAME, UNSAFE_WEIGHTS_NAME, WEIGHTS_NAME, ConfigError, PeftConfig

PREFIX = "base_model.model."
# Integer buffers a trained module copy (modules_to_save) saves with its weights: BatchNorm's step count.
INTEGER_BUFFERS = ("num_batches_tracked",)


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or does not fit the model; the message names which."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file cannot be read at all (truncated, not safetensors, not a tensor dict)."""


def save_adapter(tensors: dict[str, torch.Tensor], config: PeftConfig, directory: str | os.PathLike) -> None:
    """Write an adapter folder: the weights, then the config, each replaced atomically.

    A folder is two files, so the save holds :func:`folder_lock` exclusively: a reader that takes
    it (:func:`read_adapter_folder`) sees the old pair or the new one, never one file of each.
    """
    directory = Path(directory)
    with folder_lock(directory, exclusive=True):
        save_tensors(tensors, directory / WEIGHTS_NAME)
        atomic_write_bytes(directory / CONFIG_NAME, config.to_json_bytes())


def read_adapter_folder(
    directory: str | os.PathLike, allow_pickle: bool = False
) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
    """An adapter folder's config and tensors, both from the same save (see :func:`save_adapter`)."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    with folder_lock(directory, exclusive=False):
        if not path.is_file():
            raise ConfigError(f"no {CONFIG_NAME} in {directory}: is this an adapter directory?")
        raw = path.read_bytes()
        tensors = load_tensors(directory, allow_pickle)
    return PeftConfig.from_json_bytes(raw, path), tensors


@contextlib.contextmanager
def folder_lock(directory: Path, exclusive: bool) -> Iterator[None]:
    """An advisory lock on an adapter folder: held exclusively by a save, shared by readers.

    The lock file lives in the system's temporary folder (``deltatune-locks/<hash of the folder's
    real path>.lock``), not beside the adapter, so that an adapter folder holds only PEFT's files
    and can be uploaded as it is. A killed saver's lock goes with its process. A reader that finds
    no lock file (no save here since the machine started) has nothing to wait for.
    """
    key = hashlib.sha256(str(Path(directory).resolve()).encode()).hexdigest()[:32]
    lock = Path(tempfile.gettempdir()) / "deltatune-locks" / f"{key}.lock"
    try:
        if exclusive:
            if not lock.parent.is_dir():
                lock.parent.mkdir(exist_ok=True)
                with contextlib.suppress(OSError):  # sticky and open to all, as /tmp (the umask narrows mkdir)
                    os.chmod(lock.parent, 0o1777)
            fd = os.open(lock, os.O_RDONLY | os.O_CREAT, 0o644)  # flock needs no write access
        else:
            fd = os.open(lock, os.O_RDONLY)
    except OSError:
        yield  # a lock this process may not create or open cannot protect it: read or write unguarded
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def save_tensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file atomically, with PEFT's ``{"format": "pt"}`` metadata (and ``metadata``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temporary_beside(path)
    os.close(fd)
    try:
        # safetensors refuses shared or strided storage: give each tensor its own contiguous copy.
        plain = {key: t.detach().to("cpu").contiguous().clone() for key, t in tensors.items()}
        try:
            save_file(plain, tmp, metadata={"format": "pt", **(metadata or {})})
        except SafetensorError as err:  # a full disk surfaces as safetensors' own error type
            raise OSError(f"cannot write {path}: {err}") from err
        os.chmod(tmp, file_mode())  # safetensors writes the file anew
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_tensors(directory: str | os.PathLike, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read an adapter's tensors from ``directory``; errors name the file and the fix."""
    directory = Path(directory)
    safe = directory / WEIGHTS_NAME
    if safe.is_file():
        try:
            tensors = load_file(str(safe), device="cpu")
        except (SafetensorError, OSError, RuntimeError, ValueError, TypeError, OverflowError) as err:
            raise CorruptCheckpointError(f"{safe} is corrupt or truncated and cannot be read ({err})") from err
        return check_adapter_tensors(tensors, safe)
    unsafe = directory / UNSAFE_WEIGHTS_NAME
    if unsafe.is_file():
        if not allow_pickle:
            raise CheckpointError(
                f"{directory} holds only {UNSAFE_WEIGHTS_NAME}, a pickle file that can run code when loaded. "
                "If you trust its source, pass allow_pickle=True; better, convert it to safetensors"
            )
        try:
            state = torch.load(unsafe, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for a bad pickle
            raise CorruptCheckpointError(f"{unsafe} is corrupt or not a tensor dict ({err})") from err
        if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
            raise CorruptCheckpointError(f"{unsafe} holds a {type(state).__name__}, not a dict of tensors")
        return check_adapter_tensors(state, unsafe)
    raise CheckpointError(f"no {WEIGHTS_NAME} in {directory}: is this an adapter directory?")


@contextlib.contextmanager
def loading_guard(model: nn.Module, directory: str | os.PathLike, config: PeftConfig) -> Iterator[None]:
    """Build and load an adapter from ``directory`` within the memory its files can justify
    (:mod:`deltatune.allocation`): a crafted config that asks for more is refused, naming the file."""
    directory = Path(directory)
    config_file = directory / CONFIG_NAME
    files = [config_file, directory / WEIGHTS_NAME, directory / UNSAFE_WEIGHTS_NAME]
    try:
        budget = adapter_loading_budget(model, files, f"the adapter in {directory}", config.is_prompt_learning)
        with budget:
            yield
    except AllocationBudgetExceeded as err:
        raise CheckpointError(f"{config_file}: {err}") from None
    except (torch.OutOfMemoryError, NotImplementedError):
        raise  # the machine or the device, not the file
    except (ConfigError, CheckpointError, engine.TargetModuleError) as err:
        if str(directory) in str(err):
            raise
        raise type(err)(f"{config_file}: {err}") from err
    except (RuntimeError, TypeError, ValueError, LookupError, ArithmeticError) as err:
        # The model was fine before: whatever failed, failed on what the file says.
        raise CheckpointError(
            f"{config_file}: the adapter could not be built from this config ({type(err).__name__}: {err})"
        ) from err


def check_adapter_tensors(tensors: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """Refuse tensors no adapter holds: integer, boolean or 8-bit float ones (a corrupt or crafted
    file; copied into float weights they would load as garbage), and NaN or infinite values (a
    diverged run; every output of the adapted model would be NaN)."""
    for key, tensor in tensors.items():
        if key.rsplit(".", 1)[-1] in INTEGER_BUFFERS and not tensor.is_floating_point():
            continue
        if tensor.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise CorruptCheckpointError(
                f"{source}: tensor {key!r} has dtype {str(tensor.dtype).removeprefix('torch.')}; adapter weights "
                "are float16, bfloat16, float32 or float64, so the file is corrupt or not an adapter"
            )
        bad = tensor.numel() - int(torch.isfinite(tensor).sum())
        if bad:
            raise CorruptCheckpointError(
                f"{source}: tensor {key!r} holds {bad} NaN or infinite value(s) of {tensor.numel()}; the run that "
                "saved it diverged (retrain, or resume from an earlier checkpoint)"
            )
    return tensors


def adapter_state_dict(
    model: nn.Module,
    adapter_name: str,
    trained_base: Mapping[str, torch.Tensor] | None = None,
    prefix: str = PREFIX,
) -> dict[str, torch.Tensor]:
    """Adapter ``adapter_name``'s tensors under their HF PEFT checkpoint keys.

    ``trained_base`` are the base model's own parameters the adapter trains, by parameter path (its
    config says which: :meth:`~deltatune.config.PeftConfig.trained_base_parameters`). ``prefix``
    is ``base_model.model.`` for layer methods; HF PEFT writes ``base_model.`` for the modules
    trained next to a prompt-learning adapter (its model tree has one level less there).
    """
    state: dict[str, torch.Tensor] = {}
    for path, layer in engine.adapter_layers(model):
        for key, tensor in layer.adapter_state_dict(adapter_name).items():
            state[f"{prefix}{engine.checkpoint_path(path)}.{key}"] = _whole(tensor)
    for name, param in (trained_base or {}).items():
        state[prefix + name] = _whole(param)
    return state


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor from an FSDP-sharded one (a collective call: every process must save)."""
    tensor = tensor.detach()
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def load_adapter_state_dict(model: nn.Module, adapter_name: str, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy a checkpoint's tensors into adapter ``adapter_name``, which must already be attached.

    Every adapter tensor the model expects must be in the checkpoint with the same shape, and every
    checkpoint tensor must have a place in the model; otherwise the error names the first key that
    differs and both shapes, which is what a checkpoint for another base model looks like.
    """
    layers = {
        engine.checkpoint_path(path): layer
        for path, layer in engine.adapter_layers(model)
        if adapter_name in layer.adapter_names
    }
    grouped: dict[str, dict[str, torch.Tensor]] = {path: {} for path in layers}
    base_tensors: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if not key.startswith(PREFIX):
            raise CheckpointError(
                f"{source}: tensor {key!r} does not start with {PREFIX!r}; this is not a PEFT-format adapter"
            )
        rest = key[len(PREFIX) :]
        owner = _owning_layer(rest, layers)
        local = rest[len(owner) + 1 :] if owner is not None else None
        if owner is None or local.startswith("base_layer."):
            base_tensors[rest] = tensor  # a trained bias, or a resized embedding saved whole
        else:
            grouped[owner][local] = tensor
    try:
        for path, layer in layers.items():
            layer.load_adapter_state_dict(adapter_name, grouped[path], where=PREFIX + path)
    except (KeyError, ValueError) as err:
        message = err.args[0] if err.args else str(err)
        raise CheckpointError(f"{source}: {message}") from err
    for rest, tensor in base_tensors.items():
        _load_base_tensor(model, rest, tensor, source)


def _owning_layer(rest: str, layers: dict[str, nn.Module]) -> str | None:
    """The longest adapter-layer path that ``rest`` lies inside."""
    path = rest
    while "." in path:
        path = path.rsplit(".", 1)[0]
        if path in layers:
            return path
    return None


def _load_base_tensor(model: nn.Module, name: str, tensor: torch.Tensor, source: str) -> None:
    try:
        target = model.get_parameter(name)
    except AttributeError:
        try:
            target = model.get_buffer(name)
        except AttributeError:
            raise CheckpointError(
                f"{source}: tensor {PREFIX}{name} matches no module of this model; the adapter was saved "
                f"for a different base model (or with target modules this config does not list)"
            ) from None
    if tuple(target.shape) != tuple(tensor.shape):
        raise CheckpointError(
            f"{source}: shape mismatch for {PREFIX}{name}: checkpoint has {tuple(tensor.shape)}, the model "
            f"has {tuple(target.shape)}; the adapter was saved for a different base model (or a resized vocabulary)"
        )
    with torch.no_grad():
        target.copy_(tensor.to(dtype=target.dtype, device=target.device))
