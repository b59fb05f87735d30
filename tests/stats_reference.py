"""The statistics stage's single-process reference and the readers the statistics tests compare runs with.

`reference(config)` computes the sums of a config without the package's hooks, dealer or Ray: text keys straight from
the text encoder, image keys from forward hooks on the same trajectories (same prompts, batches and seeds, the
pipeline called directly). `raw_sums(run_dir)` reads a run's sums n·C and counts back.
"""

from collections import defaultdict

import torch

from nullbooth.models.backends import get_backend, model_fingerprint
from nullbooth.prompts import preserved_prompts
from nullbooth.stats import manifest as manifest_module
from nullbooth.stats import store
from nullbooth.stats.hooks import KeyStatistics
from nullbooth.storage import RunDir

TEXT_SIDE = ("attn2.to_k", "attn2.to_v")


def reference(config):
    """Sums computed here, without the package's hooks: text keys straight from the text encoder, image keys from
    forward hooks on the same trajectories (same prompts, batches and seeds, pipeline called directly). Float64
    products; alongside, the package's KeyStatistics with float32 products on the very same forward passes."""
    kept, _ = preserved_prompts(config)
    backend = get_backend(config)
    pipe = backend.load_pipeline("cpu")
    unet, tok, enc = pipe.unet, pipe.tokenizer, pipe.text_encoder
    guided = config.model.backend == "sd" and config.sampling.guidance_scale > 1
    image = {n: m for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)
             and any(n.endswith("." + p) for p in config.covariance.layers) and not n.endswith(TEXT_SIDE)}
    sums = defaultdict(lambda: defaultdict(float))
    rows = defaultdict(lambda: defaultdict(int))
    now = {}
    handles = [unet.register_forward_pre_hook(
        lambda m, a, k: now.update(t=round(float((a[1] if len(a) > 1 else k["timestep"]).reshape(-1)[0]))),
        with_kwargs=True)]

    def on_layer(name):
        def hook(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            sums[now["t"]][name] = sums[now["t"]][name] + x.T @ x
            rows[now["t"]][name] += x.shape[0]
        return hook

    handles += [m.register_forward_hook(on_layer(n)) for n, m in image.items()]
    ks = KeyStatistics(unet, dict(image), backend.timestep_plan(), "float32")

    def embed(texts):
        ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        return enc(ids)[0]

    text_sum, text_rows = 0.0, 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the actors (1 CPU each), so the float32 UNet passes are bit-identical
    try:
        with torch.no_grad(), ks.attached():
            for first in range(0, len(kept), config.covariance.batch_size):
                batch = kept[first:first + config.covariance.batch_size]
                cond = embed(batch)
                uncond = embed([config.sampling.negative_prompt] * len(batch)) if guided else None
                for e in [cond] + ([uncond] if guided else []):
                    flat = e.reshape(-1, e.shape[-1]).double()
                    text_sum, text_rows = text_sum + flat.T @ flat, text_rows + flat.shape[0]
                gens = [torch.Generator().manual_seed(config.sampling.seed + first + i) for i in range(len(batch))]
                kwargs = dict(prompt_embeds=cond, generator=gens, output_type="latent",
                              num_inference_steps=config.sampling.num_inference_steps,
                              guidance_scale=config.sampling.guidance_scale)
                if guided:
                    kwargs["negative_prompt_embeds"] = uncond
                pipe(**kwargs)
    finally:
        torch.set_num_threads(threads)
        for h in handles:
            h.remove()
    return {"text_sum": text_sum, "text_rows": text_rows, "sums": sums, "rows": rows, "float32": ks,
            "fingerprint": model_fingerprint(unet), "plan": backend.timestep_plan()}


def rel_err(a, b):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm())


def raw_sums(run_dir):
    """The run's sums n·C and counts, per (timestep, layer) and for the text side."""
    run = RunDir(str(run_dir))
    manifest = manifest_module.read_manifest(run)
    out = {"text": store.read_covariance(run, "text")["cov"] * manifest.text_rows}
    for t in manifest.timesteps:
        for name, c in store.read_covariance(run, t).items():
            out[(t, name)] = c * manifest.image_rows[str(t)][name]
    return manifest, out
