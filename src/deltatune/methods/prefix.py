r"""Prefix tuning (Li and Liang 2021): trained keys and values in every attention layer.

Each attention layer ``l`` attends over ``n`` trained key/value pairs before the real tokens:

.. math::  \mathrm{attn}(Q, [K^{(l)}_P; K], [V^{(l)}_P; V])

The trained table has shape ``(n, layers * 2 * kv_width)``; row ``t`` holds token ``t``'s key and
value for every layer. Under grouped-query attention the prefix has the model's KV heads, not its
query heads (SmolLM2: 3 KV heads of 64 dims). The prefix keys carry no rotary position; real tokens
take positions ``n, n+1, ...``, as they would after ``n`` cached tokens.

``prefix_projection`` reparameterises the table during training as an MLP of a smaller
embedding, ``table = W_2 tanh(W_1 E + b_1) + b_2`` (the paper's section 4.3: direct
optimisation is unstable); the saved tensor is the projected table.

The prefix reaches the model as a pre-filled ``transformers`` cache: a ``DynamicCache`` for
decoder-only and encoder models, and for encoder-decoder models the decoder's self-attention half
of an ``EncoderDecoderCache``. For encoder-decoder models HF PEFT's layout is followed exactly so
that its checkpoints mean the same here: decoder layer ``j`` reads the table's layer ``2j mod L``
(PEFT fills self- and cross-attention slots from one interleaved table and then drops the cross-
attention half), and the encoder gets no prefix.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from deltatune.config import ConfigError, PeftType, require_positive
from deltatune.model_info import cache_argument, is_encoder_decoder, text_config
from deltatune.prompt_learning import (
    InputAdapter,
    PromptLearningConfig,
    batch_and_length,
    check_length,
    dummy_prefix,
    fit_output_layer,
    prepend,
    shift_length_limits,
    virtual_ids,
)
from deltatune.registry import Method, TrainingDefaults, register_method, register_training_defaults


@dataclasses.dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning. HF PEFT's fields.

    Args:
        prefix_projection: train through an MLP reparameterisation.
        encoder_hidden_size: the MLP's hidden width (default: the key/value width).
    """

    encoder_hidden_size: int | None = None
    prefix_projection: bool = False

    always_written: ClassVar[tuple[str, ...]] = PromptLearningConfig.always_written + (
        "encoder_hidden_size",
        "prefix_projection",
    )

    def __post_init__(self) -> None:
        if self.peft_type is None:
            self.peft_type = PeftType.PREFIX_TUNING
        super().__post_init__()
        require_positive(self, "encoder_hidden_size")

    def fill_from_model(self, model: nn.Module) -> None:
        layers, heads, head_dim = attention_layout(model)
        if self.num_layers is None:
            self.num_layers = layers
        if self.num_attention_heads is None:
            self.num_attention_heads = heads
        if self.token_dim is None:
            self.token_dim = heads * head_dim
        super().fill_from_model(model)
        if self.token_dim % self.num_attention_heads:
            raise ConfigError(
                f"token_dim={self.token_dim} is not divisible by num_attention_heads={self.num_attention_heads}"
            )
        if (self.num_layers, self.num_attention_heads, self.token_dim) != (layers, heads, heads * head_dim):
            raise ConfigError(
                f"the prefix adapter is laid out for {self.num_layers} layers x {self.num_attention_heads} KV heads x "
                f"{self.token_dim // self.num_attention_heads} dims, but this model has {layers} layers x {heads} KV "
                f"heads x {head_dim} dims; the adapter was made for a different base model"
            )


