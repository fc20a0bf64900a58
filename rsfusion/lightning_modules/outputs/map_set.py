"""A classification map's files are one set: written apart, committed together, checked by readers.

A prediction writes its rasters (class map, probabilities, confidence, the ``.aux.xml`` legend, the
PNG preview) into a staging folder of its own beside the output, then commits them: the old
manifest goes first, the files are renamed into place, and ``<name>.manifest.json`` (every file's
name and SHA-256, the set's id, the checkpoint) is written last, atomically. A set without its
manifest is incomplete (the prediction stopped while committing); ``rsfusion evaluate`` refuses
such a map, and a map whose bytes differ from its manifest's.

Only one prediction writes a set at a time: the output folder is claimed with an atomic ``mkdir``
of ``.<name>.lock`` (holding the owner's pid and host); a second prediction into the same folder is
refused in one line while the first runs. A lock whose process is gone (killed) is taken over, and
whatever that process left (parts, staging folders, ``.part`` files) is removed first.
"""
from __future__ import annotations

import datetime
import errno
import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

from rsfusion.datamodules.errors import InputError, OutputError
from rsfusion.datamodules.writing import atomic_path

MANIFEST_FORMAT = "rsfusion-map-set-v1"
SET_TAG = "RSFUSION_MAP_SET"  # GeoTIFF tag of every raster of a set: the set's id


def manifest_path(output_dir: Path, name: str) -> Path:
    return Path(output_dir) / f"{name}.manifest.json"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 23), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _alive(pid: int, host: str) -> bool:
    if host != socket.gethostname():
        return True  # another machine's process: assume it runs (a shared filesystem)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SetLock:
    """The claim of ``<output_dir>/<name>``'s set by one prediction (see the module docstring)."""

    def __init__(self, output_dir: Path, name: str, set_id: str):
        self.output_dir, self.name, self.set_id = Path(output_dir), name, set_id
        self.path = self.output_dir / f".{name}.lock"

    def acquire(self) -> list[str]:
        """Claim the set or raise a one-line error; returns what an interrupted run left and was removed."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                self.path.mkdir()
            except FileExistsError:
                owner = self._owner()
                if owner is not None and _alive(owner["pid"], owner["host"]):
                    raise InputError(
                        f"{self.output_dir}: another prediction (pid {owner['pid']} on {owner['host']}, started "
                        f"{owner['started']}) is writing {self.name} here; wait for it or give another "
                        "--map.output_dir") from None
                shutil.rmtree(self.path, ignore_errors=True)  # its process is gone
                continue
            (self.path / "owner.json").write_text(json.dumps({
                "pid": os.getpid(), "host": socket.gethostname(), "set": self.set_id,
                "started": datetime.datetime.now().isoformat(timespec="seconds")}))
            return self._remove_leftovers()
        raise InputError(f"{self.path}: cannot claim the map's output folder")

    def _owner(self) -> dict | None:
        try:
            return json.loads((self.path / "owner.json").read_text())
        except (OSError, ValueError):
            return None  # being created right now, or a crash between mkdir and the write: see acquire

    def _remove_leftovers(self) -> list[str]:
        """Parts, staging folders and ``.part`` files of this set's earlier, interrupted predictions."""
        removed = []
        for pattern in (f".{self.name}.parts*", f".{self.name}.staging-*", f".{self.name}*.part*"):
            for path in self.output_dir.glob(pattern):
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
                removed.append(path.name)
        return removed

    def release(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def commit(staging: Path, output_dir: Path, name: str, set_id: str, checkpoint: str | None) -> dict[str, Path]:
    """Move the set from ``staging`` into ``output_dir`` and write its manifest last (see the docstring)."""
    files = sorted(p for p in staging.iterdir() if p.is_file() and ".part" not in p.name)
    entries = {p.name: sha256(p) for p in files}
    old = manifest_path(output_dir, name)
    stale = []
    if old.is_file():
        try:
            stale = [f for f in json.loads(old.read_text()).get("files", {}) if f not in entries]
        except ValueError:
            stale = []
        old.unlink()
    for file in stale:  # a member of the previous set that this one has not (e.g. a confidence raster)
        (output_dir / file).unlink(missing_ok=True)
    for path in files:
        os.replace(path, output_dir / path.name)
    manifest = {"format": MANIFEST_FORMAT, "set": set_id, "name": name, "checkpoint": checkpoint,
                "written": datetime.datetime.now().isoformat(timespec="seconds"), "files": entries}
    with atomic_path(old) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(staging, ignore_errors=True)
    return {file: output_dir / file for file in entries}


def check_member(path: str | Path, set_id: str | None) -> None:
    """For readers of a map: ``path`` (a raster tagged with its ``set_id``, None for a map of another tool)
    must be listed, with these bytes, in the manifest of its set. One-line error otherwise."""
    if set_id is None:
        return
    path = Path(path)
    manifests = [m for m in path.parent.glob("*.manifest.json")]
    for candidate in manifests:
        try:
            manifest = json.loads(candidate.read_text())
        except (OSError, ValueError):
            continue
        if manifest.get("format") == MANIFEST_FORMAT and path.name in manifest.get("files", {}):
            if manifest.get("set") != set_id:
                break
            if sha256(path) != manifest["files"][path.name]:
                raise InputError(f"{path}: its bytes differ from {candidate.name} (changed after the prediction "
                                 "wrote it)")
            return
    raise InputError(f"{path}: the prediction that wrote it did not finish (its set {set_id} has no manifest "
                     f"beside it); predict again")


def write_failure(err: BaseException, path: Path) -> OutputError | None:
    """A one-line error for a failed write (disk full, file-size limit, quota), or None for other errors."""
    code = getattr(err, "errno", None)
    text = str(err)
    reasons = {errno.ENOSPC: "no space left on the device", errno.EFBIG: "file too large (a file-size limit)",
               errno.EDQUOT: "disk quota exceeded"}
    if code in reasons:
        return OutputError(f"{path}: cannot write the map: {reasons[code]}")
    lowered = text.lower()
    for needle, reason in (("no space left", reasons[errno.ENOSPC]), ("file too large", reasons[errno.EFBIG]),
                           ("quota", reasons[errno.EDQUOT])):
        if needle in lowered:
            return OutputError(f"{path}: cannot write the map: {reason}")
    if "write" in lowered and "failed" in lowered:  # GDAL's "WriteEncodedTile/Strip() failed" hides the errno
        free = shutil.disk_usage(path.parent if path.parent.exists() else ".").free
        return OutputError(f"{path}: cannot write the map ({text.strip().splitlines()[0]}; {free / 2**20:.0f} MiB "
                           "free on its disk: full, or a file-size limit)")
    return None
