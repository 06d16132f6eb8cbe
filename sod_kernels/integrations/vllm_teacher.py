"""A teacher behind vLLM's OpenAI-compatible server: its top-k log-probs for :func:`sod_kernels.fused_sparse_sod_loss`.

For token sequences the student generated, :class:`VLLMTeacher` asks the server's completions endpoint
(``POST /v1/completions`` with ``prompt`` = the token ids and ``prompt_logprobs`` = the number of log-probs
per position) how the teacher scores every position of them, and returns :class:`TeacherTopK`: ids
``[B, T, W]`` (int64) and log-probs ``[B, T, W]`` (float32) aligned with the loss's rows, plus the loss's
(shifted) ``response_mask`` and ``target_ids``.

The response format followed is that of vLLM 0.12 (unchanged on later releases): each choice of the
answer carries ``prompt_logprobs``, a list with one entry per prompt token: ``None`` for the first token
(nothing predicts it), then for token ``j`` a JSON object mapping token ids (JSON keys, so strings such as
``"1234"``) to ``{"logprob": float, "rank": int, "decoded_token": str}``: the ``n`` most likely tokens given
tokens ``< j`` plus token ``j`` itself when it is not among them (``n`` or ``n + 1`` entries).

**The shift.** Entry ``j`` describes token ``j`` given the tokens before it; row ``t`` of the loss is the
prediction made from the hidden state of token ``t``, i.e. of token ``t + 1``. So row ``t`` of the result is
entry ``t + 1`` of the answer (for a left-padded row, counted from the row's first real token), ``T = L - 1``,
and ``target_ids[:, t]`` is token ``t + 1``.

**The sampled token.** With ``include_sampled=True`` (the default) the client asks for ``k + 1`` log-probs
per position and returns ``W = k + 1`` ids: the teacher's top-k always, plus the token the student actually
wrote there; when that token is already among the top-k, the (k+1)-th most likely token instead. So
``step_divergence="sampled"`` gets the teacher's exact log-prob of the sampled token. With
``include_sampled=False``: ``W = k``, the top-k only. The server's ``--max-logprobs`` must be at least the
number asked for (``k + 1``, or ``k``).

**Temperature.** vLLM computes prompt log-probs from the model's raw logits: the request's ``temperature``
(and penalties, top-k, top-p) does not change them, so they are the teacher at temperature 1 and the loss
must run at ``temperature=1.0`` too. A server that scales prompt logits by a request field can be used
at another temperature through ``temperature=`` and ``temperature_field=``.

Only the standard library does the HTTP (``urllib``, ``json``, ``concurrent.futures``): vLLM is not
imported and need not be installed where training runs.
"""

from __future__ import annotations

import http.client
import json
import math
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

import torch

from ..sparse.validation import logprob_tolerance

__all__ = [
    "TeacherConnectionError",
    "TeacherHTTPError",
    "TeacherResponseError",
    "TeacherServerError",
    "TeacherTimeoutError",
    "TeacherTopK",
    "TeacherVocabularyError",
    "VLLMTeacher",
]

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_MAX_MESSAGE = 500


# ------------------------------------------------------------------------------------------------ errors
class TeacherServerError(RuntimeError):
    """Base class: the teacher server could not give usable top-k log-probs."""


class TeacherHTTPError(TeacherServerError):
    """The server answered with an HTTP error status; ``status`` and the server's ``message`` are kept."""

    def __init__(self, status: int, message: str, url: str, attempts: int):
        self.status, self.message, self.url, self.attempts = status, message, url, attempts
        tries = f" (after {attempts} attempts)" if attempts > 1 else ""
        super().__init__(f"teacher server {url} answered HTTP {status}{tries}: {message}")


class TeacherConnectionError(TeacherServerError):
    """The server could not be reached (connection refused or reset, unknown host)."""


class TeacherTimeoutError(TeacherServerError):
    """The server did not answer within ``timeout`` seconds, on every attempt."""


