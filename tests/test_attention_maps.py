"""Subject-token attention maps: recording through the attention-processor API leaves every output unchanged, the
probabilities are softmax(q kᵀ·scale) of the layer's own (LoRA-wrapped) projections, the maps are distributions,
token positions come from the tokenizer, bad settings are refused before Ray, and the report gets the grids."""

import copy
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig
from PIL import Image
from run_fixtures import TARGETS, make_lora

from nullbooth.config import load_config
from nullbooth.errors import NullBoothError
from nullbooth.models.attention import (
    RecordingProcessor,
    record_attention,
    word_positions,
)
from nullbooth.models.backends import get_backend
from nullbooth.models.registry import resolve_model_location
from nullbooth.models.sampler import apply_lora, sample_batch
from nullbooth.report.attention import (
    AttentionTarget,
    attention_targets,
    object_word,
    record_maps,
    resolve_positions,
    summarise,
)
from nullbooth.report.heatmaps import attention_grid, grid_size

BASE = ["sampling.num_inference_steps=2", "preserve.max_prompts=10", "preserve.holdout=2",
        "covariance.num_workers=1", "generate.num_workers=1", "generate.batch_size=8"]


def configure(run_dir: Path, *extra: str):
    return load_config(None, [f"run_dir={run_dir}", *BASE, *extra])


@pytest.fixture(scope="module")
def tiny_unet():
    return UNet2DConditionModel.from_pretrained(resolve_model_location("tiny"), subfolder="unet").eval()


def lora_unet(unet, seed: int = 0):
    """A copy of `unet` with a nonzero PEFT LoRA on every attn2 linear (as the fine-tuned model has)."""
    tuned = copy.deepcopy(unet)
    tuned.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=True))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    return tuned.eval()


