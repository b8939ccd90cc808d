"""What each fault run measured, and the table the session prints (docs/scaling.md quotes it)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

SERVED_CHUNK = "-- CALL synthesize_chunk OK"  # Serve's access log line of a chunk a replica answered


@dataclass
class FaultRecord:
    fault: str
    audio: int = 0
    refused: Counter[str] = field(default_factory=Counter)  # our 503 codes
    other: list[str] = field(default_factory=list)
    replacement_serves_s: float | None = None  # fault -> a new model replica's first answered chunk
    whole_s: float | None = None  # fault -> every model replica answering chunks again
    first_audio_s: float | None = None  # fault -> first audio answered to a request sent after it
    median_before_s: float | None = None  # median wait for an answer sent before the fault
    slowest_s: float = 0.0  # the longest any request of the run waited for its answer
    voices_lost: int = 0
    job: str = ""  # the job in flight at the fault: its progress then, and its end
    note: str = ""

    def row(self) -> str:
        refused = sum(self.refused.values())
        codes = ", ".join(f"{code} {n}" for code, n in sorted(self.refused.items()))
        replacement = (
            "none needed" if self.replacement_serves_s is None else f"{self.replacement_serves_s:.1f} s"
        )
        first = "-" if self.first_audio_s is None else f"{self.first_audio_s:.1f} s"
        whole = "-" if self.whole_s is None else f"{self.whole_s:.1f} s"
        before = "-" if self.median_before_s is None else f"{self.median_before_s:.1f} s"
        return (
            f"| {self.fault} | {self.audio} | {refused}{f' ({codes})' if codes else ''} | {len(self.other)} "
            f"| {replacement} | {whole} | {first} | {before} / {self.slowest_s:.1f} s | {self.voices_lost} "
            f"| {self.job} | {self.note} |"
        )


HEADER = (
    "| fault | answered with audio | refused (our JSON 503 + Retry-After) | anything else "
    "| replacement replica serves | all replicas serve again | first audio after the fault "
    "| answer time: median before the fault / slowest | voices lost | job in flight | note |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)
RECORDS: list[FaultRecord] = []


def table() -> str:
    return "\n".join([HEADER, *(record.row() for record in RECORDS)])


def first_served_chunk(log: Path, since: float = 0.0) -> float | None:
    """time.time() of the first chunk a replica answered at or after ``since``, from its Serve log
    (local-time stamps)."""
    if not log.is_file():
        return None
    for line in log.read_text(errors="replace").splitlines():
        if SERVED_CHUNK in line:
            stamp = " ".join(line.split()[1:3])  # "INFO 2026-12-06 01:21:02,734 ..."
            served_at = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if served_at >= since:
                return served_at
    return None