class TeacherResponseError(TeacherServerError):
    """The answer is not in vLLM's format: not JSON, fields missing, fewer positions than tokens, keys that
    are not token ids, log-probs that are not log-probabilities."""


class TeacherVocabularyError(TeacherResponseError):
    """The teacher's tokens do not fit the student's: ids outside the student's vocabulary, or the server
    scored other tokens than the ones sent (a tokenizer or vocabulary mismatch)."""


# ------------------------------------------------------------------------------------------------ result
@dataclass
class TeacherTopK:
    """The teacher's top-k log-probs, aligned with the rows of :func:`sod_kernels.fused_sparse_sod_loss`.

    ids:           ``[B, T, W]`` int64, ``T = L - 1``: row ``t`` lists the ids the teacher gives token
                   ``t + 1`` (the top-k by log-prob, then the sampled token when ``include_sampled`` put it
                   there). Rows that are not distilled hold ``0..W-1``.
    logprobs:      ``[B, T, W]`` float32, the teacher's log-probs of those ids; ``-inf`` on rows that are not
                   distilled (so a mask that disagrees with this one is refused by the loss's input checks).
    response_mask: ``[B, T]`` int64, 1 where the row is distilled (token ``t + 1`` was generated by the
                   student): the loss's ``response_mask``.
    target_ids:    ``[B, T]`` int64, token ``t + 1`` (0 on padding): the loss's ``target_ids``.
    k:             the number of top ids per row; ``W = k + 1`` with the sampled token, else ``k``.
    temperature:   the temperature the log-probs are at; pass the same to the loss.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    response_mask: torch.Tensor
    target_ids: torch.Tensor
    k: int
    temperature: float

    def loss_inputs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`sod_kernels.fused_sparse_sod_loss` (``teacher_topk_ids``,
        ``teacher_topk_logprobs``, ``response_mask``, ``target_ids``, ``temperature``)."""
        return {"teacher_topk_ids": self.ids, "teacher_topk_logprobs": self.logprobs,
                "response_mask": self.response_mask, "target_ids": self.target_ids,
                "temperature": self.temperature}

    def to(self, device: torch.device | str) -> TeacherTopK:
        """The same result with its tensors on ``device``."""
        return TeacherTopK(self.ids.to(device), self.logprobs.to(device), self.response_mask.to(device),
                           self.target_ids.to(device), self.k, self.temperature)


@dataclass
class _Row:
    """One sequence: its tokens sit at positions ``offset .. offset + len(tokens) - 1`` of the batch row;
    ``generated[j]`` says whether the student wrote ``tokens[j]``."""

    tokens: list[int]
    offset: int
    generated: list[bool]


