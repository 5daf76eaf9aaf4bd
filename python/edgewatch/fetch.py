"""``fetch_model``: a device model from an aggregator's ``GET /api/models/{device}`` (stdlib urllib).

The aggregator answers with the JSON artifact it published to the device's agent; it is loaded
(and validated) by :meth:`edgewatch.PcaModel.from_json`. No third-party HTTP client is needed.
"""

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Optional

from ._edgewatch import PcaModel

__all__ = ["fetch_model"]


def _reason(err: urllib.error.HTTPError) -> str:
    """The aggregator's explanation: the ``error`` of a JSON body, else the body's text."""
    try:
        body = err.read().decode("utf-8", "replace").strip()
    except OSError:
        body = ""
    try:
        doc = json.loads(body)
        if isinstance(doc, dict) and isinstance(doc.get("error"), str):
            return doc["error"]
    except ValueError:
        pass
    return body or str(err.reason)


def fetch_model(
    url: str, device: str, token: Optional[str] = None, timeout: float = 10.0
) -> PcaModel:
    """The model of ``device`` held by the aggregator at ``url`` (``http://host:port``).

    ``token`` is sent as ``Authorization: Bearer <token>`` (the aggregator's
    ``http.auth_token_env``). Raises ``LookupError`` when the aggregator has no model of the
    device (404), ``PermissionError`` on 401, ``ValueError`` for an artifact that fails
    validation, and ``OSError`` (``urllib.error.URLError``) when the aggregator cannot be reached.
    """
    if not (url.startswith("http://") or url.startswith("https://")):
        raise ValueError(f"url: must start with http:// or https://, got {url!r}")
    if not device:
        raise ValueError("device: must not be empty")
    target = url.rstrip("/") + "/api/models/" + urllib.parse.quote(device, safe="")
    req = urllib.request.Request(target, headers={"Accept": "application/json"})
    if token is not None:
        if any(ord(c) < 32 or ord(c) == 127 for c in token):
            raise ValueError("token: contains control characters, which cannot go into a header")
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            text = resp.read().decode("utf-8")
    except urllib.error.HTTPError as err:
        reason = _reason(err)
        if err.code == 404:
            raise LookupError(f"GET {target}: {reason}") from None
        if err.code == 401:
            raise PermissionError(f"GET {target}: {reason}") from None
        raise OSError(f"GET {target}: HTTP {err.code}: {reason}") from None
    return PcaModel.from_json(text)
