"""The ``updates`` section of the agent config: where updates come from and how they are judged.

A minimal section::

    updates:
      server_url: https://fleet.example.com
      image_root_file: /var/lib/edge-agent/trust/image-root.json
      director_root_file: /var/lib/edge-agent/trust/director-root.json
      ca_file: /var/lib/edge-agent/trust/ca.cert.pem

Every other field has a default suited to a device in the field (poll every 5 minutes,
10 minutes of probation). Unknown keys are refused (``extra="forbid"``).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class UpdateConfig(BaseModel):
    """How the agent finds, downloads, validates and judges model updates."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: The fleet server: TUF metadata under ``{server_url}/tuf/``.
    server_url: str
    #: The trust anchors given at enrolment: the image repository's and the director's root.
    image_root_file: Path
    director_root_file: Path
    #: Where artifacts are downloaded from: ``{artifact_base_url}{dir}/{sha256}.{file}`` (the
    #: TUF consistent-targets layout). Default: ``{server_url}/tuf/image/targets/``.
    artifact_base_url: str | None = None
    #: TLS: the CA that signed the server's certificate (default: the system's CAs), and the
    #: device's client certificate and key when the server asks for one (mTLS).
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    #: Seconds between two polls of the server, spread by +/- ``poll_jitter`` (a fraction),
    #: so a fleet that booted together does not poll together.
    poll_interval_s: float = Field(300.0, ge=1.0, le=7 * 86_400)
    poll_jitter: float = Field(0.2, ge=0.0, lt=1.0)
    #: A ``desired`` hint wakes the updater at most this often (hints are untrusted).
    min_check_interval_s: float = Field(5.0, ge=0.0, le=3600)
    #: HTTP timeout (connect, and between two reads) in seconds.
    http_timeout_s: float = Field(30.0, gt=0, le=600)
    #: Downloads are capped at this rate (``None``: no cap).
    bandwidth_limit_bytes_per_s: int | None = Field(None, ge=1024)
    #: What must stay free on the state dir's disk after the artifact is stored.
    min_free_disk_bytes: int = Field(256 * 2**20, ge=0)
    #: Attempts of one download (each resumes where the last stopped) before it fails.
    max_attempts: int = Field(5, ge=1, le=100)
    #: Seconds before the second attempt; doubled for each further one, up to 60 s.
    retry_backoff_s: float = Field(1.0, ge=0.0, le=60)
    #: An update resumed after this many restarts of the agent fails (``crash_loop``).
    max_resumes: int = Field(3, ge=0, le=100)
    #: Timed runs of the candidate against its latency budget during validation.
    latency_runs: int = Field(20, ge=1, le=10_000)
    #: How long a new model is watched after the swap before it is committed.
    probation_s: float = Field(600.0, ge=0.0, le=7 * 86_400)
    #: How often the probation compares the new model against the old one.
    probation_check_s: float = Field(1.0, gt=0.0, le=600)
    #: Requests the new model must have answered before the probation judges it (and the
    #: old model's baseline before its latency is compared).
    probation_min_requests: int = Field(20, ge=1)
    #: Breach: the new model's error rate exceeds the old one's by more than this (0..1).
    max_error_rate_increase: float = Field(0.05, ge=0.0, le=1.0)
    #: Breach: the new model's latency p95 exceeds this multiple of the old one's.
    max_latency_ratio: float = Field(2.0, ge=1.0)
    #: ...and only when it is also this many ms slower (noise floor for fast models).
    min_latency_regression_ms: float = Field(2.0, ge=0.0)
    #: Old versions of each model kept on disk for rollback (the serving one not counted).
    keep_versions: int = Field(2, ge=1, le=100)

    @field_validator("server_url", "artifact_base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @model_validator(mode="after")
    def _cert_and_key(self) -> UpdateConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self

    @property
    def artifacts_url(self) -> str:
        """The base URL of artifacts, ending with ``/``."""
        base = self.artifact_base_url or f"{self.server_url.rstrip('/')}/tuf/image/targets/"
        return base if base.endswith("/") else base + "/"
