"""One typed config tree for every run, split by concern:

* ``schema``: the dataclasses (one per component) and their defaults;
* ``overrides``: ``--set section.field=value`` parsing, and the tree to and from plain dicts;
* ``checks``: validation of every field, once, before any work;
* ``plan``: everything derived from the config, the variant, the world size and the shards, in
  one frozen ``RunPlan``;
* ``resume_policy``: which changes a resume refuses, warns about or accepts.

The names most callers need are importable from here.
"""

from __future__ import annotations

from typing import Any

from engine.config.checks import validate
from engine.config.overrides import apply_overrides, from_dict, parse_value, set_field, to_dict
from engine.config.plan import RunPlan, TeacherShape, plan_run
from engine.config.resume_policy import compare_for_resume, fingerprint
from engine.config.schema import GUARD_RING, Config
from engine.errors import ConfigError

__all__ = [
    "GUARD_RING",
    "Config",
    "ConfigError",
    "RunPlan",
    "TeacherShape",
    "apply_overrides",
    "compare_for_resume",
    "fingerprint",
    "from_dict",
    "parse_value",
    "plan_run",
    "resolved",
    "set_field",
    "to_dict",
    "validate",
]


def resolved(cfg: Config, plan: RunPlan) -> dict[str, Any]:
    """What the user set (``config``) and, separately, what the run plan derived from it (``plan``):
    the form written to RUN_DIR/config.json and printed by ``--print-config``."""
    return {"config": to_dict(cfg), "plan": plan.as_dict()}
