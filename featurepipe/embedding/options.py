"""The settings of an embedding run, validated once, and the report it returns."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from featurepipe.decode import DecodePolicy
from featurepipe.exceptions import ConfigError
from featurepipe.records import SkippedFile

__all__ = ["COMPILE_CHOICES", "FEATURE_DTYPES", "ON_ERROR", "OTHER_ENTRIES", "EmbedOptions",
           "EmbedReport"]

FEATURE_DTYPES = ("float16", "float32")
ON_ERROR = ("skip", "raise")
OTHER_ENTRIES = ("keep", "error", "replace")
COMPILE_CHOICES = ("auto", "on", "off")


@dataclass(frozen=True)
class EmbedOptions:
    """How to embed (everything but what: source, store and backbone). Checked on creation.

    ``device`` and ``precision`` may be ``"auto"``; the engine resolves them once per run.
    See :func:`featurepipe.embed.embed` for every field's meaning.
    """

    batch_size: int = 64
    workers: int | None = None
    device: str = "auto"
    precision: str = "auto"
    compile: str = "auto"
    decoder: str = "pil"
    dtype: str = "float16"
    on_error: str = "skip"
    decode_policy: DecodePolicy = field(default_factory=DecodePolicy)
    content_hash: bool = False
    drop_missing: bool = True
    shard_size: int | None = None
    lock_timeout: float = 3600.0
    other_entries: str = "keep"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.decode_policy is None:  # callers pass None for "the default policy"
            object.__setattr__(self, "decode_policy", DecodePolicy())
        _positive_int("batch_size", self.batch_size)
        if self.workers is not None and (isinstance(self.workers, bool)
                                         or not isinstance(self.workers, int) or self.workers < 0):
            raise ConfigError(f"workers must be a non-negative integer; got {self.workers!r}")
        _one_of("dtype", self.dtype, FEATURE_DTYPES)
        if self.on_error not in ON_ERROR:
            raise ConfigError(f"on_error must be 'skip' or 'raise'; got {self.on_error!r}")
        _one_of("compile", self.compile, COMPILE_CHOICES)
        if self.other_entries not in OTHER_ENTRIES:
            raise ConfigError(f"other_entries must be keep, error or replace; got "
                              f"{self.other_entries!r}")
        if self.shard_size is not None:
            _positive_int("shard_size", self.shard_size)


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer; got {value!r}")


def _one_of(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


@dataclass
class EmbedReport:
    """What one `embed` call did; printed by the CLI, returned to Python callers.

    ``n_computed`` images were embedded by this call, ``n_reused`` rows copied from the
    committed entry, and ``n_resumed`` images taken from the shards an interrupted run left on
    disk (computed then, committed now). ``runner`` names the runner that computed them;
    ``layer`` the entry's layer (None = the pooled penultimate layer).
    """

    store: str
    key: str
    backbone: str
    n_total: int
    n_rows: int
    n_computed: int
    n_reused: int
    n_skipped: int
    n_dropped: int
    skipped: list[SkippedFile] = field(default_factory=list)
    seconds: float = 0.0
    images_per_second: float = 0.0
    device: str = "cpu"
    precision: str = "fp32"
    compiled: bool = False
    compile_seconds: float = 0.0
    n_resumed: int = 0
    runner: str = ""
    layer: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["skipped"] = [SkippedFile(*s).to_dict() for s in self.skipped]
        return d
