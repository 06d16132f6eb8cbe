"""Benchmark inputs: two families of random distillation problems, drawn fresh (never zeros).

- ``worst_case``: hidden states ~ N(0, 1), lm_head weights ~ N(0, 1/H).  Logits have unit variance, so
  both softmaxes are nearly uniform (entropy close to log V): nothing can be skipped, and every
  vocabulary tile matters.
- ``lm_like``: peaked next-token distributions with the teacher correlated to the student.  Student and
  teacher share a vocabulary embedding ``E [V, r]`` and a per-token latent ``u [N, r]``.  The student's
  hidden state is ``u`` embedded in ``Hs`` dimensions by an orthonormal map ``R_s`` plus small isotropic
  noise; its weight is ``s * E R_s``, so its logits are ``s * u E^T`` (plus noise).  The teacher sees
  ``u + sigma * xi`` through its own orthonormal map ``R_t`` into ``Ht`` dimensions.  The logit scale ``s``
  is calibrated (bisection on a sample of rows) so that the student's mean next-token entropy is about
  ``LM_TARGET_ENTROPY`` nats, the range real language models show.

Every token is distilled: the rows are cut into steps of ``STEP_TOKENS`` consecutive tokens (one
trajectory of ``N`` tokens, ``step_ids = arange(N) // STEP_TOKENS``), so all methods do the same
``N x V`` work and the step weights of this package have several steps to weigh.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FAMILIES = ("worst_case", "lm_like")
STEP_TOKENS = 256              # tokens per step (one assistant turn) in the generated trajectory
LM_RANK = 64                   # rank of the shared latent factors of the lm_like family
LM_TARGET_ENTROPY = 2.0        # nats: the student's mean next-token entropy in the lm_like family
LM_TEACHER_NOISE = 0.3         # sigma: teacher latent = student latent + sigma * N(0, 1)
LM_HIDDEN_NOISE = 0.1          # isotropic noise added to the lm_like hidden states
CALIBRATION_ROWS = 64          # rows used to calibrate the logit scale and to report input statistics
CALIBRATION_STEPS = 24         # bisection steps on log(scale)
SCALE_BOUNDS = (1e-3, 1e3)     # bisection bracket of the logit scale


@dataclass
class BenchInputs:
    """One distillation problem: ``[N, H]`` hidden states, ``[V, H]`` weights, ``[1, N]`` step ids, targets.

    ``target_ids`` ``[N]`` holds tokens drawn from the student's distribution (Liger takes them as labels;
    with ``weight_hard_loss=0`` they only mark which rows count).
    """

    family: str
    student_hidden: torch.Tensor
    student_weight: torch.Tensor
    teacher_hidden: torch.Tensor
    teacher_weight: torch.Tensor
    step_ids: torch.Tensor
    target_ids: torch.Tensor

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of the problem (for byte counts)."""
        return [self.student_hidden, self.student_weight, self.teacher_hidden, self.teacher_weight,
                self.step_ids, self.target_ids]

    def nbytes(self) -> int:
        """Bytes held by the inputs."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def zero_grads(self) -> None:
        """Drop the student's gradients (before a timed or measured iteration)."""
        self.student_hidden.grad = None
        self.student_weight.grad = None


