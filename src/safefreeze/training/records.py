"""What every optimizer step leaves: one ``StepRecord``, kept in the report and streamed to ``metrics.jsonl``.

The reference loop measures each step the same way (accounting.py) and records it once.
The records are the report's ``steps`` and travel in every checkpoint, so a resumed run
carries the records of the steps before it. ``MetricsWriter`` is the one writer of
``DIR/metrics.jsonl``, one JSON object per line per step, flushed as the step ends so a
crashed run leaves the steps it finished; on resume it rewrites the file from the
checkpoint's records first, so steps done after that checkpoint and before the crash
appear once, as the resumed run redoes them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

METRICS_NAME = "metrics.jsonl"


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step, as measured (None: not measured at this step, or not on this device).

    ``lr`` is the learning rate the step used; ``activation_bytes`` the bytes autograd saved
    for backward in the forward pass; ``activation_peak_bytes`` the most saved bytes live at
    once over forward and backward, recomputation of checkpointed blocks included (equal to
    ``activation_bytes`` without checkpointing; what ``--activation-budget`` bounds);
    ``checkpointed_blocks`` the blocks that ran checkpointed in this step (above the frozen
    prefix); ``resident_peak_bytes`` the process's peak resident memory over the step's
    forward, backward and update, and ``cuda_peak_bytes`` the same of allocated CUDA memory
    (on CUDA only). With ``--grad-accum`` the activation values are the largest
    micro-batch's (each frees its activations before the next runs). ``flops`` forward +
    backward FLOPs (recomputation included) on sampled steps (``--flops-every``),
    ``seconds`` the step's wall-clock time on the other steps (counting FLOPs slows a step);
    ``ddp_rebuild_seconds`` the time DDP's wrapper took to be rebuilt after a freeze;
    ``frozen_units`` / ``trainable_units`` the adapter units frozen and still trained after
    the step's freeze decision. With ``--measure-memory``, ``step_peak_bytes`` is the step's
    whole peak (memory/tracker.py: on CUDA the allocator's) and ``step_peak_by_category`` its
    breakdown: parameters, gradients, optimizer_state, activations, temporaries.
    """

    step: int
    loss: float
    lr: float
    activation_bytes: int
    activation_peak_bytes: int
    checkpointed_blocks: list[int]
    resident_peak_bytes: int | None
    cuda_peak_bytes: int | None
    flops: int | None
    seconds: float | None
    ddp_rebuild_seconds: float | None
    frozen_units: int
    trainable_units: int
    step_peak_bytes: int | None = None
    step_peak_by_category: dict[str, int] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class MetricsWriter:
    """Appends each step's record to ``path`` as a JSON line; starts the file from the records a run resumes with."""

    def __init__(self, path: Path, records: list[dict]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w", encoding="utf-8")  # held for the run; close() closes it
        for record in records:
            self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()  # a killed process loses no finished step

    def close(self) -> None:
        self._file.close()


def read_metrics(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl``, in file order."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line]
