"""The data path of one extraction batch on the compute device (used by ``featcache.extract.pipeline``).

A batch from the decode workers is cut into micro-batches; each runs the backbone,
has its features pooled and cast to the stored dtype *on the device*, and copied
asynchronously into one pinned host buffer per array (on CUDA, on a side stream
after an event, so the copy of batch i overlaps the forward of batch i + 1). The
caller keeps one batch in flight: it launches batch i + 1, then waits on batch i's
event before handing its host buffers to the writer.

On out-of-memory the micro-batch halves and the failed chunk is recomputed; after
``grow_after`` good chunks it doubles again, up to the requested batch (each failed
attempt to grow doubles the wait before the next one). Every change is counted
and stated once.
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass, field

import numpy as np
import torch

from featcache import __version__
from featcache.errors import FeatcacheError
from featcache.extract.launch import cpu_bf16_support
from featcache.store.feature_store import ArraySpec

__all__ = ["GROW_AFTER", "BatchRunner", "MicroBatch", "Pending", "array_specs", "forward", "to_host"]

GROW_AFTER = 8  # good chunks in a row before a backed-off micro-batch tries twice its size again


def forward(
    backbone,
    pixels: torch.Tensor,
    layers: list[int],
    device: torch.device,
    dtype: torch.dtype,
    layer_patch: bool = False,
) -> dict[str, torch.Tensor]:
    """Run the backbone on one micro-batch.

    Args:
        backbone: a ``Backbone`` (or its ``torch.compile`` wrapper).
        pixels: float32 [B, 3, H, W] on the host (pinned on CUDA) or the device.
        layers: block indices for ``layer_*`` outputs (empty: none).
        device, dtype: compute device and dtype.
        layer_patch: also return ``layer_patch`` [B, L, h, w, D].

    Returns:
        The backbone's outputs, on ``device`` (see ``featcache.models.backbone``).
    """
    # torch.compile'd graphs cannot take inference tensors (version counters), so they run under no_grad
    compiled = hasattr(backbone, "_orig_mod")
    x = pixels.to(device, non_blocking=True).to(dtype)  # copy as float32, convert on the device
    kwargs = {"layer_patch": True} if layer_patch else {}
    with torch.no_grad() if compiled else torch.inference_mode():
        return backbone(x, layers=layers, **kwargs)


def array_specs(
    out: dict[str, torch.Tensor], tokens: tuple[str, ...], layers: list[int], patch_pool: int
) -> dict[str, ArraySpec]:
    """The stored arrays, from the outputs of a one-image forward.

    ``cls``/``pooled``/``layer_cls``/``layer_pooled`` are float32; ``registers``, ``patch`` and
    ``layer_patch`` (``patch`` in ``tokens`` together with ``layers``) float16, the patch grids
    pooled by ``patch_pool``.

    Raises:
        FeatcacheError: registers asked of a model without them; a pool factor that does not
            divide the patch grid.
    """
    specs = {"cls": ArraySpec(tuple(out["cls"].shape[1:]), "float32")}
    specs["pooled"] = ArraySpec(tuple(out["pooled"].shape[1:]), "float32")
    if "registers" in tokens:
        if "registers" not in out:
            raise FeatcacheError("--tokens registers: this model has no register tokens")
        specs["registers"] = ArraySpec(tuple(out["registers"].shape[1:]), "float16")
    if "patch" in tokens:
        h, w, d = out["patch"].shape[1:]
        if h % patch_pool or w % patch_pool:
            raise FeatcacheError(f"--patch-pool {patch_pool} does not divide the {h}x{w} patch grid")
        specs["patch"] = ArraySpec((h // patch_pool, w // patch_pool, d), "float16")
    if layers:
        specs["layer_cls"] = ArraySpec(tuple(out["layer_cls"].shape[1:]), "float32")
        specs["layer_pooled"] = ArraySpec(tuple(out["layer_pooled"].shape[1:]), "float32")
        if "patch" in tokens and "layer_patch" in out:
            n, h, w, d = out["layer_patch"].shape[1:]
            specs["layer_patch"] = ArraySpec((n, h // patch_pool, w // patch_pool, d), "float16")
    return specs


def _pool(t: torch.Tensor, patch_pool: int) -> torch.Tensor:
    """Average-pool the grid of [..., h, w, D] tokens by ``patch_pool`` (in float32)."""
    if patch_pool == 1:
        return t
    lead, (h, w, d) = t.shape[:-3], t.shape[-3:]
    x = t.reshape(-1, h, w, d).permute(0, 3, 1, 2).float()
    x = torch.nn.functional.avg_pool2d(x, patch_pool).permute(0, 2, 3, 1)
    return x.reshape(*lead, h // patch_pool, w // patch_pool, d)


def device_arrays(
    out: dict[str, torch.Tensor], specs: dict[str, ArraySpec], patch_pool: int
) -> dict[str, torch.Tensor]:
    """The stored arrays of one micro-batch, still on the device: pooled and cast to the stored dtype."""
    res = {}
    for k, s in specs.items():
        t = out[k]
        if k in ("patch", "layer_patch"):
            t = _pool(t, patch_pool)
        res[k] = t.to(getattr(torch, s.dtype))
    return res


def to_host(
    out: dict[str, torch.Tensor], specs: dict[str, ArraySpec], patch_pool: int
) -> dict[str, np.ndarray]:
    """Synchronous device -> numpy conversion of one micro-batch (reference path, tests)."""
    return {k: v.cpu().numpy() for k, v in device_arrays(out, specs, patch_pool).items()}


@dataclass
class MicroBatch:
    """Micro-batch size under out-of-memory back-off.

    Attributes:
        requested: the batch asked for (the ceiling).
        size: the size in use.
        grow_after: good chunks in a row before trying twice the size again (default ``GROW_AFTER``).
        good: good chunks since the last change.
        smallest: the smallest size used.
        backoffs: out-of-memory events.
        grows: times the size was doubled back.
    """

    requested: int
    size: int = 0
    grow_after: int = 0
    good: int = 0
    smallest: int = 0
    backoffs: int = 0
    grows: int = 0
    _grew: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        self.size = self.size or self.requested
        self.grow_after = self.grow_after or GROW_AFTER
        self.smallest = self.smallest or self.size

    def out_of_memory(self) -> None:
        """Halve the size (raises when it is already 1)."""
        if self.size == 1:
            raise torch.OutOfMemoryError("out of memory with a micro-batch of one image")
        if self._grew:  # growing back failed: wait twice as long before the next try
            self.grow_after *= 2
        self.size, self.good, self._grew = max(1, self.size // 2), 0, False
        self.smallest = min(self.smallest, self.size)
        if self.backoffs == 0:
            print(
                f"featcache extract: out of GPU memory at a micro-batch of {self.size * 2}: going on with "
                f"{self.size} (it grows back after {self.grow_after} good chunks; the run's result records it)",
                file=sys.stderr,
            )
        self.backoffs += 1

    def succeeded(self) -> None:
        """Count a good chunk; double the size after ``grow_after`` of them."""
        self._grew = False
        if self.size >= self.requested:
            return
        self.good += 1
        if self.good >= self.grow_after:
            self.size, self.good, self._grew = min(self.requested, self.size * 2), 0, True
            self.grows += 1

    def record(self) -> dict[str, int]:
        """What the back-off did, for the set's attributes."""
        return {
            "requested": self.requested,
            "final": self.size,
            "smallest": self.smallest,
            "out_of_memory": self.backoffs,
            "grown_back": self.grows,
        }


