"""SODDistillationTrainer (TRL): a short end-to-end run on tiny offline models, its loss on multi-step
completions (tool outputs masked by tool_mask) against the SOD loss recomputed from the models' logits and
against TRL's own DistillationTrainer, and the documented tool-calling example."""

import math
import re
from pathlib import Path

import datasets
import pytest
import torch
import transformers

from sod_kernels import hf

from reference.sod_reference import ref_step_ids_from_mask
from sod_kernels.integrations.trl import SODDistillationConfig, SODDistillationTrainer
from tests.hf_helpers import qwen3, reference_loss
from tests.docs.test_policy_docs import python_blocks


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
        assert entry["entropy"] > 0  # TRL's own metrics are kept
        assert "completions/mean_length" in entry
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


@pytest.mark.parametrize("beta,step_divergence", [(1.0, "kl"), (0.0, "kl"), (0.5, "kl"), (0.3, "sampled"),
                                                  (1.0, "none")])
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
    divergence = {1.0: "reverse_kl", 0.0: "forward_kl"}.get(beta, "jsd")
    options = dict(temperature=0.8, divergence=divergence, beta=beta, step_divergence=step_divergence, delta=0.3)
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
    with pytest.raises(ValueError, match="beta must be"):
        config(tmp_path, beta=1.5)
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


@pytest.mark.parametrize("beta", [1.0, 0.0, 0.5, 0.2])
def test_sod_changes_trls_loss_exactly_when_a_completion_has_several_steps(tokenizer, tmp_path, beta):
    """Against trl.DistillationTrainer on the same models and inputs: one step per completion (no tool output
    inside it) gives TRL's loss and entropy; several steps give another loss, unless the weights are all 1."""
    from trl import DistillationConfig, DistillationTrainer

    student, teacher = models(tokenizer, seed=7)
    common = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, max_completion_length=10, bf16=False,
                  report_to="none", use_cpu=True, seed=0, beta=beta, temperature=0.9)
    trl_trainer = DistillationTrainer(model=student, teacher_model=teacher, args=DistillationConfig(**common),
                                      train_dataset=prompts(), processing_class=tokenizer)
    sod = {kind: SODDistillationTrainer(model=student, teacher_model=teacher, train_dataset=prompts(),
                                        processing_class=tokenizer,
                                        args=SODDistillationConfig(**common, sod_step_divergence=kind))
           for kind in ("kl", "none")}
    multi = multi_step_inputs(tokenizer)
    single = {**multi, "tool_mask": torch.ones_like(multi["tool_mask"])}
    with torch.no_grad():
        for inputs, several in ((single, False), (multi, True)):
            expected = trl_trainer.compute_loss(trl_trainer.model, inputs).item()
            trl_entropy = trl_trainer._metrics["eval"]["entropy"][-1]
            for kind, trainer in sod.items():
                loss = trainer.compute_loss(trainer.model, inputs).item()
                metrics = trainer._metrics["eval"]
                assert metrics["entropy"][-1] == pytest.approx(trl_entropy, rel=1e-5)
                if several and kind == "kl":
                    assert metrics["sod/steps"][-1] > 1 and metrics["sod/last_step_weight"][-1] != 1.0
                    assert abs(loss - expected) > 1e-4 * expected  # equal to 1e-5 otherwise
                else:
                    assert loss == pytest.approx(expected, rel=1e-5)


def documented_trl_example() -> str:
    """The TRL block of docs/integrations.md (self-contained: it builds its own tokenizer and models)."""
    text = (Path(__file__).resolve().parents[3] / "docs" / "integrations.md").read_text()
    blocks = [b for b in python_blocks(text) if "SODDistillationTrainer(" in b]
    assert len(blocks) == 1
    return blocks[0]


def test_the_documented_example_uses_tools_and_weights_its_steps(capsys):
    namespace = {"__name__": "doc"}
    exec(compile(documented_trl_example(), "docs/integrations.md TRL block", "exec"), namespace)
    out = capsys.readouterr().out
    logs = [e for e in namespace["trainer"].state.log_history if "sod/kl" in e]
    assert len(logs) == 2
    for entry in logs:
        # Every completion called the tool once: two assistant turns around the tool output, two steps.
        assert entry["tools/call_frequency"] == 1.0 and entry["sod/steps"] == 2.0
        assert entry["sod/last_step_weight"] != pytest.approx(1.0, abs=1e-3)
        assert entry["loss"] != pytest.approx(entry["sod/kl"], rel=1e-3) and entry["entropy"] > 0
    lines = re.findall(r"tool calls per completion 1.0, steps per completion 2.0, w_K ([\d.]+)", out)
    assert len(lines) == 2 and all(float(w) != 1.0 for w in lines)
