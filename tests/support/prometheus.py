"""Read a service's own figures from its `/metrics` page, as an operator's Prometheus does."""

from __future__ import annotations

import re

import httpx


def metric_total(base_url: str, name: str, **labels: str) -> float:
    """The sum of every sample of `name` whose labels include `labels` (0 when there is none,
    or when the service does not answer: a worker being restarted has counted nothing yet)."""
    try:
        text = httpx.get(f"{base_url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return 0.0
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " "):  # a sample without labels
            found: dict[str, str] = {}
        elif line.startswith(name + "{"):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        else:
            continue
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total
