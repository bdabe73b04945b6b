"""``run.log``: what other libraries say during a CLI run is kept beside ``report.json``, not on the terminal.

The terminal of a ``safefreeze`` command holds safefreeze's own lines and its progress bars. Warnings
of transformers, PEFT, bitsandbytes, hub kernels, torch ... (their loggers and ``warnings.warn``) are
for whoever reads the run afterwards, and a user can rarely act on them; they are appended to
``run.log`` in the run's directory. Records are held in memory until that directory holds something
of the run (its metrics, a checkpoint): a run refused before it starts writes nothing, a run that
started keeps every record, the ones from before it started included.

    with third_party_logs():
        write_into(out)         # once the command knows its run directory (no-op outside the context)
        ...                     # train
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOG_NAME = "run.log"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_active: list[RunLog] = []  # the handler of the command running now (at most one)


class RunLog(logging.Handler):
    """A logging handler that appends to ``<directory>/run.log`` once the directory holds something of the run."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.setFormatter(logging.Formatter(_FORMAT))
        self.directory: Path | None = None
        self._waiting: list[str] = []

    def write_into(self, directory: Path) -> None:
        """Send this and later records to ``directory/run.log``; what waits goes to the previous directory first."""
        self.flush()
        self.directory = Path(directory)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._waiting.append(self.format(record))
        except Exception:  # logging's contract: a record that cannot be formatted never breaks the run
            self.handleError(record)
            return
        self.flush()

    def flush(self) -> None:
        """Append the waiting records if the run directory holds something (a run that started), else keep them.

        A started run always has its ``run.log``, empty when no library said anything.
        """
        directory = self.directory
        if directory is None or not directory.is_dir() or not any(p.name != LOG_NAME for p in directory.iterdir()):
            return
        with open(directory / LOG_NAME, "a", encoding="utf-8") as file:
            file.writelines(line + "\n" for line in self._waiting)
        self._waiting = []


def write_into(directory: Path) -> None:
    """Send other libraries' records to ``directory/run.log`` from now on, inside ``third_party_logs``."""
    for handler in _active:
        handler.write_into(directory)


@contextmanager
def third_party_logs() -> Iterator[RunLog]:
    """Route other libraries' log records and Python warnings into a ``RunLog`` for the span of one command.

    transformers logs through a handler of its own on stderr: it is turned off and its records propagate
    to the root logger like every other library's. Everything is restored on exit (tests call the CLI
    in-process), and the last records are written then, if the run started.
    """
    import transformers

    handler = RunLog()
    root = logging.getLogger()
    library = transformers.logging
    verbosity = library.get_verbosity()
    root.addHandler(handler)
    library.disable_default_handler()
    library.enable_propagation()
    library.set_verbosity_warning()
    library.disable_progress_bar()
    logging.captureWarnings(True)
    _active.append(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")  # each distinct warning once, into the log
            yield handler
    finally:
        _active.remove(handler)
        logging.captureWarnings(False)
        library.set_verbosity(verbosity)
        library.disable_propagation()
        library.enable_default_handler()
        library.enable_progress_bar()
        root.removeHandler(handler)
        handler.flush()
