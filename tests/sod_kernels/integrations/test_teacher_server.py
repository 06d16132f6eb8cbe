"""sod_kernels.integrations.vllm_teacher against a stand-in vLLM server on 127.0.0.1.

The stand-in answers ``POST /v1/completions`` in the response format of vLLM 0.12's OpenAI-compatible
server: per choice ``prompt_logprobs`` = ``[None, {"<id>": {"logprob", "rank", "decoded_token"}, ...}, ...]``
with, at token ``j``, the ``prompt_logprobs`` most likely ids given tokens ``< j`` plus token ``j`` itself
when it is not among them (listed first, as vLLM does). Its teacher is a known distribution (a bigram table
or a tiny torch LM), so the client's output is checked against top-k taken directly from that distribution.
Error cases are scripted answers: HTTP errors, delays, malformed and partial bodies.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from sod_kernels import fused_sparse_sod_loss
from sod_kernels.integrations.vllm_teacher import (TeacherConnectionError, TeacherHTTPError, TeacherResponseError,
                                                   TeacherServerError, TeacherTimeoutError, TeacherTopK,
                                                   TeacherVocabularyError, VLLMTeacher)

ROOT = Path(__file__).resolve().parents[3]
V = 40


# ------------------------------------------------------------------------------------------ the stand-in
def vllm_prompt_logprobs(logp: torch.Tensor, tokens: list[int], m: int) -> list:
    """vLLM's ``prompt_logprobs`` for ``tokens`` given ``logp [n, V]`` (row i: the distribution of token i+1)."""
    out: list = [None]
    for j in range(1, len(tokens)):
        row = logp[j - 1]
        entry = {}
        for tid in [tokens[j]] + torch.topk(row, m).indices.tolist():
            entry[str(tid)] = {"logprob": float(row[tid]), "rank": int((row > row[tid]).sum()) + 1,
                               "decoded_token": f"<{tid}>"}
        out.append(entry)
    return out


class FakeVLLM:
    """A vLLM-format completions endpoint for a teacher ``logp_fn(tokens, temperature) -> [n, V]``.

    ``script``: answers to give first, one per request, each ``(status, body, delay_s)`` with ``body`` bytes or
    a callable ``request -> bytes``; ``mutate``: a function changing every default answer (a dict) in place.
    ``requests``: the JSON bodies received.
    """

    def __init__(self, logp_fn, model: str = "teacher"):
        self.logp_fn, self.model = logp_fn, model
        self.script: list = []
        self.mutate = None
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.requests.append({"path": self.path, "headers": dict(self.headers), **body})
                    scripted = fake.script.pop(0) if fake.script else None
                if scripted is None:
                    status, payload, delay = fake.answer(self.path, body)
                else:
                    status, payload, delay = scripted
                    payload = payload(body) if callable(payload) else payload
                time.sleep(delay)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout tests)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def answer(self, path: str, body: dict):
        if path != "/v1/completions":
            return 404, json.dumps({"detail": "Not Found"}).encode(), 0.0
        if body.get("model") != self.model:
            error = {"error": {"message": f"The model `{body.get('model')}` does not exist.",
                               "type": "NotFoundError", "param": None, "code": 404}}
            return 404, json.dumps(error).encode(), 0.0
        prompts = body["prompt"]
        m = body["prompt_logprobs"]
        temperature = body.get("prompt_logprobs_temperature", 1.0)
        choices = []
        for i, tokens in enumerate(prompts):
            logp = self.logp_fn(tokens, temperature)
            choices.append({"index": i, "text": "x", "logprobs": None, "finish_reason": "length",
                            "stop_reason": None, "token_ids": [0] if body.get("return_token_ids") else None,
                            "prompt_logprobs": vllm_prompt_logprobs(logp, tokens, m),
                            "prompt_token_ids": list(tokens) if body.get("return_token_ids") else None})
        answer = {"id": "cmpl-test", "object": "text_completion", "created": 0, "model": self.model,
                  "choices": choices, "usage": {"prompt_tokens": sum(map(len, prompts)), "total_tokens": 0,
                                                "completion_tokens": len(prompts)}}
        if self.mutate is not None:
            self.mutate(answer)
        return 200, json.dumps(answer).encode(), 0.0


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    """Requests go straight to 127.0.0.1 whatever proxy the environment names (clients read it when built)."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def table():
    """A bigram teacher: the distribution of the next token depends on the current one only."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(V, V, generator=g) * 3.0


