"""Random configs of every registered method on the tiny Llama.

A valid one (drawn field by field from the values the method documents) builds an adapter whose
saved folder loads back into deltatune, and into HF PEFT where it has the method, with the same
outputs. An invalid one (a wrong type, a size below 1, a probability outside [0, 1), an unknown
choice) is refused at construction with a ``ConfigError`` that names the field.
"""

from __future__ import annotations

import dataclasses

import hypothesis.strategies as st
import peft
import pytest
import torch
from hypothesis import assume, given

import deltatune as dt
from deltatune.registry import _METHODS
from fuzz_helpers import fuzz_settings, tally, write_report

from conftest import perturb_trainable, tiny_inputs, tiny_model

pytestmark = pytest.mark.fuzz
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
targets = st.lists(st.sampled_from(LINEAR), min_size=1, max_size=4, unique=True) | st.just("all-linear")
layers = st.none() | st.sampled_from([[0], [1], [0, 1]])
probability = st.sampled_from([0.0, 0.1, 0.5])


@st.composite
def ia3_fields(draw):
    chosen = draw(st.lists(st.sampled_from(["k_proj", "v_proj", "up_proj", "down_proj"]), min_size=1, unique=True))
    feedforward = draw(st.lists(st.sampled_from([t for t in chosen if t in ("up_proj", "down_proj")] or ["none"])))
    return {
        "target_modules": chosen,
        "feedforward_modules": [f for f in feedforward if f != "none"],
        "init_ia3_weights": draw(st.booleans()),
        "layers_to_transform": draw(layers),
    }


@st.composite
def oft_fields(draw):
    by_blocks = draw(st.booleans())
    return {
        "r": 0 if by_blocks else draw(st.sampled_from([2, 4])),
        "oft_block_size": draw(st.sampled_from([4, 8, 16])) if by_blocks else 0,
        "target_modules": draw(targets),
        "coft": draw(st.booleans()),
        "eps": draw(st.sampled_from([1e-3, 0.5])),
        "use_cayley_neumann": draw(st.booleans()),
        "init_weights": draw(st.booleans()),
        "layers_to_transform": draw(layers),
    }


# peft_type -> (config class, strategy for its keyword arguments)
VALID = {
    "LORA": (
        dt.LoraConfig,
        st.fixed_dictionaries(
            {
                "r": st.integers(1, 6),
                "lora_alpha": st.integers(1, 16),
                "target_modules": targets,
                "use_rslora": st.booleans(),
                "use_dora": st.booleans(),
                "bias": st.sampled_from(["none", "all", "lora_only"]),
                "init_lora_weights": st.sampled_from([False, True, "gaussian"]),
                "layers_to_transform": layers,
                "lora_dropout": probability,
            }
        ),
    ),
    "IA3": (dt.IA3Config, ia3_fields()),
    "LOHA": (
        dt.LoHaConfig,
        st.fixed_dictionaries(
            {
                "r": st.integers(1, 4),
                "alpha": st.integers(1, 8),
                "target_modules": targets,
                "init_weights": st.just(False),
                "rank_dropout": probability,
                "module_dropout": probability,
                "layers_to_transform": layers,
            }
        ),
    ),
    "LOKR": (
        dt.LoKrConfig,
        st.fixed_dictionaries(
            {
                "r": st.integers(1, 4),
                "alpha": st.integers(1, 8),
                "target_modules": targets,
                "init_weights": st.just(False),
                "decompose_both": st.booleans(),
                "decompose_factor": st.sampled_from([-1, 2, 4]),
                "rank_dropout": probability,
            }
        ),
    ),
    "VERA": (
        dt.VeraConfig,
        st.fixed_dictionaries(
            {
                "r": st.integers(1, 6),
                "target_modules": st.lists(st.sampled_from(LINEAR), min_size=1, unique=True),
                "save_projection": st.booleans(),
                "projection_prng_key": st.integers(0, 2**31 - 1),
                "d_initial": st.sampled_from([0.1, 1.0]),
                "init_weights": st.just(False),
                "vera_dropout": probability,
            }
        ),
    ),
    "LN_TUNING": (dt.LNTuningConfig, st.fixed_dictionaries({})),
    "ADALORA": (
        dt.AdaLoraConfig,
        st.integers(2, 6).flatmap(
            lambda init_r: st.fixed_dictionaries(
                {
                    "init_r": st.just(init_r),
                    "target_r": st.integers(1, init_r),
                    "total_step": st.just(10),
                    "target_modules": targets,
                    "lora_alpha": st.integers(1, 16),
                }
            )
        ),
    ),
    "OFT": (dt.OFTConfig, oft_fields()),
    "BOFT": (
        dt.BOFTConfig,
        st.fixed_dictionaries(
            {
                "boft_block_size": st.sampled_from([2, 4, 8]),
                "boft_n_butterfly_factor": st.just(1),
                "target_modules": targets,
                "init_weights": st.just(False),
                "boft_dropout": probability,
            }
        ),
    ),
    "BOTTLENECK": (
        dt.BottleneckConfig,
        st.fixed_dictionaries(
            {
                "placement": st.sampled_from(["houlsby", "pfeiffer", "parallel"]),
                "reduction_factor": st.sampled_from([2, 4, 8]),
                "init": st.just("lora"),
                "layers_to_transform": layers,
            }
        ),
    ),
    "PROMPT_TUNING": (
        dt.PromptTuningConfig,
        st.fixed_dictionaries(
            {
                "num_virtual_tokens": st.integers(1, 5),
                "task_type": st.just("CAUSAL_LM"),
                "prompt_tuning_init": st.sampled_from(["RANDOM", "SAMPLE_VOCAB"]),
            }
        ),
    ),
    "P_TUNING": (
        dt.PromptEncoderConfig,
        st.fixed_dictionaries(
            {
                "num_virtual_tokens": st.integers(1, 5),
                "task_type": st.just("CAUSAL_LM"),
                "encoder_hidden_size": st.integers(4, 32),
                "encoder_reparameterization_type": st.sampled_from(["MLP", "LSTM"]),
            }
        ),
    ),
    "PREFIX_TUNING": (
        dt.PrefixTuningConfig,
        st.fixed_dictionaries(
            {
                "num_virtual_tokens": st.integers(1, 5),
                "task_type": st.just("CAUSAL_LM"),
                "prefix_projection": st.booleans(),
                "encoder_hidden_size": st.integers(4, 32),
            }
        ),
    ),
}
NOT_IN_PEFT = {"BOTTLENECK": "HF PEFT has no bottleneck adapters"}


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    write_report()


