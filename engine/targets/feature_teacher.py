"""A frozen feature teacher: any ViT that timm can build, run on the student's crop.

``FeatureTeacher`` wraps the teacher network and owns what is the same for every family:

* input: the student's ImageNet-normalized crop is re-normalized on the device to the teacher's
  own mean and std (one fused multiply-add), then resized (bicubic) to ``input_size``, the size that
  gives the teacher the student's patch grid (a /14 teacher under a 224-px /16 student runs at
  196 px; its position embedding was resampled to that grid when the weights were loaded);
* output: the tokens ``forward_features`` returns, with the prefix tokens (class, registers)
  dropped: [N, L, C], L the student's patch count. Where a model applies its final norm after
  pooling (EVA-02's MIM towers: ``norm`` is the identity and ``fc_norm`` the norm) that norm is
  applied to every token; the projection head (CLIP towers) on every token when asked.
"""

from __future__ import annotations

import torch
from torch import nn

from data_pipeline.loaders.base import IMAGENET_MEAN, IMAGENET_STD


class FeatureTeacher(nn.Module):
    def __init__(
        self,
        net: nn.Module,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        input_size: int,
        use_head: bool,
        num_prefix: int,
    ):
        super().__init__()
        self.vit = net
        self.input_size = input_size
        self.use_head = use_head
        self.num_prefix = num_prefix
        # the norm a pooling model applies after pooling, applied here to every token
        fc_norm = getattr(net, "fc_norm", None)
        self.post_norm = isinstance(getattr(net, "norm", None), nn.Identity) and not isinstance(
            fc_norm, (nn.Identity, type(None))
        )
        # ImageNet -> the teacher's normalization as one affine map on the device: x * scale + shift
        i_mean, i_std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        t_mean, t_std = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
        self.register_buffer("scale", (i_std / t_std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((i_mean - t_mean) / t_std).view(1, 3, 1, 1), persistent=False)
        self.mean, self.std = tuple(mean), tuple(std)

    @property
    def out_dim(self) -> int:
        if self.use_head:
            return int(self.vit.head.weight.shape[0])
        return int(getattr(self.vit, "num_features", 0) or self.vit.embed_dim)

    def renormalize(self, imgs: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalized -> the teacher's normalization, on the device: [N, 3, H, W] -> same."""
        return torch.addcmul(self.shift.to(imgs.dtype), imgs, self.scale.to(imgs.dtype))

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs: [N, 3, H, W] ImageNet-normalized (the student's crop, unmasked) -> [N, L, C]."""
        x = self.renormalize(imgs.to(self.scale.dtype))
        size = self.input_size
        if x.shape[-1] != size or x.shape[-2] != size:
            x = nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
        tokens = self.vit.forward_features(x)  # [N, prefix + L, width], the model's final norm applied
        if self.post_norm:
            tokens = self.vit.fc_norm(tokens)
        tokens = tokens[:, self.num_prefix :]
        return self.vit.head(tokens) if self.use_head else tokens
