"""Output folders written atomically: a run's directory, an exported model, a comparison.

Everything safefreeze writes as a folder is built beside its destination and renamed into
place, so a crash or a full disk never leaves a half-written output behind.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def write_atomically(out: Path, fill, keep: tuple[str, ...] = ()) -> None:
    """Build a directory with ``fill(staging)`` beside ``out``, then swap it into place.

    Entries of the old ``out`` named in ``keep`` move into the new one. An ``OSError``
    (disk full...) leaves ``out`` as it was and no staging directory behind.
    """
    out = Path(out)
    staging = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        fill(staging)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError) and error.filename is None:
            error.filename = str(out)
        raise
    for name in keep:
        if (out / name).exists():
            (out / name).rename(staging / name)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
