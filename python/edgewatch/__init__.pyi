"""Type stubs of the edgewatch package (the native module edgewatch._edgewatch)."""

import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, TypedDict, Union

import numpy as np
import numpy.typing as npt

PRESETS: List[str]
"""Names accepted by :meth:`Detector.preset` (the ``type:`` tags of the detector block)."""

class Detector:
    """One streaming detector over one series, exactly as the edgewatch agent runs it.

    ``config`` is the agent's ``detector:`` block: a dict (``{"type": "ewma", "alpha": 0.05}``), the
    same as YAML text (``"type: ewma\\nalpha: 0.05\\n"``), or None for the default (the ensemble).
    Unknown keys, wrong types and out-of-range values raise ``ValueError`` whose message starts with
    the key path, as ``edgewatch config check`` prints it: ``detector.alpha: must be in (0, 1], got 2``
    (YAML text adds ``(line L, col C)``).
    """

    def __init__(self, config: Union[Mapping[str, Any], str, None] = None) -> None: ...
    @staticmethod
    def preset(name: str) -> "Detector":
        """The detector ``name`` (one of :data:`PRESETS`) with its default parameters."""
    @staticmethod
    def presets() -> List[str]:
        """Same as :data:`PRESETS`."""
    @staticmethod
    def from_state(state: bytes) -> "Detector":
        """Restores a detector saved by :meth:`state`; its next scores are bit-identical to the original's.

        ``threshold`` is None on the restored detector (the state holds no configuration)."""
    def state(self) -> bytes:
        """The detector's state: the postcard encoding an agent checkpoint row holds for it."""
    def update(self, ts_ms: int, value: float) -> float:
        """Feeds one reading (timestamp in ms since the epoch) and returns its score in [0, 1]."""
    def score(self, ts: npt.ArrayLike, values: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Feeds whole arrays in order and returns one score per reading (float64).

        ``ts`` must be int64-compatible milliseconds (int32/int64; floats and datetime64 are refused:
        convert with ``.astype("datetime64[ms]").astype("int64")``), ``values`` float64-compatible,
        both one-dimensional and of equal length. The loop runs in Rust with the GIL released; the
        detector keeps its state, so consecutive calls continue the stream."""
    @property
    def name(self) -> str:
        """The detector's name (``ensemble``, ``ewma``, ...)."""
    @property
    def threshold(self) -> Optional[float]:
        """The configuration's recommended event threshold; None after :meth:`from_state`."""
    @property
    def state_bytes(self) -> int:
        """Bytes of state the detector holds (inline size plus heap)."""

def alarm_scores(
    scores: npt.ArrayLike,
    threshold: float,
    rearm_ratio: float = 0.8,
    min_gap_readings: int = 100,
) -> npt.NDArray[np.float64]:
    """The alarm view of ``scores`` through the agent's event gate: the score while the gate is armed,
    0 while an episode lasts (re-armed below ``threshold * rearm_ratio`` after ``min_gap_readings``).
    ``eval nab`` scores exactly this with the detector's recommended threshold and the defaults."""

class _ProfileScore(TypedDict):
    normalized: Optional[float]
    threshold: float
    raw: float
    null: float
    perfect: float
    windows: int
    windows_in_labels: int
    detected: int
    false_positives: int

def nab_score(
    files: Mapping[str, Tuple[npt.ArrayLike, npt.ArrayLike]],
    labels: Union[str, "os.PathLike[str]", Mapping[str, Sequence[Sequence[str]]]],
) -> Dict[str, Any]:
    """The NAB v1.1 score of per-row anomaly scores, by the scorer ``edgewatch eval nab`` runs.

    ``files`` maps each data file's name as the labels spell it (``"realKnownCause/nyc_taxi.csv"``)
    to ``(timestamps_ms, scores)``, one score per row in file order. ``labels`` is NAB's
    ``combined_windows.json``: a path, its JSON text, or the parsed dict. Returns ``files`` (sorted),
    ``scorable_rows`` and, under each profile name (``standard``, ``reward_low_FP_rate``,
    ``reward_low_FN_rate``), a :class:`_ProfileScore`: the normalised score (None when undefined),
    the best threshold, raw/null/perfect scores and the counts at that threshold. Files are scored
    in name order, so the result equals ``eval nab --json``'s for the same scores to the bit."""
