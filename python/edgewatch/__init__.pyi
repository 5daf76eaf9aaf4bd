"""Type stubs of the edgewatch package (the native module edgewatch._edgewatch)."""

import os
from typing import (
    Any,
    AsyncIterator,
    Callable,
    Dict,
    Iterator,
    List,
    Literal,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    TypedDict,
    Union,
)

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

class _FitQuality(TypedDict):
    explained_variance_ratio: float
    median_score: float
    p99_score: float
    alarm_rate: float
    skipped_rows: int
    constant_features: List[str]
    solver: str

class PcaModel:
    """The aggregator's multivariate device model: per-feature standardisation, a PCA subspace, and
    limits of Hotelling's T² (inside it) and the squared prediction error (outside it) learned from
    the training rows. A vector scores 0.5 when its more surprising statistic has p = 1e-5.

    ``PcaModel.fit`` makes the model the aggregator would make of the same rows (the same Rust
    call, ``FitJob::fit``); ``to_json``/``from_json`` are the artifact the aggregator publishes to
    agents, serves on ``GET /api/models/{device}`` and ``edgewatch models show`` prints.
    Immutable; equal when every number is equal.
    """

    @staticmethod
    def fit(
        data: Any,
        features: Optional[Sequence[str]] = None,
        *,
        key: str = "model",
        from_ms: int = 0,
        to_ms: int = 0,
        version: int = 1,
        variance: float = 0.9,
        max_components: int = 8,
    ) -> "PcaModel":
        """Fits a model on ``data``, rows x features.

        ``data``: a 2-D float array whose columns ``features`` names (required: the names are the
        agent's metric names), or a pandas DataFrame: its numeric columns, or the columns
        ``features`` picks. ``key``: the device (or class) the model is for. ``from_ms``/``to_ms``:
        the training period's event time. ``variance``/``max_components``: the fit options (the
        aggregator always uses the defaults). The GIL is released while fitting.

        Raises ``ValueError``: a NaN, infinite or larger-than-1e100 value (``data[r][c] ("name"):
        must be finite ...``; the aggregator never trains on such rows), a name count that does not
        match the columns, duplicate names, fewer than 2 rows, bad options, or no varying feature.
        """
    @staticmethod
    def from_json(text: str) -> "PcaModel":
        """A model from its JSON artifact, checked by the Rust ``validate()``: ``ValueError``
        (``not a model artifact: ...`` or ``model "key" vN: invalid model: field: ...``) otherwise."""
    def to_json(self) -> str:
        """The JSON artifact, byte for byte what the aggregator publishes for this model."""
    def score(
        self, matrix: Any
    ) -> Tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
        """Scores every row: ``(scores in [0, 1], index of the feature contributing most)``.

        ``matrix``: a 2-D float array with one column per feature, in ``features`` order, or a
        DataFrame holding every feature as a column (picked by name). NaN slots are imputed by the
        training mean and never named as the top feature, as the agent scores a vector with a
        missing reading. The GIL is released while scoring."""
    @property
    def features(self) -> List[str]:
        """Feature (metric) names, in column order."""
    @property
    def version(self) -> int:
        """Model version (the aggregator sets it from its clock at fit time)."""
    @property
    def key(self) -> str:
        """The device (or class) the model is for."""
    @property
    def kind(self) -> str:
        """Always ``"pca"``."""
    @property
    def samples(self) -> int:
        """Training rows used."""
    @property
    def trained_from_ms(self) -> int:
        """Event time of the first training reading, ms."""
    @property
    def trained_to_ms(self) -> int:
        """Event time of the last training reading, ms."""
    @property
    def means(self) -> npt.NDArray[np.float64]:
        """Per-feature training means."""
    @property
    def scales(self) -> npt.NDArray[np.float64]:
        """Per-feature training standard deviations (1 for a constant feature)."""
    @property
    def components(self) -> npt.NDArray[np.float64]:
        """The k principal axes, k x features, orthonormal rows in decreasing eigenvalue order."""
    @property
    def eigenvalues(self) -> npt.NDArray[np.float64]:
        """The k eigenvalues (variance of the standardised data along each axis)."""
    @property
    def quality(self) -> _FitQuality:
        """Fit quality, as ``edgewatch models show`` prints it."""
    @property
    def linfa_version(self) -> str:
        """The linfa version the model was fitted with."""

