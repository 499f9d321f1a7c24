"""Does ComfyUI's own loader code recognise every key of what ``esd export`` writes? Reruns the check against a
ComfyUI source tree, without the network and without a GPU:

    pip install einops   # the one module ComfyUI's comfy/ needs to import that this project's venv lacks
    python benchmarks/comfyui_keys.py --comfyui PATH/TO/ComfyUI [--methods all] [--families sd1,toy] [--skip-real]

PATH is a ComfyUI checkout (its ``comfy/`` package is imported from there, with ``--cpu``; nothing is run as a
server). What it checks, each with ComfyUI's code, not ours:

1. **Tiny models, real files** (the tests' tiny SD 1.x / 2.x / SDXL architectures, ``tests/tiny.py``, and the toy
   model, whose layers_per_block is 1). Per family and train method (by default xattn, noxattn, selfattn, full,
   esd-u, esd-all: every layer kind; ``--methods all`` for every UNet method, minutes more), an erasure that
   moves every trained ``.weight`` by seeded noise (``tests/tiny.py`` ``make_run``, as ``tests/test_export.py``
   makes them; norm weights are among them and a LoRA drops them, as ``esd export`` says) is exported with
   ``run_export`` as a full-rank fp32 LoRA and as a single file. Then:

   * single file: ``comfy.model_detection`` reads the UNet config off the file's shapes; the tiny widths (32 to 64
     channels, context 32 to 64) match none of ComfyUI's model classes, so the family's class (SD15, SD20, SDXL) is
     built on that detected config, as ComfyUI would build the real one (8-wide attention heads where the class's
     64-wide ones do not fit; heads change no weight's name or shape). Its ``get_model`` UNet takes the file's
     UNet keys through ``load_model_weights`` (a key counts when ComfyUI's UNet has it with the same shape, and
     ``comfy.utils.unet_to_diffusers`` maps it back to the diffusers name it was written from); the loaded
     weights are compared with our erased UNet (rel. error of the change, over the changed tensors).
   * LoRA: ``comfy.lora.model_lora_keys_unet`` on that model (loaded with the base weights) gives the key map,
     ``comfy.sd.load_lora_for_models`` (what the LoraLoaderModelOnly node calls) loads the file at strength 1 and
     ``ModelPatcher.patch_model`` applies it. A layer counts when ComfyUI maps its name to a model weight, every
     tensor of the file is consumed and the patch lands on that weight. The error is, per layer,
     ||patched - erased|| / ||erased - base||, max over layers, next to the export's own stated max.

2. **Real configs, names only** (SD 1.4, SD 2.1, SDXL base UNets built on the ``meta`` device: no weights, no
   memory). The single-file UNet names (``esd.families.ldm_single_file.unet_to_ldm``) must be detected by ComfyUI
   as SD15 /
   SD20 / SDXL and match its UNet's keys and shapes; each train method's LoRA names (``esd.formats.lora.lora_tensors``,
   the writer ``run_export`` uses, on factors of the right shapes) must all be mapped by ``model_lora_keys_unet``
   and loaded by ``load_lora`` onto a weight of the right size.

Prints one table (family, method, format, ComfyUI's model class, keys recognised / total, max rel. error) with the
ComfyUI commit and version and this repository's git hash. Exits 1 if any key is not recognised, a real config
is not detected, or a loaded model is off by more than ``TOLERANCE``. Not a test (benchmarks/ is not collected).
"""

import argparse
import contextlib
import logging
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tiny import make_run  # noqa: E402  (tests/tiny.py, as tests/test_export.py makes its erasures)

from esd.core.methods import TRAIN_METHODS  # noqa: E402
from esd.families.ldm_single_file import UNET_PREFIX, unet_to_ldm  # noqa: E402
from esd.families.registry import FAMILIES, applies, select_parameters  # noqa: E402
from esd.families.sources import TOY_MODEL_DIR  # noqa: E402
from esd.formats.exports import ExportSettings, run_export  # noqa: E402
from esd.formats.lora import LayerFactors, lora_tensors  # noqa: E402

