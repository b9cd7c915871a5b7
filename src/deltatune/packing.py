r"""Packing: several causal-LM examples per row, each attending only to itself.

Short examples padded to a batch's longest waste most of a step on padding. Packing puts
examples end to end in rows of at most ``max_length`` tokens (first fit, in data order), with
position ids that restart at 0 for each example and no attention mask: transformers then reads the
restarts as example boundaries and attends block-diagonally, causal within each example and never
across (``masking_utils.find_packed_sequence_indices``). Each example's first label is dropped, so
the last token of one example is never trained to predict the first of the next; every other
label is the example's own, so the summed loss of a packed row equals the summed losses of its
examples run alone. :func:`check_packed_loss` verifies exactly that on the first packed row for
the model at hand, since a model whose attention ignores position-id restarts would silently mix
examples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from deltatune.tasks import Example, Task

IGNORE_INDEX = -100


class PackingError(ValueError):
    """Packing cannot keep the examples apart for this model or method."""


def pack_examples(examples: Sequence[Example], max_length: int) -> list[Example]:
    """``examples`` packed into rows of at most ``max_length`` tokens (first fit, order kept within a row)."""
    rows: list[list[Example]] = []
    room: list[int] = []
    for example in examples:
        size = len(example.input_ids)
        for index, free in enumerate(room):
            if size <= free:
                rows[index].append(example)
                room[index] -= size
                break
        else:
            rows.append([example])
            room.append(max_length - size)
    return [_joined(row) for row in rows]


def _joined(row: list[Example]) -> Example:
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for example in row:
        ids += example.input_ids
        labels += [IGNORE_INDEX] + list(example.labels or [])[1:]
        positions += list(range(len(example.input_ids)))
    return Example(ids, labels=labels, position_ids=positions, packed=len(row))


def unpacked(row: Example) -> list[Example]:
    """The examples of a packed row, apart again (each first label dropped, as packing did)."""
    starts = [i for i, position in enumerate(row.position_ids or [0]) if position == 0] + [len(row.input_ids)]
    return [
        Example(row.input_ids[a:b], labels=list((row.labels or [])[a:b])) for a, b in zip(starts, starts[1:]) if b > a
    ]


def check_packed_loss(task: Task, model: Any, packed: Example) -> None:
    """The packed row's summed loss equals its examples' run alone, or a :class:`PackingError` says so."""
    originals = unpacked(packed)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in task.collate([packed]).items()}
            together = float(task.loss_sum(model, batch))
            alone = 0.0
            for example in originals:
                one = {k: v.to(device) if torch.is_tensor(v) else v for k, v in task.collate([example]).items()}
                alone += float(task.loss_sum(model, one))
    finally:
        model.train(training)
    if abs(together - alone) > 1e-3 * max(1.0, abs(alone)):
        raise PackingError(
            f"--packing: a packed row's loss is {together:.4f} where its {len(originals)} examples alone give "
            f"{alone:.4f}: this model's attention does not keep packed examples apart (it ignores the position-id "
            "restarts transformers reads as boundaries); train without --packing"
        )
