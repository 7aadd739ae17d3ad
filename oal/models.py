"""Student and teacher factories. Every network's forward returns `(logits, features)`.

`features` is the penultimate representation (after global pooling), the one that k-NN sampling,
the MICL terms, feature KD and feature-space OOD scores use. `net.feature_dim` gives its width.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from oal.config import TeacherConfig


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.short(x))


class ResNet(nn.Module):
    """ResNet with BasicBlocks. stem='cifar': 3x3 conv, no max-pool (the 32x32 form used by OpenOOD);
    stem='imagenet': 7x7/2 conv + 3x3/2 max-pool (the 224x224 form, torchvision's resnet18)."""

    def __init__(self, num_classes: int, widths: tuple[int, ...] = (64, 128, 256, 512),
                 blocks: tuple[int, ...] = (2, 2, 2, 2), stem: str = "cifar"):
        super().__init__()
        if stem == "cifar":
            self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                      nn.ReLU())
        else:
            self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 7, 2, 3, bias=False), nn.BatchNorm2d(widths[0]),
                                      nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        layers, cin = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                layers.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.feature_dim = widths[-1]
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.layers(self.stem(x))  # (B, C, h, w)
        feat = torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)  # (B, C)
        return self.fc(feat), feat


class TimmClassifier(nn.Module):
    """A timm model exposing `(logits, pre-logits features)`. With `input_size`, any other input side is resized
    to it first (bilinear): the reference teacher sees 224x224 whatever size the student trains at."""

    def __init__(self, model: Any, input_size: int | None = None):
        super().__init__()
        self.model = model  # a timm model: forward_features / forward_head / get_classifier
        self.feature_dim = int(model.num_features)
        self.input_size = input_size

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.input_size
        if s is not None and tuple(x.shape[-2:]) != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)  # (B, 3, s, s)
        h = self.model.forward_features(x)
        feat = self.model.forward_head(h, pre_logits=True)  # (B, D)
        return self.model.get_classifier()(feat), feat


Classifier = ResNet | TimmClassifier  # forward -> (logits, features); .feature_dim


def _vit(arch: str, num_classes: int, image_size: int, **kw) -> Callable[[str | None], Classifier]:
    def make(pretrained: str | None) -> Classifier:
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes, img_size=image_size, **kw)
        if pretrained:
            load_backbone(model, pretrained)
        return TimmClassifier(model, input_size=image_size)
    return make


def load_backbone(model: Any, path: str) -> None:
    """Load a local backbone file, skipping the classifier head (its class count differs)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"teacher weights '{p}' (teacher.pretrained) do not exist")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(p))
    else:
        state = torch.load(p, map_location="cpu", weights_only=True)
        state = state.get("model", state.get("state_dict", state))
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    if "pos_embed" in state and state["pos_embed"].shape != model.pos_embed.shape:
        from timm.layers import resample_abs_pos_embed
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], model.patch_embed.grid_size,
                                                    num_prefix_tokens=1)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ValueError(f"teacher weights '{p}' do not fit the model: {str(e).splitlines()[-1].strip()}") from None
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise ValueError(f"teacher weights '{p}' do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")


class LogitsOnly(nn.Module):
    """Wraps a classifier so that forward returns logits alone (for serving, e.g. an MLflow model)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[0]


def build_student(name: str, num_classes: int) -> Classifier:
    students: dict[str, Callable[[], Classifier]] = {
        "resnet18_32": lambda: ResNet(num_classes, stem="cifar"),
        "resnet18_224": lambda: ResNet(num_classes, stem="imagenet"),
        "resnet_tiny": lambda: ResNet(num_classes, widths=(16, 32, 64), blocks=(1, 1, 1), stem="cifar"),
    }
    if name not in students:
        raise ValueError(f"unknown student '{name}' (model.student); registered: {', '.join(students)}")
    return students[name]()


STUDENTS = ("resnet18_32", "resnet18_224", "resnet_tiny")
TEACHERS = ("vit_b16", "vit_tiny", "resnet_tiny")


def classifier_head(net: nn.Module) -> nn.Module:
    """The final linear layer (its own learning rate in the reference teacher recipe)."""
    if isinstance(net, TimmClassifier):
        return net.model.get_classifier()
    return net.fc  # type: ignore[return-value]


def build_teacher(cfg: TeacherConfig, num_classes: int, image_size: int) -> Classifier:
    """The teacher, built for its own input side (`teacher.image_size`, else the student's `image_size`)."""
    image_size = cfg.image_size or image_size
    teachers: dict[str, Callable[[str | None], Classifier]] = {
        # ViT-B/16 (768-d features); pretrained IN-21k weights come from teacher.pretrained.
        "vit_b16": _vit("vit_base_patch16_224", num_classes, image_size),
        # A 2-block, 64-wide ViT with 8x8 patches: trains in seconds on CPU for the embedded default.
        "vit_tiny": _vit("vit_tiny_patch16_224", num_classes, image_size, patch_size=8, embed_dim=64, depth=2,
                         num_heads=2),
    }
    if cfg.network == "resnet_tiny":
        return build_student("resnet_tiny", num_classes)
    if cfg.network not in teachers:
        raise ValueError(f"unknown teacher '{cfg.network}' (teacher.network); registered: {', '.join(TEACHERS)}")
    return teachers[cfg.network](cfg.pretrained)
