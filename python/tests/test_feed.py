"""The feed client against a live `edgewatch demo` (embedded broker, simulated fleet with frequent
anomalies, an agent, one aggregator): events arrive; a TCP proxy between the client and the
aggregator cuts the connection and refuses reconnections for a while, and the client resumes with
`since` without a duplicate and without a gap, compared id by id with a client connected directly."""

import asyncio
import json
import queue
import subprocess
import threading
import time

import pytest

import edgewatch
from edgewatch.feed import _Backoff, _feed_url, _Seen

# Anomalies at 20 per series and simulated hour, 60 simulated minutes per wall minute: a few events
# a second once the simulated warm-up (1 simulated minute, one wall second) is over.
DEMO = """\
broker: { listen: "127.0.0.1:0" }
status_interval_secs: 1
simulator:
  devices: 10
  interval_ms: 1000
  speedup: 60
  seed: 11
  anomalies: { rate_per_series_hour: 20, warmup_ms: 60000 }
agent:
  id: gw-py
  window: { size_ms: 60000, allowed_lateness_ms: 5000, max_future_ms: 31536000000 }
  detector: { type: ensemble }
aggregators:
  - id: agg-py
    owned: ["0-63"]
    http: { listen: "127.0.0.1:0" }
"""


@pytest.fixture(scope="module")
def demo_url(edgewatch_bin, tmp_path_factory):
    """The feed URL of a running demo (stopped with SIGTERM after the module's tests)."""
    cfg = tmp_path_factory.mktemp("demo") / "demo.yaml"
    cfg.write_text(DEMO)
    proc = subprocess.Popen(
        [str(edgewatch_bin), "demo", "--config", str(cfg), "--broker-port", "0", "--http-port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    lines: "queue.Queue[str]" = queue.Queue()

    def drain() -> None:
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))

    threading.Thread(target=drain, daemon=True).start()
    try:
        deadline = time.monotonic() + 60
        url = None
        while url is None:
            left = deadline - time.monotonic()
            assert left > 0 and proc.poll() is None, f"the demo printed no feed URL ({proc.poll()})"
            try:
                line = lines.get(timeout=left)
            except queue.Empty:
                continue
            if line.startswith("ws://"):
                url = line
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Proxy:
    """A TCP proxy to the aggregator that can cut every connection and refuse new ones."""

    def __init__(self, target: str, forget_since: bool = False) -> None:
        host, port = target.split(":")
        self.target = (host, int(port))
        # Rewrites `since=<id>` to an id the server never had, as after a restart of the server
        # or once the event fell out of its history: the server then replays its whole history.
        self.forget_since = forget_since
        self.refusing = False
        self.requests = []  # the request line of every proxied connection
        self.open = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _handle(self, cr, cw) -> None:
        if self.refusing:
            cw.transport.abort()
            return
        try:
            sr, sw = await asyncio.open_connection(*self.target)
        except OSError:
            cw.transport.abort()
            return
        self.open.update((cw, sw))

        async def pipe(reader, writer, sniff):
            try:
                first = True
                while True:
                    data = await reader.read(65536)
                    if not data:
                        break
                    if sniff and first:
                        if self.forget_since:
                            data = data.replace(b"since=", b"since=forgotten-", 1)
                        self.requests.append(data.split(b"\r\n", 1)[0].decode("latin-1"))
                        first = False
                    writer.write(data)
                    await writer.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                writer.transport.abort()

        await asyncio.gather(pipe(cr, sw, True), pipe(sr, cw, False))
        self.open.discard(cw)
        self.open.discard(sw)

    def cut(self) -> None:
        """Drops every proxied connection (both sides, RST) and refuses new ones."""
        self.refusing = True
        for w in list(self.open):
            w.transport.abort()
        self.open.clear()

    def close(self) -> None:
        self.server.close()


async def collect(events, into: list) -> None:
    async for e in events:
        into.append(e)


