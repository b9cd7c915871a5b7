"""Conversations: chat records in the formats people keep them in, as tokens with a loss mask.

Four formats map onto one, a list of ``{"role", "content"}`` messages (roles ``system``, ``user``,
``assistant``; a system message only first), found from the first record's columns:

* ``messages``: that list itself (TRL, the OpenAI fine-tuning API, LLaMA-Factory, axolotl);
* ``prompt`` / ``completion``: TRL's prompt-completion records, plain strings (a user turn and an
  assistant turn) or lists of messages;
* ``conversations``: ShareGPT's ``[{"from": "human" | "gpt" | "system", "value": ...}]``;
* ``instruction`` / ``input`` / ``output``: Alpaca's (``input`` optional, appended to the
  instruction after a blank line).

:func:`encode` renders a conversation with the tokenizer's chat template (ChatML,
:data:`DEFAULT_CHAT_TEMPLATE`, for a tokenizer without one) and labels the tokens of every
assistant turn, its end-of-turn marker included, and nothing else.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from deltatune.data import BAD_ROW_HINT, DataError

logger = logging.getLogger("deltatune")

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
# ChatML, the format of SmolLM2, Qwen and many others, for a tokenizer that has no template of its own.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def conversation_format(record: dict[str, Any]) -> str | None:
    """The conversation format of a record's columns, or None for other data."""
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "prompt-completion"
    return None


class BadConversation(ValueError):
    """What is wrong with one record (the caller adds where it is)."""


def _parsed(value: Any, column: str) -> Any:
    if isinstance(value, str) and value.lstrip()[:1] == "[":  # a CSV cell holding JSON
        try:
            return json.loads(value)
        except json.JSONDecodeError as err:
            raise BadConversation(f"column {column!r} holds text that is not valid JSON: {err}") from None
    return value


