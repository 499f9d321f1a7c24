"""Image generation from prompt CSVs: ``esd generate`` / ``eval-scripts/generate-images.py``.

One PNG per (row, sample): ``<case>_<i>.png`` as in the original evaluation.
Image i of a row starts from the i-th slice of ``randn((num_samples, C, h, w))``
drawn from a CPU generator seeded with the row's seed: the original script's
latents, independent of batching and of how rows are sharded over processes.
Work is cut into fixed batches of consecutive images; a batch whose files all
exist is skipped, any other is generated whole, so a resumed run writes the same
bytes as an uninterrupted one on the same device. Files are written to a temporary
name and renamed, so a kill leaves no half-written PNG.

A folder is bound to what made its pixels, because skipping existing files is only
sound when they came from the same settings. ``generation.json`` holds
``fingerprint_settings``: the base model (a hub id by name; a local folder, 'toy'
included, by a hash of its files' relative paths, sizes and sha256), the erased
weights' sha256, scheduler, steps, guidance, resolved image size, precision,
pipeline, SLD preset (under ``--pipeline sld`` only), safety checker and samples per
row; ``settings_fingerprint``, their sha256; ``rows``, case -> prompt and seed; and
``fingerprint``, a sha256 over both, which ``esd evaluate`` copies into summary.json.
Device and batch size are recorded in ``settings`` but not fingerprinted: they change
at most the rounding of a pixel, not what is drawn. Before any model loads, a run is
refused (one line naming what differs) when the folder was made with other settings,
records one of its cases with another prompt or seed, or holds a file the run would
skip that no record accounts for; ``--overwrite`` starts the folder over. A compatible
run over other cases of the CSV adds its rows: generation.json is re-read, merged and
rewritten under an exclusive lock on ``.generation.lock``, so generators sharing a
folder never lose each other's rows.
"""

from dataclasses import asdict
from pathlib import Path

import diffusers
import pandas as pd
import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from esd.core.precision import PRECISIONS
from esd.families.flow import pack_latents
from esd.families.models import load_pipeline, vae_scale_factor_of
from esd.families.registry import denoiser_of, detect_family
from esd.families.sources import native_resolution_of, resolve_source, source_family
from esd.formats.generation_record import check_folder, folder_sha256, sha256, write_record
from esd.formats.prompt_csv import parse_seed, read_prompt_table
from esd.formats.records import atomic_write, check_name, environment_record
from esd.formats.weights import apply_erased_weights
from esd.generate.config import SCHEDULERS, GenerationConfig, Job


def read_prompt_rows(cfg: GenerationConfig) -> dict[str, dict]:
    """case -> {"prompt", "seed"} of the rows in [from_case, till_case], in file order. Prompt CSVs
    come from third parties, so each kept row is checked before any model loads: its case must be a
    plain file name (it becomes one) and unique (two rows would write the same files), its prompt
    not empty, its seed an integer (see parse_seed)."""
    table = read_prompt_table(cfg.prompts_path)
    columns = list(table.columns)
    needed = {"--prompt_column": cfg.prompt_column, "--seed_column": cfg.seed_column,
              "--case_column": cfg.case_column}
    missing = [f"{flag} {col!r}" for flag, col in needed.items() if col not in columns]
    if missing:
        raise ValueError(f"{cfg.prompts_path}: no column {', '.join(missing)}; columns found: {', '.join(columns)}")
    number = pd.to_numeric(table[cfg.case_column], errors="coerce")  # numbers only filter; text cases are kept
    keep = ~(number < cfg.from_case) & ~(number > cfg.till_case if cfg.till_case is not None else False)
    rows, first_row = {}, {}
    for row in table.index[keep]:
        where = f"{cfg.prompts_path}: row {row + 1} (line {row + 2}),"
        case = check_name(table.at[row, cfg.case_column], f"{where} --case_column {cfg.case_column!r}:")
        if case in rows:
            raise ValueError(f"{where} --case_column {cfg.case_column!r}: {case!r} repeats row {first_row[case] + 1} "
                             "(a case names its files, so each may appear once)")
        prompt = table.at[row, cfg.prompt_column]
        if not prompt.strip():
            raise ValueError(f"{where} --prompt_column {cfg.prompt_column!r}: {prompt!r} is an empty prompt")
        seed = parse_seed(table.at[row, cfg.seed_column], f"{where} --seed_column {cfg.seed_column!r}:")
        rows[case], first_row[case] = {"prompt": prompt, "seed": seed}, row
    return rows


def jobs_of(rows: dict[str, dict], num_samples: int) -> list[Job]:
    """One job per (row, sample), in row order."""
    return [Job(case, i, row["prompt"], row["seed"]) for case, row in rows.items() for i in range(num_samples)]


