"""The deployment variants Envoy routes between.

Each variant runs its own ext_proc (its own `DEPLOYMENT_VARIANT` label on every metric). Production
is the default: it takes the whole split when the canary weight is 0, serves the unprefixed
`/health` and `/metrics`, and is where every fallback sends traffic.
"""

from __future__ import annotations

import enum


class Variant(str, enum.Enum):
    PRODUCTION = "production"
    CANARY = "canary"

    def __str__(self) -> str:
        return self.value

    def share(self, canary_percent: int) -> int:
        """This variant's weight in the split when the canary gets `canary_percent`."""
        return canary_percent if self is Variant.CANARY else 100 - canary_percent

    def suffixed(self, name: str) -> str:
        """The per-variant copy of a cluster or process name (`extproc` -> `extproc_canary`)."""
        return f"{name}_{self.value}"

    @classmethod
    def of_suffixed(cls, name: str) -> "Variant | None":
        suffix = name.rsplit("_", 1)[-1]
        return next((v for v in cls if v.value == suffix), None)


DEFAULT = Variant.PRODUCTION
