"""The live anomaly feed of an aggregator, as Python iterators (the ``websockets`` package).

``async for event in feed(url)`` yields each event of ``ws://host:port/feed`` once, as the dict the
aggregator sends (``id``, ``device``, ``metric``, ``ts_ms``, ``value``, ``score``, ``detector``,
``agent``, ...). It is the protocol ``edgewatch tail`` speaks (tools/src/tail.rs):

- filters go in the query string (``device``, ``metric``, ``min_score``), the bearer token in the
  ``Authorization`` header (never in the URL: the aggregator refuses that);
- when the connection drops, or the server closes it (a client too slow for its queue is closed
  with a reason telling it to resume), the client reconnects with capped, jittered exponential
  backoff and ``?since=<id of the last event received>``: the server replays what it sent after
  that event from its history, so nothing in between is missed;
- ids of recent events are remembered, so an event is never yielded twice: not when the server
  no longer holds the ``since`` event and replays its whole history, nor when a replayed event
  crosses a live one.

Messages that carry a ``type`` key are control messages, not events (docs/feed.md): a ``gap``
(``{"type": "gap", "since", "reason", "replayed"}``) comes first when the server does not hold the
``since`` event, saying events may have been missed. They are never yielded as events; pass
``on_control`` to see them (it is called with each one's dict).

What it cannot recover: events the server dropped from its history (``feed.history``) during a
long disconnection, and, before the first event arrives, events published while disconnected
(there is no id to resume after yet). When the server does not hold the ``since`` event (it
restarted, or it is another aggregator), it replays its whole history: events already yielded are
dropped, and any in it the client never yielded come once, even if older than those it has. A refused request (bad filter 400, wrong token 401) and a
failure of the very first connection raise :class:`FeedError`; later failures are retried.

``feed_sync`` is the same as a blocking iterator, for code without an event loop.
"""

import asyncio
import collections
import json
import random
import urllib.parse
from typing import Any, AsyncIterator, Callable, Deque, Dict, Iterator, Optional, Set

__all__ = ["FeedError", "feed", "feed_sync"]

#: Delay before the first reconnection attempt, seconds (doubled per failure, jittered).
FIRST_DELAY_S = 0.2


class FeedError(Exception):
    """The feed refused the client, or could not be reached at the first attempt."""


