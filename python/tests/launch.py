"""A small launcher for the tests: N processes of one Python script with torchrun's variables
(RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), each with a
deadline, each printing one JSON line of results that the launcher collects."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Dict, List, Optional

import symmcomm as sc

RESULT = "SYMMCOMM-RESULT "


def report(value) -> None:
    """From a rank: hand `value` (JSON) back to the launcher."""
    print(RESULT + json.dumps(value), flush=True)


def launch(
    script: str,
    nproc: int,
    *,
    timeout: float = 240.0,
    env: Optional[Dict[str, str]] = None,
    args: List[str] = (),
) -> List[object]:
    """Run `script` as `nproc` ranks; returns each rank's reported value, rank order. A rank
    that fails, reports nothing, or outlives `timeout` fails the call with every rank's
    output."""
    port = sc.free_port()
    # A second port for tests that serve their own rendezvous beside MASTER_PORT's: asked of
    # the kernel like the first, never derived from it (MASTER_PORT + k may be any other
    # process's ephemeral port).
    rendezvous_port = sc.free_port()
    while rendezvous_port == port:
        rendezvous_port = sc.free_port()
    procs = []
    for rank in range(nproc):
        e = dict(os.environ)
        e.update(
            RANK=str(rank),
            WORLD_SIZE=str(nproc),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(nproc),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            SYMMCOMM_TEST_RENDEZVOUS_PORT=str(rendezvous_port),
            PYTHONUNBUFFERED="1",
        )
        e.pop("TORCHELASTIC_RUN_ID", None)
        e.update(env or {})
        here = os.path.dirname(os.path.abspath(__file__))
        e["PYTHONPATH"] = here + os.pathsep + e.get("PYTHONPATH", "")
        procs.append(
            subprocess.Popen(
                [sys.executable, script, *args],
                env=e,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = []
    failed = False
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            out, _ = p.communicate()
            out += f"\n[launcher: killed after {timeout} s]"
            failed = True
        failed |= p.returncode != 0
        outputs.append(out)
    results = []
    for rank, out in enumerate(outputs):
        lines = [l for l in out.splitlines() if l.startswith(RESULT)]
        if not lines:
            failed = True
            continue
        results.append(json.loads(lines[-1][len(RESULT) :]))
    if failed or len(results) != nproc:
        text = "\n".join(f"---- rank {r} ----\n{o}" for r, o in enumerate(outputs))
        raise AssertionError(f"a rank failed:\n{text}")
    return results
