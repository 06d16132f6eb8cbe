"""Local model folders as users bring them: the trainer's losses and rollout log-probs are those of the
model's own logits (Gemma 2 soft-cap, Granite / Cohere logit scale), a model whose logits the trainer would
not reproduce is refused, and rollouts sample from exactly the distribution they record whatever the
folder's generation_config says.

Every model is built from a transformers config (tiny, random, nothing downloaded) and saved to a folder.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from sod_kernels import step_ids_from_mask
from tests.hf_helpers import reference_loss
from tests.trainer.test_trainer_rollout import ArithmeticTool
from trainer.config import TrainConfig
from trainer.models import check_model_logits, ignored_generation_settings, load_model, output_head
from trainer.rollout import HFTurnGenerator, Trajectory
from trainer.task import Problem
from trainer.tokenizer import build_task_tokenizer
from trainer.train import SODTrainer

TOKENIZER = build_task_tokenizer()
VOCAB = len(TOKENIZER)
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=8, max_position_embeddings=256, initializer_range=0.2)


def gemma2(cap: float = 1.5, vocab: int = VOCAB):
    """A Gemma 2 model whose final soft-cap bites (logits of a few units against a cap of 1.5)."""
    return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        vocab_size=vocab, final_logit_softcapping=cap, attn_logit_softcapping=50.0, query_pre_attn_scalar=8,
        sliding_window=64, pad_token_id=0, eos_token_id=3, bos_token_id=None, **SMALL))


def granite(scaling: float = 4.0, vocab: int = VOCAB):
    """A Granite model: its logits are divided by ``logits_scaling``."""
    return transformers.GraniteForCausalLM(transformers.GraniteConfig(
        vocab_size=vocab, logits_scaling=scaling, pad_token_id=0, eos_token_id=3, bos_token_id=None, **SMALL))


def cohere(scale: float = 0.25, vocab: int = VOCAB):
    """A Cohere model: its logits are multiplied by ``logit_scale``."""
    return transformers.CohereForCausalLM(transformers.CohereConfig(
        vocab_size=vocab, logit_scale=scale, pad_token_id=0, eos_token_id=3, bos_token_id=None, **SMALL))


BUILDERS = {"gemma2": gemma2, "granite": granite, "cohere": cohere}


def saved(tmp_path, name: str, model, seed: int = 0):
    """Save ``model`` to ``tmp_path/name`` and load it back the way the trainer loads a folder."""
    folder = tmp_path / name
    model.save_pretrained(folder)
    return load_model(str(folder), TOKENIZER, seed=seed)


def built(kind: str, seed: int, tmp_path, name: str):
    torch.manual_seed(seed)
    return saved(tmp_path, name, BUILDERS[kind]()).eval()


def trajectories(seed: int = 0, rows: int = 3, length: int = 24) -> list[Trajectory]:
    """Equal-length trajectories of random tokens with two assistant steps each (no padding)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(rows):
        ids = torch.randint(10, VOCAB, (length,), generator=g).tolist()
        mask = [0] * 6 + [1] * 7 + [0] * 4 + [1] * (length - 17)
        out.append(Trajectory(group=i, problem=Problem("q", "1"), token_ids=ids, response_mask=mask,
                              sample_logprobs=[-1.0 if m else 0.0 for m in mask], prompt_length=6,
                              steps=[(6, 13), (17, length)]))
    return out


def trainer_for(tmp_path, student, teacher, **overrides) -> SODTrainer:
    values = dict(updates=1, prompts_per_step=2, rollouts_per_prompt=2, micro_batch_size=2, max_turns=2,
                  max_new_tokens=6, max_total_tokens=200, lr=1e-3, temperature=0.7, tool_workers=1,
                  output_dir=str(tmp_path / "run"))
    values.update(overrides)
    lines = []
    trainer = SODTrainer(TrainConfig(**values).validate(), student, teacher, TOKENIZER, ArithmeticTool(),
                         log=lines.append)
    trainer.report_lines = lines
    return trainer


@pytest.mark.parametrize("kind", ["gemma2", "granite"])
@pytest.mark.parametrize("step_divergence", ["kl", "sampled"])
def test_kl_loss_is_that_of_the_models_own_logits(tmp_path, kind, step_divergence):
    student = built(kind, 0, tmp_path, "student")
    teacher = built(kind, 1, tmp_path, "teacher")
    trainer = trainer_for(tmp_path, student, teacher, step_divergence=step_divergence, grad_clip=0.0)
    trajs = trajectories()
    ids = torch.tensor([t.token_ids for t in trajs])
    step_ids = step_ids_from_mask(torch.tensor([t.response_mask for t in trajs]))
    want = reference_loss(student, teacher, ids, torch.ones_like(ids), step_ids, temperature=0.7,
                          step_divergence=step_divergence)
    metrics, _ = trainer.update(trajs)
    assert metrics["loss"] == pytest.approx(float(want), rel=2e-4)


