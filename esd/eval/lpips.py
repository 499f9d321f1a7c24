"""LPIPS to a reference folder (the paper's art-style measure)."""

import warnings

import numpy as np
import pandas as pd
import torch

from esd.eval.config import LPIPS_BACKBONES
from esd.eval.images import load_rgb
from esd.eval.metric import TORCHVISION, Headline, Metric, import_metrics_package, load_weights, reference_dir
from esd.formats.summary import register_metric


@register_metric
class LPIPS(Metric):
    """LPIPS (Zhang et al., 2018) between each image and the image of the same file name (same case
    and seed) in ``reference``, e.g. the base model's generation."""

    name = "lpips"

    @classmethod
    def packages(cls, cfg) -> list[tuple[str, str]]:
        return [("torchvision", TORCHVISION), ("lpips", "lpips==0.1.4 (or esd[metrics])")]

    @classmethod
    def downloads(cls, cfg) -> list[tuple[str, str, str]]:
        if cfg.lpips_backbone:
            return []
        import torchvision  # optional (esd[metrics]): LPIPS's backbone

        name = LPIPS_BACKBONES[cfg.lpips_net]
        return [("--lpips_backbone", f"torchvision's ImageNet {name} weights for LPIPS",
                 torchvision.models.get_model_weights(name).IMAGENET1K_V1.url)]
    counting_settings = ("lpips_net",)
    columns = ("images", "LPIPS mean")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.reference = reference_dir(cfg)

    def load(self, advance) -> None:
        lpips = import_metrics_package("lpips", "--metric lpips")
        net = self.cfg.lpips_net
        with warnings.catch_warnings():  # lpips 0.1.4 calls torchvision with the deprecated pretrained=...
            warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
            model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)  # backbone loaded below
        backbone = load_weights(self.cfg.lpips_backbone, lambda: torchvision_backbone(net), "--lpips_backbone",
                                f"torchvision's ImageNet {LPIPS_BACKBONES[net]} weights")
        load_lpips_backbone(model.net, backbone)
        self.model = model.eval().to(self.cfg.device)
        self.no_grad = torch.no_grad
        self.torch = torch

    def tensor(self, path):
        pixels = self.torch.from_numpy(np.asarray(load_rgb(path)).copy())
        return pixels.permute(2, 0, 1)[None].float() / 127.5 - 1  # (1, 3, H, W) in [-1, 1], as lpips wants

    def score(self, path, row) -> dict:
        ref = self.reference / path.name
        if not ref.is_file():
            raise ValueError(f"--reference {str(self.reference)!r} has no {path.name} to compare {path} with")
        a, b = self.tensor(path), self.tensor(ref)
        if a.shape != b.shape:
            raise ValueError(f"{path.name}: size {tuple(a.shape[2:])} differs from the reference's "
                             f"{tuple(b.shape[2:])}")
        with self.no_grad():
            distance = float(self.model(a.to(self.cfg.device), b.to(self.cfg.device)).item())
        return {"lpips": distance, "reference": str(ref)}

    def summarise(self, results: pd.DataFrame) -> dict:
        col = self.cfg.label_column
        out = {"images": len(results), "lpips_mean": float(results["lpips"].mean()),
               "lpips_std": float(results["lpips"].std(ddof=0)),
               "lpips_net": self.cfg.lpips_net}
        if col in results:
            out["per_class_lpips"] = results.groupby(results[col].astype(str))["lpips"].mean().to_dict()
        return out

    @classmethod
    def headline(cls, s: dict) -> Headline:
        return Headline("LPIPS to the reference", s.get("lpips_mean"), "higher",
                        "for the erased style: further from the base model (for other styles, lower is better)")

    @classmethod
    def quantities(cls, s: dict, base: bool) -> list[tuple[str, float]]:
        return [("LPIPS to the base model", s["lpips_mean"])]

    @classmethod
    def cells(cls, s: dict) -> list[str]:
        return [str(s.get("images", "")), f"{s['lpips_mean']:.4f}" if "lpips_mean" in s else ""]

    @classmethod
    def chart(cls, s: dict) -> tuple[str, dict]:
        return "LPIPS to the reference", s.get("per_class_lpips") or {"all": s["lpips_mean"]}


def torchvision_backbone(net: str) -> dict:
    import torchvision  # optional (esd[metrics]): LPIPS's backbone

    weights = torchvision.models.get_model_weights(LPIPS_BACKBONES[net]).IMAGENET1K_V1
    return weights.get_state_dict(progress=False)


def load_lpips_backbone(net, state_dict: dict) -> None:
    """lpips splits torchvision's ``features`` into slices that keep the layer indices
    (slice1.0 is features.0, ...): load a torchvision state dict into them, strictly."""
    own = net.state_dict()
    source = {k: f"features.{k.split('.', 1)[1]}" for k in own}  # slice2.3.weight -> features.3.weight
    mapped = {k: state_dict[src] for k, src in source.items() if src in state_dict}
    if missing := sorted(set(own) - set(mapped)):
        raise ValueError(f"the LPIPS backbone weights lack {len(missing)} tensors ({', '.join(missing[:3])}); "
                         "pass torchvision's state dict of the --lpips_net network")
    net.load_state_dict(mapped, strict=True)
