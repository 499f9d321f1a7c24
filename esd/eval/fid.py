"""FID between the images and a reference set (COCO-30k in the paper)."""

import numpy as np
import pandas as pd
import torch
from PIL import Image

from esd.eval.images import IMAGE_SUFFIXES, load_rgb
from esd.eval.metric import Headline, Metric, existing_file, import_metrics_package, reference_dir
from esd.formats.summary import register_metric

FID_BATCH = 50  # images per Inception forward


@register_metric
class FID(Metric):
    """FID (Heusel et al., 2017) between the images and every image in ``reference``, with torchmetrics'
    FrechetInceptionDistance and torch-fidelity's InceptionV3 (the TF-FID weights), features of
    ``fid_dims`` (2048, the pool features, is the standard FID; smaller ones are for quick checks).
    The score is one number for the set (summary.json); rows list the images."""

    name = "fid"

    @classmethod
    def packages(cls, cfg) -> list[tuple[str, str]]:
        return [("torch_fidelity", "torch-fidelity==0.4.0 (or esd[metrics])"),
                ("torchmetrics", "'torchmetrics>=1.4,<1.10' (or esd[metrics])")]

    @classmethod
    def downloads(cls, cfg) -> list[tuple[str, str, str]]:
        if cfg.inception_weights:
            return []
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3  # optional (esd[metrics]): FID

        return [("--inception_weights", "torch-fidelity's InceptionV3 weights", URL_INCEPTION_V3)]
    counting_settings = ("fid_dims", "reference")
    columns = ("images", "reference images", "FID")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.reference = reference_dir(cfg)
        self.ref_files = sorted(p for p in self.reference.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if len(self.ref_files) < 2:
            raise ValueError(f"--reference {str(self.reference)!r} holds {len(self.ref_files)} images; FID needs "
                             "at least 2")
        if cfg.inception_weights is not None:
            existing_file(cfg.inception_weights, "--inception_weights")
        self.pending, self.count = [], 0

    def setup_steps(self) -> int:
        return len(self.ref_files)

    def load(self, advance) -> None:
        import_metrics_package("torch_fidelity", "--metric fid")
        fid_module = import_metrics_package("torchmetrics.image.fid", "--metric fid")
        dims, weights = self.cfg.fid_dims, self.cfg.inception_weights
        if weights is None:
            try:  # torch-fidelity downloads to the torch hub cache; offline that fails without a clear reason
                metric = fid_module.FrechetInceptionDistance(feature=dims)
            except Exception as e:  # noqa: BLE001
                raise ValueError(f"could not get torch-fidelity's InceptionV3 weights ({type(e).__name__}); offline, "
                                 "pass --inception_weights with a local "
                                 "weights-inception-2015-12-05-6726825d.pth") from e
        else:
            metric = fid_module.FrechetInceptionDistance(feature=dims, feature_extractor_weights_path=weights)
        self.metric = metric.to(self.cfg.device)  # Inception in float32 as TF-FID; statistics summed in float64
        self.torch = torch
        for i in range(0, len(self.ref_files), FID_BATCH):
            self.update(self.ref_files[i:i + FID_BATCH], real=True)
            advance(len(self.ref_files[i:i + FID_BATCH]))

    def update(self, files, real: bool) -> None:
        # One size for every image (sets mix sizes): 299x299, Inception's own, with PIL's bicubic.
        x = self.torch.stack([self.torch.from_numpy(np.array(load_rgb(f).resize((299, 299), Image.BICUBIC)))
                              for f in files]).permute(0, 3, 1, 2)  # (B, 3, 299, 299) uint8
        self.metric.update(x.to(self.cfg.device), real=real)

    def score(self, path, row) -> dict:
        self.pending.append(path)
        self.count += 1
        if len(self.pending) == FID_BATCH:
            self.update(self.pending, real=False)
            self.pending = []
        return {}

    def finish(self) -> dict:
        if self.count < 2:
            raise ValueError(f"FID needs at least 2 images in --images, found {self.count}")
        if self.pending:
            self.update(self.pending, real=False)
        return {"fid": float(self.metric.compute()), "fid_dims": self.cfg.fid_dims, "reference": str(self.reference),
                "reference_images": len(self.ref_files),
                "inception_weights": self.cfg.inception_weights or "torch-fidelity download"}

    def summarise(self, results: pd.DataFrame) -> dict:
        return {"images": len(results)}  # the FID itself comes from finish()

    @classmethod
    def headline(cls, s: dict) -> Headline:
        return Headline("FID", s.get("fid"), "lower", "closer to the reference photos: quality kept")

    @classmethod
    def quantities(cls, s: dict, base: bool) -> list[tuple[str, float]]:
        return [("FID", s["fid"])]

    @classmethod
    def cells(cls, s: dict) -> list[str]:
        return [str(s.get("images", "")), str(s.get("reference_images", "")), f"{s['fid']:.2f}" if "fid" in s else ""]
