"""Stage outputs are written to a temporary folder beside the target and renamed into place when whole."""

from __future__ import annotations

import contextlib
import errno
import importlib.metadata
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

SPLITS = ("train", "test")  # every prepared dataset's splits
FORMAT_VERSION = 1  # of the prepared-dataset layout (perception.data.arrays), in every manifest


def library_versions() -> dict[str, str]:
    """The versions of the libraries a prepared dataset was made with, for its manifest."""
    names = ("perception-study", "numpy", "open3d", "trimesh")
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "unknown"
    return versions


def _temporary_siblings(final: Path) -> list[Path]:
    return sorted(final.parent.glob(f".{final.name}.tmp-*"))


def _writer_alive(temporary: Path) -> bool:
    """Whether the process whose pid ends `temporary`'s name (`.<name>.tmp-<pid>`) still runs, other than
    this one: its folder is then being written, not left behind by a kill."""
    pid = temporary.name.rpartition("-")[2]
    if not pid.isdigit() or int(pid) in (0, os.getpid()):
        return False
    try:
        os.kill(int(pid), 0)  # signal 0: checks that the process exists, sends nothing
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


@contextlib.contextmanager
def atomic_output_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces `final` by a rename, on error it is removed.

    Leftovers of a run that was killed (`.<name>.tmp-<pid>` whose process is gone) are removed first, so a
    reader never sees a partial output under the real name. A folder whose process still runs is another
    writer's, started by hand beside this one (DVC's lock keeps its own stages apart): it is left to finish,
    and the writer that renames last wins.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in _temporary_siblings(final):
        if not _writer_alive(stale):
            shutil.rmtree(stale, ignore_errors=True)
    temporary = final.parent / f".{final.name}.tmp-{os.getpid()}"
    temporary.mkdir()
    try:
        yield temporary
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    _rename_into_place(temporary, final)


def _rename_into_place(temporary: Path, final: Path) -> None:
    """Rename the folder `temporary` to `final`, replacing the folder there.

    A rename cannot replace a folder that holds files, so the one in place is first renamed aside (itself a
    rename: readers see the old output or the new one, only missing for the instant between) and removed
    after. Another writer may rename its own folder into place meanwhile (its temporary folder is spared,
    above): that one is moved aside too, and this rename, the last, wins. Removing the old folder in place
    instead raced with such a writer: two removals of one tree, or a rename onto the other's new folder."""
    asides: list[Path] = []
    try:
        while True:
            try:
                os.replace(temporary, final)  # no folder, or an empty one, at `final`
                return
            except OSError as error:
                if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            # `.<name>.tmp-old<i>-<pid>`: a leftover of a killed writer, removed by the next one
            aside = final.parent / f".{final.name}.tmp-old{len(asides)}-{os.getpid()}"
            with contextlib.suppress(FileNotFoundError):  # another writer moved it aside first
                os.replace(final, aside)
                asides.append(aside)
    finally:
        for aside in asides:
            shutil.rmtree(aside, ignore_errors=True)


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON to a temporary sibling and rename it into place: readers see the old file or the new one."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(temporary, path)


def read_json(path: Path, writer: str) -> dict:
    """A stage output's JSON, or a one-line DatasetError naming the file and the stage (`writer`) to rerun."""
    import json

    from perception.data.arrays import DatasetError

    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetError(f"{path}: missing; run the {writer} stage first (dvc repro {writer})") from None
    except (OSError, ValueError) as err:
        reason = err.strerror if isinstance(err, OSError) else f"not valid JSON: {err}"
        raise DatasetError(f"{path}: unreadable ({reason}); rerun the {writer} stage") from None
    if not isinstance(data, dict):
        raise DatasetError(
            f"{path}: expected a JSON object, found {type(data).__name__}; rerun the {writer} stage"
        )
    return data


class Laps:
    """Wall time by part of a stage: `lap(name)` adds the seconds since the previous lap (or since the
    Laps was made) to `parts[name]`."""

    def __init__(self, parts: dict[str, float] | None = None):
        self.parts = {} if parts is None else parts
        self.last = time.monotonic()

    def __call__(self, name: str) -> None:
        now = time.monotonic()
        self.parts[name] = self.parts.get(name, 0.0) + now - self.last
        self.last = now