def _checked(messages: Any, column: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise BadConversation(f"column {column!r} must be a non-empty list of messages, got {type(messages).__name__}")
    out = []
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            kind = type(message).__name__
            raise BadConversation(f"message {number} is a {kind}, not an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise BadConversation(f"message {number} has role {role!r}; roles are {', '.join(ROLES)}")
        if role == "system" and number != 1:
            raise BadConversation(f"message {number} is a system message; only the first message may be one")
        if not isinstance(content, str) or not content.strip():
            raise BadConversation(f"message {number} ({role}) has empty or non-text content")
        out.append({"role": role, "content": content})
    if out[0]["role"] == "assistant":
        raise BadConversation("message 1 is an assistant message; a conversation opens with a user or system message")
    if not any(m["role"] == "assistant" for m in out):
        raise BadConversation("no assistant message: nothing to learn from this conversation")
    return out


def _as_turns(value: Any, role: str, column: str) -> list[dict[str, Any]]:
    value = _parsed(value, column)
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return value
    raise BadConversation(f"column {column!r} must be text or a list of messages, got {type(value).__name__}")


_COLUMNS = {
    "messages": ("messages",),
    "prompt-completion": ("prompt", "completion"),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
}


def to_messages(record: dict[str, Any], kind: str) -> list[dict[str, str]]:
    """The record as a checked list of messages; :class:`BadConversation` says what is wrong."""
    missing = [column for column in _COLUMNS[kind] if record.get(column) is None]
    if missing:
        raise BadConversation(f"no {', '.join(repr(c) for c in missing)} in this record (the file's format: {kind})")
    if kind == "messages":
        return _checked(_parsed(record["messages"], "messages"), "messages")
    if kind == "prompt-completion":
        prompt = _as_turns(record["prompt"], "user", "prompt")
        return _checked(prompt + _as_turns(record["completion"], "assistant", "completion"), "prompt/completion")
    if kind == "sharegpt":
        turns = _parsed(record["conversations"], "conversations")
        if not isinstance(turns, list):
            raise BadConversation(f"column 'conversations' must be a list of turns, got {type(turns).__name__}")
        messages = []
        for number, turn in enumerate(turns, start=1):
            speaker = turn.get("from") if isinstance(turn, dict) else None
            if speaker not in SHAREGPT_ROLES:
                raise BadConversation(
                    f"turn {number} is from {speaker!r}; ShareGPT speakers are {', '.join(SHAREGPT_ROLES)}"
                )
            messages.append({"role": SHAREGPT_ROLES[speaker], "content": turn.get("value")})
        return _checked(messages, "conversations")
    if kind == "alpaca":
        instruction, extra = record.get("instruction"), record.get("input")
        if not isinstance(instruction, str) or not instruction.strip():
            raise BadConversation("empty or non-text 'instruction'")
        user = f"{instruction}\n\n{extra}" if isinstance(extra, str) and extra.strip() else instruction
        answer = {"role": "assistant", "content": record["output"]}
        return _checked([{"role": "user", "content": user}, answer], "output")
    raise AssertionError(kind)


def as_conversations(records: Sequence[dict[str, Any]], source: str, on_bad_row: str = "error") -> list[dict[str, Any]]:
    """``records`` as ``{"messages": [...]}`` when they are conversations, else unchanged.

    A bad conversation raises a DataError naming ``source``, the 1-based row and the reason, or with
    ``on_bad_row="skip"`` is left out (and counted in a warning).
    """
    if not records:
        return list(records)
    kind = conversation_format(records[0])
    if kind is None:
        return list(records)
    out, skipped = [], 0
    for row, record in enumerate(records, start=1):
        try:
            out.append({"messages": to_messages(record, kind)})
        except BadConversation as err:
            if on_bad_row == "skip":
                skipped += 1
                continue
            raise DataError(f"{source}: row {row}: {err}; {BAD_ROW_HINT}") from None
    if skipped:
        logger.warning("%s: skipped %d of %d bad conversations", source, skipped, len(records))
    if not out:
        raise DataError(f"{source}: every conversation was skipped as bad")
    return out


def chat_template(tokenizer: Any) -> str:
    """The tokenizer's chat template, or :data:`DEFAULT_CHAT_TEMPLATE` (ChatML) when it has none."""
    return getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=chat_template(tokenizer), tokenize=False, add_generation_prompt=add_generation_prompt
    )


def assistant_spans(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns (end marker included).

    A turn's span starts where the template's generation prompt for it ends and stops at the end
    of the text that turn adds, less trailing whitespace (the newline after ChatML's ``<|im_end|>``
    belongs to the layout, not to the answer).
    """
    text = _render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head = _render(tokenizer, messages[:index], add_generation_prompt=True)
        upto = _render(tokenizer, messages[: index + 1], add_generation_prompt=False)
        if not (text.startswith(head) and text.startswith(upto) and upto.startswith(head)):
            raise DataError(
                "the chat template renders earlier turns differently once later ones follow, so assistant "
                "turns cannot be located in the text; train on one assistant turn per record"
            )
        spans.append((len(head), len(upto.rstrip())))
    return text, spans


def encode(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids of the conversation and labels: the ids on assistant turns, -100 elsewhere."""
    text, spans = assistant_spans(tokenizer, messages)
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = encoded["input_ids"]
        labels = [
            token if any(start <= begin < end for start, end in spans) else IGNORE_INDEX
            for token, (begin, _) in zip(ids, encoded["offset_mapping"])
        ]
        return ids, labels
    ids, labels, at = [], [], 0  # a slow tokenizer: the pieces one by one
    for start, end in spans:
        for piece, learn in ((text[at:start], False), (text[start:end], True)):
            piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"] if piece else []
            ids += piece_ids
            labels += piece_ids if learn else [IGNORE_INDEX] * len(piece_ids)
        at = end
    tail = tokenizer(text[at:], add_special_tokens=False)["input_ids"] if text[at:] else []
    return ids + tail, labels + [IGNORE_INDEX] * len(tail)
