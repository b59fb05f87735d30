"""Concept accuracy of a toy-world LCM and of its SD teacher, both at few steps, on the 64 held-out captions.

    python benchmarks/toy_lcm_accuracy.py [LCM_FOLDER] [SD_FOLDER] [--steps 4] [--guidance 2.0] [--n 64] [--grid OUT.png]

LCM_FOLDER defaults to the shipped toy-lcm, SD_FOLDER to the shipped toy model. Both are judged as the report
judges them: the world's held-out captions (world.drift_prompts, the last 64 lines of the toy prompts file), one
image each, caption i sampled with seed + i, read by the toy-world probe (object AND colour right). The LCM samples
with its LCMScheduler, the SD teacher with its DDIM scheduler (classifier-free guidance), both at the same step count
and guidance scale.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    from diffusers import LatentConsistencyModelPipeline, StableDiffusionPipeline

    from nullbooth.models.registry import resolve_model_location
    from nullbooth.models.toyworld import probe as probe_mod
    from nullbooth.models.toyworld import world
    from nullbooth.models.toyworld.evaluate import concept_accuracy, generate, save_grid

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("lcm", nargs="?", default="toy-lcm")
    parser.add_argument("sd", nargs="?", default="toy")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--guidance", type=float, default=2.0)  # configs/toy-lcm.yaml
    parser.add_argument("--n", type=int, default=64, help="held-out captions (at most 64 are held out)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--grid", default=None, help="also save the first 16 LCM images and captions as a PNG")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    lcm_dir, sd_dir = (resolve_model_location(p) if p in ("toy", "toy-lcm") else p for p in (args.lcm, args.sd))
    prompts = world.drift_prompts(64)[: args.n]
    probe = probe_mod.load_probe(sd_dir)
    common = {"steps": args.steps, "guidance": args.guidance, "seed": args.seed}
    results = {"captions": len(prompts), **common}
    for name, cls, folder in (("lcm", LatentConsistencyModelPipeline, lcm_dir),
                              ("sd_teacher_ddim", StableDiffusionPipeline, sd_dir)):
        kwargs = {"safety_checker": None} | ({"requires_safety_checker": False} if name != "lcm" else {})
        pipe = cls.from_pretrained(folder, dtype=torch.float32, **kwargs)
        pipe.set_progress_bar_config(disable=True)
        t0 = time.time()
        images = generate(pipe, prompts, **common)
        results[name] = {**concept_accuracy(images, prompts, probe), "seconds": round(time.time() - t0, 1),
                         "scheduler": type(pipe.scheduler).__name__, "folder": str(folder)}
        if name == "lcm" and args.grid:
            save_grid(images[:16], prompts[:16], args.grid)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