def bigram_logp(table, tokens, temperature=1.0):
    return torch.log_softmax(table[torch.tensor(tokens)] / temperature, dim=-1)


@pytest.fixture()
def server(table):
    fake = FakeVLLM(lambda tokens, temperature: bigram_logp(table, tokens, temperature))
    yield fake
    fake.close()


def client(url, **kw) -> VLLMTeacher:
    options = {"k": 4, "vocab_size": V, "timeout": 10.0, "max_retries": 0, "retry_backoff": 0.0}
    options.update(kw)
    return VLLMTeacher(url, "teacher", **options)


def sequences(seed=1, lengths=(9, 6, 12, 2)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (n,), generator=g).tolist() for n in lengths]


# ------------------------------------------------------------------------------------------ alignment
@pytest.mark.parametrize("include_sampled", [True, False])
def test_rows_hold_the_teacher_top_k_for_the_next_token(server, table, include_sampled):
    """Row t = the teacher's distribution of token t+1 given tokens <= t (the bigram row of token t)."""
    seqs = sequences()
    starts = [3, 1, 5, 1]
    k = 4
    top = client(server.url, k=k, include_sampled=include_sampled).topk(seqs, response_start=starts)
    L, W = max(map(len, seqs)), k + int(include_sampled)
    assert isinstance(top, TeacherTopK) and top.k == k and top.temperature == 1.0
    assert top.ids.shape == (4, L - 1, W) and top.ids.dtype == torch.int64
    assert top.logprobs.shape == (4, L - 1, W) and top.logprobs.dtype == torch.float32
    sampled_outside = 0
    for b, (x, start) in enumerate(zip(seqs, starts)):
        for t in range(L - 1):
            distilled = t + 1 < len(x) and t + 1 >= start
            assert top.response_mask[b, t] == int(distilled)
            assert top.target_ids[b, t] == (x[t + 1] if t + 1 < len(x) else 0)
            if not distilled:
                assert top.ids[b, t].tolist() == list(range(W))
                assert torch.isneginf(top.logprobs[b, t]).all()
                continue
            logp = torch.log_softmax(table[x[t]], dim=-1)  # the teacher on token t + 1
            ids = top.ids[b, t]
            assert ids[:k].tolist() == torch.topk(logp, k).indices.tolist()
            assert torch.equal(top.logprobs[b, t], logp[ids])
            assert len(set(ids.tolist())) == W
            if include_sampled:
                y = x[t + 1]
                top_k1 = torch.topk(logp, k + 1).indices.tolist()
                assert ids[k] == (top_k1[k] if y in top_k1 else y)
                sampled_outside += y not in top_k1
                assert y in ids.tolist()
    if include_sampled:
        assert sampled_outside > 0  # the case that adds the sampled token was exercised


def test_padded_tensor_left_and_right_matches_lists(server):
    seqs = sequences(seed=2, lengths=(7, 10, 4))
    L = 10
    plain = client(server.url).topk(seqs)
    for side in ("right", "left"):
        input_ids = torch.full((3, L), 5, dtype=torch.int64)
        attention = torch.zeros(3, L, dtype=torch.int64)
        for b, x in enumerate(seqs):
            s = 0 if side == "right" else L - len(x)
            input_ids[b, s:s + len(x)] = torch.tensor(x)
            attention[b, s:s + len(x)] = 1
        top = client(server.url).topk(input_ids, attention_mask=attention)
        for b, x in enumerate(seqs):
            s = 0 if side == "right" else L - len(x)
            rows = slice(s, s + len(x) - 1)  # row s + j - 1 holds the teacher on token j
            assert torch.equal(top.ids[b, rows], plain.ids[b, :len(x) - 1])
            assert torch.equal(top.logprobs[b, rows], plain.logprobs[b, :len(x) - 1])
            assert top.response_mask[b].sum() == len(x) - 1 and top.response_mask[b, rows].all()
            assert torch.equal(top.target_ids[b, rows], torch.tensor(x[1:]))


