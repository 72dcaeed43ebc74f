"""What a run records as it trains: ``metrics.jsonl`` (mirrored to TensorBoard), and the peak FLOP/s behind MFU.

The records themselves (their events and fields) are the loop's; this module appends, trims on
resume, and mirrors. The run viewer and ``nextoken up`` read the file back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from nextoken.fileio import atomic_write_text

# Dense bf16 peak FLOP/s per device, for MFU. Unknown devices (and CPUs) report no MFU.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12,
              "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


class MetricsLog:
    """Append-only JSONL of every metric, mirrored to TensorBoard when available."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, resume_step: int | None) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.records: list[dict[str, Any]] = []
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.is_file():
            # Drop what was logged after the checkpoint we resume from: it is about to be redone.
            kept = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            # A "train" record at step k reports the k-th update, which the checkpoint at k includes.
            self.records = [r for r in kept if r.get("step", 0) < resume_step
                            or (r.get("event") == "train" and r.get("step") == resume_step)]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))
        elif self.path.exists():
            self.path.unlink()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step)
            except ImportError:
                self.tb = None
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.records.append(record)
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        if self.tb is not None:
            step = record["step"]
            for k, v in record.items():
                if k not in ("step", "event") and isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(f"{record['event']}/{k}", v, step)

    def close(self) -> None:
        if self.enabled:
            self._fh.close()
            if self.tb is not None:
                self.tb.close()
