r"""Language-model loss without the full logits tensor: the LM head and cross-entropy fused, in chunks.

For hidden states :math:`h_i` at the labelled positions, a head :math:`W` (vocabulary x hidden)
and targets :math:`t_i`, the summed loss and its gradients are

.. math::
    L = \sum_i \big(\operatorname{logsumexp}(W h_i) - (W h_i)_{t_i}\big), \qquad
    \frac{\partial L}{\partial h_i} = W^\top (p_i - e_{t_i}), \qquad
    \frac{\partial L}{\partial W} = \sum_i (p_i - e_{t_i})\, h_i^\top,

with :math:`p_i = \operatorname{softmax}(W h_i)`. :class:`FusedLinearCrossEntropy` computes them
a chunk of rows at a time in the forward pass, so at most ``chunk x vocabulary`` logits exist at
once (in float32) and nothing vocabulary-sized is kept for backward; the backward only scales the
stored gradients. That is the same matrix work as logits + ``F.cross_entropy`` + their backward, with
a fraction of the memory (49k vocabulary x 1,024 tokens: 200 MB of logits, as much again for
their gradient and the log-softmax).

:class:`HeadLoss` gets the hidden states by running the model with its output-embedding module
passing its input through (the head is applied here instead), and only at the positions that have a
label. It falls back to the model's own logits where that would not be the same computation: a
head that is not a plain ``nn.Linear`` (LoRA or modules_to_save on the head), a model that changes
the logits after the head (soft-capping, logit scales), or a sharded (FSDP) model; and it checks
each model's first batch against the plain path.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.model_info import unwrap_parallel

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 24  # logits per chunk: 16M floats, 64 MiB in float32
# Config fields of models that transform the logits after the head (Gemma 2/3, Cohere, Granite, ...).
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_logits_scale")


def _chunked(  # noqa: ANN202
    hidden,
    weight,
    bias,
    targets,
    chunk_rows,
    want_hidden,
    want_weight,
    want_bias,
    logits_out=None,  # noqa: ANN001
):
    """The summed loss and, as asked, its gradients: ``chunk_rows`` rows of logits at a time.

    Rows whose target is ``IGNORE_INDEX`` add nothing to the loss and get no gradient; with
    ``logits_out`` (N, V) every row's logits are also written there, in the head's dtype.
    """
    total = hidden.new_zeros((), dtype=torch.float32)
    grad_hidden = torch.empty_like(hidden) if want_hidden else None
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
    grad_bias = torch.zeros_like(bias, dtype=torch.float32) if want_bias else None
    for start in range(0, hidden.shape[0], chunk_rows):
        h = hidden[start : start + chunk_rows]
        t = targets[start : start + chunk_rows]
        raw = F.linear(h, weight, bias)
        if logits_out is not None:
            logits_out[start : start + chunk_rows] = raw
        logits = raw.float()
        lse = torch.logsumexp(logits, dim=-1)
        ignored = t == IGNORE_INDEX
        some_ignored = bool(ignored.any())
        picked = t.masked_fill(ignored, 0) if some_ignored else t
        per_row = lse - logits.gather(1, picked[:, None]).squeeze(1)
        total += per_row.masked_fill_(ignored, 0.0).sum() if some_ignored else per_row.sum()
        if not (want_hidden or want_weight or want_bias):
            continue
        probs = logits.sub_(lse[:, None]).exp_()  # softmax, in the logits' memory
        labelled = (~ignored).nonzero().squeeze(1) if some_ignored else torch.arange(len(t), device=t.device)
        probs[labelled, t[labelled]] -= 1.0  # d loss / d logits
        if some_ignored:
            probs.masked_fill_(ignored[:, None], 0.0)
        if want_hidden:
            grad_hidden[start : start + chunk_rows] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)
        if want_weight:
            grad_weight.addmm_(probs.T, h.float())
        if want_bias:
            grad_bias += probs.sum(0)
    return total, grad_hidden, grad_weight, grad_bias


class FusedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T + bias`` against ``targets``; gradients made in forward."""

    @staticmethod
    def forward(ctx: Any, hidden, weight, bias, targets, chunk_rows):  # noqa: ANN001, ANN205
        wants = ctx.needs_input_grad[:2] + (bias is not None and ctx.needs_input_grad[2],)
        total, *grads = _chunked(hidden, weight, bias, targets, chunk_rows, *wants)
        ctx.save_for_backward(*grads)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx: Any, grad_total):  # noqa: ANN001, ANN205
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        scale = grad_total.float()
        return (
            grad_hidden * scale.to(grad_hidden.dtype) if grad_hidden is not None else None,
            (grad_weight * scale).to(weight_dtype) if grad_weight is not None else None,
            (grad_bias * scale).to(bias_dtype) if grad_bias is not None else None,
            None,
            None,
        )


