"""Run by test_teacher_runs in a fresh process: trains a few steps in-process (world of one) and
checks that the teacher is outside the optimizer and bit-identical afterwards. Prints OK."""

from __future__ import annotations

import sys

import torch

from engine.config import apply_overrides, validate
from engine.loop.dist import setup_distributed
from engine.loop.trainer import Trainer
from engine.presets import get_preset
from engine.tasks.masked_modeling import PretrainTask


def main(preset: str, run_dir: str, *overrides: str) -> None:
    cfg = get_preset(preset)
    cfg.run_dir = run_dir
    apply_overrides(cfg, list(overrides))
    validate(cfg)
    trainer = Trainer(cfg, setup_distributed(), PretrainTask())
    trainer.build()
    teacher = trainer.task.target.module
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = trainer.task.module.decoders.pred.weight.detach().clone()
    teacher_ids = {id(p) for p in teacher.parameters()}
    in_optimizer = {id(p) for g in trainer.engine.optimizer.param_groups for p in g["params"]}
    assert not teacher_ids & in_optimizer, "teacher parameters are in the optimizer"
    assert all(not p.requires_grad for p in teacher.parameters())
    result = trainer.train()
    assert result["step"] == cfg.schedule.max_steps, result
    assert all(p.grad is None for p in teacher.parameters()), "teacher received gradients"
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "teacher weights changed"
    assert not torch.equal(student_before, trainer.task.module.decoders.pred.weight.detach()), (
        "the student did not train"
    )
    print("OK")


if __name__ == "__main__":
    main(*sys.argv[1:])
