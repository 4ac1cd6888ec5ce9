"""Batch scoring of histopathology data without torch: whole slides (OpenSlide or plain images)
and patch sets (PCam HDF5, ImageFolder trees, image folders, ``.npy``/``.npz`` arrays).

The engine reads and decodes in reader threads while the model runs, holds at most a few batches
of pixels at a time, and never reads a slide's level 0 whole. The CLI (``python -m service.score``)
and the service's jobs (:mod:`service.jobs`) both drive it.
"""

from service.scoring.scoring_errors import Cancelled, ScoringError

__all__ = ["Cancelled", "ScoringError"]
