import sys; sys.path.insert(0,"/tmp/demo-scratch")
from common import *
import trainer.demo as D
from pathlib import Path
torch.set_num_threads(1)
div=sys.argv[6] if len(sys.argv)>6 else "reverse_kl"; temp=float(sys.argv[7]) if len(sys.argv)>7 else 1.0
seed=int(sys.argv[1]); ss=int(sys.argv[2]); noise=float(sys.argv[3]); lrs=[float(x) for x in sys.argv[4].split(",")]; U=int(sys.argv[5])
T=sft("tiny-teacher",0,800,3e-3,0.0).requires_grad_(False)
path=f"/tmp/demo-scratch/models/mc2-student-{seed}-{ss}-{noise}"
if os.path.isdir(path): S=AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
else:
    t=time.time(); S,_=D.warm_start(Path(path), "tiny-student", tok, chat, steps=ss, lr=3e-3, noise=noise, batch=32, seed=seed+1, rebuild=True, label="s", max_calls=2); print("sft", time.time()-t, flush=True)

def brk(r): 
    out={}
    for t in r.trajectories:
        n=len(t.problem.solution_code); out.setdefault(n,[]).append(t.reward)
    return {k: round(sum(v)/len(v),3) for k,v in sorted(out.items())}
b=ev(S,T); b1=ev(S,T,temperature=1.0)
print(json.dumps(dict(seed=seed,before=b.accuracy,before_T1=b1.accuracy,brk=brk(b),kl=b.kl)),flush=True)
for lr in lrs:
    cfg=TrainConfig(objective="kl",step_divergence="kl",divergence=div,updates=U,prompts_per_step=16,rollouts_per_prompt=2,micro_batch_size=32,max_turns=5,max_new_tokens=24,max_total_tokens=400,lr=lr,temperature=temp,warmup_updates=5,tool_fault_rate=0.1,seed=seed,output_dir=f"/tmp/demo-scratch/e3-{seed}-{lr}",checkpoint_every=U)
    st=copy.deepcopy(S); t=time.time()
    h=SODTrainer(cfg, st, T, tok, EX, problems=ProblemSource(seed), log=lambda m: None).train()
    a=ev(st,T); a1=ev(st,T,temperature=1.0)
    print(json.dumps(dict(seed=seed,lr=lr,div=div,temp=temp,before=b.accuracy,after=a.accuracy,before_T1=b1.accuracy,after_T1=a1.accuracy,brk=brk(a),kl=a.kl,rew_first=sum(m["reward"] for m in h[:5])/5,rew_last=sum(m["reward"] for m in h[-5:])/5,secs=time.time()-t)),flush=True)
