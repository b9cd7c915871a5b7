"""``deltatune serve``: OpenAI-compatible replies equal to sequential greedy decoding, whatever shares the batch.

One tiny Llama base with three adapters (LoRA, DoRA, rsLoRA) in a server on loopback, in a
thread of the test process; the reference replies come from ``generate`` on a separate copy with
one adapter active at a time. Counts are bounded and every wait has a deadline.
"""

from __future__ import annotations

import concurrent.futures
import json
import random
import shutil
import signal
import subprocess
import threading

import httpx2
import openai
import pytest

from serve_helpers import (
    BASE,
    CHAT_PROMPTS,
    TEXT_PROMPTS,
    Reference,
    lora_family,
    make_adapters,
    other_methods,
    read_stream,
    serving,
    streamed_text,
    wait_for,
)
from tiny_assets import deltatune_command, free_port, session_assets, subprocess_env

LAYER_ADAPTERS = ("alpha", "beta", "gamma")
MODELS = (BASE, *LAYER_ADAPTERS)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return session_assets(tmp_path_factory)


@pytest.fixture(scope="module")
def adapter_dir(assets, tmp_path_factory):
    folder = tmp_path_factory.mktemp("served_adapters")
    make_adapters(assets.llama, folder, lora_family())
    return folder


@pytest.fixture(scope="module")
def paths(adapter_dir):
    return {name: adapter_dir / name for name in (*LAYER_ADAPTERS, "prompted")}


@pytest.fixture(scope="module")
def reference(assets, paths):
    return Reference(assets.llama, {name: paths[name] for name in LAYER_ADAPTERS})


@pytest.fixture(scope="module")
def served(assets, paths, adapter_dir):
    with serving(assets.llama, {name: paths[name] for name in LAYER_ADAPTERS}, adapter_dir=adapter_dir) as s:
        yield s


@pytest.fixture
def client(served):
    with served.client() as c:
        yield c


def chat(client, model, text, max_tokens=8, **extra):
    body = {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "temperature": 0,
        **extra,
    }
    return client.post("/v1/chat/completions", json=body)


def stream_chat(client, model, text, max_tokens=8, **extra):
    body = {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        **extra,
    }
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, response.read()
        return read_stream(response)


# -- parity --------------------------------------------------------------------------------------


def test_models_lists_base_and_adapters(client):
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids == [BASE, *LAYER_ADAPTERS]
    assert client.get("/v1/models/beta").json()["parent"] == BASE


@pytest.mark.parametrize("model", MODELS)
def test_chat_reply_is_the_greedy_reply(client, reference, model):
    reply = chat(client, model, CHAT_PROMPTS[0], max_tokens=10).json()
    text, tokens, reason = reference.chat(CHAT_PROMPTS[0], model, 10)
    assert reply["object"] == "chat.completion" and reply["model"] == model
    assert reply["choices"][0]["message"] == {"role": "assistant", "content": text}
    assert reply["choices"][0]["finish_reason"] == reason
    assert reply["usage"]["completion_tokens"] == tokens
    assert reply["usage"]["total_tokens"] == reply["usage"]["prompt_tokens"] + tokens


def test_adapters_change_the_reply(reference):
    replies = {reference.chat(CHAT_PROMPTS[1], model, 10)[0] for model in MODELS}
    assert len(replies) == len(MODELS), "an adapter left the reply unchanged: the parity tests would prove little"


def test_completions_with_several_prompts(client, reference):
    body = {"model": "alpha", "prompt": TEXT_PROMPTS, "max_tokens": 6, "temperature": 0}
    reply = client.post("/v1/completions", json=body).json()
    assert reply["object"] == "text_completion"
    assert [c["text"] for c in reply["choices"]] == [reference.completion(p, "alpha", 6)[0] for p in TEXT_PROMPTS]
    assert reply["usage"]["completion_tokens"] == sum(reference.completion(p, "alpha", 6)[1] for p in TEXT_PROMPTS)


