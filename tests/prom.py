"""A server's Prometheus /metrics as tests read it: parsed by prometheus_client, samples matched by exact
name and a subset of labels. Matching text lines by prefix also matched longer names (a counter's
`_created` beside its `_total`) and depended on the order the exposition writes labels in."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

SUFFIXES = ("", "_total", "_count", "_sum", "_bucket")  # a family's sample names


def text(port: int) -> str:
    """The exposition as served (for what must not appear in it at all, e.g. a token)."""
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def value(port: int, name: str, **labels: str) -> float:
    """The sum of the samples named `name` whose labels include `labels`; 0.0 when no labelled child
    matched yet. A name the server does not export at all fails the test (a renamed metric must not
    read as zero)."""
    known: set[str] = set()
    total = 0.0
    for family in text_string_to_metric_families(text(port)):
        known.update(family.name + s for s in SUFFIXES)
        for sample in family.samples:
            known.add(sample.name)
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    assert name in known, f"the server exports no metric named {name!r}"
    return total
