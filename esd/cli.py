"""The ``esd`` command line: ``esd train``, and the commands added by the toy world,
generation and evaluation modules."""

import argparse
import os
import sys

from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from esd import commands
from esd.core.devices import parse_devices
from esd.core.methods import ALIASES, METHOD_CHOICES, TRAIN_METHODS
from esd.core.precision import PRECISIONS, SAVE_PRECISIONS
from esd.export.cli import add_train_export_arguments, train_export_config
from esd.families.sources import DEFAULT_BASE_MODEL
from esd.train.config import (
    OPTIMIZERS,
    SAMPLER_MODELS,
    SAMPLER_SCHEDULERS,
    SAVE_FORMATS,
    SDXL_UNCONDS,
    TIMESTEP_MODES,
    ESDConfig,
)
from esd.train.presets import PRESETS, SDXL_OFFICIAL, SDXL_OFFICIAL_OTHER_LR
from esd.train.recipe import train_esd
from esd.train.robust_settings import adversarial_choices

# What an interrupted command leaves, whichever it is: every file is written to a temporary name and
# renamed into place (esd.formats.records.atomic_write, esd.formats.exports.write_folder), and the temporary
# one is removed on the way out, so a file is the old one or the whole new one.
INTERRUPTED = "no file was left half-written; files completed before it are kept"
# toy-train writes its model folder with diffusers' save_pretrained, file by file, into an --out it made new
INTERRUPTED_BY_COMMAND = {c: "its --out folder may be incomplete; delete it and run again"
                          for c in ("toy-train", "toy-train-dit")}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the problem (and exit code 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _methods_help() -> str:
    lines = [f"{name}: {m.description}" for name, m in TRAIN_METHODS.items()]
    lines.append("aliases: " + ", ".join(f"{a}={n}" for a, n in ALIASES.items()))
    return "; ".join(lines)


def _preset_default(name: str) -> str:
    """'(from --preset: paper X, official Y, fast Z)' for a flag whose default comes from --preset, with
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


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``esd train``, one per ESDConfig field. Flags that a preset sets default to None
    (= the preset's value), so an explicit flag always wins and is recorded as an override."""
    d = ESDConfig.__dataclass_fields__
    p.add_argument("--preset", default=d["preset"].default, choices=list(PRESETS),
                   help="'paper': the paper's original code (trained model samples x_t with DDIM, original "
                   "timestep pairing, fresh x_t every iteration, whole frozen copy, lr 1e-5, 1000 iterations); "
                   "'official': the current official esd_sd.py (frozen model samples x_t with the model's own "
                   "scheduler, query at x_t's timestep, lr 5e-5, 200 iterations; on SDXL esd_sdxl.py's guidance 2, "
                   "eta 0, lr 2e-4 for esd-x/esd-x-strict else 1e-5, --sdxl_uncond official; SDXL base's Euler "
                   "scheduler "
                   "needs --sampler_scheduler ddim); 'fast': trajectory "
                   "reuse (default). Explicit flags override the preset")
    p.add_argument("--prompt", required=True, help="concept to erase, e.g. 'nudity' or 'Van Gogh'")
    p.add_argument("--train_method", required=True, choices=METHOD_CHOICES, metavar="METHOD",
                   help="which parameters train; " + _methods_help())
    p.add_argument("--base_model", default=DEFAULT_BASE_MODEL,
                   help="hub id, local diffusers folder, or 'toy' (the shipped toy model)")
    p.add_argument("--ckpt_path", help="original single-file checkpoint (.ckpt/.safetensors) to erase from: "
                   "SD 1.x/2.x/SDXL, or an SD3/SD3.5 or FLUX.1 transformer (which needs --ckpt_config)")
    p.add_argument("--ckpt_config", help="local diffusers folder (or hub id) with the configs of --ckpt_path, "
                   "so that single-file loading works offline; for an SD3/FLUX transformer file, the pipeline "
                   "whose text encoders, scheduler and VAE it is used with")
    p.add_argument("--erase_from", help="erase the concept from this prompt only (e.g. --prompt 'cowboy hat' "
                   "--erase_from cowboy): x_t and the trained model use it, and the target's base is its frozen "
                   "prediction")
    p.add_argument("--separator", "--seperator", dest="separator",
                   help="split --prompt into several concepts on this string (one drawn per iteration)")
    p.add_argument("--start_guidance", type=float,
                   help="classifier-free guidance of the sampler that makes x_t " + _preset_default("start_guidance"))
    p.add_argument("--negative_guidance", type=float,
                   help="eta of the paper's target e0 - eta*(ep - e0), with --erase_from e_from - (eta+1)*(ep - e0) "
                   + _preset_default("negative_guidance") + ". The official codes' eta is ours + 1 (esd_sd.py's "
                   "default 2 is our 1, esd_sdxl.py's 1 our 0)")
    p.add_argument("--iterations", type=int, help="training iterations " + _preset_default("iterations"))
    p.add_argument("--lr", type=float, help="Adam learning rate " + _preset_default("lr"))
    p.add_argument("--ddim_steps", type=int, help="steps T of the sampler's schedule; the stopping step is drawn "
                   "among them " + _preset_default("ddim_steps"))
    p.add_argument("--image_size", type=int, help="training image size in pixels (default: the model's native "
                   "size, 512 for SD1.x); a multiple of the VAE factor")
    p.add_argument("--batch_size", type=int, default=1, help="latents per iteration (sharing t and concept)")
    p.add_argument("--seed", type=int, help="random seed (default: drawn and recorded in args.json)")
    p.add_argument("--devices", "--device", dest="devices",
                   help="'0' (one GPU), '0,1' (frozen model on the second GPU, like the original code), or 'cpu'; "
                   "default: the first GPU if any, else the CPU")
    p.add_argument("--mixed_precision", choices=list(PRECISIONS),
                   help="dtype of the frozen weights and text encoders; trained parameters and the loss stay fp32 "
                   "(default: bf16 for FLUX.1, else no)")
    p.add_argument("--sdxl_uncond", choices=SDXL_UNCONDS,
                   help="SDXL's unconditional prompt, for e0 (the target) and the sampler that makes x_t: 'empty' "
                   "encodes \"\" for both; 'zeros' uses zero embeddings (hidden states and pooled) for both, "
                   "diffusers' force_zeros_for_empty_prompt; 'official' is esd_sdxl.py's mix: x_t sampled with zero "
                   "embeddings, e0 from the encoded \"\" " + _preset_default("sdxl_uncond"))
    p.add_argument("--sampler_model", choices=SAMPLER_MODELS,
                   help="which weights sample x_t: 'frozen' (the current official code) or 'trained' (the "
                   "paper's original code) " + _preset_default("sampler_model"))
    p.add_argument("--sampler_scheduler", choices=SAMPLER_SCHEDULERS,
                   help="the scheduler that samples x_t: 'ddim' (the paper's) or 'model' (the model's own class, "
                   "PNDM for SD1.4, as the current official code) " + _preset_default("sampler_scheduler"))
    p.add_argument("--pool_size", type=int,
                   help="the fast path: sample this many whole trajectories with the frozen model at once and train "
                   "on each of their (x_t, t, e0, ep) once before sampling anew; 0: the paper's loop, a fresh "
                   "partial trajectory every iteration (needed for --sampler_model trained) "
                   + _preset_default("pool_size"))
    p.add_argument("--timestep_mode", choices=TIMESTEP_MODES,
                   help="'matched': query x_t at its own timestep; 'original': the paper code's pairing (its DDIM "
                   "sampler runs T - max(k,1) steps from the second timestep, then a DDPM step in "
                   "[1000k/T, 1000(k+1)/T) is queried) " + _preset_default("timestep_mode"))
    p.add_argument("--frozen_copy", action=argparse.BooleanOptionalAction,
                   help="keep a whole frozen UNet (the original code's layout; on the second of --devices when "
                   "given) rather than frozen copies of the trained tensors only " + _preset_default("frozen_copy"))
    p.add_argument("--save_path", "--out", dest="save_path", default=d["save_path"].default,
                   help="outputs go to SAVE_PATH/NAME/")
    p.add_argument("--save_every", type=int, default=0, help="checkpoint (weights, optimizer, RNG) every N "
                   "iterations; 0: never")
    p.add_argument("--save_format", default="both", choices=SAVE_FORMATS,
                   help="'full': diffusers-NAME.pt (the whole UNet), 'trained': NAME.safetensors (only the "
                   "trained parameters), 'both'")
    p.add_argument("--save_precision", default=d["save_precision"].default, choices=list(SAVE_PRECISIONS),
                   help="dtype of the saved weights; fp16 halves the files (checkpoints for --resume stay fp32)")
    p.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction,
                   help="recompute UNet/transformer activations in the backward pass: less memory for full/noxattn "
                   "(default: on for FLUX.1, else off)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (pays off on GPUs, long runs)")
    p.add_argument("--optimizer", default=d["optimizer"].default, choices=OPTIMIZERS,
                   help="'adam' (the paper's) or 'adam8bit' (bitsandbytes' 8-bit Adam: a quarter of Adam's state "
                   "memory, which matters for noxattn/full at SD scale; needs pip install bitsandbytes)")
    p.add_argument("--resume", help="checkpoint file to continue from: the same settings (a longer --iterations "
                   "is the only change allowed; the seed is the checkpoint's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder of the same name "
                   "(refused without it, so that no run is lost)")
    p.add_argument("--name", help="output folder name (default encodes the hyperparameters)")
    # -- LoRA training and exports (esd.lora_train, esd.export) --
    p.add_argument("--lora_rank", type=int, help="train the erasure as a LoRA of this rank (peft) on the Linear/"
                   "Conv2d layers the train method selects; the biases and norms it selects stay the base model's. "
                   "Writes lora-NAME.safetensors (kohya layout; SD3/FLUX: diffusers' transformer layout) beside the "
                   "merged weights")
    p.add_argument("--lora_alpha", type=float, help="the LoRA's alpha; its update is (alpha / rank) B A (default: "
                   "the rank, as diffusers' LoRA examples)")
    add_train_export_arguments(p)
    # Robust training (esd/train/robust.py): AdvUnlearn-style adversarial rounds and a preservation term.

    p.add_argument("--adversarial", choices=adversarial_choices(),
                   help="robust ESD: every --adv_every iterations, attack the model being trained ('prefix': "
                   "UnlearnDiffAtk's real-token prefix; 'inversion': one learned token) and train on the conditioning "
                   "found as well as on the concept, with the concept's ESD target (default: off)")
    p.add_argument("--adv_every", type=int, default=d["adv_every"].default,
                   help="an attack round before every N-th iteration (default: %(default)s)")
    p.add_argument("--adv_steps", type=int, default=d["adv_steps"].default,
                   help="attack steps per round; each round continues from the last (default: %(default)s)")
    p.add_argument("--adv_tokens", type=int, default=d["adv_tokens"].default,
                   help="prefix: adversarial tokens k (default: %(default)s)")
    p.add_argument("--adv_references", type=int, default=d["adv_references"].default,
                   help="the frozen model's images of the concept the attack explains, drawn once (default: "
                   "%(default)s)")
    p.add_argument("--adv_memory", type=int, default=d["adv_memory"].default,
                   help="train on the adversarial conditionings of the last N rounds, each row one drawn at random, "
                   "not only the last round's (default: %(default)s)")
    p.add_argument("--retain_prompts", help="prompts whose predictions must not change: a text file, one prompt a "
                   "line, or a prompt CSV with a 'prompt' column; adds weight x MSE(trained, frozen) on them")
    p.add_argument("--retain_weight", type=float, default=d["retain_weight"].default,
                   help="weight of the --retain_prompts term (AdvUnlearn's gamma) (default: %(default)s)")
    p.add_argument("--train_text_encoder", action="store_true",
                   help="also train the text encoder's transformer layers (AdvUnlearn's robust module; SD 1.x/2.x, "
                   "--save_format trained: its tensors are saved beside the UNet's under 'text_encoder.')")
    p.add_argument("--text_encoder_lr", type=float,
                   help="with --train_text_encoder: the text encoder's learning rate (default: --lr)")


