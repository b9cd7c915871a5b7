r"""VeRA (Kopiczko et al. 2024): config, layer, shared projections and injection rule.

VeRA freezes one pair of random matrices for the whole model and trains two vectors per layer:

.. math::  \Delta W = \Lambda_b\, B\, \Lambda_d\, A, \qquad
           A \in \mathbb{R}^{r \times d_{in}},\; B \in \mathbb{R}^{d_{out} \times r} \text{ frozen, shared},
           \qquad \Lambda_b = \mathrm{diag}(b),\, b \in \mathbb{R}^{d_{out}};\;
           \Lambda_d = \mathrm{diag}(d),\, d \in \mathbb{R}^{r}

so a layer trains :math:`d_{out} + r` numbers: about ten times fewer than LoRA at similar quality
in the paper (it needs a much larger ``r``, 256 by default, since the random subspace is fixed).
:math:`b` starts at zero (the base model exactly) and :math:`d` at ``d_initial``. :math:`A` and
:math:`B` are drawn once, Kaiming-uniform (:math:`U(\pm\sqrt{6/\mathrm{fan}})`, fan the second
dimension) from a CPU generator seeded with ``projection_prng_key``: :math:`A` first, of shape
``(r, largest d_in)``, then :math:`B`, ``(largest d_out, r)``, over the adapted layers; each layer
reads the top-left block it needs. That is HF PEFT's draw, tensor for tensor, so with
``save_projection=False`` a checkpoint holds the vectors only and the projections are rebuilt.

The projections are model-level state (:class:`~deltatune.registry.SharedTensor`): saved once as
``base_model.vera_A`` / ``base_model.vera_B``, as PEFT does; the vectors as ``vera_lambda_b`` /
``vera_lambda_d`` per layer. Unlike PEFT 0.21, each adapter keeps its own projections, so adapters
of different ranks or seeds coexist, and batches may mix adapters.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from deltatune import base_layers, engine
from deltatune.config import ConfigError, PeftConfig, PeftType
from deltatune.delta_layer import DeltaLayer
from deltatune.methods import lora
from deltatune.modules_to_save import trained_biases
from deltatune.registry import Method, SharedTensor, TrainingDefaults, register_method, register_training_defaults
from deltatune.shared_state import SharedBuffers

logger = logging.getLogger("deltatune")


@dataclasses.dataclass
class VeraConfig(PeftConfig):
    """VeRA. Field names and defaults are HF PEFT's.

    Args:
        r: rank of the shared random projections (VeRA needs a large one; the paper uses 256 to 1024).
        target_modules: module names (list: exact path or path suffix), a regex on the full path
            (string), or ``"all-linear"``. None: the attention query/value projections.
        projection_prng_key: seed of the CPU generator that draws ``A`` and ``B``.
        save_projection: write ``A`` and ``B`` into the checkpoint (False: rebuilt from the seed on load).
        vera_dropout: dropout on the adapter's input.
        d_initial: the start value of every entry of ``d``.
        fan_in_fan_out: the base weight is stored (in, out), as GPT-2's ``Conv1D`` does. Read from the
            module type; the saved config records what was found.
        bias: ``"none"``, ``"all"`` (train every bias of the model) or ``"vera_only"`` (biases of the
            adapted layers); trained biases are saved with the adapter.
        modules_to_save: modules trained in full and saved with the adapter (e.g. a task head).
        init_weights: True: ``b = 0`` (the base model exactly); False: ``b = 1`` and ``d`` drawn
            from N(0, 1) (the adapter changes outputs from the start; for tests).
        layers_to_transform, layers_pattern: restrict to these layer indices.
    """

    described: ClassVar[tuple[str, ...]] = ("r", "projection_prng_key", "save_projection", "target_modules")

    r: int = 256
    target_modules: list[str] | str | None = None
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    always_written: ClassVar[tuple[str, ...]] = PeftConfig.always_written + (
        "r",
        "target_modules",
        "projection_prng_key",
        "save_projection",
        "vera_dropout",
        "d_initial",
        "fan_in_fan_out",
        "bias",
        "init_weights",
        "modules_to_save",
    )

    def __post_init__(self) -> None:
        if self.peft_type is None:
            self.peft_type = PeftType.VERA
        super().__post_init__()
        if self.peft_type != PeftType.VERA:
            raise ConfigError(f"VeraConfig has peft_type {self.peft_type!r}; it must be 'VERA'")
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        elif self.target_modules is not None and not isinstance(self.target_modules, (str, list)):
            raise ConfigError(
                f"VeraConfig.target_modules must be a list or a regex string, got {self.target_modules!r}"
            )
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"VeraConfig.r must be a positive integer, got {self.r!r}")
        key = self.projection_prng_key
        if isinstance(key, bool) or not isinstance(key, int) or key < 0:
            raise ConfigError(f"VeraConfig.projection_prng_key must be a non-negative integer, got {key!r}")
        dropout = self.vera_dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ConfigError(f"VeraConfig.vera_dropout must be a probability in [0, 1), got {dropout!r}")
        if isinstance(self.d_initial, bool) or not isinstance(self.d_initial, (int, float)):
            raise ConfigError(f"VeraConfig.d_initial must be a number, got {self.d_initial!r}")
        if self.bias not in ("none", "all", "vera_only"):
            raise ConfigError(f"VeraConfig.bias must be 'none', 'all' or 'vera_only', got {self.bias!r}")
        for name in ("save_projection", "init_weights", "fan_in_fan_out"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"VeraConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("VeraConfig: layers_pattern needs layers_to_transform (the layer indices to adapt)")

    def trained_base_parameters(self, model: nn.Module, adapter_name: str) -> dict[str, nn.Parameter]:
        return trained_biases(model, adapter_name, self.bias, "vera_only")


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """:math:`U(\\pm\\sqrt{6 / \\mathrm{shape}[1]})` from ``generator`` (Kaiming's bound for ReLU gain)."""
    bound = math.sqrt(6.0 / shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def projections(r: int, max_in: int, max_out: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``A`` ``(r, max_in)`` then ``B`` ``(max_out, r)`` from one CPU generator seeded ``seed``."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    first = kaiming_uniform((r, max_in), generator)
    return first, kaiming_uniform((max_out, r), generator)


class VeraLinear(DeltaLayer):
    """VeRA around a linear layer (``nn.Linear``, ``Conv1D``, bitsandbytes 4-bit/8-bit)."""

    containers = ("vera_lambda_b", "vera_lambda_d", "vera_dropout")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.vera_lambda_b = nn.ParameterDict()
        self.vera_lambda_d = nn.ParameterDict()
        self.vera_dropout = nn.ModuleDict()
        # The model-level projections by kind ("vera_A", "vera_B"), held by the PeftModel and not
        # registered here: one copy in the state dict, moved once by .to().
        object.__setattr__(self, "projections", {})

    def add_adapter(self, name: str, config: PeftConfig, module_path: str) -> None:
        raise TypeError("VeRA layers need the shared projections: add them through PeftModel")

    def add_vera(self, name: str, config: VeraConfig, shared: Mapping[str, SharedBuffers]) -> None:
        self.projections.update(shared)
        factory = self.factory()
        d = torch.randn(config.r, **factory)  # drawn whatever the init, as HF PEFT does (the same RNG stream)
        if config.init_weights:
            b = torch.zeros(self.out_features, **factory)
            d = torch.full_like(d, float(config.d_initial))
        else:
            b = torch.ones(self.out_features, **factory)
        self.vera_lambda_b[name] = nn.Parameter(b)
        self.vera_lambda_d[name] = nn.Parameter(d)
        self.vera_dropout[name] = nn.Dropout(config.vera_dropout) if config.vera_dropout > 0 else nn.Identity()

    def _blocks(self, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's top-left blocks of the shared projections: ``A`` ``(r, in)``, ``B`` ``(out, r)``."""
        A = self.projections["vera_A"][name][:, : self.in_features]
        B = self.projections["vera_B"][name][: self.out_features, :]
        return A.to(dtype), B.to(dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        b, d = self.vera_lambda_b[name], self.vera_lambda_d[name]
        A, B = self._blocks(name, b.dtype)
        return (b[:, None] * B) @ (d[:, None] * A)

    def delta_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        b, d = self.vera_lambda_b[name], self.vera_lambda_d[name]
        A, B = self._blocks(name, b.dtype)
        return b * F.linear(d * F.linear(self.vera_dropout[name](x), A), B)


def _target_paths(model: nn.Module, config: VeraConfig) -> list[str]:
    linear = engine.linear_types()
    return engine.find_targets(
        model,
        config.target_modules if config.target_modules is not None else lora.default_targets(model, linear),
        wrappable=linear,
        layers_to_transform=config.layers_to_transform,
        layers_pattern=config.layers_pattern,
        skip=config.modules_to_save or (),
        method="VeRA",
    )


def shared_projections(model: nn.Module, config: PeftConfig) -> dict[str, SharedTensor]:
    """``vera_A`` and ``vera_B`` for one adapter, sized to the largest adapted layer."""
    assert isinstance(config, VeraConfig)
    views = [base_layers.linear_base(engine.innermost(model.get_submodule(p))) for p in _target_paths(model, config)]
    max_in, max_out = max(v.in_features for v in views), max(v.out_features for v in views)
    A, B = projections(config.r, max_in, max_out, config.projection_prng_key)
    view = views[0]
    # PEFT rounds the projections to the base weight's dtype before keeping them in the adapter's.
    A, B = (t.to(view.weight_dtype).to(device=view.device, dtype=view.adapter_dtype) for t in (A, B))
    return {"vera_A": SharedTensor(A, config.save_projection), "vera_B": SharedTensor(B, config.save_projection)}


def attach_vera(
    model: nn.Module, adapter_name: str, config: PeftConfig, shared: Mapping[str, SharedBuffers] | None = None
) -> list[str]:
    """Wrap every target module of ``model`` with VeRA adapter ``adapter_name``; return their paths."""
    assert isinstance(config, VeraConfig)
    if shared is None:
        raise TypeError("VeRA needs its shared projections: add VeRA adapters through get_peft_model / PeftModel")
    paths = _target_paths(model, config)
    if isinstance(config.target_modules, str) and config.target_modules.lower() in ("all-linear", "all_linear"):
        config.target_modules = sorted({path.rsplit(".", 1)[-1] for path in paths})
    elif config.target_modules is None:
        config.target_modules = lora.default_targets(model, engine.linear_types())
    engine.wrap_targets(model, paths, VeraLinear, lambda layer, p: layer.add_vera(adapter_name, config, shared))
    kinds = {base_layers.linear_base(engine.innermost(model.get_submodule(p))).transposed for p in paths}
    if len(kinds) == 1:
        config.fan_in_fan_out = kinds.pop()  # what PEFT records (and its loader checks) for Conv1D
    return paths


VERA = register_method(
    Method(peft_type=PeftType.VERA, config_class=VeraConfig, attach=attach_vera, shared_state=shared_projections)
)


def config_from_options(options: Mapping[str, Any], common: Mapping[str, Any]) -> VeraConfig:
    """The VeRA config ``deltatune train``'s options describe (``--r``, ``--dropout``)."""
    fields = {k: v for k, v in common.items() if k != "exclude_modules"}  # VeRA has none (check_options warned)
    return VeraConfig(r=options["r"], vera_dropout=options.get("dropout") or 0.0, **fields)


# Kopiczko et al. train VeRA at learning rates 10x to 100x LoRA's (its vectors start near zero and
# scale a fixed random subspace): 1e-2 on GLUE with RoBERTa.
register_training_defaults(
    "vera",
    TrainingDefaults(
        uses=("r", "dropout", "targets", "layers_to_transform", "modules_to_save"),
        lr=1e-2,
        options={"targets": "all-linear", "r": 256},
        source="r=256 and lr about 1e-2 (Kopiczko et al. 2024); Rotten Tomatoes validation 0.844 at 1e-2",
        config=config_from_options,
    ),
)
