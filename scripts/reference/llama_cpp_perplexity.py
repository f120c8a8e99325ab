"""Perplexity of a text under a GGUF model, computed by llama.cpp (through llama-cpp-python).

An independent check of `cohort perplexity`: the same windowing as llama.cpp's perplexity tool
(windows of --ctx tokens from an empty context, the second half of each window scored), so the two
figures should agree to within the difference between the two engines' arithmetic (llama.cpp
quantizes activations to 8 bits in its dot products; Cohort keeps them in f32).

Setup (outside the repository; a few minutes, it builds llama.cpp from source):
    python3 -m venv refvenv && refvenv/bin/pip install numpy llama-cpp-python==0.3.36
Run:
    refvenv/bin/python scripts/reference/llama_cpp_perplexity.py MODEL.gguf data/text/lighthouse.txt --ctx 512
"""
import argparse, json, math

import numpy as np
from llama_cpp import Llama

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("text")
p.add_argument("--ctx", type=int, default=512)
p.add_argument("--threads", type=int, default=2)
a = p.parse_args()

llm = Llama(model_path=a.model, n_ctx=a.ctx, n_batch=a.ctx, n_threads=a.threads, logits_all=True, verbose=False)
text = open(a.text, encoding="utf-8").read()
add_bos = llm.metadata.get("tokenizer.ggml.add_bos_token", "false") == "true"
tokens = llm.tokenize(text.encode(), add_bos=add_bos)
windows = len(tokens) // a.ctx
first = a.ctx // 2
nll, count, running = 0.0, 0, []
for w in range(windows):
    window = tokens[w * a.ctx:(w + 1) * a.ctx]
    if add_bos:
        window[0] = llm.token_bos()
    llm.reset()
    llm.eval(window)
    scores = np.array(llm.scores[: a.ctx], dtype=np.float64)
    for j in range(first, a.ctx - 1):
        row = scores[j]
        m = row.max()
        lse = math.log(np.exp(row - m).sum()) + m
        nll += lse - row[window[j + 1]]
        count += 1
    running.append(math.exp(nll / count))
print(json.dumps(dict(tool="llama.cpp via llama-cpp-python", text_tokens=len(tokens), ctx=a.ctx, windows=windows,
                      scored_tokens=count, mean_nll=nll / count, perplexity=math.exp(nll / count), running=running)))
