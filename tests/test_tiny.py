"""The embedded tiny model, its tokenizer, the cache, and the drawn demo subject."""

from __future__ import annotations

import itertools
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nullbooth.errors import NullBoothError
from nullbooth.models import cache as model_cache
from nullbooth.models import tiny
from nullbooth.models.subject import (
    draw_subject_images,
    ensure_subject_images,
    resolve_instance_dir,
)
from nullbooth.models.tokenizer import train_bpe
from nullbooth.prompts import (
    DEMO_CLASS_PROMPT,
    DEMO_INSTANCE_PROMPT,
    DEMO_PROMPTS_FILE,
    read_prompts,
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A private NULLBOOTH_CACHE, so tests never read or write the home cache."""
    path = tmp_path_factory.mktemp("nullbooth-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NULLBOOTH_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def models(cache: Path) -> dict[str, Path]:
    return {backend: tiny.ensure_tiny_model(name) for name, backend in tiny.TINY_MODELS.items()}


@pytest.fixture(scope="module")
def pipes(models):
    from diffusers import DiffusionPipeline

    out = {}
    for backend, path in models.items():
        pipe = DiffusionPipeline.from_pretrained(path)
        pipe.set_progress_bar_config(disable=True)
        out[backend] = pipe
    return out


@pytest.fixture(scope="module")
def tokenizer(models):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(models["sd"] / "tokenizer")


def _safetensors(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.safetensors"))}


# --------------------------------------------------------------------------------------------------- pipeline


def test_cache_layout_and_env(cache: Path, models):
    assert model_cache.cache_dir() == cache
    v = tiny.TINY_FORMAT_VERSION
    assert models == {"sd": cache / f"tiny-v{v}", "lcm": cache / f"tiny-lcm-v{v}"}
    assert not [p for p in cache.iterdir() if ".tmp-" in p.name], "temporary build directories left behind"
    for path in models.values():
        assert path.stat().st_mode & 0o755 == 0o755, "cached model is not readable by others (mkdtemp's 0700)"


def test_stock_diffusers_loads_the_right_pipeline_class(pipes):
    from diffusers import (
        LatentConsistencyModelPipeline,
        LCMScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
    )

    assert type(pipes["sd"]) is StableDiffusionPipeline
    assert type(pipes["lcm"]) is LatentConsistencyModelPipeline
    assert isinstance(pipes["sd"].scheduler, PNDMScheduler)
    assert isinstance(pipes["lcm"].scheduler, LCMScheduler)
    assert pipes["lcm"].scheduler.config.original_inference_steps == 50
    for pipe in pipes.values():
        cfg = pipe.scheduler.config
        betas = (cfg.beta_schedule, cfg.beta_start, cfg.beta_end, cfg.steps_offset)
        assert betas == ("scaled_linear", 0.00085, 0.012, 1)
        assert cfg.timestep_spacing == "leading"


@pytest.mark.parametrize("backend", ["sd", "lcm"])
def test_sampling_gives_finite_32px_images(pipes, backend):
    out = pipes[backend](
        ["a photo of a dog", DEMO_INSTANCE_PROMPT],
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    images = out.images
    assert images.shape == (2, 32, 32, 3)
    assert np.isfinite(images).all()
    assert images.std() > 0.01, "images are constant: the random UNet/VAE output is degenerate"
    assert not np.allclose(images[0], images[1]), "the prompt has no effect on the image"


def test_unet_dimensions_and_lcm_time_conditioning(pipes):
    sd, lcm = pipes["sd"].unet.config, pipes["lcm"].unet.config
    assert sd.time_cond_proj_dim is None
    assert lcm.time_cond_proj_dim == 256
    for pipe in pipes.values():
        cfg = pipe.unet.config
        assert cfg.sample_size == 16 and tuple(cfg.block_out_channels) == (32, 64)
        assert cfg.cross_attention_dim == pipe.text_encoder.config.hidden_size == 64
        assert pipe.vae_scale_factor == 2  # 16x16 latents <-> 32x32 images


def test_cross_attention_weights_are_random_and_the_unet_output_is_not_trivial(pipes):
    unet = pipes["sd"].unet
    weights = [m.weight for n, m in unet.named_modules() if re.search(r"attn2\.(to_q|to_k|to_v|to_out\.0)$", n)]
    assert len(weights) == 4 * 7  # 2 down + 1 mid + 4 up transformer blocks
    for w in weights:
        assert w.std() > 1e-3
    # Different layers got different draws (not one tensor copied around).
    assert len({round(float(w.detach().flatten()[0]), 8) for w in weights}) == len(weights)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        out = unet(torch.randn(1, 4, 16, 16, generator=g), 500, torch.randn(1, 32, 64, generator=g)).sample
    assert out.shape == (1, 4, 16, 16) and out.std() > 0.05


def test_text_encoder_matches_tokenizer(pipes, tokenizer):
    te = pipes["sd"].text_encoder.config
    assert te.vocab_size == len(tokenizer)
    assert (te.hidden_size, te.num_hidden_layers, te.num_attention_heads, te.intermediate_size) == (64, 2, 4, 128)
    assert te.max_position_embeddings == tokenizer.model_max_length == 32
    assert (te.bos_token_id, te.eos_token_id, te.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )


def test_building_twice_is_bit_identical_and_leaves_global_rng_alone(models, tmp_path):
    for backend, cached in models.items():
        torch.manual_seed(12345 if backend == "sd" else 999)  # a different global state than the first build
        before = torch.get_rng_state()
        again = tiny.build_tiny_model(tmp_path / backend, backend)
        assert torch.equal(torch.get_rng_state(), before)
        first, second = _safetensors(cached), _safetensors(again)
        assert set(first) == {
            "text_encoder/model.safetensors",
            "unet/diffusion_pytorch_model.safetensors",
            "vae/diffusion_pytorch_model.safetensors",
        }
        assert first == second
        tokenizer_json = Path("tokenizer", "tokenizer.json")
        assert (cached / tokenizer_json).read_bytes() == (again / tokenizer_json).read_bytes()


def test_text_encoder_and_vae_are_shared_between_backends(models):
    sd, lcm = _safetensors(models["sd"]), _safetensors(models["lcm"])
    assert sd["text_encoder/model.safetensors"] == lcm["text_encoder/model.safetensors"]
    assert sd["vae/diffusion_pytorch_model.safetensors"] == lcm["vae/diffusion_pytorch_model.safetensors"]


def test_ensure_reuses_the_cached_model(models, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("rebuilt a cached model")

    monkeypatch.setattr(tiny, "build_tiny_model", fail)
    assert tiny.ensure_tiny_model("tiny") == models["sd"]
    with pytest.raises(NullBoothError, match="tiny-xl"):
        tiny.ensure_tiny_model("tiny-xl")


def test_build_once_tolerates_losing_the_race(tmp_path):
    dest = tmp_path / "thing-v1"

    def build_while_another_process_wins(tmp: Path) -> None:
        (tmp / "mine.txt").write_text("loser")
        dest.mkdir()
        (dest / "theirs.txt").write_text("winner")

    assert model_cache.build_once(dest, build_while_another_process_wins) == dest
    assert [p.name for p in dest.iterdir()] == ["theirs.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["thing-v1"], "the loser's temporary directory was left behind"


def test_failed_build_leaves_nothing(tmp_path):
    def broken(tmp: Path) -> None:
        (tmp / "half.txt").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        model_cache.build_once(tmp_path / "thing-v1", broken)
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_loads_with_stock_classes(models, tokenizer):
    from transformers import AutoTokenizer, CLIPTokenizerFast

    for cls in (CLIPTokenizerFast, AutoTokenizer):
        other = cls.from_pretrained(models["lcm"] / "tokenizer")
        assert other.get_vocab() == tokenizer.get_vocab()
        assert other("a photo of sks dog").input_ids == tokenizer("a photo of sks dog").input_ids
    assert 1000 <= len(tokenizer) <= 2000


def test_identifier_and_class_words_are_single_tokens(tokenizer):
    ids = tokenizer("a photo of sks dog").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == [
        "<|startoftext|>",
        "a</w>",
        "photo</w>",
        "of</w>",
        "sks</w>",
        "dog</w>",
        "<|endoftext|>",
    ]
    for word in ("sks", "teapot"):
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    for prompt in (DEMO_INSTANCE_PROMPT, DEMO_CLASS_PROMPT):
        assert len(tokenizer(prompt, add_special_tokens=False).input_ids) == len(prompt.split())


def test_identifier_is_rare(tokenizer):
    """Like "sks" in real CLIP: a token the preserved prompts never produce."""
    prompts = read_prompts(DEMO_PROMPTS_FILE)
    assert "sks" not in {w for p in prompts for w in re.findall(r"[a-z]+", p.lower())}
    sks = tokenizer.convert_tokens_to_ids("sks</w>")
    used = Counter(i for ids in tokenizer(prompts).input_ids for i in ids)
    assert used[sks] == 0
    assert used[tokenizer.convert_tokens_to_ids("photo</w>")] > 20  # while common words are whole tokens


def test_padding_to_max_length_fits_the_text_encoder(pipes, tokenizer):
    batch = tokenizer(["a dog", "a photo of sks teapot on a table"], padding="max_length", return_tensors="pt")
    assert batch.input_ids.shape == (2, 32)
    assert batch.input_ids.shape[1] == pipes["sd"].text_encoder.config.max_position_embeddings
    assert (batch.input_ids[0, 3:] == tokenizer.pad_token_id).all()  # bos, a, dog, eos, then padding
    with torch.no_grad():
        hidden = pipes["sd"].text_encoder(batch.input_ids).last_hidden_state
    assert hidden.shape == (2, 32, 64) and torch.isfinite(hidden).all()


def test_bpe_trainer_matches_a_naive_reference():
    """The incremental trainer learns exactly what recounting every pair after each merge learns."""

    def naive(words: Counter, num_merges: int) -> list[tuple[str, str]]:
        seqs = {w: [*w[:-1], w[-1] + "</w>"] for w in words}
        merges = []
        for _ in range(num_merges):
            counts = Counter()
            for w, s in seqs.items():
                for pair in itertools.pairwise(s):
                    counts[pair] += words[w]
            if not counts:
                break
            best = min(counts, key=lambda p: (-counts[p], p))
            if counts[best] < 2:
                break
            merges.append(best)
            for w, s in seqs.items():
                out, i = [], 0
                while i < len(s):
                    if s[i : i + 2] == list(best):
                        out.append(s[i] + s[i + 1])
                        i += 2
                    else:
                        out.append(s[i])
                        i += 1
                seqs[w] = out
        return merges

    toy = Counter({"low": 5, "lower": 2, "newest": 6, "widest": 3})
    # ("e","s") and ("s","t</w>") tie at 9; the smaller text wins. Then "lo" (7) beats the 6-count pairs.
    assert train_bpe(toy, 4) == [("e", "s"), ("es", "t</w>"), ("l", "o"), ("e", "w")]
    assert train_bpe(toy, 20) == naive(toy, 20)
    words = Counter(w for p in read_prompts(DEMO_PROMPTS_FILE, max_prompts=200) for w in p.lower().split())
    assert train_bpe(words, 150) == naive(words, 150)


# ---------------------------------------------------------------------------------------------------- subject


def _pixels(paths: list[Path]) -> list[np.ndarray]:
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def test_subject_images_are_deterministic_and_varied(tmp_path):
    random.seed(1)
    first = _pixels(draw_subject_images(tmp_path / "a"))
    random.seed(2)  # drawing must not depend on the global RNG
    second = _pixels(draw_subject_images(tmp_path / "b"))
    assert 4 <= len(first) <= 8
    for a, b in zip(first, second):
        assert a.shape == (64, 64, 3)
        assert np.array_equal(a, b)
    for i in range(len(first)):
        for j in range(i + 1, len(first)):
            assert np.abs(first[i].astype(int) - first[j].astype(int)).mean() > 5, (i, j)


def test_every_subject_image_shows_the_teal_teapot_with_orange_dots_and_yellow_lid(tmp_path):
    def fraction(img: np.ndarray, rgb: tuple[int, int, int]) -> float:
        return float((np.abs(img.astype(int) - rgb).max(axis=-1) < 40).mean())

    for img in _pixels(draw_subject_images(tmp_path, size=64)):
        assert fraction(img, (18, 150, 155)) > 0.03  # teal body (three large dots cover part of it)
        assert fraction(img, (245, 130, 25)) > 0.01  # orange dots
        assert fraction(img, (250, 215, 40)) > 0.005  # yellow lid


def test_subject_cache_and_resolve(cache, tmp_path):
    cached = ensure_subject_images()
    assert cached.parent == cache and cached.name.startswith("subject-v")
    assert resolve_instance_dir("demo") == cached
    fresh = draw_subject_images(tmp_path / "fresh")
    cached_images = _pixels(sorted(cached.glob("*.png")))
    assert len(cached_images) == len(fresh)
    assert all(np.array_equal(a, b) for a, b in zip(cached_images, _pixels(fresh)))
    assert resolve_instance_dir(str(cached)) == cached
    with pytest.raises(NullBoothError, match="missing-dir"):
        resolve_instance_dir(str(tmp_path / "missing-dir"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(NullBoothError, match="no image files"):
        resolve_instance_dir(str(tmp_path / "empty"))
