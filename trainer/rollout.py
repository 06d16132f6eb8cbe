"""Multi-turn tool rollouts: the student writes an assistant turn, its tool call runs in the sandbox, the
observation is appended as a tool turn, and so on until a final answer or ``max_turns``.

Token bookkeeping is exact: the rollout keeps the token ids it fed the model, so ``response_mask`` is 1
precisely on the tokens the student sampled (including the turn's stop token) and 0 on the prompt, the
tool output and the chat-template tokens around it.  The template tokens that follow an assistant turn are
found by rendering the model's own chat template around a marker (see :class:`ChatFormat`), so the same code
serves the built-in tiny models and real chat models (Qwen3-style ``<tool_call>`` / ``<tool_response>``).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np
import torch

from .task import (FaultInjector, Problem, RewardFunction, call_reward_function, extract_answer, extract_tool_call,
                   reward)

TOOL_SCHEMA = {
    "type": "function",
    "function": {
        "name": "python",
        "description": "Run Python code and return what it prints.",
        "parameters": {"type": "object", "properties": {"code": {"type": "string", "description": "Python code"}},
                       "required": ["code"]},
    },
}
ASSISTANT_MARKER = "\u2063SOD-ASSISTANT-TURN\u2063"
USER_MARKER = "\u2063SOD-USER\u2063"
MAX_OBSERVATION_CHARS = 400
# Mixed into per-trajectory sampling seeds so they never coincide with another stream drawn from the same keys.
SAMPLING_STREAM = 0x534F44


@dataclass
class ToolObservation:
    """What a tool executor returns (the sandbox's ``ToolResult`` has the same fields)."""

    output: str
    ok: bool = True
    timed_out: bool = False


ToolExecutor = Callable[[str], ToolObservation]


class ChatFormat:
    """Token-level view of a chat template: the prompt, and the template tokens around a tool turn."""

    def __init__(self, tokenizer, system_prompt: str | None = None, use_tools_schema: bool = False):
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.tools = [TOOL_SCHEMA] if use_tools_schema else None
        self.stop_ids = sorted({i for i in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>"))
                                if i is not None and i != tokenizer.unk_token_id})
        if not self.stop_ids:
            raise ValueError("the tokenizer has neither an eos token nor <|im_end|>; assistant turns cannot stop")
        self._end_of_turn_text = self._render_after_assistant(None)

    def _render(self, messages, add_generation_prompt: bool) -> str:
        kwargs = {"tools": self.tools} if self.tools else {}
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  tokenize=False, **kwargs)

    def _messages(self, question: str, chat: Sequence[tuple[str, str]] = ()) -> list[dict]:
        turns = [{"role": role, "content": content} for role, content in chat] or \
            [{"role": "user", "content": question}]
        if self.system_prompt and turns[0]["role"] != "system":
            turns = [{"role": "system", "content": self.system_prompt}] + turns
        return turns

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with no added special tokens."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def prompt_ids(self, question: str, messages: Sequence[tuple[str, str]] = ()) -> list[int]:
        """The conversation start up to and including the assistant generation prompt: the system prompt (if
        any) and ``question`` as the user message, or the chat ``messages`` (``(role, content)`` pairs, ending
        with the user's; the system prompt goes first unless they start with a system message)."""
        return self.encode(self._render(self._messages(question, messages), add_generation_prompt=True))

    def _render_after_assistant(self, observation: str | None) -> str:
        messages = self._messages(USER_MARKER) + [{"role": "assistant", "content": ASSISTANT_MARKER}]
        if observation is None:
            text = self._render(messages, add_generation_prompt=False)
        else:
            text = self._render(messages + [{"role": "tool", "content": observation}], add_generation_prompt=True)
        position = text.rfind(ASSISTANT_MARKER)
        if position < 0:
            raise ValueError("the chat template dropped the assistant message content; cannot locate turn ends")
        return text[position + len(ASSISTANT_MARKER):]

    def tool_turn_ids(self, observation: str, last_token: int | None) -> list[int]:
        """Template tokens after an assistant turn, the tool turn holding ``observation``, and the next
        generation prompt.  ``last_token`` is the turn's last sampled token: when it is the template's
        end-of-turn token it is not repeated."""
        ids = self.encode(self._render_after_assistant(observation))
        if ids and last_token is not None and ids[0] == last_token and last_token in self.stop_ids:
            ids = ids[1:]
        return ids

    def assistant_turn_ids(self, content: str) -> list[int]:
        """A whole assistant turn as the model would write it: ``content`` then the end-of-turn token."""
        end = self.encode(self._end_of_turn_text)
        stop = end[0] if end and end[0] in self.stop_ids else self.stop_ids[0]
        return self.encode(content) + [stop]

    def conversation(self, question: str, assistant_turns: Sequence[str], observations: Sequence[str]):
        """Token ids and response mask of a full scripted conversation (for supervised warm-starts).

        ``assistant_turns[k]`` is followed by ``observations[k]`` when there is one; the last turn usually
        has none (the final answer).  Returns ``(ids, mask)``.
        """
        ids = self.prompt_ids(question)
        mask = [0] * len(ids)
        for k, content in enumerate(assistant_turns):
            turn = self.assistant_turn_ids(content)
            ids += turn
            mask += [1] * len(turn)
            if k < len(observations):
                tail = self.tool_turn_ids(observations[k], last_token=turn[-1])
                ids += tail
                mask += [0] * len(tail)
        return ids, mask


