import sys; sys.path.insert(0,"/tmp/demo-scratch")
from common import *
import trainer.demo as D
from pathlib import Path
mode=sys.argv[1]
tpath=Path("/tmp/demo-scratch/models/robust-teacher-800")
if mode=="teacher":
    torch.set_num_threads(2)
    T,_=D.warm_start(tpath,"tiny-teacher",tok,chat,steps=800,lr=3e-3,noise=0.25,batch=32,seed=0,rebuild=False,label="t",learn_noise=False)
    r=ev(T,T); r1=ev(T,T,temperature=1.0); print(json.dumps(dict(teacher_greedy=r.accuracy,teacher_T1=r1.accuracy)),flush=True); sys.exit()
torch.set_num_threads(1)
T=AutoModelForCausalLM.from_pretrained(tpath, local_files_only=True, dtype=torch.float32).eval().requires_grad_(False)
seed=int(mode); lrs=[float(x) for x in sys.argv[2].split(",")]; U=int(sys.argv[3]); temp=float(sys.argv[4]); sd=sys.argv[5]
S=AutoModelForCausalLM.from_pretrained(f"/tmp/demo-scratch/models/mc2-student-{seed}-600-0.25", local_files_only=True, dtype=torch.float32).eval()
def brk(r):
    out={}
    for t in r.trajectories: out.setdefault(len(t.problem.solution_code),[]).append(t.reward)
    return {k: round(sum(v)/len(v),3) for k,v in sorted(out.items())}
b=ev(S,T); b1=ev(S,T,temperature=1.0)
print(json.dumps(dict(seed=seed,before=b.accuracy,before_T1=b1.accuracy,brk=brk(b),kl=b.kl)),flush=True)
for lr in lrs:
    cfg=TrainConfig(objective="kl",step_divergence=sd,updates=U,prompts_per_step=16,rollouts_per_prompt=2,micro_batch_size=32,max_turns=5,max_new_tokens=24,max_total_tokens=400,lr=lr,temperature=temp,warmup_updates=5,tool_fault_rate=0.1,seed=seed,output_dir=f"/tmp/demo-scratch/pa-{seed}-{lr}",checkpoint_every=U)
    st=copy.deepcopy(S); t=time.time()
    h=SODTrainer(cfg, st, T, tok, EX, problems=ProblemSource(seed), log=lambda m: None).train()
    a=ev(st,T); a1=ev(st,T,temperature=1.0)
    print(json.dumps(dict(seed=seed,lr=lr,temp=temp,sd=sd,before=b.accuracy,after=a.accuracy,before_T1=b1.accuracy,after_T1=a1.accuracy,brk=brk(a),kl=a.kl,rew=[round(m["reward"],3) for m in h],trkl=[round(m["kl"],3) for m in h],secs=time.time()-t)),flush=True)
