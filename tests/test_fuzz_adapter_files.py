"""Hostile adapter folders: mutated ``adapter_config.json`` and ``adapter_model.safetensors``.

Every load of a mutated folder must end in one of two ways: deltatune's own error (``ConfigError``,
``CheckpointError``, ``TargetModuleError``) whose message names the file or folder, or a loaded
adapter that holds exactly the tensors the file holds and runs a forward pass. Nothing else: no raw
exception from torch or safetensors, no hang, and no allocation beyond what the files justify (the
loader's tensor creations are counted; the largest ratio to the files' size is tallied).
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given
from safetensors.torch import load_file, save_file

import deltatune as dt
from deltatune.allocation import AllocationBudget
from deltatune.checkpoint import adapter_state_dict
from fuzz_helpers import fuzz_settings, tally, write_report

from conftest import perturb_trainable, tiny_inputs, tiny_model

pytestmark = pytest.mark.fuzz
OUR_ERRORS = (dt.ConfigError, dt.CheckpointError, dt.TargetModuleError)
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"

# Method configs whose files are mutated (on the tiny Llama); sizes a crafted config may blow up.
SOURCES = {
    "lora": lambda: dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    "ia3": lambda: dt.IA3Config(),
    "prompt": lambda: dt.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
    "p-tuning": lambda: dt.PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=16, task_type="CAUSAL_LM"),
    "vera": lambda: dt.VeraConfig(r=4, target_modules=["q_proj", "v_proj"], save_projection=False),
    "bottleneck": lambda: dt.BottleneckConfig(placement="pfeiffer", reduction_factor=4, init="lora"),
    "oft": lambda: dt.OFTConfig(oft_block_size=8, target_modules=["q_proj"]),
}
SIZE_FIELDS = {
    "lora": ["r"],
    "ia3": [],
    "prompt": ["num_virtual_tokens", "token_dim"],
    "p-tuning": ["num_virtual_tokens", "encoder_hidden_size", "token_dim"],
    "vera": ["r"],
    "bottleneck": ["reduction_factor"],
    "oft": ["r", "oft_block_size"],
}
# Fields that only scale (no tensor is built from them): a crafted value must still load faithfully.
SCALE_FIELDS = {"lora": ["lora_alpha"], "p-tuning": ["encoder_num_layers"]}
HUGE = [2**31, 2**40, 10**12, 2**62]


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    write_report()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """One saved adapter folder per source method."""
    folders = {}
    for name, make in SOURCES.items():
        model = dt.get_peft_model(tiny_model("llama"), make())
        perturb_trainable(model)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        folders[name] = folder
    return folders


def copy_folder(source: Path, target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        (target / item.name).write_bytes(item.read_bytes())
    return target


def load_outcome(folder: Path, category: str) -> str:
    """Load ``folder`` onto a fresh tiny Llama and check the outcome is one of the two allowed."""
    files = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    meter = AllocationBudget(1 << 62, "the fuzz test's meter")
    base = tiny_model("llama")
    try:
        with meter:
            model = dt.PeftModel.from_pretrained(base, folder)
    except OUR_ERRORS as err:
        message = str(err)
        named = str(folder) in message
        # the loader's backstop for failures nothing checked first: clear, but a gap in validation
        unforeseen = "could not be built from this config" in message
        tally(category, bad=not named or unforeseen, allocated_per_file_byte=meter.used / max(files, 1))
        assert named, f"the error does not name the folder or file: {message}"
        assert not unforeseen, f"validation let this through to the layers: {message}"
        return "refused"
    except Exception as err:  # noqa: BLE001 - anything else is what this test exists to catch
        tally(category, bad=True)
        raise AssertionError(f"raw {type(err).__name__} from a mutated adapter: {err}") from err
    tally(category, accepted=True, allocated_per_file_byte=meter.used / max(files, 1))
    ours = adapter_state_dict(model.base_model.model, "default")
    if model.prompt_encoder:
        ours = {**ours, **{k: v for k, v in model.prompt_encoder["default"].adapter_state_dict().items()}}
    if (folder / WEIGHTS).is_file():
        held = load_file(str(folder / WEIGHTS))
        for key, tensor in held.items():
            if key in ours:
                assert torch.equal(ours[key].to(tensor.dtype), tensor), f"{key} differs from the file"
    with torch.no_grad():
        logits = model(**tiny_inputs("llama")).logits
    assert logits.shape[-1] > 0
    return "loaded"


# -- the safetensors file ---------------------------------------------------------------------------
def split_file(data: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def join_file(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
DTYPES = ["F32", "F16", "BF16", "F64", "I32", "I64", "I8", "U8", "BOOL", "F8_E4M3", "C64", "XYZ", 3, None]


@st.composite
def weights_mutation(draw):
    kind = draw(
        st.sampled_from(
            [
                "truncate",
                "bitflip",
                "shape",
                "offsets",
                "dtype",
                "header_length",
                "header_field",
                "nonfinite",
                "drop_key",
                "extra_key",
                "rename_key",
                "reshape_tensor",
                "empty",
            ]
        )
    )
    return kind, draw(st.randoms(use_true_random=False)), draw(JSONISH)


def mutate_weights(data: bytes, folder: Path, mutation) -> bytes:
    kind, rng, junk = mutation
    header, body = split_file(data)
    keys = sorted(k for k in header if k != "__metadata__")
    key = rng.choice(keys)
    if kind == "truncate":
        return data[: rng.randrange(len(data))]
    if kind == "bitflip":
        out = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            at = rng.randrange(len(out))
            out[at] ^= 1 << rng.randrange(8)
        return bytes(out)
    if kind == "empty":
        return b""
    if kind == "header_length":
        return struct.pack("<Q", rng.choice([0, 7, len(data), 2**40, 2**64 - 1, rng.randrange(2**64)])) + data[8:]
    entry = header[key]
    if kind == "shape":
        entry["shape"] = rng.choice([[h] for h in HUGE] + [[-1], [2**32, 2**32], [], [0], junk])
    elif kind == "offsets":
        end = len(body)
        entry["data_offsets"] = rng.choice([[0, 2**62], [-4, 4], [end, end + 64], [8, 0], [0, end + 1], junk])
    elif kind == "dtype":
        entry["dtype"] = rng.choice(DTYPES)
    elif kind == "header_field":
        header[rng.choice([key, "__metadata__"])] = junk
    else:
        tensors = load_file_bytes(data, folder)
        if kind == "nonfinite":
            flat = tensors[key].view(-1)
            flat[rng.randrange(flat.numel())] = rng.choice([math.nan, math.inf, -math.inf])
        elif kind == "drop_key":
            del tensors[key]
        elif kind == "extra_key":
            name = rng.choice(["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight", "stray", key + "_extra"])
            tensors[name] = torch.zeros(2, 3)
        elif kind == "rename_key":
            tensors[key.replace("layers.0", "layers.7").replace("weight", "bias") + "x"] = tensors.pop(key)
        elif kind == "reshape_tensor":
            tensors[key] = torch.zeros(*[d + rng.randint(1, 3) for d in tensors[key].shape] or [2])
        save_file(tensors, str(folder / ".scratch"))
        return (folder / ".scratch").read_bytes()
    return join_file(header, body)


def load_file_bytes(data: bytes, folder: Path) -> dict[str, torch.Tensor]:
    scratch = folder / ".scratch"
    scratch.write_bytes(data)
    return load_file(str(scratch))


@given(source=st.sampled_from(sorted(SOURCES)), mutation=weights_mutation())
@fuzz_settings(120)
def test_a_mutated_weights_file_is_refused_by_name_or_loaded_faithfully(saved, tmp_path_factory, source, mutation):
    folder = copy_folder(saved[source], tmp_path_factory.mktemp("mutated"))
    (folder / WEIGHTS).write_bytes(mutate_weights((saved[source] / WEIGHTS).read_bytes(), folder, mutation))
    (folder / ".scratch").unlink(missing_ok=True)
    load_outcome(folder, f"weights file: {mutation[0]}")


# -- the config file --------------------------------------------------------------------------------
@st.composite
def config_mutation(draw):
    kind = draw(st.sampled_from(["truncate", "field", "size", "peft_type", "not_an_object", "bytes", "drop"]))
    return kind, draw(st.randoms(use_true_random=False)), draw(JSONISH)


def mutate_config(text: str, source: str, mutation) -> bytes:
    kind, rng, junk = mutation
    data = json.loads(text)
    if kind == "truncate":
        return text.encode()[: rng.randrange(len(text))]
    if kind == "bytes":
        raw = bytearray(text.encode())
        raw[rng.randrange(len(raw))] = rng.choice([0x00, 0xFF, 0xC3, 0x80])
        return bytes(raw)
    if kind == "not_an_object":
        return json.dumps(junk if not isinstance(junk, dict) else [junk]).encode()
    if kind == "field":
        data[rng.choice(sorted(data) + ["r", "target_modules", "layers_to_transform", "modules_to_save"])] = junk
    elif kind == "size" and SIZE_FIELDS[source]:
        data[rng.choice(SIZE_FIELDS[source] + SCALE_FIELDS.get(source, []))] = rng.choice(
            HUGE + [-1, 0, 10**6, 1e308, -(2**63)]
        )
    elif kind == "peft_type":
        data["peft_type"] = rng.choice(["LORA", "IA3", "PROMPT_TUNING", "VERA", "OFT", "NOPE", "", 5, None])
    elif kind == "drop":
        data.pop(rng.choice(sorted(data)))
    return json.dumps(data, allow_nan=True).encode()


@given(source=st.sampled_from(sorted(SOURCES)), mutation=config_mutation())
@fuzz_settings(120)
def test_a_mutated_config_is_refused_by_name_or_loaded_faithfully(saved, tmp_path_factory, source, mutation):
    folder = copy_folder(saved[source], tmp_path_factory.mktemp("mutated"))
    text = (saved[source] / CONFIG).read_text()
    (folder / CONFIG).write_bytes(mutate_config(text, source, mutation))
    load_outcome(folder, f"config file: {mutation[0]}")


# -- crafted sizes, every source method: the budget holds ------------------------------------------
@pytest.mark.parametrize("source", sorted(s for s in SOURCES if SIZE_FIELDS[s]))
@pytest.mark.parametrize("huge", [2**31, 10**12])
def test_a_config_that_asks_for_huge_tensors_is_refused_before_allocating(saved, tmp_path, source, huge):
    for field in SIZE_FIELDS[source]:
        folder = copy_folder(saved[source], tmp_path / field)
        data = json.loads((folder / CONFIG).read_text())
        data[field] = huge
        (folder / CONFIG).write_text(json.dumps(data))
        files = sum(p.stat().st_size for p in folder.iterdir())
        meter, base = AllocationBudget(1 << 62, "meter"), tiny_model("llama")
        with meter, pytest.raises(OUR_ERRORS) as caught:
            dt.PeftModel.from_pretrained(base, folder)
        assert str(folder) in str(caught.value)
        # at most the budget: 16x the files plus 1 MiB (the tiny model's floor), never the request
        assert meter.used <= 16 * files + (1 << 20), (field, meter.used)
        tally("crafted huge sizes", allocated_per_file_byte=meter.used / files)


@pytest.mark.parametrize("source", sorted(s for s in SOURCES if SIZE_FIELDS[s]))
@pytest.mark.parametrize("value", [-1, 0])
def test_a_size_that_is_not_positive_is_refused_naming_the_field(saved, tmp_path, source, value):
    for field in SIZE_FIELDS[source]:
        folder = copy_folder(saved[source], tmp_path / field)
        data = json.loads((folder / CONFIG).read_text())
        if data.get(field) == value:  # OFT saves r=0 (its size is the block size)
            continue
        data[field] = value
        (folder / CONFIG).write_text(json.dumps(data))
        with pytest.raises(dt.ConfigError) as caught:
            dt.PeftModel.from_pretrained(tiny_model("llama"), folder)
        assert str(folder) in str(caught.value) and field in str(caught.value), str(caught.value)
        assert "could not be built" not in str(caught.value)


# -- legitimate adapters the checks must not refuse ---------------------------------------------------
def test_a_trained_batchnorm_copy_with_its_integer_step_count_reloads(tmp_path):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bn, self.head = torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.bn(self.fc(x)))

    torch.manual_seed(0)
    model = dt.get_peft_model(Net(), dt.LoraConfig(r=2, target_modules=["fc"], modules_to_save=["bn"]))
    model.train()(torch.randn(4, 8))  # the copy's running statistics and step count move
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    loaded = dt.PeftModel.from_pretrained(Net(), tmp_path)
    x = torch.randn(3, 8)
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x))


@pytest.mark.parametrize(
    "config",
    [
        lambda: dt.PromptEncoderConfig(
            task_type="SEQ_CLS", num_virtual_tokens=20, encoder_reparameterization_type="LSTM"
        ),
        lambda: dt.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4, prefix_projection=True),
    ],
    ids=["p-tuning-lstm", "prefix-projection"],
)
def test_an_input_method_whose_encoder_is_not_saved_loads_within_the_budget(tmp_path, config):
    from transformers import BertConfig, BertForSequenceClassification

    def bert():
        torch.manual_seed(0)
        return BertForSequenceClassification(
            BertConfig(vocab_size=99, hidden_size=256, num_hidden_layers=12, num_attention_heads=4,
                       intermediate_size=1024, num_labels=2)
        ).eval()  # fmt: skip

    model = dt.get_peft_model(bert(), config())
    model.save_pretrained(tmp_path)  # the file holds the encoder's output, not the encoder
    dt.PeftModel.from_pretrained(bert(), tmp_path)


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda: torch.randint(10, (4096, 4096)), "(4096, 4096)"),
        (lambda: torch.randint(2, 10, (4096, 4096)), "(4096, 4096)"),
        (lambda: torch.randperm(1 << 24), "(16777216,)"),
        (lambda: torch.zeros(4096, 4096), "(4096, 4096)"),
        (lambda: torch.ones(2).new_zeros((4096, 4096)), "(4096, 4096)"),
    ],
)
def test_the_budget_names_the_shape_that_was_asked_for(make, shape):
    from deltatune.allocation import AllocationBudgetExceeded

    with pytest.raises(AllocationBudgetExceeded, match=re.escape(f"shape {shape}")):
        with AllocationBudget(1 << 20, "the test's tensors"):
            make()
