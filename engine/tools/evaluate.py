"""What did pretraining learn? A linear probe and a k-NN classifier on the features of every
encoder block, on labeled shard sets.

    python -m engine.tools.evaluate (--run RUN_DIR [--step N] | --export OUT_DIR | --random ARCH)
        --train-shards DIR --val-shards DIR [--img-size S] [--json OUT]
    python -m engine.tools.evaluate --classifier (FINETUNE_RUN | EXPORT_DIR) --val-shards DIR [--json OUT]

``--classifier``: a fine-tuned (or linear-probed) model's top-1 / top-5 on validation shards, as
the fine-tuning run itself evaluates (its crop, its labels by class name), like MAE's ``--eval``.

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


def classifier_of(source: str, step: int | None = None):
    """(timm model in eval mode, its label names, image size, eval crop) from a fine-tuning run or
    checkpoint folder, or from an export of one."""
    from engine.config import from_dict, plan_run
    from engine.errors import WeightsError
    from engine.run_folder import checkpoints as ckpt
    from engine.tools.export import _classifier, load_exported
    from engine.weights.sources import consolidated_state, find_checkpoint, resolve

    kind, path = resolve(source, step)
    if kind == "export":
        meta = json.loads((path / "export.json").read_text())
        if meta.get("kind") != "classifier":
            raise WeightsError(
                f"{path}: an export of a pretrained encoder, not of a classifier; evaluate it with --export"
            )
        cfg = from_dict(meta["config"])
        model, names = load_exported(path), meta.get("label_names")
    else:
        found = path if kind == "checkpoint" else find_checkpoint(path, step)
        marker = ckpt.read_marker(found)
        cfg = from_dict(marker["config"])
        if cfg.task == "pretrain":
            raise WeightsError(f"{found}: a pretraining checkpoint, not a classifier; evaluate it with --run")
        import timm

        weights, name, kwargs = _classifier(cfg, plan_run(cfg), marker, consolidated_state(found))
        model = timm.create_model(name, pretrained=False, **kwargs)
        model.load_state_dict(weights, strict=True)
        model.eval()
        names = marker["classifier"].get("label_names")
    return model, names, plan_run(cfg).img_size, cfg.finetune.eval_crop


def label_map_for(names: list[str] | None, val_shards: str) -> tuple[int, ...] | None:
    """Stored validation label -> the classifier's output, by class name (None: the same numbers)."""
    from data_pipeline.dataset.labels import read_classes
    from data_pipeline.dataset.table import read_table
    from engine.errors import DataError

    classes = read_classes(val_shards)
    if not names or not classes:
        return None
    out_of = {n: i for i, n in enumerate(names)}
    top = max(max(classes.values()), int(read_table(val_shards).label.max()))
    lookup = [-1] * (top + 1)
    for name, stored in classes.items():
        if name not in out_of:
            raise DataError(f"{val_shards}: class {name!r} is not one of the classifier's {len(names)} classes")
        lookup[stored] = out_of[name]
    return tuple(lookup)


def evaluate_classifier(source: str, val_shards: str, step: int | None = None, batch: int = 64) -> dict:
    """Top-1 / top-5 over every validation sample once, with the fine-tuning run's own eval transform."""
    import torch

    from data_pipeline.loaders.eval_loader import EvalLoader, EvalSpec

    model, names, size, crop = classifier_of(source, step)
    spec = EvalSpec(val_shards, 0, 1, batch, size, crop, 2, "cpu", None, (), label_map_for(names, val_shards))
    hits1 = hits5 = n = 0
    with torch.no_grad():
        for b in EvalLoader("torch", spec):
            logits = model(b.img.float())
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hit = top == b.label.to(top.device)[:, None]
            hits1, hits5, n = hits1 + int(hit[:, 0].sum()), hits5 + int(hit.any(1).sum()), n + len(b.label)
    return {"top1": 100 * hits1 / max(n, 1), "top5": 100 * hits5 / max(n, 1), "val_samples": n, "img_size": size}


def check_labeled(shards: str, what: str) -> None:
    """A one-line refusal for a folder that is not finished shards, or whose samples have no label."""
    from engine.errors import DataError

    meta_path = Path(shards) / "dataset.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        raise DataError(f"{what}={shards!r} ({Path(shards).resolve()}): not a finished shard folder") from None
    if meta.get("label_values") == [-1] or not meta.get("num_samples"):
        raise DataError(f"{what}={shards!r}: unlabeled or empty shards; evaluation needs labeled ones")


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
    src.add_argument(
        "--classifier",
        metavar="SRC",
        help="a fine-tuning or linear-probing run (or checkpoint, or its export): top-1/top-5 on --val-shards",
    )
    ap.add_argument("--step", type=int, help="with --run or --classifier: this step's checkpoint, not the newest")
    ap.add_argument("--img-size", type=int, default=0, help="with --random: the input size (0 = the variant's)")
    ap.add_argument("--train-shards", help="labeled shards the probes are fitted on (not with --classifier)")
    ap.add_argument("--val-shards", required=True, help="held-out labeled shards the accuracies are measured on")
    ap.add_argument("--knn-k", type=int, default=20, help="neighbours voting in the k-NN classifier (default 20)")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    if not args.classifier and not args.train_shards:
        ap.error("--train-shards is required with --run, --export and --random")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from engine.errors import StackError

    try:
        return _main(args)
    except StackError as err:
        print(f"evaluate: {err}", file=sys.stderr)
        return err.exit_code
    except (OSError, ValueError) as err:  # a path or file the user gave
        print(f"evaluate: {type(err).__name__}: {err}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    from engine.config import plan_run
    from engine.weights.safe_load import load_guard

    check_labeled(args.val_shards, "--val-shards")
    if args.classifier:
        with load_guard():
            res = evaluate_classifier(args.classifier, args.val_shards, args.step)
        print(
            f"{args.classifier}: top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%  "
            f"on {res['val_samples']} images of {args.val_shards} ({res['img_size']} px)"
        )
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=2))
        return 0
    from data_pipeline.dataset.table import overlap_warning

    check_labeled(args.train_shards, "--train-shards")
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
