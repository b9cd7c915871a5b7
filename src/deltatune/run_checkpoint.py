"""A run's checkpoint folders: what one holds, how it is put in place, and which one a resume reads.

A checkpoint is written into ``.checkpoint-N.tmp`` and only renamed to ``checkpoint-N`` once every
file in it is written, so a folder with that name is always whole; ``checkpoint-latest`` then
names it, and the oldest checkpoints past the run's limit are deleted. A process killed at any
moment leaves either the old checkpoint named or the new one, plus temporaries that a resume
removes; a resume whose pointer names a folder that is gone takes the newest whole one.
The trainer (:mod:`deltatune.train`) decides when to save and what state goes in.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from deltatune.atomic import atomic_write_bytes, replace_folder
from deltatune.peft_model import PeftModel
from deltatune.run_folder import LATEST


class CheckpointSaveError(OSError):
    """A checkpoint could not be written (full disk, I/O error); the message says what is left."""


def latest_name(output: Path) -> str | None:
    try:
        return (output / LATEST).read_text().strip() or None
    except OSError:
        return None


def remove_temporaries(output: Path) -> None:
    """Delete the temporary files and folders (``.<name>.tmp``) a killed run left in its folder: only
    atomic writes make them, and the run lock says no other writer is at work here."""
    for leftover in sorted(output.rglob(".*.tmp"), key=lambda p: len(p.parts), reverse=True):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def complete_checkpoint(output: Path) -> Path | None:
    """The checkpoint to resume from: the one ``checkpoint-latest`` names, or, if a kill left that
    pointer naming a folder no longer there, the newest complete ``checkpoint-N`` (a folder only
    gets that name once every file in it is written)."""
    name = latest_name(output)
    if name is None:
        return None
    aside = output / f".{name}.old.tmp"  # a kill while a same-step save swapped it out
    if not (output / name).exists() and (aside / "trainer_state.json").is_file():
        with contextlib.suppress(FileNotFoundError):  # another process of the run put it back first
            os.replace(aside, output / name)
    if (output / name / "trainer_state.json").is_file():
        return output / name
    steps = [int(p.name[11:]) for p in output.glob("checkpoint-*") if p.name[11:].isdigit()]
    found = [output / f"checkpoint-{n}" for n in sorted(steps, reverse=True)]
    folder = next((f for f in found if (f / "trainer_state.json").is_file()), None)
    if folder is None:
        raise CheckpointSaveError(f"{output / LATEST} names {name}, which is gone, and no complete checkpoint is left")
    return folder


def commit(output: Path, tmp: Path, name: str, keep: int) -> Path:
    """Put the written folder ``tmp`` in place as ``output/name``, point ``checkpoint-latest`` at it
    and delete the oldest checkpoints beyond ``keep``. A folder of that name already there (saved
    again at the same step: Ctrl-C right after a save) is swapped out, never deleted first."""
    final = output / name
    replace_folder(tmp, final, output / f".{name}.old.tmp")  # complete_checkpoint knows the aside name
    atomic_write_bytes(output / LATEST, name.encode())
    kept = sorted(
        (p for p in output.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    for old in kept[: max(0, len(kept) - keep)]:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def save_trained(model: nn.Module, directory: Path, main: bool = True) -> None:
    """The trained tensors: the adapters of a PeftModel, or a fully fine-tuned model's weights.

    Every process calls this (FSDP-sharded tensors are gathered collectively); ``main`` writes.
    """
    if isinstance(model, PeftModel):
        model.save_pretrained(directory, is_main_process=main)
        return
    state = {k: v.contiguous().clone() for k, v in gathered_state(model).items()}
    if main:
        directory.mkdir(parents=True, exist_ok=True)
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})


def gathered_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with each shared (tied) tensor once, FSDP shards gathered (collective).

    Tied names are dropped before gathering: gathered copies no longer share memory.
    """
    return {k: full_tensor(v) for k, v in _drop_tied(model, model.state_dict()).items()}


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor from an FSDP-sharded one (a collective call), or the tensor itself."""
    tensor = tensor.detach()
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def load_trained(model: nn.Module, directory: Path) -> None:
    if isinstance(model, PeftModel):
        for name in model.peft_config:
            folder = directory if name == "default" else directory / name
            model._load_weights(folder, name, allow_pickle=False)
        return
    model.load_state_dict(load_file(str(directory / "model.safetensors")), strict=False)


def forget_steps_after(metrics: Path, step: int) -> None:
    """Drop the log lines of steps after a checkpoint: a resumed run logs them again, once."""
    if not metrics.is_file():
        return
    kept = []
    for line in metrics.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:  # a line cut by the kill
            continue
    atomic_write_bytes(metrics, "".join(line + "\n" for line in kept).encode())


def _drop_tied(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without the second name of a tied parameter (one Parameter reached by two paths).

    Found from the module structure, not from memory addresses, so every process of a sharded model
    drops the same keys (an empty local shard has no address to compare).
    """
    once = {name for name, _ in model.named_parameters()}
    tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - once
    return {key: tensor for key, tensor in state.items() if key not in tied}


def optimizer_to_flat(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors for safetensors and the rest for JSON; a nested dict (bitsandbytes keeps each 8-bit
    state's quantization maps and scales in one) flattens to ``state.I.KEY/SUBKEY``."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}

    def put(index: Any, key: str, value: Any) -> None:
        if isinstance(value, dict):
            for sub, inner in value.items():
                put(index, f"{key}/{sub}", inner)
        elif isinstance(value, torch.Tensor):
            tensors[f"state.{index}.{key}"] = full_tensor(value).contiguous()
        else:
            scalars.setdefault(str(index), {})[key] = value

    for index, entry in state["state"].items():
        for key, value in entry.items():
            put(index, key, value)
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    entries: dict[int, dict[str, Any]] = {}

    def put(index: int, path: str, value: Any) -> None:
        *outer, last = path.split("/")
        target = entries.setdefault(index, {})
        for part in outer:
            target = target.setdefault(part, {})
        target[last] = value

    for key, tensor in tensors.items():
        _, index, name = key.split(".", 2)
        put(int(index), name, tensor)
    for index, values in meta["scalars"].items():
        for name, value in values.items():
            put(int(index), name, value)
    return {"state": entries, "param_groups": meta["param_groups"]}
