"""Networks we did not write, split into the contract MAS3 needs: z = ψ(φ(x)) and a linear 1×1 h.

ARCH is spelled
    tiny | edge                        the built-in SegNet presets
    torchvision:NAME                   deeplabv3_mobilenet_v3_large, deeplabv3_resnet50, fcn_resnet50,
                                       lraspp_mobilenet_v3_large (extra: .[torchvision])
    smp:ARCH:ENCODER                   segmentation_models_pytorch Unet, FPN, DeepLabV3Plus with any
                                       of its encoders, e.g. smp:Unet:resnet18 (extra: .[smp])
    python:package.module:factory      factory(num_classes=K) returns (module, name of its classifier)

How each family is split (README "Adapt your own model"):
- torchvision DeepLabV3 / FCN: z is the output of `classifier[:-1]` (the ASPP or FCN head up to its
  last conv), h is `classifier[-1]`, a 1×1 conv. The auxiliary classifier is not used.
- torchvision LR-ASPP sums two 1×1 classifiers, low(f_low) + high(g), with g the gated, resized
  high-level features. z = concat(f_low, g) and h = one 1×1 conv whose weight is the two weights side
  by side and whose bias is their sum: the same logits.
- smp: z is the decoder's output and h the segmentation head's conv. Unet's head is a 3×3 conv: there
  z is the decoder output unfolded into its 3×3 neighbourhoods (D = 9 × 16 channels) and h the same
  weights as a 1×1 conv on them (the same logits again); FPN's and DeepLabV3Plus's heads are 1×1.
- python: the module as it is; z is whatever enters the named classifier (a 1×1 Conv2d), captured
  there, and h is that conv.
"""
from __future__ import annotations

import importlib
from dataclasses import replace
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from . import bank
from .config import ModelConfig, PRESETS, preset
from .errors import UserError
from .labels import CITYSCAPES, LabelSet
from .model import SegModel, SegNet

TORCHVISION = ("deeplabv3_mobilenet_v3_large", "deeplabv3_resnet50", "fcn_resnet50", "lraspp_mobilenet_v3_large")
SMP = ("Unet", "FPN", "DeepLabV3Plus")
EXTRAS = {"torchvision": "torchvision", "segmentation_models_pytorch": "smp"}
M = TypeVar("M", bound=nn.Module)


def _require(module: str, arch: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise UserError(f"--arch {arch} needs {module} ({e}); install it with "
                        f"`pip install 'mas3-edge[{EXTRAS[module]}]'`") from None


def parse(arch: str) -> tuple[str, list[str]]:
    """ARCH -> (family, its parts), or a UserError that shows the spellings."""
    family, _, rest = arch.partition(":")
    parts = rest.split(":") if rest else []
    ok = {"torchvision": len(parts) == 1 and parts[0] in TORCHVISION,
          "smp": len(parts) == 2 and parts[0] in SMP and bool(parts[1]),
          "python": len(parts) == 2 and all(parts)}.get(family, arch in PRESETS and not parts)
    if not ok:
        raise UserError(f"unknown --arch {arch!r}; use one of {sorted(PRESETS)}, torchvision:NAME "
                        f"(NAME: {', '.join(TORCHVISION)}), smp:ARCH:ENCODER (ARCH: {', '.join(SMP)}) "
                        "or python:package.module:factory")
    return (family if parts else "builtin"), parts


def model_config(arch: str, labels: LabelSet = CITYSCAPES, input_size: tuple[int, int] | None = None) -> ModelConfig:
    """The ModelConfig of ARCH for a label set (K outputs); D is measured on the built network."""
    family, _ = parse(arch)
    k = labels.num_classes
    if family == "builtin":
        cfg = replace(preset(arch), num_classes=k, embed_dim=k)
        return replace(cfg, input_size=input_size) if input_size else cfg
    cfg = ModelConfig(preset="", arch=arch, num_classes=k, input_size=input_size or (256, 512), multiple=32)
    return replace(cfg, embed_dim=build(cfg, labels).head.in_channels)


def build(config: ModelConfig, labels: LabelSet = CITYSCAPES) -> SegModel:
    """The network a ModelConfig describes, randomly initialised, with its bank of normalisation sets."""
    if config.arch == "builtin":
        return SegNet(config, labels)
    family, parts = parse(config.arch)
    k = config.num_classes
    if family == "torchvision":
        seg = _require("torchvision", config.arch).models.segmentation
        kw = {} if parts[0].startswith("lraspp") else {"aux_loss": False}
        tv = getattr(seg, parts[0])(weights=None, weights_backbone=None, num_classes=k, **kw)
        return (TorchvisionLRASPP if parts[0].startswith("lraspp") else TorchvisionHead)(config, labels, tv)
    if family == "smp":
        smp = _require("segmentation_models_pytorch", config.arch)
        try:
            model = getattr(smp, parts[0])(encoder_name=parts[1], encoder_weights=None, classes=k)
        except (KeyError, ValueError) as e:
            raise UserError(f"--arch {config.arch}: segmentation_models_pytorch has no encoder {parts[1]!r} ({e})") from None
        return Smp(config, labels, model)
    return Wrapped(config, labels, *_factory(config.arch, parts, k))


def _factory(arch: str, parts: list[str], k: int) -> tuple[nn.Module, str]:
    try:
        factory = getattr(importlib.import_module(parts[0]), parts[1])
    except (ImportError, AttributeError) as e:
        raise UserError(f"--arch {arch}: cannot find {parts[1]} in module {parts[0]} ({e})") from None
    out = factory(num_classes=k)
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], nn.Module) and isinstance(out[1], str)):
        raise UserError(f"--arch {arch}: the factory must return (module, name of its classifier)")
    return out


