"""What prompt tuning, P-tuning and prefix tuning share: the config, and how inputs change.

These methods leave every layer alone and change what enters the model instead: virtual-token
embeddings before the input embeddings (prompt tuning, P-tuning), or key/value vectors that every
attention layer sees before the real tokens (prefix tuning). An :class:`InputAdapter` holds the
trained tensors and rewrites a forward call's keyword arguments; it never touches model code.

Prefixes go in through ``transformers``' own cache classes (``DynamicCache``, and
``EncoderDecoderCache`` for encoder-decoder models), looked up by the name the installed version's
``forward`` uses (``cache`` in transformers 5, ``past_key_values`` before), so new architectures
need no new code.

``generate`` runs ``transformers``' own loop unchanged. The virtual tokens are made to look like
``num_virtual_tokens`` tokens already in the sequence: dummy ids are put in front of ``input_ids``
(with attention-mask ones), the prompt embeddings replace them in ``inputs_embeds`` or the prefix
sits in the cache, and the dummy ids are cut off the result. Positions therefore continue after
the virtual tokens, exactly as in the training forward pass.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from deltatune.config import ConfigError, PeftConfig, TaskType, require_positive
from deltatune.model_info import context_length, text_config


@dataclasses.dataclass
class PromptLearningConfig(PeftConfig):
    """Fields of every input method (HF PEFT's names); the model fills the ``None`` ones.

    Args:
        num_virtual_tokens: how many virtual tokens (or prefix positions) to train.
        token_dim: width of a virtual token (the model's hidden size; for prefixes, key/value width).
        num_transformer_submodules: 2 for encoder-decoder models (a prompt per stack), else 1.
        num_attention_heads: attention heads of the keys/values (the KV heads under grouped-query
            attention).
        num_layers: attention layers that receive a prefix.
        modules_to_save: modules trained in full next to the prompt (e.g. a classifier head).
    """

    described: ClassVar[tuple[str, ...]] = ("num_virtual_tokens",)

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None

    always_written: ClassVar[tuple[str, ...]] = PeftConfig.always_written + (
        "num_virtual_tokens",
        "token_dim",
        "num_transformer_submodules",
        "num_attention_heads",
        "num_layers",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_virtual_tokens is None or not isinstance(self.num_virtual_tokens, int):
            raise ConfigError(f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}")
        if self.num_virtual_tokens <= 0:
            raise ConfigError(
                f"num_virtual_tokens must be at least 1, got {self.num_virtual_tokens}: with no virtual "
                "tokens there is nothing to train"
            )
        require_positive(self, "token_dim", "num_transformer_submodules", "num_attention_heads", "num_layers")

    @property
    def is_prompt_learning(self) -> bool:
        return True

    def fill_from_model(self, model: nn.Module) -> None:
        """Set the fields left ``None`` from the model's config."""
        config = text_config(model)
        if self.num_transformer_submodules is None:
            seq2seq = self.task_type == TaskType.SEQ_2_SEQ_LM or getattr(config, "is_encoder_decoder", False)
            self.num_transformer_submodules = 2 if seq2seq else 1
        if self.num_layers is None:
            self.num_layers = _first_attr(config, ("num_hidden_layers", "num_layers", "n_layer"))
        if self.token_dim is None:
            self.token_dim = _first_attr(config, ("hidden_size", "d_model", "n_embd"))
        if self.num_attention_heads is None:
            self.num_attention_heads = _first_attr(config, ("num_attention_heads", "num_heads", "n_head"))


def _first_attr(config: Any, names: tuple[str, ...]) -> int:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise ConfigError(f"the model config has none of {names}; set the field in the adapter config")


def check_length(model: nn.Module, length: int, num_virtual_tokens: int) -> None:
    limit = context_length(model)
    if limit is not None and length + num_virtual_tokens > limit:
        raise ValueError(
            f"input of {length} tokens plus {num_virtual_tokens} virtual tokens exceeds the model's context of "
            f"{limit} positions; truncate inputs to {limit - num_virtual_tokens} tokens"
        )


def prepend(tensor: torch.Tensor | None, count: int, value: int | float) -> torch.Tensor | None:
    """``tensor`` (batch, length, ...) with ``count`` positions of ``value`` in front."""
    if tensor is None:
        return None
    pad = torch.full((tensor.shape[0], count, *tensor.shape[2:]), value, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([pad, tensor], dim=1)


def batch_and_length(kwargs: dict[str, Any]) -> tuple[int, int, torch.device]:
    ids = kwargs.get("input_ids")
    if ids is not None:
        return ids.shape[0], ids.shape[1], ids.device
    embeds = kwargs.get("inputs_embeds")
    if embeds is not None:
        return embeds.shape[0], embeds.shape[1], embeds.device
    raise ValueError("prompt and prefix tuning need input_ids or inputs_embeds")


class InputAdapter(nn.Module):
    """Trained virtual tokens and the rule that puts them into a forward call.

    The saved form is one tensor, ``prompt_embeddings`` (HF PEFT's name). After loading it, an
    adapter that trains through a reparameterisation (P-tuning's encoder, a prefix projection)
    uses the saved table directly, as PEFT does; training continues on the table itself.
    """

    def __init__(self, config: PromptLearningConfig) -> None:
        super().__init__()
        self.config = config
        self.loaded_table: nn.Parameter | None = None

    def trained_table(self) -> torch.Tensor:
        """The virtual-token table computed from the trained parameters (subclasses)."""
        raise NotImplementedError

    def table(self) -> torch.Tensor:
        return self.loaded_table if self.loaded_table is not None else self.trained_table()

    def set_trainable(self, trainable: bool) -> None:
        for param in self.parameters():
            param.requires_grad_(False)
        trained = [self.loaded_table] if self.loaded_table is not None else list(self.parameters())
        for param in trained:
            param.requires_grad_(trainable)

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.table().detach()}

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor], where: str) -> None:
        if "prompt_embeddings" not in state:
            raise KeyError(f"{where} has no 'prompt_embeddings' tensor; it is not a prompt-learning adapter")
        tensor = state["prompt_embeddings"]
        with torch.no_grad():
            expected = tuple(self.trained_table().shape)
        if tuple(tensor.shape) != expected:
            raise ValueError(self.shape_mismatch_message(tuple(tensor.shape), expected))
        reference = next(self.parameters())
        self.loaded_table = nn.Parameter(tensor.to(device=reference.device, dtype=reference.dtype))

    def shape_mismatch_message(self, found: tuple[int, ...], expected: tuple[int, ...]) -> str:
        return (
            f"prompt_embeddings has shape {found}, but this model needs {expected}; "
            "the adapter was saved for a different base model or number of virtual tokens"
        )

    def prepare_forward(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def start_from_tokens(self, model: nn.Module, ids: list[int]) -> None:
        """Set the virtual tokens so that ``model`` starts as if ``ids`` stood before every input.

        ``ids`` are repeated or cut to ``num_virtual_tokens``. Starting from real tokens, not random
        vectors, keeps the first steps' loss near the base model's (Lester et al. 2021, section
        3.2; Li and Liang 2021, section 7.2).
        """
        raise NotImplementedError

    def prepare_generate(self, model: nn.Module, kwargs: dict[str, Any]) -> tuple[dict[str, Any], int]:
        """Generate kwargs and how many leading dummy ids to cut off the output."""
        raise NotImplementedError


def shift_length_limits(kwargs: dict[str, Any], count: int, model: nn.Module) -> None:
    """``max_length``/``min_length`` count real tokens: add the ``count`` placeholders cut off later."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    if kwargs.get("max_new_tokens") is None and getattr(config, "max_new_tokens", None) is None:
        kwargs["max_length"] = kwargs.get("max_length", getattr(config, "max_length", 20)) + count
    for name in ("min_length",):
        value = kwargs.get(name, getattr(config, name, 0))
        if value:
            kwargs[name] = value + count


def dummy_prefix(kwargs: dict[str, Any], count: int, model: nn.Module) -> None:
    """Put ``count`` placeholder ids (and mask ones) in front of a decoder-only generate call."""
    shift_length_limits(kwargs, count, model)
    ids = kwargs["input_ids"]
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    kwargs["input_ids"] = prepend(ids, count, pad if isinstance(pad, int) else 0)
    mask = kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    kwargs["attention_mask"] = prepend(mask, count, 1)


def virtual_ids(ids: list[int], count: int) -> list[int]:
    """``ids`` repeated, then cut, to ``count`` tokens."""
    if not ids:
        raise ValueError("the text for the virtual tokens tokenises to no tokens; give a non-empty text")
    return (ids * (count // len(ids) + 1))[:count]


@torch.no_grad()
def fit_output_layer(linear: nn.Linear, features: torch.Tensor, target: torch.Tensor) -> None:
    """Set ``linear``'s weight and bias so that ``linear(features) == target`` (least squares).

    A reparameterised table (an MLP's output) then starts at ``target`` exactly when the features
    of the ``n`` rows are linearly independent (``n <= hidden + 1``), which their random
    initialisation makes them.
    """
    design = torch.cat([features.double(), torch.ones(features.shape[0], 1, dtype=torch.double)], dim=1)
    solution = torch.linalg.lstsq(design.cpu(), target.double().cpu(), driver="gelsd").solution
    linear.weight.copy_(solution[:-1].T.to(linear.weight))
    linear.bias.copy_(solution[-1].to(linear.bias))