@dataclass
class GeneratedTurn:
    """One sampled assistant turn: token ids (through the stop token if sampled) and their log-probs."""

    token_ids: list[int]
    logprobs: list[float]


class TurnGenerator(Protocol):
    """Anything that continues a batch of token contexts by one assistant turn (a generator that supports
    per-trajectory seeding also takes ``keys=``, see :func:`run_rollouts`)."""

    def __call__(self, contexts: Sequence[Sequence[int]], max_new_tokens: int) -> list[GeneratedTurn]:
        ...


def sampling_seed(keys: Sequence[int]) -> int:
    """A 64-bit torch seed that is a pure function of the integer ``keys`` (e.g. seed, update, sample, turn)."""
    words = np.random.SeedSequence([SAMPLING_STREAM, *[int(k) for k in keys]]).generate_state(2, dtype=np.uint32)
    return int(words[0]) | int(words[1]) << 32


class KeyedGumbelSampler:
    """A logits processor that makes each row's sample its own: Gumbel-max with a per-row generator.

    Row b adds ``-log(E)`` (``E ~ Exp(1)``, a Gumbel draw) to its logits divided by ``temperature``, drawn
    from a generator seeded by ``seeds[b]``; greedy decoding of the result samples from
    ``softmax(logits / temperature)``.  A row's draws depend only on its seed and how many tokens it has
    generated, never on the other rows of the batch.  ``scores``: ``[B, V]``; returns ``[B, V]`` float32.

    The generators live on the device of ``scores`` (made at the first call): a GPU draws its own noise, so
    sampling costs no vocabulary-sized host work per token.  The CPU and a GPU draw different numbers from
    the same seed (other generator algorithms); the same device type always draws the same ones.
    """

    def __init__(self, seeds: Sequence[int], temperature: float):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
        self.seeds = [int(seed) for seed in seeds]
        self.generators: list[torch.Generator] | None = None
        self.temperature = temperature

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[0] != len(self.seeds):
            raise ValueError(f"scores has {scores.shape[0]} rows but the sampler has {len(self.seeds)} seeds")
        if self.generators is None or self.generators[0].device != scores.device:
            self.generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        vocab = scores.shape[-1]
        noise = torch.stack([torch.empty(vocab, dtype=torch.float32, device=scores.device).exponential_(generator=g)
                             for g in self.generators])
        return scores.float() / self.temperature - noise.log()


def describe_sampling(temperature: float) -> str:
    """The sampling settings in force in :class:`HFTurnGenerator`, as one line for a run's report."""
    if temperature == 0:
        return "sampling: greedy (temperature 0); log-probs of the untempered softmax"
    return (f"sampling: softmax(logits / {temperature:g}) over the whole vocabulary (no top-k, top-p, min-p, "
            f"repetition penalty or suppressed tokens); the recorded log-probs are those of this distribution")


