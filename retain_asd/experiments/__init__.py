"""Experiments: one experiment point (pre-train -> evaluate -> log, `point.run_point`), the Table-2 study over rows
and seeds (`study`), and checkpoint resolution ("frozen" and the initial encoder, `checkpoints`). The layer above
training and evaluation: the demo, the study and every sweep trial run points through here."""

from retain_asd.experiments.checkpoints import resolve_checkpoint, resolve_checkpoints
from retain_asd.experiments.point import PointResult, run_point

__all__ = ["PointResult", "resolve_checkpoint", "resolve_checkpoints", "run_point"]