def test_response_mask_tensor_and_lists_agree_with_response_start(server):
    seqs = sequences(seed=3, lengths=(8, 8))
    input_ids = torch.tensor(seqs)
    mask = torch.zeros(2, 8, dtype=torch.int64)
    mask[0, 4:] = 1
    mask[1, 2:6] = 1
    by_tensor = client(server.url).topk(input_ids, response_mask=mask)
    by_lists = client(server.url).topk(seqs, response_mask=mask.tolist())
    assert torch.equal(by_tensor.response_mask, mask[:, 1:])
    for a, b in ((by_tensor, by_lists),):
        assert torch.equal(a.ids, b.ids) and torch.equal(a.logprobs, b.logprobs)
    by_start = client(server.url).topk(seqs, response_start=[4, 2])
    assert torch.equal(by_start.ids[0], by_tensor.ids[0])
    # row 1 of the mask stops at token 5: the prompt sent for it ends there
    assert server.requests[0]["prompt"][1] == seqs[1][:6]


# ------------------------------------------------------------------------------------------ requests
def test_requests_are_batched_concurrent_and_carry_the_fields(server):
    seqs = sequences(seed=4, lengths=(5, 6, 7, 8, 9))
    one = client(server.url, max_batch_size=8).topk(seqs, response_start=[2, 2, 2, 2, 9])  # row 4: none
    assert len(server.requests) == 1 and len(server.requests[0]["prompt"]) == 4  # row 4 is not sent
    server.requests.clear()
    many = client(server.url, max_batch_size=2, concurrency=3, api_key="sk-test",
                  extra_body={"cache_salt": "abc"}).topk(seqs, response_start=[2, 2, 2, 2, 9])
    assert sorted(len(r["prompt"]) for r in server.requests) == [2, 2]
    assert torch.equal(one.ids, many.ids) and torch.equal(one.logprobs, many.logprobs)
    request = server.requests[0]
    assert request["path"] == "/v1/completions" and request["model"] == "teacher"
    assert request["prompt_logprobs"] == 5 and request["max_tokens"] == 1 and request["n"] == 1
    assert request["temperature"] == 1.0 and request["stream"] is False
    assert request["headers"]["Authorization"] == "Bearer sk-test" and request["cache_salt"] == "abc"
    assert client(server.url, include_sampled=False).payload([[1, 2]])["prompt_logprobs"] == 4


def test_requests_run_concurrently_and_one_failure_fails_the_call(server):
    seqs = sequences(seed=8, lengths=(4, 5, 6, 7))
    # Each answer waits until all four requests are in the server at once: requests sent one after another
    # break the barrier (its timeout), their answers never come, and the call fails.  No timing involved.
    together = threading.Barrier(4, timeout=30)

    def at_once(body):
        together.wait()
        return server.answer("/v1/completions", body)[1]

    server.script = [(200, at_once, 0.0)] * 4
    top = client(server.url, max_batch_size=1, concurrency=4, timeout=60).topk(seqs)
    assert len(server.requests) == 4 and top.response_mask.sum() == 3 + 4 + 5 + 6
    slow = (200, lambda body: server.answer("/v1/completions", body)[1], 0.4)
    server.script = [slow, (400, json.dumps({"error": {"message": "bad prompt"}}).encode(), 0.0), slow, slow]
    with pytest.raises(TeacherHTTPError, match="bad prompt"):
        client(server.url, max_batch_size=1, concurrency=4).topk(seqs)


@pytest.mark.parametrize("base", ["{url}", "{url}/", "{url}/v1", "{url}/v1/completions"])
def test_base_url_forms(server, base):
    top = client(base.format(url=server.url)).topk([[1, 2, 3]])
    assert top.response_mask.tolist() == [[1, 1]]


def test_temperature_needs_a_server_field_and_then_scales(server, table):
    with pytest.raises(ValueError, match="temperature 1"):
        client(server.url, temperature=0.5)
    top = client(server.url, temperature=0.5, temperature_field="prompt_logprobs_temperature").topk([[3, 7, 9]])
    assert server.requests[-1]["prompt_logprobs_temperature"] == 0.5 and top.temperature == 0.5
    logp = torch.log_softmax(table[3] / 0.5, dim=-1)
    assert torch.equal(top.logprobs[0, 0], logp[top.ids[0, 0]])
    assert top.loss_inputs()["temperature"] == 0.5