TOLERANCE = 1e-4  # fp32 full-rank files: ComfyUI patches in fp32, so ~1e-6 is expected
TINY_NOTE = " (tiny, by hand)"  # not detected (widths): the family's class built on the detected config
COMFY_CLASS = {"sd1": "SD15", "sd2": "SD20", "sdxl": "SDXL", "toy": "SD15"}
UNET_METHODS = [name for name, m in TRAIN_METHODS.items() if applies(m, FAMILIES["sd1"])]
# The tiny exports' default: the paper's ESD-x and ESD-u, self-attention, and every parameter / every Linear and
# Conv2d (all layer kinds: attention, feed-forward, resnet convs, time and added embeddings, conv_in/out,
# down/upsamplers); the other methods train subsets of these. The real-config name checks take every method.
TINY_METHODS = ["xattn", "noxattn", "selfattn", "full", "esd-u", "esd-all"]

# The UNet configs of the published diffusers folders (unet/config.json), the keys that shape the weights.
SD14 = dict(sample_size=64, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
            attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD21 = dict(SD14, sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
            use_linear_projection=True, upcast_attention=True)
SDXL = dict(sample_size=128, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816, cross_attention_dim=2048)
REAL = {"sd1": ("SD 1.4", SD14), "sd2": ("SD 2.1", SD21), "sdxl": ("SDXL base", SDXL)}


class Comfy:
    """ComfyUI's modules, imported from a source tree with ``--cpu``."""

    def __init__(self, path: Path):
        if not (path / "comfy" / "lora.py").is_file():
            sys.exit(f"--comfyui {str(path)!r} is not a ComfyUI source tree (no comfy/lora.py)")
        sys.path.insert(0, str(path))
        with captured_logs():  # its import-time notes (torchaudio missing...) are not ours to print
            import comfy.cli_args
            comfy.cli_args.args.cpu = True  # before comfy.model_management picks a device
            import comfy.lora
            import comfy.lora_convert
            import comfy.model_detection
            import comfy.model_patcher
            import comfy.sd
            import comfy.supported_models
            import comfy.utils
        self.comfy = comfy
        version = re.search(r'__version__ = "([^"]+)"', (path / "comfyui_version.py").read_text())
        self.version = version[1] if version else "?"
        self.commit = git_hash(path, full=True)


class LogCapture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        if record.levelno >= logging.WARNING:
            self.messages.append(record.getMessage())


@contextlib.contextmanager
def captured_logs():
    """ComfyUI reports unloaded keys and missing weights only as log warnings: collect them."""
    root = logging.getLogger()
    handler, old_handlers, old_level = LogCapture(), root.handlers[:], root.level
    root.handlers, root.level = [handler], logging.DEBUG
    try:
        yield handler.messages
    finally:
        root.handlers, root.level = old_handlers, old_level


def git_hash(path: Path, full: bool = False) -> str:
    args = ["git", "-C", str(path), "rev-parse", "HEAD"] if full else \
        ["git", "-C", str(path), "describe", "--always", "--dirty", "--abbrev=12"]
    try:
        return subprocess.run(args, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git work tree)"


def rel(num_sq: float, den_sq: float) -> float:
    return (num_sq / den_sq) ** 0.5 if den_sq > 0 else (0.0 if num_sq == 0 else float("inf"))


def comfy_model(c: Comfy, family: str, ldm_sd: dict, device=None):
    """ComfyUI's model for an original-layout UNet state dict: the class ``model_config_from_unet`` detects,
    else (the tiny widths) the family's class on the detected config. Returns (model, class name, detected)."""
    md = c.comfy.model_detection
    with captured_logs():  # "no match" is logged for the tiny configs
        config = md.model_config_from_unet(ldm_sd, UNET_PREFIX)
    detected = config is not None
    if config is None:
        config = getattr(c.comfy.supported_models, COMFY_CLASS[family])(md.detect_unet_config(ldm_sd, UNET_PREFIX))
        if config.unet_config.get("num_head_channels", -1) > config.unet_config["model_channels"]:
            # SD20's and SDXL's 64-wide heads leave no head in a 32-wide layer (ComfyUI would build 0-wide
            # attention); 8-wide heads fit. The head split changes no weight's name or shape.
            config.unet_config["num_head_channels"] = 8
    with captured_logs():
        # get_model reads the state dict only for the model type (SD20's v-prediction guess reads a tensor's
        # values, which meta tensors have not): the real configs pass none.
        model = config.get_model(ldm_sd if device is None else {}, UNET_PREFIX, device=device)
    return model, type(config).__name__, detected


def single_file_keys(c: Comfy, model, ldm_sd: dict, diffusers_names: dict) -> tuple[int, int, list[str]]:
    """(recognised, total, problems): the file's UNet keys that ComfyUI's UNet has with the same shape and that
    ``unet_to_diffusers`` maps back to the diffusers name each was written from (``diffusers_names``: ldm key
    without prefix -> diffusers key)."""
    theirs = {k: v.shape for k, v in model.diffusion_model.state_dict().items()}
    to_ldm = c.comfy.utils.unet_to_diffusers(model.model_config.unet_config)  # diffusers -> original name
    keys = [k.removeprefix(UNET_PREFIX) for k in ldm_sd if k.startswith(UNET_PREFIX)]
    problems, ok = [], 0
    for k in keys:
        d = diffusers_names[k]
        if k not in theirs:
            problems.append(f"{k}: not a key of ComfyUI's UNet")
        elif theirs[k] != ldm_sd[UNET_PREFIX + k].shape:
            problems.append(f"{k}: shape {tuple(ldm_sd[UNET_PREFIX + k].shape)}, ComfyUI's {tuple(theirs[k])}")
        elif to_ldm.get(d) != k:
            problems.append(f"{k}: written from {d}, which unet_to_diffusers maps to {to_ldm.get(d)}")
        else:
            ok += 1
    missing = sorted(set(theirs) - set(keys))
    problems += [f"{k}: ComfyUI's UNet has it, the file not" for k in missing]
    return ok, len(keys), problems


def lora_keys(c: Comfy, model, lora: dict) -> tuple[int, int, dict, list[str], dict]:
    """(recognised layers, layers, key map, problems, patch dict) for a kohya LoRA state dict."""
    key_map = c.comfy.lora.model_lora_keys_unet(model, {})  # a fresh dict: the default one is shared
    weights = model.state_dict()
    with captured_logs() as logs:
        patches = c.comfy.lora.load_lora(c.comfy.lora_convert.convert_lora(dict(lora)), key_map)
    problems = [m for m in logs if "lora key not loaded" in m]
    layers = sorted(k.removesuffix(".lora_down.weight") for k in lora if k.endswith(".lora_down.weight"))
    ok = 0
    for layer in layers:
        target = key_map.get(layer)
        if target is None or target not in weights:
            problems.append(f"{layer}: not mapped to a model weight")
            continue
        if target not in patches:
            problems.append(f"{layer}: mapped to {target} but not loaded")
            continue
        up, down = lora[f"{layer}.lora_up.weight"], lora[f"{layer}.lora_down.weight"]
        if up.shape[0] != weights[target].shape[0] or down[0].numel() != weights[target][0].numel():
            problems.append(f"{layer}: factors {tuple(up.shape)} x {tuple(down.shape)} do not fit "
                            f"{target} {tuple(weights[target].shape)}")
            continue
        ok += 1
    return ok, len(layers), key_map, problems, patches


def tiny_rows(c: Comfy, family: str, base: str, methods: list[str], work: Path) -> list[dict]:
    rows = []
    for method in methods:
        try:
            run, base_sd, erased = make_run(base, work / f"{family}-{method}", method)
        except ValueError as e:  # e.g. xlayer on SDXL: CompVis output_blocks.6/.8 hold no attention there
            if "selects no parameters" not in str(e):
                raise
            rows.append(dict(family=family, method=method, format="-", model="-", keys="n/a",
                             error="selects nothing here", ok=True))
            continue
        config = UNet2DConditionModel.load_config(base, subfolder="unet")
        diffusers_names = {_ldm(k, config): k for k in base_sd}

        # The single file, as ComfyUI's checkpoint loader reads it.
        single = work / f"{family}-{method}-single.safetensors"
        run_export(str(run), ExportSettings("single-file", single, dtype="fp32"), log=lambda *_: None)
        ldm_sd = load_file(str(single))
        model, cls, detected = comfy_model(c, family, ldm_sd)
        ok, total, problems = single_file_keys(c, model, ldm_sd, diffusers_names)
        with captured_logs() as logs:
            model.load_model_weights(dict(ldm_sd), UNET_PREFIX)
        problems += [m for m in logs if m.startswith(("unet missing", "unet unexpected"))]
        loaded = model.diffusion_model.state_dict()
        to_ldm = c.comfy.utils.unet_to_diffusers(model.model_config.unet_config)
        num = den = 0.0
        for d, value in base_sd.items():
            got = loaded[to_ldm[d]].double() if d in to_ldm else loaded[_ldm(d, config)].double()
            want = erased.get(d, value).double()
            num += float((got - want).square().sum())
            den += float((want - value.double()).square().sum())
        err = rel(num, den)
        rows.append(dict(family=family, method=method, format="single-file",
                         model=cls + ("" if detected else TINY_NOTE), keys=f"{ok}/{total}",
                         error=f"{err:.1e}", ok=not problems and err <= TOLERANCE, problems=problems))

        # The LoRA, on the base model as LoraLoaderModelOnly applies it.
        lora_path = work / f"{family}-{method}-lora.safetensors"
        export = run_export(str(run), ExportSettings("lora", lora_path, rank="full", dtype="fp32"),
                            log=lambda *_: None)
        lora = load_file(str(lora_path))
        model, cls, detected = comfy_model(c, family, ldm_sd)
        with captured_logs():
            model.load_model_weights(unet_to_ldm(base_sd, config), UNET_PREFIX)
        ok, total, key_map, problems, _ = lora_keys(c, model, lora)
        cpu = torch.device("cpu")
        patcher = c.comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
        with captured_logs() as logs:
            patched, _ = c.comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0)
            patched.patch_model(device_to=cpu)
        problems += [m for m in logs if "NOT LOADED" in m or "lora key not loaded" in m or "SHAPE" in m]
        weights = patched.model.state_dict()
        worst = 0.0
        for module in export.layers:
            name = f"{module}.weight"
            got = weights["diffusion_model." + _ldm(name, config)].double()
            delta = erased[name].double() - base_sd[name].double()
            worst = max(worst, rel(float((got - erased[name].double()).square().sum()), float(delta.square().sum())))
        stated = max(f.rel_error for f in export.layers.values())
        rows.append(dict(family=family, method=method, format="lora", model=cls + ("" if detected else TINY_NOTE),
                         keys=f"{ok}/{total}", error=f"{worst:.1e} (stated {stated:.1e})",
                         ok=not problems and ok == total and worst <= max(TOLERANCE, 2 * stated), problems=problems))
    return rows


