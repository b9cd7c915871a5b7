"""Reading an adapter folder while a save replaces it sees the old adapter or the new one, never the
new weights with the old config (or the reverse)."""

from __future__ import annotations

import threading

import torch

import deltatune as dt

from conftest import perturb_trainable, tiny_inputs, tiny_model


def adapter(alpha: int, seed: int) -> dt.PeftModel:
    model = dt.get_peft_model(
        tiny_model("llama"), dt.LoraConfig(r=4, lora_alpha=alpha, target_modules=["q_proj", "v_proj"])
    )
    perturb_trainable(model, seed=seed)
    return model


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**tiny_inputs("llama")).logits


def test_a_reader_during_repeated_saves_sees_one_whole_adapter(tmp_path):
    # Two adapters with the same shapes: a mixed folder would load without an error, as a third model.
    one, two = adapter(alpha=4, seed=1), adapter(alpha=32, seed=2)
    expected = {4: logits(one), 32: logits(two)}
    folder = tmp_path / "adapter"
    one.save_pretrained(folder)
    stop = threading.Event()

    def saver() -> None:
        while not stop.is_set():
            for model in (two, one):
                model.save_pretrained(folder)

    writer = threading.Thread(target=saver)
    writer.start()
    seen = {4: 0, 32: 0}
    try:
        for _ in range(60):
            loaded = dt.PeftModel.from_pretrained(tiny_model("llama"), folder)
            alpha = loaded.peft_config["default"].lora_alpha
            torch.testing.assert_close(logits(loaded), expected[alpha], atol=1e-6, rtol=1e-6)
            seen[alpha] += 1
    finally:
        stop.set()
        writer.join()
    assert sum(seen.values()) == 60


def test_a_hand_edited_config_still_loads(tmp_path):
    model = adapter(alpha=8, seed=3)
    model.save_pretrained(tmp_path)
    config = (tmp_path / "adapter_config.json").read_text().replace('"lora_alpha": 8', '"lora_alpha": 16')
    (tmp_path / "adapter_config.json").write_text(config)
    assert dt.PeftModel.from_pretrained(tiny_model("llama"), tmp_path).peft_config["default"].lora_alpha == 16


def test_a_saved_folder_holds_only_peft_files(tmp_path):
    adapter(alpha=8, seed=3).save_pretrained(tmp_path / "a")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "adapter_config.json", "adapter_model.safetensors"]