def unet_inputs(unet, batch: int = 2, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    x = torch.randn(batch, unet.config.in_channels, size, size, generator=gen)
    text = torch.randn(batch, 7, unet.config.cross_attention_dim, generator=gen)
    return x, torch.tensor(501), text


@pytest.mark.parametrize("with_lora", [False, True])
def test_recording_leaves_the_unet_output_bit_identical(tiny_unet, with_lora):
    unet = lora_unet(tiny_unet) if with_lora else tiny_unet
    x, t, text = unet_inputs(unet)
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    with torch.no_grad():
        off = unet(x, t, encoder_hidden_states=text).sample
        with record_attention(unet) as record:
            assert all(isinstance(p, RecordingProcessor) == (".attn2." in k) for k, p in unet.attn_processors.items())
            on = unet(x, t, encoder_hidden_states=text).sample
        after = unet(x, t, encoder_hidden_states=text).sample
    assert torch.equal(off, on) and torch.equal(off, after)
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before  # the originals are back
    attn2 = sum(".attn2" in name and name.endswith("attn2") for name, _ in unet.named_modules())
    assert sum(record.counts.values()) == attn2 and set(t for t, _ in record.maps) == {501}


def _lora_weight(linear) -> torch.Tensor:
    """The effective weight of a (maybe PEFT-wrapped) linear, computed from its parts."""
    if not hasattr(linear, "base_layer"):
        return linear.weight
    name = linear.active_adapters[0]
    return (linear.base_layer.weight
            + linear.scaling[name] * linear.lora_B[name].weight @ linear.lora_A[name].weight)


def _independent(attn, hidden: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(d_head)) per head, (batch, heads, n_image, n_text), from the weights alone."""
    q = hidden @ _lora_weight(attn.to_q).T
    k = text @ _lora_weight(attn.to_k).T
    heads = attn.heads
    q = q.reshape(*q.shape[:2], heads, -1).transpose(1, 2)
    k = k.reshape(*k.shape[:2], heads, -1).transpose(1, 2)
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)


@pytest.mark.parametrize("with_lora", [False, True])
def test_recorded_probabilities_are_softmax_of_the_layers_own_q_k_and_distributions(tiny_unet, with_lora):
    unet = lora_unet(tiny_unet) if with_lora else tiny_unet
    x, t, text = unet_inputs(unet, batch=4)
    modules = dict(unet.named_modules())
    with torch.no_grad(), record_attention(unet, cond_half=True, keep_layers=True) as record:
        unet(x, t, encoder_hidden_states=text)
        for call in record.calls:
            full = _independent(modules[call["layer"]], call["hidden"], call["text"])
            # cond_half: rows 2..3 (the conditional half of [uncond; cond]) and nothing else
            assert call["probs"].shape == (2, *full.shape[1:])
            torch.testing.assert_close(call["probs"], full[2:], rtol=0, atol=1e-6)
            assert not torch.allclose(call["probs"], full[:2], atol=1e-4)
            # over the text tokens, every image query's probabilities sum to 1
            torch.testing.assert_close(call["probs"].sum(-1), torch.ones(call["probs"].shape[:-1]), rtol=0, atol=1e-6)
    for key, mean in record.mean_maps().items():  # head- and layer-means stay distributions over tokens
        torch.testing.assert_close(mean.sum(-1), torch.ones(mean.shape[:-1]), rtol=0, atol=1e-6)


def test_token_positions_come_from_the_tokenizer():
    from transformers import CLIPTokenizer

    tiny = CLIPTokenizer.from_pretrained(resolve_model_location("tiny"), subfolder="tokenizer")
    prompt = "a photo of a red circle on sks teapot"
    ids = tiny(prompt).input_ids
    pieces = tiny.convert_ids_to_tokens(ids)
    circle = word_positions(tiny, prompt, "circle")
    assert len(circle) > 1 and "".join(pieces[i] for i in circle) == "circle</w>"  # BPE: several pieces
    assert [pieces[i] for i in word_positions(tiny, prompt, "sks")] == ["sks</w>"]
    assert word_positions(tiny, prompt, "Teapot") == [ids.index(tiny.convert_tokens_to_ids("teapot</w>"))]
    with pytest.raises(NullBoothError, match="'bicycle' is not a word of the prompt"):
        word_positions(tiny, prompt, "bicycle")
    toy = CLIPTokenizer.from_pretrained(resolve_model_location("toy"), subfolder="tokenizer")
    assert toy.model_max_length == 16
    long = "a photo of a red circle on a plain gray background next to a small blue teapot"
    with pytest.raises(NullBoothError, match="past the tokenizer's length 16"):
        word_positions(toy, long, "teapot")


def test_bad_attention_settings_are_refused_by_the_config(tmp_path):
    with pytest.raises(NullBoothError, match=r"prompts\[1\]: 'sks' is not a word of the prompt 'a red cube'"):
        configure(tmp_path, 'generate.attention.prompts=["a photo of sks teapot | sks, teapot", "a red cube | sks"]')
    with pytest.raises(NullBoothError, match="expected 'PROMPT \\| WORD, WORD'"):
        configure(tmp_path, 'generate.attention.prompts=["a red cube"]')
    with pytest.raises(NullBoothError, match="the list is empty"):
        configure(tmp_path, "generate.attention.prompts=[]")
    with pytest.raises(NullBoothError, match="at least two words"):
        configure(tmp_path, "train.instance_prompt=sks")
    assert configure(tmp_path, "train.instance_prompt=sks", "generate.attention.enabled=false")


def test_default_targets_and_object_words(tmp_path):
    plan = [("a photo of sks teapot", "instance"), ("a photo of sks teapot on a beach", "instance"),
            ("a wooden chair in an empty white room", "holdout"), ("a wristwatch with a silver band", "holdout"),
            ("a kite", "holdout")]
    targets = attention_targets(configure(tmp_path), plan)
    assert [(t.prompt, t.words, t.seed) for t in targets] == [
        ("a photo of sks teapot", ["sks", "teapot"], 1234), ("a wooden chair in an empty white room", ["chair"], 3234),
        ("a wristwatch with a silver band", ["wristwatch"], 4234)]
    assert object_word("a photo of a red circle on a sky background", "toy") == "circle"
    assert attention_targets(configure(tmp_path, "generate.attention.enabled=false"), plan) == []


def test_pipeline_recording_keeps_images_and_gives_normalised_maps(tmp_path):
    """Through the real pipeline with guidance and a LoRA loaded by stock diffusers: images with recording equal
    those without, and each summarised map sums to 1 over image positions."""
    config = configure(tmp_path)
    lora = make_lora("tiny", tmp_path / "lora", b_std=0.3)
    pipe = get_backend(config).load_pipeline("cpu")
    apply_lora(pipe, str(lora))
    prompts, seeds = ["a photo of sks teapot", "a red circle"], [3, 4]
    plain, _ = sample_batch(config, pipe, prompts, seeds)
    with record_attention(pipe.unet, [4, 5], cond_half=True) as record:
        recorded, _ = sample_batch(config, pipe, prompts, seeds)
    assert np.array_equal(plain, recorded)
    assert {t for t, _ in record.maps} == set(get_backend(config).timestep_plan())
    targets = [AttentionTarget("a photo of sks teapot", "instance", ["sks", "teapot"], 3),
               AttentionTarget("a red circle", "custom", ["circle"], 4)]
    resolve_positions(config, targets, pipe.tokenizer)
    out = record_maps(config, targets, {"base": None, "finetuned": str(lora)})
    assert np.array_equal(out["models"]["finetuned"]["images"][0], plain[0])  # the same seed, the same image
    summary = summarise(out, targets)
    word = summary[0]["models"]["finetuned"]["words"]["sks"]
    assert set(word["mean"]) == {(16, 16), (8, 8)}  # the tiny UNet's attn2 resolutions (16x16 latent; mid at 8x8)
    assert all(m.shape == shape for shape, m in word["mean"].items())  # grids, not flattened positions
    assert all(m.shape == shape for (_, shape), m in word["per_timestep"].items())
    flat = out["models"]["finetuned"]["maps"][0]["sks"]  # row-major positions: row i of the grid is flat[i*w:(i+1)*w]
    (t, n), raw = next((k, v) for k, v in flat.items() if k[1] == 64)
    assert np.allclose(word["per_timestep"][(t, (8, 8))][3], raw[24:32] / raw.sum())
    for entry in summary:
        for row in entry["models"].values():
            for maps in row["words"].values():
                for value in [*maps["per_timestep"].values(), *maps["mean"].values()]:
                    assert value.sum() == pytest.approx(1.0, abs=1e-5) and (value >= 0).all()
                assert 0 < maps["share"] < 1
    base, tuned = (summary[0]["models"][m]["words"]["sks"]["share"] for m in ("base", "finetuned"))
    assert base != tuned  # the fine-tuned model's LoRA-wrapped to_q/to_k were the ones recorded


def test_a_grid_has_one_row_per_model_and_one_column_per_word_and_resolution():
    """A wide (non-square) image keeps its aspect; the size follows grid_size."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (32, 64, 3), dtype=np.uint8)

    def word():
        maps = {(2, 4): rng.random((2, 4)), (1, 2): rng.random((1, 2))}
        return {"share": 0.1, "mean": {k: v / v.sum() for k, v in maps.items()}}

    entry = {"prompt": "a photo of sks teapot", "seed": 1,
             "models": {m: {"image": image, "words": {"sks": word(), "teapot": word()}} for m in ("base", "finetuned")}}
    with Image.open(io.BytesIO(attention_grid(entry, {"base": "base", "finetuned": "global"}))) as out:
        assert out.size == grid_size(2, 4, image.shape)
        assert grid_size(2, 4, image.shape)[1] < grid_size(2, 4, (64, 64, 3))[1]


@pytest.fixture(scope="module")
def stats_dir(ray_local, tmp_path_factory):
    from nullbooth.stats.build import build_covariance

    run_dir = tmp_path_factory.mktemp("stats")
    build_covariance(configure(run_dir))
    return run_dir


def test_generate_writes_the_attention_grids_and_links_them(stats_dir, tmp_path):
    from nullbooth.report.generate import generate

    run_dir = tmp_path / "run"
    for part in ("covariance", "projection"):
        shutil.copytree(stats_dir / part, run_dir / part)
    config = configure(run_dir, "generate.attention.holdout_prompts=1")
    make_lora(config.model.path, run_dir / "lora", b_std=0.3)
    summary = generate(config)
    section = json.loads((run_dir / "report" / "attention" / "attention.json").read_text())
    assert [p["prompt"] for p in section["prompts"]][0] == config.train.instance_prompt
    assert len(section["prompts"]) == 2 and list(section["models"]) == ["base", "finetuned"]
    markdown = (run_dir / "report" / "report.md").read_text()
    for entry, uri in zip(section["prompts"], summary["attention"]):
        assert Path(uri) == run_dir / entry["grid"]
        columns = len(entry["positions"]) * 2  # words × the tiny UNet's two attn2 resolutions
        with Image.open(uri) as image:
            assert image.format == "PNG" and image.size == grid_size(2, columns, (32, 32, 3))
        assert f"({entry['grid'].removeprefix('report/')})" in markdown
    from safetensors.torch import load_file

    maps = load_file(str(run_dir / "report" / "attention" / "maps.safetensors"))
    assert "finetuned/00/sks/t0501/16x16" in maps or any(k.startswith("finetuned/00/sks/") for k in maps)
    for value in maps.values():
        assert value.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_lcm_recording_without_guidance_keeps_images_and_the_whole_batch(tmp_path):
    """LCM: no unconditional branch (guidance enters through timestep_cond), so every batch row is recorded."""
    config = load_config(None, [f"run_dir={tmp_path}", "model.backend=lcm", "model.path=tiny-lcm",
                                "sampling.scheduler=lcm", "sampling.num_inference_steps=2"])
    backend = get_backend(config)
    assert not backend.uses_guidance
    pipe = backend.load_pipeline("cpu")
    prompts, seeds = ["a photo of sks teapot", "a red circle", "a kite"], [1, 2, 3]
    plain, _ = sample_batch(config, pipe, prompts, seeds)
    with record_attention(pipe.unet, [4], cond_half=backend.uses_guidance) as record:
        recorded, _ = sample_batch(config, pipe, prompts, seeds)
    assert np.array_equal(plain, recorded)
    assert {t for t, _ in record.maps} == set(backend.timestep_plan())
    assert all(value.shape[0] == 3 and value.shape[-1] == 1 for value in record.maps.values())
