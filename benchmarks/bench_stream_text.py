"""A streamed reply's text, token by token: deltatune's incremental decoding against decoding every id so far.

What a server that streams does for each generated token of each row: find the reply's text so far,
to send the new part. The naive way decodes every generated id each time (the cost of a reply
grows with the square of its length); ``deltatune.serving.decoding.IncrementalText`` decodes the
ids since the text was last whole behind four ids of context. Replies of 256, 1,024 and 4,096
tokens of SmolLM2's tokenizer (text in several scripts, so characters split across ids), the two
ways alternating; the figure is the time of a whole reply's text, deltatune over naive.

    .venv/bin/python benchmarks/bench_stream_text.py [--quick]
"""

from __future__ import annotations

import common

SAMPLE = "Grüße aus Köln, 東京タワー 🤗 and the quick brown fox jumps over the lazy dog. "


def main() -> None:
    from transformers import AutoTokenizer

    from deltatune.models import resolve_model_path
    from deltatune.serving.decoding import IncrementalText

    args = common.parser(__doc__.splitlines()[0], repeats=5, warmup=1).parse_args()
    env = common.setup(args)
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_path(common.MODEL)))
    ids = tokenizer(SAMPLE * 400, add_special_tokens=False)["input_ids"]

    def incremental(reply: list[int]) -> str:
        text = IncrementalText(tokenizer)
        return [text.add(token) for token in reply][-1]

    def naive(reply: list[int]) -> str:
        return [tokenizer.decode(reply[:n], skip_special_tokens=True) for n in range(1, len(reply) + 1)][-1]

    ratios, times = {}, {}
    for length in (256, 1024) if env.quick else (256, 1024, 4096):
        reply = ids[:length]
        assert incremental(reply) == naive(reply)
        cases = {f"{length}/deltatune": lambda r=reply: incremental(r), f"{length}/naive": lambda r=reply: naive(r)}
        times[str(length)] = common.alternate(cases, env, args.repeats, args.warmup)
        common.print_times(f"the text of a {length}-token reply, token by token", times[str(length)])
        ratios[f"{length}_tokens/time_over_naive"] = common.ratio(times[str(length)], *cases)
    common.emit("stream_text", env, args, ratios, times)


if __name__ == "__main__":
    main()
