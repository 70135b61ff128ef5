"""CUDA check (not collected by pytest; no GPU in CI): a tiny llama checkpoint served over HTTP on the GPU, the
openai SDK's calls, greedy tokens and logprobs against transformers (float32, CPU) on the same checkpoint. Run it
from the repository root on a machine with a GPU, then `python -m pytest -q tests/test_architectures.py` there
(every architecture's greedy generation against transformers, the engine on CUDA):

    PYTHONPATH=$PWD python tests/cuda_check.py

(The workplace's H200 image lacks fastapi, uvicorn, pydantic, openai, gguf and xgrammar: carry their cp312 wheels.)"""
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import httpx  # noqa: E402
import openai  # noqa: E402
import torch  # noqa: E402
from tiny_models import save_tiny_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

ok = True
def check(name, cond, detail=""):
    global ok
    ok &= bool(cond)
    print(("PASS " if cond else "FAIL ") + name, detail, flush=True)

work = Path(tempfile.mkdtemp())
d = save_tiny_model("llama", work / "tiny")
log_path = work / "server.log"
log = open(log_path, "w")
proc = subprocess.Popen([sys.executable, "-m", "slipstream.entrypoints.openai.api_server", "--model", str(d), "--port",
                         "8199", "--max-model-len", "256", "--enable-logprob"], stdout=log, stderr=subprocess.STDOUT)
try:
    for _ in range(240):
        try:
            if httpx.get("http://127.0.0.1:8199/v1/models").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    text = log_path.read_text()
    check("server loaded on cuda", " on cuda" in text, [line for line in text.splitlines() if "loaded" in line][-1:])
    client = openai.OpenAI(base_url="http://127.0.0.1:8199/v1", api_key="x")
    m = client.models.list().data[0].id
    tok = AutoTokenizer.from_pretrained(d)
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    for prompt in ("The quick brown fox", "def fibonacci(n):", "Once upon a time, in a small village"):
        ids = tok.encode(prompt)
        r = client.completions.create(model=m, prompt=ids, max_tokens=24, temperature=0, logprobs=1,
                                      extra_body={"ignore_eos": True, "return_token_ids": True})
        with torch.inference_mode():
            out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=24, min_new_tokens=24, do_sample=False, output_logits=True,
                              return_dict_in_generate=True)
        want_ids = out.sequences[0, len(ids):].tolist()
        want_lp = torch.cat(out.logits).float().log_softmax(-1).gather(1, torch.tensor(want_ids)[:, None])[:, 0]
        got_lp = torch.tensor(r.choices[0].logprobs.token_logprobs)
        same = r.choices[0].text == tok.decode(want_ids)
        err = (got_lp - want_lp).abs().max().item() if len(got_lp) == len(want_lp) else float("inf")
        check(f"greedy == transformers ({prompt!r})", same and err < 1e-3, f"max logprob err {err:.2e}")
    c = client.chat.completions.create(model=m, messages=[{"role": "user", "content": "hi"}], max_tokens=8)
    check("chat", c.choices[0].message.content is not None and c.usage.completion_tokens > 0)
    parts = [ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
        model=m, messages=[{"role": "user", "content": "hi"}], max_tokens=8, stream=True) if ch.choices]
    check("stream", len(parts) > 0)
    seeded = [client.chat.completions.create(model=m, messages=[{"role": "user", "content": "hi"}], max_tokens=12,
                                             temperature=1.0, seed=7).choices[0].message.content for _ in range(2)]
    check("seeded sampling repeats", seeded[0] == seeded[1])
    try:
        client.chat.completions.create(model=m, messages=[], max_tokens=4)
        check("empty messages -> 400", False)
    except openai.BadRequestError as e:
        check("empty messages -> 400", e.status_code == 400)
    batch = [client.completions.create(model=m, prompt="hello " * (i + 1), max_tokens=16) for i in range(4)]
    check("several requests", all(b.choices[0].text is not None for b in batch))
    check("metrics", httpx.get("http://127.0.0.1:8199/metrics").status_code == 200)
finally:
    proc.terminate()
    proc.wait(30)
print("ALL PASS" if ok else "SOME FAILED")
