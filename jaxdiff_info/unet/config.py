"""Hyper-parameters of the U-Net (`UNetConfig`) and the named configs (`CONFIGS`)."""

from __future__ import annotations

import dataclasses

# T of the DDPM linear schedule the networks are trained on; a preconditioned network
# (``UNetConfig.sigma_data``) reads alpha_bar_t from it.
TRAIN_STEPS = 1000


# --- Configuration -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of the U-Net.

    Attributes:
      ch: base channel width; the timestep embedding has width ``4 * ch``.
      ch_mult: channel multiplier per resolution level, from the input
        resolution downwards.
      num_res_blocks: residual blocks per level on the downsampling path (the
        upsampling path has one more).
      attn_resolutions: feature-map sizes at which self-attention follows
        each residual block.
      dropout: dropout rate inside the residual blocks (training only).
      num_classes: number of class labels; label ``num_classes`` is the null
        label.
      image_size: height and width of the (square) input.
      channels: number of image channels.
      num_groups: GroupNorm groups.
      sigma_data: None: the network's output is eps, as in Ho et al. A number: the output
        is preconditioned for data of this standard deviation per pixel,
        eps = c_skip(t) x_t + c_out(t) F(x_t, t, k) (``preconditioning``), so that the
        network learns the large-t part of the task (the image's colours, hence the
        class) as fast as the small-t part; the training loss is the same eps-MSE.
    """

    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    dropout: float
    num_classes: int
    image_size: int = 32
    channels: int = 3
    num_groups: int = 32
    sigma_data: float | None = None

    def __post_init__(self):
        # Normalise sequences to tuples so that configs are hashable.
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        object.__setattr__(
            self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions)
        )
        if self.image_size % 2 ** (len(self.ch_mult) - 1):
            raise ValueError(
                f"image_size {self.image_size} is not divisible by "
                f"2**{len(self.ch_mult) - 1}"
            )
        for width in {self.ch} | {self.ch * m for m in self.ch_mult}:
            if width % self.num_groups:
                raise ValueError(
                    f"channel width {width} is not divisible by "
                    f"num_groups={self.num_groups}"
                )

    @property
    def null_class(self) -> int:
        """Index of the null (unconditional) label."""
        return self.num_classes


CONFIGS: dict[str, UNetConfig] = {
    # Ho et al. (2020), CIFAR-10: 35.7M parameters without the class embedding.
    "ddpm": UNetConfig(
        ch=128,
        ch_mult=(1, 2, 2, 2),
        num_res_blocks=2,
        attn_resolutions=(16,),
        dropout=0.1,
        num_classes=10,
    ),
    # A small network of the same form for CPU demos and tests, preconditioned
    # (sigma_data) and without dropout so that it learns the classes of the shapes
    # dataset within minutes on two CPU cores.
    "tiny": UNetConfig(
        ch=16,
        ch_mult=(1, 2, 2),
        num_res_blocks=1,
        attn_resolutions=(8,),
        dropout=0.0,
        num_classes=10,
        num_groups=8,
        sigma_data=0.5,
    ),
}


def get_config(name: str) -> UNetConfig:
    """The named config of ``CONFIGS``."""
    try:
        return CONFIGS[name]
    except KeyError:
        raise ValueError(
            f"unknown model config {name!r}; choose one of: {', '.join(CONFIGS)}"
        ) from None