def attention_layout(model: nn.Module) -> tuple[int, int, int]:
    """(attention layers that take the prefix, key/value heads, head dim) from the model config."""
    config = text_config(model)
    if getattr(config, "is_encoder_decoder", False):
        layers = getattr(config, "num_decoder_layers", None) or config.num_layers
    else:
        layers = next(getattr(config, n) for n in ("num_hidden_layers", "num_layers", "n_layer") if hasattr(config, n))
    heads = next(getattr(config, n) for n in ("num_attention_heads", "num_heads", "n_head") if hasattr(config, n))
    hidden = next(getattr(config, n) for n in ("hidden_size", "d_model", "n_embd") if hasattr(config, n))
    head_dim = getattr(config, "head_dim", None) or getattr(config, "d_kv", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return int(layers), int(kv_heads), int(head_dim)


class PrefixEncoder(InputAdapter):
    """Holds the prefix table (or its reparameterisation) and builds the cache from it."""

    def __init__(self, config: PrefixTuningConfig, model: nn.Module) -> None:
        super().__init__(config)
        n, width = config.num_virtual_tokens, config.num_layers * 2 * config.token_dim
        device = model.get_input_embeddings().weight.device
        if config.prefix_projection:
            hidden = config.encoder_hidden_size or config.token_dim
            self.embedding = nn.Embedding(n, config.token_dim, device=device)
            self.transform = nn.Sequential(
                nn.Linear(config.token_dim, hidden, device=device), nn.Tanh(), nn.Linear(hidden, width, device=device)
            )
        else:
            self.embedding = nn.Embedding(n, width, device=device)
            self.transform = None

    def trained_table(self) -> torch.Tensor:
        table = self.embedding.weight
        return self.transform(table) if self.transform is not None else table

    @torch.no_grad()
    def start_from_tokens(self, model: nn.Module, ids: list[int]) -> None:
        """The table starts as the keys and values ``model`` computes for ``ids`` (Li and Liang's
        initialisation with real words' activations); with the projection, its last layer is fitted
        to them. The model then starts exactly as if those tokens stood before every input."""
        c = self.config
        if is_encoder_decoder(model):
            raise ValueError("starting a prefix from real tokens is defined for decoder-only models")
        device = model.get_input_embeddings().weight.device
        tokens = torch.tensor([virtual_ids(ids, c.num_virtual_tokens)], device=device)
        was_training = model.training
        model.eval()  # the activations without dropout
        out = model(input_ids=tokens, use_cache=True)
        model.train(was_training)
        cache = out.get("cache", out.get("past_key_values"))
        if cache is None or not hasattr(cache, "layers"):
            raise ValueError(f"{type(model).__name__} returns no key/value cache to start a prefix from")
        layers = [(cache.layers[i].keys, cache.layers[i].values) for i in range(c.num_layers)]
        per_layer = torch.stack([t[0] for pair in layers for t in pair])  # (layers * 2, heads, n, head_dim)
        target = per_layer.permute(2, 0, 1, 3).reshape(c.num_virtual_tokens, -1).float()
        if self.transform is None:
            self.embedding.weight.copy_(target.to(self.embedding.weight))
            return
        features = self.transform[:-1](self.embedding.weight)
        fit_output_layer(self.transform[-1], features, target)

    def shape_mismatch_message(self, found: tuple[int, ...], expected: tuple[int, ...]) -> str:
        c = self.config
        return (
            f"prefix checkpoint has shape {found}, but this model needs {expected} ({c.num_virtual_tokens} tokens x "
            f"{c.num_layers} layers x 2 x {c.num_attention_heads} KV heads x {c.token_dim // c.num_attention_heads} "
            "dims); the adapter was saved for a different base model"
        )

    def build_cache(self, model: nn.Module, batch: int) -> Any:
        from transformers import DynamicCache, EncoderDecoderCache

        c = self.config
        dtype = next(model.parameters()).dtype
        heads, head_dim = c.num_attention_heads, c.token_dim // c.num_attention_heads
        table = self.table().to(dtype).view(c.num_virtual_tokens, c.num_layers * 2, heads, head_dim)
        per_layer = table.permute(1, 2, 0, 3)  # (layers * 2, heads, n, head_dim)
        cache = _new_cache(DynamicCache, model)
        seq2seq = is_encoder_decoder(model)
        for layer in range(c.num_layers):
            source = (2 * layer) % c.num_layers if seq2seq else layer
            key = per_layer[2 * source].unsqueeze(0).expand(batch, -1, -1, -1)
            value = per_layer[2 * source + 1].unsqueeze(0).expand(batch, -1, -1, -1)
            cache.update(key, value, layer)
        if is_encoder_decoder(model):
            cache = EncoderDecoderCache(cache, _new_cache(DynamicCache, model))
        return cache

    def prepare_forward(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        n = self.config.num_virtual_tokens
        batch, length, _ = batch_and_length(kwargs)
        name = cache_argument(model)
        given = kwargs.get(name)
        if given is None or given.get_seq_length() == 0:
            check_length(model, length, n)
            kwargs[name] = self.build_cache(model, batch)
        if is_encoder_decoder(model):
            kwargs["decoder_attention_mask"] = prepend(kwargs.get("decoder_attention_mask"), n, 1)
        else:
            kwargs["attention_mask"] = prepend(kwargs.get("attention_mask"), n, 1)
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = kwargs["position_ids"] + n
        return kwargs

    def prepare_generate(self, model: nn.Module, kwargs: dict[str, Any]) -> tuple[dict[str, Any], int]:
        n = self.config.num_virtual_tokens
        ids = kwargs.get("input_ids")
        if ids is None:
            raise ValueError("generate with a prefix adapter needs input_ids")
        check_length(model, ids.shape[1], n)
        batch = ids.shape[0]
        if is_encoder_decoder(model):
            start = model.generation_config.decoder_start_token_id
            if start is None:
                start = model.config.decoder_start_token_id
            decoder_ids = kwargs.get("decoder_input_ids")
            if decoder_ids is None:
                decoder_ids = torch.full((batch, 1), start, dtype=ids.dtype, device=ids.device)
            kwargs["decoder_input_ids"] = prepend(decoder_ids, n, start)
            shift_length_limits(kwargs, n, model)
            kwargs["decoder_attention_mask"] = torch.ones_like(kwargs["decoder_input_ids"])
        else:
            dummy_prefix(kwargs, n, model)
        # generate repeats each row for beams / several samples, but leaves a given cache alone.
        kwargs[cache_argument(model)] = self.build_cache(model, batch * _rows_per_input(model, kwargs))
        return kwargs, n


def _rows_per_input(model: nn.Module, kwargs: dict[str, Any]) -> int:
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    beams = kwargs.get("num_beams", getattr(config, "num_beams", 1)) or 1
    returned = kwargs.get("num_return_sequences", getattr(config, "num_return_sequences", 1)) or 1
    return max(int(beams), int(returned))


def _new_cache(cache_class: type, model: nn.Module) -> Any:
    try:
        return cache_class(config=text_config(model))
    except TypeError:  # transformers releases whose caches take no config
        return cache_class()


def _build(model: nn.Module, config: PrefixTuningConfig) -> InputAdapter:
    config.fill_from_model(model)
    return PrefixEncoder(config, model)


PREFIX_TUNING = register_method(Method(PeftType.PREFIX_TUNING, PrefixTuningConfig, input_adapter=_build))

# Li and Liang 2021 start the prefix from real words' activations ("virtual_init": the task's own
# words). Their MLP reparameterisation steadies a random start; from real activations the table
# trains steadily as it is, while a projection fitted to them diverged on SmolLM2 (validation
# accuracy 0.45 at 5e-3, 0.51 at 2e-2, against 0.836 without it at 5e-3; benchmarks/RESULTS.md).
# Behind a fresh classifier head (MiniLM, seq-cls, 400 test reviews): 0.763 at 2e-2, 0.725 at 5e-2,
# 0.618 at 5e-3 (the full test split); with the frozen model's dropout off, 0.821 against 0.803 (seed 0).
register_training_defaults(
    "prefix",
    TrainingDefaults(
        uses=(
            "virtual_tokens",
            "virtual_init",
            "prefix_projection",
            "encoder_hidden_size",
            "prompt_init_text",
            "modules_to_save",
        ),
        lr=5e-3,
        options={"virtual_tokens": 20, "prefix_projection": False, "virtual_init": "task"},
        tasks={"seq-cls": {"lr": 2e-2, "model_dropout": 0.0}},
        source="Li and Liang 2021 (real-token init); lr measured on rotten-tomatoes",
        config=lambda options, common: PrefixTuningConfig(
            num_virtual_tokens=options["virtual_tokens"],
            prefix_projection=bool(options.get("prefix_projection")),
            encoder_hidden_size=options.get("encoder_hidden_size"),
            task_type=common["task_type"],
            modules_to_save=common["modules_to_save"],
        ),
    ),
)
