"""Shows that Hugging Face PEFT loads a Cohort adapter: the same perplexity under transformers +
PEFT as under `cohort perplexity --adapter`.

transformers loads the GGUF base model itself (dequantized to float32), PEFT applies the adapter
directory `cohort train` wrote, and both sides score the same text over the same windows (the
windowing of llama.cpp's perplexity tool, as `cohort perplexity` does). Digits are removed from
the text first: transformers' GGUF tokenizer does not split numbers digit by digit as SmolLM2's
own tokenizer (and Cohort's) does, and the comparison needs the same tokens on both sides.

Not part of CI (it needs PyTorch). Setup, outside the repository:
    python3 -m venv anchor-venv
    anchor-venv/bin/pip install torch==2.15.0 transformers==5.23.0 peft==0.21.2 gguf
Run:
    anchor-venv/bin/python scripts/reference/peft_check.py MODEL.gguf ADAPTER_DIR data/text/lighthouse.txt \
        --cohort target/debug/cohort
"""
import argparse, json, math, os, re, subprocess, tempfile

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("adapter")
p.add_argument("text")
p.add_argument("--ctx", type=int, default=512)
p.add_argument("--cohort", default="cohort")
a = p.parse_args()
torch.set_num_threads(2)

text = re.sub(r"[0-9]", "", open(a.text, encoding="utf-8").read())
tmp = tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8")
tmp.write(text)
tmp.close()


def cohort(adapter):
    cmd = [a.cohort, "perplexity", "--model", a.model, "--file", tmp.name, "--ctx", str(a.ctx), "--json"]
    if adapter:
        cmd += ["--adapter", adapter]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def ppl(model, ids):
    first = a.ctx // 2
    nll, count = 0.0, 0
    for w in range(len(ids) // a.ctx):
        window = torch.tensor([ids[w * a.ctx:(w + 1) * a.ctx]])
        with torch.no_grad():
            logits = model(window).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1)
        for j in range(first, a.ctx - 1):
            nll -= logp[j, window[0, j + 1]].item()
            count += 1
    return math.exp(nll / count), count


d, name = os.path.split(os.path.abspath(a.model))
tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
ids = tok(text, add_special_tokens=False).input_ids
base = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, torch_dtype=torch.float32).eval()
c_base, c_adapted = cohort(None), cohort(a.adapter)
hf_base, n = ppl(base, ids)
peft_model = PeftModel.from_pretrained(base, a.adapter).eval()
hf_adapted, _ = ppl(peft_model, ids)
print(json.dumps(dict(
    text_tokens=dict(cohort=c_base["text_tokens"], transformers=len(ids)), scored=n,
    base=dict(cohort=c_base["perplexity"], transformers=hf_base),
    adapted=dict(cohort=c_adapted["perplexity"], transformers_peft=hf_adapted),
    ratio_adapted=c_adapted["perplexity"] / hf_adapted,
)))
os.unlink(tmp.name)