def test_500_requests_from_32_clients_each_equal_its_sequential_reply(served, reference):
    """Nothing lost, nothing crossed between adapters, streamed or not, with rows joining and leaving."""
    rng = random.Random(0)
    jobs = [(rng.choice(MODELS), rng.choice(CHAT_PROMPTS), rng.choice([3, 8, 13]), i % 4 == 0) for i in range(500)]
    expected = [reference.chat(text, model, max_tokens) for model, text, max_tokens, _ in jobs]
    local = threading.local()

    def run(job):
        model, text, max_tokens, stream = job
        if not hasattr(local, "client"):
            local.client = served.client()
        if stream:
            chunks, done = stream_chat(local.client, model, text, max_tokens)
            texts, reasons = streamed_text(chunks, chat=True)
            assert done and all(chunk["model"] == model for chunk in chunks)
            return texts[0], None, reasons[0]
        reply = chat(local.client, model, text, max_tokens)
        assert reply.status_code == 200, reply.text
        body = reply.json()
        return (
            body["choices"][0]["message"]["content"],
            body["usage"]["completion_tokens"],
            body["choices"][0]["finish_reason"],
        )

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        replies = list(pool.map(run, jobs))
    assert len(replies) == 500
    wrong = [
        (job, got, want)
        for job, got, want in zip(jobs, replies, expected)
        if got[0] != want[0] or got[2] != want[2] or (got[1] is not None and got[1] != want[1])
    ]
    assert not wrong, f"{len(wrong)} of 500 replies differ from the sequential ones, e.g. {wrong[:2]}"
    text = served.client().get("/metrics").text
    assert "deltatune_batch_rows_bucket" in text
    batch_sizes = served.state.metrics.batch_rows.collect()[0].samples
    total = next(s.value for s in batch_sizes if s.name.endswith("_sum"))
    steps = next(s.value for s in batch_sizes if s.name.endswith("_count"))
    assert total / steps > 2, "requests did not decode together"


def test_stream_and_whole_reply_agree(client):
    for model in MODELS:
        whole = chat(client, model, CHAT_PROMPTS[3], max_tokens=12).json()
        chunks, done = stream_chat(
            client, model, CHAT_PROMPTS[3], max_tokens=12, stream_options={"include_usage": True}
        )
        texts, reasons = streamed_text(chunks, chat=True)
        assert done
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert texts[0] == whole["choices"][0]["message"]["content"]
        assert reasons[0] == whole["choices"][0]["finish_reason"]
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_stop_strings_end_the_reply(client, reference):
    full = reference.chat(CHAT_PROMPTS[2], "beta", 12)[0]
    stop = full[3:5]
    cut = full[: full.find(stop)]
    reply = chat(client, "beta", CHAT_PROMPTS[2], max_tokens=12, stop=[stop]).json()
    assert reply["choices"][0] == {
        "index": 0,
        "message": {"role": "assistant", "content": cut},
        "logprobs": None,
        "finish_reason": "stop",
    }
    chunks, _ = stream_chat(client, "beta", CHAT_PROMPTS[2], max_tokens=12, stop=stop)
    assert streamed_text(chunks, chat=True) == ({0: cut}, {0: "stop"})


def test_seeded_sampling_repeats_whatever_shares_the_batch(served):
    body = {
        "model": "gamma",
        "prompt": "Once upon",
        "max_tokens": 8,
        "temperature": 0.9,
        "top_p": 0.9,
        "seed": 7,
        "n": 3,
    }

    def ask(_):
        with served.client() as c:
            return [choice["text"] for choice in c.post("/v1/completions", json=body).json()["choices"]]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(ask, range(4)))
    assert all(r == replies[0] for r in replies)
    assert len(replies[0]) == 3 and len(set(replies[0])) > 1, "the n choices of one request should differ"


# -- the openai client ---------------------------------------------------------------------------


def test_the_openai_client_works_unchanged(served, reference):
    api = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in api.models.list()] == [BASE, *LAYER_ADAPTERS]
    reply = api.chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": CHAT_PROMPTS[0]}], max_tokens=9, temperature=0
    )
    assert reply.choices[0].message.content == reference.chat(CHAT_PROMPTS[0], "alpha", 9)[0]
    assert reply.usage.completion_tokens == reference.chat(CHAT_PROMPTS[0], "alpha", 9)[1]
    text = api.completions.create(model=BASE, prompt=TEXT_PROMPTS[1], max_tokens=5, temperature=0)
    assert text.choices[0].text == reference.completion(TEXT_PROMPTS[1], BASE, 5)[0]
    stream = api.chat.completions.create(
        model="gamma", messages=[{"role": "user", "content": CHAT_PROMPTS[4]}], max_tokens=7, temperature=0, stream=True
    )
    assert (
        "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        == reference.chat(CHAT_PROMPTS[4], "gamma", 7)[0]
    )
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        api.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        api.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "x"}], max_tokens=0)


# -- bad requests --------------------------------------------------------------------------------


