"""Named LALIC configurations (a small registry in the spirit of timm's model configs)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

LAMBDAS = (0.0018, 0.0035, 0.0067, 0.0130, 0.0250, 0.0483)
"""MSE rate-distortion trade-offs of the paper's six quality levels q1..q6."""

PARAM_WIDTH_ROUNDINGS = ("nearest", "floor")
"""How :class:`model.context.ParameterNet` rounds its linearly ramped inner widths: ``nearest`` (ours,
what ``lalic-s`` was trained with) or ``floor`` (CompressAI's ``sequential_channel_ramp``, which the
official LALIC code uses)."""


@dataclass(frozen=True)
class LalicConfig:
    """Every size of the network; see ``../shared/notes/lalic-architecture.md`` for the paper's."""

    name: str
    widths: tuple[int, ...] = (96, 144, 256)
    depths: tuple[int, ...] = (2, 4, 6)
    latent: int = 320
    hyper_width: int = 256
    hyper_depth: int = 6
    hyper_latent: int = 192
    slices: tuple[int, ...] = (16, 16, 32, 64, 192)
    ctx_width: int = 320
    ctx_depth: int = 2
    ctx_ratio: int = 8
    param_min_width: int = 256
    param_width_rounding: str = "nearest"
    """Rounding of the parameter networks' inner widths, one of :data:`PARAM_WIDTH_ROUNDINGS`. The
    official code (``models/lalic.py`` of sjtu-medialab/RwkvCompress) rounds down; weight files written
    before this field existed were built with ``nearest``, which is therefore the default."""
    variable_rate: bool = True
    lambdas: tuple[float, ...] = field(default=LAMBDAS)
    synthesis_depths: tuple[int, ...] | None = None
    """Bi-RWKV depths of g_s per stage, in g_a's order (highest resolution first); None mirrors
    ``depths``. A 0 leaves that stage of g_s to its transposed convolutions alone."""
    layer_scale_init: float = 1.0
    """Initial value of the Bi-RWKV layer scales (the paper's is 1). Smaller values start the network
    close to its convolutional path; it only matters for training from scratch."""

    def __post_init__(self) -> None:
        if sum(self.slices) != self.latent:
            raise ValueError(f"slices {self.slices} must sum to the latent width {self.latent}")
        if len(self.widths) != len(self.depths):
            raise ValueError("widths and depths must have the same length")
        if self.synthesis_depths is not None and len(self.synthesis_depths) != len(self.widths):
            raise ValueError("synthesis_depths must have one depth per stage")
        if self.param_width_rounding not in PARAM_WIDTH_ROUNDINGS:
            got = self.param_width_rounding
            raise ValueError(f"param_width_rounding must be one of {PARAM_WIDTH_ROUNDINGS}, got {got!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LalicConfig:
        d = dict(d)
        for key in ("widths", "depths", "slices", "lambdas", "synthesis_depths"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**d)


CONFIGS: dict[str, LalicConfig] = {
    # The paper's model (fixed rate: one lambda per weight file), with the official code's parameter
    # network widths, so that the official checkpoints load (model.official).
    "lalic": LalicConfig(name="lalic", variable_rate=False, param_width_rounding="floor"),
    # CPU-sized, variable-rate: what we train and ship.
    "lalic-s": LalicConfig(
        name="lalic-s",
        widths=(48, 72, 128),
        depths=(1, 1, 2),
        latent=160,
        hyper_width=128,
        hyper_depth=1,
        hyper_latent=96,
        slices=(16, 16, 32, 32, 64),
        ctx_width=96,
        ctx_depth=1,
        ctx_ratio=2,
        param_min_width=96,
        variable_rate=True,
        # no Bi-RWKV block in g_s at 1/2 resolution (g_a keeps its own): decode at 768x512 on our
        # 2-core AMD EPYC 396 -> 299 ms (346 -> 247 ms with 2 entropy threads); issue 2's bound is
        # 300 ms (BENCHMARKS.md)
        synthesis_depths=(0, 1, 2),
        # measured on 64x64 crops from scratch, 600 steps: layer scales at 0.1 reached a 10 % lower
        # loss (+2 dB at q6 on Kodak, at 17 % less rate) than at 1
        layer_scale_init=0.1,
    ),
}


def get_config(name: str, **overrides) -> LalicConfig:
    """The named configuration, optionally with fields replaced."""
    if name not in CONFIGS:
        raise KeyError(f"unknown config {name!r}; known: {sorted(CONFIGS)}")
    base = CONFIGS[name].to_dict()
    base.update(overrides)
    return LalicConfig.from_dict(base)
