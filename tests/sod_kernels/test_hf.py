"""sod_kernels.hf against the models' own logits (materialized, float64) on tiny offline transformers models."""

import pytest
import torch
import transformers

import sod_kernels
from reference.sod_reference import ref_step_ids_from_mask
from sod_kernels import hf
from tests.hf_helpers import qwen3 as _qwen3
from tests.hf_helpers import reference_loss as _reference_loss

V = 96
SMALL = dict(vocab_size=V, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
             max_position_embeddings=128)


def qwen3(hidden=32, vocab=V, tie=False, seed=0):
    return _qwen3(vocab, hidden, tie=tie, seed=seed)


def reference_loss(student, teacher, input_ids, attention_mask, step_ids, temperature=1.0):
    return _reference_loss(student, teacher, input_ids, attention_mask, step_ids, temperature=temperature)


def batch(B=3, L=20, seed=1):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, V, (B, L), generator=g)
    mask = torch.zeros(B, L, dtype=torch.long)
    mask[:, 4:9] = 1
    mask[:, 12:17] = 1
    mask[1, 12:] = 0  # one step only
    attention = torch.ones(B, L, dtype=torch.long)
    attention[2, -2:] = 0  # right padding
    mask[2, -2:] = 0
    return input_ids, attention, mask


def test_hidden_states_and_lm_head_reproduce_the_logits():
    for tie in (False, True):
        model = qwen3(tie=tie)
        input_ids, attention, _ = batch()
        head = hf.lm_head(model)
        assert (head.weight is model.get_input_embeddings().weight) == tie
        hidden = hf.final_hidden_states(model, input_ids, attention)
        logits = model(input_ids=input_ids, attention_mask=attention).logits
        torch.testing.assert_close(hidden @ head.weight.T, logits, atol=1e-5, rtol=1e-5)
        assert hf.check_logit_processing(model) == hf.LogitProcessing()


@pytest.mark.parametrize("tie", [False, True])
def test_distillation_inputs_match_the_models_logits_and_train_the_student(tie):
    student, teacher = qwen3(32, tie=tie, seed=0), qwen3(48, seed=1)
    input_ids, attention, mask = batch()
    inputs = hf.distillation_inputs(student, teacher, input_ids, attention, response_mask=mask)
    assert inputs["student_hidden"].shape == (3, 19, 32) and inputs["teacher_hidden"].shape == (3, 19, 48)
    assert torch.equal(inputs["target_ids"], input_ids[:, 1:]) and torch.equal(inputs["response_mask"], mask[:, 1:])
    assert not inputs["teacher_hidden"].requires_grad
    loss = sod_kernels.fused_sod_loss(**inputs)
    expected = reference_loss(student, teacher, input_ids, attention, ref_step_ids_from_mask(mask))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    loss.backward()
    grad = student.get_output_embeddings().weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    # The same step segmentation given as step ids gives the same loss.
    by_ids = hf.distillation_inputs(student, teacher, input_ids, attention, step_ids=ref_step_ids_from_mask(mask))
    assert sod_kernels.fused_sod_loss(**by_ids).item() == pytest.approx(loss.item(), rel=1e-6)


def test_padded_teacher_vocabulary_uses_the_first_student_rows():
    student, teacher = qwen3(32, seed=2), qwen3(40, vocab=V + 16, seed=3)
    input_ids, attention, mask = batch(seed=4)
    assert hf.lm_head(teacher).vocab_size == V + 16
    loss = sod_kernels.fused_sod_loss(**hf.distillation_inputs(student, teacher, input_ids, attention,
                                                               response_mask=mask))
    expected = reference_loss(student, teacher, input_ids, attention, ref_step_ids_from_mask(mask))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


def tiny(config_cls, model_cls, seed, **extra):
    torch.manual_seed(seed)
    return model_cls(config_cls(**SMALL, hidden_size=32, intermediate_size=64, **extra)).eval()


