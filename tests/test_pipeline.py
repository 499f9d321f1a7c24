import torch
from safetensors.torch import load_file

from esd import ESDPipeline


def test_esd_pipeline_erases_saves_and_reloads(tiny_models, tmp_path):
    pipe = ESDPipeline(model_id=tiny_models["sd1"], device="cpu", erase_concept="cat", train_method="xattn",
                       train_steps=2, learning_rate=1e-3, save_path=str(tmp_path))
    images = pipe.generate(["a photo of cat", "a dog"], seed=0, num_inference_steps=2, guidance_scale=7.5)
    assert len(images) == 2 and images[0].size == (128, 128)
    again = pipe.generate(["a photo of cat", "a dog"], seed=0, num_inference_steps=2)
    assert list(images[0].getdata()) == list(again[0].getdata())  # seeded
    weights = pipe.output_dir / f"{pipe.output_dir.name}.safetensors"
    loaded = ESDPipeline(model_id=tiny_models["sd1"], device="cpu", load_path=str(weights))
    trained = load_file(weights)
    own = loaded.pipe.unet.state_dict()
    assert all(torch.equal(own[k], v) for k, v in trained.items())
    reloaded = loaded.generate(["a photo of cat", "a dog"], seed=0, num_inference_steps=2)
    assert list(reloaded[0].getdata()) == list(images[0].getdata())
