"""The local environment: real Kubernetes control planes, NATS and Jaeger as processes.

Used by ``make up``, the test fixtures and the benchmark. Public surface:
:class:`LocalEnvironment` and :class:`EnvironmentInfo`.
"""

from .environment import EnvironmentInfo, LocalEnvironment

__all__ = ["EnvironmentInfo", "LocalEnvironment"]
