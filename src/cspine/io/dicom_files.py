"""The files of a DICOM input: a folder (searched recursively), a zip, or one file.

Why a module of its own: a zip is untrusted input. Members with absolute or '..' paths are refused, members are
extracted under flat numbered names (a member name never becomes a path), and the uncompressed size is checked
against :mod:`cspine.io.limits` twice: as declared, and while extracting (a forged header can understate it).
"""

from __future__ import annotations

import stat
import tempfile
import zipfile
import zlib
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from cspine.io import limits
from cspine.io.dicom_error import DicomError


@contextmanager
def _input_files(path: Path) -> Iterable[list[Path]]:
    """Yield the candidate files of a folder, a zip (extracted safely to a temporary folder) or one file."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise DicomError(f"{path}: no such file or folder") from None
    except OSError as exc:  # a name longer than PATH_MAX, a loop of links, no permission ...
        raise DicomError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(st.st_mode):
        yield sorted(p for p in path.rglob("*") if p.is_file())
    elif not stat.S_ISREG(st.st_mode):  # a named pipe would block the first read forever
        raise DicomError(f"{path}: not a regular file or folder (a named pipe, socket or device); give a file")
    elif zipfile.is_zipfile(path):
        with tempfile.TemporaryDirectory(prefix="cspine-zip-") as tmp:
            yield _extract_zip(path, Path(tmp))
    else:
        yield [path]


def _extract_zip(path: Path, dest: Path) -> list[Path]:
    """Extract every member of a zip under ``dest``; refuse members that would land outside it, and zips whose
    members add up to more than the ``max_zip_bytes`` limit (declared sizes checked first, bytes counted while
    extracting, since a forged header can understate them)."""
    out: list[Path] = []
    cap = limits.active().max_zip_bytes
    try:
        with zipfile.ZipFile(path) as zf:
            members = [m for m in zf.infolist() if not m.is_dir()]
            for m in members:
                name = PurePosixPath(m.filename.replace("\\", "/"))
                if name.is_absolute() or ".." in name.parts or (name.parts and ":" in name.parts[0]):
                    raise DicomError(
                        f"{path}: zip member {m.filename!r} has an absolute or '..' path; refusing to extract"
                    )
            limits.check("max_zip_bytes", sum(m.file_size for m in members), f"{path}: uncompressed size of the zip")
            written = 0
            for i, m in enumerate(members):
                target = dest / f"{i:06d}"  # flat, numbered names: member names never become paths
                with zf.open(m) as src, open(target, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        written += len(chunk)
                        if written > cap:
                            limits.check("max_zip_bytes", written, f"{path}: uncompressed size of the zip (at least)")
                        dst.write(chunk)
                out.append(target)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
        raise DicomError(f"{path}: corrupt zip file ({type(exc).__name__}: {exc})") from exc
    except RuntimeError as exc:  # encrypted members
        raise DicomError(f"{path}: cannot extract zip ({exc})") from exc
    except OSError as exc:
        raise DicomError(f"{path}: cannot extract zip ({exc.strerror or exc})") from exc
    return out
