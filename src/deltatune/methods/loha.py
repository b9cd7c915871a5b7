r"""LoHa (Hyeon-Woo et al. 2022, FedPara; LyCORIS): config, layer and injection rule.

LoHa's update is the Hadamard (element-wise) product of two low-rank matrices:

.. math::  \Delta W = s \, (W_{1a} W_{1b}) \odot (W_{2a} W_{2b}), \qquad
           W_{1a}, W_{2a} \in \mathbb{R}^{d_{out} \times r},\;
           W_{1b}, W_{2b} \in \mathbb{R}^{r \times d_{in}}, \qquad s = \alpha / r

With :math:`4 r (d_{in} + d_{out}) / 2` parameters, twice LoRA's at the same ``r``, the product
has rank up to :math:`r^2` (the rank of a Hadamard product is at most the product of the ranks), so
LoHa reaches updates of much higher rank than LoRA for its size. :math:`W_{2b}` starts at zero, so
training starts from the base model exactly; the others are Kaiming-uniform.

Tensor names (``hada_w1_a`` ...), shapes, config fields and checkpoint keys (no ``.weight``
suffix) are HF PEFT's, so adapters cross both ways. Past PEFT: GPT-2's ``Conv1D`` layers (PEFT 0.21
refuses them), 4-bit and 8-bit bases, and mixed-adapter batches (:class:`DeltaLayer`).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from deltatune import engine
from deltatune.config import ConfigError, PeftConfig, PeftType
from deltatune.methods import lora
from deltatune.methods.lycoris import LycorisConfig, LycorisLayer, config_options
from deltatune.registry import (
    MODULE_OPTIONS,
    Method,
    TrainingDefaults,
    register_method,
    register_training_defaults,
)


@dataclasses.dataclass
class LoHaConfig(LycorisConfig):
    """LoHa. HF PEFT's fields and defaults; see :class:`~deltatune.methods.lycoris.LycorisConfig`."""

    def __post_init__(self) -> None:
        if self.peft_type is None:
            self.peft_type = PeftType.LOHA
        super().__post_init__()
        if self.peft_type != PeftType.LOHA:
            raise ConfigError(f"LoHaConfig has peft_type {self.peft_type!r}; it must be 'LOHA'")
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"LoHaConfig.init_weights must be True or False, got {self.init_weights!r}")


class LoHaLinear(LycorisLayer):
    """LoHa around a linear layer (``nn.Linear``, ``Conv1D``, bitsandbytes 4-bit/8-bit)."""

    containers = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        for container in self.containers:
            setattr(self, container, nn.ParameterDict())

    def add_adapter(self, name: str, config: PeftConfig, module_path: str) -> None:
        assert isinstance(config, LoHaConfig)
        r, alpha = config.rank_and_alpha(module_path)
        factory = self.factory()
        shapes = {
            "hada_w1_a": (self.out_features, r),
            "hada_w1_b": (r, self.in_features),
            "hada_w2_a": (self.out_features, r),
            "hada_w2_b": (r, self.in_features),
        }
        for container, shape in shapes.items():
            tensor = torch.empty(shape, **factory)
            if container == "hada_w2_b" and config.init_weights:
                nn.init.zeros_(tensor)
            else:
                nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))
            getattr(self, container)[name] = nn.Parameter(tensor)
        self.add_dropouts(name, config, alpha / r)

    def delta_weight(self, name: str) -> torch.Tensor:
        first = self.hada_w1_a[name] @ self.hada_w1_b[name]
        second = self.hada_w2_a[name] @ self.hada_w2_b[name]
        return first * second * self.scaling[name]


def attach_loha(model: nn.Module, adapter_name: str, config: PeftConfig) -> list[str]:
    """Wrap every target module of ``model`` with LoHa adapter ``adapter_name``; return their paths."""
    assert isinstance(config, LoHaConfig)
    return engine.attach_to_linear_layers(model, adapter_name, config, LoHaLinear, "LoHa", lora.default_targets)


LOHA = register_method(Method(peft_type=PeftType.LOHA, config_class=LoHaConfig, attach=attach_loha))

register_training_defaults(
    "loha",
    TrainingDefaults(
        uses=("r", "alpha", "dropout", *MODULE_OPTIONS),
        lr=2e-3,
        options={"targets": "all-linear", "r": 8, "alpha": 16},
        source="all-linear, r=8 (rank up to 64 at LoRA r=16's size); lr measured: Rotten Tomatoes validation "
        "0.848 at 2e-3, 0.801 at LoRA's 5e-4",
        config=lambda options, common: LoHaConfig(**config_options(options, common)),
    ),
)