def error_of(response, status):
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_bad_requests_get_openai_errors_naming_the_field(client, served):
    error = error_of(chat(client, "nope", "x"), 404)
    assert error["param"] == "model" and error["code"] == "model_not_found" and "alpha" in error["message"]
    error = error_of(
        client.post(
            "/v1/chat/completions", content=b'{"model": "alpha",', headers={"content-type": "application/json"}
        ),
        400,
    )
    assert "not valid JSON" in error["message"]
    assert error_of(chat(client, "alpha", "x", max_tokens="5"), 400)["param"] == "max_tokens"
    assert error_of(chat(client, "alpha", "x", max_tokens=0), 400)["param"] == "max_tokens"
    assert error_of(chat(client, "alpha", "x", temperature=3), 400)["param"] == "temperature"
    assert error_of(chat(client, "alpha", "x", n=100), 400)["param"] == "n"
    assert error_of(chat(client, "alpha", "x", stop=["a"] * 5), 400)["param"] == "stop"
    assert "logprobs" in error_of(chat(client, "alpha", "x", logprobs=True), 400)["message"]
    missing = client.post("/v1/chat/completions", json={"model": "alpha"})
    assert error_of(missing, 400)["param"] == "messages"
    bad_role = client.post("/v1/chat/completions", json={"model": "alpha", "messages": [{"role": "x", "content": ""}]})
    assert error_of(bad_role, 400)["param"] == "messages.0.role"
    long_prompt = client.post("/v1/completions", json={"model": "alpha", "prompt": "word " * 600, "max_tokens": 1})
    error = error_of(long_prompt, 400)
    assert error["param"] == "prompt" and error["code"] == "context_length_exceeded"
    too_many = chat(client, "alpha", "x", max_tokens=100_000)
    assert error_of(too_many, 400)["code"] == "context_length_exceeded"
    assert error_of(client.get("/v1/nothing"), 404)["type"] == "not_found_error"
    assert error_of(client.get("/v1/chat/completions"), 405)
    assert chat(client, "alpha", "still serving").status_code == 200


# -- adapters at run time ------------------------------------------------------------------------


def test_load_and_unload_under_traffic(served, reference, paths):
    """Replies stay right while an adapter is loaded and unloaded; unloading waits for its requests."""
    stop = threading.Event()
    failures: list[str] = []

    def traffic(model):
        with served.client() as c:
            for i in range(200):
                if stop.is_set():
                    return
                text = CHAT_PROMPTS[i % len(CHAT_PROMPTS)]
                got = chat(c, model, text, max_tokens=4).json()["choices"][0]["message"]["content"]
                if got != reference.chat(text, model, 4)[0]:
                    failures.append(f"{model}: {got!r}")

    workers = [threading.Thread(target=traffic, args=(m,)) for m in (BASE, "alpha", "beta")]
    for worker in workers:
        worker.start()
    try:
        with served.client() as c:
            loaded = c.post("/v1/adapters", json={"name": "delta", "path": "gamma"})
            assert loaded.status_code == 200, loaded.text
            assert loaded.json()["method"] == "LORA"
            assert "delta" in [m["id"] for m in c.get("/v1/models").json()["data"]]
            want = reference.chat(CHAT_PROMPTS[5], "gamma", 40)[0]
            assert chat(c, "delta", CHAT_PROMPTS[5], max_tokens=40).json()["choices"][0]["message"]["content"] == want
            # a long streamed request for delta is running while delta is unloaded
            body = {
                "model": "delta",
                "messages": [{"role": "user", "content": CHAT_PROMPTS[5]}],
                "max_tokens": 40,
                "temperature": 0,
                "stream": True,
            }
            with served.client() as streamer, streamer.stream("POST", "/v1/chat/completions", json=body) as response:
                lines = response.iter_lines()
                next(line for line in lines if '"content": "' in line and '"content": ""' not in line)
                pool = concurrent.futures.ThreadPoolExecutor(1)
                deleted = pool.submit(c.delete, "/v1/adapters/delta")
                wait_for(
                    lambda: "delta" not in [m["id"] for m in c.get("/v1/models").json()["data"]],
                    "delta to stop being listed",
                )
                assert error_of(chat(c, "delta", "x"), 404)["code"] == "model_not_found"
                rest = list(lines)
            streamed = streamed_text(read_stream_lines(rest), chat=True)[0][0]
            assert want.endswith(streamed) and streamed, "the in-flight request was cut short by the unload"
            assert deleted.result(60).json() == {"name": "delta", "deleted": True}
            pool.shutdown()
            assert error_of(c.delete("/v1/adapters/delta"), 404)["code"] == "adapter_not_found"
            assert "delta" not in served.state.batcher.model.peft_config
    finally:
        stop.set()
        for worker in workers:
            worker.join(120)
    assert not failures, failures[:3]


def read_stream_lines(lines):
    return [json.loads(line[6:]) for line in lines if line.startswith("data: {")]


