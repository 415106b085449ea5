"""Helpers shared by both test tiers: damaging shards on purpose, pickle payloads, waiting on runs."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from data_pipeline.dataset.wds_index import read_index
from engine.run_folder.checkpoints import list_checkpoints

MARK = "payload-ran"


def in_process_config(run: Path, shards: Path, steps: int, *sets: str):
    """The test preset for a run of the real ``Trainer`` in this process (torch loader, no figures)."""
    from engine.config import apply_overrides, validate
    from engine.presets import get_preset

    cfg = get_preset("deepmim_test_pixel")
    base = [
        f"data.shards={shards}",
        f"run_dir={run}",
        f"schedule.max_steps={steps}",
        "data.loader=torch",
        "log.reconstructions=false",
        "log.tensorboard=false",
    ]
    apply_overrides(cfg, [*base, *sets])
    validate(cfg)
    return cfg


def train_in_process(cfg, faults=None) -> dict:
    """Pretraining on the local engine as a world of one CPU rank (``engine.loop.engines``)."""
    from engine.loop.dist import DistInfo
    from engine.loop.engines import local_engine
    from engine.loop.trainer import Trainer
    from engine.tasks.masked_modeling import PretrainTask

    cpu = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    return Trainer(cfg, cpu, PretrainTask(), engine_factory=local_engine, faults=faults).train()


class Payload:
    """Pickles to a call that creates a marker file when unpickled by an unrestricted loader."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def copy_shards(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def corrupt_jpeg(root: Path, shard: str, which: int = 0) -> str:
    """Zero the second half of one JPEG inside a tar (its EOI marker goes with it)."""
    s = read_index(root / f"{shard}.idx")[which]
    jpg = s.component("jpg")
    with open(root / f"{shard}.tar", "r+b") as f:
        f.seek(jpg.offset + jpg.size // 2)
        f.write(b"\0" * (jpg.size - jpg.size // 2))
    return s.key


def truncate_tar(root: Path, shard: str, keep_samples: int) -> int:
    """Cut the tar in the middle of sample ``keep_samples``; returns how many samples are lost."""
    entries = read_index(root / f"{shard}.idx")
    cut = entries[keep_samples].component("jpg")
    with open(root / f"{shard}.tar", "r+b") as f:
        f.truncate(cut.offset + cut.size // 3)
    return len(entries) - keep_samples


def text(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


def wait_for(cond: Callable[[], bool], timeout: float = 240.0) -> None:
    """Poll until ``cond()`` (a guard against a hung run, not a timing assertion)."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.05)


def kill_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def final_state(run: Path) -> tuple[dict, list[torch.Tensor]]:
    """Module weights and every rank's fp32 master partition + Adam moments of the newest checkpoint."""
    ck = list_checkpoints(run / "checkpoints")[-1]
    module = torch.load(ck / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    optim = []
    for f in sorted(ck.glob("*optim_states.pt")):
        osd = torch.load(f, weights_only=False)["optimizer_state_dict"]
        optim += list(osd["single_partition_of_fp32_groups"])
        for st in osd["base_optimizer_state"]["state"].values():
            optim += [st["exp_avg"], st["exp_avg_sq"]]
    return module, optim


def corrupt_header(root: Path, shard: str, which: int = 0) -> str:
    """Zero a JPEG's frame size: SOI and EOI markers stay, so the cheap start-up check passes, but
    no decoder (DALI's or PIL's) can decode it."""
    s = read_index(root / f"{shard}.idx")[which]
    jpg = s.component("jpg")
    with open(root / f"{shard}.tar", "r+b") as f:
        f.seek(jpg.offset)
        data = bytearray(f.read(jpg.size))
        i = data.find(b"\xff\xc0")
        data[i + 5 : i + 9] = b"\0\0\0\0"
        f.seek(jpg.offset)
        f.write(bytes(data))
    return s.key


def to_official_layout(model, numbered: bool = False) -> dict:
    """Our DeepMIM model -> the official key layout, written independently of the loaders: MAE's
    (one decoder: ``decoder_embed``, ``decoder_blocks.i``, ...) or, ``numbered``, DeepMIM's (one per
    tap: ``decoder_embed1..T``, ``decoder_blocks1.i``, ``mask_token1..T``, ...)."""
    sd = {k[len("encoder.") :]: v for k, v in model.state_dict().items() if k.startswith("encoder.")}
    d = model.decoders
    sd["decoder_pos_embed"] = d.pos_embed.detach()
    for t in range(d.num if numbered else 1):
        n = str(t + 1) if numbered else ""
        sd[f"mask_token{n}"] = d.mask_token.detach()[t].view(1, 1, -1)
        for name in ("embed", "norm", "pred"):
            mod = getattr(d, name)
            sd[f"decoder_{name}{n}.weight"], sd[f"decoder_{name}{n}.bias"] = (
                mod.weight.detach()[t],
                mod.bias.detach()[t],
            )
        for i, blk in enumerate(d.blocks):
            for ours, theirs in (
                ("norm1", "norm1"),
                ("qkv", "attn.qkv"),
                ("proj", "attn.proj"),
                ("norm2", "norm2"),
                ("fc1", "mlp.fc1"),
                ("fc2", "mlp.fc2"),
            ):
                mod = getattr(blk, ours)
                sd[f"decoder_blocks{n}.{i}.{theirs}.weight"] = mod.weight.detach()[t]
                sd[f"decoder_blocks{n}.{i}.{theirs}.bias"] = mod.bias.detach()[t]
    return sd


def photo_bytes(demo_tree: Path, i: int, fmt: str = "JPEG") -> tuple[bytes, str]:
    """A real photo crop of the demo tree, as JPEG or PNG bytes, and its class folder."""
    files = sorted(p for p in demo_tree.rglob("*") if p.is_file())
    f = files[i % len(files)]
    if fmt == "JPEG":
        return f.read_bytes(), f.parent.name
    buf = io.BytesIO()
    Image.open(f).convert("RGB").save(buf, format=fmt)
    return buf.getvalue(), f.parent.name


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def make_img2dataset(src: Path, demo_tree: Path) -> Path:
    """img2dataset's layout: 00000.tar, 00001.tar with NNNNNNNNN.{jpg,txt,json}; captions in .txt,
    a class name in the json's 'label' field; two PNGs (under .png), one corrupt JPEG, one sample
    without an image."""
    for t in range(2):
        members = []
        for i in range(10):
            key = f"{t:05d}{i:04d}"
            fmt = "PNG" if i in (3, 7) else "JPEG"
            data, cls = photo_bytes(demo_tree, 10 * t + i, fmt)
            if t == 1 and i == 5:
                data = b"\xff\xd8\xff\xe0" + b"not really a jpeg" * 20
            meta = {"url": f"https://example.com/{key}", "caption": f"a photo of {cls}", "label": cls}
            if not (t == 0 and i == 9):  # this one lost its image
                members.append((f"{key}.{'png' if fmt == 'PNG' else 'jpg'}", data))
            members += [(f"{key}.txt", meta["caption"].encode()), (f"{key}.json", json.dumps(meta).encode())]
        write_tar(src / f"{t:05d}.tar", members)
    return src
