"""Deploy the detector a run chose: ``load_detector(run_dir)`` / ``OODDetector`` (a plain callable) and what
``main.py predict`` writes (``predictions``)."""

from ash_lightning.deploy.detector import OODDetector, load_detector

__all__ = ["OODDetector", "load_detector"]
