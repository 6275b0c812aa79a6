"""One rank of examples/torch_tp_decode.py on the CPU, started by launch.py: torch.distributed
on gloo, symmcomm on its host backend (also where GPUs are visible), torch.cuda replaced by stand-ins (a "captured" step is
recorded and replayed eagerly, events read the wall clock). Everything the example does but
the GPU: the model, the backends' all-reduces and add-RMSNorms, the token checks and the
results file."""

from __future__ import annotations

import contextlib
import os
import sys
import time
import types

import torch
import torch.distributed as dist

import symmcomm.torch as st
from launch import report

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))
import torch_tp_decode as ex  # noqa: E402

_capturing: list = []


class _Stream:
    def wait_stream(self, *args):
        pass


class _Graph:
    """What a capture recorded (the step and its backend), replayed eagerly."""

    def __init__(self):
        self.steps = []

    def replay(self):
        for step in self.steps:
            step()


@contextlib.contextmanager
def _graph(g, *args, **kwargs):
    _capturing.append(g)
    try:
        yield
    finally:
        _capturing.pop()


class _Event:
    def __init__(self, **kwargs):
        self.t = 0.0

    def record(self, *args):
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, other):
        return (other.t - self.t) * 1e3


class _Torch(types.ModuleType):
    """The example's `torch`: the real one, but CPU devices and the stand-ins of torch.cuda."""

    def __getattr__(self, name):
        return getattr(torch, name)


def patch() -> None:
    fake = _Torch("torch")
    fake.device = lambda *args, **kwargs: torch.device("cpu")
    fake.cuda = types.SimpleNamespace(
        set_device=lambda *args: None,
        Stream=lambda *args, **kwargs: _Stream(),
        current_stream=lambda *args: _Stream(),
        stream=lambda s: contextlib.nullcontext(),
        synchronize=lambda *args: None,
        CUDAGraph=_Graph,
        graph=_graph,
        Event=_Event,
        empty_cache=lambda: None,
        get_device_name=lambda *args: "cpu (test)",
        nccl=types.SimpleNamespace(version=lambda: (0, 0, 0)),
    )
    ex.torch = fake
    step = ex.Model.step

    def recorded_step(self, backend):
        if _capturing:
            _capturing[-1].steps.append(lambda: step(self, backend))
        else:
            step(self, backend)

    ex.Model.step = recorded_step
    real_init = dist.init_process_group
    ex.dist = types.SimpleNamespace(
        **{k: getattr(dist, k) for k in dir(dist) if not k.startswith("__")}
    )
    ex.dist.init_process_group = lambda backend, device_id=None: real_init("gloo")
    # The host backend even where GPUs are visible: the model's tensors live on the CPU.
    init = st.init_from_process_group
    st.init_from_process_group = lambda *a, **k: init(*a, **{**k, "backend": "host", "device": None})
    st._stream_handle = lambda device, stream: None


def main(argv) -> None:
    patch()
    sys.argv = ["torch_tp_decode.py", *argv]
    ex.main()
    report({"rank": int(os.environ["RANK"])})


if __name__ == "__main__":
    main(sys.argv[1:])
