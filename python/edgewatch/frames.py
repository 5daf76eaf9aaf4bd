"""``windows_frame``: :func:`edgewatch.windows` as a pandas DataFrame.

pandas is imported only when this is called: the package never needs it otherwise.
"""

from typing import Any

from ._edgewatch import windows

__all__ = ["windows_frame"]


def windows_frame(ts_ms: Any, values: Any, window_ms: int, **kwargs: Any) -> Any:
    """The summaries of :func:`edgewatch.windows` as a DataFrame, one row per window.

    The columns are the summary fields (``start_ms`` ... ``revision``); the index is the window
    start as a UTC ``DatetimeIndex`` named ``start``. Keyword arguments are those of ``windows``.
    Raises ``ImportError`` naming the fix when pandas is not installed.
    """
    try:
        import pandas as pd
    except ImportError as err:
        raise ImportError(
            "edgewatch.windows_frame needs pandas (pip install pandas); "
            "edgewatch.windows gives the same summaries as a dict of numpy arrays"
        ) from err
    cols = windows(ts_ms, values, window_ms, **kwargs)
    index = pd.DatetimeIndex(pd.to_datetime(cols["start_ms"], unit="ms", utc=True), name="start")
    return pd.DataFrame(cols, index=index)
