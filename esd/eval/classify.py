"""Object classification: the toy world's judge, or the paper's Imagenette measure (ResNet-50)."""

import numpy as np
import pandas as pd
import torch

from esd.core.stats import Rate, pooled
from esd.eval.images import load_rgb
from esd.eval.metric import TORCHVISION, Headline, Metric, import_metrics_package, load_weights
from esd.formats.summary import percent, register_metric
from esd.toy.judge import judge


@register_metric
class Classify(Metric):
    """``classifier`` toy: the toy world's judge (colour, shape); resnet50: torchvision's ImageNet
    ResNet-50 (IMAGENET1K_V1, its own preprocessing), top-1 and top-5 class names per image."""

    name = "classify"
    counting_settings = ("classifier", "erased_classes")

    @classmethod
    def packages(cls, cfg) -> list[tuple[str, str]]:
        return [("torchvision", TORCHVISION)] if cfg.classifier == "resnet50" else []

    @classmethod
    def downloads(cls, cfg) -> list[tuple[str, str, str]]:
        if cfg.classifier != "resnet50" or cfg.classifier_weights:
            return []
        import torchvision  # optional (esd[metrics]): its ResNet-50

        return [("--classifier_weights", "torchvision's ResNet-50 ImageNet weights",
                 torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url)]
    columns = ("images", "mean accuracy", "erased classes", "other classes")

    def load(self, advance) -> None:
        if self.cfg.classifier == "toy":
            self.judge = judge
            return

        tv = import_metrics_package("torchvision", "--classifier resnet50")
        weights = tv.models.ResNet50_Weights.IMAGENET1K_V1
        model = tv.models.resnet50()
        model.load_state_dict(load_weights(self.cfg.classifier_weights, weights.get_state_dict, "--classifier_weights",
                                           f"torchvision's ResNet-50 ImageNet weights ({weights.url})"))
        self.model = model.eval().to(self.cfg.device)
        self.preprocess, self.categories = weights.transforms(), weights.meta["categories"]
        self.no_grad = torch.no_grad

    def score(self, path, row) -> dict:
        if self.cfg.classifier == "toy":
            j = self.judge(np.asarray(load_rgb(path)))
            return {"colour": j.colour, "shape": j.shape, "label": f"{j.colour} {j.shape}"}
        with self.no_grad():
            x = self.preprocess(load_rgb(path)).unsqueeze(0).to(self.cfg.device)  # (1, 3, 224, 224)
            top = self.model(x).softmax(-1)[0].cpu().topk(5)
        names = [self.categories[i] for i in top.indices.tolist()]
        return {"label": names[0], "top1_index": int(top.indices[0]), "top1_prob": float(top.values[0]),
                "top5": ";".join(names)}

    def summarise(self, results: pd.DataFrame) -> dict:
        """Per expected class (``label_column`` of the prompt CSV): share of images classified as it
        (top-1; top-5 too for ImageNet classifiers); with ``erased_classes``, the mean over the erased
        classes and over the others (the paper's Imagenette table)."""
        col = self.cfg.label_column
        out = {"classifier": self.cfg.classifier, "images": len(results)}
        if col not in results:
            return out | {"label_counts": results["label"].value_counts().to_dict()}
        truth = results[col].astype(str)
        hits = {"": results["label"] == results[col]}
        if "top5" in results:
            hits["top5_"] = pd.Series([str(c) in str(t).split(";") for c, t in zip(results[col], results["top5"])],
                                      results.index)
        erased = self.cfg.erased
        if unknown := sorted(set(erased) - set(truth)):
            raise ValueError(f"--erased_classes {', '.join(unknown)} not in the {col!r} column; classes: "
                             f"{', '.join(sorted(truth.unique()))}")
        for prefix, hit in hits.items():
            per_class = hit.groupby(truth).mean().astype(float).to_dict()
            rates = {c: Rate(int(h.sum()), len(h)) for c, h in hit.groupby(truth)}
            out[f"{prefix}per_class_accuracy"] = per_class
            out[f"{prefix}mean_accuracy"] = float(np.mean(list(per_class.values())))
            # Wilson 95% over images: per class, and pooled over the classes each mean is taken over
            out[f"{prefix}intervals"] = {"per_class": {c: r.record() for c, r in rates.items()},
                                         "all": pooled(rates.values()).record()}
            if erased:
                others = [c for c in per_class if c not in erased]
                out[f"{prefix}erased_accuracy"] = float(np.mean([per_class[c] for c in erased]))
                out[f"{prefix}others_accuracy"] = float(np.mean([per_class[c] for c in others])) if others else None
                out[f"{prefix}intervals"]["erased"] = pooled(rates[c] for c in erased).record()
                if others:
                    out[f"{prefix}intervals"]["others"] = pooled(rates[c] for c in others).record()
        if erased:
            out["erased_classes"] = erased
        return out

    @classmethod
    def headline(cls, s: dict) -> Headline:
        if s.get("erased_accuracy") is not None:
            return Headline("top-1 accuracy on the erased classes", s["erased_accuracy"], "lower",
                            "the erased classes are no longer drawn")
        return Headline("mean top-1 accuracy", s.get("mean_accuracy"), "higher", "classes still drawn")

    @classmethod
    def quantities(cls, s: dict, base: bool) -> list[tuple[str, float]]:
        """The base model: its accuracy on each class; an erased one: on the erased and on the other classes."""
        if base:
            return [(f"accuracy % on {c}", 100 * acc) for c, acc in s["per_class_accuracy"].items()]
        out = [("erased-class accuracy %", 100 * s["erased_accuracy"])]
        if s.get("others_accuracy") is not None:
            out.append(("other-class accuracy %", 100 * s["others_accuracy"]))
        return out

    @classmethod
    def cells(cls, s: dict) -> list[str]:
        intervals = s.get("intervals", {})  # Wilson 95% over the images pooled (older summaries: none)

        def shown(value, key):  # the pooled rate's interval, where it is the rate shown (equal images per class)
            r = intervals.get(key)
            return percent(value, r if r and value is not None and abs(r["rate"] - value) < 1e-9 else None)

        return [str(s.get("images", "")), shown(s.get("mean_accuracy"), "all"),
                shown(s.get("erased_accuracy"), "erased"), shown(s.get("others_accuracy"), "others")]

    @classmethod
    def chart(cls, s: dict) -> tuple[str, dict]:
        return "top-1 accuracy per class", s.get("per_class_accuracy", {})
