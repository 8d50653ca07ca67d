"""Model builders, kept in a plain dict: build(spec, channels, size, classes) adapts each to the dataset.

- seed_large / seed_small: the seed document's LargeModel and SmallModel, layer for layer, with the minimal fixes
  that let them run (see `SeedLarge`, `SeedSmall`); the baseline of bench/bench.py. Width and depth do not apply.

Every model names its stages (`model.stages`: module names whose outputs are its feature maps, shallow to deep,
the last one the map its head pools): feature distillation hooks them (kdprune/distill.py).
- resnet: a residual CNN for small images, sized by `width` (first-stage channels) and `depth` (blocks per stage).
- fastnet: an airbench-style VGG-like net (conv, pool, BN, GELU), built for fast GPU training on 32x32 images.
- airbench: fastnet with airbench's initialisation and normalisation: a frozen 2x2 patch-whitening first layer,
  identity (dirac) initialised convs, batch norms with a fixed unit scale, logits scaled by 1/9.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn


def _pool_plan(size: int, pools: int) -> tuple[list[bool], int]:
    """Which of `pools` 2x2 max-pools fit an image of `size` (each halves the side while it is >= 2); the side left."""
    plan = []
    for _ in range(pools):
        plan.append(size >= 2)
        size = size // 2 if size >= 2 else size
    return plan, size


class SeedLarge(nn.Module):
    """The seed's LargeModel, layer for layer: conv 3->64->128->256->512->1024 (3x3, padding 1, ReLU), a 2x2 max-pool
    after each of the first four, then fc 1024->1024->512->classes (ReLU between). 7.85 M parameters at 3x32x32.

    Minimal fixes, each needed for the printed code to run: `torch.nn.functional` is imported; the seed's
    `avg_pool2d(8, 8)` cannot run on the 2x2 map that four pools leave of a 32x32 image, so a global average pool
    stands in (fc1's 1024 inputs are conv5's 1024 channels, the evident intent); pools that no longer fit a small
    image are skipped; the input channels and class count come from the data. `dropout` (default 0, which the
    seed has) applies before the last layer.
    """

    def __init__(self, channels: int, size: int, classes: int, dropout: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 64, 3, padding=1)
        self.conv2 = nn.Conv2d(64, 128, 3, padding=1)
        self.conv3 = nn.Conv2d(128, 256, 3, padding=1)
        self.conv4 = nn.Conv2d(256, 512, 3, padding=1)
        self.conv5 = nn.Conv2d(512, 1024, 3, padding=1)
        self.fc1 = nn.Linear(1024, 1024)
        self.fc2 = nn.Linear(1024, 512)
        self.fc3 = nn.Linear(512, classes)
        self.dropout = nn.Dropout(dropout)
        self.pools, _ = _pool_plan(size, 4)
        self.stages = ("conv1", "conv2", "conv3", "conv4", "conv5")  # feature maps for feature distillation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, pool in zip((self.conv1, self.conv2, self.conv3, self.conv4), self.pools):
            x = F.relu(conv(x))
            if pool:
                x = F.max_pool2d(x, 2, 2)
        x = F.relu(self.conv5(x))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)  # seed: avg_pool2d(8, 8), which a 2x2 map cannot take
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(self.dropout(x))


class SeedSmall(nn.Module):
    """The seed's SmallModel, layer for layer: conv 3->32->64->128 (3x3, padding 1, ReLU), a 2x2 max-pool after each
    of the first two, then fc 128->128->classes. 111 k parameters at 3x32x32.

    Minimal fixes: `torch.nn.functional` is imported; the seed flattens conv3's 128x8x8 map straight into fc1,
    which takes 128 inputs, so a global average pool comes first (the layer widths' evident intent); pools that do
    not fit a small image are skipped; channels and classes come from the data; `dropout` (default 0) applies
    before the last layer.
    """

    def __init__(self, channels: int, size: int, classes: int, dropout: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1)
        self.fc1 = nn.Linear(128, 128)
        self.fc2 = nn.Linear(128, classes)
        self.dropout = nn.Dropout(dropout)
        self.pools, _ = _pool_plan(size, 2)
        self.stages = ("conv1", "conv2", "conv3")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, pool in zip((self.conv1, self.conv2), self.pools):
            x = F.relu(conv(x))
            if pool:
                x = F.max_pool2d(x, 2, 2)
        x = F.relu(self.conv3(x))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)  # seed: flatten(128x8x8) into a 128-input layer, which fails
        return self.fc2(self.dropout(F.relu(self.fc1(x))))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """Three stages of basic blocks (widths w, 2w, 4w), stride 2 between stages while the image allows."""

    def __init__(self, channels: int, size: int, classes: int, width: int, depth: int, dropout: float):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        blocks, cin, side = [], width, size
        for stage, mult in enumerate((1, 2, 4)):
            stride = 2 if stage > 0 and side >= 4 else 1
            side //= stride
            for i in range(depth):
                blocks.append(BasicBlock(cin, width * mult, stride if i == 0 else 1))
                cin = width * mult
        self.blocks = nn.Sequential(*blocks)
        self.stages = ("stem", *(f"blocks.{(stage + 1) * depth - 1}" for stage in range(3)))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(cin, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def _conv_bn(cin: int, cout: int, norm: type[nn.Module] = nn.BatchNorm2d) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), norm(cout), nn.GELU()]


class ShiftNorm(nn.BatchNorm2d):
    """Batch norm whose scale is fixed at 1: only the shift (bias) learns (airbench; BN momentum 0.4, eps 1e-12).

    The scale stays a parameter of ones, detached (no gradient, even after pruning re-creates it as trainable),
    so pruning and `resize_to_state_dict` treat this as a plain BatchNorm2d, which computes the same with those ones.
    """

    def __init__(self, channels: int):
        super().__init__(channels, eps=1e-12, momentum=0.4)
        self.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight.detach(), self.bias, self.training,
                            self.momentum, self.eps)


class PatchWhiten(nn.Module):
    """A frozen 2x2 conv that whitens image patches, plus a learned bias (Page, 2018; airbench).

    Its filters are +-eigenvectors / sqrt(eigenvalue + eps) of the covariance of the input's 2x2 patches, set from
    the first batch the layer sees in training mode: building the model needs no data, and a saved model keeps
    them (the `ready` buffer says they are set).
    """

    def __init__(self, channels: int, kernel: int = 2, eps: float = 5e-4):
        super().__init__()
        self.conv = nn.Conv2d(channels, 2 * channels * kernel * kernel, kernel, bias=True)
        self.conv.weight.requires_grad_(False)
        nn.init.zeros_(self.conv.bias)
        self.register_buffer("ready", torch.zeros(()))
        self.eps = eps
        self._ready = False  # cached `ready`, so that training steps do not sync on it

    def _load_from_state_dict(self, *args, **kwargs):
        self._ready = False
        super()._load_from_state_dict(*args, **kwargs)

    @torch.compiler.disable
    @torch.no_grad()
    def whiten_from(self, x: torch.Tensor) -> None:
        k = self.conv.kernel_size[0]
        if self.conv.out_channels != 2 * x.shape[1] * k * k:  # pruned: which eigenvectors were kept is not known
            raise ValueError("PatchWhiten: the whitening must be set (one training batch) before its channels are pruned")
        with torch.autocast(x.device.type, enabled=False):
            patches = x.float().unfold(2, k, 1).unfold(3, k, 1)  # n, c, h', w', k, k
            patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, x.shape[1] * k * k)
            eigenvalues, eigenvectors = torch.linalg.eigh(patches.T @ patches / len(patches))
            filters = (eigenvectors.T / (eigenvalues[:, None] + self.eps).sqrt()).reshape(-1, x.shape[1], k, k)
        self.conv.weight.copy_(torch.cat([filters, -filters]))
        self.ready.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not self._ready:
            if not self.ready.item():
                self.whiten_from(x)
            self._ready = True
        return self.conv(x)


class Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


class FastNet(nn.Module):
    """airbench-style: stem conv, then three groups of conv-pool-BN-GELU-conv-BN-GELU (widths w, 4w, 4w).

    With `airbench`: a patch-whitening stem (`PatchWhiten`, then GELU) instead of the conv-BN stem, `ShiftNorm`
    batch norms, 3x3 convs initialised as partial identities (dirac) and logits scaled by 1/9: airbench's choices,
    which let it train at its high learning rates (lr ~1.3 per mean loss at batch 1024, BN lr x64).
    """

    def __init__(self, channels: int, size: int, classes: int, width: int, depth: int, dropout: float,
                 airbench: bool = False):
        super().__init__()
        norm = ShiftNorm if airbench else nn.BatchNorm2d
        if airbench:
            layers: list[nn.Module] = [PatchWhiten(channels), nn.GELU()]
            cin, side = layers[0].conv.out_channels, size - 1
        else:
            layers = _conv_bn(channels, width // 2 if width > 1 else 1)
            cin, side = layers[0].out_channels, size
        ends = [len(layers) - 1]  # the stem's activation, then each group's last one
        for mult in (1, 4, 4):
            cout = width * mult
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False)]
            if side >= 2:
                layers.append(nn.MaxPool2d(2))
                side //= 2
            layers += [norm(cout), nn.GELU()]
            for _ in range(depth):
                layers += _conv_bn(cout, cout, norm)
            ends.append(len(layers) - 1)
            cin = cout
        self.features = nn.Sequential(*layers)
        self.stages = tuple(f"features.{i}" for i in ends)
        self.head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(cin, classes, bias=False))
        if airbench:
            self.head.append(Scale(1 / 9))
            for m in self.features.modules():
                if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
                    nn.init.dirac_(m.weight[: m.in_channels])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


Builder = Callable[[int, int, int, int, int, float], nn.Module]

MODEL_BUILDERS: dict[str, Builder] = {
    "seed_large": lambda c, s, k, w, d, p: SeedLarge(c, s, k, dropout=p),
    "seed_small": lambda c, s, k, w, d, p: SeedSmall(c, s, k, dropout=p),
    "resnet": ResNet,
    "fastnet": FastNet,
    "airbench": lambda c, s, k, w, d, p: FastNet(c, s, k, w, d, p, airbench=True),
}


def build(spec: dict[str, Any], channels: int, size: int, classes: int) -> nn.Module:
    """Build `spec` (arch, width, depth, dropout) for images of `channels` x `size` x `size` and `classes` labels."""
    builder = MODEL_BUILDERS[spec["arch"]]
    return builder(channels, size, classes, spec.get("width", 16), spec.get("depth", 1), spec.get("dropout", 0.0))


def resize_to_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Shrink conv, linear and batch-norm layers, in place, to the shapes stored in `state_dict`.

    A pruned model is saved as its unpruned spec plus a state dict whose tensors carry the pruned shapes; this
    resizes each layer's tensors and channel counts from those stored shapes, keeping the layer's class and
    settings (a ShiftNorm stays a ShiftNorm), so loading needs no pruning code and guesses nothing.
    """
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if f"{prefix}weight" not in state_dict or state_dict[f"{prefix}weight"].shape == module.weight.shape:
            continue
        shape = state_dict[f"{prefix}weight"].shape
        if isinstance(module, nn.Conv2d):
            if module.groups != 1:
                raise ValueError(f"{name}: grouped convolutions cannot be resized from a state dict")
            module.out_channels, module.in_channels = shape[0], shape[1]
        elif isinstance(module, nn.Linear):
            module.out_features, module.in_features = shape[0], shape[1]
        elif isinstance(module, nn.BatchNorm2d):
            module.num_features = shape[0]
        else:
            continue
        for attr, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            key = f"{prefix}{attr}"
            if key in state_dict and state_dict[key].shape != tensor.shape:
                empty = torch.empty(state_dict[key].shape, dtype=tensor.dtype)
                if isinstance(tensor, nn.Parameter):
                    setattr(module, attr, nn.Parameter(empty, requires_grad=tensor.requires_grad))
                else:
                    setattr(module, attr, empty)
    return model