# ------------------------------------------------------------------------------------------ end to end
class TinyLM(torch.nn.Module):
    """Embedding, one residual MLP, a causal running mean, an lm_head."""

    def __init__(self, width: int, seed: int, vocab: int = V):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(vocab, width)
        self.mix = torch.nn.Linear(width, width)
        self.lm_head = torch.nn.Linear(width, vocab, bias=False)

    def hidden_states(self, tokens):
        x = self.embed(tokens)
        x = x + torch.tanh(self.mix(x))
        steps = torch.arange(1, tokens.shape[1] + 1).view(1, -1, 1)
        return x.cumsum(dim=1) / steps

    def logp(self, tokens):
        with torch.no_grad():
            return torch.log_softmax(self.hidden_states(tokens) @ self.lm_head.weight.T, dim=-1)


@pytest.fixture(scope="module")
def lm_server():
    teacher = TinyLM(24, seed=5)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(3.0)
    fake = FakeVLLM(lambda tokens, temperature: teacher.logp(torch.tensor([tokens]))[0])
    yield fake, teacher
    fake.close()


@pytest.mark.parametrize("include_sampled", [False, True])
def test_server_topk_gives_the_loss_of_the_direct_topk(lm_server, include_sampled):
    """tiny LM behind the server -> client -> fused_sparse_sod_loss == the loss with top-k taken directly
    from the teacher's distribution (value and gradients)."""
    fake, teacher = lm_server
    B, L, k = 3, 14, 5
    input_ids = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(6))
    mask = torch.zeros(B, L, dtype=torch.int64)
    mask[:, 4:9] = 1
    mask[:, 11:] = 1
    top = client(fake.url, k=k, include_sampled=include_sampled, max_batch_size=2).topk(input_ids, response_mask=mask)

    logp = teacher.logp(input_ids)[:, :-1]  # row t: the teacher on token t + 1
    targets = input_ids[:, 1:]
    if include_sampled:
        ids = torch.topk(logp, k + 1).indices
        outside = ~(ids == targets.unsqueeze(-1)).any(-1)
        ids[..., k] = torch.where(outside, targets, ids[..., k])
    else:
        ids = torch.topk(logp, k).indices
    direct = (ids, logp.gather(-1, ids))
    m = mask[:, 1:].bool()
    assert torch.equal(top.ids[m], direct[0][m])
    torch.testing.assert_close(top.logprobs[m], direct[1][m], rtol=0, atol=1e-6)

    student = TinyLM(16, seed=7)
    losses, grads = [], []
    for ids_, lps in ((top.ids, top.logprobs), direct):
        student.zero_grad()
        hidden = student.hidden_states(input_ids)[:, :-1]
        loss = fused_sparse_sod_loss(hidden, student.lm_head.weight, ids_, lps, mask[:, 1:], target_ids=targets,
                                     step_divergence="sampled", backend="torch")
        loss.backward()
        losses.append(loss.detach())
        grads.append(student.lm_head.weight.grad.clone())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)
    via_kwargs = fused_sparse_sod_loss(student.hidden_states(input_ids)[:, :-1], student.lm_head.weight,
                                       **top.loss_inputs(), step_divergence="sampled", backend="torch")
    torch.testing.assert_close(via_kwargs.detach(), losses[0], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ server errors
def test_http_error_carries_the_server_message_and_is_not_retried(server):
    bad = VLLMTeacher(server.url, "no-such-model", k=4, vocab_size=V, max_retries=3, retry_backoff=0.0)
    with pytest.raises(TeacherHTTPError, match="HTTP 404.*`no-such-model` does not exist") as info:
        bad.topk([[1, 2, 3]])
    assert info.value.status == 404 and len(server.requests) == 1


def test_transient_errors_are_retried_then_reported(server):
    error = json.dumps({"error": {"message": "engine overloaded", "type": "ServiceUnavailableError",
                                  "param": None, "code": 503}}).encode()
    server.script = [(503, error, 0.0), (500, b"Internal Server Error", 0.0)]
    top = client(server.url, max_retries=2).topk([[1, 2, 3]])
    assert len(server.requests) == 3 and top.response_mask.sum() == 2
    server.requests.clear()
    server.script = [(503, error, 0.0)] * 3
    with pytest.raises(TeacherHTTPError, match="HTTP 503 \\(after 3 attempts\\): engine overloaded"):
        client(server.url, max_retries=2).topk([[1, 2, 3]])
    assert len(server.requests) == 3


def test_flat_error_bodies_are_read_too(server):
    server.script = [(400, json.dumps({"object": "error", "message": "prompt_logprobs too large",
                                       "type": "BadRequestError", "param": None, "code": 400}).encode(), 0.0)]
    with pytest.raises(TeacherHTTPError, match="HTTP 400: prompt_logprobs too large"):
        client(server.url).topk([[1, 2, 3]])


def test_connection_refused():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TeacherConnectionError, match=f"127.0.0.1:{port}.*2 attempts"):
        client(f"http://127.0.0.1:{port}", max_retries=1).topk([[1, 2, 3]])


