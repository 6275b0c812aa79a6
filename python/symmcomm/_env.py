"""The NCCL environment symmcomm wants, reported, and applied only when asked: setting
``NCCL_*`` variables in a running process races with threads that read the environment and is
too late once NCCL has started, so call :func:`nccl_env` with ``apply=True`` first thing, before
torch or symmcomm starts NCCL. A value the user set always wins."""

from __future__ import annotations

import os
from typing import List

from symmcomm import _core


def nccl_env(symmetric: bool = True, dcp_size: int = 1, *, apply: bool = False) -> List[dict]:
    """The plan for this deployment, one dict per variable (``name``, ``action``: ``set``,
    ``keep_user`` or ``observe``; ``value``; ``user``; ``why``). With ``apply=True`` the
    ``set`` lines are written to ``os.environ``. ``NCCL_NVLS_ENABLE`` is never set."""
    plan = _core.nccl_env_plan_of(symmetric, dcp_size)
    if apply:
        for line in plan:
            if line["action"] == "set":
                os.environ[line["name"]] = line["value"]
    return plan
