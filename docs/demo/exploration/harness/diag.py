import sys; sys.path.insert(0,"/tmp/demo-scratch")
from common import *
torch.set_num_threads(1)
lr=float(sys.argv[1]); U=int(sys.argv[2]); temp=float(sys.argv[3])
T=sft("tiny-teacher",0,800,3e-3,0.0).requires_grad_(False)
S=sft("tiny-student",3,300,3e-3,0.25)
b=ev(S,T,128)
cfg=TrainConfig(objective="kl",step_divergence="kl",updates=U,prompts_per_step=16,rollouts_per_prompt=2,micro_batch_size=32,max_turns=5,max_new_tokens=24,max_total_tokens=400,lr=lr,temperature=temp,warmup_updates=5,tool_fault_rate=0.0,seed=2,output_dir="/tmp/demo-scratch/diag",checkpoint_every=U)
st=copy.deepcopy(S)
tr=SODTrainer(cfg, st, T, tok, EX, problems=ProblemSource(2), log=lambda m: None)
h=tr.train(lambda m: print(m["update"], round(m["reward"],3), round(m["kl"],3), round(m["mean_steps"],2), flush=True) if m["update"]%5==0 else None)
a=ev(st,T,128)
print("greedy", b.accuracy, "->", a.accuracy)
flips=[(x,y) for x,y in zip(b.trajectories,a.trajectories) if x.reward!=y.reward]
for x,y in flips[:12]:
    print("Q:", x.problem.question, "A:", x.problem.answer)
    print("  before", x.reward, x.assistant_texts, x.observations)
    print("  after ", y.reward, y.assistant_texts, y.observations)
# last training rollouts
traj=tr.rollout(U)
for t in traj[:6]: print("SAMPLE", t.reward, t.assistant_texts, t.observations)
