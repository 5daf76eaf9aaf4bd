#!/usr/bin/env python3
"""A minimal client of the edgewatch live anomaly feed, with plain `websockets` (>= 13).

    python examples/feed_client.py ws://127.0.0.1:8080/feed [--last 20] [--count 10] [--token T]

Prints one line per event on stdout. When the connection drops it reconnects and resumes with
``?since=<id of the last event received>``, so nothing the aggregator still holds is missed. Control
messages (objects with a ``type`` key, such as the ``gap`` marker sent when ``since`` is unknown) go to
stderr. The protocol is in docs/feed.md; the ``edgewatch`` package's ``edgewatch.feed`` is the
complete client (duplicate suppression, backoff with jitter, refusals raised).
"""

import argparse
import asyncio
import json
import sys
import urllib.parse

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus


def url_with(base: str, **params: object) -> str:
    query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
    return base + ("&" if "?" in base else "?") + query if query else base


async def run(url: str, token: "str | None", last: "int | None", count: "int | None") -> None:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    since = None
    printed = 0
    delay = 0.2
    while True:
        # `last` only until an event has been received; then resume after it.
        target = url_with(url, since=since) if since else url_with(url, last=last)
        try:
            async with connect(target, additional_headers=headers, open_timeout=10) as ws:
                if printed or since:
                    print(f"reconnected, resuming after {since}", file=sys.stderr)
                delay = 0.2
                async for message in ws:
                    msg = json.loads(message)
                    if "type" in msg:
                        print(f"control message: {json.dumps(msg)}", file=sys.stderr)
                        continue
                    since = msg["id"]
                    print(
                        f"{msg['ts_ms']} {msg['device']} {msg['metric']} "
                        f"value={msg['value']:.4g} score={msg['score']:.3f} {msg['detector']} id={msg['id']}",
                        flush=True,
                    )
                    printed += 1
                    if count is not None and printed >= count:
                        return
        except InvalidStatus as err:
            # 400/401 will not change by retrying; 503 (feed full) might.
            if err.response.status_code != 503:
                raise SystemExit(f"{target}: refused with HTTP {err.response.status_code}")
        except (OSError, ConnectionClosed, asyncio.TimeoutError) as err:
            print(f"feed connection lost ({err}); retrying in {delay:.1f} s", file=sys.stderr)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 5.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url", help="feed URL, e.g. ws://127.0.0.1:8080/feed")
    p.add_argument("--token", help="bearer token, when the aggregator requires one")
    p.add_argument("--last", type=int, help="start with up to N recent events")
    p.add_argument("--count", type=int, help="exit after N events")
    args = p.parse_args()
    try:
        asyncio.run(run(args.url, args.token, args.last, args.count))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
