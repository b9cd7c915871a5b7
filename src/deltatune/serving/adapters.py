"""The adapters a server holds, and the rules for reading new ones at a client's request.

A client names a folder in ``POST /v1/adapters``; the server reads it only when it lies inside the
``--adapter-dir`` it was started with, after every symbolic link is resolved (``../`` and links that
point out of the folder are refused), and only as safetensors (never pickle). Without
``--adapter-dir`` no client can make the server read anything: the operator's ``--adapter``
options are the only adapters.

An adapter is served when every row of a batch can use it independently of the others: the layer
methods (LoRA and its variants, IA3, bottleneck adapters, LoHa, LoKr, VeRA, OFT, ...) qualify;
prompt and prefix tuning put virtual tokens in front of the whole input, classifiers answer with a
label instead of text, and a fully fine-tuned model is a different base: these are refused at load
with that reason.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

from deltatune.checkpoint import CheckpointError
from deltatune.config import PeftConfig
from deltatune.peft_model import BASE_ROW, PeftModel
from deltatune.run_folder import resolve_trained
from deltatune.serving.batcher import Batcher, ServeError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


class AdapterCatalog:
    """Adapter names to what they are; changes to the model itself run in the batcher's thread."""

    def __init__(self, batcher: Batcher, base_name: str, adapter_dir: Path | None = None) -> None:
        self.batcher = batcher
        self.base_name = base_name
        self.adapter_dir = adapter_dir.resolve() if adapter_dir is not None else None
        self._lock = threading.Lock()
        self._loaded: dict[str, dict[str, Any]] = {}  # name -> {"path", "method", "created"}
        self._closing: set[str] = set()

    # -- lookups --------------------------------------------------------------------------------
    def names(self) -> list[str]:
        with self._lock:
            return [name for name in self._loaded if name not in self._closing]

    def describe(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{"name": n, **info} for n, info in self._loaded.items() if n not in self._closing]

    def route(self, model: str) -> str | None:
        """The adapter a request's ``model`` names (``None``: the base model); 404 for anything else."""
        if model == self.base_name:
            return None
        with self._lock:
            if model in self._loaded and model not in self._closing:
                return model
            closing = model in self._closing
        if closing:
            raise ServeError(404, f"adapter {model!r} is being unloaded", param="model", code="model_not_found")
        known = ", ".join([self.base_name, *self.names()])
        raise ServeError(
            404, f"the model {model!r} does not exist; models: {known}", param="model", code="model_not_found"
        )

    # -- loading --------------------------------------------------------------------------------
    def client_path(self, path: str) -> Path:
        """The folder a client named, if the server may read it (inside ``--adapter-dir``)."""
        if self.adapter_dir is None:
            raise ServeError(
                403,
                "this server loads no adapters at a client's request: start it with --adapter-dir DIR to "
                "allow adapters from inside DIR",
                param="path",
                kind="permission_error",
            )
        candidate = Path(path)
        resolved = (candidate if candidate.is_absolute() else self.adapter_dir / candidate).resolve()
        if not resolved.is_relative_to(self.adapter_dir):
            raise ServeError(
                403,
                f"{path!r} is outside the server's adapter folder; name a folder inside it (relative paths "
                "are read from there)",
                param="path",
                kind="permission_error",
            )
        if not resolved.is_dir():
            raise ServeError(
                404,
                f"no adapter folder {path!r} in the server's adapter folder",
                param="path",
                code="adapter_not_found",
            )
        return resolved

    def load(self, name: str, folder: Path, confined: bool = True) -> dict[str, Any]:
        """Check and load the adapter in ``folder`` (a run folder or an adapter folder) as ``name``."""
        if not isinstance(name, str) or not NAME.match(name) or name == BASE_ROW:
            raise ServeError(
                400, f"adapter name {name!r}: use letters, digits and . _ : / - (at most 128)", param="name"
            )
        with self._lock:
            taken = name == self.base_name or name in self._loaded
        if taken:
            raise ServeError(
                409,
                f"the name {name!r} is taken; unload it first or choose another",
                param="name",
                kind="conflict_error",
                code="name_taken",
            )
        try:
            trained = resolve_trained(folder)
        except (FileNotFoundError, ValueError) as err:
            raise ServeError(400, str(err), param="path") from None
        adapter_folder = trained.folder.resolve()
        if confined:
            # a file inside the folder may be a link out of it: every file read must resolve inside too
            leaks = [
                p.name
                for p in [adapter_folder, *adapter_folder.iterdir()]
                if not p.resolve().is_relative_to(self.adapter_dir)
            ]
            if leaks:
                raise ServeError(
                    403,
                    f"{folder}: {', '.join(leaks)} leads outside the server's adapter folder",
                    param="path",
                    kind="permission_error",
                )
        config = _servable_config(trained)
        self.batcher.call(lambda: self._attach(name, adapter_folder)).result()
        info = {"path": str(adapter_folder), "method": str(config.peft_type)}
        with self._lock:
            self._loaded[name] = info
        return {"name": name, **info}

    def _attach(self, name: str, folder: Path) -> None:
        """In the batcher's thread: the adapter's weights onto the model."""
        try:
            if isinstance(self.batcher.model, PeftModel):
                self.batcher.model.load_adapter(folder, adapter_name=name)
            else:
                self.batcher.model = PeftModel.from_pretrained(self.batcher.model, folder, adapter_name=name)
        except (CheckpointError, ValueError, KeyError) as err:
            message = err.args[0] if err.args else str(err)
            raise ServeError(
                400, f"the adapter in {folder} cannot be loaded on this base model: {message}", param="path"
            ) from None

    def unload(self, name: str) -> Any:
        """Stop routing to ``name``; the future completes once its last request has finished."""
        with self._lock:
            known = name in self._loaded and name not in self._closing
            if known:
                self._closing.add(name)
        if not known:
            raise ServeError(
                404,
                f"no adapter named {name!r}; adapters: {', '.join(self.names()) or 'none'}",
                param="name",
                code="adapter_not_found",
            )

        def detach() -> None:
            self.batcher.model.delete_adapter(name)
            with self._lock:
                self._loaded.pop(name, None)
                self._closing.discard(name)

        return self.batcher.call_when_done(name, detach)


def _servable_config(trained: Any) -> PeftConfig:
    where = trained.folder
    if trained.full:
        raise ServeError(400, f"{where} is a fully fine-tuned model, not an adapter: serve it as --model", param="path")
    try:
        config = PeftConfig.from_pretrained(where)
    except (CheckpointError, ValueError, KeyError, OSError) as err:
        raise ServeError(400, f"{where}: {err}", param="path") from None
    if config.is_prompt_learning:
        raise ServeError(
            400,
            f"{where} holds a {config.peft_type} adapter: its virtual tokens go in front of every row of a "
            "batch, so it cannot share a batch with other adapters; serve it alone with deltatune generate",
            param="path",
            code="unsupported_method",
        )
    task = str(config.task_type or "")
    if task and task not in ("CAUSAL_LM", "TaskType.CAUSAL_LM"):
        raise ServeError(
            400,
            f"{where} is a {task} adapter; a server generates text with CAUSAL_LM adapters",
            param="path",
            code="unsupported_task",
        )
    if trained.spec is not None and trained.spec.kind == "seq-cls":
        raise ServeError(
            400, f"{where} is a classifier with a head, not a generator", param="path", code="unsupported_task"
        )
    return config
