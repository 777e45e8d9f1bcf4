"""Per-worker budgets: requests per minute and tokens per minute, and their file format.

The buckets themselves live in the limiter state store (`store.LocalStore`, or Redis through the
same arithmetic in Lua), so that replicas share them: tokens are charged on the request-side
estimate at admission and corrected once the real usage is known; a correction may leave a
bucket in debt, which refill repays before the worker is admitted again.

Budget file, one worker per line (`#` starts a comment):

    *      rpm=60 tpm=200000    # default for every worker without a line of its own
    alice  tpm=1000000          # only a token budget
    ci-bot                      # no budget at all, even with a `*` line
"""

from __future__ import annotations

from dataclasses import dataclass

# The budget line that applies to every worker without a line of its own.
EVERY_WORKER = "*"




@dataclass(frozen=True, slots=True)
class BudgetConfig:
    """A worker's limits; None means unlimited on that axis."""

    rpm: int | None = None
    tpm: int | None = None

    @property
    def unlimited(self) -> bool:
        return self.rpm is None and self.tpm is None


class BudgetFileError(ValueError):
    """A budget file line that cannot be read; the message names the line."""


def parse_budgets(text: str) -> dict[str, BudgetConfig]:
    """`worker [rpm=N] [tpm=N]` lines into configs; `*` is the default for other workers."""
    configs: dict[str, BudgetConfig] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, *settings = line.split()
        if "=" in name:
            raise BudgetFileError(
                f"line {number}: {raw.strip()!r} starts with a setting; a line is "
                f"'<worker> [rpm=N] [tpm=N]', e.g. 'alice rpm=60 tpm=200000'")
        if name in configs:
            raise BudgetFileError(f"line {number}: worker {name!r} is listed twice")
        configs[name] = _parse_settings(number, settings)
    return configs


def _parse_settings(number: int, settings: list[str]) -> BudgetConfig:
    values: dict[str, int] = {}
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep or key not in ("rpm", "tpm"):
            raise BudgetFileError(
                f"line {number}: {setting!r} is not a setting; use rpm=N or tpm=N, "
                f"e.g. 'alice rpm=60 tpm=200000'")
        if key in values:
            raise BudgetFileError(f"line {number}: {key} is given twice")
        try:
            amount = int(value)
        except ValueError:
            amount = 0
        if amount <= 0:
            raise BudgetFileError(
                f"line {number}: {setting!r}: {key} must be a positive whole number, e.g. "
                f"{key}={60 if key == 'rpm' else 200000}")
        values[key] = amount
    return BudgetConfig(rpm=values.get("rpm"), tpm=values.get("tpm"))
