"""Rebuild the toy model from scratch with the default recipe, time it, and compare every
tensor with the shipped model (esd/toy/model). About 25 minutes on 2 CPU cores.

    python benchmarks/toy_rebuild.py [--out DIR]
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def compare(a: Path, b: Path) -> dict:
    """Per component: tensors, whether all are bit-identical, the largest absolute difference."""
    from safetensors.torch import load_file

    out = {}
    for component in ("unet", "vae", "text_encoder"):
        [fa], [fb] = sorted((a / component).glob("*.safetensors")), sorted((b / component).glob("*.safetensors"))
        ta, tb = load_file(fa), load_file(fb)
        if ta.keys() != tb.keys():
            out[component] = {"identical": False, "error": "different tensor names"}
            continue
        diff = max((ta[k].double() - tb[k].double()).abs().max().item() for k in ta)
        out[component] = {"tensors": len(ta), "identical": all(ta[k].equal(tb[k]) for k in ta), "max_abs_diff": diff}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="keep the rebuilt model here (default: a temporary folder)")
    args = p.parse_args()
    import torch

    from esd.families.sources import TOY_MODEL_DIR
    from esd.toy.recipe import toy_train

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp) / "toy"
        start = time.perf_counter()
        toy_train(out)
        seconds = time.perf_counter() - start
        result = {"seconds": round(seconds, 1), "torch": torch.__version__, "threads": torch.get_num_threads(),
                  "components": compare(out, Path(TOY_MODEL_DIR))}
    result["identical"] = all(c.get("identical") for c in result["components"].values())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
