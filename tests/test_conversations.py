"""Conversational data: four formats onto one, the loss on every assistant turn and nothing else
(token by token, and against the mask transformers computes from a template's generation
markers), bad conversations named by file, row and reason, and the main job trained on them."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from deltatune import conversations as C
from deltatune.data import DataError
from tiny_assets import check_ok, eval_json, invoke, session_assets, train_args, write_jsonl

CHAT = [
    {"role": "system", "content": "You add numbers."},
    {"role": "user", "content": "What is 2 plus 2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And doubled?"},
    {"role": "assistant", "content": "Eight."},
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return session_assets(tmp_path_factory)


@pytest.fixture(scope="module")
def tokenizer(assets):
    return AutoTokenizer.from_pretrained(assets.llama)


def _learned(tokenizer, ids, labels) -> list[str]:
    return [tokenizer.decode([t]) for t, label in zip(ids, labels) if label != C.IGNORE_INDEX]


def test_loss_covers_every_assistant_turn_and_nothing_else(tokenizer):
    ids, labels = C.encode(tokenizer, CHAT)
    assert ids == tokenizer.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]
    assert all(label in (C.IGNORE_INDEX, token) for token, label in zip(ids, labels))
    assert "".join(_learned(tokenizer, ids, labels)) == "It is 4.<|im_end|>Eight.<|im_end|>"
    # token by token: every label run is exactly one assistant turn's tokens
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != C.IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    assert runs == ["It is 4.<|im_end|>", "Eight.<|im_end|>"]


def test_mask_equals_transformers_assistant_mask_from_generation_markers(tokenizer):
    marked = (
        "{% for message in messages %}"
        "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
        "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
        "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    tokenizer = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = marked
    reference = tokenizer.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, labels = C.encode(tokenizer, CHAT)
    assert ids == reference["input_ids"]
    assert [label != C.IGNORE_INDEX for label in labels] == [bool(m) for m in reference["assistant_masks"]]


def test_a_tokenizer_without_a_template_gets_chatml(tokenizer):
    bare = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    bare.chat_template = None
    ids, labels = C.encode(bare, CHAT[1:3])
    assert bare.decode(ids) == (
        "<|im_start|>user\nWhat is 2 plus 2?<|im_end|>\n<|im_start|>assistant\nIt is 4.<|im_end|>\n"
    )
    assert "".join(_learned(bare, ids, labels)) == "It is 4.<|im_end|>"


class _Slow:
    """The fast tokenizer seen as a slow one (no offsets): the piecewise path."""

    is_fast = False

    def __init__(self, inner) -> None:
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, text, **kwargs):
        kwargs.pop("return_offsets_mapping", None)
        return self.inner(text, **kwargs)


def test_a_slow_tokenizer_labels_the_same_turns(tokenizer):
    ids, labels = C.encode(_Slow(tokenizer), CHAT)
    assert "".join(_learned(tokenizer, ids, labels)) == "It is 4.<|im_end|>Eight.<|im_end|>"
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(CHAT, tokenize=False)


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"messages": CHAT}, CHAT),
        ({"messages": json.dumps(CHAT)}, CHAT),  # a CSV cell holding the list as JSON
        ({"prompt": "Hi?", "completion": "Hello."}, [("user", "Hi?"), ("assistant", "Hello.")]),
        (
            {"prompt": [{"role": "user", "content": "Hi?"}], "completion": [{"role": "assistant", "content": "Yo."}]},
            [("user", "Hi?"), ("assistant", "Yo.")],
        ),
        (
            {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi?"},
                               {"from": "gpt", "value": "Hello."}]},
            [("system", "Be brief."), ("user", "Hi?"), ("assistant", "Hello.")],
        ),
        ({"instruction": "Add 2 and 2.", "input": "", "output": "4"}, [("user", "Add 2 and 2."), ("assistant", "4")]),
        (
            {"instruction": "Translate.", "input": "bonjour", "output": "hello"},
            [("user", "Translate.\n\nbonjour"), ("assistant", "hello")],
        ),
    ],
)  # fmt: skip
def test_every_format_maps_onto_messages(record, expected):
    expected = [m if isinstance(m, dict) else {"role": m[0], "content": m[1]} for m in expected]
    assert C.as_conversations([record], "data.jsonl") == [{"messages": expected}]


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"messages": "hello"}, "must be a non-empty list of messages"),
        ({"messages": []}, "must be a non-empty list of messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "role 'robot'"),
        ({"messages": [{"role": "user", "content": "Hi?"}]}, "no assistant message"),
        ({"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "  "}]}, "empty"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}, "only the first"),
        ({"messages": "[not json"}, "not valid JSON"),
        ({"conversations": [{"from": "alien", "value": "x"}]}, "from 'alien'"),
        ({"prompt": "Hi?", "completion": 3}, "text or a list of messages"),
    ],
)
def test_a_bad_conversation_names_file_row_and_reason(record, reason):
    good = {"messages": CHAT}
    rows = [good, record if "messages" in record else {"messages": CHAT[:2]}]
    if "messages" not in record:  # a format of its own: it is the first row, and alone
        rows = [record]
    with pytest.raises(DataError, match=rf"chat\.jsonl: row {len(rows)}: .*{reason}.*--on-bad-row skip"):
        C.as_conversations(rows, "chat.jsonl")
    if len(rows) == 2:
        assert C.as_conversations(rows, "chat.jsonl", on_bad_row="skip") == [{"messages": CHAT}]


def test_a_row_without_the_files_format_columns_is_a_bad_row():
    rows = [{"messages": CHAT}, {"conversations": [{"from": "human", "value": "Hi"}]}]
    with pytest.raises(DataError, match=r"row 2: no 'messages' in this record \(the file's format: messages\)"):
        C.as_conversations(rows, "chat.jsonl")


@pytest.mark.parametrize("fmt", ["messages", "sharegpt", "alpaca", "prompt-completion"])
def test_train_and_eval_on_conversations(assets, tmp_path, fmt):
    def row(i: int) -> dict:
        question, answer = f"What is {i} plus {i}?", f"It is {2 * i}."
        return {
            "messages": {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]},
            "sharegpt": {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]},
            "alpaca": {"instruction": question, "input": "", "output": answer},
            "prompt-completion": {"prompt": question, "completion": answer},
        }[fmt]

    data = write_jsonl(tmp_path / "chat.jsonl", [row(i) for i in range(24)])
    run = tmp_path / "run"
    check_ok(invoke(*train_args(assets, run, "--data", data, "--eval-data", data, "--max-steps", "3")))
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    validation = [m for m in metrics if m.get("split") == "validation"]
    assert validation and 0.0 <= validation[-1]["token_accuracy"] <= 1.0
    result = eval_json(check_ok(invoke("eval", "--adapter", run, "--data", data)))
    assert {"loss", "perplexity", "token_accuracy"} <= set(result)


def test_a_bad_conversation_in_the_main_job_stops_with_its_row_or_is_skipped(assets, tmp_path):
    rows = [{"messages": CHAT} for _ in range(12)]
    rows[4] = {"messages": [{"role": "user", "content": "Hi?"}]}
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    result = invoke(*train_args(assets, tmp_path / "a", "--data", data, "--max-steps", "1", "--batch-size", "2"))
    assert result.exit_code != 0 and "chat.jsonl: row 5: no assistant message" in result.output
    assert "Traceback" not in result.output
    skip = ("--max-steps", "1", "--batch-size", "2", "--on-bad-row", "skip")
    check_ok(invoke(*train_args(assets, tmp_path / "b", "--data", data, *skip)))


def test_datasets_folders_and_arrow_files_are_data(assets, tmp_path):
    datasets = pytest.importorskip("datasets")
    from deltatune.data import load_dataset, load_records

    rows = [{"messages": CHAT}] * 12
    single = datasets.Dataset.from_list(rows)
    single.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": single, "validation": single.select(range(3))}).save_to_disk(str(tmp_path / "dd"))
    assert load_records(tmp_path / "one") == rows
    arrow = next((tmp_path / "one").glob("*.arrow"))
    assert load_records(arrow) == rows
    assert load_dataset(tmp_path / "dd", split="validation") == rows[:3]
    assert load_dataset(single) == rows  # the Python API takes a Dataset as it is
    assert load_dataset(datasets.DatasetDict({"train": single}), split="train") == rows
    with pytest.raises(DataError, match="a DatasetDict folder with splits train, validation; pass one of them"):
        load_records(tmp_path / "dd")
    run = tmp_path / "run"
    check_ok(invoke(*train_args(assets, run, "--data", tmp_path / "dd", "--max-steps", "2", "--batch-size", "2")))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["validation_data"] == {"source": f"{tmp_path / 'dd'} (validation)"}