class LinearCrossEntropyWithLogits(torch.autograd.Function):
    """:class:`FusedLinearCrossEntropy` that also returns every row's logits, themselves differentiable.

    The loss's gradients are made in forward as there; a gradient that reaches the returned logits
    (a caller's own term on them) flows back through the head in backward. Logits nobody uses get
    no gradient and cost nothing in backward.
    """

    @staticmethod
    def forward(ctx: Any, hidden, weight, bias, targets, chunk_rows):  # noqa: ANN001, ANN205
        wants = ctx.needs_input_grad[:2] + (bias is not None and ctx.needs_input_grad[2],)
        logits = hidden.new_empty((hidden.shape[0], weight.shape[0]), dtype=torch.result_type(hidden, weight))
        total, *grads = _chunked(hidden, weight, bias, targets, chunk_rows, *wants, logits_out=logits)
        ctx.save_for_backward(hidden, weight, *grads)
        ctx.wants = wants
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.set_materialize_grads(False)
        return total, logits

    @staticmethod
    def backward(ctx: Any, grad_total, grad_logits):  # noqa: ANN001, ANN205
        hidden, weight, grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        want_hidden, want_weight, want_bias = ctx.wants
        out_hidden = out_weight = out_bias = None
        if grad_total is not None:
            scale = grad_total.float()
            out_hidden = grad_hidden * scale.to(grad_hidden.dtype) if want_hidden else None
            out_weight = grad_weight * scale if want_weight else None
            out_bias = grad_bias * scale if want_bias else None
        if grad_logits is not None:
            g = grad_logits.to(weight.dtype)
            if want_hidden:
                through = (g @ weight).to(hidden.dtype)
                out_hidden = through if out_hidden is None else out_hidden.add_(through)
            if want_weight:
                through = g.T.float() @ hidden.float()
                out_weight = through if out_weight is None else out_weight.add_(through)
            if want_bias:
                through = g.float().sum(0)
                out_bias = through if out_bias is None else out_bias.add_(through)
        return (
            out_hidden,
            out_weight.to(weight.dtype) if out_weight is not None else None,
            out_bias.to(ctx.bias_dtype) if out_bias is not None else None,
            None,
            None,
        )


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Summed cross-entropy of ``hidden (N, H) @ weight.T (V, H) + bias`` against ``targets (N,)``.

    Equal to ``F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction="sum")``
    and to its gradients within float rounding, with at most ``chunk_rows x V`` logits at a time
    (default: 16M logits per chunk). Rows whose target is -100 are left out.
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"expected hidden (N, H) and targets (N,), got {tuple(hidden.shape)} and {tuple(targets.shape)}"
        )
    rows = chunk_rows or max(1, CHUNK_ELEMENTS // weight.shape[0])
    tensors = (hidden, weight) if bias is None else (hidden, weight, bias)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return _chunked(hidden, weight, bias, targets, rows, False, False, False)[0]  # evaluation: no gradients
    return FusedLinearCrossEntropy.apply(hidden, weight, bias, targets, rows)


@contextlib.contextmanager
def head_passes_hidden_states(head: nn.Module) -> Iterator[None]:
    """Within the block the module returns its input: a model's ``logits`` are then its last hidden states."""
    head.forward = _identity  # an instance attribute shadows the class's forward, and is deleted after
    try:
        yield
    finally:
        del head.forward


def _identity(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return x


def plain_head(model: Any) -> nn.Linear | None:
    """The model's output head when the fused loss computes exactly what the model would; else None."""
    inner = unwrap_parallel(model)
    if hasattr(model, "unshard") or hasattr(inner, "unshard"):  # FSDP: the head's weight is sharded
        return None
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    config = getattr(base, "config", None)
    for field in _LOGIT_TRANSFORMS:
        value = getattr(config, field, None)
        if value not in (None, 1, 1.0, False):
            return None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if type(head) is not nn.Linear or head._forward_hooks or head._forward_pre_hooks:
        return None
    return head


class HeadLoss:
    """The LM head applied here instead of inside the model, where that is exact; else the model's own logits.

    ``outputs`` arguments are callables that run the model and return its logits at the positions
    that count (any leading shape, vocabulary last); while the head passes its input through, the
    same callable returns the hidden states there. Whether that gives the model's own numbers is
    checked once per model (per head module: a model and views of it with adapters disabled share
    one), on its first batch, in eval mode without gradients (no dropout, no random numbers drawn):
    a model that changes the logits after the head in a way :func:`plain_head` does not know gets
    the plain path and a warning.
    """

    def __init__(self) -> None:
        self.verdicts: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()

    def __getstate__(self) -> dict:
        # The verdicts are a cache keyed by live modules: a copy (pickle, torch.save) checks again.
        return {**self.__dict__, "verdicts": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.verdicts = weakref.WeakKeyDictionary()

    def loss_sum(
        self,
        model: Any,
        inputs: dict[str, Any],
        targets: torch.Tensor,
        window: Callable[[torch.Tensor], torch.Tensor] = lambda out: out,
    ) -> torch.Tensor:
        """``window(model(**inputs).logits)`` scored against ``targets`` (-100: no label), summed."""
        return self.loss_sum_of(model, lambda: window(model(**inputs).logits), targets)

    def loss_sum_of(self, model: Any, outputs: Callable[[], torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy of ``outputs()`` against ``targets`` (same shape less the vocabulary)."""
        head = plain_head(model)
        if head is None:
            return self._plain(outputs, targets)
        plain_fn = lambda: self._plain(outputs, targets)  # noqa: E731
        ours_fn = lambda: self._fused(head, outputs, targets)  # noqa: E731
        return ours_fn() if self._agrees(model, head, plain_fn, ours_fn) else plain_fn()

    def loss_and_hits_of(
        self, model: Any, outputs: Callable[[], torch.Tensor], targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed cross-entropy and the number of labelled positions whose most likely token is the target.

        For evaluation (no gradients): through the fused head in chunks where it applies, so no
        vocabulary-sized tensor for the whole batch exists; else from the model's own logits.
        """
        with torch.no_grad():
            head = plain_head(model)
            if head is not None and self._agrees(
                model, head, lambda: self._plain(outputs, targets), lambda: self._fused(head, outputs, targets)
            ):
                with head_passes_hidden_states(head):
                    hidden = outputs()
                labelled = targets != IGNORE_INDEX
                rows, wanted = hidden[labelled], targets[labelled]
                step = max(1, CHUNK_ELEMENTS // head.weight.shape[0])
                total = rows.new_zeros((), dtype=torch.float32)
                hits = torch.zeros((), dtype=torch.long, device=rows.device)
                for start in range(0, rows.shape[0], step):
                    logits = F.linear(rows[start : start + step], head.weight, head.bias).float()
                    t = wanted[start : start + step]
                    total += F.cross_entropy(logits, t, reduction="sum")
                    hits += (logits.argmax(-1) == t).sum()
                return total, hits
            logits = outputs().float()
            flat, wanted = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
            labelled = wanted != IGNORE_INDEX
            total = F.cross_entropy(flat, wanted, reduction="sum")
            return total, (flat.argmax(-1)[labelled] == wanted[labelled]).sum()

    def logits_of(self, model: Any, outputs: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``outputs()`` in float32, with the head run here on a contiguous block of hidden states.

        transformers models apply their head to a strided slice (``logits_to_keep``); on such a
        3-d view ``nn.Linear`` falls back to a batched product over copies of the head's weight,
        several times slower than one matrix product for a large vocabulary.
        """
        head = plain_head(model)
        plain_fn = lambda: outputs().float()  # noqa: E731
        if head is None:
            return plain_fn()
        ours_fn = lambda: self._head_logits(head, outputs)  # noqa: E731
        if head not in self.verdicts and not model.training and not torch.is_grad_enabled():
            ok, plain, ours = self._check(model, head, plain_fn, ours_fn)
            return ours if ok else plain  # evaluation already: the check's own results are the answer
        return ours_fn() if self._agrees(model, head, plain_fn, ours_fn) else plain_fn()

    @staticmethod
    def _plain(outputs: Callable[[], torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        logits = outputs()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="sum")

    @staticmethod
    def _fused(head: nn.Linear, outputs: Callable[[], torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        with head_passes_hidden_states(head):
            hidden = outputs()
        labelled = targets != IGNORE_INDEX
        return fused_linear_cross_entropy(hidden[labelled], head.weight, targets[labelled], bias=head.bias)

    @staticmethod
    def _head_logits(head: nn.Linear, outputs: Callable[[], torch.Tensor]) -> torch.Tensor:
        with head_passes_hidden_states(head):
            hidden = outputs()
        rows = hidden.reshape(-1, hidden.shape[-1]).contiguous()
        return F.linear(rows, head.weight, head.bias).float().reshape(*hidden.shape[:-1], -1)

    def _agrees(self, model: Any, head: nn.Linear, plain_fn: Callable, ours_fn: Callable) -> bool:
        """Once per head: the head run here gives what the model's own logits give."""
        if head not in self.verdicts:
            self._check(model, head, plain_fn, ours_fn)
        return self.verdicts[head]

    def _check(
        self, model: Any, head: nn.Linear, plain_fn: Callable[[], torch.Tensor], ours_fn: Callable[[], torch.Tensor]
    ) -> tuple[bool, torch.Tensor, torch.Tensor | None]:
        """Both results in eval mode without gradients; records (and returns) whether they agree."""
        training = model.training
        model.eval()
        try:
            with torch.no_grad():
                plain = plain_fn()
                try:
                    ours = ours_fn().float()
                    found = f"{float(ours.flatten()[0]):.4f}"
                except (RuntimeError, IndexError, ValueError) as error:  # e.g. an op shaped for the vocabulary
                    ours, found = None, f"an error: {error}"
        finally:
            model.train(training)
        ok = ours is not None and ours.shape == plain.shape
        ok = ok and bool(torch.isclose(ours, plain, rtol=1e-2, atol=1e-3).all())
        if not ok:
            warnings.warn(
                f"the LM head applied outside the model gave {found} where the model's own logits give "
                f"{float(plain.flatten()[0]):.4f}: the model changes its logits after the head; using the full logits",
                stacklevel=4,
            )
        self.verdicts[head] = ok
        return ok, plain, ours


class CausalLMLoss:
    """A causal LM's ``forward(labels=...)`` with its loss made by the fused head, when gradients are on.

    transformers' causal-LM loss is the mean cross-entropy of ``logits[:, :-1]`` against
    ``labels[:, 1:]`` (-100: no label), or their sum over ``num_items_in_batch`` when the Trainer
    passes it (gradient accumulation). Computed from the full logits, it keeps them, their
    log-softmax and, in backward, two more tensors of that size (49k vocabulary x 512 tokens: 100 MB
    each). Here the model runs without labels and with its head passing the hidden states through;
    :class:`LinearCrossEntropyWithLogits` then makes the same loss, and the same logits for the
    output, in chunks.

    It applies only where that is the same computation: no ``shift_labels`` / ``ignore_index`` /
    ``logits_to_keep``, a plain head (:func:`plain_head`), a loss function and forward nobody has
    replaced on the instance, and, checked once per model on its first batch (eval mode, no gradients), the
    model's own loss and logits equal to these. Anything else runs the model's own forward.
    """

    def __init__(self) -> None:
        self.verdicts: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()

    def __getstate__(self) -> dict:
        # The verdicts are a cache keyed by live modules: a copy (pickle, torch.save) checks again.
        return {**self.__dict__, "verdicts": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.verdicts = weakref.WeakKeyDictionary()

    def __call__(
        self, model: nn.Module, kwargs: dict[str, Any], run: Callable[[dict[str, Any]], Any] | None = None
    ) -> Any:
        """``run(kwargs)`` (default: ``model(**kwargs)``), through the fused head where it applies.

        ``run`` is the whole forward from these arguments (a wrapper's input preparation included):
        the first batch's check calls it more than once, and stateful arguments such as a prefix's
        key/value cache must be made afresh each time.
        """
        run = run or (lambda given: model(**given))
        head = self._head(model, kwargs) if torch.is_grad_enabled() else None
        if head is None or not self._agrees(model, head, kwargs, run):
            return run(kwargs)
        out = self._fused(head, kwargs, run)
        return out if out is not None else run(kwargs)

    @staticmethod
    def _fused(head: nn.Linear, kwargs: dict[str, Any], run: Callable[[dict[str, Any]], Any]) -> Any:
        with head_passes_hidden_states(head):
            out = run({k: v for k, v in kwargs.items() if k != "labels"})
        hidden = out.logits
        labels = kwargs["labels"].to(hidden.device)
        if hidden.dim() != 3 or hidden.shape[0] != labels.shape[0] or hidden.shape[1] < labels.shape[1]:
            return None
        if hidden.shape[1] > labels.shape[1]:  # virtual tokens in front (prompt tuning): no labels there
            labels = F.pad(labels, (hidden.shape[1] - labels.shape[1], 0), value=IGNORE_INDEX)
        targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1)
        rows = max(1, CHUNK_ELEMENTS // head.weight.shape[0])
        flat = hidden.reshape(-1, hidden.shape[-1])
        if torch.is_grad_enabled():
            total, logits = LinearCrossEntropyWithLogits.apply(flat, head.weight, head.bias, targets, rows)
        else:
            logits = flat.new_empty((flat.shape[0], head.weight.shape[0]), dtype=torch.result_type(flat, head.weight))
            total = _chunked(flat, head.weight, head.bias, targets, rows, False, False, False, logits_out=logits)[0]
        items = kwargs.get("num_items_in_batch")
        if items is None:
            loss = total / (targets != IGNORE_INDEX).sum()
        else:
            loss = total / (items.to(total.device) if torch.is_tensor(items) else items)
        fields = {k: v for k, v in out.items() if k not in ("loss", "logits")}
        return type(out)(loss=loss, logits=logits.reshape(*hidden.shape[:-1], -1), **fields)

    def _agrees(
        self, model: nn.Module, head: nn.Linear, kwargs: dict[str, Any], run: Callable[[dict[str, Any]], Any]
    ) -> bool:
        if head in self.verdicts:
            return self.verdicts[head]
        training = model.training
        model.eval()
        try:
            with torch.no_grad():
                plain = run(kwargs)
                try:
                    ours = self._fused(head, kwargs, run)
                except (RuntimeError, ValueError, TypeError, IndexError):  # e.g. an encoder-decoder needs labels
                    ours = None
        finally:
            model.train(training)
        plain_loss, plain_logits = getattr(plain, "loss", None), getattr(plain, "logits", None)
        ok = ours is not None and plain_loss is not None and plain_logits is not None
        ok = ok and ours.logits.shape == plain_logits.shape
        ok = ok and bool(torch.isclose(ours.loss.float(), plain_loss.float(), rtol=1e-4, atol=1e-5))
        ok = ok and bool(torch.isclose(ours.logits.float(), plain_logits.float(), rtol=1e-2, atol=1e-3).all())
        self.verdicts[head] = ok
        return ok

    @staticmethod
    def _head(model: nn.Module, kwargs: dict[str, Any]) -> nn.Linear | None:
        labels = kwargs.get("labels")
        if not (torch.is_tensor(labels) and labels.dim() == 2 and labels.dtype == torch.long):
            return None
        if kwargs.get("shift_labels") is not None or kwargs.get("ignore_index", IGNORE_INDEX) != IGNORE_INDEX:
            return None
        if kwargs.get("logits_to_keep") not in (None, 0) or kwargs.get("return_dict") is False:
            return None
        config = getattr(model, "config", None)
        if config is None or getattr(config, "return_dict", True) is False or "_loss_function" in vars(model):
            return None
        if "forward" in vars(model):  # a forward patched onto the instance (TRL's fused head) may compute anything
            return None
        return plain_head(model)
