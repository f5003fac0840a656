"""Decoding in child processes, straight into a shared RAM-backed buffer.

A 300-slice JPEG-Lossless study costs one header pass plus a parallel decode: each worker reads a file once, keeps
its header and writes its pixels into the file's slot of the buffer. Why always in child processes, never the
caller: a native decoder that panics (pyo3's PanicException is a BaseException, which ``except Exception`` misses)
or crashes takes down a worker, never the caller; a worker that dies is replaced and the file it was decoding is
reported by name. Workers inherit the caller's limits and a cap on their address space. The worker entry points
are module-level functions of this module, so that multiprocessing can pickle them by name.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import signal
import tempfile
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager, suppress
from typing import Any

import numpy as np

from cspine.errors import ResourceLimitError
from cspine.io import limits
from cspine.io.dicom_decode import _decode_ds, _decoder_failed
from cspine.io.dicom_error import DicomError
from cspine.io.dicom_header import _Header, _header_from, _read_dataset

log = logging.getLogger(__name__)

#: Name prefix of the decode buffers (followed by the owner's process id and a dash).
DECODE_BUFFER_PREFIX = "cspine-decode-"


_ScanResult = tuple[_Header | str | None, str | None]


def _scan(args: tuple[str | None, tuple[int, int, int], list[tuple[int, str]]]) -> list[tuple[int, _ScanResult]]:
    """Worker: read each file once, keep its header and, when it has the expected size, decode it into its slot.

    Returns per file (slot, (header or error or None, decode error or None)); a header whose size differs from the
    slot shape is left undecoded (decoded later if its series is chosen).
    """
    from pydicom.errors import InvalidDicomError

    buf_path, shape, jobs = args
    out = np.memmap(buf_path, dtype=np.int16, mode="r+", shape=shape) if buf_path else None
    results: list[tuple[int, _ScanResult]] = []
    try:
        for slot, path in jobs:
            try:
                ds = _read_dataset(path)
            except InvalidDicomError:
                results.append((slot, (None, None)))
                continue
            except ResourceLimitError as exc:
                results.append((slot, (str(exc), None)))
                continue
            except Exception as exc:
                results.append((slot, (f"{path}: corrupt DICOM file ({type(exc).__name__}: {exc})", None)))
                continue
            header = _header_from(ds, path)
            err = None
            if isinstance(header, _Header) and out is not None and (header.rows, header.columns) == shape[1:]:
                try:
                    out[slot] = _decode_ds(ds, path)
                except DicomError as exc:
                    err = str(exc)
                except (KeyboardInterrupt, SystemExit):
                    raise
                except BaseException as exc:  # a native decoder's panic or any other failure on this file
                    err = _decoder_failed(path, exc)
            elif isinstance(header, _Header):
                err = ""  # not decoded here (other size): decode on demand
            results.append((slot, (header, err)))
        if out is not None:
            out.flush()
        return results
    finally:
        del out


@contextmanager
def _decode_buffer(nbytes: int) -> Iterable[Any]:
    """A file of ``nbytes`` the decoding workers write slices into, named after this process so that one left by a
    killed run can be recognised and removed (:func:`cspine.runtime.remove_stale_decode_buffers`)."""
    prefix = f"{DECODE_BUFFER_PREFIX}{os.getpid()}-"
    with tempfile.NamedTemporaryFile(prefix=prefix, suffix=".i16", dir=_shared_dir(nbytes)) as buf:
        buf.truncate(nbytes)
        yield buf


def _decode_in_children(paths: list[str], rows: int, columns: int) -> np.ndarray:
    """Decode the given same-size slices in a child process (see :func:`_run_scan`) and return them stacked."""
    shape = (len(paths), rows, columns)
    limits.check("max_series_voxels", int(np.prod(shape)), f"{paths[0]} ...: {len(paths)} slices of {rows} x {columns}")
    with _decode_buffer(max(1, int(np.prod(shape)) * 2)) as buf:
        scanned = _run_scan(buf.name, shape, list(enumerate(paths)), 1)
        for slot, (header, err) in sorted(scanned, key=lambda t: t[0]):
            if isinstance(header, str):
                raise DicomError(header)
            if header is None or err == "":
                raise DicomError(f"{paths[slot]}: not a {rows} x {columns} DICOM image")
            if err:
                raise DicomError(err)
        mm = np.memmap(buf.name, dtype=np.int16, mode="r", shape=shape)
        array = np.array(mm)
        del mm
    return array


def _shared_dir(nbytes: int) -> str | None:
    """A RAM-backed folder for the decode buffer when it has room (Linux /dev/shm), else the temp folder.

    A container's /dev/shm is often only 64 MB, and writing past its end kills the process, so check first.
    """
    shm = "/dev/shm"
    try:
        if os.path.isdir(shm) and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 2 * nbytes:
            return shm
    except OSError:
        pass
    return None


def _warm_decoders() -> None:
    """Import the pixel decoders once in the parent so forked workers do not each pay for it."""
    import pydicom.pixels.decoders.gdcm
    import pydicom.pixels.decoders.pylibjpeg  # noqa: F401


def default_workers() -> int:
    """Processes for decoding: one per core this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _mp_context() -> Any:
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


