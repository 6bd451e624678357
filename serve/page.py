"""The page for people at `GET /`: one HTML file, its script and its style sheet, read once.

The page is static and holds no model metadata. Its script reads the served models from the
endpoints any client uses (`/v2/repository/index`, `/v2/models/{m}`) and asks
`POST /predictions/{m}` for answers, putting every name and label on the page as text
(`textContent`), so nothing in a model's metadata can become markup. The files ship as package
data (`bnfold.serve/static/`), and are served with a Content-Security-Policy that allows only
these same-origin files: no inline script, no CDN (machines that serve models may be offline).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from bnfold.serve.errors import ServeError
from bnfold.serve.routes import Headers, Response

STATIC = Path(__file__).with_name("static")

# What the page may load: its own script and style, images it makes (blob:) and its own API.
# Inline scripts and inline style attributes are refused, so even a slip in the escaping could
# not run a label's `onerror=`.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
                           "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

_TYPES = {".html": b"text/html; charset=utf-8", ".js": b"text/javascript; charset=utf-8",
          ".css": b"text/css; charset=utf-8"}
_FILES = ("index.html", "page.js", "page.css")


def html_headers(policy: str, content_type: bytes = _TYPES[".html"]) -> Headers:
    """The headers of every page this service answers (here and /docs): its policy, no sniffing, revalidated."""
    return [(b"content-type", content_type),
            (b"content-security-policy", policy.encode()),
            (b"x-content-type-options", b"nosniff"),
            # Revalidated on every load, so a restarted server's new page is picked up.
            (b"cache-control", b"no-cache")]


class PageAssets:
    """The page's files in memory, each with its headers; `get(name)` answers one of them."""

    def __init__(self, folder: Path = STATIC) -> None:
        self.files: dict[str, tuple[Headers, bytes]] = {}
        for name in _FILES:
            path = folder / name
            try:
                body = path.read_bytes()
            except OSError as exc:
                raise ServeError(f"the page file {path} cannot be read ({exc.strerror or exc}); bnfold was "
                                 f"installed without its static files", status=500) from exc
            # A strong validator from the content: "no-cache" revalidates, and an unchanged file is a 304.
            etag = b'"' + hashlib.sha256(body).hexdigest()[:32].encode() + b'"'
            headers = html_headers(CONTENT_SECURITY_POLICY, _TYPES[path.suffix]) + [(b"etag", etag)]
            self.files[name] = (headers, body)

    def get(self, name: str, if_none_match: bytes | None = None) -> Response:
        """(200, headers, body) for one of the page's files, 304 when `if_none_match` names its ETag;
        a 404 `ServeError` for anything else.

        Only the names read at start-up exist: a path never reaches the file system, so `..`
        cannot either.
        """
        entry = self.files.get(name)
        if entry is None:
            raise ServeError(f"no static file {name!r}; the page's files are {sorted(self.files)}", status=404)
        headers, body = entry
        if if_none_match is not None and _matches(if_none_match, headers[-1][1]):
            return 304, headers, b""
        return 200, headers, body

    def index(self, if_none_match: bytes | None = None) -> Response:
        return self.get("index.html", if_none_match)


def _matches(if_none_match: bytes, etag: bytes) -> bool:
    """RFC 9110 13.1.2: `*`, or any listed tag equal to `etag` by weak comparison."""
    tags = [t.strip() for t in if_none_match.split(b",")]
    return b"*" in tags or any(t.removeprefix(b"W/") == etag for t in tags)
