"""A toy-world run's figures at several guidance scales, on more images than the report draws.

    python benchmarks/toy_guidance_sweep.py RUN_DIR [--model toy|toy-lcm|FOLDER] [--steps 10] [--guidance 2,2.5,3]
        [--repeats 2] [--subject-images 12]

The report of `nullbooth run` judges 20 instance-prompt samples and 64 held-out captions, one image each, so one
subject image moves its fidelity by 5 points. This script samples more, with the run's own LoRA (`RUN_DIR/lora`):
- concept accuracy of the base model and of the LoRA on the 64 held-out captions, `--repeats` images each
  (caption i, repeat r: seed 64 r + i);
- subject fidelity of the LoRA: `--subject-images` images of each of the 5 instance-prompt variants (seeds 500 on).
SD samples with DDIM and classifier-free guidance, an LCM with its LCMScheduler, both at `--steps` steps.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

INSTANCE_PROMPTS = ["a photo of sks teapot", "a photo of sks teapot on a plain gray background",
                    "a photo of sks teapot on a sky background", "a photo of sks teapot on a striped wooden floor",
                    "a photo of sks teapot on a dark checkered floor"]  # configs/toy.yaml's instance variants


def _sample(pipe, prompts: list[str], steps: int, guidance: float, first_seed: int, batch: int = 32) -> list:
    images = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        gens = [torch.Generator().manual_seed(first_seed + start + i) for i in range(len(chunk))]
        images += pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens).images
    return images


def main() -> None:
    from diffusers import (
        DDIMScheduler,
        LatentConsistencyModelPipeline,
        StableDiffusionPipeline,
    )

    from nullbooth.models.registry import resolve_model_location
    from nullbooth.models.toyworld import probe as probe_mod
    from nullbooth.models.toyworld import world
    from nullbooth.models.toyworld.evaluate import concept_accuracy, subject_fidelity

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--model", default="toy")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--guidance", default="2,2.5,3", help="comma-separated guidance scales")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--subject-images", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    folder = resolve_model_location(args.model) if args.model in ("toy", "toy-lcm") else args.model
    lcm = args.model == "toy-lcm" or "LatentConsistency" in open(f"{folder}/model_index.json").read()
    cls = LatentConsistencyModelPipeline if lcm else StableDiffusionPipeline
    pipe = cls.from_pretrained(folder, dtype=torch.float32, safety_checker=None)
    if not lcm:
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    probe = probe_mod.load_probe(folder)
    held_out = world.drift_prompts(64) * args.repeats
    instance = [p for p in INSTANCE_PROMPTS for _ in range(args.subject_images)]
    rows = []
    for guidance in (float(g) for g in args.guidance.split(",")):
        t0 = time.time()
        pipe.unload_lora_weights()
        base = concept_accuracy(_sample(pipe, held_out, args.steps, guidance, 0), held_out, probe)["both"]
        pipe.load_lora_weights(f"{args.run_dir}/lora")
        lora = concept_accuracy(_sample(pipe, held_out, args.steps, guidance, 0), held_out, probe)["both"]
        fidelity = subject_fidelity(_sample(pipe, instance, args.steps, guidance, 500), probe)
        rows.append({"guidance": guidance, "base_accuracy": round(base, 4), "lora_accuracy": round(lora, 4),
                     "lora_subject_fidelity": round(fidelity, 4), "held_out_images": len(held_out),
                     "subject_images": len(instance), "seconds": round(time.time() - t0, 1)})
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"run_dir": args.run_dir, "model": str(folder), "steps": args.steps, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
