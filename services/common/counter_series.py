"""A labelled Prometheus counter whose children are each looked up once.

`Counter.labels(...)` takes a lock and checks its label values on every call: on a path taken per
input (a callback, an event) that is paid for nothing once the child exists. A `CounterSeries`
keeps the children it has handed out, as many as the counter has series.
"""

from __future__ import annotations

from prometheus_client import Counter


class CounterSeries:
    def __init__(self, counter: Counter) -> None:
        self.counter = counter
        self._children: dict[tuple[str, ...], Counter] = {}

    def __call__(self, *values: str) -> Counter:
        """The child of `values` (the counter's label values, in order)."""
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self.counter.labels(*values)
        return child