class _Windows(TypedDict):
    start_ms: npt.NDArray[np.int64]
    end_ms: npt.NDArray[np.int64]
    count: npt.NDArray[np.uint64]
    min: npt.NDArray[np.float64]
    max: npt.NDArray[np.float64]
    mean: npt.NDArray[np.float64]
    std: npt.NDArray[np.float64]
    first_ts_ms: npt.NDArray[np.int64]
    last_ts_ms: npt.NDArray[np.int64]
    max_score: npt.NDArray[np.float64]
    revision: npt.NDArray[np.uint32]

def windows(
    ts_ms: npt.ArrayLike,
    values: npt.ArrayLike,
    window_ms: int,
    *,
    scores: Optional[npt.ArrayLike] = None,
    allowed_lateness_ms: int = 0,
    late: Literal["raise", "drop"] = "raise",
) -> _Windows:
    """Tumbling-window summaries of one series, by the agent's own window code: one entry per window
    in start order, with the fields of the summary the agent sends (``std`` is the population
    standard deviation; ``max_score`` the highest of ``scores`` in the window, 0 without them).

    Windows are aligned to the epoch. Readings are taken in the order given, as the agent's windows
    see them arrive; a reading for a window the watermark (the latest timestamp) has closed, more
    than ``allowed_lateness_ms`` after its end, is *late*: ``late="raise"`` raises ``ValueError``
    naming it, ``late="drop"`` leaves it out as the agent does (sort ``ts_ms`` to have none). A
    window corrected within the lateness appears once, at ``revision`` 1. NaN, infinite and
    larger-than-1e100 values are skipped, as the agent's ingest refuses them (they open no window
    and do not move the watermark); ``len(ts_ms) - count.sum()`` is the number left out. The GIL
    is released while summarising."""

def windows_frame(
    ts_ms: npt.ArrayLike, values: npt.ArrayLike, window_ms: int, **kwargs: Any
) -> Any:
    """:func:`windows` as a pandas DataFrame indexed by the window start (UTC ``DatetimeIndex``
    named ``start``). ``ImportError`` without pandas."""

def fetch_model(
    url: str, device: str, token: Optional[str] = None, timeout: float = 10.0
) -> PcaModel:
    """The model of ``device`` from the aggregator at ``url`` (``http://host:port``, ``GET
    /api/models/{device}``), with ``Authorization: Bearer token`` when given. ``LookupError``: no
    such model (404); ``PermissionError``: 401; ``ValueError``: invalid artifact; ``OSError``:
    unreachable."""

class FeedError(Exception):
    """The feed refused the client (HTTP 400/401 ...), or could not be reached at the first try."""

def feed(
    url: str,
    token: Optional[str] = None,
    device: Optional[str] = None,
    metric: Optional[str] = None,
    min_score: Optional[float] = None,
    *,
    since: Optional[str] = None,
    max_backoff_s: float = 5.0,
    open_timeout_s: float = 10.0,
    remember: int = 100_000,
    on_control: Optional[Callable[[Dict[str, Any]], None]] = None,
) -> AsyncIterator[Dict[str, Any]]:
    """The live anomaly feed of ``url`` (``ws://host:port/feed``): ``async for event in feed(url)``
    yields every event once, as the aggregator's JSON object. After a disconnection it reconnects
    (capped, jittered backoff) with ``since=<last id>`` and drops ids it has yielded already. Filters
    (``device``, ``metric``, ``min_score``) are applied by the server; ``token`` goes in the
    ``Authorization`` header. Control messages (a ``type`` key, such as the ``gap`` marker) are
    never yielded: ``on_control`` receives them. See :mod:`edgewatch.feed` for what cannot be
    recovered."""

class feed_sync(Iterator[Dict[str, Any]]):
    """:func:`feed` as a blocking iterator with the same arguments; ``close()`` or ``with``."""

    def __init__(
        self,
        url: str,
        token: Optional[str] = None,
        device: Optional[str] = None,
        metric: Optional[str] = None,
        min_score: Optional[float] = None,
        *,
        since: Optional[str] = None,
        max_backoff_s: float = 5.0,
        open_timeout_s: float = 10.0,
        remember: int = 100_000,
        on_control: Optional[Callable[[Dict[str, Any]], None]] = None,
    ) -> None: ...
    def __next__(self) -> Dict[str, Any]: ...
    def close(self) -> None: ...
    def __enter__(self) -> "feed_sync": ...
    def __exit__(self, *exc: Any) -> None: ...
