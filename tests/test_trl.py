"""SODDistillationTrainer (TRL): a short end-to-end run on tiny offline models, and its loss on multi-step
completions (tool outputs masked by tool_mask) against the SOD loss recomputed from the models' logits."""

import math

import datasets
import pytest
import torch
import transformers

from sod_kernels import hf

from reference.sod_reference import ref_step_ids_from_mask
from sod_kernels.integrations.trl import SODDistillationConfig, SODDistillationTrainer
from tests.hf_helpers import qwen3, reference_loss


@pytest.fixture(scope="module")
def tokenizer():
    from trainer.tokenizer import build_task_tokenizer

    return build_task_tokenizer()


def models(tokenizer, seed=0):
    ids = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return qwen3(len(tokenizer), 32, seed=seed, **ids), qwen3(len(tokenizer), 48, seed=seed + 1, **ids)


def config(tmp_path, **overrides):
    options = dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, max_completion_length=10,
                   bf16=False, report_to="none", logging_steps=1, save_strategy="no", learning_rate=1e-3,
                   use_cpu=True, dataloader_num_workers=0, seed=0)
    options.update(overrides)
    return SODDistillationConfig(**options)


def prompts(n=8):
    return datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": f"add {i} and {2 * i + 1}"}]}
                                       for i in range(n)])


def test_two_training_steps_end_to_end(tokenizer, tmp_path):
    student, teacher = models(tokenizer)
    trainer = SODDistillationTrainer(model=student, teacher_model=teacher, args=config(tmp_path),
                                     train_dataset=prompts(), processing_class=tokenizer)
    before = {k: v.detach().clone() for k, v in student.state_dict().items()}
    teacher_before = {k: v.detach().clone() for k, v in teacher.state_dict().items()}
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for entry in logs:
        assert math.isfinite(entry["loss"]) and entry["loss"] > 0
        # Completions without tool calls are one step each: weight 1, so the loss is the plain mean KL.
        assert entry["sod/steps"] == 1.0 and entry["sod/last_step_weight"] == 1.0
        assert entry["loss"] == pytest.approx(entry["sod/kl"], rel=1e-5)
    changed = [k for k, v in student.state_dict().items() if not torch.equal(v, before[k])]
    assert "lm_head.weight" in changed and any("layers.0" in k for k in changed)
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())


def multi_step_inputs(tokenizer, seed=3):
    """Two left-padded prompts and completions holding assistant turns separated by tool outputs."""
    g = torch.Generator().manual_seed(seed)
    V = len(tokenizer)
    prompt_ids = torch.randint(8, V, (2, 6), generator=g)
    prompt_mask = torch.ones(2, 6, dtype=torch.long)
    prompt_ids[1, :2] = tokenizer.pad_token_id
    prompt_mask[1, :2] = 0
    completion_ids = torch.randint(8, V, (2, 16), generator=g)
    completion_mask = torch.ones(2, 16, dtype=torch.long)
    completion_ids[1, 13:] = tokenizer.pad_token_id
    completion_mask[1, 13:] = 0
    tool_mask = torch.ones(2, 16, dtype=torch.long)
    tool_mask[0, 4:7] = 0   # row 0: three steps
    tool_mask[0, 10:12] = 0
    tool_mask[1, 5:8] = 0   # row 1: two steps, then padding
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask, "tool_mask": tool_mask}


@pytest.mark.parametrize("beta,step_divergence", [(1.0, "kl"), (0.0, "kl"), (1.0, "sampled"), (1.0, "none")])
def test_loss_on_multi_step_completions_matches_the_reference(tokenizer, tmp_path, beta, step_divergence):
    student, teacher = models(tokenizer, seed=5)
    args = config(tmp_path, beta=beta, sod_step_divergence=step_divergence, temperature=0.8, sod_delta=0.3)
    trainer = SODDistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=prompts(),
                                     processing_class=tokenizer)
    trainer.model.train()  # training mode: metrics go to the "train" log, num_items_in_batch is read
    inputs = multi_step_inputs(tokenizer)
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    loss_mask = inputs["completion_mask"] * inputs["tool_mask"]
    step_ids = torch.cat([torch.full((2, 6), -1), ref_step_ids_from_mask(loss_mask)], 1)
    options = dict(temperature=0.8, divergence="reverse_kl" if beta == 1.0 else "forward_kl",
                   step_divergence=step_divergence, delta=0.3)
    expected = reference_loss(student, teacher, input_ids, attention, step_ids, **options)
    loss = trainer.compute_loss(trainer.model, inputs)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    loss.backward()
    assert student.lm_head.weight.grad.abs().sum() > 0
    metrics = trainer._metrics["train"]
    assert metrics["sod/steps"][-1] == 2.5
    # With the generation batch's token count the loss is a sum divided by it (gradient accumulation).
    total = reference_loss(student, teacher, input_ids, attention, step_ids, reduction="sum", **options)
    summed = trainer.compute_loss(trainer.model, {**inputs, "num_items_in_batch": torch.tensor(40.0)})
    assert summed.item() == pytest.approx(total.item() / 40.0, rel=1e-4)


def test_configuration_errors(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="beta must be 0.0"):
        config(tmp_path, beta=0.5)
    with pytest.raises(ValueError, match="sod_step_divergence"):
        config(tmp_path, sod_step_divergence="mean")
    with pytest.raises(ValueError, match="sod_epsilon"):
        config(tmp_path, sod_epsilon=0.0)
    torch.manual_seed(0)
    gemma = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, final_logit_softcapping=30.0, pad_token_id=tokenizer.pad_token_id))
    student, _ = models(tokenizer)
    # A soft-capping teacher is accepted: its cap is applied inside the loss (teacher_softcap).
    trainer = SODDistillationTrainer(model=student, teacher_model=gemma, args=config(tmp_path),
                                     train_dataset=prompts(), processing_class=tokenizer)
    assert hf.lm_head(trainer.teacher_model).processing.softcap == 30.0