def test_timeout_is_bounded_and_reported(server):
    server.script = [(200, b"{}", 4.0), (200, b"{}", 4.0)]
    start = time.monotonic()
    with pytest.raises(TeacherTimeoutError, match="within 0.3 s \\(2 attempts\\)"):
        client(server.url, timeout=0.3, max_retries=1).topk([[1, 2, 3]])
    assert time.monotonic() - start < 3.0  # two 0.3 s attempts and a back-off; one 4 s answer would exceed it
    assert issubclass(TeacherTimeoutError, TeacherServerError)


# ------------------------------------------------------------------------------------------ bad answers
def _first_position(answer, key="3"):
    return answer["choices"][0]["prompt_logprobs"][1]


def _set_entry(answer, entry):
    answer["choices"][0]["prompt_logprobs"][1] = entry


BAD_ANSWERS = {
    "not json": (b"<html>Bad Gateway</html>", "not valid JSON"),
    "json list": (b"[1, 2]", "must be a JSON object"),
    "error object": (json.dumps({"error": {"message": "out of memory"}}).encode(), "reported an error: out of memory"),
    "no choices": (json.dumps({"id": "x"}).encode(), "no 'choices' list"),
    "duplicate keys": (b'{"choices": [], "choices": []}', "repeats the key 'choices'"),
}


@pytest.mark.parametrize("name", list(BAD_ANSWERS))
def test_malformed_bodies(server, name):
    body, match = BAD_ANSWERS[name]
    server.script = [(200, body, 0.0)]
    with pytest.raises(TeacherResponseError, match=re.escape(match)):
        client(server.url).topk([[1, 2, 3]])


def _drop(field):
    return lambda a: a["choices"][0].pop(field)


MUTATIONS = {
    "missing prompt_logprobs": (_drop("prompt_logprobs"), TeacherResponseError, "no 'prompt_logprobs'"),
    "fewer positions": (lambda a: a["choices"][0]["prompt_logprobs"].pop(), TeacherResponseError,
                        "2 positions for the 3 tokens sent"),
    "extra choice": (lambda a: a["choices"].append(dict(a["choices"][0], index=1)), TeacherResponseError,
                     "2 choices for 1 prompts"),
    "bad index": (lambda a: a["choices"][0].update(index=3), TeacherResponseError, "'index' fields"),
    "entry not an object": (lambda a: _set_entry(a, [0.1]), TeacherResponseError, "non-empty object"),
    "empty entry": (lambda a: _set_entry(a, {}), TeacherResponseError, "non-empty object"),
    "value without logprob": (lambda a: _set_entry(a, {k: {"rank": 1} for k in _first_position(a)}),
                              TeacherResponseError, "numeric 'logprob'"),
    "string logprob": (lambda a: _set_entry(a, {k: {"logprob": "-1"} for k in _first_position(a)}),
                       TeacherResponseError, "numeric 'logprob'"),
    "id outside the vocabulary": (lambda a: _first_position(a).update({str(V + 3): {"logprob": -20.0}}),
                                  TeacherVocabularyError, f"token id {V + 3}"),
    "same id twice": (lambda a: _first_position(a).update({"token_id:2": {"logprob": -30.0}}),
                      TeacherResponseError, "lists token id 2 twice"),
    "text keys": (lambda a: _set_entry(a, {f"tok{k}": v for k, v in _first_position(a).items()}),
                  TeacherResponseError, "return_tokens_as_token_ids"),
    "sampled token missing": (lambda a: _first_position(a).pop("2"), TeacherResponseError,
                              "no entry for the token sent there (id 2)"),
    "too many entries": (lambda a: _first_position(a).update({str(i): {"logprob": -50.0} for i in range(30, 38)}),
                         TeacherResponseError, "entries; asked for 5"),
    "other tokens scored": (lambda a: a["choices"][0].update(prompt_token_ids=[1, 2, 4]), TeacherVocabularyError,
                            "scored other tokens"),
}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_bad_answers_are_refused_clearly(server, name):
    mutate, error, match = MUTATIONS[name]
    server.mutate = mutate
    with pytest.raises(error, match=re.escape(match)):
        client(server.url).topk([[1, 2, 3]])


