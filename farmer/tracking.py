"""Optional mirrors of a run's metrics.jsonl: ``farmer train --log tensorboard``.

The trainer's own log stays metrics.jsonl; a mirror receives each record as it is written there (rank 0
only) and turns numbers into scalars and sample grids (the record's ``samples`` PNG) into images.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

LOGGERS = ("jsonl", "tensorboard")
TENSORBOARD_INSTALL = "pip install 'farmer-flow[tensorboard]'"
_NOT_SCALARS = ("step", "time")


class MetricsMirror(Protocol):
    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class TensorBoardMirror:
    """Event files under ``log_dir``. ``resume_step`` drops events past it from an earlier session, as
    metrics.jsonl drops its lines past the checkpoint a run resumes from."""

    def __init__(self, log_dir: Path, resume_step: int = 0) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError(f"--log tensorboard needs the tensorboard package: {TENSORBOARD_INSTALL}") from None
        self.writer = SummaryWriter(str(log_dir), purge_step=resume_step + 1 if resume_step else None)

    def write(self, record: dict[str, Any]) -> None:
        step = record["step"]
        for key, value in record.items():
            if key not in _NOT_SCALARS and isinstance(value, int | float) and not isinstance(value, bool) \
                    and math.isfinite(value):
                self.writer.add_scalar(key, value, step)
        if "samples" in record:
            with Image.open(record["samples"]) as image:
                self.writer.add_image("samples", np.asarray(image.convert("RGB")), step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_mirror(logger: str, run_dir: Path, resume_step: int) -> MetricsMirror | None:
    """The mirror that ``--log`` names: none for "jsonl" (metrics.jsonl only), event files in
    ``run_dir/tensorboard`` for "tensorboard"."""
    if logger not in LOGGERS:
        raise ValueError(f"--log must be one of {', '.join(LOGGERS)}, got {logger!r}")
    return TensorBoardMirror(run_dir / "tensorboard", resume_step) if logger == "tensorboard" else None
