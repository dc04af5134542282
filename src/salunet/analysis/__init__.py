"""Analyses of the paper (arXiv 2606.02927, figures 1 and 5-11): pure statistics (:mod:`.stats`), hook capture
(:mod:`.capture`), the experiment commands (:mod:`.experiments`) and their plots (:mod:`.plots`)."""
from . import capture, stats

__all__ = ["capture", "stats"]
