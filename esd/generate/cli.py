"""``esd generate``: the command's flags, on :func:`esd.generate.images.generate_images`."""


from esd.core.precision import PRECISIONS
from esd.families.sources import DEFAULT_BASE_MODEL
from esd.generate.config import PIPELINES, SCHEDULERS, SLD_PRESETS, GenerationConfig
from esd.generate.images import generate_images


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate images from a prompt CSV (resumable, shardable)")
    add_generate_arguments(p)
    p.set_defaults(func=cmd_generate)


def add_generate_arguments(p) -> None:
    d = GenerationConfig.__dataclass_fields__
    p.add_argument("--prompts_path", "--prompts", dest="prompts_path", required=True,
                   help="CSV with prompt, seed and case columns")
    p.add_argument("--save_path", "--out", dest="save_path", required=True,
                   help="folder for the PNGs and generation.json")
    p.add_argument("--base_model", default=DEFAULT_BASE_MODEL, help="hub id, local diffusers folder, or 'toy'")
    p.add_argument("--esd_path", help="erased weights (.pt, .safetensors, CompVis .ckpt), loaded strictly")
    p.add_argument("--model_name", help="as the original: load <models_dir>/<name>/diffusers-<name>.pt")
    p.add_argument("--models_dir", default="models", help="where --model_name looks")
    for col in ("prompt_column", "seed_column", "case_column"):
        p.add_argument(f"--{col}", default=d[col].default, help="CSV column (default: %(default)s)")
    p.add_argument("--num_samples", type=int, default=10, help="images per prompt (default: %(default)s)")
    p.add_argument("--from_case", type=int, default=0, help="skip rows whose case number is below this")
    p.add_argument("--till_case", type=int, help="skip rows whose case number is above this")
    p.add_argument("--guidance_scale", type=float, default=7.5, help="classifier-free guidance (default: 7.5)")
    p.add_argument("--ddim_steps", type=int, default=100, help="sampling steps (default: 100, as the original)")
    p.add_argument("--image_size", type=int, help="pixels (default: the model's native size)")
    p.add_argument("--scheduler", choices=list(SCHEDULERS),
                   help="sampler (default: lms for SD 1.x/2.x/XL, flow-euler for SD3/FLUX, their only one)")
    p.add_argument("--batch_size", type=int, default=1, help="images per forward pass")
    p.add_argument("--mixed_precision", default="no", choices=list(PRECISIONS), help="inference dtype")
    p.add_argument("--device", "--devices", dest="device",
                   help="'cpu', 'cuda:0'...; under accelerate launch each process takes its own")
    p.add_argument("--safety_checker", action="store_true",
                   help="keep the model's safety checker on (off by default: it blackens NSFW images)")
    p.add_argument("--pipeline", default="sd", choices=PIPELINES, help="'sld': Safe Latent Diffusion baseline")
    p.add_argument("--sld_preset", default="medium", choices=SLD_PRESETS, help="SLD strength")
    p.add_argument("--overwrite", action="store_true",
                   help="start the folder over: delete the images its generation.json records (no other file), "
                   "regenerate every image of this run and rewrite generation.json. Without it a folder made "
                   "with other settings, prompts or seeds is refused")


def cmd_generate(args) -> int:
    cfg = GenerationConfig(**{k: v for k, v in vars(args).items() if k in GenerationConfig.__dataclass_fields__})
    counts = generate_images(cfg)
    print(f"generated {counts['generated']}, skipped {counts['skipped']} existing")
    return 0
