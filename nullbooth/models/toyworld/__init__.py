"""The toy world: a small SD-architecture model trained on a procedural world of objects, colours, backgrounds.

`world` draws images and captions, `probe` reads the concepts back from images, `recipe` trains the model,
`evaluate` scores generated images; the trained pipeline ships in `weights/`. `distill` makes a Latent Consistency
Model from it by latent consistency distillation; what that adds (UNet, scheduler, configs) ships in `lcm_weights/`
(models/registry.py puts the full pipeline folder together).
"""

from pathlib import Path

WEIGHTS_DIR: Path = Path(__file__).resolve().parent / "weights"
LCM_WEIGHTS_DIR: Path = Path(__file__).resolve().parent / "lcm_weights"
