"""Where and how a training or inference run executes: device, DDP, seeds, checkpoints, run records.

One device function for the whole project (auto / cpu / cuda[:N]); mixed precision only on
CUDA; DDP detected from the torchrun environment (RANK / WORLD_SIZE / LOCAL_RANK); only
rank 0 logs and writes. Checkpoints are written atomically and read with
``weights_only=True`` so a model directory from elsewhere cannot run code on load.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import platform
import random
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cspine.errors import ConfigError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DEVICE_CHOICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Runtime:
    """The resolved execution context of one process."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only rank 0 logs progress and writes files."""
        return self.rank == 0

    @property
    def amp(self) -> bool:
        """Mixed precision: CUDA only (bf16 autocast)."""
        return self.device.type == "cuda"


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """auto -> cuda:<local_rank> when available, else cpu; 'cuda' without a GPU is an error that says so."""
    import torch

    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available on this machine (use --device cpu or auto)")
        return torch.device(name if ":" in name else f"cuda:{local_rank}")
    if name == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"unknown device {name!r}; expected auto, cpu, cuda or cuda:N")


def init_runtime(device: str = "auto") -> Runtime:
    """Set up this process: DDP from torchrun's environment when present (gloo on CPU, nccl on CUDA)."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    if rank != 0:  # one log for the run: the other ranks say only what goes wrong
        logging.getLogger("cspine").setLevel(logging.WARNING)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend)
    return Runtime(device=dev, rank=rank, world_size=world, local_rank=local)


def shutdown(rt: Runtime) -> None:
    """Tear down the process group if this run created one.

    Called from a ``finally``, after the caller has dropped its DistributedDataParallel wrapper (a wrapper that
    outlived its group made a rank abort at exit in 5 of 15 two-process gloo runs of the DDP test; the rarer abort
    left after that is what :func:`exit_worker` removes). On a normal exit all ranks meet at a barrier first, so
    none tears down while rank 0 still writes the run's files; a rank leaving on an exception skips it (the others,
    inside a collective, would never arrive; torchrun stops them)."""
    import torch.distributed as dist

    if rt.distributed and dist.is_initialized():
        if sys.exc_info()[0] is None:
            dist.barrier()
        dist.destroy_process_group()


def exit_worker(code: int) -> int:
    """End a torchrun worker process with ``os._exit`` once its run is over; return ``code`` anywhere else.

    DistributedDataParallel keeps references to the gloo process group that ``destroy_process_group`` cannot
    drop (torch 2.13: 11 taken by the wrapper, 1 given back when it is freed), so the group's C++ threads are
    still running when the interpreter finalises. Tearing them down there raced: a rank aborted at exit
    ("terminate called without an active exception") in CI, after its work was written. Skipping
    finalisation removes the race; streams and log handlers are flushed first, and every file the run
    writes is already closed and renamed into place.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return code
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (augmentation is the only randomness; it must repeat)."""
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def save_checkpoint(obj: dict[str, Any], path: Path) -> None:
    """Write a checkpoint atomically: a killed run never leaves a truncated file behind."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` (tensors and plain containers only)."""
    import torch

    if not path.exists():
        raise ConfigError(f"{path}: checkpoint not found")
    try:
        with warnings.catch_warnings(record=True) as caught:  # torch's notes on a foreign file: not for the user
            warnings.simplefilter("always")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
        for w in caught:
            log.debug("%s: %s", path, w.message)
        return ckpt
    except pickle.UnpicklingError:
        # torch's message suggests retrying with weights_only=False: advice nobody must take with a file from
        # elsewhere (that would run whatever code the file holds). One line, no such advice.
        raise ConfigError(
            f"{path}: refused: the checkpoint holds objects other than tensors and plain containers "
            "(loading them could run code); it was not written by cspine"
        ) from None
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ConfigError(f"{path}: not a readable cspine checkpoint ({type(exc).__name__}: {first})") from None


def remove_stale_decode_buffers(folder: str = "/dev/shm") -> list[str]:
    """Delete decode buffers (``cspine-decode-<pid>-*``) whose owner process is gone; return their names.

    Why: a run killed with SIGKILL cannot remove its buffer, and /dev/shm is RAM: each left behind holds a study's
    worth of memory until reboot. Called at start-up; buffers of live processes (other runs) are left alone.
    """
    from cspine.io.dicom import DECODE_BUFFER_PREFIX

    removed: list[str] = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(DECODE_BUFFER_PREFIX):
            continue
        pid_text = name[len(DECODE_BUFFER_PREFIX) :].split("-", 1)[0]
        if not pid_text.isdigit() or _alive(int(pid_text)):
            continue
        try:
            os.unlink(os.path.join(folder, name))
            removed.append(name)
        except OSError:
            pass
    if removed:
        log.info("removed %d decode buffer(s) left in %s by killed runs", len(removed), folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write (dataclasses and paths welcome)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default))
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return dataclasses.asdict(o)
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def versions() -> dict[str, str]:
    """Versions of the stack, for run records and model bundles."""
    out = {"python": platform.python_version(), "numpy": np.__version__}
    from cspine import __version__

    out["cspine"] = __version__
    for mod in ("torch", "monai", "pydicom", "nibabel", "sklearn"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # not installed / not importable: say so rather than fail
            out[mod] = "absent"
    return out


def run_record(rt: Runtime | None, config: Any, timings: dict[str, float], **extra: Any) -> dict[str, Any]:
    """The machine-readable record written beside every run's outputs."""
    rec: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": versions(),
        "config": config,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "host": {"platform": platform.platform(), "cpus": os.cpu_count()},
    }
    if rt is not None:
        rec["device"] = str(rt.device)
        rec["world_size"] = rt.world_size
    rec.update(extra)
    return rec


@contextmanager
def timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Add the wall time of a block to ``timings[key]``."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0