def _ldm(name: str, config) -> str:
    return unet_to_ldm({name: None}, config).popitem()[0].removeprefix(UNET_PREFIX)


def real_rows(c: Comfy, family: str, methods: list[str]) -> list[dict]:
    label, config = REAL[family]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    sd = unet.state_dict()
    ldm_sd = unet_to_ldm(sd, unet.config)
    model, cls, detected = comfy_model(c, family, ldm_sd, device=torch.device("meta"))
    names = {k.removeprefix(UNET_PREFIX): d for k, d in zip(ldm_sd, sd)}
    ok, total, problems = single_file_keys(c, model, ldm_sd, names)
    if not detected or cls != COMFY_CLASS[family]:
        problems.append(f"detected as {cls if detected else 'nothing'}, not {COMFY_CLASS[family]}")
    rows = [dict(family=label, method="(any)", format="single-file names", model=cls if detected else "NOT DETECTED",
                 keys=f"{ok}/{total}", error="-", ok=not problems, problems=problems)]
    modules = dict(unet.named_modules())
    for method in methods:
        try:
            trained = select_parameters(unet, method)
        except ValueError as e:
            if "selects no parameters" not in str(e):
                raise
            rows.append(dict(family=label, method=method, format="-", model="-", keys="n/a",
                             error="selects nothing here", ok=True))
            continue
        layers = {}
        for name in trained:  # the layers lora_from_erasure writes: Linear / Conv2d weights
            module, _, param = name.rpartition(".")
            m = modules.get(module)
            if param == "weight" and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                w = sd[name]
                r = min(w.shape[0], w[0].numel(), 4)
                down = torch.empty((r, *w.shape[1:]), device="meta")
                up = torch.empty((w.shape[0], r, *([1, 1] if w.ndim == 4 else [])), device="meta")
                layers[module] = LayerFactors(down, up, r, 0.0)
        lora = lora_tensors(layers, 4.0, unet.config, FAMILIES[family], torch.float32)
        ok, total, _, problems, _ = lora_keys(c, model, lora)
        rows.append(dict(family=label, method=method, format="lora names", model=cls if detected else "-",
                         keys=f"{ok}/{total}", error="-", ok=not problems and ok == total, problems=problems))
    return rows


