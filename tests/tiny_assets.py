"""Tiny model folders and data files for CLI and trainer tests, built once per test session.

``build_assets(root)`` writes into ``root`` (idempotent: a second call in the same session returns
the same folders):

* ``tinyllama/`` -- a randomly initialised ``LlamaForCausalLM`` (hidden 32, 2 layers, 4 heads,
  2 KV heads, tied embeddings) with the embedded SmolLM2 tokenizer (chat template included);
* ``tinybert/`` -- a randomly initialised ``BertForSequenceClassification`` with the MiniLM tokenizer;
* ``cls.csv`` (64 rows text,label with labels pos/neg), ``cls_eval.csv`` (16 rows),
  ``chat.jsonl`` (32 prompt/response pairs).
"""

from __future__ import annotations

import csv
import functools
import json
import os
import random
import socket
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

GOOD = ["great", "lovely", "superb", "wonderful", "charming", "brilliant", "moving", "delightful"]
BAD = ["awful", "boring", "dull", "clumsy", "tedious", "bland", "messy", "painful"]
THINGS = ["film", "story", "cast", "script", "ending", "score", "plot", "pace"]


@dataclass(frozen=True)
class Assets:
    root: Path
    llama: Path
    bert: Path
    cls_csv: Path
    cls_eval_csv: Path
    chat_jsonl: Path


def classification_rows(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        word = rng.choice(GOOD if label == "pos" else BAD)
        extra = " ".join(rng.choice(THINGS) for _ in range(rng.randint(0, 6)))
        rows.append({"text": f"The {rng.choice(THINGS)} was {word}. {extra}".strip(), "label": label})
    return rows


def chat_rows(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        thing = rng.choice(THINGS)
        rows.append(
            {
                "prompt": f"What did you think of the {thing}?",
                "response": f"The {thing} was {rng.choice(GOOD + BAD)}" + " indeed" * rng.randint(0, 4) + ".",
            }
        )
    return rows


def write_csv(path: Path, rows: list[dict[str, str]], fields: list[str] | None = None) -> Path:
    fields = fields or list(rows[0])
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def make_tiny_llama(folder: Path, hidden_size: int = 32) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from deltatune.models import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_path("smollm2-135m-instruct")))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def make_tiny_bert(folder: Path) -> None:
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from deltatune.models import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_path("minilm-l6")))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=512,
        num_labels=2,
        pad_token_id=tokenizer.pad_token_id,
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@functools.cache
def build_assets(root: Path) -> Assets:
    root.mkdir(parents=True, exist_ok=True)
    assets = Assets(
        root=root,
        llama=root / "tinyllama",
        bert=root / "tinybert",
        cls_csv=root / "cls.csv",
        cls_eval_csv=root / "cls_eval.csv",
        chat_jsonl=root / "chat.jsonl",
    )
    if not (assets.llama / "config.json").exists():
        make_tiny_llama(assets.llama)
    if not (assets.bert / "config.json").exists():
        make_tiny_bert(assets.bert)
    write_csv(assets.cls_csv, classification_rows(64, seed=1))
    write_csv(assets.cls_eval_csv, classification_rows(16, seed=2))
    write_jsonl(assets.chat_jsonl, chat_rows(32, seed=3))
    return assets


def session_assets(tmp_path_factory) -> Assets:
    """The session's assets, in the session's base temp folder (shared by every test module).

    ``DELTATUNE_TEST_ASSETS`` names a folder built earlier instead (``benchmarks/device_check.sh
    --prepare``): a machine without the embedded models' tokenizers can then run these tests.
    """
    prebuilt = os.environ.get("DELTATUNE_TEST_ASSETS")
    return build_assets(Path(prebuilt).resolve() if prebuilt else tmp_path_factory.getbasetemp() / "tiny_assets")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1", PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def deltatune_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "deltatune", *args]


def run_deltatune(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        deltatune_command(*args), capture_output=True, text=True, env=subprocess_env(), timeout=timeout, cwd=ROOT
    )


def train_args(assets: Assets, output: Path, *extra: str, model: Path | None = None) -> list[str]:
    """``deltatune train`` arguments for a quick LoRA run on the tiny llama; ``extra`` adds or overrides."""
    return [
        "train",
        "--model",
        str(model or assets.llama),
        "--data",
        str(assets.cls_csv),
        "--lr",
        "1e-2",
        "--no-forgetting",
        "--val-split",  # most tests train on the whole file; the held-out default has its own tests
        "0",
        "--save-every",
        "0",
        "--rank",
        "4",
        "--seed",
        "3",
        "--output",
        str(output),
        *extra,
    ]


def invoke(*args: object) -> Any:
    """Run the CLI in this process (click's CliRunner); returns click's Result.

    COLUMNS is wide so that rich does not wrap long paths in the output that tests search.
    """
    from click.testing import CliRunner

    from deltatune.cli import main

    return CliRunner(env={"COLUMNS": "1000"}).invoke(main, [str(a) for a in args])


def check_ok(result: Any) -> Any:
    """Assert a CliRunner result succeeded, showing the output and any traceback if not."""
    if result.exit_code != 0:
        detail = "".join(traceback.format_exception(*result.exc_info)) if result.exc_info else ""
        raise AssertionError(f"exit code {result.exit_code}\n{result.output}\n{detail}")
    return result


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=lambda m, key=key: f"{key}: {m}")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def assert_label_loss_as_alone(model: Any, task: Any, examples: list[Any], loss: torch.Tensor) -> None:
    """``loss`` (a batch's label-generation loss) and its gradients equal those of each example run
    alone (no padding, no shared prefix)."""
    import torch.nn.functional as F

    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(loss, list(params.values()))
    alone = sum(
        F.cross_entropy(
            model(input_ids=torch.tensor([e.input_ids])).logits[0, -1], torch.tensor(task.answer_ids[e.target])
        )
        for e in examples
    )
    alone_grads = torch.autograd.grad(alone, list(params.values()))
    torch.testing.assert_close(loss.detach(), alone.detach(), atol=1e-4, rtol=1e-5)
    for name, got, want in zip(params, grads, alone_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=name)


def eval_json(result: Any) -> dict[str, Any]:
    """The JSON a successful ``deltatune eval`` printed."""
    check_ok(result)
    return json.loads(result.stdout[result.stdout.index("{") :])
