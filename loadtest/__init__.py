"""Locust load tests of ``slimsd serve`` and ``slimsd loadtest compare`` (docs/loadtest.md).

``LOCUSTFILE`` is the path to pass to ``locust -f``.
"""

from pathlib import Path

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