@pytest.mark.parametrize("value,match", [
    ("NaN", "not a finite number"), ("Infinity", "not a finite number"), ("-Infinity", "not a finite number"),
    ("0.5", "above 0"),
])
def test_non_finite_and_positive_logprobs(server, value, match):
    def body(request):
        answer = json.loads(server.answer("/v1/completions", request)[1])
        key = next(iter(_first_position(answer)))
        _first_position(answer)[key]["logprob"] = "@@"
        return json.dumps(answer).replace('"@@"', value).encode()

    server.script = [(200, body, 0.0)]
    with pytest.raises(TeacherResponseError, match=match):
        client(server.url).topk([[1, 2, 3]])


def test_probabilities_summing_above_one(server):
    server.mutate = lambda a: _set_entry(a, {k: {"logprob": -0.1} for k in _first_position(a)})
    with pytest.raises(TeacherResponseError, match="sum to more than 1"):
        client(server.url).topk([[1, 2, 3]])


def test_token_id_keys_and_bare_numbers_are_read(server):
    reference = client(server.url).topk([[1, 2, 3]])
    server.mutate = lambda a: [a["choices"][0]["prompt_logprobs"].__setitem__(
        j, {f"token_id:{k}": v["logprob"] for k, v in e.items()}) for j, e in
        enumerate(a["choices"][0]["prompt_logprobs"]) if e]
    top = client(server.url).topk([[1, 2, 3]])
    assert torch.equal(top.ids, reference.ids) and torch.equal(top.logprobs, reference.logprobs)


def test_minus_9999_from_vllm_clamping_is_a_valid_logprob(server):
    """vLLM writes a -inf log-prob as -9999.0."""
    server.mutate = lambda a: _first_position(a).update({"2": {"logprob": -9999.0, "rank": V}})
    top = client(server.url).topk([[1, 2, 3]])
    row = dict(zip(top.ids[0, 0].tolist(), top.logprobs[0, 0].tolist()))
    assert row[2] == -9999.0


# ------------------------------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize("kwargs,error,match", [
    ({"k": 0}, ValueError, "k must be >= 1"),
    ({"k": 2.0}, TypeError, "k must be an int"),
    ({"k": V}, ValueError, "distinct ids per position"),
    ({"vocab_size": 0}, ValueError, "vocab_size"),
    ({"timeout": 0}, ValueError, "timeout"),
    ({"max_retries": -1}, ValueError, "max_retries"),
    ({"retry_backoff": -1.0}, ValueError, "retry_backoff"),
    ({"max_batch_size": 0}, ValueError, "max_batch_size"),
    ({"concurrency": 0}, ValueError, "concurrency"),
    ({"temperature": 0.0}, ValueError, "temperature"),
    ({"extra_body": {"prompt_logprobs": 3}}, ValueError, "extra_body cannot set"),
    ({"extra_body": {"temperature": 0.7}}, ValueError, "extra_body cannot set"),
    ({"include_sampled": 1}, TypeError, "include_sampled"),
])
def test_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        client("http://127.0.0.1:9", **kwargs)


def test_bad_urls():
    with pytest.raises(ValueError, match="http\\(s\\) URL"):
        VLLMTeacher("localhost:8000", "teacher", k=2, vocab_size=V)
    with pytest.raises(TypeError, match="model"):
        VLLMTeacher("http://localhost:8000", "", k=2, vocab_size=V)