def _part(module: nn.Module, name: str, kind: type[M]) -> M:
    """Submodule `name` (dotted) of a network we import, which its family's layout makes a `kind`."""
    part = module.get_submodule(name)
    if not isinstance(part, kind):
        raise UserError(f"{type(module).__name__}.{name} is a {type(part).__name__}, not the {kind.__name__} "
                        "mas3-edge splits this family at (pyproject.toml's extras name the versions tested)")
    return part


class TorchvisionHead(SegModel):
    """torchvision deeplabv3_* and fcn_*: backbone -> classifier[:-1] -> z; h = classifier[-1]."""

    def __init__(self, config: ModelConfig, labels: LabelSet, tv: nn.Module):
        super().__init__(config, labels)
        classifier = _part(tv, "classifier", nn.Sequential)  # DeepLabHead/FCNHead are Sequentials
        self.backbone = _part(tv, "backbone", nn.Module)
        self.head = _part(classifier, str(len(classifier) - 1), nn.Conv2d)
        self.decoder = nn.Sequential(*list(classifier)[:-1])
        self.finish()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.backbone(x)["out"])

    def foreign(self, state: dict) -> dict:
        last = f"classifier.{len(self.decoder)}."
        out = {}
        for key, v in state.items():
            if key.startswith("aux_classifier."):
                continue  # the auxiliary head only helps training; it is not part of f
            key = "head." + key[len(last):] if key.startswith(last) else key
            out["decoder." + key[len("classifier."):] if key.startswith("classifier.") else key] = v
        return out


class TorchvisionLRASPP(SegModel):
    """torchvision LR-ASPP: z = concat(low features, gated high features resized to them); h = the
    low and high 1×1 classifiers as one conv (weights side by side, biases summed)."""

    def __init__(self, config: ModelConfig, labels: LabelSet, tv: nn.Module):
        super().__init__(config, labels)
        c = _part(tv, "classifier", nn.Module)
        self.backbone, self.cbr, self.scale = (_part(tv, "backbone", nn.Module), _part(c, "cbr", nn.Module),
                                               _part(c, "scale", nn.Module))
        low, high = _part(c, "low_classifier", nn.Conv2d), _part(c, "high_classifier", nn.Conv2d)
        self.head = nn.Conv2d(low.in_channels + high.in_channels, config.num_classes, 1)
        self.head.load_state_dict(self._merge(low.state_dict(), high.state_dict()))
        self.finish()

    @staticmethod
    def _merge(low: dict, high: dict) -> dict:
        return {"weight": torch.cat([low["weight"], high["weight"]], 1), "bias": low["bias"] + high["bias"]}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone(x)
        low, high = f["low"], f["high"]
        g = F.interpolate(self.cbr(high) * self.scale(high), size=low.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([low, g], 1)

    def foreign(self, state: dict) -> dict:
        def part(name: str) -> dict:
            return {k.rsplit(".", 1)[1]: v for k, v in state.items() if k.startswith(f"classifier.{name}.")}
        out = {k.replace("classifier.", "", 1): v for k, v in state.items()
               if k.startswith("classifier.") and "_classifier." not in k}
        out |= {k: v for k, v in state.items() if not k.startswith("classifier.")}
        low, high = part("low_classifier"), part("high_classifier")
        if low.keys() == high.keys() == {"weight", "bias"}:
            out |= {f"head.{k}": v for k, v in self._merge(low, high).items()}
        return out


class Smp(SegModel):
    """segmentation_models_pytorch: z = the decoder's output (unfolded k×k when the head conv is k×k),
    h = the head's conv as a 1×1 conv."""

    def __init__(self, config: ModelConfig, labels: LabelSet, model: nn.Module):
        super().__init__(config, labels)
        conv = _part(model, "segmentation_head.0", nn.Conv2d)
        self.encoder, self.decoder = _part(model, "encoder", nn.Module), _part(model, "decoder", nn.Module)
        self.k = conv.kernel_size[0]
        # smp resizes its logits with an nn.Upsample that aligns corners: resize them the same way
        self.align = bool(getattr(model.get_submodule("segmentation_head.1"), "align_corners", False))
        self.head = nn.Conv2d(conv.in_channels * self.k ** 2, config.num_classes, 1)
        self.head.load_state_dict(self._flat(conv.state_dict()))
        self.finish()

    @staticmethod
    def _flat(conv: dict) -> dict:
        return {"weight": conv["weight"].flatten(1)[:, :, None, None], "bias": conv["bias"]}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        d = self.decoder(self.encoder(x))  # (B, C, h, w)
        if self.k == 1:
            return d
        return F.unfold(d, self.k, padding=self.k // 2).view(d.shape[0], -1, *d.shape[-2:])  # (B, C·k², h, w)

    def upsample(self, logits: torch.Tensor, size) -> torch.Tensor:
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=self.align)

    def foreign(self, state: dict) -> dict:
        out = {k: v for k, v in state.items() if not k.startswith(("segmentation_head.", "classification_head."))}
        conv = {k.rsplit(".", 1)[1]: v for k, v in state.items() if k.startswith("segmentation_head.0.")}
        if conv.keys() == {"weight", "bias"}:
            out |= {f"head.{k}": v for k, v in self._flat(conv).items()}
        return out


class _Z(Exception):
    def __init__(self, z: torch.Tensor):
        super().__init__("classifier reached")
        self.z = z


class _Tap(nn.Module):
    """Stands where the classifier was: hands its input (z) back to Wrapped.features."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        raise _Z(z)


class Wrapped(SegModel):
    """python:MOD:FACTORY: any module whose classifier is a named 1×1 Conv2d; z is that conv's input."""

    def __init__(self, config: ModelConfig, labels: LabelSet, module: nn.Module, classifier: str):
        super().__init__(config, labels)
        try:
            head = module.get_submodule(classifier)
        except AttributeError:
            raise UserError(f"--arch {config.arch}: the module has no classifier {classifier!r}") from None
        if not isinstance(head, nn.Conv2d) or head.kernel_size != (1, 1) or head.groups != 1:
            raise UserError(f"--arch {config.arch}: classifier {classifier!r} is not a 1x1 Conv2d "
                            f"({type(head).__name__}); name the last, linear 1x1 conv of the network")
        parent, _, leaf = classifier.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, leaf, _Tap())
        self.net, self.head, self.classifier = module, head, classifier
        self.finish()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        try:
            self.net(x)
        except _Z as z:
            return z.z
        raise UserError(f"{self.config.arch}: the input never reached the classifier {self.classifier!r}")

    def foreign(self, state: dict) -> dict:
        prefix = self.classifier + "."
        return {("head." + k[len(prefix):]) if k.startswith(prefix) else "net." + k: v for k, v in state.items()}


