"""Which token of a tapped activation is which: a store's layout. Free of torch and timm,
like store.py, so that listing and describing stores starts at once."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class TokenLayout:
    """Where each token of a tapped activation comes from; stored in the store's attributes.

    Video runs every frame through the image backbone, so each frame has its own prefix
    tokens. The token axis is [the prefix tokens of frame 0, of frame 1, ...] followed by
    [the patches of frame 0 (row-major), of frame 1, ...]: prefix_tokens counts them all.
    """

    prefix_tokens: int  # class + distillation + register tokens in front of the patches, all frames
    class_token: bool  # per frame
    register_tokens: int  # per frame
    grid: tuple[int, int]  # patch grid (h, w)
    frames: int
    width: int  # embedding dimension D
    pool: str  # how the backbone pools for its head: "token" (class token) or "avg"

    @property
    def tokens(self) -> int:
        return self.prefix_tokens + self.frames * self.patches

    @property
    def patches(self) -> int:
        """Patch tokens per frame."""
        return self.grid[0] * self.grid[1]

    @property
    def frame_prefix(self) -> int:
        """Prefix tokens per frame."""
        return self.prefix_tokens // self.frames

    def with_frames(self, frames: int) -> "TokenLayout":
        """This (single-image) layout for clips of `frames` frames."""
        return replace(self, frames=frames, prefix_tokens=self.frame_prefix * frames)

    def to_dict(self) -> dict:
        return {**asdict(self), "grid": list(self.grid), "tokens": self.tokens}

    @classmethod
    def from_dict(cls, d: dict) -> "TokenLayout":
        d = {k: v for k, v in d.items() if k != "tokens"}
        return cls(**{**d, "grid": tuple(d["grid"])})
