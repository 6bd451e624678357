"""The page for people at `GET /`: one HTML file, its script and its style sheet, read once.

The page is static and holds no model metadata. Its script reads the served models from the
endpoints any client uses (`/v2/repository/index`, `/v2/models/{m}`) and asks
`POST /predictions/{m}` for answers, putting every name and label on the page as text
(`textContent`), so nothing in a model's metadata can become markup. The files ship as package
data (`bnfold.serve/static/`), and are served with a Content-Security-Policy that allows only
these same-origin files: no inline script, no CDN (machines that serve models may be offline).
"""
from __future__ import annotations

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
            headers = [(b"content-type", _TYPES[path.suffix]),
                       (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
                       (b"x-content-type-options", b"nosniff"),
                       # Revalidated on every load, so a restarted server's new page is picked up.
                       (b"cache-control", b"no-cache")]
            self.files[name] = (headers, body)

    def get(self, name: str) -> Response:
        """(200, headers, body) for one of the page's files; a 404 `ServeError` for anything else.

        Only the names read at start-up exist: a path never reaches the file system, so `..`
        cannot either.
        """
        entry = self.files.get(name)
        if entry is None:
            raise ServeError(f"no static file {name!r}; the page's files are {sorted(self.files)}", status=404)
        headers, body = entry
        return 200, headers, body

    def index(self) -> Response:
        return self.get("index.html")