class Pending:
    """One batch whose features are on their way to pinned host buffers.

    Attributes:
        idx: the rows with pixels; errors: row -> failure reason.
        host: array name -> [len(idx), *shape] host tensor of the stored dtype.
        event: CUDA event recorded after the last copy (None on CPU).
    """

    def __init__(self, idx: list[int], errors: dict[int, str], host: dict[str, torch.Tensor], event):
        self.idx, self.errors, self.host, self.event = idx, errors, host, event

    def numpy(self) -> dict[str, np.ndarray]:
        """Wait for the copies, then the host buffers as numpy arrays (sharing memory)."""
        if self.event is not None:
            self.event.synchronize()
        return {k: v.numpy() for k, v in self.host.items()}


class BatchRunner:
    """Runs decoded batches through the backbone with micro-batch back-off and asynchronous copies.

    Args:
        backbone: the model; device, dtype: where and how it computes.
        specs: the stored arrays (``array_specs``); layers: block indices; patch_pool: grid pooling.
        micro: the back-off state (``MicroBatch``).
        res: input size, for the error message.
    """

    def __init__(self, backbone, device, dtype, specs, layers, patch_pool, micro: MicroBatch, res: int):
        self.backbone, self.device, self.dtype = backbone, device, dtype
        self.specs, self.layers, self.patch_pool = specs, layers, patch_pool
        self.micro, self.res = micro, res
        self.layer_patch = "layer_patch" in specs
        cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if cuda else None

    def _host(self, n: int) -> dict[str, torch.Tensor]:
        pin = self.device.type == "cuda"
        return {
            k: torch.empty((n, *s.shape), dtype=getattr(torch, s.dtype), pin_memory=pin)
            for k, s in self.specs.items()
        }

    def launch(self, idx: list[int], pixels: torch.Tensor | None, errors: dict[int, str]) -> Pending:
        """Queue the forward and copies of one batch; returns before the GPU is done.

        Raises:
            FeatcacheError: out of memory with a single image.
        """
        if pixels is None or not idx:
            return Pending(idx, errors, {}, None)
        host = self._host(len(idx))
        j = 0
        while j < len(idx):
            n = self.micro.size
            try:
                out = forward(
                    self.backbone, pixels[j : j + n], self.layers, self.device, self.dtype, self.layer_patch
                )
                arrays = device_arrays(out, self.specs, self.patch_pool)
                del out
                failed = False
            except torch.OutOfMemoryError:
                failed = True
            if failed:  # outside the except block: the failed tensors are no longer referenced
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if self.micro.size == 1:
                    raise FeatcacheError(
                        f"out of GPU memory with one image at {self.res} px; use a smaller --res or model"
                    )
                self.micro.out_of_memory()
                continue
            self._copy(arrays, host, j)
            self.micro.succeeded()
            j += len(next(iter(arrays.values())))
        event = None
        if self.copy_stream is not None:
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        return Pending(idx, errors, host, event)

    def _copy(self, arrays: dict[str, torch.Tensor], host: dict[str, torch.Tensor], j: int) -> None:
        if self.copy_stream is None:
            for k, v in arrays.items():
                host[k][j : j + len(v)].copy_(v)
            return
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream):
            for k, v in arrays.items():
                host[k][j : j + len(v)].copy_(v, non_blocking=True)
                v.record_stream(self.copy_stream)  # not reused by the allocator before the copy is done