def table(rows: list[dict]) -> str:
    cols = [("family", "family"), ("method", "method"), ("format", "format"), ("model", "ComfyUI model"),
            ("keys", "keys recognised"), ("error", "max rel. error of the change")]
    widths = [max(len(h), *(len(str(r[k])) for r in rows)) for k, h in cols]
    line = lambda vals: "| " + " | ".join(str(v).ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    out = [line(h for _, h in cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line([r[k] for k, _ in cols]) + ("" if r["ok"] else "  <-- FAIL") for r in rows]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--comfyui", required=True, type=Path, help="a ComfyUI source tree (its comfy/ is imported)")
    p.add_argument("--methods", default=",".join(TINY_METHODS),
                   help=f"comma-separated train methods of the tiny exports, or 'all' ({', '.join(UNET_METHODS)}); "
                        f"default {','.join(TINY_METHODS)}. The real-config name checks take all")
    p.add_argument("--families", default="sd1,sd2,sdxl,toy", help="tiny families to export (sd1, sd2, sdxl, toy)")
    p.add_argument("--skip-real", action="store_true", help="leave out the real SD 1.4 / 2.1 / SDXL name checks")
    args = p.parse_args(argv)
    methods = UNET_METHODS if args.methods == "all" else [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in UNET_METHODS]
    if bad:
        p.error(f"--methods {','.join(bad)}: not a UNet train method; choose from {', '.join(UNET_METHODS)}")
    c = Comfy(args.comfyui.resolve())
    import tiny

    rows = []
    with tempfile.TemporaryDirectory(prefix="comfyui-keys-") as tmp:
        work = Path(tmp)
        for family in args.families.split(","):
            with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):  # diffusers' progress bars
                base = str(TOY_MODEL_DIR) if family == "toy" else str(tiny.build(family, work / f"tiny-{family}"))
                rows += tiny_rows(c, family, base, methods, work)
        if not args.skip_real:
            for family in REAL:
                rows += real_rows(c, family, UNET_METHODS)
    print(f"ComfyUI {c.version}, commit {c.commit} ({args.comfyui}); esd {git_hash(ROOT)}; torch {torch.__version__}")
    print(table(rows))
    failed = [r for r in rows if not r["ok"]]
    for r in failed:
        print(f"\nFAIL {r['family']} {r['method']} {r['format']}:", *r.get("problems", [])[:10], sep="\n  ")
    print(f"\n{len(rows) - len(failed)} of {len(rows)} rows pass" + ("" if not failed else f"; {len(failed)} FAIL"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
