"""The quantization report: per-layer errors, time and memory, as JSON, Markdown and a PNG chart."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class LayerRecord:
    name: str
    part: str  # vision | projector | language
    role: str
    scheme: str
    weight_error: float  # ||W - Ŵ|| / ||W||
    act_error: float | None = None  # ||Q(x) - x|| / ||x|| on the calibration activations
    output_error: float | None = None  # ||Q(x)Ŵ - xW|| / ||xW||
    act_scale: list[float] | None = None  # [text, visual] static scales
    outlier_ratio: float | None = None  # max/median channel |x| of the GEMM input
    outlier_ratio_before: float | None = None  # the same before a pre-quantization step (RMS) edited the layer
    online_hadamard: bool = False
    rms_split: bool = False
    observer: str | None = None  # the observer behind act_scale ("auto" resolves to the chosen one)
    observer_errors: dict[str, float] | None = None  # "auto": each candidate's validation output error (squared, relative)
    range_overflow: float | None = None  # share of validation-split input values int8 clamps at the static scale
    range_overflow_max: float | None = None  # largest |x| / (127 s) on the validation split (> 1: out of range)


@dataclass
class QuantReport:
    model: str
    recipe: dict[str, Any]
    calibration: dict[str, Any]
    layers: list[LayerRecord] = field(default_factory=list)
    seconds: float = 0.0
    peak_memory_bytes: int = 0
    transforms: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for part in ("vision", "projector", "language"):
            rows = [r for r in self.layers if r.part == part and r.output_error is not None]
            if rows:
                out[part] = {
                    "layers": len(rows),
                    "mean_output_error": sum(r.output_error for r in rows) / len(rows),
                    "max_output_error": max(r.output_error for r in rows),
                }
        return out

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["summary"] = self.summary()
        return data

    def to_markdown(self) -> str:
        lines = [
            f"# mquant report: {self.model}",
            "",
            f"- method: `{self.recipe.get('method')}`, vision {self.recipe['vision']}, language {self.recipe['language']}",
            f"- steps: {_steps_text(self.recipe.get('steps', []))}; weights: {self.recipe['weights']['method']}; observer: {self.recipe.get('observer')}",
            *[f"- skipped step {name}: {why}" for name, why in (self.transforms.get("skipped_steps") or {}).items()],
            f"- calibration: {self.calibration}",
            f"- time: {self.seconds:.1f} s; peak memory: {self.peak_memory_bytes / 2**20:.0f} MiB",
            "",
            "| part | layers | mean output error | max output error |",
            "|---|---|---|---|",
        ]
        for part, s in self.summary().items():
            lines.append(f"| {part} | {s['layers']} | {s['mean_output_error']:.4f} | {s['max_output_error']:.4f} |")
        lines += ["", "| layer | part | scheme | weight err | act err | output err | outlier ratio | hadamard | rms | observer | range overflow |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in self.layers:
            lines.append(
                f"| {r.name} | {r.part} | {r.scheme} | {r.weight_error:.4f} | {_fmt(r.act_error)} | {_fmt(r.output_error)} "
                f"| {_fmt(r.outlier_ratio, 1)} | {'y' if r.online_hadamard else ''} | {'y' if r.rms_split else ''} "
                f"| {r.observer or ''} | {_overflow(r)} |"
            )
        return "\n".join(lines) + "\n"

    def write(self, out_dir: Path) -> None:
        out_dir = Path(out_dir)
        (out_dir / "report.json").write_text(json.dumps(self.to_dict(), indent=2))
        (out_dir / "report.md").write_text(self.to_markdown() + "\n![per-layer error](report.png)\n")
        self.plot(out_dir / "report.png")

    def plot(self, path: Path) -> None:
        # lazy: matplotlib is only needed to draw the report chart
        import matplotlib

        matplotlib.use("Agg")
        # lazy: matplotlib is only needed to draw the report chart
        import matplotlib.pyplot as plt

        parts = [p for p in ("vision", "projector", "language") if any(r.part == p for r in self.layers)]
        fig, axes = plt.subplots(len(parts), 1, figsize=(10, 2.6 * max(len(parts), 1)), squeeze=False)
        for ax, part in zip(axes[:, 0], parts):
            rows = [r for r in self.layers if r.part == part]
            ax.plot([r.output_error or 0 for r in rows], "o-", label="output error", markersize=3)
            ax.plot([r.act_error or 0 for r in rows], "s-", label="activation error", markersize=3)
            ax.plot([r.weight_error for r in rows], "^-", label="weight error", markersize=3)
            ax.set_title(f"{part}: relative quantization error per layer (in execution order)")
            ax.set_yscale("log")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)


def _steps_text(steps: list[dict[str, Any]]) -> str:
    """`rotate(seed=42), msq`: each step with the options it was run with."""
    def one(step: dict[str, Any]) -> str:
        options = ", ".join(f"{k}={v}" for k, v in step.items() if k != "name")
        return f"{step['name']}({options})" if options else step["name"]

    return ", ".join(one(s) for s in steps) or "none"


def _overflow(r: LayerRecord) -> str:
    """Validation-split overflow: share of values clamped, and max |x| over the static range."""
    return "" if r.range_overflow is None else f"{100 * r.range_overflow:.3f}% (max {r.range_overflow_max:.2f}x)"


def _fmt(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"
