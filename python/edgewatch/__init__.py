"""edgewatch's streaming anomaly detectors, device models, windows and live feed, bit for bit the
code the agent and the aggregator run.

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

``PcaModel.fit`` fits the aggregator's multivariate device model on a 2-D array or a DataFrame;
``score`` scores vectors; ``to_json``/``from_json`` are the artifact the aggregator pushes to
agents, and ``fetch_model`` loads one from an aggregator. ``windows`` summarises a series in the
agent's tumbling windows (``windows_frame``: as a DataFrame). ``feed``/``feed_sync`` iterate over an
aggregator's live anomaly feed, resuming after disconnections without duplicates.
"""

from ._edgewatch import PRESETS, Detector, PcaModel, alarm_scores, nab_score, windows
from .feed import FeedError, feed, feed_sync
from .fetch import fetch_model
from .frames import windows_frame

__all__ = [
    "Detector",
    "FeedError",
    "PRESETS",
    "PcaModel",
    "alarm_scores",
    "feed",
    "feed_sync",
    "fetch_model",
    "nab_score",
    "windows",
    "windows_frame",
]