class _Seen:
    """The ids of the last ``capacity`` events yielded (a set and its insertion order)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.ids: Set[str] = set()
        self.order: Deque[str] = collections.deque()

    def add(self, event_id: str) -> bool:
        """Records ``event_id``; False when it was recorded already."""
        if event_id in self.ids:
            return False
        self.ids.add(event_id)
        self.order.append(event_id)
        while len(self.order) > self.capacity:
            self.ids.discard(self.order.popleft())
        return True


class _Backoff:
    """Capped exponential delays with full jitter, reset after a successful connection."""

    def __init__(self, first_s: float, max_s: float) -> None:
        self.first_s, self.max_s, self.failures = first_s, max_s, 0

    def next_delay(self) -> float:
        cap = min(self.max_s, self.first_s * (2 ** min(self.failures, 30)))
        self.failures += 1
        return cap / 2 + random.uniform(0, cap / 2)

    def reset(self) -> None:
        self.failures = 0


def _feed_url(
    url: str,
    device: Optional[str],
    metric: Optional[str],
    min_score: Optional[float],
    since: Optional[str],
) -> str:
    query = []
    if device is not None:
        query.append(("device", device))
    if metric is not None:
        query.append(("metric", metric))
    if min_score is not None:
        query.append(("min_score", repr(float(min_score))))
    if since is not None:
        query.append(("since", since))
    if not query:
        return url
    sep = "&" if "?" in url else "?"
    return url + sep + urllib.parse.urlencode(query, quote_via=urllib.parse.quote)


def _check(url: str, token: Optional[str], min_score: Optional[float]) -> None:
    if not (url.startswith("ws://") or url.startswith("wss://")):
        raise ValueError(f"url: the feed URL must start with ws:// or wss://, got {url!r}")
    if min_score is not None and not (0.0 <= float(min_score) <= 1.0):
        raise ValueError(f"min_score: must be in [0, 1], got {min_score}")
    if token is not None and any(ord(c) < 32 or ord(c) == 127 for c in token):
        raise ValueError("token: contains control characters, which cannot go into a header")


async def feed(
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
    """Yields the events of the feed at ``url`` (``ws://host:port/feed``), each once, for ever.

    ``token``: the aggregator's bearer token. ``device``, ``metric``, ``min_score``: the server's
    filters. ``since``: start after this event id (the server's history after it comes first).
    ``max_backoff_s``: longest wait between reconnection attempts. ``remember``: how many recent
    event ids are kept to drop duplicates. ``on_control``: called with each control message
    (a dict with a ``type``, such as a ``gap`` marker), which is never yielded. Stop by breaking out
    of the loop (or cancelling).
    """
    _check(url, token, min_score)
    try:
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
    except ImportError as err:
        raise ImportError(
            "edgewatch.feed needs websockets >= 13: pip install 'websockets>=13' "
            "(or the package's extra: pip install './python[feed]')"
        ) from err

    headers = {"Authorization": f"Bearer {token}"} if token is not None else None
    seen = _Seen(max(1, remember))
    backoff = _Backoff(FIRST_DELAY_S, max_backoff_s)
    connected_once = False
    while True:
        target = _feed_url(url, device, metric, min_score, since)
        try:
            ws = await connect(
                target,
                additional_headers=headers,
                open_timeout=open_timeout_s,
            )
        except InvalidStatus as err:
            status = err.response.status_code
            body = bytes(err.response.body or b"").decode("utf-8", "replace").strip()
            # 503: the feed is full, try again; anything else is an answer that will not change.
            if status != 503 or not connected_once:
                raise FeedError(f"{target}: HTTP {status}: {body}") from None
            await asyncio.sleep(backoff.next_delay())
            continue
        except (OSError, asyncio.TimeoutError, WebSocketException) as err:
            if not connected_once:
                raise FeedError(f"cannot connect to the feed at {target}: {err}") from err
            await asyncio.sleep(backoff.next_delay())
            continue
        connected_once = True
        backoff.reset()
        try:
            async for message in ws:
                if not isinstance(message, str):
                    continue
                try:
                    event = json.loads(message)
                except ValueError:
                    continue
                if isinstance(event, dict) and isinstance(event.get("type"), str):
                    if on_control is not None:
                        on_control(event)
                    continue
                event_id = event.get("id") if isinstance(event, dict) else None
                if not isinstance(event_id, str):
                    continue
                # Resume after the latest event received, yielded now or before.
                since = event_id
                if seen.add(event_id):
                    yield event
        except ConnectionClosed:
            pass
        finally:
            await ws.close()
        await asyncio.sleep(backoff.next_delay())


class feed_sync(Iterator[Dict[str, Any]]):
    """:func:`feed` as a blocking iterator (same arguments), on a private event loop.

    Use it where no event loop runs (a script, a worker thread); ``close()`` (or a ``with``
    block) closes the connection.
    """

    def __init__(self, url: str, token: Optional[str] = None, **kwargs: Any) -> None:
        _check(url, token, kwargs.get("min_score"))
        self._loop = asyncio.new_event_loop()
        self._events = feed(url, token, **kwargs)
        self._closed = False

    def __iter__(self) -> "feed_sync":
        return self

    def __next__(self) -> Dict[str, Any]:
        if self._closed:
            raise StopIteration
        try:
            return self._loop.run_until_complete(self._events.__anext__())
        except StopAsyncIteration:
            self.close()
            raise StopIteration from None

    def close(self) -> None:
        """Closes the connection and the private event loop."""
        if self._closed:
            return
        self._closed = True
        try:
            self._loop.run_until_complete(self._events.aclose())
        finally:
            self._loop.close()

    def __enter__(self) -> "feed_sync":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            try:
                self.close()
            except Exception:  # noqa: BLE001 - at interpreter exit the loop may be gone already
                pass