def step_ids_for(num_tokens: int, device: torch.device | str) -> torch.Tensor:
    """``[1, N]`` int64 step ids: consecutive runs of ``STEP_TOKENS`` tokens, every token distilled."""
    return (torch.arange(num_tokens, device=device) // STEP_TOKENS).unsqueeze(0)


def _orthonormal_rows(rank: int, width: int, generator: torch.Generator, device) -> torch.Tensor:
    """``[rank, width]`` with orthonormal rows (``rank <= width``)."""
    q, _ = torch.linalg.qr(torch.randn(width, rank, generator=generator, device=device))
    return q.T.contiguous()


def _mean_entropy(logits: torch.Tensor) -> float:
    logp = torch.log_softmax(logits.float(), dim=-1)
    return float(-(logp.exp() * logp).sum(-1).mean())


def calibrate_scale(latent: torch.Tensor, embedding: torch.Tensor, target_entropy: float) -> float:
    """Logit scale ``s`` such that softmax(s * latent @ embedding.T) has mean entropy ``target_entropy``.

    Entropy decreases monotonically with the scale; bisection on ``log s`` within ``SCALE_BOUNDS``.
    """
    base = latent.float() @ embedding.float().T
    lo, hi = math.log(SCALE_BOUNDS[0]), math.log(SCALE_BOUNDS[1])
    for _ in range(CALIBRATION_STEPS):
        mid = 0.5 * (lo + hi)
        if _mean_entropy(base * math.exp(mid)) > target_entropy:
            lo = mid
        else:
            hi = mid
    return math.exp(0.5 * (lo + hi))


def _sample_targets(hidden: torch.Tensor, weight: torch.Tensor, generator: torch.Generator,
                    block: int) -> torch.Tensor:
    """Tokens drawn from softmax(hidden @ weight.T), ``block`` rows at a time (never all logits at once)."""
    out = torch.empty(hidden.shape[0], dtype=torch.int64, device=hidden.device)
    for start in range(0, hidden.shape[0], block):
        probs = torch.softmax((hidden[start:start + block].float() @ weight.float().T), dim=-1)
        out[start:start + block] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return out


def make_inputs(family: str, num_tokens: int, vocab: int, student_width: int, teacher_width: int, *,
                dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", seed: int = 0,
                sample_block: int = 1024) -> BenchInputs:
    """Draw one problem of the given family and size.

    Args:
        family: ``"worst_case"`` or ``"lm_like"`` (see the module docstring).
        num_tokens, vocab, student_width, teacher_width: ``N``, ``V``, ``Hs``, ``Ht``.
        dtype: dtype of hidden states and weights (generated in float32, then cast).
        device: where the tensors live (drawn there, with a generator of that device).
        seed: seed of the generator; every call draws fresh values for a fresh seed.
        sample_block: rows per block when sampling ``target_ids``.
    Returns:
        :class:`BenchInputs` whose student tensors require gradients.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if min(num_tokens, vocab, student_width, teacher_width) < 1:
        raise ValueError("num_tokens, vocab, student_width and teacher_width must be positive")
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    N, V, Hs, Ht = num_tokens, vocab, student_width, teacher_width
    randn = lambda *shape: torch.randn(*shape, generator=gen, device=device)  # noqa: E731
    if family == "worst_case":
        sh, th = randn(N, Hs), randn(N, Ht)
        sw, tw = randn(V, Hs) / math.sqrt(Hs), randn(V, Ht) / math.sqrt(Ht)
    else:
        rank = min(LM_RANK, Hs, Ht)
        embedding = randn(V, rank)
        latent = randn(N, rank)
        rows = min(CALIBRATION_ROWS, N)
        scale = calibrate_scale(latent[:rows], embedding, LM_TARGET_ENTROPY)
        rs, rt = _orthonormal_rows(rank, Hs, gen, device), _orthonormal_rows(rank, Ht, gen, device)
        sh = latent @ rs + LM_HIDDEN_NOISE * randn(N, Hs)
        th = (latent + LM_TEACHER_NOISE * randn(N, rank)) @ rt + LM_HIDDEN_NOISE * randn(N, Ht)
        sw, tw = scale * (embedding @ rs), scale * (embedding @ rt)
        del embedding, latent
    targets = _sample_targets(sh, sw, gen, sample_block)
    sh, sw, th, tw = (t.to(dtype).contiguous() for t in (sh, sw, th, tw))
    return BenchInputs(family=family, student_hidden=sh.requires_grad_(), student_weight=sw.requires_grad_(),
                       teacher_hidden=th, teacher_weight=tw, step_ids=step_ids_for(N, device), target_ids=targets)


def input_statistics(inputs: BenchInputs, rows: int = CALIBRATION_ROWS) -> dict[str, float]:
    """Mean student / teacher entropy and mean reverse / forward KL (nats) over the first ``rows`` tokens."""
    with torch.no_grad():
        n = min(rows, inputs.student_hidden.shape[0])
        zs = inputs.student_hidden[:n].double() @ inputs.student_weight.double().T
        zt = inputs.teacher_hidden[:n].double() @ inputs.teacher_weight.double().T
        ls, lt = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
        ps, pt = ls.exp(), lt.exp()
        return {"student_entropy": float(-(ps * ls).sum(-1).mean()),
                "teacher_entropy": float(-(pt * lt).sum(-1).mean()),
                "reverse_kl": float((ps * (ls - lt)).sum(-1).mean()),
                "forward_kl": float((pt * (lt - ls)).sum(-1).mean()),
                "log_vocab": math.log(inputs.student_weight.shape[0])}
