"""CLIP score between each image and its prompt."""

import pandas as pd
import torch
from transformers import CLIPModel, CLIPProcessor

from esd.eval.images import load_rgb
from esd.eval.metric import Headline, Metric
from esd.formats.summary import register_metric

CLIP_IMPLEMENTATION = "esd: 100 * max(cos(image, prompt), 0) with a transformers CLIPModel"


@register_metric
class CLIPScore(Metric):
    """CLIP score, 100 * max(cos(image, prompt), 0) (Hessel et al., 2021), computed here with a
    transformers CLIP model (``clip_model``) on the ``prompt_column`` of each image's CSV row."""

    name = "clip"

    @classmethod
    def downloads(cls, cfg) -> list[tuple[str, str, str]]:
        return [("--clip_model", f"the CLIP model {cfg.clip_model!r}", f"hf:{cfg.clip_model}")]
    counting_settings = ("clip_model",)
    columns = ("images", "clip score")

    def __init__(self, cfg):
        super().__init__(cfg)
        if not cfg.clip_model:
            raise ValueError("--metric clip needs --clip_model (a hub id such as openai/clip-vit-large-patch14 "
                             "or a local folder)")
        if not cfg.prompts:
            raise ValueError("--metric clip needs --prompts (the CSV the images were generated from)")

    def load(self, advance) -> None:
        try:
            self.model = CLIPModel.from_pretrained(self.cfg.clip_model).eval()
            self.processor = CLIPProcessor.from_pretrained(self.cfg.clip_model)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"could not load --clip_model {self.cfg.clip_model!r} ({type(e).__name__}); offline, "
                             "pass a local folder") from e
        self.torch = torch

    def score(self, path, row) -> dict:
        column = self.cfg.prompt_column
        if column not in row:
            raise ValueError(f"--metric clip: the prompt CSV has no --prompt_column {column!r}")
        inputs = self.processor(text=[row[column]], images=load_rgb(path), return_tensors="pt",
                                padding="max_length", truncation=True)
        with self.torch.no_grad():
            img = embedding(self.model.get_image_features(pixel_values=inputs["pixel_values"]))
            txt = embedding(self.model.get_text_features(input_ids=inputs["input_ids"],
                                                         attention_mask=inputs.get("attention_mask")))
        cos = self.torch.nn.functional.cosine_similarity(img, txt).item()
        return {"clip_score": 100 * max(cos, 0.0)}

    def summarise(self, results: pd.DataFrame) -> dict:
        return {"images": len(results), "clip_model": self.cfg.clip_model, "clip_implementation": CLIP_IMPLEMENTATION,
                "clip_score_mean": float(results["clip_score"].mean()),
                "clip_score_std": float(results["clip_score"].std(ddof=0))}

    @classmethod
    def headline(cls, s: dict) -> Headline:
        return Headline("CLIP score", s.get("clip_score_mean"), "higher", "images still follow their prompts")

    @classmethod
    def quantities(cls, s: dict, base: bool) -> list[tuple[str, float]]:
        return [("CLIP score", s["clip_score_mean"])]

    @classmethod
    def cells(cls, s: dict) -> list[str]:
        return [str(s.get("images", "")), f"{s['clip_score_mean']:.2f}" if "clip_score_mean" in s else ""]


def embedding(features):
    """transformers 4 returns the projected embedding; transformers 5 a model output holding it as pooler_output."""
    return features if hasattr(features, "shape") else features.pooler_output
