"""One row's decoding: the next token from its logits, and the text it has produced so far.

The next token at temperature 0 is ``argmax`` (greedy, what ``deltatune generate`` does by
default). Above 0 it is drawn from ``softmax(logits / T)`` restricted to the nucleus: the smallest
set of likeliest tokens whose probabilities sum to at least ``top_p`` (Holtzman et al. 2020). Each
row draws from its own ``torch.Generator``, seeded from the request's ``seed`` when given, so a
seeded request gives the same reply whatever else shares its batch.

The text is decoded from all generated ids each time (a token can complete a multi-byte character
that the previous one started, so decoding token by token would emit broken characters) and sent
in pieces: a piece that ends in an incomplete character waits for the next token, and with stop
strings the last ``len(longest stop) - 1`` characters wait too, since they may be the start of a
stop string that the next token completes. A stop string ends the reply and is not part of it.
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


class TextStream:
    """The reply text of one row, released piece by piece; ``stop`` strings end it."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False

    def add(self, token: int) -> str:
        """Add a generated token; returns the text that can be sent now (maybe empty)."""
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
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
