"""Reading a metrics port over HTTP: one GET, and `/metrics` parsed by prometheus-client."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

# (name, labels) -> value of every sample of one scrape
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def http_get(port: int, path: str) -> tuple[int, str]:
    """(status, body) of one GET to 127.0.0.1:`port` (off the event loop)."""

    def fetch() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
                return int(r.status), r.read().decode()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read().decode()

    return await asyncio.to_thread(fetch)


async def scrape(port: int) -> Samples:
    """`/metrics` of the port, parsed; asserts it answered 200."""
    status, text = await http_get(port, "/metrics")
    assert status == 200, text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float:
    """The value of the sample `name` with exactly these labels."""
    return samples[(name, frozenset(labels.items()))]
