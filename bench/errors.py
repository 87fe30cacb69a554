"""User-facing errors: one readable line naming the problem and the fix.

Everything a user can cause (bad config, missing file, a method that does not apply) raises a subclass of
`BenchError`. The CLI prints `str(err)` on one line and exits non-zero; the traceback is shown only with
HYDRA_FULL_ERROR=1.
"""

from __future__ import annotations

import difflib


class BenchError(Exception):
    """An error the user can fix. `str()` is a single line: problem, then the fix."""

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}; {fix}" if fix else problem)


class ConfigError(BenchError):
    """A config value is invalid (out of range, wrong type, unknown choice)."""


class NotApplicable(BenchError):
    """A method/task/backend does not apply to this model (architecture, modality)."""


class DataMissing(BenchError):
    """A data file is missing and cannot be fetched."""


class DataCorrupt(BenchError):
    """A data or weights file exists but cannot be read as what it should be (bad encoding, truncated, refused
    pickle)."""


class ArtifactCorrupt(BenchError):
    """A stored artifact failed its integrity check."""


class ResourceError(BenchError):
    """The machine cannot provide what the run needs: memory, disk space, a writable directory, a free store."""


class NumericalFailure(BenchError):
    """A method or task produced NaN/inf; the number is never reported."""

    exit_code = 1


def did_you_mean(value: str, choices: list[str]) -> str:
    """`"did you mean 'x'? "` when a choice is close, else ''."""
    close = difflib.get_close_matches(value, choices, n=1, cutoff=0.5)
    return f"did you mean '{close[0]}'? " if close else ""


def unknown_choice(kind: str, value: str, choices: list[str]) -> ConfigError:
    return ConfigError(
        f"unknown {kind} '{value}'",
        f"{did_you_mean(value, choices)}choices: {', '.join(sorted(choices))}",
    )


def check_range(name: str, value, lo, hi) -> None:
    if value is None or not (lo <= value <= hi):
        raise ConfigError(f"{name}={value} is out of range", f"use a value in [{lo}, {hi}]")


def check_bits(name: str, value, lo: int, hi: int) -> None:
    """A bit-width: an integer in [lo, hi] (a float such as 4.5 or a bool is refused, not truncated)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}={value!r} is not an integer bit-width", f"use an integer in [{lo}, {hi}]")
    check_range(name, value, lo, hi)