def test_every_registered_method_is_fuzzed():
    assert set(VALID) == {str(t) for t in _METHODS}


def outputs(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**tiny_inputs("llama")).logits


@pytest.mark.parametrize("peft_type", sorted(VALID))
def test_a_random_valid_config_round_trips_with_equal_outputs(peft_type, tmp_path_factory):
    config_class, fields = VALID[peft_type]

    @given(kwargs=fields)
    @fuzz_settings(6, share=0.02)
    def round_trip(kwargs):
        try:
            config = config_class(**kwargs)
        except dt.ConfigError:
            assume(False)  # a combination the method refuses by design (the test below checks refusals)
        model = dt.get_peft_model(tiny_model("llama"), config)
        perturb_trainable(model)
        expected = outputs(model)
        folder = tmp_path_factory.mktemp(peft_type.lower())
        model.save_pretrained(folder)
        ours = dt.PeftModel.from_pretrained(tiny_model("llama"), folder)
        torch.testing.assert_close(outputs(ours), expected, atol=1e-5, rtol=1e-5)
        if peft_type not in NOT_IN_PEFT:
            theirs = peft.PeftModel.from_pretrained(tiny_model("llama"), str(folder))
            torch.testing.assert_close(outputs(theirs), expected, atol=1e-5, rtol=1e-5)
        tally(f"valid config: {peft_type}", accepted=True)

    round_trip()


INVALID_VALUES = st.sampled_from([-1, 0, -0.5, 1.5, "8", [], {}, None, True, "nonsense", float("nan"), 10**30])


@pytest.mark.parametrize("peft_type", sorted(VALID))
def test_a_config_with_a_bad_field_is_refused_naming_it(peft_type):
    config_class, fields = VALID[peft_type]
    names = [f.name for f in dataclasses.fields(config_class) if f.name not in ("peft_type", "revision")]

    @given(kwargs=fields, field=st.sampled_from(names), value=INVALID_VALUES)
    @fuzz_settings(40, share=0.5)
    def refused(kwargs, field, value):
        try:
            config = config_class(**{**kwargs, field: value})
        except dt.ConfigError as err:
            assert field in str(err), f"{field}={value!r} refused without naming the field: {err}"
            tally(f"invalid config: {peft_type}")
            return
        except Exception as err:  # noqa: BLE001
            tally(f"invalid config: {peft_type}", bad=True)
            raise AssertionError(f"{field}={value!r}: raw {type(err).__name__}: {err}") from err
        # accepted: then it must be a value the field allows, so the adapter builds and runs
        try:
            model = dt.get_peft_model(tiny_model("llama"), config)
            outputs(model)
        except (dt.ConfigError, dt.TargetModuleError) as err:
            assert field in str(err) or "target" in str(err), f"{field}={value!r}: {err}"
        except Exception as err:  # noqa: BLE001
            tally(f"invalid config: {peft_type}", bad=True)
            raise AssertionError(f"{field}={value!r} accepted, then a raw {type(err).__name__}: {err}") from err
        tally(f"invalid config: {peft_type}", accepted=True)

    refused()


CONTRADICTIONS = {
    "OFT r and block size": (lambda: dt.OFTConfig(r=4, oft_block_size=8), "oft_block_size"),
    "BOFT block size and count": (lambda: dt.BOFTConfig(boft_block_size=4, boft_block_num=2), "boft_block_num"),
    "AdaLoRA target above init": (lambda: dt.AdaLoraConfig(init_r=2, target_r=4, total_step=10), "target_r"),
    "IA3 feed-forward outside targets": (
        lambda: dt.IA3Config(target_modules=["q_proj"], feedforward_modules=["down_proj"]),
        "feedforward_modules",
    ),
    "layers_pattern without layers": (lambda: dt.LoraConfig(layers_pattern="layers"), "layers_to_transform"),
    "no target modules": (lambda: dt.VeraConfig(target_modules=[]), "target_modules"),
    "DoRA with LoftQ": (lambda: dt.LoraConfig(use_dora=True, init_lora_weights="loftq"), "DoRA"),
    "TEXT init without text": (
        lambda: dt.PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT"),
        "prompt_tuning_init_text",
    ),
}


@pytest.mark.parametrize("case", sorted(CONTRADICTIONS))
def test_contradictory_options_are_refused_naming_them(case):
    build, field = CONTRADICTIONS[case]
    with pytest.raises(dt.ConfigError, match=field):
        build()


def test_an_unknown_field_is_refused_at_construction_naming_it():
    with pytest.raises(TypeError, match="lora_rank"):
        dt.LoraConfig(lora_rank=8)
