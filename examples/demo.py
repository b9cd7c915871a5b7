"""`make demo`: LoRA on the embedded SmolLM2-135M-Instruct for Rotten Tomatoes sentiment.

Sentiment is posed as instruction following: the review goes into a chat turn and the model answers
"positive" or "negative". The first answer token decides the class, so the LM head is computed at
one position per example (``logits_to_keep=1``) for both training and evaluation instead of over
the whole 49k vocabulary at every token.

Prints the trainable share, loss and held-out accuracy before and after a few dozen steps, the
adapter's size on disk, and checks that the saved adapter reloaded into a fresh base model, and the
merged model, predict exactly what the trained adapter predicted.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from deltatune import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from deltatune.data import build_sentiment_example, rotten_tomatoes, sentiment_template  # noqa: E402
from deltatune.models import load_model  # noqa: E402


def encode(tokenizer, template, records):
    prompts = [build_sentiment_example(tokenizer, r["text"], template=template)[0] for r in records]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    targets = torch.tensor([template.answer_token_ids[r["label"]] for r in records])
    return batch, targets


def next_token_logits(model, batch) -> torch.Tensor:
    """Logits of the token after each (left-padded) prompt: the first answer token."""
    return model(**batch, logits_to_keep=1).logits[:, -1].float()


@torch.no_grad()
def evaluate(model, tokenizer, template, records, batch_size: int) -> tuple[float, float, list[int]]:
    """(mean loss of the right answer token, accuracy between the two answers, predictions)."""
    model.eval()
    answer_ids = torch.tensor(template.answer_token_ids)
    losses, predictions = [], []
    for start in range(0, len(records), batch_size):
        batch, targets = encode(tokenizer, template, records[start : start + batch_size])
        logits = next_token_logits(model, batch)
        losses.append(F.cross_entropy(logits, targets, reduction="sum").item())
        predictions += logits[:, answer_ids].argmax(-1).tolist()
    correct = sum(int(p == r["label"]) for p, r in zip(predictions, records))
    return sum(losses) / len(records), correct / len(records), predictions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-size", type=int, default=200)
    parser.add_argument("--check-size", type=int, default=64, help="reviews for the reload and merge checks")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(args.seed)
    started = time.perf_counter()

    print("loading smollm2-135m-instruct (converted from GGUF once, then cached)...")
    model, tokenizer = load_model("smollm2-135m-instruct", task="causal-lm")
    tokenizer.padding_side = "left"  # the answer position is then the last one in every row
    template = sentiment_template(tokenizer)
    train = rotten_tomatoes("train")
    test = rotten_tomatoes("test")[: args.eval_size]

    config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    pm = get_peft_model(model, config)
    trainable, total = pm.get_nb_trainable_parameters()
    print(
        f"LoRA r=16 on all linear layers: {trainable:,} trainable of {total:,} parameters "
        f"({100 * trainable / total:.2f}%)"
    )

    loss_before, acc_before, _ = evaluate(pm, tokenizer, template, test, args.batch_size * 4)
    print(f"before training: test loss {loss_before:.3f}, accuracy {acc_before:.3f} on {len(test)} reviews")

    optimizer = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=args.lr)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed)).tolist()
    pm.train()
    t0 = time.perf_counter()
    for step in range(args.steps):
        records = [train[i] for i in order[step * args.batch_size : (step + 1) * args.batch_size]]
        batch, targets = encode(tokenizer, template, records)
        loss = F.cross_entropy(next_token_logits(pm, batch), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == args.steps - 1:
            print(f"  step {step + 1:3d}/{args.steps}  loss {loss.item():.3f}  ({time.perf_counter() - t0:.0f}s)")

    loss_after, acc_after, predictions = evaluate(pm, tokenizer, template, test, args.batch_size * 4)
    print(f"after {args.steps} steps: test loss {loss_after:.3f}, accuracy {acc_after:.3f} (was {acc_before:.3f})")

    check = test[: args.check_size]
    expected = predictions[: args.check_size]
    with tempfile.TemporaryDirectory() as directory:
        pm.save_pretrained(directory)
        size = sum(f.stat().st_size for f in Path(directory).iterdir())
        base_mib = (total - trainable) * 4 / 2**20
        print(f"adapter saved: {size / 2**20:.1f} MiB (the base model: {base_mib:.0f} MiB in fp32)")
        fresh, _ = load_model("smollm2-135m-instruct", task="causal-lm")
        reloaded = PeftModel.from_pretrained(fresh, directory)
    _, _, reloaded_predictions = evaluate(reloaded, tokenizer, template, check, args.batch_size * 4)
    print(f"reloaded into a fresh base: {_agreement(reloaded_predictions, expected)}")
    merged = reloaded.merge_and_unload()
    _, _, merged_predictions = evaluate(merged, tokenizer, template, check, args.batch_size * 4)
    print(
        f"merged into the base weights ({type(merged).__name__}, no adapter modules): "
        f"{_agreement(merged_predictions, expected)}"
    )
    print(f"done in {time.perf_counter() - started:.0f}s")
    if reloaded_predictions != expected or merged_predictions != expected:
        raise SystemExit("predictions changed after reload or merge")


def _agreement(predictions: list[int], expected: list[int]) -> str:
    same = sum(int(a == b) for a, b in zip(predictions, expected))
    return f"same predictions on {same}/{len(expected)} reviews"


if __name__ == "__main__":
    main()