def config_from_args(args: argparse.Namespace) -> ESDConfig:
    fields = ESDConfig.__dataclass_fields__
    values = {k: v for k, v in vars(args).items() if k in fields}
    return ESDConfig(**{**values, **train_export_config(args)})


def cmd_train(args) -> int:
    parse_devices(args.devices)  # first: the settings' checks read the base model's configs (a hub id: the hub)
    result = train_esd(config_from_args(args))
    print(f"saved to {result.output_dir} ({result.seconds:.1f} s of training)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="esd", description="Erase concepts from Stable Diffusion models with ESD.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    p = sub.add_parser("train", help="erase a concept from a model's weights")
    add_train_arguments(p)
    p.set_defaults(func=cmd_train)
    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands():
    """Other modules add their subcommands here (each: a function taking the subparsers)."""
    return commands.REGISTERED


def main(argv: list[str] | None = None) -> int:
    # transformers notes at import that CLIP's image processor falls back to PIL without
    # torchvision (we never use that processor), and both libraries draw loading bars: the CLI
    # keeps its own single progress bar and its errors to one line.
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as e:  # bad input or an unwritable output: one line, no traceback
        if os.environ.get("ESD_DEBUG"):  # ESD_DEBUG=1 shows the traceback
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"esd {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line and the shell's code for SIGINT, 128 + 2
        if os.environ.get("ESD_DEBUG"):
            raise
        print(f"esd {args.command}: interrupted; {INTERRUPTED_BY_COMMAND.get(args.command, INTERRUPTED)}",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