# ------------------------------------------------------------------------------------------------ client
class VLLMTeacher:
    """Client of a teacher served by vLLM (``vllm serve <teacher> --max-logprobs <k + 1>``).

    Args:
        base_url: the server, e.g. ``"http://localhost:8000"`` or ``"http://localhost:8000/v1"`` (the
            request goes to ``<base>/v1/completions``; a URL ending in ``/completions`` is used as is).
        model: the served model name (``--served-model-name``, else the path given to ``vllm serve``).
        k: top ids per position (``>= 1``).
        vocab_size: the student's vocabulary size (its lm_head's rows): every id must lie below it.
        include_sampled: add the sampled token to each position's ids (``W = k + 1``, see the module doc).
        temperature: the temperature of the returned log-probs; must be 1.0 (vLLM's prompt log-probs are of
            the raw logits) unless ``temperature_field`` names the request field a server scales them by.
        temperature_field: that request field, sent with ``temperature``.
        timeout: seconds to wait for each answer (``> 0``).
        max_retries: further attempts after a timeout, a lost connection or HTTP 408/429/500/502/503/504,
            with ``retry_backoff * 2**i`` seconds between them; other errors are raised at once.
        retry_backoff: seconds before the first retry (``>= 0``).
        max_batch_size: sequences per request (vLLM takes a list of token lists as ``prompt``).
        concurrency: requests in flight at once (threads).
        api_key: sent as ``Authorization: Bearer <api_key>`` (for ``vllm serve --api-key``).
        extra_body: more fields for every request (they cannot override the ones this client sets).
    """

    def __init__(self, base_url: str, model: str, *, k: int, vocab_size: int, include_sampled: bool = True,
                 temperature: float = 1.0, temperature_field: str | None = None, timeout: float = 60.0,
                 max_retries: int = 2, retry_backoff: float = 0.5, max_batch_size: int = 16,
                 concurrency: int = 4, api_key: str | None = None,
                 extra_body: Mapping[str, Any] | None = None):
        self.url = _completions_url(base_url)
        if not isinstance(model, str) or not model:
            raise TypeError(f"model must be a non-empty string (the served model name), got {model!r}")
        self.model = model
        self.k = _int_at_least(k, "k", 1)
        self.vocab_size = _int_at_least(vocab_size, "vocab_size", 1)
        if not isinstance(include_sampled, bool):
            raise TypeError(f"include_sampled must be a bool, got {include_sampled!r}")
        self.include_sampled = include_sampled
        self.width = self.k + 1 if include_sampled else self.k
        if self.width > self.vocab_size:
            raise ValueError(f"k = {self.k} needs {self.width} distinct ids per position "
                             f"({'k + 1 with include_sampled' if include_sampled else 'k'}), more than "
                             f"vocab_size = {self.vocab_size}")
        self.temperature = _positive(temperature, "temperature")
        if temperature_field is not None and (not isinstance(temperature_field, str) or not temperature_field):
            raise TypeError(f"temperature_field must be a non-empty string or None, got {temperature_field!r}")
        if self.temperature != 1.0 and temperature_field is None:
            raise ValueError(
                f"temperature = {self.temperature}: vLLM's prompt log-probs are computed from the raw logits, "
                "whatever the request's temperature, so they are the teacher at temperature 1; distil with "
                "temperature=1.0 (and the loss at temperature=1.0), or name the request field your server "
                "scales prompt logits by with temperature_field=")
        self.temperature_field = temperature_field
        self.timeout = _positive(timeout, "timeout")
        self.max_retries = _int_at_least(max_retries, "max_retries", 0)
        if isinstance(retry_backoff, bool) or not isinstance(retry_backoff, (int, float)):
            raise TypeError(f"retry_backoff must be a number of seconds, got {type(retry_backoff).__name__}")
        if not math.isfinite(retry_backoff) or retry_backoff < 0:
            raise ValueError(f"retry_backoff must be a finite number of seconds >= 0, got {retry_backoff!r}")
        self.retry_backoff = float(retry_backoff)
        self.max_batch_size = _int_at_least(max_batch_size, "max_batch_size", 1)
        self.concurrency = _int_at_least(concurrency, "concurrency", 1)
        if api_key is not None and not isinstance(api_key, str):
            raise TypeError("api_key must be a string or None")
        self.api_key = api_key
        if extra_body is not None and not isinstance(extra_body, Mapping):
            raise TypeError(f"extra_body must be a mapping of request fields, got {type(extra_body).__name__}")
        self.extra_body = dict(extra_body or {})
        clash = set(self.extra_body) & {"model", "prompt", "prompt_logprobs", "max_tokens", "n", "stream",
                                        "temperature", "return_token_ids"}
        if clash:
            raise ValueError(f"extra_body cannot set {sorted(clash)}: the client sets them")
        self._opener = urllib.request.build_opener()  # proxies from the environment, as urlopen

    # ------------------------------------------------------------------------------------------ public
    def topk(self, input_ids, *, attention_mask: torch.Tensor | None = None, response_mask=None,
             response_start=None) -> TeacherTopK:
        """The teacher's top-k log-probs at every distilled position of ``input_ids``.

        Args:
            input_ids: ``[B, L]`` integer tensor (padded; give ``attention_mask``) or a list of ``B`` token
                id lists of any lengths (right-padded in the result). Unshifted: prompt and rollout tokens.
            attention_mask: ``[B, L]`` 0/1 for a tensor, 1 on real tokens, one contiguous run per row (left
                or right padding).
            response_mask: unshifted, one entry per token (a ``[B, L]`` tensor or lists shaped as
                ``input_ids``): 1 where the student generated the token. Or
            response_start: ``B`` ints: the position (in ``input_ids``) of each row's first generated token;
                every later real token counts as generated. Give at most one of the two; with neither, every
                token after a row's first is distilled.
        Returns:
            :class:`TeacherTopK` with ``T = L - 1`` rows; rows without a generated next token are not sent
            to the server (a sequence is sent up to its last generated token).
        Raises:
            TypeError / ValueError: bad inputs (checked before any request).
            TeacherHTTPError, TeacherConnectionError, TeacherTimeoutError, TeacherResponseError,
            TeacherVocabularyError: see their docs.
        """
        rows, L = _rows(input_ids, attention_mask, response_mask, response_start, self.vocab_size)
        B, T, W = len(rows), L - 1, self.width
        ids = torch.arange(W, dtype=torch.int64).expand(B, T, W).clone()
        logprobs = torch.full((B, T, W), float("-inf"), dtype=torch.float32)
        mask = torch.zeros(B, T, dtype=torch.int64)
        targets = torch.zeros(B, T, dtype=torch.int64)
        jobs = []  # (row index, tokens to send, positions j within them to distil)
        for b, row in enumerate(rows):
            n = len(row.tokens)
            if n > 1:
                targets[b, row.offset:row.offset + n - 1] = torch.tensor(row.tokens[1:], dtype=torch.int64)
            wanted = [j for j in range(1, n) if row.generated[j]]
            if wanted:
                mask[b, [row.offset + j - 1 for j in wanted]] = 1
                jobs.append((b, row.tokens[:wanted[-1] + 1], wanted))
        batches = [jobs[i:i + self.max_batch_size] for i in range(0, len(jobs), self.max_batch_size)]
        for b, positions, row_ids, row_logprobs in self._run(batches):
            offset = rows[b].offset
            where = [offset + j - 1 for j in positions]
            ids[b, where] = torch.tensor(row_ids, dtype=torch.int64)
            logprobs[b, where] = torch.tensor(row_logprobs, dtype=torch.float32)
        return TeacherTopK(ids=ids, logprobs=logprobs, response_mask=mask, target_ids=targets, k=self.k,
                           temperature=self.temperature)

    # ------------------------------------------------------------------------------------------ requests
    def _run(self, batches):
        if not batches:
            return []
        results = []
        if len(batches) == 1 or self.concurrency == 1:
            for batch in batches:
                results.extend(self._batch(batch))
            return results
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(batches)),
                                  thread_name_prefix="vllm-teacher")
        try:
            futures = [pool.submit(self._batch, batch) for batch in batches]
            for future in as_completed(futures):
                results.extend(future.result())  # the first failure propagates
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return results

    def payload(self, prompts: list[list[int]]) -> dict[str, Any]:
        """The JSON body of one request for ``prompts`` (token id lists)."""
        body: dict[str, Any] = dict(self.extra_body)
        body.update({"model": self.model, "prompt": prompts, "prompt_logprobs": self.width, "max_tokens": 1,
                     "n": 1, "stream": False, "temperature": 1.0, "return_token_ids": True})
        if self.temperature_field is not None:
            body[self.temperature_field] = self.temperature
        return body

    def _batch(self, batch):
        prompts = [tokens for _, tokens, _ in batch]
        answer = self._post(self.payload(prompts))
        choices = _choices(answer, len(prompts))
        out = []
        for (b, tokens, positions), choice in zip(batch, choices):
            per_position = _prompt_logprobs(choice, tokens, b)
            row_ids, row_logprobs = [], []
            for j in positions:
                top_ids, top_lp = self._position(per_position[j], tokens[j], b, j)
                row_ids.append(top_ids)
                row_logprobs.append(top_lp)
            out.append((b, positions, row_ids, row_logprobs))
        return out

    def _post(self, body: dict[str, Any]) -> Any:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key is not None:
            headers["Authorization"] = f"Bearer {self.api_key}"
        attempts = self.max_retries + 1
        failure: Exception | None = None
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.retry_backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with self._opener.open(request, timeout=self.timeout) as response:
                    raw = response.read()
            except urllib.error.HTTPError as err:
                failure = TeacherHTTPError(err.code, _error_message(_read_quietly(err)), self.url, attempt + 1)
                if err.code in RETRY_STATUSES and attempt + 1 < attempts:
                    continue
                raise failure from None
            except (TimeoutError, socket.timeout) as err:
                failure = TeacherTimeoutError(f"teacher server {self.url} did not answer within {self.timeout} s "
                                              f"({attempts} attempt{'s' if attempts > 1 else ''}); raise "
                                              "timeout= or lower max_batch_size=")
                failure.__cause__ = err
                continue
            except urllib.error.URLError as err:
                if isinstance(err.reason, (TimeoutError, socket.timeout)):
                    failure = TeacherTimeoutError(f"teacher server {self.url} did not answer within "
                                                  f"{self.timeout} s ({attempts} attempt"
                                                  f"{'s' if attempts > 1 else ''}); raise timeout= or lower "
                                                  "max_batch_size=")
                else:
                    failure = TeacherConnectionError(f"cannot reach the teacher server at {self.url}: {err.reason} "
                                                     f"({attempts} attempt{'s' if attempts > 1 else ''}); is "
                                                     "`vllm serve` running there?")
                failure.__cause__ = err
                continue
            except (ConnectionError, http.client.HTTPException, OSError) as err:
                failure = TeacherConnectionError(f"connection to the teacher server at {self.url} failed: "
                                                 f"{type(err).__name__}: {err} ({attempts} attempt"
                                                 f"{'s' if attempts > 1 else ''})")
                failure.__cause__ = err
                continue
            return _decode(raw, self.url)
        assert failure is not None
        raise failure

    # ------------------------------------------------------------------------------------------ parsing
    def _position(self, entry, token: int, b: int, j: int) -> tuple[list[int], list[float]]:
        """The ``W`` ids and log-probs kept from answer entry ``j`` (the teacher on token ``j`` of row ``b``)."""
        where = f"row {b}, token {j}"
        if not isinstance(entry, dict) or not entry:
            raise TeacherResponseError(f"prompt_logprobs[{j}] of {where} must be a non-empty object mapping token "
                                       f"ids to log-probs, got {_show(entry)}")
        asked = self.width
        tol = logprob_tolerance(asked, torch.float32)
        parsed: dict[int, float] = {}
        for key, value in entry.items():
            tid = _token_id(key, where)
            if tid in parsed:
                raise TeacherResponseError(f"prompt_logprobs at {where} lists token id {tid} twice")
            if tid >= self.vocab_size:
                raise TeacherVocabularyError(
                    f"the teacher returned token id {tid} at {where}, outside the student's vocabulary "
                    f"(vocab_size = {self.vocab_size}): teacher and student must share one tokenizer")
            lp = _logprob(value, tid, where)
            if lp > tol:
                raise TeacherResponseError(f"log-prob {lp} of token id {tid} at {where} is above 0: not a "
                                           "log-probability")
            parsed[tid] = min(lp, 0.0)
        if token not in parsed:
            raise TeacherResponseError(
                f"prompt_logprobs at {where} has no entry for the token sent there (id {token}); vLLM always "
                "includes it, so the answer does not describe the tokens sent (shifted or re-tokenized)")
        if len(parsed) not in (asked, asked + 1):
            raise TeacherResponseError(f"prompt_logprobs at {where} has {len(parsed)} entries; asked for {asked} "
                                       f"(vLLM returns {asked}, or {asked + 1} with the prompt token)")
        if math.fsum(math.exp(v) for v in parsed.values()) > 1.0 + tol:
            raise TeacherResponseError(f"the probabilities at {where} sum to more than 1: not log-probabilities "
                                       "of one distribution")
        ranked = sorted(parsed.items(), key=lambda item: (-item[1], item[0]))
        if len(parsed) == asked:  # the sampled token is among the asked-for most likely ones
            kept = ranked
        else:  # asked + 1: the most likely `asked` ones, and the sampled token outside them
            others = [item for item in ranked if item[0] != token]
            kept = others[:self.k] + [(token, parsed[token])] if self.include_sampled else others[:self.k]
        return [tid for tid, _ in kept], [lp for _, lp in kept]


