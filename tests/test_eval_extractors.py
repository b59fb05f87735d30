"""The feature extractors of `nullbooth eval`: small randomly initialised CLIP and DINOv2 built offline from configs,
saved to a folder and loaded through the same code a hub id goes through; the toy-world probe; the eval config."""

import numpy as np
import pytest
import torch
from transformers import (
    BitImageProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    Dinov2Config,
    Dinov2Model,
)

from nullbooth.config import load_config
from nullbooth.errors import NullBoothError
from nullbooth.models.tokenizer import build_tokenizer
from nullbooth.report.extractors import default_extractors, load_extractor

SIZE = {"height": 32, "width": 32}


def build_clip(folder):
    tokenizer = build_tokenizer()
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length, **ids),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2), projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=SIZE).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_dinov2(folder):
    torch.manual_seed(1)
    Dinov2Model(Dinov2Config(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             mlp_ratio=2)).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size=SIZE, do_convert_rgb=True).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def feature_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    return build_clip(root / "clip"), build_dinov2(root / "dino")


def images(n, seed=0, side=40):
    return [np.random.default_rng(seed + i).integers(0, 256, (side, side, 3), dtype=np.uint8) for i in range(n)]


def tiny_config(*extra):
    return load_config(None, ["run_dir=/tmp/unused-eval-run", *extra])


def test_clip_features_are_the_models_own_embeddings(feature_models):
    """The extractor's image and text features, normalised, equal CLIPModel.forward's image_embeds / text_embeds
    (another code path of the same model), and their cosines are its logits over logit_scale."""
    clip_dir, _ = feature_models
    extractor = load_extractor("clip", tiny_config(f"eval.clip_model={clip_dir}"))
    assert extractor.has_text
    pics, prompts = images(3), ["a photo of sks teapot", "a red bicycle"]
    feats, text = extractor.images(pics), extractor.texts(prompts)
    assert feats.shape == (3, 16) and text.shape == (2, 16)
    model = CLIPModel.from_pretrained(clip_dir).eval()
    processor = CLIPImageProcessor.from_pretrained(clip_dir)
    tokens = build_tokenizer()(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                    pixel_values=processor(images=pics, return_tensors="pt")["pixel_values"])
    norm = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    tnorm = text / np.linalg.norm(text, axis=1, keepdims=True)
    np.testing.assert_allclose(norm, out.image_embeds.numpy(), atol=1e-5)
    np.testing.assert_allclose(tnorm, out.text_embeds.numpy(), atol=1e-5)
    np.testing.assert_allclose(norm @ tnorm.T, out.logits_per_image.numpy() / model.logit_scale.exp().item(),
                               atol=1e-5)


def test_dino_features_are_the_cls_token(feature_models):
    _, dino_dir = feature_models
    extractor = load_extractor("dino", tiny_config(f"eval.dino_model={dino_dir}"))
    assert not extractor.has_text
    pics = images(4, seed=10)
    feats = extractor.images(pics)
    model = Dinov2Model.from_pretrained(dino_dir).eval()
    pixels = BitImageProcessor.from_pretrained(dino_dir)(images=pics, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        pooled = model(pixel_values=pixels).pooler_output  # Dinov2's pooler: the layer-normed CLS token
    assert feats.shape == (4, 32)
    np.testing.assert_allclose(feats, pooled.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="no text tower"):
        extractor.texts(["a prompt"])


def test_probe_features_and_the_default_extractors():
    from nullbooth.models.registry import resolve_model_location
    from nullbooth.models.toyworld.probe import features, load_probe

    toy = load_config(None, ["model.path=toy", "run_dir=/tmp/unused-eval-run"])
    assert default_extractors(toy) == ["probe"]
    assert default_extractors(tiny_config()) == ["clip", "dino"]
    assert default_extractors(tiny_config("eval.extractors=[dino]")) == ["dino"]
    pics = images(5, seed=20, side=32)
    got = load_extractor("probe", toy).images(pics)
    expected = features(load_probe(resolve_model_location("toy")), pics).numpy()
    np.testing.assert_array_equal(got, expected)
    with pytest.raises(NullBoothError, match="'probe' needs a model that ships a probe"):
        load_extractor("probe", tiny_config())


def test_a_missing_feature_model_and_bad_eval_keys_are_refused(tmp_path):
    with pytest.raises(NullBoothError, match=r"^eval.clip_model: cannot load '.*nowhere'"):
        load_extractor("clip", tiny_config(f"eval.clip_model={tmp_path / 'nowhere'}"))
    bad = {"eval.k=16": "eval.k: the k-NN radius needs k < eval.images_per_prompt (16), got 16",
           "eval.extractors=[clip, inception]": "eval.extractors: expected names among probe, clip, dino; "
                                                "got 'inception'",
           "eval.extractors=[]": "eval.extractors: the list is empty",
           "eval.kernel=rbf": "eval.kernel: expected one of cubic, linear; got 'rbf'",
           "eval.images_per_prompt=501": "eval.images_per_prompt: expected a value ≤ 500, got 501"}
    for override, message in bad.items():
        with pytest.raises(NullBoothError) as err:
            tiny_config(override)
        assert str(err.value).startswith(message), (override, str(err.value))
