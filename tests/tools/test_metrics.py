"""The ImageNet-network metrics (ResNet-50 classification, LPIPS, FID) on their real
architectures with random stand-in weights saved to local files: no download, so the
values mean nothing, but the plumbing, the weight loading and the maths are checked."""

import json
import random
import sys
from functools import partial

import helpers
import pandas as pd
import pytest
import torch
import torchvision as tv
from PIL import Image

from esd.eval import METRICS, evaluate
from esd.toy.world import Scene, render

args = partial(helpers.eval_config, metric="classify", devices="cpu")


def scenes(folder, pairs, seed=0, size=64):
    """Toy renders named <case>_<i>.png, upscaled to ``size``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for case, (colour, shape, n) in enumerate(pairs):
        for i in range(n):
            render(Scene(colour, shape), rng).resize((size, size), Image.NEAREST).save(folder / f"{case}_{i}.png")
    return folder


def test_resnet50_top1_top5_and_erased_vs_other_classes(tmp_path):
    torch.manual_seed(0)
    model = tv.models.resnet50().eval()
    torch.save(model.state_dict(), tmp_path / "resnet50.pth")
    images = scenes(tmp_path / "img", [("red", "circle", 2), ("blue", "square", 1)])
    csv = tmp_path / "p.csv"
    pd.DataFrame({"case_number": [0, 1], "prompt": ["x", "y"], "class": ["tench", "church"]}).to_csv(csv,
                                                                                                   index=False)
    s = evaluate(args(images=str(images), prompts=str(csv), out=str(tmp_path / "e"), classifier="resnet50",
                      classifier_weights=str(tmp_path / "resnet50.pth"), erased_classes="tench"))
    results = pd.read_csv(tmp_path / "e" / "results.csv")
    assert list(results["file"]) == ["0_0.png", "0_1.png", "1_0.png"]
    # the same network run by hand on torchvision's preprocessing gives the same top-1 and top-5
    weights = tv.models.ResNet50_Weights.IMAGENET1K_V1
    with torch.no_grad():
        logits = model(weights.transforms()(Image.open(images / "1_0.png").convert("RGB"))[None])[0]
    top5 = [weights.meta["categories"][i] for i in logits.topk(5).indices]
    row = results.iloc[2]
    assert row["top1_index"] == int(logits.argmax()) and row["top5"].split(";") == top5 and row["label"] == top5[0]
    assert set(s) >= {"per_class_accuracy", "top5_per_class_accuracy", "erased_accuracy", "others_accuracy"}
    with pytest.raises(ValueError, match="--classifier_weights '/no/file.pth' does not exist"):
        evaluate(args(images=str(images), out=str(tmp_path / "e"), classifier="resnet50",
                      classifier_weights="/no/file.pth"))


def test_classify_aggregation_math_top5_and_erased_split():
    rows = pd.DataFrame({"class": ["tench", "tench", "church", "church", "golf ball", "golf ball"],
                         "label": ["tench", "church", "church", "church", "tench", "golf ball"],
                         "top5": ["tench;a", "church;tench", "church", "b;church", "c", "golf ball"]})
    s = METRICS["classify"](args(erased_classes="tench")).summarise(rows)
    assert s["per_class_accuracy"] == {"church": 1.0, "golf ball": 0.5, "tench": 0.5}
    assert s["top5_per_class_accuracy"] == {"church": 1.0, "golf ball": 0.5, "tench": 1.0}
    assert s["erased_accuracy"] == 0.5 and s["others_accuracy"] == 0.75
    assert s["top5_erased_accuracy"] == 1.0 and s["top5_others_accuracy"] == 0.75
    # Wilson 95% over images: per class, and pooled over the erased, the other and all classes
    intervals = s["intervals"]
    assert {c: (r["k"], r["n"]) for c, r in intervals["per_class"].items()} == \
        {"church": (2, 2), "golf ball": (1, 2), "tench": (1, 2)}
    assert [(intervals[g]["k"], intervals[g]["n"]) for g in ("erased", "others", "all")] == [(1, 2), (3, 4), (4, 6)]
    assert intervals["all"]["low"] < 4 / 6 < intervals["all"]["high"]
    with pytest.raises(ValueError, match="--erased_classes parachute not in the 'class' column; classes: church"):
        METRICS["classify"](args(erased_classes="parachute")).summarise(rows)


def test_lpips_pairs_files_with_the_reference(tmp_path):
    torch.manual_seed(0)
    features = {f"features.{k}": v for k, v in tv.models.alexnet().features.state_dict().items()}
    torch.save(features, tmp_path / "alex.pth")
    base = scenes(tmp_path / "base", [("red", "circle", 2), ("blue", "square", 2)], seed=1)
    same = scenes(tmp_path / "same", [("red", "circle", 2), ("blue", "square", 2)], seed=1)
    erased = scenes(tmp_path / "erased", [("green", "circle", 2), ("blue", "square", 2)], seed=1)
    csv = tmp_path / "p.csv"
    pd.DataFrame({"case_number": [0, 1], "prompt": ["a red circle", "a blue square"],
                  "class": ["red", "blue"]}).to_csv(csv, index=False)
    common = {"metric": "lpips", "prompts": str(csv), "reference": str(base),
              "lpips_backbone": str(tmp_path / "alex.pth")}
    s_same = evaluate(args(images=str(same), out=str(tmp_path / "e1"), **common))
    s_erased = evaluate(args(images=str(erased), out=str(tmp_path / "e2"), **common))
    assert s_same["lpips_mean"] == pytest.approx(0.0, abs=1e-6)  # identical images: distance 0
    per_class = s_erased["per_class_lpips"]
    assert per_class["blue"] == pytest.approx(0.0, abs=1e-6) and per_class["red"] > 1e-4  # only the changed case
    results = pd.read_csv(tmp_path / "e2" / "results.csv")
    assert results["reference"].str.endswith(tuple(results["file"])).all()

    import lpips  # the loaded backbone is the file's, layer by layer

    from esd.eval.lpips import load_lpips_backbone

    with pytest.warns(UserWarning):  # lpips 0.1.4 passes torchvision the deprecated pretrained=
        net = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).net
    load_lpips_backbone(net, features)
    assert torch.equal(getattr(net.slice2, "3").weight, features["features.3.weight"])
    (base / "1_1.png").unlink()
    with pytest.raises(ValueError, match="has no 1_1.png"):
        evaluate(args(images=str(erased), out=str(tmp_path / "e3"), **common))
    with pytest.raises(ValueError, match="needs --reference"):
        evaluate(args(images=str(erased), out=str(tmp_path / "e3"), **{**common, "reference": None}))


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """torch-fidelity's InceptionV3 with random weights, saved as its weights file."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Skeleton(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True):  # keep the random initialisation
            return None

    path = tmp_path_factory.mktemp("inception") / "inception.pth"
    torch.save({}, path)
    torch.manual_seed(0)
    model = Skeleton("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    for m in model.modules():  # He init keeps the activations' scale through ~50 layers: informative features
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(model.state_dict(), path)
    return str(path)


def test_fid_between_folders(tmp_path, inception_weights):
    reds = scenes(tmp_path / "reds", [("red", "circle", 3), ("red", "square", 3)], seed=1)
    reds_again = scenes(tmp_path / "reds2", [("red", "circle", 3), ("red", "square", 3)], seed=1)
    blues = scenes(tmp_path / "blues", [("blue", "triangle", 3), ("green", "square", 3)], seed=2)
    # 192-d features (Inception's second pooling): the same network, weights file and code path read at an
    # earlier layer, so the matrix square root is 192x192 instead of 2048x2048 (minutes on 2 CPU cores).
    common = {"metric": "fid", "inception_weights": inception_weights, "fid_dims": 192}
    same = evaluate(args(images=str(reds_again), reference=str(reds), out=str(tmp_path / "f0"), **common))
    far = evaluate(args(images=str(blues), reference=str(reds), out=str(tmp_path / "f1"), **common))
    back = evaluate(args(images=str(reds), reference=str(blues), out=str(tmp_path / "f2"), **common))
    assert same["fid"] == pytest.approx(0.0, abs=1e-3)  # the same images: the same statistics
    assert far["fid"] > 1.0 and far["fid"] == pytest.approx(back["fid"], rel=1e-4)  # a distance: symmetric
    assert far["reference_images"] == 6 and far["images"] == 6
    summary = json.loads((tmp_path / "f1" / "summary.json").read_text())
    assert summary["fid"] == far["fid"] and summary["inception_weights"] == inception_weights
    with pytest.raises(ValueError, match="holds 0 images; FID needs at least 2"):
        (tmp_path / "empty").mkdir()
        evaluate(args(images=str(blues), reference=str(tmp_path / "empty"), out=str(tmp_path / "f3"), **common))


def test_missing_metrics_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lpips", None)  # import fails as if not installed
    images = scenes(tmp_path / "img", [("red", "circle", 1)])
    with pytest.raises(ValueError, match=r"--metric lpips needs lpips .*pip install 'esd\[metrics\]'"):
        evaluate(args(metric="lpips", images=str(images), reference=str(images), out=str(tmp_path / "e")))
