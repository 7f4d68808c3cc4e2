"""Hardware presets are data (``hardware/*.json``); a measured profile is the same schema."""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field, fields
from pathlib import Path

from fxopt.errors import HardwareError

from .layout import NHWC_SPEEDUP

PRESET_DIR = Path(__file__).parent / "hardware"

# torch dtype name -> the key of the peak table it runs at
DTYPE_KEYS = {"float64": "fp64", "float32": "fp32", "bfloat16": "bf16", "float16": "fp16",
              "float8_e4m3fn": "fp8", "float8_e5m2": "fp8"}


@dataclass(frozen=True, eq=False)
class Hardware:
    """Peaks, efficiencies and launch cost of one device. All rates in FLOP/s and bytes/s."""

    name: str
    description: str
    memory_bandwidth: float
    tensor_flops: dict
    vector_flops: dict
    efficiency: dict = field(default_factory=dict)  # measured matrix/memory fractions (roofline plot only)
    sm_count: int = 0
    l2_bytes: int = 0
    memory_bytes: int = 0
    source: str = ""
    nhwc_speedup: dict = field(default_factory=dict)  # measured cells overriding layout.NHWC_SPEEDUP
    # shape-aware kernel-time parameters (``cost_models.kernels``): sections "matrix" (per regime),
    # "kind_eff", "memory", "host"; what a profile lacks falls back to the priors there
    kernel_model: dict = field(default_factory=dict)

    def profile_kind(self) -> str:
        """Where this profile's kernel-time parameters came from, in a few words for reports."""
        src = self.kernel_model.get("source", "")
        if src.startswith("fxopt calibrate"):
            return f"measured ({src})"
        if src.startswith("fitted to"):
            return f"imported ({src})"
        if src:
            return f"preset {self.name}, fitted to published measurements (see cost_models/hardware/{self.name}.json)"
        return f"preset {self.name}, priors only (cost_models/kernels.py)"

    def kernel_param(self, section: str) -> dict:
        """One section of the kernel-time parameters: this profile's values over the priors."""
        return _kernel_params(self)[section]

    def layout_table(self) -> dict:
        """NHWC speedups per conv class and precision: this device's measured cells over the priors."""
        return {cls: {**row, **self.nhwc_speedup.get(cls, {})} for cls, row in NHWC_SPEEDUP.items()}

    def matrix_peak(self, dtype_key: str) -> float:
        """Tensor-core peak for a GEMM/conv/attention in ``dtype_key`` (fp32 without TF32 uses
        the vector units)."""
        if dtype_key == "fp32":
            return self.vector_flops["fp32"]
        if dtype_key not in self.tensor_flops:
            raise HardwareError(f"{self.name} has no tensor-core peak for {dtype_key}; "
                                f"known: {sorted(self.tensor_flops)}")
        return self.tensor_flops[dtype_key]

    def vector_peak(self, dtype_key: str) -> float:
        return self.vector_flops.get(dtype_key, self.vector_flops["fp32"])

    @property
    def bf16_peak(self) -> float:
        """The reference peak for MFU (dense bf16 tensor-core FLOP/s), as the industry quotes it."""
        return self.tensor_flops["bf16"]

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@functools.lru_cache(maxsize=64)
def _kernel_params(hw: "Hardware") -> dict:
    from . import kernels as k
    mine = hw.kernel_model
    matrix = {r: {**k.DEFAULT_MATRIX[r], **mine.get("matrix", {}).get(r, {})} for r in k.REGIMES}
    memory = {**k.DEFAULT_MEMORY, **{a: b for a, b in mine.get("memory", {}).items() if a != "efficiency"}}
    memory["efficiency"] = {**k.DEFAULT_MEMORY["efficiency"], **mine.get("memory", {}).get("efficiency", {})}
    return {"matrix": matrix, "memory": memory, "kind_eff": {**k.DEFAULT_KIND_EFF, **mine.get("kind_eff", {})},
            "host": {**k.DEFAULT_HOST, **mine.get("host", {})}}


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def preset_path(spec: "str | Path", folder: Path, what: str, file_kind: str) -> Path:
    """A preset's file (a name without suffix, looked up in ``folder``) or the path given."""
    path = Path(spec)
    if path.suffix:
        return path
    path = folder / f"{str(spec).lower()}.json"
    if not path.exists():
        known = sorted(p.stem for p in folder.glob("*.json"))
        raise HardwareError(f"unknown {what} {spec!r}; known presets: {known}, or pass the path of a "
                            f"{file_kind} JSON")
    return path


#: the preset a cost uses when nothing names one (no GPU to take it from)
DEFAULT_PRESET = "h100"
#: ``torch.cuda.get_device_name()`` substring -> hardware preset
GPU_PRESETS = (("H200", "h200"), ("H100", "h100"), ("A100", "a100"))


def preset_for_gpu(name: str, default: str | None = DEFAULT_PRESET) -> str | None:
    """The preset of a GPU from its CUDA device name; ``default`` for a GPU without one."""
    return next((preset for key, preset in GPU_PRESETS if key in name), default)


def load_hardware(spec: "str | Path | Hardware | None" = DEFAULT_PRESET) -> Hardware:
    """A preset name (``h100``, ``h200``, ``a100``), a path to a profile JSON, or a Hardware."""
    if isinstance(spec, Hardware):
        return spec
    path = preset_path(DEFAULT_PRESET if spec is None else spec, PRESET_DIR, "hardware preset", "profile")
    try:
        stat = path.stat()
        return _load_path(str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    except OSError as exc:
        raise HardwareError(f"cannot read hardware profile {path}: {exc}") from exc


@functools.lru_cache(maxsize=32)
def _load_path(path: str, mtime_ns: int, size: int) -> Hardware:
    """Profiles are read once per file version: every pass of a pipeline gets the same object."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise HardwareError(f"cannot read hardware profile {path}: {exc}") from exc
    known = {f.name for f in fields(Hardware)}
    missing = {"name", "memory_bandwidth", "tensor_flops", "vector_flops"} - set(data)
    if missing:
        raise HardwareError(f"hardware profile {path} lacks {sorted(missing)}; see "
                            f"{PRESET_DIR / 'h100.json'} for the schema")
    return Hardware(**{"description": "", **{k: v for k, v in data.items() if k in known}})
