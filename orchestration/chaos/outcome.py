"""What a scenario reports: its figures, and whether it passed."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Outcome:
    """The figures of one scenario, as docs/chaos.md, "Reading the output", describes them.

    ``extra`` holds the scenario's own figures; any entry in ``problems`` fails it; ``skip`` says why it did not run.
    """

    scenario: str
    runs: int = 0
    succeeded: int = 0
    failed: int = 0
    lost: int = 0
    duplicated_effects: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    skip: str = ""
    seconds: float = 0.0
    logs: str = ""

    @property
    def status(self) -> str:
        if self.skip:
            return "SKIP"
        return "FAIL" if self.problems else "PASS"

    def expect(self, condition: bool, problem: str) -> None:
        """Record ``problem`` unless ``condition`` holds."""
        if not condition:
            self.problems.append(problem)

    def line(self) -> str:
        """One line for the terminal: the figures, PASS/FAIL/SKIP, and for a failure why and where the logs are."""
        name = f"{self.scenario:<17}"
        if self.skip:
            return f"{name} SKIP ({self.skip})"
        figures = f"runs={self.runs} succeeded={self.succeeded} failed={self.failed} lost={self.lost}"
        figures += f" duplicated_effects={self.duplicated_effects}"
        figures += "".join(f" {key}={value}" for key, value in self.extra.items())
        line = f"{name} {figures}  {self.status}  ({self.seconds:.1f} s)"
        if self.problems:
            line += f"  {'; '.join(self.problems)}; logs: {self.logs}*.log"
        return line

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "status": self.status}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Outcome:
        return cls(**{key: value for key, value in data.items() if key != "status"})
