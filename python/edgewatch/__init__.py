"""edgewatch's streaming anomaly detectors, bit for bit the ones the agent runs.

>>> import numpy as np, edgewatch
>>> det = edgewatch.Detector({"type": "ewma", "alpha": 0.05})
>>> scores = det.score(np.arange(1000, dtype=np.int64) * 60_000, np.random.rand(1000))

``Detector(config)`` takes the agent's ``detector:`` block as a dict or as YAML text;
``Detector.preset(name)`` gives any of ``PRESETS`` with its defaults. ``update`` feeds one reading,
``score`` whole numpy arrays (the GIL is released while scoring). ``state()`` returns the detector's
bytes as the agent checkpoints them (postcard); ``Detector.from_state`` resumes with bit-identical
scores. ``alarm_scores`` turns a score array into the event gate's alarm view, as ``eval nab``
scores it, and ``nab_score`` scores per-row scores against NAB's labels with ``eval nab``'s
scorer (three profiles). Invalid configurations raise ``ValueError`` naming the key, e.g. ``detector.alpha: ...``.
"""

from ._edgewatch import PRESETS, Detector, alarm_scores, nab_score

__all__ = ["Detector", "PRESETS", "alarm_scores", "nab_score"]