class HFTurnGenerator:
    """Batched sampling with Hugging Face ``generate`` (KV cache on), left padding, stop at end of turn.

    ``temperature == 0`` means greedy decoding; log-probs are then those of the untempered softmax.
    Tokens are sampled from ``softmax(logits / temperature)`` over the whole vocabulary, where ``logits`` are
    the model's own (its logit scale and soft-cap included), and nothing else: ``generate`` gets an explicit
    generation config and the model's ``generation_config`` (a folder's ``repetition_penalty``, ``top_k``,
    ``min_p``, ``suppress_tokens``, ``bad_words_ids``...) is set aside during the call, so the recorded
    log-probs are those of the distribution each token was drawn from.
    Log-probs are computed at the sampling temperature by one of two passes (``logprobs``): ``"logits"``
    reads them from the logits ``generate`` returns (``output_logits``: it keeps ``rows x new tokens x V``
    float32 values until the turn ends); ``"forward"`` runs the model once more over context + turn and reads
    them with ``sod_kernels.fused_token_logprobs`` (no logits kept; one extra forward pass).  ``"auto"`` (the
    default): ``"forward"`` on a GPU, ``"logits"`` elsewhere.

    Without ``keys`` the batch samples from the global torch RNG (one draw for the whole batch, so a row's
    tokens depend on the batch it shares).  With ``keys`` (one tuple of ints per context) each row samples
    with :class:`KeyedGumbelSampler` seeded by :func:`sampling_seed` of its keys: the same row gets the same
    tokens whatever else is in the batch (how data-parallel ranks split a batch never changes a rollout,
    up to floating-point ties), and the global RNG is not used.
    """

    LOGPROB_PASSES = ("auto", "logits", "forward")

    def __init__(self, model, pad_token_id: int, stop_ids: Sequence[int], temperature: float,
                 logprobs: str = "auto"):
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if logprobs not in self.LOGPROB_PASSES:
            raise ValueError(f"logprobs must be one of {self.LOGPROB_PASSES}, got {logprobs!r}")
        self.model = model
        self.pad_token_id = pad_token_id
        self.stop_ids = list(stop_ids)
        self.temperature = temperature
        self.logprobs = logprobs

    @torch.no_grad()
    def __call__(self, contexts: Sequence[Sequence[int]], max_new_tokens: int,
                 keys: Sequence[Sequence[int]] | None = None) -> list[GeneratedTurn]:
        if keys is not None and len(keys) != len(contexts):
            raise ValueError(f"keys must hold one tuple per context: {len(keys)} keys, {len(contexts)} contexts")
        if not contexts:
            return []
        device = next(self.model.parameters()).device
        width = max(len(c) for c in contexts)
        input_ids = torch.full((len(contexts), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(contexts), width), dtype=torch.long)
        for i, context in enumerate(contexts):
            input_ids[i, width - len(context):] = torch.tensor(context, dtype=torch.long)
            attention[i, width - len(context):] = 1
        sample = self.temperature > 0
        was_training = self.model.training
        self.model.eval()
        from transformers import GenerationConfig, LogitsProcessorList

        processors = LogitsProcessorList()
        if sample and keys is not None:
            processors.append(KeyedGumbelSampler([sampling_seed(k) for k in keys], self.temperature))
            options = dict(do_sample=False)
        elif sample:
            options = dict(do_sample=True, temperature=self.temperature, top_k=0, top_p=1.0)
        else:
            options = dict(do_sample=False)
        mode = self.logprobs if self.logprobs != "auto" else ("forward" if device.type == "cuda" else "logits")
        attention = attention.to(device)
        generation = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=self.stop_ids,
                                      pad_token_id=self.pad_token_id, output_logits=mode == "logits",
                                      return_dict_in_generate=True, use_cache=True, **options)
        # generate() fills every setting the config passed to it leaves unset from model.generation_config (a
        # folder's generation_config.json): a neutral one during the call leaves only the settings above.
        folder_settings = self.model.generation_config
        self.model.generation_config = GenerationConfig()
        try:
            out = self.model.generate(input_ids=input_ids.to(device), attention_mask=attention,
                                      generation_config=generation, logits_processor=processors)
        finally:
            self.model.generation_config = folder_settings
        rows = out.sequences[:, width:].tolist()
        stops = set(self.stop_ids)
        lengths = [next((j + 1 for j, token in enumerate(row) if token in stops), len(row)) for row in rows]
        scale = self.temperature if sample else 1.0
        if mode == "logits":
            logp = self._logprobs_from_logits(out.logits, out.sequences[:, width:], scale)
        else:
            logp = self._logprobs_from_forward(out.sequences, attention, lengths, scale)
        self.model.train(was_training)
        return [GeneratedTurn(row[:n], row_logp[:n]) for row, row_logp, n in zip(rows, logp.cpu().tolist(), lengths)]

    @staticmethod
    def _logprobs_from_logits(logits, new: torch.Tensor, scale: float) -> torch.Tensor:
        """``[B, n]`` log-probs of the generated tokens ``new`` from ``generate``'s per-position logits, one
        position at a time on the model's device (no ``[B, n, V]`` stack, nothing vocabulary-sized on the host)."""
        logp = torch.zeros(new.shape, dtype=torch.float32, device=new.device)
        for t in range(new.shape[1]):
            step = torch.log_softmax(logits[t].float() / scale, dim=-1)
            logp[:, t] = step.gather(-1, new[:, t:t + 1]).squeeze(-1)
        return logp

    def _logprobs_from_forward(self, sequences: torch.Tensor, attention: torch.Tensor, lengths: list[int],
                               scale: float) -> torch.Tensor:
        """``[B, n]`` log-probs of the generated tokens (``sequences[:, width:]``) from one forward pass over the
        left-padded contexts and the turns (each up to its length), positions counted as ``generate`` counts
        them, and the fused log-prob kernel on the final hidden states: no logits are materialized."""
        from sod_kernels import fused_token_logprobs

        from .models import decoder_body, output_head

        width = attention.shape[1]
        n = sequences.shape[1] - width
        generated = torch.arange(n, device=sequences.device)[None, :] < torch.tensor(lengths,
                                                                                   device=sequences.device)[:, None]
        mask = torch.cat([attention, generated.to(attention.dtype)], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = decoder_body(self.model)(input_ids=sequences, attention_mask=mask, position_ids=positions,
                                          use_cache=False).last_hidden_state
        head = output_head(self.model)
        return fused_token_logprobs(head.fold(hidden[:, width - 1:width - 1 + n]), head.weight, sequences[:, width:],
                                    temperature=scale, softcap=head.softcap).float()


@dataclass
class Trajectory:
    """One multi-turn rollout.

    token_ids / response_mask / sample_logprobs are aligned (log-probs 0 where the mask is 0).
    steps: per assistant turn, ``(start, end)`` token span in ``token_ids``.
    fault_after_step: 1-based indices of the steps whose tool observation was corrupted.
    """

    group: int
    problem: Problem
    token_ids: list[int]
    response_mask: list[int]
    sample_logprobs: list[float]
    prompt_length: int
    assistant_texts: list[str] = field(default_factory=list)
    observations: list[str] = field(default_factory=list)
    steps: list[tuple[int, int]] = field(default_factory=list)
    fault_after_step: list[int] = field(default_factory=list)
    final_answer: str | None = None
    final_text: str = ""
    reward: float = 0.0
    finished: bool = False

    @property
    def num_generated(self) -> int:
        """Number of tokens the student generated."""
        return sum(self.response_mask)


def execute_batch(executor: ToolExecutor, codes: Sequence[str], workers: int) -> list[ToolObservation]:
    """Run tool calls concurrently (each call is its own sandboxed process) and keep their order."""
    if workers <= 1 or len(codes) <= 1:
        return [executor(code) for code in codes]
    with ThreadPoolExecutor(max_workers=min(workers, len(codes))) as pool:
        return list(pool.map(executor, codes))


def format_observation(result) -> str:
    """The text of a tool turn from an executor result (trimmed; a timeout or error is stated)."""
    text = str(result.output).strip()
    if getattr(result, "timed_out", False):
        text = (text + "\n" if text else "") + "Error: timed out"
    if len(text) > MAX_OBSERVATION_CHARS:
        text = text[:MAX_OBSERVATION_CHARS] + "..."
    return text


@dataclass
class RolloutSettings:
    """Limits of one rollout batch."""

    max_turns: int
    max_new_tokens: int
    max_total_tokens: int
    tool_workers: int = 4
    reward_fn: RewardFunction | None = None  # called as reward_fn(final message, answer); None: task.reward


def run_rollouts(problems: Sequence[Problem], groups: Sequence[int], generate: TurnGenerator, chat: ChatFormat,
                 executor: ToolExecutor, settings: RolloutSettings, faults: FaultInjector | None = None,
                 fault_keys: Sequence[int] = (), indices: Sequence[int] | None = None,
                 sampling_keys: Sequence[int] | None = None) -> list[Trajectory]:
    """Roll out every problem to a final answer or ``max_turns`` assistant turns, batching generation.

    ``fault_keys`` (e.g. the update index) are mixed into the fault injector's draw together with the
    sample index and turn, so faults are reproducible.  ``indices``: each problem's sample index (default
    ``0, 1, ...``; a data-parallel rank passes the global indices of its share of a batch).
    ``sampling_keys`` (e.g. seed and update): when given, ``generate`` is called with
    ``keys=[(*sampling_keys, index, turn), ...]``, one per context, so each trajectory samples from its own
    seeded stream (:class:`HFTurnGenerator`); otherwise it is called without keys.
    """
    if settings.max_turns < 1:
        raise ValueError(f"max_turns must be >= 1, got {settings.max_turns}")
    if len(problems) != len(groups):
        raise ValueError(f"problems ({len(problems)}) and groups ({len(groups)}) must have one entry each")
    indices = list(range(len(problems))) if indices is None else [int(i) for i in indices]
    if len(indices) != len(problems):
        raise ValueError(f"indices ({len(indices)}) must have one entry per problem ({len(problems)})")
    trajectories = []
    for problem, group in zip(problems, groups):
        prompt = chat.prompt_ids(problem.question, problem.messages)
        trajectories.append(Trajectory(group=group, problem=problem, token_ids=list(prompt),
                                       response_mask=[0] * len(prompt), sample_logprobs=[0.0] * len(prompt),
                                       prompt_length=len(prompt)))
    active = list(range(len(trajectories)))
    for turn in range(settings.max_turns):
        if not active:
            break
        contexts = [trajectories[i].token_ids for i in active]
        if sampling_keys is None:
            outputs = generate(contexts, settings.max_new_tokens)
        else:
            keys = [(*sampling_keys, indices[i], turn) for i in active]
            outputs = generate(contexts, settings.max_new_tokens, keys=keys)
        pending = []
        for i, out in zip(active, outputs):
            traj = trajectories[i]
            start = len(traj.token_ids)
            traj.token_ids += out.token_ids
            traj.response_mask += [1] * len(out.token_ids)
            traj.sample_logprobs += out.logprobs
            traj.steps.append((start, len(traj.token_ids)))
            text = chat.tokenizer.decode(out.token_ids, skip_special_tokens=False)
            traj.assistant_texts.append(text)
            code = extract_tool_call(text)
            if code is None:
                traj.final_text = chat.tokenizer.decode(out.token_ids, skip_special_tokens=True)
                traj.final_answer = extract_answer(traj.final_text)
                traj.finished = True
            elif turn + 1 < settings.max_turns:
                pending.append((i, code, out.token_ids[-1] if out.token_ids else None))
        results = execute_batch(executor, [code for _, code, _ in pending], settings.tool_workers)
        still = []
        for (i, _, last_token), result in zip(pending, results):
            traj = trajectories[i]
            observation = format_observation(result)
            if faults is not None:
                observation, faulted = faults.maybe_corrupt(observation, *fault_keys, indices[i], turn)
                if faulted:
                    traj.fault_after_step.append(turn + 1)
            traj.observations.append(observation)
            tail = chat.tool_turn_ids(observation, last_token=last_token)
            if len(traj.token_ids) + len(tail) + settings.max_new_tokens > settings.max_total_tokens:
                continue
            traj.token_ids += tail
            traj.response_mask += [0] * len(tail)
            traj.sample_logprobs += [0.0] * len(tail)
            still.append(i)
        active = still
    for traj in trajectories:
        if settings.reward_fn is not None:
            traj.reward = call_reward_function(settings.reward_fn, traj.final_text, traj.problem.answer)
        else:
            traj.reward = reward(traj.final_answer, traj.problem.answer, traj.problem.answer_type)
    return trajectories


def trajectory_record(traj: Trajectory) -> dict:
    """A JSON-serialisable summary of a trajectory (for logs)."""
    return {"group": traj.group, "question": traj.problem.question, "answer": traj.problem.answer,
            "final_answer": traj.final_answer, "reward": traj.reward, "turns": traj.assistant_texts,
            "observations": traj.observations, "fault_after_step": traj.fault_after_step,
            "tokens": len(traj.token_ids), "generated": traj.num_generated}


def dumps_trajectory(traj: Trajectory) -> str:
    """One JSON line describing ``traj``."""
    return json.dumps(trajectory_record(traj))
