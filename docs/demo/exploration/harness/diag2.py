import sys; sys.path.insert(0,"/tmp/demo-scratch")
from common import *
from trainer.models import hidden_states, lm_head_weight
torch.set_num_threads(1)
lr=float(sys.argv[1]); U=int(sys.argv[2]); tag=sys.argv[3]
T=sft("tiny-teacher",0,800,3e-3,0.0).requires_grad_(False)
S=sft("tiny-student",3,300,3e-3,0.25)
path=f"/tmp/demo-scratch/distilled-{tag}"
cfg=TrainConfig(objective="kl",step_divergence="kl",updates=U,prompts_per_step=16,rollouts_per_prompt=2,micro_batch_size=32,max_turns=5,max_new_tokens=24,max_total_tokens=400,lr=lr,temperature=1.0,warmup_updates=5,tool_fault_rate=0.0,seed=2,output_dir="/tmp/demo-scratch/diag-"+tag,checkpoint_every=U)
st=copy.deepcopy(S)
if os.path.isdir(path):
    st=AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
else:
    SODTrainer(cfg, st, T, tok, EX, problems=ProblemSource(2), log=lambda m: None).train(); st.save_pretrained(path)
E0=lm_head_weight(S).detach(); E1=lm_head_weight(st).detach()
dn=(E1-E0).norm(dim=1); top=dn.argsort(descending=True)[:12]
print("embedding row change (top):", [(tok.convert_ids_to_tokens(int(i)), round(float(dn[i]),3), round(float(E0[i].norm()),3)) for i in top])
print("median row change", float(dn.median()))
b=ev(S,T,128); a=ev(st,T,128); print("greedy", b.accuracy, a.accuracy)
digits=[tok.convert_tokens_to_ids(str(d)) for d in range(10)]
from trainer.train import collate, model_hidden
shown=0
for x,y in zip(b.trajectories,a.trajectories):
    if x.reward==1 and y.reward==0 and shown<6:
        # first position where after-greedy deviates from before-greedy
        ids=y.token_ids; ref=x.token_ids
        k=next(i for i in range(min(len(ids),len(ref))) if ids[i]!=ref[i])
        ctx=torch.tensor([ref[:k]])
        out={}
        for name,m in (("teacher",T),("before",S),("after",st)):
            with torch.no_grad():
                h=hidden_states(m,ctx,torch.ones_like(ctx))[0,-1]; p=torch.softmax(h@lm_head_weight(m).T,-1)
            out[name]=(round(float(p[ref[k]]),3), round(float(p[ids[k]]),3))
        print(tok.decode(ref[max(0,k-12):k]).replace("\n","|"), "| correct", tok.convert_ids_to_tokens(ref[k]), "after-chose", tok.convert_ids_to_tokens(ids[k]), "p(correct),p(chosen):", out)
        shown+=1