# ------------------------------------------------------------------------------------------------ helpers
def _int_at_least(value, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def _positive(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def _completions_url(base_url: str) -> str:
    if not isinstance(base_url, str):
        raise TypeError(f"base_url must be a string, got {type(base_url).__name__}")
    parts = urllib.parse.urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"base_url must be an http(s) URL such as 'http://localhost:8000', got {base_url!r}")
    url = base_url.rstrip("/")
    if url.endswith("/completions"):
        return url
    return url + ("/completions" if url.endswith("/v1") else "/v1/completions")


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _token_id(key, where: str) -> int:
    text = key if isinstance(key, str) else str(key)
    digits = text[len("token_id:"):] if text.startswith("token_id:") else text
    if digits.isascii() and digits.isdigit():
        return int(digits)
    raise TeacherResponseError(
        f"prompt_logprobs at {where} is keyed by {text!r}, not by a token id. vLLM keys `prompt_logprobs` by "
        "token id; text keys come from OpenAI-style `logprobs.top_logprobs`, which cannot be mapped back to ids "
        "reliably (vLLM's `return_tokens_as_token_ids` option writes them as 'token_id:<id>', which this "
        "client also reads)")


def _logprob(value, tid: int, where: str) -> float:
    lp = value.get("logprob") if isinstance(value, dict) else value
    if isinstance(lp, bool) or not isinstance(lp, (int, float)):
        raise TeacherResponseError(f"the entry of token id {tid} at {where} must be a number or an object with a "
                                   f"numeric 'logprob', got {_show(value)}")
    if not math.isfinite(lp):
        raise TeacherResponseError(f"log-prob of token id {tid} at {where} is {lp}, not a finite number")
    return float(lp)


def _no_duplicate_keys(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise TeacherResponseError(f"the answer repeats the key {key!r} within one JSON object")
        out[key] = value
    return out


def _decode(raw: bytes, url: str) -> Any:
    try:
        answer = json.loads(raw, object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TeacherResponseError(f"the answer of {url} is not valid JSON ({err}): {_show(raw[:200])}") from None
    if not isinstance(answer, dict):
        raise TeacherResponseError(f"the answer of {url} must be a JSON object, got {_show(answer)}")
    if "error" in answer and "choices" not in answer:
        raise TeacherResponseError(f"the teacher server {url} reported an error: {_error_message(raw)}")
    return answer


def _read_quietly(err: urllib.error.HTTPError) -> bytes:
    try:
        return err.read() or b""
    except Exception:  # noqa: BLE001 - the status alone is still worth reporting
        return b""


def _error_message(raw: bytes) -> str:
    """The server's message: vLLM's ``{"error": {"message": ...}}`` (or the older flat ``{"message": ...}``),
    FastAPI's ``{"detail": ...}``, else the raw text."""
    text = raw.decode("utf-8", errors="replace").strip()
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict):
        inner = body.get("error")
        if isinstance(inner, dict) and "message" in inner:
            return str(inner["message"])[:_MAX_MESSAGE]
        for key in ("message", "error", "detail"):
            if key in body and body[key]:
                return str(body[key])[:_MAX_MESSAGE]
    return (text or "(empty body)")[:_MAX_MESSAGE]


def _choices(answer: dict, count: int) -> list[dict]:
    choices = answer.get("choices")
    if not isinstance(choices, list):
        raise TeacherResponseError(f"the answer has no 'choices' list (got {_show(choices)})")
    if len(choices) != count:
        raise TeacherResponseError(f"the answer has {len(choices)} choices for {count} prompts (one each expected)")
    if not all(isinstance(c, dict) for c in choices):
        raise TeacherResponseError("every choice of the answer must be a JSON object")
    index = [c.get("index") for c in choices]
    if all(i is None for i in index):
        return choices
    if sorted(i for i in index if isinstance(i, int) and not isinstance(i, bool)) != list(range(count)):
        raise TeacherResponseError(f"the choices' 'index' fields must be 0..{count - 1} once each, got {index}")
    return sorted(choices, key=lambda c: c["index"])


def _prompt_logprobs(choice: dict, tokens: list[int], b: int) -> list:
    echoed = choice.get("prompt_token_ids")
    if echoed is not None and list(echoed) != tokens:
        raise TeacherVocabularyError(f"the server scored other tokens than the {len(tokens)} sent for row {b} "
                                     "(its prompt_token_ids differ): the prompt was altered or re-tokenized")
    per_position = choice.get("prompt_logprobs")
    if per_position is None:
        raise TeacherResponseError(
            f"the choice for row {b} has no 'prompt_logprobs': the server ignored the request's prompt_logprobs "
            "field (vLLM's OpenAI-compatible server returns it; other servers may not)")
    if not isinstance(per_position, list):
        raise TeacherResponseError(f"'prompt_logprobs' of row {b} must be a list, got {_show(per_position)}")
    if len(per_position) != len(tokens):
        raise TeacherResponseError(f"'prompt_logprobs' of row {b} has {len(per_position)} positions for the "
                                   f"{len(tokens)} tokens sent (a partial answer)")
    return per_position


def _as_int_list(seq, name: str) -> list[int]:
    if isinstance(seq, torch.Tensor):
        if seq.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(seq.shape)}")
        if seq.dtype.is_floating_point or seq.dtype.is_complex or seq.dtype == torch.bool:
            raise TypeError(f"{name} must hold integers, got dtype {seq.dtype}")
        return [int(v) for v in seq.tolist()]
    if isinstance(seq, (str, bytes)) or not isinstance(seq, Sequence):
        raise TypeError(f"{name} must be a list of token ids, got {type(seq).__name__}")
    out = []
    for v in seq:
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must hold ints, got {type(v).__name__} {v!r}")
        out.append(v)
    return out


def _rows(input_ids, attention_mask, response_mask, response_start, vocab: int) -> tuple[list[_Row], int]:
    """The sequences of ``input_ids``, where they sit, which tokens are generated; and ``L``."""
    if response_mask is not None and response_start is not None:
        raise ValueError("give at most one of response_mask and response_start")
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
        B, L = input_ids.shape
        table = input_ids.detach().cpu().tolist()
        if attention_mask is None:
            spans = [(0, L)] * B
        else:
            spans = _spans(attention_mask, (B, L))
        seqs = [(row[s:e], s) for row, (s, e) in zip(table, spans)]
    else:
        if attention_mask is not None:
            raise ValueError("attention_mask is for a padded [B, L] tensor; lists of token ids need none")
        if isinstance(input_ids, (str, bytes)) or not isinstance(input_ids, Sequence):
            raise TypeError(f"input_ids must be a [B, L] integer tensor or a list of token id lists, got "
                            f"{type(input_ids).__name__}")
        seqs = [(_as_int_list(seq, f"input_ids[{b}]"), 0) for b, seq in enumerate(input_ids)]
        L = max((len(s) for s, _ in seqs), default=0)
    if not seqs:
        raise ValueError("input_ids holds no sequences (B = 0)")
    if L < 2:
        raise ValueError(f"input_ids must hold at least 2 tokens in some row (one to predict from, one to "
                         f"predict), got L = {L}")
    for b, (tokens, _) in enumerate(seqs):
        bad = [t for t in tokens if t < 0 or t >= vocab]
        if bad:
            raise ValueError(f"input_ids[{b}] holds token id {bad[0]}, outside the student's vocabulary "
                             f"[0, {vocab})")
    generated = _generated(seqs, L, response_mask, response_start, isinstance(input_ids, torch.Tensor))
    return [_Row(tokens, offset, gen) for (tokens, offset), gen in zip(seqs, generated)], L


def _spans(attention_mask, shape: tuple[int, int]) -> list[tuple[int, int]]:
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
    if tuple(attention_mask.shape) != shape:
        raise ValueError(f"attention_mask must have the shape of input_ids {shape}, got "
                         f"{tuple(attention_mask.shape)}")
    spans = []
    for b, row in enumerate(attention_mask.detach().cpu().tolist()):
        if any(v not in (0, 1) for v in row):
            raise ValueError(f"attention_mask must hold only 0 and 1 (row {b})")
        on = [i for i, v in enumerate(row) if v]
        if on and on[-1] - on[0] + 1 != len(on):
            raise ValueError(f"attention_mask row {b} must mark one contiguous run of tokens (left or right "
                             "padding), got gaps")
        spans.append((on[0], on[-1] + 1) if on else (0, 0))
    return spans


def _generated(seqs, L: int, response_mask, response_start, padded: bool) -> list[list[bool]]:
    B = len(seqs)
    if response_mask is None and response_start is None:
        return [[j > 0 for j in range(len(tokens))] for tokens, _ in seqs]
    if response_start is not None:
        starts = _as_int_list(response_start, "response_start")
        if len(starts) != B:
            raise ValueError(f"response_start must hold one position per row ({B}), got {len(starts)}")
        out = []
        for b, ((tokens, offset), start) in enumerate(zip(seqs, starts)):
            if not offset + 1 <= start <= offset + len(tokens):
                raise ValueError(f"response_start[{b}] = {start} must lie in [{offset + 1}, {offset + len(tokens)}] "
                                 "(after the row's first token, at most one past its last)")
            out.append([offset + j >= start for j in range(len(tokens))])
        return out
    if isinstance(response_mask, torch.Tensor):
        if tuple(response_mask.shape) != (B, L):
            hint = " (it looks shifted already: pass one entry per token)" if tuple(response_mask.shape) == (B, L - 1) \
                else ""
            raise ValueError(f"response_mask must have shape {(B, L)}, one entry per token of input_ids, got "
                             f"{tuple(response_mask.shape)}{hint}")
        table = response_mask.detach().cpu().tolist()
        rows = [row[offset:offset + len(tokens)] for row, (tokens, offset) in zip(table, seqs)]
        outside = [b for b, (row, (tokens, offset)) in enumerate(zip(table, seqs))
                   if any(row[:offset]) or any(row[offset + len(tokens):])]
        if outside:
            raise ValueError(f"response_mask marks padding as generated in row {outside[0]}")
    else:
        if padded or isinstance(response_mask, (str, bytes)) or not isinstance(response_mask, Sequence):
            raise TypeError("response_mask must be a [B, L] tensor (or, for list input_ids, lists shaped like them)")
        if len(response_mask) != B:
            raise ValueError(f"response_mask must hold one list per row ({B}), got {len(response_mask)}")
        rows = [_as_int_list(r, f"response_mask[{b}]") for b, r in enumerate(response_mask)]
        for b, (row, (tokens, _)) in enumerate(zip(rows, seqs)):
            if len(row) != len(tokens):
                raise ValueError(f"response_mask[{b}] has {len(row)} entries for {len(tokens)} tokens (one per "
                                 "token, unshifted)")
    out = []
    for b, row in enumerate(rows):
        if any(v not in (0, 1) for v in row):
            raise ValueError(f"response_mask must hold only 0 and 1 (row {b})")
        if row and row[0]:
            raise ValueError(f"response_mask marks the first token of row {b} as generated, but nothing predicts "
                             "a row's first token; pass it unshifted (entry t describes token t)")
        out.append([bool(v) for v in row])
    return out
