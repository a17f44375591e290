"""The book (`make book`) in a real browser: every page of the site opens in headless Chromium.

The site is built from a `make demo` run with tools/build_book.py (incremental, into _book/), or taken as it
is from $BOOK_SITE (what `make book-test` does after `make book`). It is served on 127.0.0.1 by an
http.server thread that stops itself after BOOK_TEST_SERVE_S seconds, and every page is opened:
- it loads with HTTP 200, no console error, no uncaught exception, no failed request, and no request
  leaves 127.0.0.1 (the book is offline: no CDN, no web fonts, no MathJax from the network);
- every <img> decodes (naturalWidth > 0);
- every same-site link answers 200 and every #anchor exists on its target page;
- the table of contents (the front page's sidebar) lists every notebook in nbs/, in order.
Screenshots of the front page and of the tokenizer chapter go to _book/_screenshots/.

Needs the `book` extra (Sphinx, myst-nb, sphinx-book-theme), the `playwright` client and a Chromium
(/usr/bin/chromium, or $BOOK_CHROMIUM). Without them the tests skip with the reason, so plain `make test`
stays fast; `make book-test` installs them (Debian's `chromium` when root) and sets BOOK_TEST_STRICT=1, under
which only a Chromium that cannot be found or launched still skips.
"""
import functools
import html.parser
import importlib.util
import json
import os
import shutil
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "nbs").glob("*.ipynb"))
STRICT = os.environ.get("BOOK_TEST_STRICT") == "1"
SCREENSHOTS = Path(os.environ.get("BOOK_SCREENSHOTS", ROOT / "_book" / "_screenshots"))
FIGURE_CHAPTER = "12_train_tokenizer"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


def _missing_or_skip(what: str):
    "A missing build tool fails under `make book-test` (which installs it) and skips elsewhere."
    if STRICT:
        pytest.fail(f"{what} (make book-test should have installed it)")
    pytest.skip(f"{what}: run `make book-test` to install it and test the book")


