"""``esd export``: the LoRA, single-file and diffusers exports load in diffusers and give back the erased UNet.

The erasures are the trained parameters of a method, perturbed by seeded noise and written with the same
writer as ``esd train`` (trained-parameters safetensors beside an args.json): what export reads, without
minutes of training on two CPU cores. Noise is full rank, the hardest case for the SVD truncation.
"""

import json
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils import convert_unet_state_dict_to_peft
from helpers import every
from safetensors import safe_open
from safetensors.torch import save_file
from tiny import make_run

from esd.cli import main
from esd.families.sources import TOY_MODEL_DIR
from esd.formats.exports import ExportSettings, run_export

FAMILIES = ("sd1", "sd2", "sdxl", "toy")


def model_folder(family, tiny_models) -> str:
    return str(TOY_MODEL_DIR) if family == "toy" else tiny_models[family]


def export(run, out, fmt, **kw):
    return run_export(str(run), ExportSettings(fmt, Path(out), **{"dtype": "fp32", **kw}), log=lambda *_: None)


def lora_into_unet(pipe, path) -> dict:
    """Fuse the LoRA file into ``pipe.unet`` as diffusers reads it: through ``load_lora_weights`` when peft
    is installed; else through diffusers' own kohya and peft key conversions, adding (alpha / rank) up @ down
    here. A name diffusers maps to no module is a KeyError."""
    try:
        import peft  # noqa: F401
    except ImportError:
        alpha = one_alpha(path)
        kw = {"unet_config": pipe.unet.config} if isinstance(pipe, StableDiffusionXLPipeline) else {}
        state, _ = type(pipe).lora_state_dict(str(path), **kw)
        state = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in state.items()})
        modules = dict(pipe.unet.named_modules())
        with torch.no_grad():
            for key, down in state.items():
                if ".lora_A." in key:
                    up = state[key.replace(".lora_A.", ".lora_B.")]
                    weight = modules[key.split(".lora_A.")[0]].weight
                    weight += alpha / down.shape[0] * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
        return pipe.unet.state_dict()
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora()
    return {k.replace(".base_layer", ""): v for k, v in pipe.unet.state_dict().items() if "lora_" not in k}


def one_alpha(path) -> float:
    """Every layer's alpha, the same for all (diffusers misnames attention layers' alphas in kohya files,
    so per-layer alphas would not reach them)."""
    with safe_open(str(path), "pt") as f:
        alphas = {float(f.get_tensor(k)) for k in f.keys() if k.endswith(".alpha")}
    assert len(alphas) == 1
    return alphas.pop()


def full_rank(f) -> int:
    """The most a layer's factors can have: min(out, in * kh * kw)."""
    return min(f.up.shape[0], f.down[0].numel())


def rel_error(new: dict, erased: dict, base: dict) -> float:
    """||fused - erased|| / ||erased - base|| over the erased tensors."""
    num = sum(float((new[n].double() - erased[n].double()).square().sum()) for n in erased)
    den = sum(float((erased[n].double() - base[n].double()).square().sum()) for n in erased)
    return (num / den) ** 0.5


