"""LoRA and export for SD3/FLUX erasures, on tiny random pipelines built here: the LoRA files (trained with
``--lora_rank`` and exported with ``esd export --format lora``) load through the pipelines' own
``load_lora_weights`` into the erased transformer; ``--format diffusers`` reloads; ``single-file`` is refused."""

import json
import re

import pytest
import torch
from diffusers import DiffusionPipeline
from helpers import every, flow_train
from safetensors import safe_open
from safetensors.torch import load_file

from esd import load_erased_unet, select_parameters
from esd.cli import main
from esd.families.models import load_denoiser
from esd.families.sources import pipeline_load_kwargs
from esd.formats.exports import ExportSettings, run_export
from esd.formats.lora import fuse_into

KINDS = ("sd3", "flux-dev")


def pipeline(folder) -> DiffusionPipeline:
    return DiffusionPipeline.from_pretrained(folder, **pipeline_load_kwargs(DiffusionPipeline.load_config(folder)))


def lora_into_transformer(folder, lora) -> dict:
    """The base pipeline's transformer after ``load_lora_weights`` at its default scale, fused, without peft's
    renames."""
    pipe = pipeline(folder)
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora()
    return {k.replace(".base_layer", ""): v for k, v in pipe.transformer.state_dict().items() if "lora_" not in k}


def metadata(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


@pytest.mark.parametrize("kind", KINDS)
def test_trained_lora_loads_in_the_pipeline_to_the_merged_erasure(kind, flow_models, tmp_path):
    """--lora_alpha 4 at rank 2 (scale 2, not 1): the file's lora_B carries the scale, so the pipeline, which
    reads a file without alphas at scale 1, gets exactly the run's merged weights."""
    run = flow_train(flow_models[kind], tmp_path, "--train_method", "mmdit-x", "--lora_rank", "2", "--lora_alpha",
                    "4", "--iterations", "2", "--pool_size", "1", "--name", "run")
    base = load_denoiser(flow_models[kind])
    layers = sorted(n.removesuffix(".weight") for n in select_parameters(base, "mmdit-x") if n.endswith(".weight"))
    merged = load_file(run / "run.safetensors")
    assert sorted(merged) == [f"{m}.weight" for m in layers]  # only the factors trained: biases stay the base's
    lora = load_file(run / "lora-run.safetensors")
    assert set(lora) == {f"transformer.{m}.lora_{p}.weight" for m in layers for p in "AB"}
    assert every(lora[f"transformer.{m}.lora_A.weight"].shape[0] == 2 for m in layers)
    meta = metadata(run / "lora-run.safetensors")
    assert (meta["esd_train_method"], meta["esd_concept"], meta["esd_lora_rank"]) == ("mmdit-x", "cat", "2")
    assert meta["esd_base_model"] == flow_models[kind]
    assert "diffusers' transformer layout" in (run / "README.md").read_text()  # the card does not say kohya

    erased = load_erased_unet(run / "run.safetensors", flow_models[kind]).state_dict()
    loaded = lora_into_transformer(flow_models[kind], run / "lora-run.safetensors")
    assert loaded.keys() == erased.keys()
    for k in erased:
        torch.testing.assert_close(loaded[k], erased[k], rtol=1e-5, atol=1e-6, msg=k)
    assert any(not torch.equal(erased[f"{m}.weight"], base.state_dict()[f"{m}.weight"]) for m in layers)


@pytest.fixture(scope="module")
def plain_runs(flow_models, tmp_path_factory):
    """kind -> a plain (full fine-tuning) mmdit-x run: its weights and biases changed."""
    root = tmp_path_factory.mktemp("plain")
    return {k: flow_train(flow_models[k], root, "--train_method", "mmdit-x", "--iterations", "2", "--pool_size", "1",
                         "--name", k) for k in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_exported_full_rank_lora_loads_in_the_pipeline_to_the_erasure(kind, flow_models, plain_runs, tmp_path,
                                                                      capsys):
    """Every changed weight comes back to float tolerance; the changed biases, which a LoRA cannot hold, stay
    the base model's and are named in the warning and the header."""
    run, out = plain_runs[kind], tmp_path / "lora.safetensors"
    assert main(["export", str(run), "--format", "lora", "--rank", "full", "--dtype", "fp32", "--out", str(out)]) == 0
    assert "warning: a LoRA cannot hold biases" in capsys.readouterr().out
    base = load_denoiser(flow_models[kind]).state_dict()
    erased = load_erased_unet(run / f"{kind}.safetensors", flow_models[kind]).state_dict()
    meta = metadata(out)
    assert (meta["esd_train_method"], meta["esd_concept"], meta["esd_lora_rank"]) == ("mmdit-x", "cat", "full")
    assert every(k.startswith("transformer.") and ".lora_" in k for k in load_file(out))
    dropped = set(json.loads(meta["esd_lora_dropped"]))
    assert dropped and every(n.endswith(".bias") for n in dropped)

    loaded = lora_into_transformer(flow_models[kind], out)
    changed = [k for k in erased if not torch.equal(erased[k], base[k])]
    assert set(changed) - dropped and every(k.endswith(".weight") for k in set(changed) - dropped)
    for k in erased:
        torch.testing.assert_close(loaded[k], base[k] if k in dropped else erased[k], rtol=1e-5, atol=1e-6, msg=k)


def test_exported_lora_of_mixed_ranks_loads_at_each_layers_scale(flow_models, plain_runs, tmp_path):
    """--rank auto gives layers different ranks; without alphas diffusers must still read each at scale 1
    (its rank_pattern with a matching alpha_pattern), giving the factors' own product."""
    out = tmp_path / "auto.safetensors"
    export = run_export(str(plain_runs["sd3"]), ExportSettings("lora", out, rank="auto", max_rel_error=0.05,
                                                               dtype="fp32"), log=lambda *_: None)
    assert len({f.rank for f in export.layers.values()}) > 1
    want = fuse_into(load_denoiser(flow_models["sd3"]), export).state_dict()
    loaded = lora_into_transformer(flow_models["sd3"], out)
    for k in want:
        torch.testing.assert_close(loaded[k], want[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("kind", KINDS)
def test_diffusers_export_reloads_with_the_erased_transformer(kind, flow_models, plain_runs, tmp_path):
    run, out = plain_runs[kind], tmp_path / "pipe"
    assert main(["export", str(run), "--format", "diffusers", "--dtype", "fp32", "--out", str(out)]) == 0
    pipe = pipeline(str(out))
    base = pipeline(flow_models[kind])
    assert type(pipe) is type(base) and pipe.components.keys() == base.components.keys()
    erased = load_erased_unet(run / f"{kind}.safetensors", flow_models[kind]).state_dict()
    got = pipe.transformer.state_dict()
    assert got.keys() == erased.keys() and every(torch.equal(got[k], erased[k]) for k in erased)
    assert json.loads((out / "esd_export.json").read_text())["train_method"] == "mmdit-x"


def test_single_file_is_refused_in_one_line_before_any_work(flow_models, plain_runs, tmp_path, capsys):
    out = tmp_path / "model.safetensors"
    rc = main(["export", str(plain_runs["sd3"]), "--format", "single-file", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and not out.exists()
    assert re.search(r"--format single-file is not available for sd3 erasures .*; use lora or diffusers", err), err
    rc = main(["train", "--prompt", "cat", "--base_model", flow_models["flux-dev"], "--devices", "cpu",
               "--train_method", "mmdit-x", "--save_path", str(tmp_path), "--name", "bad", "--export", "single-file"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and not (tmp_path / "bad").exists()
    assert "--export single-file is not available for flux erasures" in err, err
