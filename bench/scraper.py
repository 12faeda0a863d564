"""A Prometheus-like scraper: GET /metrics once a second in a thread while a benchmark runs."""

from __future__ import annotations

import threading
import urllib.request

SCRAPE_TIMEOUT_S = 5.0


def fetch_metrics(url: str, timeout: float = SCRAPE_TIMEOUT_S) -> bytes:
    """The body of one scrape; OSError (URLError included) when the endpoint does not answer 200."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        if response.status != 200:
            raise OSError(f"HTTP {response.status}")
        return response.read()


class MetricsScraper:
    """Scrapes `url` every `interval_s` between __enter__ and __exit__, counting the outcomes."""

    def __init__(self, url: str, interval_s: float = 1.0):
        self.url = url
        self.interval_s = interval_s
        self.scrapes = 0
        self.failures = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="metrics-scraper", daemon=True)

    def __enter__(self) -> MetricsScraper:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(SCRAPE_TIMEOUT_S + 1)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                fetch_metrics(self.url)
                self.scrapes += 1
            except OSError as exc:
                self.failures += 1
                self.last_error = str(exc)