@pytest.mark.parametrize("family", FAMILIES)
def test_full_rank_lora_loads_in_diffusers_and_gives_the_erased_unet(family, tiny_models, tmp_path):
    """Every Linear/Conv2d kind (attention, feed-forward, resnet convs, time and SDXL added embeddings,
    conv_in/out, down/upsamplers): the kohya names must be the ones diffusers maps back, SD1/SD2 with
    diffusers names, SDXL with the original input_blocks/output_blocks ones."""
    base = model_folder(family, tiny_models)
    run, base_sd, erased = make_run(base, tmp_path / "run")
    out = tmp_path / "lora.safetensors"
    report = export(run, out, "lora", rank="full")
    assert report.total_rel_error < 1e-6 and not report.dropped
    with safe_open(str(out), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    expected_prefix = "lora_unet_input_blocks_" if family == "sdxl" else "lora_unet_down_blocks_"
    assert any(k.startswith(expected_prefix) for k in keys)
    assert meta["esd_base_model"] == base and meta["esd_concept"] == "cat" and meta["esd_train_method"] == "esd-all"
    assert json.loads(meta["esd_export"])["environment"]["torch"] == torch.__version__
    assert one_alpha(out) == max(f.rank for f in report.layers.values())
    fused = lora_into_unet(DiffusionPipeline.from_pretrained(base), out)
    assert rel_error(fused, erased, base_sd) < 1e-5
    assert every(torch.equal(fused[k], base_sd[k]) for k in base_sd if k not in erased)


def test_lora_error_falls_with_rank_and_auto_meets_its_target(tiny_models, tmp_path):
    """Full-rank noise: rank 1 keeps a little, rank 4 more, full all; the error the file reports is the
    error of what diffusers loads; 'auto' keeps every layer within --max_rel_error."""
    base = tiny_models["sd1"]
    run, base_sd, erased = make_run(base, tmp_path / "run", method="xattn")
    errors = {}
    for rank in (1, 4, "full"):
        out = tmp_path / f"rank-{rank}.safetensors"
        report = export(run, out, "lora", rank=rank)
        measured = rel_error(lora_into_unet(StableDiffusionPipeline.from_pretrained(base), out), erased, base_sd)
        assert measured == pytest.approx(report.total_rel_error, rel=1e-3, abs=1e-5)  # fp32 sums aside
        errors[rank] = measured
        if rank != "full":
            assert every(f.rank == min(rank, full_rank(f)) for f in report.layers.values())
    assert 1 > errors[1] > errors[4] > errors["full"] and errors["full"] < 1e-5
    report = export(run, tmp_path / "auto.safetensors", "lora", rank="auto", max_rel_error=0.5)
    assert every(f.rel_error <= 0.5 for f in report.layers.values())
    assert every(1 < f.rank < full_rank(f) for f in report.layers.values())  # noise: neither 1 nor all
    with safe_open(str(tmp_path / "auto.safetensors"), "pt") as f:
        layers = json.loads(f.metadata()["esd_lora_layers"])
    assert {m: v["rank"] for m, v in layers.items()} == {m: f.rank for m, f in report.layers.items()}


def test_lora_in_fp16_and_dropped_biases_are_reported(tiny_models, tmp_path):
    """xattn trains attn2.to_out.0's bias too: a LoRA cannot hold it, so the export says so and counts it
    in the total error; fp16 factors stay within fp16 rounding of the weights' change."""
    base = tiny_models["sd1"]
    run, base_sd, erased = make_run(base, tmp_path / "run", method="xattn", weights_only=False)
    report = export(run, tmp_path / "l.safetensors", "lora", rank="full", dtype="fp16")
    assert report.dropped and every(n.endswith("to_out.0.bias") for n in report.dropped)
    assert max(f.rel_error for f in report.layers.values()) < 1e-3
    assert report.total_rel_error > 1e-2  # the biases' share
    with safe_open(str(tmp_path / "l.safetensors"), "pt") as f:
        assert set(json.loads(f.metadata()["esd_lora_dropped"])) == set(report.dropped)
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16


@pytest.mark.parametrize("family", FAMILIES)
def test_single_file_loads_offline_and_gives_the_erased_model(family, tiny_models, tmp_path):
    """The original-layout file loads through from_single_file with the base folder as config: the UNet is
    the erased one, VAE and text encoders are the base's, exactly in fp32."""
    base = model_folder(family, tiny_models)
    run, _, erased = make_run(base, tmp_path / "run", method="esd-u", weights_only=False)
    out = tmp_path / "model.safetensors"
    export(run, out, "single-file")
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    loaded = cls.from_single_file(str(out), config=base, local_files_only=True)
    ref = DiffusionPipeline.from_pretrained(base)
    unet = loaded.unet.state_dict()
    assert every(torch.equal(unet[k], erased.get(k, v)) for k, v in ref.unet.state_dict().items())
    for part in ["vae", "text_encoder"] + (["text_encoder_2"] if family == "sdxl" else []):
        a, b = getattr(ref, part).state_dict(), getattr(loaded, part).state_dict()
        assert set(a) <= set(b) and every(torch.equal(a[k], b[k]) for k in a), part


def test_single_file_fp16_by_default_within_rounding(tiny_models, tmp_path):
    run, _, erased = make_run(tiny_models["sd1"], tmp_path / "run", method="xattn")
    out = tmp_path / "model.safetensors"
    assert main(["export", str(run), "--format", "single-file", "--out", str(out)]) == 0
    with safe_open(str(out), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    unet = StableDiffusionPipeline.from_single_file(str(out), config=tiny_models["sd1"],
                                                    local_files_only=True).unet.state_dict()
    assert every(torch.equal(unet[n].float(), v.half().float()) for n, v in erased.items())


def test_diffusers_folder_reloads_with_the_erased_unet(tiny_models, tmp_path):
    base = tiny_models["sdxl"]
    run, _, erased = make_run(base, tmp_path / "run", method="xattn")
    out = tmp_path / "pipe"
    assert main(["export", str(run), "--format", "diffusers", "--out", str(out), "--dtype", "fp32"]) == 0
    pipe = DiffusionPipeline.from_pretrained(out)
    ref = DiffusionPipeline.from_pretrained(base)
    assert isinstance(pipe, StableDiffusionXLPipeline)
    unet = pipe.unet.state_dict()
    assert every(torch.equal(unet[k], erased.get(k, v)) for k, v in ref.unet.state_dict().items())
    assert json.loads((out / "esd_export.json").read_text())["train_method"] == "xattn"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe", "run"]  # no temporary folder left


def test_bad_input_is_one_line_and_nothing_is_replaced(tiny_models, tmp_path, capsys):
    run, _, _ = make_run(tiny_models["sd1"], tmp_path / "run", method="xattn")
    existing = tmp_path / "have.safetensors"
    existing.write_bytes(b"keep me")
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "a.txt").write_text("keep")
    cases = [(["--format", "lora", "--out", existing], "already exists; pass --overwrite"),
             (["--format", "lora", "--out", tmp_path / "x.bin"], "must end in .safetensors"),
             (["--format", "lora", "--out", tmp_path / "x.safetensors", "--rank", "0"], "--rank '0' is not valid"),
             (["--format", "diffusers", "--out", folder, "--overwrite"], "not a diffusers pipeline folder"),
             (["--format", "lora", "--out", tmp_path / "x.safetensors", "--base_model", tmp_path / "nope"],
              "does not exist")]
    for args, message in cases:
        capsys.readouterr()
        assert main(["export", str(run), *map(str, args)]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and message in err[0], err
    assert existing.read_bytes() == b"keep me" and (folder / "a.txt").read_text() == "keep"
    missing = tmp_path / "missing"
    assert main(["export", str(missing), "--format", "lora", "--out", str(tmp_path / "y.safetensors")]) == 2
    bare = tmp_path / "bare.safetensors"
    save_file({"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": torch.zeros(32, 32)}, bare)
    capsys.readouterr()
    assert main(["export", str(bare), "--format", "lora", "--out", str(tmp_path / "z.safetensors")]) == 2
    assert "pass --base_model" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare.safetensors", "have.safetensors", "notes", "run"]


def test_an_output_that_is_an_input_is_refused_even_with_overwrite(tiny_models, tmp_path, capsys):
    """--out onto the run's own weights, or onto the base model folder it reads, destroys an input."""
    import shutil

    base = tmp_path / "toycopy"
    shutil.copytree(tiny_models["sd1"], base)
    run, _, _ = make_run(str(base), tmp_path / "red", method="xattn")
    weights = run / "red.safetensors"
    before = weights.read_bytes(), (base / "model_index.json").read_text()
    for args in (["--format", "lora", "--out", weights, "--overwrite"],
                 ["--format", "diffusers", "--base_model", base, "--out", base, "--overwrite"]):
        capsys.readouterr()
        assert main(["export", str(run), *map(str, args)]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and "replace an input" in err[0], err
    assert (weights.read_bytes(), (base / "model_index.json").read_text()) == before


def test_single_file_export_has_the_umask_mode(tiny_models, tmp_path):
    import os
    import stat

    run, _, _ = make_run(tiny_models["sd1"], tmp_path / "run", method="xattn")
    old = os.umask(0o022)
    try:
        for fmt in ("single-file", "lora"):
            out = tmp_path / f"{fmt}.safetensors"
            export(run, out, fmt)
            assert stat.S_IMODE(out.stat().st_mode) == 0o644, fmt
    finally:
        os.umask(old)


@pytest.mark.parametrize("fmt", ["lora", "single-file"])
def test_a_file_that_appears_during_the_export_is_kept(tiny_models, tmp_path, monkeypatch, fmt):
    """Two concurrent exports to one path without --overwrite: the exists-check and the write are one
    step, so the second fails in one line and the first's file stays."""
    import esd.formats.exports as export_module
    from esd.formats.records import OutputError

    run, _, _ = make_run(tiny_models["sd1"], tmp_path / "run", method="xattn")
    out = tmp_path / "conc.safetensors"
    original = export_module.load_erasure

    def racing(*args, **kwargs):
        loaded = original(*args, **kwargs)
        out.write_bytes(b"the other export")  # lands after the check, before the write
        return loaded

    monkeypatch.setattr(export_module, "load_erasure", racing)
    with pytest.raises(OutputError, match="already exists"):
        export(run, out, fmt)
    assert out.read_bytes() == b"the other export"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_the_official_codes_metadata_less_partial_file_loads_in_every_command(tmp_path):
    """esd_sd.py's output: only the trained tensors, diffusers names, bf16, no metadata. generate, export and
    attack load it over the base model; a key the base lacks is an error naming it, and nothing is written."""
    from esd.families.sources import ModelLoadError
    from esd.formats.weights import apply_erased_weights

    _, base_sd, erased = make_run(str(TOY_MODEL_DIR), tmp_path / "run", method="esd-x")
    official = tmp_path / "esd-red-from-red-esd-x.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in erased.items()}, str(official))  # no metadata, as esd_sd.py
    with safe_open(str(official), framework="pt") as f:
        assert not f.metadata()
    unet = DiffusionPipeline.from_pretrained(str(TOY_MODEL_DIR)).unet
    assert sorted(apply_erased_weights(unet, official, base_model="toy")) == sorted(erased)
    own = unet.state_dict()
    for k, v in erased.items():
        assert torch.equal(own[k], v.to(torch.bfloat16).float()), k
    untouched = [k for k in base_sd if k not in erased]
    assert untouched and every(torch.equal(own[k], base_sd[k]) for k in untouched)

    out = tmp_path / "lora.safetensors"
    assert main(["export", str(official), "--base_model", "toy", "--format", "lora", "--out", str(out)]) == 0
    assert out.is_file()

    bad = tmp_path / "esd-red-from-red-esd-x-bad.safetensors"
    save_file({**{k: v.to(torch.bfloat16) for k, v in erased.items()}, "not.a.unet.key": torch.zeros(2)}, str(bad))
    with pytest.raises(ModelLoadError, match="1 unexpected keys \\(not.a.unet.key\\)"):
        apply_erased_weights(DiffusionPipeline.from_pretrained(str(TOY_MODEL_DIR)).unet, bad, base_model="toy")
    wrong = tmp_path / "esd-wrong-shape.safetensors"
    name = next(iter(erased))
    save_file({name: torch.zeros(3, 3, 3)}, str(wrong))
    with pytest.raises(ModelLoadError, match="1 shape mismatches"):
        apply_erased_weights(DiffusionPipeline.from_pretrained(str(TOY_MODEL_DIR)).unet, wrong, base_model="toy")


@pytest.mark.parametrize("family,version,v2", [("sd1", "sd_v1", "False"), ("sd2", "sd_v2", "True"),
                                               ("sdxl", "sdxl_base_v1-0", "False")])
def test_lora_carries_the_kohya_labels_automatic1111_lists_it_by(family, version, v2, tiny_models, tmp_path):
    """A1111's Lora extension: ss_base_model_version 'sdxl_*' -> SDXL, ss_v2 'True' -> SD2, else SD1; only
    the LoRAs of the loaded checkpoint's version are listed. Ours stand beside kohya's."""
    run, _, _ = make_run(model_folder(family, tiny_models), tmp_path / "run", method="esd-x")
    for rank, dim in ((2, "2"), ("full", None)):
        out = tmp_path / f"erase-cat-{rank}.safetensors"
        export(run, out, "lora", rank=rank)
        with safe_open(str(out), "pt") as f:
            meta = f.metadata()
            ranks = {f.get_tensor(k).shape[0] for k in f.keys() if k.endswith(".lora_down.weight")}
        assert (meta["ss_base_model_version"], meta["ss_v2"], meta["ss_network_module"]) == (version, v2,
                                                                                            "networks.lora")
        assert meta["ss_network_dim"] == (dim or (str(ranks.pop()) if len(ranks) == 1 else "Dynamic"))
        assert float(meta["ss_network_alpha"]) == one_alpha(out)
        assert meta["ss_output_name"] == out.stem and meta["ss_sd_model_name"] == model_folder(family, tiny_models)
        assert meta["esd_lora_rank"] == str(rank) and meta["esd_concept"] == "cat"