def read_jobs(cfg: GenerationConfig) -> list[Job]:
    """One job per (row, sample), in file order; rows outside [from_case, till_case] are skipped."""
    return jobs_of(read_prompt_rows(cfg), cfg.num_samples)


def batches(jobs: list[Job], size: int) -> list[list[Job]]:
    return [jobs[i:i + size] for i in range(0, len(jobs), size)]


def shard(items: list, index: int, count: int) -> list:
    """Contiguous share ``index`` of ``count``: together the shares hold every item once."""
    n = len(items)
    return items[index * n // count:(index + 1) * n // count]


def initial_latents(job: Job, num_samples: int, shape: tuple) -> torch.Tensor:
    """The original script's latents: randn((num_samples, *shape)) from a CPU generator seeded
    with the row's seed; image ``job.index`` takes its slice."""
    g = torch.Generator("cpu").manual_seed(job.seed)
    return torch.randn((num_samples, *shape), generator=g)[job.index]


def resolved_image_size(cfg: GenerationConfig) -> int:
    """--image_size, or the model's native size, read from its configs alone: the size is part of the
    fingerprint, which is checked before any model loads. SD3/FLUX pipelines (flow matching) are checked
    here too: they sample with --scheduler flow-euler only, which the UNet pipelines cannot, and have no SLD."""
    source = resolve_source(cfg.base_model)
    family = source_family(cfg.base_model)
    flow = family is not None and family.flow
    if flow != (cfg.scheduler == "flow-euler"):
        raise ValueError(f"--scheduler {cfg.scheduler} does not fit {cfg.base_model!r}: SD3/FLUX pipelines sample "
                         "with --scheduler flow-euler, the UNet pipelines with any other")
    if flow and cfg.pipeline != "sd":
        raise ValueError(f"--pipeline {cfg.pipeline} is for the SD 1.x UNet; SD3/FLUX take --pipeline sd")
    factor = vae_scale_factor_of(source)
    size = cfg.image_size or native_resolution_of(cfg.base_model)
    if size % factor:
        raise ValueError(f"--image_size {size} is not a multiple of the VAE factor {factor}")
    if family is not None and size % (family.patch * factor):
        raise ValueError(f"--image_size {size} is not a multiple of {family.patch * factor} (the VAE factor times the "
                         "transformer's 2x2 patches)")
    return size


def pixel_settings(cfg: GenerationConfig, weights_sha256: str | None, size: int) -> dict:
    """Everything besides the rows that decides the pixels; its digest is the settings fingerprint.
    A hub model is known by its id; a local folder by its files, so an edited or retrained model
    under the same path counts as another model. Values are normalised (7 and 7.0 are one guidance)."""
    source = resolve_source(cfg.base_model)
    local = Path(source).is_dir()
    return {"base_model": None if local else source, "base_model_sha256": folder_sha256(source) if local else None,
            "weights_sha256": weights_sha256, "scheduler": cfg.scheduler, "ddim_steps": int(cfg.ddim_steps),
            "guidance_scale": float(cfg.guidance_scale), "image_size": int(size),
            "mixed_precision": cfg.mixed_precision, "pipeline": cfg.pipeline,
            "sld_preset": cfg.sld_preset if cfg.pipeline == "sld" else None,  # the sd pipeline ignores it
            "safety_checker": bool(cfg.safety_checker), "num_samples": int(cfg.num_samples),
            **flow_pipeline_class(cfg.base_model)}


def flow_pipeline_class(base_model: str) -> dict:
    """{"pipeline_class": StableDiffusion3Pipeline | FluxPipeline} for a flow-matching model, else {}: the
    UNet pipelines' fingerprints predate the key and stay as they were."""
    family = source_family(base_model)
    return {"pipeline_class": family.pipeline_classes[0]} if family is not None and family.flow else {}


@torch.no_grad()
def draw(pipe, jobs: list[Job], num_samples: int, shape: tuple, *, steps: int, guidance: float, device,
         dtype=None, size: int | None = None, packed: bool = False, output_type: str = "pil", **pipeline_kw):
    """The images of ``jobs`` as ``esd generate`` draws them, whoever asks (``esd attack`` too): each from its
    initial latents (:func:`initial_latents`: the row's seed, image i's slice; ``packed`` 2x2 for FLUX), with
    ancestral noise seeded per image. ``shape``: (C, h, w) of one latent; ``output_type`` as the pipeline's
    ("latent": the final latents x_0)."""
    latents = torch.stack([initial_latents(j, num_samples, shape) for j in jobs])
    latents = pack_latents(latents) if packed else latents
    gens = [torch.Generator("cpu").manual_seed(j.seed * 1000 + j.index) for j in jobs]  # ancestral noise
    size_kw = {"height": size, "width": size} if size else {}
    return pipe([j.prompt for j in jobs], latents=latents.to(device=device, dtype=dtype), num_inference_steps=steps,
                guidance_scale=guidance, generator=gens, output_type=output_type, **size_kw, **pipeline_kw).images


def build_pipeline(cfg: GenerationConfig, device: torch.device):
    pipe = load_pipeline(cfg.base_model, cfg.safety_checker)
    if cfg.safety_checker and getattr(pipe, "safety_checker", None) is None:
        raise ValueError(f"--safety_checker asked for, but {cfg.base_model!r} has no safety checker")
    if cfg.weights_path:
        apply_erased_weights(denoiser_of(pipe), cfg.weights_path, base_model=cfg.base_model,
                             text_encoder=getattr(pipe, "text_encoder", None))  # --train_text_encoder's tensors
    pipe.scheduler = getattr(diffusers, SCHEDULERS[cfg.scheduler]).from_config(pipe.scheduler.config)
    if cfg.pipeline == "sld":
        from diffusers import StableDiffusionPipelineSafe  # deprecated in diffusers: only for --pipeline sld

        pipe = StableDiffusionPipelineSafe(**{**pipe.components, "safety_checker": pipe.components.get(
            "safety_checker"), "feature_extractor": pipe.components.get("feature_extractor")},
            requires_safety_checker=cfg.safety_checker)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, PRECISIONS[cfg.mixed_precision])