def read_weights(path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from .pt/.pth read with torch.load(weights_only=True): never a full
    unpickle. A checkpoint that wraps it ({"state_dict": ...} or {"model": ...}) and DDP's "module." prefix are unwrapped."""
    from pathlib import Path
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            import safetensors.torch
            state: object = safetensors.torch.load_file(str(path))  # whatever the file holds, checked below
        elif path.suffix in (".pt", ".pth"):
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise UserError(f"weights file {path}: use a .safetensors, .pt or .pth state dict")
    except UserError:
        raise
    except Exception as e:  # safetensors and torch.load raise many types for a bad or unsafe file
        why = ("it holds more than tensors" if "Weights only load failed" in str(e) else str(e).splitlines()[0])
        raise UserError(f"cannot read weights {path}: {why}; only tensors are read (save model.state_dict(), "
                        "not a pickled model)") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"weights file {path} is not a state dict of tensors")
    return {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}


def import_weights(net: SegModel, state: dict[str, torch.Tensor], where: str) -> None:
    """Load a state dict written for the original network (or by mas3-edge) into `net`, after checking
    that every tensor fits; the loaded statistics become the source set. UserError names what does not fit."""
    foreign = getattr(net, "foreign", None)  # the adapters for networks we did not write have one
    if not any(k.startswith("head.") for k in state) and callable(foreign):
        state = foreign(state)
    own = {k: v for k, v in net.state_dict().items() if not k.endswith(".bank")}
    state = {k: v for k, v in state.items() if not k.endswith((".bank", "num_batches_tracked"))}
    head = state.get("head.weight")
    if head is not None and head.shape[0] != net.config.num_classes and head.shape[1:] == own["head.weight"].shape[1:]:
        raise UserError(f"{where}: the classifier has {head.shape[0]} outputs but label set {net.labels.id!r} has "
                        f"{net.config.num_classes} classes; give the labels file the model was trained with (--labels)")
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(state[k].shape)}, model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
                 f"{len(shapes)} of another shape (e.g. {shapes[0]})" if shapes else ""]
        raise UserError(f"{where} does not fit --arch {net.config.arch if net.config.arch != 'builtin' else net.config.preset}: "
                        f"{', '.join(p for p in parts if p)}; check --arch and --labels")
    with torch.no_grad():
        net.load_state_dict(state, strict=False)  # the banks are not in a foreign file: rebuilt below
    bank.mark_source(net)
