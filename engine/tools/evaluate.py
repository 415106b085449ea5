"""What did pretraining learn? A linear probe and a k-NN classifier on the features of every
encoder block, on labeled shard sets.

    python -m engine.tools.evaluate (--run RUN_DIR [--step N] | --export OUT_DIR | --random ARCH)
        --train-shards DIR --val-shards DIR [--img-size S] [--json OUT]

Features of block b: the mean over patch tokens of the block's output after a parameter-free
LayerNorm (the raw residual stream, as the decoder taps read it), from a center crop of each
image, unmasked. Linear probe: standardized features, multinomial logistic regression with the
regularization chosen on a held-out fifth of the training set, then refit on all of it. k-NN:
cosine similarity, k neighbours voting with weights exp(sim / 0.07) (as in DINO's evaluation).
Prints one row per block.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the heavy imports happen inside the functions: --help answers at once
    import numpy as np

    from engine.config import Config
    from engine.models.mim import MaskedViTEncoder

log = logging.getLogger("engine.tools.evaluate")


def load_encoder(
    run: str | None = None,
    step: int | None = None,
    export: str | None = None,
    random_arch: str | None = None,
    img_size: int = 0,
) -> tuple[MaskedViTEncoder, Config]:
    """Our encoder with weights from a run (consolidated fp32), an export folder, or random init."""
    import torch

    from engine.config import Config, plan_run
    from engine.models.mim import MaskedViTEncoder
    from engine.models.registry import get_variant

    state = None
    if export or run:
        from engine.weights.sources import encoder_weights

        w = encoder_weights(export or run, step)
        cfg, state = w.config, w.state
    else:
        cfg = Config()
        cfg.model.arch = random_arch
        cfg.model.img_size = img_size
        state = None
    plan = plan_run(cfg)
    torch.manual_seed(0)
    enc = MaskedViTEncoder(get_variant(plan.arch), plan.img_size)
    if state is not None:
        enc.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return enc.eval(), cfg


def block_features(
    enc: MaskedViTEncoder, shards: str, img_size: int, batch: int = 64
) -> tuple[list[np.ndarray], np.ndarray]:
    """Per block [N, D] features, and the labels [N]."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from data_pipeline.loaders.eval_reader import load_batches

    feats: list[list[np.ndarray]] = [[] for _ in range(enc.depth)]
    labels = []
    with torch.no_grad():
        for imgs, y, _ in load_batches(shards, img_size, batch):
            for b, x in enumerate(enc.forward_all(imgs)):
                tokens = F.layer_norm(x[:, 1:].float(), x.shape[-1:])
                feats[b].append(tokens.mean(dim=1).numpy())
            labels.append(y.numpy())
    return [np.concatenate(f) for f in feats], np.concatenate(labels)


