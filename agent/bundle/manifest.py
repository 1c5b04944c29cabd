"""The bundle manifest (``model.yaml``): schema, parsing, and one-line error messages."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    ValidationError,
    field_validator,
    model_validator,
)

from agent.bundle.semver import SemVer
from agent.errors import BundleError, ModelLoadError
from agent.processing.config import (
    ClassificationPostprocessing,
    PostprocessingConfig,
    PreprocessingConfig,
)
from agent.runtimes import TensorSpec, format_for_path, formats

MANIFEST_NAME = "model.yaml"
#: Largest manifest read (bytes): a manifest is a page of YAML, not a data file.
MAX_MANIFEST_BYTES = 1 << 20
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
TensorDtype = Literal[
    "bool", "uint8", "int8", "uint16", "int16", "int32", "int64", "float16", "float32", "float64"
]


def _check_name(value: str) -> str:
    if not NAME_RE.match(value):
        raise ValueError(f"{value!r} must be 1-64 characters of A-Z a-z 0-9 _ . -")
    return value


def _check_semver(value: str) -> str:
    SemVer(value)
    return value


def _check_file_name(value: str) -> str:
    if not value or "/" in value or "\\" in value or "\0" in value or value in (".", ".."):
        raise ValueError(f"{value!r} must be a plain file name inside the bundle (no path)")
    return value


def _check_bundle_path(value: str) -> str:
    parts = value.split("/")
    if (
        value.startswith("/")
        or "\\" in value
        or "\0" in value
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise ValueError(f"{value!r} must be a relative path inside the bundle (no '..')")
    return value


Name = Annotated[str, AfterValidator(_check_name)]
Version = Annotated[str, AfterValidator(_check_semver)]
FileName = Annotated[str, AfterValidator(_check_file_name)]
BundlePath = Annotated[str, AfterValidator(_check_bundle_path)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorDecl(_Strict):
    """A model input or output as the bundle declares it; ``null`` dims are dynamic."""

    name: str = Field(min_length=1)
    shape: list[Annotated[int, Field(ge=1)] | None] | None = None
    dtype: TensorDtype | None = None


class GoldenVector(_Strict):
    """One known input and the outputs the model must give for it."""

    name: str | None = None
    #: input name -> ``.npy`` file inside the bundle (exactly one of inputs / image).
    inputs: dict[str, BundlePath] | None = None
    #: an image file inside the bundle, run through the bundle's preprocessing.
    image: BundlePath | None = None
    #: output name -> ``.npy`` file with the expected values.
    outputs: dict[str, BundlePath] = Field(default_factory=dict)
    rtol: float = Field(1e-3, ge=0)
    atol: float = Field(1e-5, ge=0)
    #: the label the classification postprocessing must rank first.
    top_label: str | None = None

    @model_validator(mode="after")
    def _one_source_something_to_check(self) -> GoldenVector:
        if (self.inputs is None) == (self.image is None):
            raise ValueError("give exactly one of 'inputs' and 'image'")
        if self.inputs is not None and not self.inputs:
            raise ValueError("'inputs' must name at least one input")
        if not self.outputs and self.top_label is None:
            raise ValueError("give 'outputs' or 'top_label' (something to check)")
        return self


class Manifest(_Strict):
    """A bundle's ``model.yaml``. See ``docs/bundles.md`` for every field."""

    name: Name
    version: Version
    format: str
    model: FileName
    description: str = ""
    inputs: list[TensorDecl] | None = None
    outputs: list[TensorDecl] | None = None
    preprocessing: PreprocessingConfig | None = None
    postprocessing: PostprocessingConfig | None = None
    golden: list[GoldenVector] = Field(default_factory=list)
    #: profile name (or ``default``) -> latency budget in milliseconds.
    latency_budget_ms: dict[Name, PositiveFloat] = Field(default_factory=dict)
    #: profiles this bundle may run on; empty means every profile.
    compatible_profiles: list[Name] = Field(default_factory=list)
    min_agent_version: Version | None = None

    @field_validator("format")
    @classmethod
    def _known_format(cls, v: str) -> str:
        if v not in formats():
            raise ValueError(f"unknown format {v!r} (known: {', '.join(formats())})")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        try:
            suffix_format = format_for_path(Path(self.model))
        except ModelLoadError as exc:
            raise ValueError(f"model: {exc.message}") from None
        if suffix_format != self.format:
            raise ValueError(f"model: {self.model!r} is not a {self.format} file name")
        input_names = _unique_names(self.inputs, "inputs")
        output_names = _unique_names(self.outputs, "outputs")
        if self.preprocessing is not None:
            _check_ref("preprocessing.input", self.preprocessing.input, input_names)
        if self.postprocessing is not None and self.postprocessing.kind != "raw":
            _check_ref("postprocessing.output", self.postprocessing.output, output_names)
        for i, vector in enumerate(self.golden):
            self._check_golden(f"golden[{i}]", vector, input_names, output_names)
        names = [v.name for v in self.golden if v.name is not None]
        if len(names) != len(set(names)):
            raise ValueError("golden: vector names must be unique")
        if len(self.compatible_profiles) != len(set(self.compatible_profiles)):
            raise ValueError("compatible_profiles: a profile is listed twice")
        return self

    def _check_golden(
        self, where: str, v: GoldenVector, inputs: set[str] | None, outputs: set[str] | None
    ) -> None:
        if v.image is not None and self.preprocessing is None:
            raise ValueError(f"{where}: an 'image' vector needs a preprocessing section")
        if v.top_label is not None:
            post = self.postprocessing
            if not isinstance(post, ClassificationPostprocessing) or post.labels is None:
                raise ValueError(f"{where}: 'top_label' needs classification with labels")
        for key, declared, what in ((v.inputs, inputs, "input"), (v.outputs, outputs, "output")):
            for name in key or {}:
                if declared is not None and name not in declared:
                    raise ValueError(f"{where}: no declared {what} {name!r}")

    def golden_name(self, index: int) -> str:
        """The name of golden vector ``index`` (its own, or ``golden[index]``)."""
        return self.golden[index].name or f"golden[{index}]"

    def check_tensors(self, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> None:
        """Check the declared inputs/outputs against what the runtime reports.

        A declared ``null`` dim matches anything; a runtime's dynamic dim matches any
        declared size. Undeclared sections are not checked.

        Raises:
            BundleError: a declared tensor is missing or differs in shape or dtype.
        """
        for declared, actual, what in (
            (self.inputs, inputs, "input"),
            (self.outputs, outputs, "output"),
        ):
            if declared is None:
                continue
            by_name = {t.name: t for t in actual}
            for decl in declared:
                _check_tensor(decl, by_name.get(decl.name), what)


def _check_tensor(decl: TensorDecl, spec: TensorSpec | None, what: str) -> None:
    if spec is None:
        raise BundleError(f"model.yaml declares {what} {decl.name!r}, which the model lacks")
    if decl.dtype is not None and decl.dtype != spec.dtype:
        raise BundleError(
            f"{what} {decl.name!r}: model.yaml says {decl.dtype}, the model has {spec.dtype}"
        )
    if decl.shape is not None:
        same = len(decl.shape) == len(spec.shape) and all(
            d is None or s is None or d == s for d, s in zip(decl.shape, spec.shape, strict=True)
        )
        if not same:
            raise BundleError(
                f"{what} {decl.name!r}: model.yaml says shape {decl.shape}, "
                f"the model has {list(spec.shape)}"
            )


def _unique_names(decls: list[TensorDecl] | None, where: str) -> set[str] | None:
    if decls is None:
        return None
    names = [d.name for d in decls]
    if len(names) != len(set(names)):
        raise ValueError(f"{where}: a tensor name is declared twice")
    return set(names)


def _check_ref(where: str, name: str | None, declared: set[str] | None) -> None:
    if declared is None:
        return
    if name is None and len(declared) > 1:
        raise ValueError(f"{where}: required when the model declares several")
    if name is not None and name not in declared:
        raise ValueError(f"{where}: {name!r} is not declared")


# --- parsing -------------------------------------------------------------------------


def parse_manifest(text: str, source: str = MANIFEST_NAME) -> Manifest:
    """Parse and validate manifest YAML.

    Raises:
        BundleError: the YAML does not parse, or a field is missing or invalid (the
            message names the field).
    """
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise BundleError(f"{source}: not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise BundleError(f"{source}: must be a YAML mapping of fields")
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        raise BundleError(f"{source}: {describe_validation_error(exc)}") from None


def load_manifest(path: Path) -> Manifest:
    """Read and validate the manifest file at ``path``.

    Raises:
        BundleError: the file is missing, too large, not UTF-8, or invalid.
    """
    try:
        size = path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise BundleError(f"{path.name}: {size} bytes, over the {MAX_MANIFEST_BYTES} limit")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BundleError(f"no {path.name} in the bundle") from None
    except UnicodeDecodeError:
        raise BundleError(f"{path.name}: not UTF-8 text") from None
    except OSError as exc:
        raise BundleError(f"{path.name}: cannot read ({exc.strerror})") from None
    return parse_manifest(text, path.name)


#: Parts of a pydantic error location that name a union member, not a field.
_UNION_PARTS = {"str", "int", "float", "bool", "list[str]", "function-after[_check_name(), str]"}
_KIND_PARENTS = {"preprocessing", "postprocessing"}
_KIND_NAMES = {"image", "classification", "detection", "raw"}


def describe_validation_error(exc: ValidationError, limit: int = 3) -> str:
    """One line naming each failing field: ``version: '1.2' is not a semantic version``."""
    seen: dict[str, str] = {}
    for err in exc.errors():
        path = _field_path(err["loc"])
        if path not in seen:
            seen[path] = _error_text(err)
    items = [f"{path}: {msg}" if path else msg for path, msg in seen.items()]
    more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
    return "; ".join(items[:limit]) + more


def _field_path(loc: tuple[int | str, ...]) -> str:
    text = ""
    previous: int | str | None = None
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif (
            part not in _UNION_PARTS
            and not part.startswith("function-")
            and not (previous in _KIND_PARENTS and part in _KIND_NAMES)
        ):
            text += f".{part}" if text else part
        previous = part
    return text


def _error_text(err: Any) -> str:
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "string_type" and isinstance(err.get("input"), int | float):
        return f"expected a string, got {err['input']!r} (quote it in YAML)"
    if err["type"] == "missing":
        return "required field is missing"
    if err["type"] == "extra_forbidden":
        return "unknown field"
    return msg