def test_adapter_paths_stay_inside_the_adapter_folder(client, adapter_dir, tmp_path, paths):
    outside = tmp_path / "outside"
    shutil.copytree(paths["alpha"], outside)
    link = adapter_dir / "link_out"
    link.symlink_to(outside, target_is_directory=True)
    sneaky = adapter_dir / "sneaky"
    sneaky.mkdir()
    shutil.copy(paths["alpha"] / "adapter_config.json", sneaky)
    (sneaky / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    try:
        for path in ("../outside", str(outside), "link_out", "sneaky", "/etc", "alpha/../../outside"):
            error = error_of(client.post("/v1/adapters", json={"name": "x", "path": path}), 403)
            assert error["param"] == "path" and error["type"] == "permission_error"
        assert error_of(client.post("/v1/adapters", json={"name": "x", "path": "missing"}), 404)["param"] == "path"
        assert "x" not in [m["id"] for m in client.get("/v1/models").json()["data"]]
    finally:
        link.unlink()
        shutil.rmtree(sneaky)


def test_adapters_that_cannot_share_a_batch_are_refused_with_the_reason(client):
    error = error_of(client.post("/v1/adapters", json={"name": "p", "path": "prompted"}), 400)
    assert "virtual tokens" in error["message"]
    assert error_of(client.post("/v1/adapters", json={"name": "alpha", "path": "gamma"}), 409)["code"] == "name_taken"
    assert error_of(client.post("/v1/adapters", json={"name": "../x", "path": "gamma"}), 400)["param"] == "name"
    assert error_of(client.post("/v1/adapters", json={"name": "y", "path": "gamma", "extra": 1}), 400)


def test_without_an_adapter_folder_clients_load_nothing(assets, paths):
    with serving(assets.llama) as s, s.client() as c:
        error = error_of(c.post("/v1/adapters", json={"name": "a", "path": str(paths["alpha"])}), 403)
        assert "--adapter-dir" in error["message"]
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == [BASE]


# -- operations ----------------------------------------------------------------------------------


def test_api_key_guards_every_endpoint(assets):
    with serving(assets.llama, api_key="s3cret") as s:
        with s.client() as c:
            for method, path in (
                ("GET", "/health"),
                ("GET", "/metrics"),
                ("GET", "/v1/models"),
                ("POST", "/v1/chat/completions"),
                ("POST", "/v1/adapters"),
            ):
                error = error_of(c.request(method, path, json={}), 401)
                assert error["type"] == "authentication_error"
            assert error_of(c.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        with s.client(headers={"Authorization": "Bearer s3cret"}) as c:
            assert c.get("/health").json()["status"] == "ok"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0).models.list()
        assert openai.OpenAI(base_url=s.url + "/v1", api_key="s3cret").models.list().data[0].id == BASE


def hold_batcher(state):
    """Park the batcher's thread until the returned event is set (requests queue up meanwhile)."""
    release, parked = threading.Event(), threading.Event()

    def park():
        parked.set()
        release.wait(120)

    state.batcher.call(park)
    wait_for(parked.is_set, "the batcher to park")
    return release


def test_a_full_queue_answers_429_with_retry_after(assets):
    with serving(assets.llama, max_queue=2) as s:
        release = hold_batcher(s.state)
        pool = concurrent.futures.ThreadPoolExecutor(2)
        try:
            queued = [pool.submit(lambda: chat(s.client(), BASE, "hi", max_tokens=3)) for _ in range(2)]
            wait_for(lambda: s.state.batcher.queue_depth == 2, "two queued requests")
            with s.client() as c:
                response = chat(c, BASE, "hi", max_tokens=3)
                assert error_of(response, 429)["code"] == "queue_full"
                assert int(response.headers["Retry-After"]) >= 1
                assert "deltatune_queue_depth 2.0" in c.get("/metrics").text
        finally:
            release.set()
        assert [f.result(60).status_code for f in queued] == [200, 200]
        pool.shutdown()


def test_a_request_past_the_timeout_gets_504(assets):
    with serving(assets.llama, request_timeout=0.2) as s:
        release = hold_batcher(s.state)
        with s.client() as c:
            pool = concurrent.futures.ThreadPoolExecutor(1)
            late = pool.submit(chat, c, BASE, "hi")
            wait_for(lambda: s.state.batcher.queue_depth == 1, "the queued request")
            threading.Timer(0.5, release.set).start()  # the request is then older than its 0.2 s
            assert error_of(late.result(60), 504)["code"] == "timeout"
            pool.shutdown()
        assert s.state.batcher.in_flight == {}


def test_a_client_that_disconnects_frees_its_rows(served):
    generated = served.state.metrics.generated_tokens
    before = _counter(generated, "alpha")
    body = {"model": "alpha", "prompt": "Once", "max_tokens": 500, "temperature": 0, "stream": True}
    with served.client() as c, c.stream("POST", "/v1/completions", json=body) as response:
        next(line for line in response.iter_lines() if line.startswith("data: "))
    wait_for(
        lambda: served.state.batcher.running_rows == 0 and not served.state.batcher.in_flight,
        "the abandoned rows to leave",
    )
    assert _counter(generated, "alpha") - before < 500
    with served.client() as c:
        with pytest.raises(httpx2.TimeoutException):  # the client gives up on a whole reply, and closes
            c.post("/v1/completions", json={**body, "stream": False}, timeout=httpx2.Timeout(0.3))
    wait_for(
        lambda: served.state.batcher.running_rows == 0 and not served.state.batcher.in_flight,
        "the abandoned whole reply to leave",
    )
    assert _counter(generated, "alpha") - before < 1000


def _counter(counter, model):
    return next(
        (s.value for s in counter.collect()[0].samples if s.name.endswith("_total") and s.labels.get("model") == model),
        0.0,
    )


def test_health_and_metrics(client):
    assert client.get("/health").json()["status"] == "ok"
    chat(client, "beta", "count me")
    text = client.get("/metrics").text
    for name in (
        "deltatune_requests_total{",
        "deltatune_generated_tokens_total{",
        "deltatune_queue_depth",
        "deltatune_running_rows",
        "deltatune_request_latency_seconds_bucket",
        "deltatune_time_to_first_token",
    ):
        assert name in text, name
    assert 'model="beta"' in text and 'status="200"' in text


@pytest.mark.slow
def test_sigterm_finishes_requests_in_flight_then_exits(assets, paths):
    """A real ``deltatune serve`` process: SIGTERM while a long request runs; that request completes."""
    port = free_port()
    process = subprocess.Popen(
        deltatune_command(
            "serve", "--model", str(assets.llama), "--adapter", f"alpha={paths['alpha']}", "--port", str(port)
        ),
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"

        def healthy():
            try:
                return httpx2.get(url + "/health").status_code == 200
            except httpx2.TransportError:
                assert process.poll() is None, process.stdout.read()
                return False

        wait_for(healthy, "deltatune serve to start", deadline_s=120)
        body = {"model": "alpha", "prompt": "Once", "max_tokens": 300, "temperature": 0, "stream": True}
        with httpx2.Client(base_url=url, timeout=120) as c, c.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            process.send_signal(signal.SIGTERM)
            rest = list(lines)
        assert rest[-2:] == ["data: [DONE]", ""] or "data: [DONE]" in rest
        chunks = read_stream_lines(rest)
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "Traceback" not in process.stdout.read()


def test_serve_refuses_bad_options(assets, paths, tmp_path):
    from tiny_assets import invoke

    result = invoke("serve", "--model", str(assets.llama), "--adapter", f"p={paths['prompted']}", "--port", "0")
    assert result.exit_code != 0 and "virtual tokens" in result.output
    result = invoke("serve", "--model", str(assets.llama), "--adapter", "nonsense")
    assert result.exit_code != 0 and "nonsense" in result.output
    result = invoke("serve", "--model", str(assets.llama), "--adapter-dir", str(tmp_path / "none"))
    assert result.exit_code != 0 and "no such folder" in result.output


def test_the_readme_openai_example_runs_against_a_server(assets, paths, capsys):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "from openai import" in b)
    with serving(assets.llama, {"legal": paths["alpha"]}, base_name="smollm2-135m-instruct", default_max_tokens=6) as s:
        exec(compile(block.replace("http://localhost:8000", s.url), "README.md", "exec"), {})
    assert "completion_tokens=6" in capsys.readouterr().out


def test_other_layer_methods_are_served_with_the_greedy_reply(assets, tmp_path_factory):
    paths = make_adapters(assets.llama, tmp_path_factory.mktemp("other_methods"), other_methods(), noise=3.0)
    reference = Reference(assets.llama, paths)
    with serving(assets.llama, paths) as s, s.client() as c:
        for model in (BASE, *paths):
            reply = chat(c, model, CHAT_PROMPTS[1], max_tokens=8).json()
            assert reply["choices"][0]["message"]["content"] == reference.chat(CHAT_PROMPTS[1], model, 8)[0], model
        assert len({reference.chat(CHAT_PROMPTS[1], m, 8)[0] for m in (BASE, *paths)}) == 1 + len(paths)
