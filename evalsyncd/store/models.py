"""The records of an evaluation store: runs, results, trajectories and their turns.

Each model is a dataclass with ``to_dict`` (the JSON shape on storage, keys in
the reference order) and ``from_dict`` (forgiving: unknown keys are ignored,
absent optional keys take the reference defaults). The shapes are those of
``tinker_cookbook.stores.eval_store`` (``tinker-cookbook`` 0.6.1); where each
one lives is drawn in :mod:`evalsyncd.store.layout`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

__all__ = ["BenchmarkResult", "RunMetadata", "StoredTrajectory", "StoredTurn", "TurnRole"]

TurnRole = Literal["user", "assistant", "environment", "grader"]
"""Roles of the turns of a stored trajectory."""


def _known_fields(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


@dataclass
class RunMetadata:
    """Metadata of one evaluation run (``runs/{run_id}/metadata.json``).

    Attributes:
        run_id: the run's directory name.
        model_name: the evaluated model.
        checkpoint_path: where the checkpoint lives, if any.
        checkpoint_name: the checkpoint's label, if any.
        benchmarks: benchmark names the run was created for.
        timestamp: creation time, ``datetime.isoformat()`` of local time.
        config: free-form run configuration.
        scores: benchmark name to score, filled in by ``finalize_run``.
    """

    run_id: str
    model_name: str
    checkpoint_path: str | None
    checkpoint_name: str | None
    benchmarks: list[str]
    timestamp: str
    config: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    evicted: bool = field(default=False, compare=False)
    """Set by ``list_runs`` of a local store: the run's files were evicted from the
    local disk and are read from the mirror (never part of ``metadata.json``)."""

    def to_dict(self) -> dict[str, Any]:
        """Serialize to a JSON-compatible dict, in field order (``evicted`` is left out)."""
        d = asdict(self)
        del d["evicted"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunMetadata:
        """Deserialize, ignoring unknown fields (forward compatibility) and ``evicted``.

        Raises:
            TypeError: a required field is missing.
        """
        known = _known_fields(cls, d)
        known.pop("evicted", None)
        return cls(**known)


@dataclass
class StoredTurn:
    """One turn of a stored trajectory.

    Attributes:
        role: ``"user"``, ``"assistant"``, ``"environment"`` or ``"grader"``.
        content: decoded text of the turn.
        token_count: number of tokens in the turn.
        metadata: arbitrary per-turn data.
    """

    role: TurnRole
    content: str
    token_count: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Serialize to a JSON-compatible dict, in field order."""
        return {
            "role": self.role,
            "content": self.content,
            "token_count": self.token_count,
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StoredTurn:
        """Deserialize; ``token_count`` and ``metadata`` default when absent.

        Raises:
            KeyError: ``role`` or ``content`` is missing.
        """
        return cls(
            role=d["role"],
            content=d["content"],
            token_count=d.get("token_count", 0),
            metadata=d.get("metadata", {}),
        )


@dataclass
class StoredTrajectory:
    """One evaluated example: a line of ``trajectories.jsonl``.

    Attributes:
        idx: index in the benchmark's example list.
        benchmark: benchmark name.
        example_id: stable identifier of the example across runs.
        turns: the conversation.
        reward: total reward.
        metrics: per-example metrics (e.g. ``{"correct": 1.0}``).
        logs: per-example diagnostic data.
        error: error message if the example failed, else ``None``.
        time_seconds: wall time of the example, in seconds.
    """

    idx: int
    benchmark: str
    example_id: str = ""
    turns: list[StoredTurn] = field(default_factory=list)
    reward: float = 0.0
    metrics: dict[str, float | int] = field(default_factory=dict)
    logs: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    time_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Serialize to a JSON-compatible dict with the reference key order."""
        return {
            "idx": self.idx,
            "benchmark": self.benchmark,
            "example_id": self.example_id,
            "turns": [t.to_dict() for t in self.turns],
            "reward": self.reward,
            "metrics": self.metrics,
            "logs": self.logs,
            "error": self.error,
            "time_seconds": self.time_seconds,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StoredTrajectory:
        """Deserialize, with the reference defaults; unknown keys are ignored.

        Raises:
            KeyError: ``idx`` or ``benchmark`` (or a turn's ``role``/``content``) is missing.
            AttributeError, TypeError: a value has the wrong shape.
        """
        return cls(
            idx=d["idx"],
            benchmark=d["benchmark"],
            example_id=d.get("example_id", ""),
            turns=[StoredTurn.from_dict(t) for t in d.get("turns", [])],
            reward=d.get("reward", 0.0),
            metrics=d.get("metrics", {}),
            logs=d.get("logs", {}),
            error=d.get("error"),
            time_seconds=d.get("time_seconds", 0.0),
        )


@dataclass
class BenchmarkResult:
    """Aggregated result of a benchmark (``runs/{run_id}/{name}/result.json``).

    ``num_examples = num_correct + num_wrong + num_truncated + num_errors``.

    Attributes:
        name: benchmark name.
        score: raw accuracy, ``num_correct / num_examples``.
        num_examples: examples evaluated.
        num_correct: examples graded correct.
        num_errors: examples that failed with an error.
        num_truncated: examples that hit the token or context limit.
        metrics: benchmark-specific metrics.
        time_seconds: wall time of the benchmark, in seconds.
        pass_at_k: k to pass@k estimate in [0, 1]; int keys here, string keys in JSON.
    """

    name: str
    score: float
    num_examples: int
    num_correct: int
    num_errors: int = 0
    num_truncated: int = 0
    metrics: dict[str, float | int] = field(default_factory=dict)
    time_seconds: float = 0.0
    pass_at_k: dict[int, float] = field(default_factory=dict)

    @property
    def num_completed(self) -> int:
        """Examples that completed: ``num_examples - num_errors - num_truncated``."""
        return self.num_examples - self.num_errors - self.num_truncated

    @property
    def score_completed(self) -> float:
        """Accuracy on completed examples, ``num_correct / num_completed`` (0.0 if none)."""
        return self.num_correct / self.num_completed if self.num_completed > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Serialize to the JSON shape of ``result.json`` (``pass_at_k`` keys as strings)."""
        d = asdict(self)
        if d.get("pass_at_k"):
            d["pass_at_k"] = {str(k): v for k, v in d["pass_at_k"].items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchmarkResult:
        """Deserialize, ignoring unknown fields; ``pass_at_k`` keys become ints.

        Raises:
            TypeError: a required field is missing.
            ValueError, AttributeError: ``pass_at_k`` is not a mapping of integer keys.
        """
        known = _known_fields(cls, d)
        if "pass_at_k" in known:
            known["pass_at_k"] = {int(k): v for k, v in known["pass_at_k"].items()}
        return cls(**known)