def linear_probe(xtr: np.ndarray, ytr: np.ndarray, xva: np.ndarray, yva: np.ndarray, seed: int = 0) -> float:
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(xtr))
    hold = idx[: len(idx) // 5]
    fit = idx[len(idx) // 5 :]
    best_c, best = 1.0, -1.0
    for c in (0.01, 0.1, 1.0, 10.0):
        scaler = StandardScaler().fit(xtr[fit])
        clf = LogisticRegression(C=c, max_iter=3000).fit(scaler.transform(xtr[fit]), ytr[fit])
        acc = clf.score(scaler.transform(xtr[hold]), ytr[hold])
        if acc > best:
            best_c, best = c, acc
    scaler = StandardScaler().fit(xtr)
    clf = LogisticRegression(C=best_c, max_iter=3000).fit(scaler.transform(xtr), ytr)
    return float(clf.score(scaler.transform(xva), yva))


def knn(xtr: np.ndarray, ytr: np.ndarray, xva: np.ndarray, yva: np.ndarray, k: int = 20, t: float = 0.07) -> float:
    import torch
    import torch.nn.functional as F

    a = F.normalize(torch.from_numpy(xtr), dim=1)
    b = F.normalize(torch.from_numpy(xva), dim=1)
    sim = b @ a.T  # [Nva, Ntr]
    top, idx = sim.topk(min(k, a.shape[0]), dim=1)
    votes = torch.zeros(b.shape[0], int(max(ytr.max(), yva.max())) + 1)
    votes.scatter_add_(1, torch.from_numpy(ytr)[idx], (top / t).exp())
    return float((votes.argmax(1).numpy() == yva).mean())


def overlap_warning(train_shards: str, val_shards: str) -> str | None:
    """A warning when the validation set is (partly) the training set: same folder or same JPEG bytes."""
    import pyarrow.parquet as pq

    a, b = Path(train_shards).resolve(), Path(val_shards).resolve()
    if a == b:
        return (
            f"the validation shards are the training shards ({a}): the accuracies measure memorization, "
            "not generalization; use a held-out split (make_shards of another folder)"
        )
    ca = set(pq.read_table(a / "manifest.parquet", columns=["checksum"]).column("checksum").to_pylist())
    cb = pq.read_table(b / "manifest.parquet", columns=["checksum"]).column("checksum").to_pylist()
    shared = sum(1 for c in cb if c in ca)
    if shared:
        return f"{shared} of {len(cb)} validation images are also in the training shards (same bytes)"
    return None


def evaluate(enc: MaskedViTEncoder, img_size: int, train_shards: str, val_shards: str, k: int = 20) -> list[dict]:
    ftr, ytr = block_features(enc, train_shards, img_size)
    fva, yva = block_features(enc, val_shards, img_size)
    if (ytr < 0).any() or (yva < 0).any():
        raise ValueError("evaluation needs labeled shard sets (labels >= 0)")
    rows = []
    for b in range(enc.depth):
        rows.append(
            {"block": b + 1, "linear": linear_probe(ftr[b], ytr, fva[b], yva), "knn": knn(ftr[b], ytr, fva[b], yva, k)}
        )
    return rows


def render(rows: list[dict], title: str = "") -> str:
    lines = [title] if title else []
    lines += ["| block | linear probe | k-NN |", "|---|---|---|"]
    lines += [f"| {r['block']} | {100 * r['linear']:.1f} | {100 * r['knn']:.1f} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m engine.tools.evaluate",
        description="Per-block linear probe and k-NN accuracy of a pretrained encoder's features on labeled shards "
        "(a quick look at what pretraining learned; fine-tuning is python -m engine.finetune).",
    )
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a pretraining run folder: its newest checkpoint (or --step)")
    src.add_argument("--export", help="a folder written by python -m engine.tools.export")
    src.add_argument("--random", metavar="ARCH", help="a randomly initialized encoder of this variant (a baseline)")
    ap.add_argument("--step", type=int, help="with --run: this step's checkpoint instead of the newest")
    ap.add_argument("--img-size", type=int, default=0, help="with --random: the input size (0 = the variant's)")
    ap.add_argument("--train-shards", required=True, help="labeled shards the probes are fitted on")
    ap.add_argument("--val-shards", required=True, help="held-out labeled shards the accuracies are measured on")
    ap.add_argument("--knn-k", type=int, default=20, help="neighbours voting in the k-NN classifier (default 20)")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from engine.config import plan_run
    from engine.weights.safe_load import load_guard

    warning = overlap_warning(args.train_shards, args.val_shards)
    if warning:
        log.warning("%s", warning)
    with load_guard():
        enc, cfg = load_encoder(args.run, args.step, args.export, args.random, args.img_size)
    size = plan_run(cfg).img_size
    rows = evaluate(enc, size, args.train_shards, args.val_shards, args.knn_k)
    print(
        render(rows, f"{cfg.model.arch} ({args.run or args.export or 'random init'}), accuracy % on {args.val_shards}")
    )
    if warning:
        print(f"WARNING: {warning}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
