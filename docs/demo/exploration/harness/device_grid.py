import re,copy,json,os,sys,time
os.environ['OMP_WAIT_POLICY']='PASSIVE'
import torch
from trainer.tokenizer import build_task_tokenizer as btt
from trainer.rollout import ChatFormat,RolloutSettings,ToolObservation as TO
from trainer.sft import build_examples as be,supervised_train as st
from trainer.task import generate_problem as gp,ProblemSource as PS
from trainer.models import build_preset as bp
from trainer.train import evaluate,SODTrainer
from trainer.config import TrainConfig
from transformers import AutoModelForCausalLM as AM
def tool(c):
 try:return TO(f"{eval(re.fullmatch(r'print\((-?\d+(?:[-+*]-?\d+)*)\)',c.strip()).group(1))}\n")
 except Exception:return TO("SyntaxError: invalid syntax",False)
A=dict(lr=1e-3,temp=1.0,U=40,pps=16,ss=300,noise=.25,fault=.1,n=256);tag=sys.argv[1];A.update(json.loads(sys.argv[2]))
tok=btt();ch=ChatFormat(tok);RS=RolloutSettings(5,24,400)
def sft(pre,seed,steps,lr,noise):
 m=bp(pre,tok,seed);st(m,be([gp(seed+1000,i) for i in range(3000)],ch,noise_rate=noise,seed=seed),steps=steps,batch_size=32,lr=lr,pad_id=tok.pad_token_id,seed=seed);return m.eval()
if tag=="teacher":
 torch.set_num_threads(8);sft("tiny-teacher",0,500,4e-3,0).save_pretrained("/tmp/T");sys.exit()
torch.set_num_threads(2)
T=AM.from_pretrained("/tmp/T",dtype=torch.float32).eval().requires_grad_(False)
H=[PS(0).held_out(i) for i in range(A["n"])]
ev=lambda m,t=0.0:evaluate(m,T,tok,ch,tool,H,RS,temperature=t)
for seed in (0,1,2):
 t0=time.time();S=sft("tiny-student",seed+1,A["ss"],3e-3,A["noise"]);b=ev(S);b1=ev(S,1.0)
 c=TrainConfig(updates=A["U"],prompts_per_step=A["pps"],micro_batch_size=2*A["pps"],max_turns=5,max_new_tokens=24,max_total_tokens=400,lr=A["lr"],temperature=A["temp"],warmup_updates=5,tool_fault_rate=A["fault"],seed=seed,output_dir=f"/tmp/r{tag}{seed}",checkpoint_every=999,tool_workers=1)
 s=copy.deepcopy(S);h=SODTrainer(c,s,T,tok,tool,problems=PS(seed),log=print).train();f=ev(s);f1=ev(s,1.0)
 r=dict(tag=tag,A=A,seed=seed,b=b.accuracy,a=f.accuracy,b1=b1.accuracy,a1=f1.accuracy,klb=b.kl,kla=f.kl,rew=[m["reward"] for m in h],kl=[m["kl"] for m in h],s=time.time()-t0)
 open(os.environ["OUT"]+f"/{tag}.jsonl","a").write(json.dumps(r)+"\n");print(tag,seed,b.accuracy,f.accuracy,b1.accuracy,f1.accuracy,flush=True)
