"""Quick start: the SOD loss on a toy batch, on CPU (the README's example; run: python examples/quickstart.py)."""

import torch

import sod_kernels

torch.manual_seed(0)
B, T, Hs, Ht, V = 2, 24, 64, 96, 500          # batch, tokens, student/teacher widths, vocabulary

student_hidden = torch.randn(B, T, Hs, requires_grad=True)   # final hidden states of the student
student_weight = (torch.randn(V, Hs) / Hs ** 0.5).requires_grad_()   # student lm_head weight [V, Hs]
teacher_hidden = torch.randn(B, T, Ht)                       # the teacher's, on the same tokens
teacher_weight = torch.randn(V + 12, Ht) / Ht ** 0.5         # a padded teacher vocabulary is fine

# 1 = a token the student generated (an assistant turn); 0 = prompt, tool output, template, padding.
response_mask = torch.zeros(B, T, dtype=torch.long)
response_mask[0, 2:8] = 1; response_mask[0, 11:15] = 1; response_mask[0, 19:23] = 1   # three steps
response_mask[1, 3:20] = 1                                                              # one step

stats = sod_kernels.fused_sod_loss(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                   response_mask, return_stats=True)
stats.loss.backward()

print(f"loss {stats.loss.item():.4f}")
print("steps per row       ", stats.num_steps.tolist())
print("step divergence d_k ", [[round(x, 4) for x in row] for row in stats.step_divergence.tolist()])
print("step weights w_k    ", [[round(x, 4) for x in row] for row in stats.step_weights.tolist()])
print("grad norms: hidden", round(student_hidden.grad.norm().item(), 4),
      "weight", round(student_weight.grad.norm().item(), 4))
