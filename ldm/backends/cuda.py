"""The GPU side of the backend: CUDA graphs and torch.compile for the UNet step.

On a fast GPU one guided UNet step of eager PyTorch is bound by the CPU launching its ~1,400
kernels one by one, not by the GPU running them. `CUDAGraphs` records those launches once per
input shape and replays them with one call; `compiled` hands the step to torch.compile (Inductor
fuses the elementwise work between the matrix products). Both leave the module tree, the
checkpoint keys and the numbers the model computes unchanged. `optimize` puts them on the UNet
when its options say so (`BackendOptions(cuda_graphs=True, compile=True)`; `--cuda_graphs`,
`--compile`); `runner_for` builds the step the optimized UNet runs.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict

import torch

log = logging.getLogger(__name__)


def _autocast_state(device_type: str):
    """(enabled, dtype) of autocast for `device_type` right now."""
    try:
        return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError):  # torch < 2.4: the CUDA-only spellings
        return torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()


class CUDAGraphs:
    """`fn(*tensors) -> tensor` replayed from CUDA graphs, one captured per input signature.

    The signature is each input's shape, dtype and device, plus the autocast state. On the first
    call with a signature, `fn` runs `warmup` times on a side stream (so that cuBLAS, cuDNN and
    any torch.compile work happen outside the capture), then once under capture into static input
    buffers; every call then copies its inputs into those buffers, replays the graph and returns
    a clone of the output, so callers see an ordinary function (the output of one call is not
    overwritten by the next). Graphs share one memory pool; at most `max_graphs` are kept (least
    recently used dropped first).

    Calls that cannot be replayed run `fn` directly: inputs not all on one CUDA device, autograd
    recording, or a capture already under way. A capture that fails turns graphs off for this
    object with a warning (the call then runs eagerly). The graphs read the weights at the
    addresses they had when captured: after replacing or moving weights, call `reset()`.
    """

    def __init__(self, fn, max_graphs: int = 4, warmup: int = 2):
        self.fn = fn
        self.max_graphs = max_graphs
        self.warmup = warmup
        self.enabled = True
        self.graphs: OrderedDict = OrderedDict()  # signature -> (graph, static inputs, static output)
        self.pool = None
        self.captures = 0  # graphs captured so far (a test and the benchmark read it)

    def reset(self):
        """Drop every graph (and with the last reference, their memory pool)."""
        self.graphs.clear()
        self.pool = None

    def replayable(self, args) -> bool:
        if not self.enabled or torch.is_grad_enabled() or not args:
            return False
        if not all(isinstance(a, torch.Tensor) and a.is_cuda for a in args):
            return False
        device = args[0].device
        return all(a.device == device for a in args) and not torch.cuda.is_current_stream_capturing()

    def __call__(self, *args):
        if not self.replayable(args):
            return self.fn(*args)
        autocast = _autocast_state("cuda")
        key = (tuple((tuple(a.shape), a.dtype, a.device) for a in args), autocast)
        entry = self.graphs.get(key)
        if entry is None:
            try:
                entry = self._capture(args, autocast)
            except Exception as e:  # noqa: BLE001 (any failure: fall back to eager, loudly)
                self.enabled = False
                self.reset()
                log.warning("CUDA graph capture failed, running eagerly from now on: %s", str(e).splitlines()[0])
                return self.fn(*args)
            self.graphs[key] = entry
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(key)
        graph, static, out = entry
        for buffer, a in zip(static, args):
            buffer.copy_(a)
        graph.replay()
        return out.clone()

    def _capture(self, args, autocast):
        device = args[0].device
        enabled, dtype = autocast

        def autocast_ctx():  # autocast's weight-cast cache must be off while capturing (its tensors would be freed)
            return torch.autocast("cuda", dtype=dtype, cache_enabled=False) if enabled else contextlib.nullcontext()

        with torch.cuda.device(device):
            static = [a.detach().clone(memory_format=torch.contiguous_format) for a in args]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), autocast_ctx():
                for _ in range(self.warmup):
                    self.fn(*static)
            torch.cuda.current_stream().wait_stream(side)
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool), autocast_ctx():
                out = self.fn(*static)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"CUDAGraphs: fn must return one tensor, got {type(out).__name__}")
        self.captures += 1
        log.info("captured a CUDA graph for inputs %s", [tuple(a.shape) for a in args])
        return graph, static, out


def runner_for(unet):
    """The step an optimized UNet runs, as its options say: `unet.fast_forward`, compiled and/or
    replayed from CUDA graphs (the graphs capture the compiled step, which stacks on a GPU)."""
    fn = unet.fast_forward
    if unet.backend.compile:
        fn = compiled(fn)
    if unet.backend.cuda_graphs:
        fn = CUDAGraphs(fn)
    return fn


def compiled(fn, mode: str | None = None):
    """fn through torch.compile. The first call at each shape compiles (tens of seconds); if compiling
    fails (no C++ compiler, an unsupported backend), fn runs as it is from then on, with a warning."""
    compiled_fn = torch.compile(fn, **({"mode": mode} if mode else {}))
    state = {"failed": False}

    def run(*args, **kwargs):
        if state["failed"]:
            return fn(*args, **kwargs)
        try:
            return compiled_fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 (whatever the compiler raises: run as before, loudly)
            if not _is_compile_error(e):
                raise
            log.warning("torch.compile failed, running the UNet uncompiled: %s", _first_line(e))
            state["failed"] = True
            return fn(*args, **kwargs)

    run.eager = fn
    run.failed = lambda: state["failed"]
    return run


def _is_compile_error(e: Exception) -> bool:
    """True for errors raised by torch.compile's machinery (dynamo, inductor, the backend), not by the model."""
    return type(e).__module__.startswith(("torch._dynamo", "torch._inductor")) or "Compil" in type(e).__name__


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"