def test_logit_scale_is_folded_exactly():
    cohere = tiny(transformers.CohereConfig, transformers.CohereForCausalLM, 5, logit_scale=0.5)
    granite = tiny(transformers.GraniteConfig, transformers.GraniteForCausalLM, 6, logits_scaling=4.0)
    assert hf.check_logit_processing(cohere) == hf.LogitProcessing(scale=0.5)
    assert hf.check_logit_processing(granite) == hf.LogitProcessing(scale=0.25)
    input_ids, attention, mask = batch(seed=7)
    for student, teacher in ((cohere, granite), (granite, cohere)):
        loss = sod_kernels.fused_sod_loss(**hf.distillation_inputs(student, teacher, input_ids, attention,
                                                                   response_mask=mask), temperature=0.7)
        expected = reference_loss(student, teacher, input_ids, attention, ref_step_ids_from_mask(mask), 0.7)
        assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    logp = hf.sampled_token_logprobs(cohere, input_ids, attention, temperature=0.7)
    with torch.no_grad():
        z = cohere(input_ids=input_ids, attention_mask=attention).logits.double()[:, :-1] / 0.7
    want = torch.log_softmax(z, -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(logp.double(), want, atol=1e-5, rtol=1e-5)


def test_softcap_is_reported_and_passed_to_the_losses():
    """(The losses' values against the model's own logits: tests/sod_kernels/test_softcap.py.)"""
    gemma = tiny(transformers.Gemma2Config, transformers.Gemma2ForCausalLM, 8, final_logit_softcapping=5.0)
    assert hf.check_logit_processing(gemma) == hf.LogitProcessing(scale=1.0, softcap=5.0)
    input_ids, attention, mask = batch()
    inputs = hf.distillation_inputs(gemma, qwen3(), input_ids, attention, response_mask=mask)
    assert inputs["student_softcap"] == 5.0 and "teacher_softcap" not in inputs
    with pytest.raises(ValueError, match="soft-caps its logits"):
        hf.refuse_softcap(hf.lm_head(gemma), "student")


def test_check_logit_processing_catches_an_unknown_post_processing():
    model = qwen3()
    model.config.logit_scale = 2.0  # the config claims a scale the model does not apply
    with pytest.raises(ValueError, match="does not reproduce the model's logits"):
        hf.check_logit_processing(model)


def test_shifted_tensors_are_refused():
    student, teacher = qwen3(), qwen3(seed=1)
    input_ids, attention, mask = batch()
    with pytest.raises(ValueError, match="shifted already"):
        hf.distillation_inputs(student, teacher, input_ids, attention, response_mask=mask[:, 1:])
    left = torch.zeros_like(mask)
    left[:, :-1] = mask[:, 1:]
    left[:, 0] = 1
    with pytest.raises(ValueError, match="first token"):
        hf.distillation_inputs(student, teacher, input_ids, attention, response_mask=left)
    on_padding = mask.clone()
    on_padding[2, -1] = 1
    with pytest.raises(ValueError, match="padding"):
        hf.distillation_inputs(student, teacher, input_ids, attention, response_mask=on_padding)
    hidden = torch.randn(3, 19, 8)
    with pytest.raises(ValueError, match="shifted already"):
        hf.shift_for_next_token(input_ids, hidden=hidden, response_mask=mask)
    with pytest.raises(ValueError, match="exactly one"):
        hf.shift_for_next_token(input_ids)
    shifted = hf.shift_for_next_token(input_ids, hidden=torch.randn(3, 20, 8), response_mask=mask)
    assert shifted.hidden.shape == (3, 19, 8) and torch.equal(shifted.target_ids, input_ids[:, 1:])


# ------------------------------------------------------------------------------------------- chat steps
PLAIN = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'tool' -%}"
    "{{ '<|im_start|>user\n<tool_response>' + message['content'] + '</tool_response><|im_end|>\n' }}"
    "{%- else -%}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)
MARKED = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{%- elif message['role'] == 'tool' -%}"
    "{{ '<|im_start|>user\n<tool_response>' + message['content'] + '</tool_response><|im_end|>\n' }}"
    "{%- else -%}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)
# Generation blocks that cover the role header and the newline: adjacent assistant turns touch.
TOUCHING = MARKED.replace(
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}",
    "{% generation %}{{ '<|im_start|>assistant\n' + message['content'] + '<|im_end|>\n' }}{% endgeneration %}")
# Renders the last assistant turn differently from earlier ones (like templates that drop old reasoning).
NOT_PREFIX = PLAIN.replace("{%- else -%}{{ '<|im_start|>' + message['role']",
                           "{%- elif loop.last and message['role'] == 'assistant' -%}"
                           "{{ '<|im_start|>assistant\n<think></think>' + message['content'] + '<|im_end|>\n' }}"
                           "{%- else -%}{{ '<|im_start|>' + message['role']")

CONVERSATION = [
    {"role": "system", "content": "use the tool"},
    {"role": "user", "content": "what is 2+3?"},
    {"role": "assistant", "content": "print(2+3)"},
    {"role": "tool", "content": "5"},
    {"role": "assistant", "content": "it is 5"},
    {"role": "assistant", "content": "Answer 5"},  # a second assistant message right after the first
]


@pytest.fixture(scope="module")
def tokenizer():
    from trainer.tokenizer import build_task_tokenizer

    return build_task_tokenizer()


def steps_text(tokenizer, result, row):
    ids, steps = result.input_ids[row].tolist(), result.step_ids[row].tolist()
    return [tokenizer.decode([i for i, s in zip(ids, steps) if s == k]) for k in range(max(steps) + 1)]


