import time, torch, os, copy, json, sys
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
torch.set_num_threads(2)
from trainer.tools import sandbox_executor
from trainer.tokenizer import build_task_tokenizer
from trainer.rollout import ChatFormat, RolloutSettings
from trainer.sft import build_examples, supervised_train
from trainer.task import generate_problem, ProblemSource
from trainer.models import build_preset
from trainer.train import evaluate, SODTrainer
from trainer.config import TrainConfig
from transformers import AutoModelForCausalLM

class Cached:
    def __init__(self): self.ex=sandbox_executor(10.0); self.cache={}; self.miss=0
    def __call__(self, code):
        if code not in self.cache:
            self.miss+=1; self.cache[code]=self.ex(code)
        return self.cache[code]
EX=Cached()
tok=build_task_tokenizer(); chat=ChatFormat(tok)
RS=RolloutSettings(5,24,400)
def sft(preset, seed, steps, lr, noise, pool_seed=None):
    path=f"/tmp/demo-scratch/models/{preset}-{seed}-{steps}-{lr}-{noise}"
    if os.path.isdir(path):
        return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
    probs=[generate_problem(seed+1000,i) for i in range(3000)]
    exs=build_examples(probs, chat, noise_rate=noise, seed=seed)
    m=build_preset(preset,tok,seed)
    t=time.perf_counter()
    supervised_train(m, exs, steps=steps, batch_size=32, lr=lr, pad_id=tok.pad_token_id, seed=seed)
    print(f"sft {preset} seed {seed} steps {steps}: {time.perf_counter()-t:.0f}s", flush=True)
    m.save_pretrained(path); tok.save_pretrained(path)
    return m.eval()
HELD=[ProblemSource(0).held_out(i) for i in range(256)]
def ev(m, T, n=256, temperature=0.0, faults=None):
    return evaluate(m, T, tok, chat, EX, HELD[:n], RS, temperature=temperature, faults=faults)
