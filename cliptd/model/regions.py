"""The student's own region features: a CNN trunk, RoIAlign over the boxes, box geometry."""

from __future__ import annotations

import torch
import torch.nn as nn
import torchvision
from torchvision.ops import roi_align

from cliptd.model.config import StudentConfig


def box_geometry(boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Boxes N×R×4 in pixels of a size×size image → N×R×5: corners in [0, 1] and area."""
    b = boxes / size
    return torch.cat([b, ((b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1]))[..., None]], -1)


class RegionEncoder(nn.Module):
    """Region features: a CNN trunk, RoIAlign over the boxes, a head, plus box geometry.

    The tiny trunk stops at stride 2 and RoIAlign samples 7×7 cells, so a 12 px object still
    spans several cells (a stride-4 trunk with a 3×3 RoI could not tell shapes apart in the
    feasibility study).
    """

    def __init__(self, cfg: StudentConfig):
        super().__init__()
        self.roi_size = cfg.roi_size
        if cfg.backbone == "tiny":
            def block(i, o, s):
                return [nn.Conv2d(i, o, 3, s, 1), nn.GroupNorm(8, o), nn.ReLU(inplace=True)]
            self.trunk = nn.Sequential(*block(3, 32, 2), *block(32, 64, 1))
            self.scale, trunk_out = 0.5, 64
            self.head = nn.Sequential(*block(64, 128, 1), *block(128, 128, 2),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
            head_out = 128
        elif cfg.backbone in ("resnet18", "resnet50"):
            net = getattr(torchvision.models, cfg.backbone)(weights=None)
            if cfg.backbone_weights:
                net.load_state_dict(torch.load(cfg.backbone_weights, map_location="cpu",
                                               weights_only=True))
            self.trunk = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1,
                                       net.layer2, net.layer3)
            self.scale, trunk_out = 1 / 16, net.layer3[-1].conv1.in_channels
            self.head = nn.Sequential(net.layer4, nn.AdaptiveAvgPool2d(1), nn.Flatten())
            head_out = net.fc.in_features
            del trunk_out
        else:
            raise ValueError(f"unknown backbone {cfg.backbone!r} (tiny, resnet18, resnet50, "
                             "clip)")
        self.proj = nn.Linear(head_out, cfg.region_dim)
        self.geometry = nn.Linear(5, cfg.region_dim)
        self.norm = nn.LayerNorm(cfg.region_dim)

    def forward(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """images N×3×S×S (normalized), boxes N×R×4 in pixels of the S×S image → N×R×H."""
        n, r, _ = boxes.shape
        feats = self.trunk(images)
        rois = torch.cat([torch.arange(n, device=boxes.device, dtype=boxes.dtype)
                          .repeat_interleave(r)[:, None], boxes.reshape(-1, 4)], dim=1)
        pooled = roi_align(feats, rois, self.roi_size, spatial_scale=self.scale,
                           sampling_ratio=2, aligned=True)
        x = self.proj(self.head(pooled)).view(n, r, -1)
        return self.norm(x + self.geometry(box_geometry(boxes, images.shape[-1])))