async def until(what: str, cond, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("server_forgets", [False, True], ids=["resume", "full-replay"])
def test_feed_resumes_after_a_cut_without_duplicates_or_gaps(demo_url, server_forgets):
    """`resume`: the server finds the `since` event and sends what followed it. `full-replay`: it
    does not know the id and replays its whole history, events the client yielded included."""

    async def scenario():
        host_port = demo_url.split("//", 1)[1].split("/", 1)[0]
        proxy = Proxy(host_port, forget_since=server_forgets)
        port = await proxy.start()
        reference, got = [], []
        ref_task = asyncio.create_task(collect(edgewatch.feed(demo_url), reference))
        # The proxied client starts once the reference has an event, so the reference (subscribed
        # earlier) has everything the proxied one can get.
        await until("a first event", lambda: reference)
        client = edgewatch.feed(f"ws://127.0.0.1:{port}/feed", max_backoff_s=0.5)
        got_task = asyncio.create_task(collect(client, got))
        try:
            await until("events through the proxy", lambda: len(got) >= 3)
            proxy.cut()
            at_cut = len(reference)
            # Events published while the client cannot connect.
            await until("events during the outage", lambda: len(reference) >= at_cut + 3)
            missed = [e["id"] for e in reference[at_cut:]]
            proxy.refusing = False
            await until(
                "the resumed client to catch up",
                lambda: len(got) >= 1 and got[-1]["id"] in {e["id"] for e in reference[at_cut + 3:]},
            )
        finally:
            got_task.cancel()
            ref_task.cancel()
            await asyncio.gather(got_task, ref_task, return_exceptions=True)
            proxy.close()
        ids = [e["id"] for e in got]
        ref_ids = [e["id"] for e in reference]
        assert len(set(ids)) == len(ids), "an event was yielded twice"
        assert len(set(ref_ids)) == len(ref_ids)
        start = ref_ids.index(ids[0])
        if not server_forgets:
            assert ids == ref_ids[start : start + len(ids)], "a gap or a reordering"
        else:
            # The whole history came again: what the client had not yielded yet, events older
            # than its first one included, comes once; nothing between its first and last is missing.
            end = ref_ids.index(ids[-1])
            assert set(ref_ids[start : end + 1]) <= set(ids), "a gap"
            older = set(ids) - set(ref_ids[start : end + 1])
            assert older.isdisjoint(ref_ids[end + 1 :]), "only older events may be added"
        assert set(missed) <= set(ids), "events of the outage were not replayed"
        # It reconnected, resuming after the last event it had.
        assert len(proxy.requests) >= 2, proxy.requests
        assert proxy.requests[0].startswith("GET /feed ")
        assert any("since=" in r for r in proxy.requests[1:]), proxy.requests
        if server_forgets:
            # The server did replay events the client had yielded before the cut (so they were
            # dropped as duplicates): its history for an unknown id holds the client's first event.
            from websockets.asyncio.client import connect

            async with connect(demo_url + "?since=forgotten-x") as ws:
                gap = json.loads(await asyncio.wait_for(ws.recv(), 10))
                assert gap["type"] == "gap" and gap["since"] == "forgotten-x", gap
                replayed = set()
                while ids[0] not in replayed:
                    replayed.add(json.loads(await asyncio.wait_for(ws.recv(), 10))["id"])
        for e in got:
            assert {"id", "device", "metric", "ts_ms", "value", "score", "detector"} <= set(e)

    asyncio.run(scenario())


def test_feed_sync_filters_and_starts_after_since(demo_url):
    with edgewatch.feed_sync(demo_url, min_score=0.6) as events:
        first = [next(events) for _ in range(3)]
    assert all(e["score"] >= 0.6 for e in first)
    assert len({e["id"] for e in first}) == 3
    device = first[0]["device"]
    # Resuming after the first event replays the history from there on: the next two come first.
    with edgewatch.feed_sync(demo_url, min_score=0.6, since=first[0]["id"]) as events:
        again = [next(events) for _ in range(2)]
    assert [e["id"] for e in again] == [e["id"] for e in first[1:]]
    with edgewatch.feed_sync(demo_url, device=device, since=first[0]["id"]) as events:
        e = next(events)
    assert e["device"] == device


def test_an_unknown_since_gives_a_gap_marker_to_on_control_and_never_as_an_event(demo_url):
    controls = []
    with edgewatch.feed_sync(demo_url, since="no-such-event", on_control=controls.append) as events:
        first = next(events)
    assert "type" not in first and isinstance(first["id"], str)
    assert len(controls) == 1, controls
    gap = controls[0]
    assert gap["type"] == "gap" and gap["since"] == "no-such-event", gap
    assert "missed" in gap["reason"] and isinstance(gap["replayed"], int), gap


def test_the_example_client_prints_events_from_the_demo(demo_url):
    """examples/feed_client.py: plain `websockets`, starting with recent events."""
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "examples" / "feed_client.py"
    out = subprocess.run(
        [sys.executable, str(example), demo_url, "--last", "5", "--count", "3"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    lines = [l for l in out.stdout.splitlines() if l]
    assert len(lines) == 3, out.stdout
    assert all("score=" in l and " id=" in l for l in lines), lines
    out = subprocess.run(
        [sys.executable, str(example), demo_url + "?since=nope", "--count", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "control message: {" in out.stderr and '"type": "gap"' in out.stderr, out.stderr


def test_refusals_and_unreachable_feeds_raise():
    with pytest.raises(ValueError, match="ws://"):
        edgewatch.feed_sync("http://127.0.0.1:1/feed")
    with pytest.raises(ValueError, match=r"min_score: must be in \[0, 1\], got 2"):
        edgewatch.feed_sync("ws://127.0.0.1:1/feed", min_score=2)
    with pytest.raises(edgewatch.FeedError, match="cannot connect to the feed"):
        with edgewatch.feed_sync("ws://127.0.0.1:1/feed", open_timeout_s=2) as events:
            next(events)


def test_a_refused_request_is_not_retried(demo_url):
    with pytest.raises(edgewatch.FeedError, match="HTTP 400: unknown query parameter"):
        with edgewatch.feed_sync(demo_url + "?bogus=1") as events:
            next(events)


def test_ids_are_remembered_within_capacity_and_backoff_is_capped():
    seen = _Seen(2)
    assert seen.add("a") and seen.add("b") and not seen.add("a")
    assert seen.add("c") and seen.add("a"), "a fell out of the last 2"
    b = _Backoff(0.2, 1.0)
    delays = [b.next_delay() for _ in range(10)]
    assert 0.1 <= delays[0] <= 0.2 and all(d <= 1.0 for d in delays) and delays[-1] >= 0.5
    b.reset()
    assert b.next_delay() <= 0.2
    assert _feed_url("ws://h/feed", "pump 7/a", None, 0.5, "x&y") == (
        "ws://h/feed?device=pump%207%2Fa&min_score=0.5&since=x%26y"
    )
    assert _feed_url("ws://h/feed?a=1", None, "m", None, None) == "ws://h/feed?a=1&metric=m"
