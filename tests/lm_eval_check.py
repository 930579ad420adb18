"""lm-evaluation-harness's `local-completions` model against the server: a multiple-choice task of a few
local items (nothing is downloaded) scored through echoed prompt log-probabilities, tokenized by the
server (/tokenizer_info, /tokenize), against the same log-likelihoods computed with transformers in fp32.
Both must pick the same choice for every item.

Run by `make check-lm-eval`, which installs lm-eval in a venv of its own (it brings datasets, evaluate and
more); the file name keeps it out of `make test`."""
import json
import os
import subprocess

import torch
import transformers

from splitfuse.compiled.bundled import bundled_model_dir
from splitfuse.frontend.serve import serve

LM_EVAL = os.environ.get("LM_EVAL", ".venv-lm-eval/bin/lm_eval")
ITEMS = [("What color is the sky on a clear day?", ["blue", "green", "red"], 0),
         ("How many legs does a cat have?", ["two", "four", "six"], 1),
         ("Which animal barks?", ["cow", "dog", "fish"], 1),
         ("What is frozen water called?", ["steam", "sand", "ice"], 2),
         ("Which of these is a fruit?", ["apple", "chair", "stone"], 0),
         ("What do bees make?", ["milk", "honey", "silk"], 1),
         ("Which planet do we live on?", ["Earth", "Mars", "Venus"], 0),
         ("What is the opposite of hot?", ["warm", "cold", "loud"], 1)]
TASK = """task: splitfuse_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
"""


def transformers_choices(tokenizer, model) -> list[int]:
    """The choice of highest log-likelihood per item, with lm-eval's split of context and continuation
    (the whole text encoded, the context's tokens cut off its front)."""
    picks = []
    for question, choices, _ in ITEMS:
        context = f"Question: {question}\nAnswer:"
        scores = []
        for choice in choices:
            whole = tokenizer(context + " " + choice, add_special_tokens=False).input_ids
            start = len(tokenizer(context, add_special_tokens=False).input_ids)
            with torch.no_grad():
                logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), dim=-1)
            scores.append(sum(logprobs[i - 1, whole[i]].item() for i in range(start, len(whole))))
        picks.append(max(range(len(choices)), key=scores.__getitem__))
    return picks


def test_lm_eval_picks_what_transformers_picks(tmp_path):
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in ITEMS))
    (tmp_path / "splitfuse_mc.yaml").write_text(TASK.format(data=data))
    with serve(http_port=0, zmq=False, device="cpu", dtype="float32", eager=True) as deployment:
        run = subprocess.run(
            [LM_EVAL, "--model", "local-completions", "--tasks", "splitfuse_mc", "--include_path", str(tmp_path),
             "--model_args", f"base_url={deployment.http_url}/v1/completions,model=smollm2-135m-instruct,"
                             "tokenizer_backend=remote,num_concurrent=1",
             "--output_path", str(tmp_path / "out"), "--log_samples"],
            capture_output=True, text=True, timeout=1200, env=os.environ | {"HF_DATASETS_OFFLINE": "1",
                                                                            "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    samples = [json.loads(line) for path in (tmp_path / "out").rglob("samples_splitfuse_mc_*.jsonl")
               for line in path.read_text().splitlines()]
    served = [max(range(len(s["filtered_resps"])), key=lambda i: float(s["filtered_resps"][i][0]))  # logged as text
              for s in sorted(samples, key=lambda s: s["doc_id"])]
    model = transformers.AutoModelForCausalLM.from_pretrained(bundled_model_dir(), dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(bundled_model_dir())
    assert served == transformers_choices(tokenizer, model)
    accuracy = sum(p == a for p, (_, _, a) in zip(served, ITEMS)) / len(ITEMS)
    print(f"lm-eval through splitfuse: acc {accuracy:.3f} over {len(ITEMS)} items; transformers picks the same")
