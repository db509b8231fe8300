"""How much of each stage's weight change lies in the directions OSF keeps, through the stage loop.

    OMP_NUM_THREADS=1 python benchmarks/osf_subspace.py --json runs/bench/osf_subspace.json

Runs the demo sequence (3 stages; 12 training examples per task, --epochs epochs, batches of 4 x 2) on a tiny random
Llama (or --model) four ways: OSF with the loop's AdamW at lr 1e-4 and 1e-3; OSF with plain SGD in place of AdamW
(lr 50, no clipping: a step that is a multiple of the gradient); vanilla LoRA (rank 4, lr 1e-3) for comparison. For
every stage t and target layer, with k_t the rank OSF keeps at that stage (the default schedule, recorded in
init.json) and U_k, V_k the top k_t left and right singular vectors of the stage's starting weight W_{t-1} (an SVD of
the rebuilt merged weights), the share of the change Delta = W_t - W_{t-1} in the kept directions,
max(|U_k^T Delta|, |Delta V_k^T|) / |Delta| (Frobenius norms); reported as median and max over the layers. A
direction drawn at random would put about sqrt(k_t / min(d_out, d_in)) there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from slicelora.loop.config import load_config
from slicelora.loop.stages import merged_model, run
from slicelora.models import tiny_llama, tiny_tokenizer

SMALL = ["sequence=demo", "init.batches=2", "init.batch_size=4", "train.batch_size=4", "train.grad_accum=2",
         "train.max_length=96", "train.max_examples=12", "eval.examples=3", "eval.max_new_tokens=3",
         "general.enabled=false"]
VARIANTS = {
    "osf_adamw_lr1e-4": ["adapter.type=osf"],
    "osf_adamw_lr1e-3": ["adapter.type=osf", "train.lr=1e-3"],
    "osf_sgd_lr50": ["adapter.type=osf", "train.lr=50", "train.max_grad_norm=0"],
    "lora_vanilla_r4_lr1e-3": ["adapter.rank=4", "init.method=vanilla", "train.lr=1e-3"],
}


class SGD(torch.optim.SGD):
    """Plain SGD under AdamW's signature: the loop's `torch.optim.AdamW(params, lr=..., weight_decay=...)` makes it."""

    def __init__(self, params, lr, weight_decay=0.0):
        super().__init__(params, lr=lr, weight_decay=weight_decay)


def kept_shares(folder: Path, ranks: dict[int, dict[str, int]]) -> dict[int, list[float]]:
    """Per stage, every target layer's share of the change in its top k_t singular directions."""
    names = list(ranks[1])
    weights = []
    for t in range(len(ranks) + 1):
        modules = dict(merged_model(folder, t)[0].named_modules())
        weights.append({name: modules[name].weight.detach().double() for name in names})
    shares = {}
    for t in range(1, len(ranks) + 1):
        shares[t] = []
        for name in names:
            w, delta, k = weights[t - 1][name], weights[t][name] - weights[t - 1][name], ranks[t][name]
            u, _, vh = torch.linalg.svd(w)
            shares[t].append(max(float((u[:, :k].T @ delta).norm()), float((delta @ vh[:k].T).norm()))
                             / float(delta.norm()))
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model folder (default: a tiny random Llama, as in the tests)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="osf_subspace"))
    model = args.model
    if model is None:
        model = work / "tiny"
        tokenizer = tiny_tokenizer()
        tiny_llama(tokenizer, seed=0).save_pretrained(model)
        tokenizer.save_pretrained(model)
    folders = {}
    for label, extra in VARIANTS.items():
        adamw = torch.optim.AdamW
        torch.optim.AdamW = SGD if "sgd" in label else adamw
        try:
            folders[label] = run(load_config(None, [f"model={model}", *SMALL, f"train.epochs={args.epochs}", *extra]),
                                 work / label)
        finally:
            torch.optim.AdamW = adamw
    first = folders[next(iter(VARIANTS))]  # the ranks OSF keeps: one schedule on the same shapes for every variant
    ranks = {t: json.loads((first / "stages" / f"{t:02d}" / "init.json").read_text())["preserved_ranks"]
             for t in (1, 2, 3)}
    results = {}
    for label, folder in folders.items():
        for t, shares in kept_shares(folder, ranks).items():
            results[f"{label}.stage{t}.median"] = statistics.median(shares)
            results[f"{label}.stage{t}.max"] = max(shares)
    for label in VARIANTS:
        print(label, " ".join(f"stage {t}: median {results[f'{label}.stage{t}.median']:.3g} max "
                              f"{results[f'{label}.stage{t}.max']:.3g}" for t in (1, 2, 3)))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