# ---- the device, dtype and environment of a run ----


def resolve_device(device: str) -> torch.device:
    """The compute device; under torchrun (LOCAL_RANK set) ``auto``/``cuda`` mean this rank's own GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise FeatcacheError(f"--device {device}: not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise FeatcacheError(
                f"--device {device}: CUDA is not available on this machine; use --device cpu"
            )
        if dev.index is None and "LOCAL_RANK" in os.environ:  # modulo: launchers that show one GPU per rank
            dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
        if dev.index is not None:
            if dev.index >= torch.cuda.device_count():
                raise FeatcacheError(f"--device {dev}: this machine has {torch.cuda.device_count()} GPU(s)")
            torch.cuda.set_device(dev)
    return dev


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The compute dtype: ``auto`` is bf16 (fp16 without bf16) on CUDA and float32 on CPU, never bf16.

    Raises:
        FeatcacheError: an unknown name; bf16 on a GPU or CPU without bf16 support; fp16 on CPU.
    """
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in _DTYPES:
        raise FeatcacheError(f"--dtype {dtype}: choose one of auto, float32, bfloat16 (bf16), float16")
    want = _DTYPES[dtype]
    if want == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise FeatcacheError("--dtype bfloat16: this GPU has no bfloat16 support; use float16 or auto")
    if want == torch.bfloat16 and device.type == "cpu":
        ok, detail = cpu_bf16_support()
        if not ok:
            raise FeatcacheError(
                f"--dtype bf16 on CPU needs bf16 matmul instructions ({detail}); use --dtype float32"
            )
    if want == torch.float16 and device.type == "cpu":
        raise FeatcacheError("--dtype float16 on CPU is slow and lossy; use float32, or bf16 where supported")
    return want


def versions() -> dict[str, str]:
    import transformers
    import zarr

    return {
        "featcache": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "zarr": zarr.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
