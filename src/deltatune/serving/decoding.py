"""One row's decoding: the next token from its logits, and the text it has produced so far.

The next token at temperature 0 is ``argmax`` (greedy, what ``deltatune generate`` does by
default). Above 0 it is drawn from ``softmax(logits / T)`` restricted to the nucleus: the smallest
set of likeliest tokens whose probabilities sum to at least ``top_p`` (Holtzman et al. 2020). Each
row draws from its own ``torch.Generator``, seeded from the request's ``seed`` when given, so a
seeded request gives the same reply whatever else shares its batch.

The text grows by decoding only the last few ids each time: the ids since the text was last
complete, behind a few ids of context, minus the context's own text. Decoding token by token would
break a multi-byte character that two tokens share, and lose the space a tokenizer drops at the
start of a decode; decoding every generated id each time costs time quadratic in the reply's length.
The text is sent in pieces: a piece that ends in an incomplete character waits for the next token,
and with stop strings the last ``len(longest stop) - 1`` characters wait too, since they may be the
start of a stop string that the next token completes. A stop string ends the reply and is not part
of it.
"""

from __future__ import annotations

import dataclasses

import torch

REPLACEMENT_CHARACTER = "\ufffd"


@dataclasses.dataclass(frozen=True)
class Sampling:
    """A request's decoding options (OpenAI's names)."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def generator_for(sampling: Sampling, choice: int, device: torch.device) -> torch.Generator | None:
    """The random source of one choice: seeded (``seed + choice``) when the request gives a seed."""
    if sampling.greedy:
        return None
    generator = torch.Generator(device=device)
    if sampling.seed is None:
        generator.seed()
    else:
        generator.manual_seed(sampling.seed + choice)
    return generator


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """The next token of one row from its last logits (a vector over the vocabulary)."""
    if sampling.greedy:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the likelier tokens
        sorted_probs[before >= sampling.top_p] = 0.0  # the likeliest token always stays
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


class IncrementalText:
    """``tokenizer.decode(ids, skip_special_tokens=True)`` of a growing list of ids, decoding a few ids per token.

    ``complete`` is the text of ``ids[:mark]``, where that text last ended on a whole character. A new
    token decodes ``ids[start:]`` with ``start`` a few ids before ``mark``: that window's text, less
    the text of ``ids[start:mark]``, is what the ids since ``mark`` add (the context keeps a leading
    space that a decode would drop, and a character split across ids whole).
    """

    context = 4

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.complete = ""
        self.mark = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        """Append ``token``; the text of every id so far."""
        self.ids.append(token)
        start = max(0, self.mark - self.context)
        before = self._decode(self.ids[start : self.mark])
        window = self._decode(self.ids[start:])
        if window.startswith(before):
            text = self.complete + window[len(before) :]
        else:  # a tokenizer whose text is not local: decode it all
            text = self._decode(self.ids)
        if not text.endswith(REPLACEMENT_CHARACTER):
            self.complete, self.mark = text, len(self.ids)
        return text


class TextStream:
    """The reply text of one row, released piece by piece; ``stop`` strings end it."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.decoded = IncrementalText(tokenizer)
        self.stop = tuple(s for s in stop if s)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""
        self.sent = 0
        self.stopped = False

    def add(self, token: int) -> str:
        """Add a generated token; returns the text that can be sent now (maybe empty)."""
        self.text = self.decoded.add(token)
        if self.stop:
            start = max(0, self.sent - self.hold)
            found = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if found:
                self.text = self.text[: min(found)]
                self.stopped = True
                return self.flush()
        ready = len(self.text) - self.hold
        if self.text.endswith(REPLACEMENT_CHARACTER):
            ready = min(ready, len(self.text.rstrip(REPLACEMENT_CHARACTER)))
        if ready <= self.sent:
            return ""
        piece = self.text[self.sent : ready]
        self.sent = ready
        return piece

    def flush(self) -> str:
        """Everything not sent yet: at the end of the reply."""
        piece = self.text[self.sent :]
        self.sent = len(self.text)
        return piece