def _pool(workers: int) -> ProcessPoolExecutor:
    _warm_decoders()
    return ProcessPoolExecutor(
        max_workers=workers, mp_context=_mp_context(), initializer=_init_worker, initargs=(limits.active(),)
    )


#: Address space a decoding worker may add to what it inherits: a decoder that believes a corrupt stream's
#: dimensions fails with MemoryError instead of taking the machine's memory.
_WORKER_EXTRA_BYTES = 4 << 30


def _init_worker(active: limits.Limits) -> None:
    """Set up a decoding process: the parent's limits, native stderr silenced (a Rust panic prints a backtrace
    there; the failure is reported as one line by the parent), and a cap on its address space (Linux)."""
    import faulthandler

    limits.configure(active)
    faulthandler.disable()  # a crash here is the parent's to report, in one line
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
    except OSError:
        pass
    try:
        import resource

        with open("/proc/self/statm") as f:
            current = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        extra = max(_WORKER_EXTRA_BYTES, 8 * active.max_slice_pixels * 8)
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        want = current + extra
        if hard == resource.RLIM_INFINITY or want < hard:
            resource.setrlimit(resource.RLIMIT_AS, (want, hard))
    except (OSError, ValueError, ImportError):
        pass


def _run_scan(
    buf_name: str | None, shape: tuple[int, int, int], jobs: list[tuple[int, str]], workers: int
) -> list[tuple[int, _ScanResult]]:
    """Header pass + decode of every job in child processes (never in this one).

    Workers take interleaved chunks. If one dies (a native crash, the kernel's OOM killer), the files whose results
    did not come back are decoded again one per fresh process, so the file that kills its process is named and the
    others are still read.
    """
    if not jobs:
        return []
    n_chunks = workers * 4 if workers > 1 else 1
    chunks = [jobs[k::n_chunks] for k in range(n_chunks) if jobs[k::n_chunks]]
    results: list[tuple[int, _ScanResult]] = []
    try:
        with _pool(min(workers, len(chunks))) as pool:
            futures = [pool.submit(_scan, (buf_name, shape, c)) for c in chunks]
            for fut in as_completed(futures):
                results.extend(fut.result())
    except BrokenProcessPool:
        got = {slot for slot, _ in results}
        left = [j for j in jobs if j[0] not in got]
        log.warning("a decoding process died; decoding %d file(s) again one per process", len(left))
        for job in left:
            results.extend(_scan_alone(buf_name, shape, job))
    return results


def _scan_alone(buf_name: str | None, shape: tuple[int, int, int], job: tuple[int, str]) -> list[tuple[int, Any]]:
    """Scan one file in its own process; a process that dies is reported as a decoder crash on that file."""
    ctx = _mp_context()
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_scan_child, args=(send, limits.active(), (buf_name, shape, [job])))
    proc.start()
    send.close()
    result: Any = None
    with suppress(EOFError):  # EOF: died before answering
        result = recv.recv()
    proc.join()
    recv.close()
    if result is not None:
        return result
    code = proc.exitcode
    how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
    return [(job[0], (f"{job[1]}: the pixel decoder crashed on this file ({how}); corrupt pixel data", None))]


def _scan_child(conn: Any, active: limits.Limits, args: Any) -> None:
    _init_worker(active)
    conn.send(_scan(args))
    conn.close()
