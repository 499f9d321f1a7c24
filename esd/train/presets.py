"""The presets: the paper's code, the official code (and its SDXL script's own values), and ours, each a
set of the settings that make the erasure."""


from esd.core.methods import ALIASES
from esd.families.family import Family

# -- presets -----------------------------------------------------------------------------------
# Each preset sets every field below; an explicit value (a flag, a keyword) overrides it.
PRESETS: dict[str, dict] = {
    # The paper's original code (CompVis train-esd.py): the model being trained samples x_t with DDIM
    # (eta 0, T = 50, guidance 3), a fresh partial trajectory every iteration, x_t paired with the
    # original code's DDPM query draw, a whole frozen UNet copy, Adam lr 1e-5 for 1,000 iterations.
    "paper": dict(sampler_model="trained", sampler_scheduler="ddim", timestep_mode="original", pool_size=0,
                  frozen_copy=True, ddim_steps=50, start_guidance=3.0, negative_guidance=1.0, lr=1e-5,
                  iterations=1000, sdxl_uncond="empty"),
    # The current official code (esd_sd.py): the frozen model samples x_t with the model's own scheduler
    # (PNDM for SD1.4), a fresh trajectory every iteration, the query at x_t's own timestep, lr 5e-5 for
    # 200 iterations; its eta 2 is our 1 (see esd/core/objective.py). It renders 1024 px and trains in bf16:
    # here the native size and fp32 trained weights (--image_size 1024 for the former).
    # On SDXL it takes esd_sdxl.py's own settings instead where they differ (SDXL_OFFICIAL below).
    "official": dict(sampler_model="frozen", sampler_scheduler="model", timestep_mode="matched", pool_size=0,
                     frozen_copy=False, ddim_steps=50, start_guidance=3.0, negative_guidance=1.0, lr=5e-5,
                     iterations=200, sdxl_uncond="empty"),
    # This project's default: trajectory reuse. pool_size whole trajectories from the frozen DDIM sampler,
    # every (x_t, t, e0, ep) on them trained on once; one UNet in memory.
    "fast": dict(sampler_model="frozen", sampler_scheduler="ddim", timestep_mode="matched", pool_size=8,
                 frozen_copy=False, ddim_steps=50, start_guidance=3.0, negative_guidance=1.0, lr=1e-5,
                 iterations=1000, sdxl_uncond="empty"),
}

# --preset official on an SDXL model: the current official SDXL code (esd_sdxl.py) where its defaults differ
# from esd_sd.py's. Its argparse: guidance_scale 2, negative_guidance 1 (its eta_off; our eta = eta_off - 1 = 0:
# the target is e0 itself, see esd/core/objective.py), lr 2e-4, iterations 200 and num_inference_steps 50 (as
# esd_sd.py's); then lr = 1e-5 for every method but esd-x and esd-x-strict (its `if 'esd-x' not in
# train_method`). (The file holds its __main__ block twice; the second copy, which runs after the first and
# overwrites its output file, lacks that line: the author's rule is taken, not that leftover.) Its x_t is
# sampled with zero unconditional embeddings and its e0 built from the encoded "" (sdxl_uncond "official").
SDXL_OFFICIAL = dict(start_guidance=2.0, negative_guidance=0.0, lr=2e-4, sdxl_uncond="official")

SDXL_OFFICIAL_X_METHODS = ("xattn", "xattn-strict")  # esd-x, esd-x-strict: esd_sdxl.py keeps --lr for them

SDXL_OFFICIAL_OTHER_LR = 1e-5  # esd_sdxl.py's lr for the other methods (esd-u, esd-all)

DEFAULT_PRESET = "fast"

# --preset official takes the settings of the official script that the model's family runs with
# (Family.official_script), where they differ from esd_sd.py's (PRESETS["official"]).
OFFICIAL_SCRIPTS = {"esd_sd.py": {}, "esd_sdxl.py": SDXL_OFFICIAL}

PRESET_FIELDS = tuple(PRESETS[DEFAULT_PRESET])


def preset_values(preset: str, family: Family | None = None, train_method: str | None = None) -> dict:
    """Every preset field's value under ``preset`` on a model of ``family`` (None: not known yet, as esd_sd.py's),
    for ``train_method`` (esd_sdxl.py's learning rate depends on it)."""
    values = dict(PRESETS[preset])
    script = family.official_script if family is not None else "esd_sd.py"
    if preset == "official" and OFFICIAL_SCRIPTS[script]:
        values.update(OFFICIAL_SCRIPTS[script])
        if script == "esd_sdxl.py" and ALIASES.get(train_method, train_method) not in SDXL_OFFICIAL_X_METHODS:
            values["lr"] = SDXL_OFFICIAL_OTHER_LR
    return values


def preset_default(name: str) -> str:
    """'(from --preset: paper X, official Y, fast Z)' for a setting whose default comes from --preset, with
    official's value on SDXL (esd_sdxl.py's) where it differs."""
    values = []
    for p, v in PRESETS.items():
        text = f"{p} {v[name]}"
        if p == "official" and name in SDXL_OFFICIAL:
            sdxl = SDXL_OFFICIAL[name]
            if name == "lr":
                sdxl = f"{sdxl} for esd-x/esd-x-strict, else {SDXL_OFFICIAL_OTHER_LR}"
            text += f" (SDXL: {sdxl})"
        values.append(text)
    return "(from --preset: " + ", ".join(values) + ")"