def test_chat_steps_one_per_assistant_message_with_and_without_markers(tokenizer):
    assert TOUCHING != MARKED and NOT_PREFIX != PLAIN
    conversations = [CONVERSATION, CONVERSATION[:3]]
    want = [["print(2+3)<|im_end|>", "it is 5<|im_end|>", "Answer 5<|im_end|>"], ["print(2+3)<|im_end|>"]]
    results = {}
    for template, method in ((PLAIN, "turn_boundaries"), (MARKED, "generation_markers")):
        result = hf.chat_step_ids(tokenizer, conversations, chat_template=template)
        assert result.method == method
        assert [steps_text(tokenizer, result, b) for b in range(2)] == want
        rendered = tokenizer.apply_chat_template(CONVERSATION[:3], tokenize=True, chat_template=template)
        rendered = list(getattr(rendered, "input_ids", rendered))
        assert result.input_ids[1, :len(rendered)].tolist() == rendered
        assert result.attention_mask[1].sum() == len(rendered) and (result.step_ids[1, len(rendered):] == -1).all()
        results[method] = result
    assert torch.equal(results["turn_boundaries"].step_ids, results["generation_markers"].step_ids)


def test_touching_generation_blocks_still_give_one_step_per_message(tokenizer):
    result = hf.chat_step_ids(tokenizer, CONVERSATION, chat_template=TOUCHING)
    texts = steps_text(tokenizer, result, 0)
    assert len(texts) == 3
    assert texts[1] == "<|im_start|>assistant\nit is 5<|im_end|>\n"
    assert texts[2] == "<|im_start|>assistant\nAnswer 5<|im_end|>\n"
    # The mask alone would merge the last two turns into one step.
    assert int(sod_kernels.step_ids_from_mask(result.response_mask).max()) == 1


def test_chat_steps_feed_the_loss(tokenizer):
    result = hf.chat_step_ids(tokenizer, [CONVERSATION, CONVERSATION[:5]], chat_template=PLAIN,
                              padding_side="left")
    assert (result.attention_mask[1, 0] == 0) and result.step_ids[1, 0] == -1
    V_tok = len(tokenizer)
    student, teacher = qwen3(vocab=V_tok, seed=3), qwen3(40, vocab=V_tok, seed=4)
    inputs = hf.distillation_inputs(student, teacher, result.input_ids, result.attention_mask,
                                    step_ids=result.step_ids)
    stats = sod_kernels.fused_sod_loss(**inputs, return_stats=True)
    assert stats.num_steps.tolist() == [3, 2]
    expected = reference_loss(student, teacher, result.input_ids, result.attention_mask, result.step_ids)
    assert stats.loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_chat_steps_refuse_what_they_cannot_do(tokenizer):
    with pytest.raises(ValueError, match="not prefix-preserving"):
        hf.chat_step_ids(tokenizer, CONVERSATION, chat_template=NOT_PREFIX)
    with pytest.raises(ValueError, match="add_generation_prompt"):
        hf.chat_step_ids(tokenizer, CONVERSATION, chat_template=PLAIN, add_generation_prompt=True)
    with pytest.raises(TypeError, match="conversation 1"):
        hf.chat_step_ids(tokenizer, [CONVERSATION, "text"], chat_template=PLAIN)


def test_unknown_keyword_arguments_are_refused_and_model_inputs_go_in_model_kwargs():
    """A transformers model ignores keys it does not know, so a misspelled or misplaced option must not reach it."""
    student, teacher = qwen3(), qwen3(seed=1)
    input_ids, attention, mask = batch()
    with pytest.raises(TypeError, match="'temprature'"):
        hf.sampled_token_logprobs(student, input_ids, attention, temprature=0.5)
    for option in ({"temperature": 0.7}, {"divergence": "forward_kl"}):
        with pytest.raises(TypeError, match=repr(next(iter(option)))):
            hf.distillation_inputs(student, teacher, input_ids, attention, response_mask=mask, **option)
    with pytest.raises(TypeError, match="'position_ids'"):
        hf.final_hidden_states(student, input_ids, attention, position_ids=None)
    with pytest.raises(TypeError, match="model_kwargs must be a mapping"):
        hf.final_hidden_states(student, input_ids, model_kwargs=[("position_ids", None)])
    with pytest.raises(TypeError, match="model_kwargs must not hold"):
        hf.final_hidden_states(student, input_ids, model_kwargs={"attention_mask": attention})
    # Explicit model inputs reach the body: shifted position ids change the hidden states (rotary positions).
    positions = torch.arange(input_ids.shape[1]).expand_as(input_ids)
    plain = hf.final_hidden_states(student, input_ids, attention)
    same = hf.final_hidden_states(student, input_ids, attention, model_kwargs={"position_ids": positions})
    moved = hf.final_hidden_states(student, input_ids, attention, model_kwargs={"position_ids": positions + 5})
    torch.testing.assert_close(same, plain)
    assert not torch.allclose(moved, plain)
    logp = hf.sampled_token_logprobs(student, input_ids, attention, model_kwargs={"position_ids": positions + 5})
    want = torch.log_softmax(moved[:, :-1] @ hf.lm_head(student).weight.T, -1).gather(-1, input_ids[:, 1:, None])
    torch.testing.assert_close(logp, want.squeeze(-1), atol=1e-5, rtol=1e-5)
    inputs = hf.distillation_inputs(student, teacher, input_ids, attention, response_mask=mask,
                                    model_kwargs={"position_ids": positions + 5})
    torch.testing.assert_close(inputs["student_hidden"], moved[:, :-1])
