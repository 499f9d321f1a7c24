"""The settings of an erasure that every run has, each declared once with its default, its help and its flag
(``esd train``'s flags are generated from them, :mod:`esd.flags`), and the tables of their choices. The
extensions declare their own: :class:`esd.train.lora.LoraSettings`, :class:`esd.train.robust_settings.RobustSettings`,
:class:`esd.train.text_encoder.TextEncoderSettings`; :class:`esd.train.config.ESDConfig` is all of them."""

from dataclasses import dataclass

from esd.core.methods import METHOD_CHOICES, methods_help
from esd.core.precision import PRECISIONS, SAVE_PRECISIONS
from esd.core.settings import setting
from esd.families.sources import DEFAULT_BASE_MODEL
from esd.train.presets import DEFAULT_PRESET, PRESETS, preset_default

# -- choice tables -----------------------------------------------------------------------------
SAMPLER_MODELS = ("frozen", "trained")  # which weights sample x_t
SAMPLER_SCHEDULERS = ("ddim", "model")  # DDIM (the paper's sampler) or the model's own scheduler class
TIMESTEP_MODES = ("matched", "original")  # the query timestep: x_t's own, or the paper code's pairing
# SDXL's unconditional prompt, for e0 (the target) and for the sampler's unconditional branch (x_t):
# "empty": "" encoded through both text encoders, for both (what esd_sdxl.py builds e0 from: negative_prompt="");
# "zeros": zero embeddings (hidden states and pooled; time ids kept) for both, diffusers' force_zeros_for_empty_prompt;
# "official": esd_sdxl.py's mix: x_t sampled with zero embeddings (its pipeline call passes no negative prompt,
#   so SDXL's force_zeros_for_empty_prompt applies), e0 from the encoded "". Other families ignore the setting.
SDXL_UNCONDS = ("empty", "zeros", "official")
SAVE_FORMATS = ("both", "full", "trained")
OPTIMIZERS = ("adam", "adam8bit")


