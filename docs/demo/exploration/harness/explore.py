import sys; sys.path.insert(0,"/tmp/demo-scratch")
from common import *
import argparse
p=argparse.ArgumentParser()
p.add_argument("--lr",type=float,default=1e-3); p.add_argument("--temp",type=float,default=1.0)
p.add_argument("--updates",type=int,default=40); p.add_argument("--pps",type=int,default=16); p.add_argument("--rpp",type=int,default=2)
p.add_argument("--ssteps",type=int,default=300); p.add_argument("--slr",type=float,default=3e-3); p.add_argument("--noise",type=float,default=0.25)
p.add_argument("--seeds",default="0,1,2"); p.add_argument("--sd",default="kl"); p.add_argument("--fault",type=float,default=0.1)
p.add_argument("--warmup",type=int,default=5); p.add_argument("--tsteps",type=int,default=800); p.add_argument("--tlr",type=float,default=3e-3); p.add_argument("--threads",type=int,default=1); p.add_argument("--n",type=int,default=256); p.add_argument("--tag",default="")
a=p.parse_args(); torch.set_num_threads(a.threads)
T=sft("tiny-teacher",0,a.tsteps,a.tlr,0.0).requires_grad_(False)
for seed in map(int,a.seeds.split(",")):
    S=sft("tiny-student",seed+1,a.ssteps,a.slr,a.noise)
    t0=time.perf_counter()
    b=ev(S,T,a.n); b1=ev(S,T,a.n,temperature=1.0)
    cfg=TrainConfig(student="x",teacher="y",objective="kl",step_divergence=a.sd,updates=a.updates,prompts_per_step=a.pps,rollouts_per_prompt=a.rpp,micro_batch_size=a.pps*a.rpp,max_turns=5,max_new_tokens=24,max_total_tokens=400,lr=a.lr,temperature=a.temp,warmup_updates=a.warmup,tool_fault_rate=a.fault,seed=seed,output_dir=f"/tmp/demo-scratch/run-{a.tag}-{seed}",checkpoint_every=a.updates)
    st=copy.deepcopy(S)
    tr=SODTrainer(cfg, st, T, tok, EX, problems=ProblemSource(seed), log=lambda m: None)
    h=tr.train()
    af=ev(st,T,a.n); af1=ev(st,T,a.n,temperature=1.0)
    rew=[m["reward"] for m in h]; kl=[m["kl"] for m in h]
    out=dict(tag=a.tag,seed=seed,before=b.accuracy,after=af.accuracy,before_T1=b1.accuracy,after_T1=af1.accuracy,kl_before=b.kl,kl_after=af.kl,
             train_reward_first10=sum(rew[:10])/10,train_reward_last10=sum(rew[-10:])/10,train_kl_first10=sum(kl[:10])/10,train_kl_last10=sum(kl[-10:])/10,secs=time.perf_counter()-t0,misses=EX.miss,cache=len(EX.cache))
    print(json.dumps({k:round(v,4) if isinstance(v,float) else v for k,v in out.items()}),flush=True)
