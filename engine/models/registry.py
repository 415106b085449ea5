"""Registry of named encoder variants, tiny test variants included.

A variant fixes the encoder shape and its default taps; the decoders and targets come from the
config. Names are looked up in this explicit table, never through ``module.__dict__``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.errors import ConfigError


@dataclass(frozen=True)
class VariantSpec:
    name: str
    img_size: int
    patch_size: int
    dim: int
    depth: int
    heads: int
    default_taps: tuple[int, ...]
    # timm model that shares this encoder's state-dict layout, and the kwargs that reshape it
    # (tiny variants have no registered timm twin, so they override a small one).
    timm_name: str
    timm_kwargs: dict = field(default_factory=dict)
    mlp_ratio: float = 4.0


def relative_taps(depth: int) -> tuple[int, ...]:
    """Taps at 1/2, 2/3 and 5/6 of the depth plus the final block (ViT-B: 6, 8, 10, 12)."""
    taps = sorted({round(depth / 2), round(depth * 2 / 3), round(depth * 5 / 6)} - {depth})
    return (*[t for t in taps if t >= 1], depth)


_VARIANTS: dict[str, VariantSpec] = {}


def register(spec: VariantSpec) -> VariantSpec:
    if spec.name in _VARIANTS:
        raise ValueError(f"variant {spec.name} registered twice")
    _VARIANTS[spec.name] = spec
    return spec


register(VariantSpec("deepmim_vit_base_patch16", 224, 16, 768, 12, 12, (6, 8, 10, 12), "vit_base_patch16_224"))
register(VariantSpec("deepmim_vit_large_patch16", 224, 16, 1024, 24, 16, relative_taps(24), "vit_large_patch16_224"))
register(VariantSpec("deepmim_vit_huge_patch14", 224, 14, 1280, 32, 16, relative_taps(32), "vit_huge_patch14_224"))
# CPU-sized variants: the quickstart trains the tiny one; unit tests use the test one.
register(
    VariantSpec(
        "deepmim_vit_tiny_patch8",
        64,
        8,
        96,
        6,
        3,
        relative_taps(6),
        "vit_tiny_patch16_224",
        dict(img_size=64, patch_size=8, embed_dim=96, depth=6, num_heads=3),
    )
)
register(
    VariantSpec(
        "deepmim_vit_test_patch4",
        16,
        4,
        32,
        4,
        2,
        relative_taps(4),
        "vit_tiny_patch16_224",
        dict(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2),
    )
)


def get_variant(name: str) -> VariantSpec:
    if name not in _VARIANTS:
        raise ConfigError(f"model.arch={name!r}: unknown variant; registered: {sorted(_VARIANTS)}")
    return _VARIANTS[name]


def list_variants() -> list[str]:
    return sorted(_VARIANTS)