@dataclass
class TrainSettings:
    """``None`` in a preset field means "from ``preset``" (resolved by ESDConfig)."""

    prompt: str = setting(help="concept to erase, e.g. 'nudity' or 'Van Gogh'", required=True)
    train_method: str = setting(help="which parameters train; " + methods_help(),
                                choices=METHOD_CHOICES, metavar="METHOD", required=True)
    preset: str = setting(DEFAULT_PRESET, "'paper': the paper's original code (trained model samples x_t with DDIM, "
                          "original timestep pairing, fresh x_t every iteration, whole frozen copy, lr 1e-5, 1000 "
                          "iterations); 'official': the current official esd_sd.py (frozen model samples x_t with "
                          "the model's own scheduler, query at x_t's timestep, lr 5e-5, 200 iterations; on SDXL "
                          "esd_sdxl.py's guidance 2, eta 0, lr 2e-4 for esd-x/esd-x-strict else 1e-5, --sdxl_uncond "
                          "official; SDXL base's Euler scheduler needs --sampler_scheduler ddim); 'fast': trajectory "
                          "reuse (default). Explicit flags override the preset", choices=tuple(PRESETS))
    base_model: str = setting(DEFAULT_BASE_MODEL, "hub id, local diffusers folder, or 'toy' (the shipped toy model)")
    ckpt_path: str | None = setting(None, "original single-file checkpoint (.ckpt/.safetensors) to erase from: SD "
                                    "1.x/2.x/SDXL, or an SD3/SD3.5 or FLUX.1 transformer (which needs --ckpt_config)")
    ckpt_config: str | None = setting(None, "local diffusers folder (or hub id) with the configs of --ckpt_path, so "
                                      "that single-file loading works offline; for an SD3/FLUX transformer file, the "
                                      "pipeline whose text encoders, scheduler and VAE it is used with")
    erase_from: str | None = setting(None, "erase the concept from this prompt only (e.g. --prompt 'cowboy hat' "
                                     "--erase_from cowboy): x_t and the trained model use it, and the target's base "
                                     "is its frozen prediction")
    separator: str | None = setting(None, "split --prompt into several concepts on this string (one drawn per "
                                    "iteration)", flags=("--separator", "--seperator"))
    # -- preset fields (None: the preset's value; see esd.train.presets) --
    sampler_model: str | None = setting(None, "which weights sample x_t: 'frozen' (the current official code) or "
                                        "'trained' (the paper's original code) " + preset_default("sampler_model"),
                                        choices=SAMPLER_MODELS)
    sampler_scheduler: str | None = setting(None, "the scheduler that samples x_t: 'ddim' (the paper's) or 'model' "
                                            "(the model's own class, PNDM for SD1.4, as the current official code) "
                                            + preset_default("sampler_scheduler"), choices=SAMPLER_SCHEDULERS)
    timestep_mode: str | None = setting(None, "'matched': query x_t at its own timestep; 'original': the paper "
                                        "code's pairing (its DDIM sampler runs T - max(k,1) steps from the second "
                                        "timestep, then a DDPM step in [1000k/T, 1000(k+1)/T) is queried) "
                                        + preset_default("timestep_mode"), choices=TIMESTEP_MODES)
    pool_size: int | None = setting(None, "the fast path: sample this many whole trajectories with the frozen model "
                                    "at once and train on each of their (x_t, t, e0, ep) once before sampling anew; "
                                    "0: the paper's loop, a fresh partial trajectory every iteration (needed for "
                                    "--sampler_model trained) " + preset_default("pool_size"))
    frozen_copy: bool | None = setting(None, "keep a whole frozen UNet (the original code's layout; on the second of "
                                       "--devices when given) rather than frozen copies of the trained tensors only "
                                       + preset_default("frozen_copy"))
    ddim_steps: int | None = setting(None, "steps T of the sampler's schedule; the stopping step is drawn among them "
                                     + preset_default("ddim_steps"))
    start_guidance: float | None = setting(None, "classifier-free guidance of the sampler that makes x_t "
                                           + preset_default("start_guidance"))
    negative_guidance: float | None = setting(None, "eta of the paper's target e0 - eta*(ep - e0), with --erase_from "
                                              "e_from - (eta+1)*(ep - e0) " + preset_default("negative_guidance") + ". "
                                              "The official codes' eta is ours + 1 (esd_sd.py's default 2 is our 1, "
                                              "esd_sdxl.py's 1 our 0)")
    lr: float | None = setting(None, "Adam learning rate " + preset_default("lr"))
    iterations: int | None = setting(None, "training iterations " + preset_default("iterations"))
    # -- the rest --
    image_size: int | None = setting(None, "training image size in pixels (default: the model's native size, 512 for "
                                     "SD1.x); a multiple of the VAE factor")
    batch_size: int = setting(1, "latents per iteration (sharing t and concept)")
    seed: int | None = setting(None, "random seed (default: drawn and recorded in args.json)")
    devices: str | None = setting(None, "'0' (one GPU), '0,1' (frozen model on the second GPU, like the original "
                                  "code), or 'cpu'; default: the first GPU if any, else the CPU",
                                  flags=("--devices", "--device"))
    mixed_precision: str | None = setting(None, "dtype of the frozen weights and text encoders; trained parameters "
                                          "and the loss stay fp32 (default: bf16 for FLUX.1, else no)",
                                          choices=tuple(PRECISIONS))
    sdxl_uncond: str | None = setting(None, "SDXL's unconditional prompt, for e0 (the target) and the sampler that "
                                      "makes x_t: 'empty' encodes \"\" for both; 'zeros' uses zero embeddings "
                                      "(hidden states and pooled) for both, diffusers' force_zeros_for_empty_prompt; "
                                      "'official' is esd_sdxl.py's mix: x_t sampled with zero embeddings, e0 from "
                                      "the encoded \"\" " + preset_default("sdxl_uncond"), choices=SDXL_UNCONDS)
    save_path: str = setting("models/", "outputs go to SAVE_PATH/NAME/", flags=("--save_path", "--out"))
    save_every: int = setting(0, "checkpoint (weights, optimizer, RNG) every N iterations; 0: never")
    save_format: str = setting("both", "'full': diffusers-NAME.pt (the whole UNet), 'trained': NAME.safetensors "
                               "(only the trained parameters), 'both'", choices=SAVE_FORMATS)
    save_precision: str = setting("fp32", "dtype of the saved weights; fp16 halves the files (checkpoints for "
                                  "--resume stay fp32)", choices=tuple(SAVE_PRECISIONS))
    gradient_checkpointing: bool | None = setting(None, "recompute UNet/transformer activations in the backward "
                                                  "pass: less memory for full/noxattn (default: on for FLUX.1, else "
                                                  "off)")
    compile: bool = setting(False, "torch.compile the UNet (pays off on GPUs, long runs)")
    optimizer: str = setting("adam", "'adam' (the paper's) or 'adam8bit' (bitsandbytes' 8-bit Adam: a quarter of "
                             "Adam's state memory, which matters for noxattn/full at SD scale; needs pip install "
                             "bitsandbytes)", choices=OPTIMIZERS)
    resume: str | None = setting(None, "checkpoint file to continue from: the same settings (a longer --iterations "
                                 "is the only change allowed; the seed is the checkpoint's)")
    overwrite: bool = setting(False, "replace an existing run folder of the same name (refused without it, so that "
                              "no run is lost)")
    name: str | None = setting(None, "output folder name (default encodes the hyperparameters)")
