"""Tasks: how records become batches, what the loss is, and which metrics an evaluation reports.

* :class:`LabelGeneration` -- classification posed as instruction following for a causal LM: the
  prompt ends where the answer starts and the first token of each label word decides the class.
  The LM head runs at one position per example, not over the whole vocabulary at every token,
  and outside the model on contiguous rows (:class:`deltatune.losses.HeadLoss`; fused with the
  cross-entropy in training). Metrics: accuracy and macro-F1 over the label words, and exact match
  (the label's token is the model's top token over the whole vocabulary).
* :class:`CausalLM` -- prompt/response pairs (chat-formatted when the tokenizer has a template) or
  plain text; the loss covers response tokens only; batches are left-padded so that every label
  sits in the last positions and the LM head runs only there, fused with the cross-entropy a chunk
  at a time (:mod:`deltatune.losses`: no full logits tensor). Metrics: loss and perplexity.
* :class:`SequenceClassification` -- an encoder (or any model) with a classification head.
  Metrics: accuracy and macro-F1.
* :class:`Seq2Seq` -- encoder-decoder models: source to target, the same fused loss. Metrics: loss
  and perplexity.

Every loss is a *sum* over its units (label tokens or examples) and every batch says how many
units it holds, so a trainer can normalise by the units of a whole global batch: the same
gradients whether a batch is split over accumulation steps or processes or not.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F

from deltatune import conversations
from deltatune.data import DataError
from deltatune.losses import HeadLoss
from deltatune.model_info import cache_argument, unwrap_parallel


@dataclasses.dataclass
class Example:
    input_ids: list[int]
    labels: list[int] | None = None  # token targets (-100 = no loss), for LM tasks
    target: int | None = None  # class index, for classification
    decoder_labels: list[int] | None = None  # seq2seq targets
    position_ids: list[int] | None = None  # packed rows (deltatune.packing): restart at each example
    packed: int = 1  # how many examples the row holds
    record: int | None = None  # the 1-based record it was encoded from (named when its loss is NaN)

    @property
    def units(self) -> int:
        if self.labels is not None:
            return sum(1 for t in self.labels[1:] if t != -100)
        if self.decoder_labels is not None:
            return len(self.decoder_labels)
        return 1


@dataclasses.dataclass
class LabelSpace:
    """The classes of a classification task, in index order."""

    names: list[str]

    @classmethod
    def from_records(cls, records: Sequence[dict[str, Any]], column: str = "label", source: str = "data") -> LabelSpace:
        for row, record in enumerate(records, 1):
            value = record.get(column)
            if not _is_label(value):
                raise DataError(
                    f"{source}: row {row}: label {value!r} in column {column!r} is not a label (text, a whole "
                    "number or true/false); fix the row"
                )
        values = sorted({_label_key(r[column]) for r in records if r.get(column) is not None}, key=_sort_key)
        if len(values) < 2:
            raise DataError(
                f"{source}: column {column!r} has {len(values)} distinct label(s); classification needs at least 2"
            )
        return cls([str(v) for v in values])

    def index(self, value: Any, where: str) -> int:
        key = str(_label_key(value))
        if key not in self.names:
            raise DataError(f"{where}: label {value!r} was not seen in training (labels: {', '.join(self.names)})")
        return self.names.index(key)


def _is_label(value: Any) -> bool:
    if value is None or isinstance(value, (str, bool, int)):
        return True
    return isinstance(value, float) and math.isfinite(value)


def _label_key(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"-?[0-9]+", value.strip()):  # "²".isdigit(), but not int("²")
        return int(value.strip())
    return value.strip() if isinstance(value, str) else value


def _sort_key(value: Any) -> tuple[int, Any]:
    return (0, value) if isinstance(value, int) else (1, str(value))


class Task:
    """Shared plumbing; subclasses define encoding, the loss and the metrics."""

    kind = "task"
    padding_side = "right"
    main_metric = "loss"
    higher_is_better = False
    # ``deltatune train`` options this kind of task needs other values of than the run's own defaults
    training_defaults: Mapping[str, Any] = MappingProxyType({})

    def __init__(self, tokenizer: Any, max_length: int, on_long: str = "truncate") -> None:
        if on_long not in ("truncate", "skip", "error"):
            raise ValueError(f"on_long must be 'truncate', 'skip' or 'error', got {on_long!r}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.on_long = on_long
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def encode(self, records: Sequence[dict[str, Any]], source: str = "data") -> list[Example]:
        """Encode every record; a bad record raises a DataError naming ``source`` and the record."""
        examples: list[Example] = []
        for number, record in enumerate(records, start=1):
            example = self.encode_one(record, f"{source}: record {number}")
            if example is not None:
                example.record = number
                examples.append(example)
        if not examples:
            raise DataError(f"{source}: no usable records")
        return examples

    def encode_one(self, record: dict[str, Any], where: str) -> Example | None:
        raise NotImplementedError

    def _fit(self, ids: list[int], keep_end: int, where: str) -> list[int] | None:
        """Apply ``on_long`` to a too-long sequence; the last ``keep_end`` tokens are never cut."""
        if len(ids) <= self.max_length:
            return ids
        if self.on_long == "error":
            raise DataError(
                f"{where}: {len(ids)} tokens, longer than max_length={self.max_length}; "
                "pass --on-long truncate or skip, or raise --max-length"
            )
        if self.on_long == "skip" or keep_end >= self.max_length:
            return None
        cut = len(ids) - self.max_length
        head = len(ids) - keep_end
        return ids[: head - cut] + ids[head:] if head - cut > 0 else ids[-self.max_length :]

    def _pad(self, rows: list[list[int]], value: int, side: str | None = None) -> torch.Tensor:
        width = max(len(r) for r in rows)
        side = side or self.padding_side
        padded = [
            ([value] * (width - len(r)) + r) if side == "left" else (r + [value] * (width - len(r))) for r in rows
        ]
        return torch.tensor(padded, dtype=torch.long)

    def collate(self, examples: Sequence[Example]) -> dict[str, Any]:
        ids = [e.input_ids for e in examples]
        batch = {
            "input_ids": self._pad(ids, self.pad_id),
            "attention_mask": self._pad([[1] * len(r) for r in ids], 0),
        }
        batch["units"] = sum(e.units for e in examples)
        batch["tokens"] = sum(len(r) for r in ids)
        return batch

    def loss_sum(self, model: Any, batch: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def eval_sums(self, model: Any, batch: dict[str, Any]) -> dict[str, Any]:
        """Sums over the batch that :meth:`metrics` turns into metrics (they add across batches)."""
        return {"loss_sum": float(self.loss_sum(model, batch)), "units": batch["units"]}

    def metrics(self, sums: dict[str, Any]) -> dict[str, float]:
        loss = sums["loss_sum"] / max(sums["units"], 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


BATCH_ONLY = ("units", "tokens", "targets", "target_tokens", "lm_labels", "shared_prefix", "rest_ids", "rest_mask")


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if k not in BATCH_ONLY}


def _base_model(model: Any) -> Any:
    inner = unwrap_parallel(model)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def _cache_off(model: Any) -> bool:
    """No KV cache in training: gradient checkpointing (transformers turns it off) or compiled blocks."""
    base = _base_model(model)
    config = getattr(base, "config", None)
    checkpointing = getattr(base, "is_activation_checkpointing", None)  # transformers >= 5.x
    if checkpointing is None:
        checkpointing = getattr(base, "is_gradient_checkpointing", False)
    off = checkpointing or getattr(config, "use_cache", True) is False
    return bool(model.training and off)


def _prefix_can_be_shared(model: Any) -> bool:
    """True when a prompt prefix every row shares can run once and be cached: not under FSDP (its
    forward gathers shards per call). A prompt or prefix adapter in front is fine: its virtual tokens
    are the same for every row, so they go into the shared cache too, and the adapter knows that
    a call with a filled cache has them already (it only widens the mask and shifts positions)."""
    return not hasattr(model, "unshard")


class ClassificationMetrics:
    """Accuracy and macro-F1 from per-class counts (which add across batches and processes)."""

    @staticmethod
    def sums(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int) -> dict[str, Any]:
        confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
        for p, t in zip(predictions.tolist(), targets.tolist()):
            confusion[t, p] += 1
        return {"confusion": confusion}

    @staticmethod
    def metrics(confusion: torch.Tensor) -> dict[str, float]:
        total = int(confusion.sum())
        correct = int(confusion.diag().sum())
        f1s = []
        for c in range(confusion.shape[0]):
            tp = int(confusion[c, c])
            fp = int(confusion[:, c].sum()) - tp
            fn = int(confusion[c, :].sum()) - tp
            f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
        return {"accuracy": correct / max(total, 1), "macro_f1": sum(f1s) / len(f1s), "examples": total}


class LabelGeneration(Task):
    """Classification by a causal LM answering with a label word (see the module docstring)."""

    kind = "label-generation"
    padding_side = "left"
    main_metric = "accuracy"
    higher_is_better = True

    def __init__(
        self,
        tokenizer: Any,
        labels: LabelSpace,
        max_length: int = 256,
        on_long: str = "truncate",
        text_column: str = "text",
        label_column: str = "label",
        words: Sequence[str] | None = None,
        instruction: str | None = None,
        system: str | None = None,
    ) -> None:
        super().__init__(tokenizer, max_length, on_long)
        self.labels = labels
        self.text_column, self.label_column = text_column, label_column
        self.words = list(words) if words is not None else list(labels.names)
        numbers = all(w.strip().lstrip("-").isdigit() for w in self.words)
        self.instruction = instruction or (
            "Classify the text as "
            + " or ".join(w.replace("{", "{{").replace("}", "}}") for w in self.words)  # the text goes in {text}
            + (". Answer with the number only." if numbers else ". Answer with one word.")
            + "\n\nText: {text}"
        )
        self.system = system
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        self.answers, self.answer_ids = self._answer_tokens()
        self.shared_prefix = self._shared_prefix()
        self.head_loss = HeadLoss()

    def prompt(self, text: str) -> str:
        content = self.instruction.format(text=text.strip())
        if self.chat:
            system = [{"role": "system", "content": self.system}] if self.system else []
            return self.tokenizer.apply_chat_template(
                system + [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
            )
        return content + "\nAnswer:"

    def _answer_tokens(self) -> tuple[list[str], list[int]]:
        probe = self.prompt("A probe.")
        prompt_ids = self.tokenizer(probe, add_special_tokens=False)["input_ids"]
        for lead in ("", " ") if probe[-1:].isspace() else (" ", ""):
            firsts = []
            for word in self.words:
                full = self.tokenizer(probe + lead + word, add_special_tokens=False)["input_ids"]
                if full[: len(prompt_ids)] != prompt_ids or len(full) == len(prompt_ids):
                    break
                firsts.append(full[len(prompt_ids)])
            if len(firsts) == len(self.words) and len(set(firsts)) == len(firsts):
                return [lead + w for w in self.words], firsts
        raise DataError(
            f"the label words {self.words} do not start with distinct tokens under this tokenizer; "
            "rename the labels so that their first tokens differ"
        )

    def _shared_prefix(self) -> list[int]:
        """The tokens every prompt starts with (system turn, instruction): computed once per batch."""
        one, two = (self.tokenizer(self.prompt(t), add_special_tokens=False)["input_ids"] for t in ("Alpha", "Zulu"))
        common = 0
        while common < min(len(one), len(two)) and one[common] == two[common]:
            common += 1
        return one[: max(0, common - 1)]  # one token less: the text may merge with the last one

    def encode_one(self, record: dict[str, Any], where: str) -> Example | None:
        target = self.labels.index(record[self.label_column], where)
        ids = self.tokenizer(self.prompt(str(record[self.text_column])), add_special_tokens=False)["input_ids"]
        tail = len(self.tokenizer(self.prompt(""), add_special_tokens=False)["input_ids"]) // 2
        ids = self._fit(ids, keep_end=tail, where=where)
        return None if ids is None else Example(ids, target=target)

    def collate(self, examples: Sequence[Example]) -> dict[str, Any]:
        batch = super().collate(examples)
        batch["targets"] = torch.tensor([e.target for e in examples])
        batch["target_tokens"] = torch.tensor([self.answer_ids[e.target] for e in examples])
        p = len(self.shared_prefix)
        if p and all(e.input_ids[:p] == self.shared_prefix for e in examples):
            batch["shared_prefix"] = torch.tensor([self.shared_prefix])
            batch["rest_ids"] = self._pad([e.input_ids[p:] for e in examples], self.pad_id)
            batch["rest_mask"] = self._pad([[1] * (len(e.input_ids) - p) for e in examples], 0)
        return batch

    def _outputs(self, model: Any, batch: dict[str, Any]) -> torch.Tensor:
        """The model's outputs at each row's last position: logits, or hidden states while its head is bypassed."""
        if "shared_prefix" in batch and _prefix_can_be_shared(model) and not _cache_off(model):
            return self._outputs_with_shared_prefix(model, batch)
        return model(**model_inputs(batch), logits_to_keep=1).logits[:, -1]

    def _outputs_with_shared_prefix(self, model: Any, batch: dict[str, Any]) -> torch.Tensor:
        """Run the prompt prefix every example shares once, then each example's own tokens on its cache.

        Positions follow the attention mask (``p + cumsum(mask) - 1``), so a left-padded row computes
        what it would alone; gradients flow into the shared prefix's keys and values too.
        """
        prefix, rest, rest_mask = batch["shared_prefix"], batch["rest_ids"], batch["rest_mask"]
        p = prefix.shape[1]
        inner = getattr(model, "module", model)  # run the prefix outside DDP: one DDP forward per backward
        cache = inner(input_ids=prefix, use_cache=True, logits_to_keep=1)
        cache = cache["cache"] if "cache" in cache else cache["past_key_values"]
        cache.batch_repeat_interleave(rest.shape[0])
        ones = torch.ones(rest.shape[0], p, dtype=rest_mask.dtype, device=rest_mask.device)
        mask = torch.cat([ones, rest_mask], dim=1)
        positions = (p + rest_mask.cumsum(-1) - 1).clamp(min=p)
        name = cache_argument(_base_model(model))
        out = model(
            input_ids=rest,
            attention_mask=mask,
            position_ids=positions,
            logits_to_keep=1,
            use_cache=True,
            **{name: cache},
        )
        return out.logits[:, -1]

    def _logits(self, model: Any, batch: dict[str, Any]) -> torch.Tensor:
        return self.head_loss.logits_of(model, lambda: self._outputs(model, batch))

    def loss_sum(self, model: Any, batch: dict[str, Any]) -> torch.Tensor:
        return self.head_loss.loss_sum_of(model, lambda: self._outputs(model, batch), batch["target_tokens"])

    def eval_sums(self, model: Any, batch: dict[str, Any]) -> dict[str, Any]:
        logits = self._logits(model, batch)
        predictions = logits[:, self.answer_ids].argmax(-1)
        sums = ClassificationMetrics.sums(predictions, batch["targets"], len(self.answer_ids))
        sums["loss_sum"] = float(F.cross_entropy(logits, batch["target_tokens"], reduction="sum"))
        sums["units"] = batch["units"]
        sums["exact"] = int((logits.argmax(-1) == batch["target_tokens"]).sum())
        return sums

    def metrics(self, sums: dict[str, Any]) -> dict[str, float]:
        out = ClassificationMetrics.metrics(sums["confusion"])
        out["exact_match"] = sums["exact"] / max(out["examples"], 1)
        out["loss"] = sums["loss_sum"] / max(sums["units"], 1)
        return out

    def predict(self, model: Any, batch: dict[str, Any]) -> list[int]:
        return self._logits(model, batch)[:, self.answer_ids].argmax(-1).tolist()


class CausalLM(Task):
    """Response-only loss for prompt/response pairs, or the whole text when there is no prompt."""

    kind = "causal-lm"
    padding_side = "left"

    def __init__(
        self,
        tokenizer: Any,
        max_length: int = 512,
        on_long: str = "truncate",
        prompt_column: str | None = "prompt",
        response_column: str = "response",
    ) -> None:
        super().__init__(tokenizer, max_length, on_long)
        self.prompt_column, self.response_column = prompt_column, response_column
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        self.head_loss = HeadLoss()

    def encode_one(self, record: dict[str, Any], where: str) -> Example | None:
        tok = self.tokenizer
        if "messages" in record:  # a conversation: the loss on every assistant turn (deltatune.conversations)
            ids, labels = conversations.encode(tok, record["messages"])
            return self._fitted(ids, labels, where)
        response = str(record[self.response_column])
        prompt = record.get(self.prompt_column) if self.prompt_column else None
        if prompt is None:
            ids = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            labels = list(ids)
            labels[0] = -100
        else:
            if self.chat:
                messages = [{"role": "user", "content": str(prompt)}]
                head = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            else:
                head = f"{prompt}\n"
            head_ids = tok(head, add_special_tokens=False)["input_ids"]
            end = tok.convert_tokens_to_ids("<|im_end|>") if self.chat else None
            body_ids = tok(response, add_special_tokens=False)["input_ids"] + [
                end if isinstance(end, int) and end != tok.unk_token_id else tok.eos_token_id
            ]
            ids = head_ids + body_ids
            labels = [-100] * len(head_ids) + body_ids
        return self._fitted(ids, labels, where)

    def _fitted(self, ids: list[int], labels: list[int], where: str) -> Example | None:
        if len(ids) > self.max_length:
            if self.on_long == "error":
                raise DataError(
                    f"{where}: {len(ids)} tokens, longer than max_length={self.max_length}; "
                    "pass --on-long truncate or skip, or raise --max-length"
                )
            if self.on_long == "skip":
                return None
            ids, labels = ids[-self.max_length :], labels[-self.max_length :]  # keep the response
        if all(t == -100 for t in labels[1:]):
            return None
        return Example(ids, labels=labels)

    def collate(self, examples: Sequence[Example]) -> dict[str, Any]:
        if examples[0].position_ids is not None:
            return self._collate_packed(examples)
        batch = super().collate(examples)
        batch["lm_labels"] = self._pad([e.labels for e in examples], -100)
        return batch

    def _collate_packed(self, examples: Sequence[Example]) -> dict[str, Any]:
        """Packed rows, padded on the right with a segment of their own; no attention mask, so that
        transformers attends within each example (see :mod:`deltatune.packing`), and no cache."""
        width = max(len(e.input_ids) for e in examples)
        positions = [e.position_ids + list(range(width - len(e.input_ids))) for e in examples]
        return {
            "input_ids": self._pad([e.input_ids for e in examples], self.pad_id, side="right"),
            "position_ids": torch.tensor(positions, dtype=torch.long),
            "use_cache": False,
            "lm_labels": self._pad([e.labels for e in examples], -100, side="right"),
            "units": sum(e.units for e in examples),
            "tokens": sum(len(e.input_ids) for e in examples),
        }

    @staticmethod
    def _labelled_window(model: Any, batch: dict[str, Any]) -> tuple[Any, torch.Tensor]:
        """The model's logits from the first labelled position on (a callable) and their targets:
        the head runs only where some row has a label (logits at t predict token t + 1)."""
        labels = batch["lm_labels"]
        labelled = (labels != -100).any(0).nonzero()
        first = int(labelled[0]) if len(labelled) else labels.shape[1] - 1
        keep = labels.shape[1] - first + 1
        inputs = {**model_inputs(batch), "logits_to_keep": keep}

        def outputs() -> torch.Tensor:
            out = model(**inputs).logits
            return out[:, -keep:-1] if keep > 1 else out[:, :0]

        return outputs, labels[:, labels.shape[1] - keep + 1 :]

    def loss_sum(self, model: Any, batch: dict[str, Any]) -> torch.Tensor:
        outputs, targets = self._labelled_window(model, batch)
        return self.head_loss.loss_sum_of(model, outputs, targets)

    def eval_sums(self, model: Any, batch: dict[str, Any]) -> dict[str, Any]:
        """Loss and token accuracy over the labelled (response, or assistant-turn) tokens."""
        outputs, targets = self._labelled_window(model, batch)
        total, hits = self.head_loss.loss_and_hits_of(model, outputs, targets)
        return {"loss_sum": float(total), "hits": int(hits), "units": batch["units"]}

    def metrics(self, sums: dict[str, Any]) -> dict[str, float]:
        out = super().metrics(sums)
        if "hits" in sums:
            out["token_accuracy"] = sums["hits"] / max(sums["units"], 1)
        return out


class SequenceClassification(Task):
    """A model with a classification head (``AutoModelForSequenceClassification``)."""

    kind = "seq-cls"
    main_metric = "accuracy"
    higher_is_better = True
    # The head starts from random: its first steps are spent learning where the classes lie, and at
    # 70 steps of 8 examples MiniLM's every method still predicted one class. 200 steps of 16 separate
    # them; 600 (9,600 reviews, about an epoch of Rotten Tomatoes, 2 to 4 minutes for MiniLM on two
    # CPU cores) lift every method further (MiniLM test accuracy, 200 -> 600 steps: full 0.814 ->
    # 0.839, LoRA 0.810 -> 0.844, prompt tuning 0.636 -> 0.698), the input methods most.
    training_defaults = MappingProxyType({"batch_size": 16, "max_steps": 600})

    def __init__(
        self,
        tokenizer: Any,
        labels: LabelSpace,
        max_length: int = 256,
        on_long: str = "truncate",
        text_column: str = "text",
        label_column: str = "label",
    ) -> None:
        super().__init__(tokenizer, max_length, on_long)
        self.labels = labels
        self.text_column, self.label_column = text_column, label_column

    def encode_one(self, record: dict[str, Any], where: str) -> Example | None:
        target = self.labels.index(record[self.label_column], where)
        ids = self.tokenizer(str(record[self.text_column]))["input_ids"]
        if len(ids) > self.max_length:
            fitted = self._fit(ids[:-1], keep_end=0, where=where)
            if fitted is None:
                return None
            ids = fitted[: self.max_length - 1] + ids[-1:]
        return Example(ids, target=target)

    def collate(self, examples: Sequence[Example]) -> dict[str, Any]:
        batch = super().collate(examples)
        batch["targets"] = torch.tensor([e.target for e in examples])
        return batch

    def _logits(self, model: Any, batch: dict[str, Any]) -> torch.Tensor:
        return model(**model_inputs(batch)).logits.float()

    def loss_sum(self, model: Any, batch: dict[str, Any]) -> torch.Tensor:
        return F.cross_entropy(self._logits(model, batch), batch["targets"], reduction="sum")

    def eval_sums(self, model: Any, batch: dict[str, Any]) -> dict[str, Any]:
        logits = self._logits(model, batch)
        sums = ClassificationMetrics.sums(logits.argmax(-1), batch["targets"], len(self.labels.names))
        sums["loss_sum"] = float(F.cross_entropy(logits, batch["targets"], reduction="sum"))
        sums["units"] = batch["units"]
        return sums

    def metrics(self, sums: dict[str, Any]) -> dict[str, float]:
        out = ClassificationMetrics.metrics(sums["confusion"])
        out["loss"] = sums["loss_sum"] / max(sums["units"], 1)
        return out

    def predict(self, model: Any, batch: dict[str, Any]) -> list[int]:
        return self._logits(model, batch).argmax(-1).tolist()


class Seq2Seq(Task):
    """Encoder-decoder: source text in, target text out; loss over target tokens."""

    kind = "seq2seq"

    def __init__(
        self,
        tokenizer: Any,
        max_length: int = 512,
        on_long: str = "truncate",
        prompt_column: str = "prompt",
        response_column: str = "response",
    ) -> None:
        super().__init__(tokenizer, max_length, on_long)
        self.prompt_column, self.response_column = prompt_column, response_column
        self.head_loss = HeadLoss()

    def encode_one(self, record: dict[str, Any], where: str) -> Example | None:
        source = self.tokenizer(str(record[self.prompt_column]))["input_ids"]
        target = self.tokenizer(str(record[self.response_column]))["input_ids"]
        source = self._fit(source, keep_end=1, where=where)
        if source is None:
            return None
        return Example(source, decoder_labels=target[: self.max_length])

    def collate(self, examples: Sequence[Example]) -> dict[str, Any]:
        batch = super().collate(examples)
        batch["labels"] = self._pad([e.decoder_labels for e in examples], -100, side="right")
        return batch

    def loss_sum(self, model: Any, batch: dict[str, Any]) -> torch.Tensor:
        inputs = model_inputs(batch)
        labels = inputs.pop("labels")
        base = unwrap_parallel(model)
        base = base.get_base_model() if hasattr(base, "get_base_model") else base
        if hasattr(base, "prepare_decoder_input_ids_from_labels"):  # no second loss inside the model
            inputs["decoder_input_ids"] = base.prepare_decoder_input_ids_from_labels(labels=labels)
            return self.head_loss.loss_sum(model, inputs, labels)
        logits = model(**inputs, labels=labels).logits  # the model shifts the labels itself
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), reduction="sum")


TASKS: dict[str, type[Task]] = {t.kind: t for t in (LabelGeneration, CausalLM, SequenceClassification, Seq2Seq)}


def task_training_defaults(kind: str) -> Mapping[str, Any]:
    """The ``train`` options that the task ``kind`` sets for every method (a method's own per-task value wins)."""
    return TASKS[kind].training_defaults