@pytest.mark.parametrize("kind", ["gemma2", "granite", "cohere"])
@pytest.mark.parametrize("mode", ["logits", "forward"])
def test_rollout_logprobs_are_those_of_the_models_own_logits(tmp_path, kind, mode):
    model = built(kind, 0, tmp_path, "model")
    generator = HFTurnGenerator(model, pad_token_id=0, stop_ids=[3], temperature=0.7, logprobs=mode)
    contexts = [[5, 9, 14, 20, 7], [8, 8, 30]]
    torch.manual_seed(0)
    turns = generator(contexts, max_new_tokens=6)
    for context, turn in zip(contexts, turns):
        full = torch.tensor([context + turn.token_ids])
        with torch.no_grad():
            logits = model(input_ids=full).logits[0, len(context) - 1:-1].double() / 0.7
        want = torch.log_softmax(logits, -1).gather(1, torch.tensor(turn.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(turn.logprobs, dtype=torch.float64), want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["gemma2", "granite"])
def test_pg_first_update_sees_ratio_one(tmp_path, kind):
    """Rollouts sampled by the trainer and scored by its policy loss: before any update the policy is the one
    that sampled, so every ratio is exactly 1 (approx_kl 0, nothing clipped)."""
    student = built(kind, 0, tmp_path, "student")
    teacher = built(kind, 1, tmp_path, "teacher")
    trainer = trainer_for(tmp_path, student, teacher, objective="pg")
    torch.manual_seed(0)
    trajs = trainer.rollout(0)
    assert sum(t.num_generated for t in trajs) > 0
    metrics, _ = trainer.update(trajs)
    assert abs(metrics["approx_kl"]) < 1e-5 and metrics["clip_frac"] == 0.0


def test_logit_processing_is_reported(tmp_path):
    trainer = trainer_for(tmp_path, built("gemma2", 0, tmp_path, "s"), built("granite", 1, tmp_path, "t"))
    text = "\n".join(trainer.report_lines)
    assert "student logit processing: soft-cap 1.5" in text
    assert "teacher logit processing: logit scale 0.25" in text
    assert "sampling: softmax(logits / 0.7) over the whole vocabulary" in text


def test_a_folder_whose_logits_are_not_reproduced_is_refused(tmp_path):
    # A Qwen3 model does not apply final_logit_softcapping: a config that carries one would make the trainer
    # cap logits the model never caps.
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(vocab_size=VOCAB, **SMALL))
    folder = tmp_path / "odd"
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["final_logit_softcapping"] = 1.0
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="odd.*does not reproduce the model's logits"):
        load_model(str(folder), TOKENIZER, seed=0)
    # ... and a model's own processing passes the check in 16 bits as well.
    gemma_folder = tmp_path / "gemma"
    gemma2().save_pretrained(gemma_folder)
    assert check_model_logits(load_model(str(gemma_folder), TOKENIZER, 0, torch.bfloat16), "gemma").softcap == 1.5
    assert output_head(granite()).scale == 0.25


# ---------------------------------------------------------------------------------------------------------
# generation_config: the rollouts sample from the distribution they record.

ROWS = 3000
CONTEXT = [1, 2, 3, 4, 5, 6, 7, 8]


def peaked_folder(tmp_path, **generation):
    """A small-vocabulary model with a peaked next-token distribution, saved with ``generation`` settings."""
    torch.manual_seed(3)
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=12, pad_token_id=0, eos_token_id=11, bos_token_id=None, **{**SMALL, "initializer_range": 0.6}))
    settings = {"do_sample": True, **generation}  # as published folders set it (with their sampling settings)
    model.generation_config = transformers.GenerationConfig(eos_token_id=11, pad_token_id=0, **settings)
    folder = tmp_path / "peaked"
    model.save_pretrained(folder)
    return load_model(str(folder), TOKENIZER, seed=0)


@pytest.mark.parametrize("generation", [dict(repetition_penalty=4.0), dict(suppress_tokens=None),
                                        dict(min_p=0.5), dict(top_k=2, temperature=0.5)],
                         ids=["repetition_penalty", "suppress_tokens", "min_p", "top_k"])
@pytest.mark.parametrize("keyed", [False, True], ids=["global_rng", "per_trajectory"])
def test_sampled_frequencies_match_the_recorded_logprobs(tmp_path, generation, keyed):
    if "suppress_tokens" in generation:  # suppress the most likely next token
        torch.manual_seed(3)
        probe = peaked_folder(tmp_path / "probe")
        with torch.no_grad():
            top = int(probe(input_ids=torch.tensor([CONTEXT])).logits[0, -1].argmax())
        generation = dict(suppress_tokens=[top])
    model = peaked_folder(tmp_path, **generation)
    assert set(generation) - {"temperature"} <= set(ignored_generation_settings(model))
    generator = HFTurnGenerator(model, pad_token_id=0, stop_ids=[11], temperature=1.0, logprobs="logits")
    torch.manual_seed(0)
    keys = [(0, 0, i, 0) for i in range(ROWS)] if keyed else None
    turns = generator([CONTEXT] * ROWS, max_new_tokens=1, keys=keys)
    first = torch.tensor([turn.token_ids[0] for turn in turns])
    recorded = torch.tensor([turn.logprobs[0] for turn in turns], dtype=torch.float64)
    frequency = torch.bincount(first, minlength=12).double() / ROWS
    # Every row has the same context, so every row records the same distribution: recover it per token.
    probability = torch.zeros(12, dtype=torch.float64)
    probability[first] = recorded.exp()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([CONTEXT])).logits[0, -1].double()
    want = torch.softmax(logits, -1)
    seen = frequency > 0
    torch.testing.assert_close(probability[seen], want[seen], atol=1e-5, rtol=1e-4)
    assert want.max() > 0.3  # a peaked distribution: the folder's settings would move it a lot
    bound = 4.5 * (want * (1 - want) / ROWS).sqrt() + 1e-3
    assert ((frequency - want).abs() <= bound).all(), (frequency, want)