def _chromium() -> str | None:
    for candidate in (os.environ.get("BOOK_CHROMIUM"), "/usr/bin/chromium", "/usr/bin/chromium-browser",
                      shutil.which("chromium"), shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture(scope="module")
def site() -> Path:
    "The rendered site: $BOOK_SITE, else built (incrementally) from the run folder, else an existing _book/html."
    missing = [m for m in ("sphinx", "myst_nb", "sphinx_book_theme") if importlib.util.find_spec(m) is None]
    if missing:
        _missing_or_skip(f"the book extra is not installed (no {', '.join(missing)})")
    if importlib.util.find_spec("playwright") is None:
        _missing_or_skip("the playwright client is not installed")
    if _chromium() is None:
        pytest.skip("no Chromium found (/usr/bin/chromium or $BOOK_CHROMIUM): `make book-test` installs "
                    "Debian's chromium when run as root")
    if os.environ.get("BOOK_SITE"):
        found = Path(os.environ["BOOK_SITE"]).resolve()
        assert (found / "index.html").is_file(), f"BOOK_SITE={found} holds no index.html"
        return found
    run = Path(os.environ.get("BOOK_RUN", "runs/smoke"))
    run = run if run.is_absolute() else ROOT / run
    if run.is_dir():
        sys.path.insert(0, str(ROOT / "tools"))
        import build_book
        # as `make book` builds it: notebooks that are not stages executed (cached, so cheap after a make book)
        return Path(build_book.build(run.resolve(), ROOT / "_book", execute=True, quiet=True)["site"])
    if (ROOT / "_book" / "html" / "index.html").is_file():
        return ROOT / "_book" / "html"
    _missing_or_skip(f"no run folder {run} to build the book from (run `make demo` first) and no _book/html")


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a page closed mid-transfer is no error
            super().handle_error(request, client_address)


@pytest.fixture(scope="module")
def server(site):
    "http://127.0.0.1:<port>/ serving the site from a thread, shut down after the tests or after a deadline."
    httpd = _QuietServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(site)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    thread.start()
    deadline = threading.Timer(float(os.environ.get("BOOK_TEST_SERVE_S", 900)), httpd.shutdown)
    deadline.daemon = True
    deadline.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        deadline.cancel()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


class _Ids(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        for key, value in attrs:
            if key in ("id", "name") and value:
                self.ids.add(value)


_IMAGES_JS = """async () => {
  const imgs = [...document.images];
  imgs.forEach(i => { i.loading = 'eager'; });
  await Promise.all(imgs.map(i => (i.complete && i.naturalWidth) ? null : i.decode().catch(() => null)));
  return imgs.map(i => ({src: i.currentSrc || i.src, width: i.naturalWidth}));
}"""


@pytest.fixture(scope="module")
def crawl(site, server, tmp_path_factory):
    "Open every page of the site in headless Chromium once; the tests below judge what was seen."
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    pages = sorted(p.relative_to(site).as_posix() for p in site.rglob("*.html") if "_static" not in p.parts)
    seen = {"pages": {}, "external": [], "toc": [], "screenshots": []}
    profile = tmp_path_factory.mktemp("chromium-profile")  # a fresh --user-data-dir
    with sync_playwright() as pw:
        try:
            ctx = pw.chromium.launch_persistent_context(
                str(profile), executable_path=_chromium(), headless=True, args=CHROMIUM_FLAGS,
                viewport={"width": 1280, "height": 900}, timeout=60_000)
        except PlaywrightError as e:
            pytest.skip(f"Chromium {_chromium()} could not be launched: {str(e).splitlines()[0]}")
        ctx.set_default_timeout(30_000)

        def route(r):
            url = r.request.url
            if url.startswith(server) or url.startswith(("data:", "blob:", "about:")):
                r.continue_()
            else:
                seen["external"].append(url)
                r.abort()
        ctx.route("**/*", route)
        try:
            for rel in pages:
                page = ctx.new_page()
                record = {"errors": [], "failed": [], "images": [], "links": []}
                page.on("console", lambda m, rec=record: rec["errors"].append(f"console: {m.text}")
                        if m.type == "error" else None)
                page.on("pageerror", lambda e, rec=record: rec["errors"].append(f"exception: {e}"))
                page.on("requestfailed", lambda q, rec=record: rec["failed"].append(
                    f"{q.url} ({q.failure})") if q.url.startswith(server) else None)
                page.on("response", lambda r, rec=record: rec["failed"].append(f"{r.url} (HTTP {r.status})")
                        if r.status >= 400 else None)
                response = page.goto(server + rel, wait_until="load")
                record["status"] = response.status if response else None
                record["images"] = page.evaluate(_IMAGES_JS)
                record["links"] = page.evaluate("() => [...document.querySelectorAll('a[href]')].map(a => a.href)")
                if rel == "index.html":
                    seen["toc"] = page.evaluate(
                        "() => [...document.querySelectorAll('nav.bd-docs-nav a, .bd-sidebar-primary nav a')]"
                        ".map(a => a.href)")
                    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
                    page.screenshot(path=str(SCREENSHOTS / "front_page.png"))
                    seen["screenshots"].append(SCREENSHOTS / "front_page.png")
                if rel == f"{FIGURE_CHAPTER}.html":
                    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
                    figure = page.locator("article img").first
                    if figure.count():
                        figure.scroll_into_view_if_needed()
                        page.evaluate("() => window.scrollBy(0, -120)")
                    page.screenshot(path=str(SCREENSHOTS / f"{FIGURE_CHAPTER}.png"))
                    seen["screenshots"].append(SCREENSHOTS / f"{FIGURE_CHAPTER}.png")
                page.close()
                seen["pages"][rel] = record
        finally:
            ctx.close()
    return seen


def test_every_page_loads_without_errors(crawl):
    assert crawl["pages"], "the site has no pages"
    bad = {rel: rec["errors"] + rec["failed"] + ([f"HTTP {rec['status']}"] if rec["status"] != 200 else [])
           for rel, rec in crawl["pages"].items()}
    bad = {rel: problems for rel, problems in bad.items() if problems}
    assert not bad, "pages with console errors, exceptions or failed requests:\n" + json.dumps(bad, indent=1)


def test_the_book_is_offline(crawl):
    assert not crawl["external"], f"pages asked for resources outside the site: {sorted(set(crawl['external']))}"


def test_every_image_renders(crawl):
    images = [(rel, img) for rel, rec in crawl["pages"].items() for img in rec["images"]]
    broken = [f"{rel}: {img['src'][:120]}" for rel, img in images if not img["width"]]
    assert not broken, "images that did not decode (naturalWidth 0):\n" + "\n".join(broken)
    # Figures: the tokenizer chapter and the figure index show pictures (inline outputs or saved files).
    for rel in (f"{FIGURE_CHAPTER}.html", "figures/index.html"):
        if rel in crawl["pages"]:
            assert crawl["pages"][rel]["images"], f"{rel} shows no image"


def test_internal_links_resolve(crawl, server):
    statuses: dict[str, int] = {}
    anchors: dict[str, set[str]] = {}

    def fetch(url):
        if url not in statuses:
            try:
                with urllib.request.urlopen(url, timeout=30) as r:
                    statuses[url] = r.status
                    if "html" in r.headers.get("Content-Type", ""):
                        parser = _Ids()
                        parser.feed(r.read().decode("utf-8", "replace"))
                        anchors[url] = parser.ids
            except urllib.error.HTTPError as e:
                statuses[url] = e.code
        return statuses[url]

    broken, checked = [], 0
    for rel, rec in crawl["pages"].items():
        for href in set(rec["links"]):
            if not href.startswith(server):
                continue  # external (not fetched: the book must work offline) or javascript:/mailto:
            url, _, fragment = href.partition("#")
            checked += 1
            status = fetch(url)
            if status != 200:
                broken.append(f"{rel}: {href} -> HTTP {status}")
            elif fragment and url in anchors and urllib.parse.unquote(fragment) not in anchors[url]:
                broken.append(f"{rel}: {href} -> no element with id {fragment!r}")
    assert checked, "no internal links found"
    assert not broken, f"{len(broken)} broken internal links:\n" + "\n".join(sorted(broken))


def test_toc_lists_every_notebook_in_order(crawl, server):
    listed = [urllib.parse.urlparse(h).path.rsplit("/", 1)[-1] for h in crawl["toc"] if h.startswith(server)]
    chapters = [name[:-5] for name in listed if name.endswith(".html")]
    missing = [nb.stem for nb in NOTEBOOKS if nb.stem not in chapters]
    assert not missing, f"the table of contents lacks {missing}; it lists {chapters}"
    order = [c for c in chapters if c in {nb.stem for nb in NOTEBOOKS}]
    assert order == sorted(order), f"chapters out of the decades' order: {order}"
    assert any(h.startswith(server) and h.split("#")[0].endswith("figures/index.html") for h in crawl["toc"]), \
        "the table of contents lacks the run's figure index"
    for nb in NOTEBOOKS:
        assert f"{nb.stem}.html" in crawl["pages"], f"no page for {nb.name}"


def test_screenshots_written(crawl):
    for path in crawl["screenshots"]:
        assert path.is_file() and path.stat().st_size > 10_000, f"screenshot {path} is missing or blank"
    pages = crawl["pages"]
    summary = {"pages": len(pages), "images": sum(len(r["images"]) for r in pages.values()),
               "internal_links": sum(len(set(r["links"])) for r in pages.values()),
               "screenshots": [str(p) for p in crawl["screenshots"]]}
    print("book test:", json.dumps(summary))
    assert len(crawl["screenshots"]) == 2, f"expected 2 screenshots, wrote {crawl['screenshots']}"