@pytest.mark.parametrize("call,error,match", [
    (lambda c: c.topk([[1, V]]), ValueError, f"token id {V}, outside"),
    (lambda c: c.topk(torch.zeros(2, 4)), TypeError, "integer tensor"),
    (lambda c: c.topk(torch.zeros(2, 4, 1, dtype=torch.int64)), ValueError, "\\[B, L\\]"),
    (lambda c: c.topk([[1]]), ValueError, "at least 2 tokens"),
    (lambda c: c.topk([]), ValueError, "no sequences"),
    (lambda c: c.topk("1 2 3"), TypeError, "input_ids"),
    (lambda c: c.topk([[1, 2.0]]), TypeError, "ints"),
    (lambda c: c.topk([[1, 2]], response_mask=[[0, 1]], response_start=[1]), ValueError, "at most one"),
    (lambda c: c.topk([[1, 2]], response_mask=[[1, 1]]), ValueError, "first token of row 0"),
    (lambda c: c.topk([[1, 2]], response_mask=[[0, 2]]), ValueError, "only 0 and 1"),
    (lambda c: c.topk([[1, 2, 3]], response_mask=[[0, 1]]), ValueError, "2 entries for 3 tokens"),
    (lambda c: c.topk(torch.ones(2, 4, dtype=torch.int64), response_mask=torch.ones(2, 3)), ValueError,
     "shifted already"),
    (lambda c: c.topk([[1, 2]], response_start=[0]), ValueError, "response_start\\[0\\] = 0"),
    (lambda c: c.topk([[1, 2]], response_start=[1, 1]), ValueError, "one position per row"),
    (lambda c: c.topk(torch.ones(1, 4, dtype=torch.int64), attention_mask=torch.tensor([[1, 0, 1, 1]])),
     ValueError, "contiguous"),
    (lambda c: c.topk(torch.ones(1, 4, dtype=torch.int64), attention_mask=torch.tensor([[1, 1, 1, 0]]),
                      response_mask=torch.tensor([[0, 0, 1, 1]])), ValueError, "padding"),
    (lambda c: c.topk([[1, 2]], attention_mask=torch.ones(1, 2)), ValueError, "lists of token ids need none"),
])
def test_bad_inputs_fail_before_any_request(server, call, error, match):
    with pytest.raises(error, match=match):
        call(client(server.url))
    assert server.requests == []


def test_rows_without_generated_tokens_send_nothing(server):
    top = client(server.url).topk([[1, 2, 3]], response_mask=[[0, 0, 0]])
    assert server.requests == [] and top.response_mask.sum() == 0 and torch.isneginf(top.logprobs).all()


# ------------------------------------------------------------------------------------------ docs
def test_docs_page_runs_against_the_stand_in_and_says_what_it_prints(capsys):
    """docs/teacher_server.md, its server URL pointed at the stand-in (a tiny LM teacher over the page's
    96-token vocabulary): top-k shapes as printed, the sparse loss falls."""
    teacher = TinyLM(24, seed=11, vocab=96)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(3.0)
    fake = FakeVLLM(lambda tokens, temperature: teacher.logp(torch.tensor([tokens]))[0])
    try:
        text = (ROOT / "docs" / "teacher_server.md").read_text()
        assert "http://localhost:8000" in text and "vllm serve" in text and "--max-logprobs" in text
        blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
        assert len(blocks) == 2
        namespace: dict = {"__name__": "teacher_server_doc"}
        for i, block in enumerate(blocks):
            code = block.replace("http://localhost:8000", fake.url)
            exec(compile(code, f"docs/teacher_server.md block {i}", "exec"), namespace)
    finally:
        fake.close()
    out = capsys.readouterr().out
    assert "ids (2, 15, 21) torch.int64 log-probs (2, 15, 21) torch.float32" in out, out
    assert "distilled rows 18" in out, out
    losses = [float(x) for x in re.findall(r"step \d: loss ([\d.]+)", out)]
    assert len(losses) == 4 and losses[-1] < losses[0], out
    top = namespace["top"]
    assert len(fake.requests) == 1 and fake.requests[0]["prompt_logprobs"] == 21
    assert torch.equal(top.response_mask, namespace["response_mask"][:, 1:])