def generate_images(cfg: GenerationConfig, log=print) -> dict:
    """Generate every missing image of ``cfg`` (with --overwrite, every image); returns counts. The prompt
    rows and the folder are checked before any model loads. Under ``accelerate launch`` the batches are
    split over the processes (each batch to exactly one); the main process writes generation.json."""
    from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig  # deprecated: --pipeline sld

    state = PartialState(cpu=cfg.device == "cpu")
    device = torch.device(cfg.device) if cfg.device and cfg.device != "cpu" and state.num_processes == 1 \
        else state.device
    rows = read_prompt_rows(cfg)
    jobs = jobs_of(rows, cfg.num_samples)
    out = Path(cfg.save_path)
    size = resolved_image_size(cfg)
    weights_sha256 = sha256(cfg.weights_path) if cfg.weights_path else None
    settings = pixel_settings(cfg, weights_sha256, size)
    if not cfg.overwrite:
        check_folder(out, settings, rows, cfg.num_samples)
    pipe = build_pipeline(cfg, device)  # before the folder is made: bad weights leave nothing behind
    out.mkdir(parents=True, exist_ok=True)
    denoiser = denoiser_of(pipe)
    family = detect_family(denoiser)  # FLUX reads its latents packed 2x2 into tokens
    channels = denoiser.config.in_channels // family.packed_channels
    shape = (channels, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor)
    if state.is_main_process:
        run = {"settings": asdict(cfg), "resolved_image_size": size,
               "safety_checker": "on" if cfg.safety_checker else "off", "weights_sha256": weights_sha256,
               "processes": state.num_processes, "environment": environment_record()}
        record = write_record(out, cfg, settings, rows, run)
        log(f"{len(jobs)} images to {out} (fingerprint {record['fingerprint'][:12]}); safety checker "
            f"{'ON' if cfg.safety_checker else 'OFF'}; scheduler {cfg.scheduler}; {state.num_processes} process(es)")
    state.wait_for_everyone()  # --overwrite: the old images are gone before any process writes new ones
    sld = getattr(SafetyConfig, cfg.sld_preset.upper()) if cfg.pipeline == "sld" else {}
    made = skipped = 0
    mine = shard(batches(jobs, cfg.batch_size), state.process_index, state.num_processes)
    for batch in tqdm(mine, disable=not state.is_main_process, desc="generate"):
        if not cfg.overwrite and all((out / j.filename).exists() for j in batch):
            skipped += len(batch)
            continue
        images = draw(pipe, batch, cfg.num_samples, shape, steps=cfg.ddim_steps, guidance=cfg.guidance_scale,
                      device=device, dtype=PRECISIONS[cfg.mixed_precision], size=size,
                      packed=family.packed_channels > 1, **sld)
        for j, image in zip(batch, images):
            if cfg.overwrite or not (out / j.filename).exists():
                atomic_write(out / j.filename, lambda p, im=image: im.save(p, format="PNG"))
                made += 1
    return {"generated": made, "skipped": skipped, "process": state.process_index,
            "processes": state.num_processes, "files": [j.filename for b in mine for j in b]}
