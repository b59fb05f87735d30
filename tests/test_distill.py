"""Latent consistency distillation of the toy-world LCM: its math against diffusers' own schedulers, a few real
distillation steps into a stock LCM folder, the CLI's refusals, and the shipped LCM's provenance."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from nullbooth.errors import NullBoothError
from nullbooth.models.toyworld import LCM_WEIGHTS_DIR, WEIGHTS_DIR
from nullbooth.models.toyworld import distill as lcd
from nullbooth.models.toyworld.provenance import digest_tree, sha256_file

CAPTIONS = ["a red star on a sky background", "a photo of a blue teapot on a striped wooden floor"]


@pytest.fixture(scope="module")
def teacher():
    """The shipped toy SD pipeline, float32."""
    return lcd.load_teacher("toy")[1]


def _text(pipe, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    from nullbooth.models.toyworld.text import encode_prompts

    emb = encode_prompts(pipe.tokenizer, pipe.text_encoder, [*captions, ""])
    return emb[:-1], emb[-1:].expand(len(captions), -1, -1)


def _latents(pipe, n: int, seed: int) -> torch.Tensor:
    c, s = pipe.unet.config.in_channels, pipe.unet.config.sample_size
    return torch.randn(n, c, s, s, generator=torch.Generator().manual_seed(seed))


def _perturbed(unet, seed: int):
    """A copy of `unet` with every weight moved a little (and the guidance projection no longer zero)."""
    import copy

    out = copy.deepcopy(unet)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return out


def _ddim(pipe):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    sched.set_timesteps(50)
    return sched


def test_boundary_scalings_hold_the_boundary_condition_and_equal_lcm_schedulers():
    from diffusers import LCMScheduler

    c_skip, c_out = lcd.boundary_scalings(torch.tensor([0]))
    assert c_skip.item() == 1.0 and c_out.item() == 0.0  # f(x, 0) = x
    sched = LCMScheduler(timestep_scaling=10.0)
    t = torch.tensor([0, 1, 19, 39, 499, 999])
    c_skip, c_out = lcd.boundary_scalings(t, timestep_scaling=10.0)
    for i, step in enumerate(t.tolist()):
        ref_skip, ref_out = sched.get_scalings_for_boundary_condition_discrete(step)
        assert c_skip[i].item() == pytest.approx(ref_skip, rel=1e-6, abs=1e-12)
        assert c_out[i].item() == pytest.approx(ref_out, rel=1e-6)
    assert c_skip[-1] < 1e-6 and c_out[-1] > 1 - 1e-6  # far from the boundary f is the denoised estimate


def test_pseudo_huber_equals_an_independent_computation():
    a = torch.tensor([[0.0, 0.5, -2.0], [1e-4, 3.0, -1e-3]])
    b = torch.tensor([[0.0, -0.5, 1.0], [0.0, 3.0, 1e-3]])
    c = 0.001
    d = a.numpy().astype(np.float64) - b.numpy().astype(np.float64)
    expected = float(np.mean(np.sqrt(d**2 + c**2) - c))
    assert lcd.pseudo_huber(a, b, c).item() == pytest.approx(expected, rel=1e-5)
    assert lcd.pseudo_huber(a, a, c).item() == 0.0


def test_the_solver_schedule_is_ddims_trailing_and_lcms_original_schedule(teacher):
    from diffusers import LCMScheduler

    solver = lcd.SkippingDDIM(teacher.scheduler.alphas_cumprod, 50)
    assert solver.k == 20 and solver.timesteps[0] == 19 and solver.timesteps[-1] == 999
    assert solver.timesteps.flip(0).tolist() == _ddim(teacher).timesteps.tolist()
    lcm = LCMScheduler.from_config(teacher.scheduler.config, original_inference_steps=50)
    lcm.set_timesteps(50)
    assert sorted(lcm.timesteps.tolist()) == solver.timesteps.tolist()


def test_the_teacher_step_is_a_guided_ddimscheduler_step(teacher):
    """The teacher's solver step equals diffusers' DDIMScheduler.step on the classifier-free-guided noise, computed
    with one UNet call per branch; index 0 steps to t = 0 (alpha_bar_0, set_alpha_to_one=False)."""
    solver = lcd.SkippingDDIM(teacher.scheduler.alphas_cumprod, 50)
    sched = _ddim(teacher)
    text, uncond = _text(teacher, CAPTIONS)
    guidance = torch.tensor([3.0, 6.5])
    for i in (0, 1, 24, 49):
        x = _latents(teacher, 2, seed=i)
        index = torch.full((2,), i)
        got = lcd.teacher_step(teacher.unet, solver, x, index, text, uncond, guidance)
        t = int(solver.timesteps[i])
        with torch.no_grad():
            eps_c = teacher.unet(x, t, encoder_hidden_states=text).sample
            eps_u = teacher.unet(x, t, encoder_hidden_states=uncond).sample
        for j in range(2):
            eps = eps_u[j:j + 1] + guidance[j] * (eps_c[j:j + 1] - eps_u[j:j + 1])
            ref = sched.step(eps, t, x[j:j + 1], eta=0.0).prev_sample
            torch.testing.assert_close(got[j:j + 1], ref, rtol=1e-4, atol=1e-4)


def test_the_student_starts_as_the_teacher(teacher):
    student = lcd.make_student(teacher.unet, 256)
    assert student.config.time_cond_proj_dim == 256
    x, (text, _) = _latents(teacher, 2, seed=5), _text(teacher, CAPTIONS)
    t = torch.tensor([99, 799])
    with torch.no_grad():
        ref = teacher.unet(x, t, encoder_hidden_states=text).sample
        got = student(x, t, encoder_hidden_states=text, timestep_cond=lcd.guidance_condition(torch.tensor([2.0, 8.0]),
                                                                                               256)).sample
    torch.testing.assert_close(got, ref)


def test_the_lcd_loss_equals_an_independent_computation_with_diffusers_schedulers(teacher):
    """Student f at t_{n+k} against the EMA target's f at t_n of the teacher's guided DDIM step, pseudo-Huber: rebuilt
    here from DDPMScheduler.add_noise, DDIMScheduler.step, the LCM pipeline's guidance embedding and LCMScheduler's
    boundary scalings, one sample at a time."""
    from diffusers import DDPMScheduler, LatentConsistencyModelPipeline, LCMScheduler

    settings = lcd.DistillSettings()
    solver = lcd.SkippingDDIM(teacher.scheduler.alphas_cumprod, 50)
    student = _perturbed(lcd.make_student(teacher.unet, 256), seed=1)
    target = _perturbed(student, seed=2)
    text, uncond = _text(teacher, CAPTIONS)
    batch = lcd.LCDBatch(latents=_latents(teacher, 2, 7), noise=_latents(teacher, 2, 8), index=torch.tensor([0, 30]),
                         guidance=torch.tensor([2.5, 7.0]), text=text, uncond=uncond)
    with torch.no_grad():
        got = lcd.lcd_loss(student, target, teacher.unet, solver, batch, settings).item()

    ddpm, ddim = DDPMScheduler.from_config(teacher.scheduler.config), _ddim(teacher)
    lcm = LCMScheduler.from_config(teacher.scheduler.config, timestep_scaling=10.0)
    preds, targets = [], []
    for j, i in enumerate(batch.index.tolist()):
        t_start, t_end = 20 * i + 19, max(20 * i - 1, 0)
        x = ddpm.add_noise(batch.latents[j:j + 1], batch.noise[j:j + 1], torch.tensor([t_start]))
        w = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, batch.guidance[j:j + 1] - 1, 256)
        with torch.no_grad():
            eps_c, eps_u, eps_s = (m(x, t_start, encoder_hidden_states=e, **kw).sample for m, e, kw in (
                (teacher.unet, text[j:j + 1], {}), (teacher.unet, uncond[j:j + 1], {}),
                (student, text[j:j + 1], {"timestep_cond": w})))
            x_prev = ddim.step(eps_u + batch.guidance[j] * (eps_c - eps_u), t_start, x).prev_sample
            eps_t = target(x_prev, t_end, encoder_hidden_states=text[j:j + 1], timestep_cond=w).sample
        for out, (xx, t, eps) in ((preds, (x, t_start, eps_s)), (targets, (x_prev, t_end, eps_t))):
            c_skip, c_out = lcm.get_scalings_for_boundary_condition_discrete(t)
            x0 = ddim.step(eps, t, xx).pred_original_sample
            out.append(c_skip * xx + c_out * x0)
    d = (torch.cat(preds) - torch.cat(targets)).double()
    expected = torch.mean(torch.sqrt(d**2 + 0.001**2) - 0.001).item()
    assert got == pytest.approx(expected, rel=1e-4)
    assert expected > 1e-3  # the perturbed student and target really differ


def test_distillation_writes_a_stock_lcm_folder_with_provenance(tmp_path, capsys):
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    from nullbooth.cli import main as cli_main
    from nullbooth.prompts import is_toy_world

    small = {"steps": 2, "batch_size": 2, "num_images": 16, "progress": False}
    out = lcd.distill_toy_lcm(tmp_path / "lcm", **small)
    assert not [p for p in tmp_path.iterdir() if p.name != "lcm"]  # the temporary folder is gone
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["files"] == digest_tree(out) and "unet/diffusion_pytorch_model.safetensors" in prov["files"]
    assert prov["teacher"]["provenance_sha256"] == sha256_file(WEIGHTS_DIR / "provenance.json")
    assert prov["settings"]["steps"] == prov["distillation"]["steps"] == 2 and prov["data"]["images"] == 16
    assert np.isfinite(prov["distillation"]["final_loss"])
    kept = [n for n in prov["files"] if n.startswith(("vae/", "text_encoder/", "tokenizer/", "probe."))]
    assert len(kept) == 8 and all(sha256_file(out / n) == sha256_file(WEIGHTS_DIR / n) for n in kept)  # the teacher's
    assert "_name_or_path" not in json.loads((out / "unet" / "config.json").read_text())
    assert is_toy_world(str(out))

    pipe = LatentConsistencyModelPipeline.from_pretrained(out, dtype=torch.float32, safety_checker=None)
    assert pipe.unet.config.time_cond_proj_dim == 256 and isinstance(pipe.scheduler, LCMScheduler)
    assert pipe.scheduler.config.original_inference_steps == 50
    assert next(pipe.unet.parameters()).dtype == torch.float32
    images = pipe(CAPTIONS, num_inference_steps=4, guidance_scale=5.0, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()

    again = lcd.distill_toy_lcm(tmp_path / "again", **small)  # seeded: the same bits
    assert json.loads((again / "provenance.json").read_text())["files"] == prov["files"]

    with pytest.raises(NullBoothError, match="already exists"):
        lcd.distill_toy_lcm(out, **small)
    with pytest.raises(NullBoothError, match="unknown setting"):
        lcd.distill_toy_lcm(tmp_path / "x", bogus=1)
    capsys.readouterr()
    assert cli_main(["toy-model", "distill-lcm", str(out), "--steps", "1"]) == 2
    assert capsys.readouterr().err == (f"nullbooth: error: toy LCM output {out}: already exists (pass --overwrite, "
                                       "or overwrite=True, to replace it)\n")
    assert cli_main(["toy-model", "distill-lcm", str(tmp_path / "y"), "--teacher", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "teacher" in err and "model_index.json" in err
    assert cli_main(["toy-model", "distill-lcm", str(tmp_path / "y"), "--teacher", str(out)]) == 2
    assert "already has time_cond_proj_dim" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def _save_changed(folder: Path, part: str, module, name: str) -> None:
    """`module` saved as `folder`/`part`, with parameter `name` shifted: a part that is no longer the teacher's."""
    with torch.no_grad():
        dict(module.named_parameters())[name].add_(0.05)
    module.save_pretrained(folder / part, safe_serialization=True)


def test_a_distilled_student_is_kept_only_for_a_teacher_with_what_it_was_distilled_from(tmp_path, teacher):
    """`reuse_student` hands a distilled UNet to a new teacher folder without distilling again; that is sound only
    when the new teacher has what distillation read (UNet, VAE encoder and scaling factor, text encoder, ...). A new
    VAE decoder is allowed (the student is then bit-identical, the shared parts the new teacher's); a change to any
    of the others is refused, and so is a folder that is no distilled LCM."""
    import copy

    from safetensors.torch import load_file

    first = lcd.distill_toy_lcm(tmp_path / "lcm", steps=2, batch_size=2, num_images=16, progress=False)
    new_decoder = tmp_path / "new-decoder"
    shutil.copytree(WEIGHTS_DIR, new_decoder)
    _save_changed(new_decoder, "vae", copy.deepcopy(teacher.vae), "decoder.conv_out.weight")
    kept = lcd.distill_toy_lcm(tmp_path / "kept", teacher=str(new_decoder), reuse_student=str(first),
                               progress=False)
    unet = "unet/diffusion_pytorch_model.safetensors"
    before, after = load_file(str(first / unet)), load_file(str(kept / unet))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert (kept / "unet" / "config.json").read_text() == (first / "unet" / "config.json").read_text()
    vae = "vae/diffusion_pytorch_model.safetensors"
    assert sha256_file(kept / vae) == sha256_file(new_decoder / vae) != sha256_file(first / vae)
    prov = json.loads((kept / "provenance.json").read_text())
    assert prov["files"] == digest_tree(kept) and prov["teacher"]["folder"] == str(new_decoder)
    assert prov["distillation"]["reused_from"] == str(first) and prov["distillation"]["steps"] == 2
    assert prov["settings"]["steps"] == 2 and prov["lineage"]["student"] == str(first)
    for part, module, name, what in (("unet", teacher.unet, "conv_out.bias", "UNet"),
                                     ("vae", teacher.vae, "encoder.conv_in.bias", "VAE encoder"),
                                     ("text_encoder", teacher.text_encoder, "final_layer_norm.bias", "text encoder")):
        other = tmp_path / f"other-{part}"
        shutil.copytree(WEIGHTS_DIR, other)
        _save_changed(other, part, copy.deepcopy(module), name)
        with pytest.raises(NullBoothError) as err:
            lcd.distill_toy_lcm(tmp_path / "refused", teacher=str(other), reuse_student=str(first), progress=False)
        assert str(err.value) == (f"LCM distillation: reuse_student {str(first)!r}: it was distilled from another "
                                  f"teacher (not the same {what}); distill anew")
    scaled = tmp_path / "other-scaling"
    shutil.copytree(WEIGHTS_DIR, scaled)
    vae_config = json.loads((scaled / "vae" / "config.json").read_text())
    (scaled / "vae" / "config.json").write_text(json.dumps({**vae_config, "scaling_factor": 0.5}))
    with pytest.raises(NullBoothError, match=r"\(not the same VAE scaling factor\); distill anew$"):
        lcd.distill_toy_lcm(tmp_path / "refused", teacher=str(scaled), reuse_student=str(first), progress=False)
    with pytest.raises(NullBoothError, match=r"not a distilled LCM \(no time_cond_proj_dim"):
        lcd.distill_toy_lcm(tmp_path / "refused", reuse_student=str(WEIGHTS_DIR), progress=False)
    assert not (tmp_path / "refused").exists()


def test_a_missing_shipped_model_says_how_to_make_one(tmp_path, monkeypatch):
    from nullbooth.models import registry

    monkeypatch.setitem(registry.SHIPPED_MODELS, "toy-lcm", (tmp_path, "nullbooth toy-model distill-lcm OUT_DIR", "lcm"))
    with pytest.raises(NullBoothError) as err:
        registry.resolve_model_location("toy-lcm")
    assert str(err.value) == (f"model.path: the shipped toy-lcm model is missing from {tmp_path}; reinstall the "
                              "package, or make one with `nullbooth toy-model distill-lcm OUT_DIR` and use that folder")
    assert registry.EMBEDDED_MODELS["toy-lcm"] == "lcm"


def test_the_shipped_lcm_matches_its_provenance_and_was_distilled_from_the_shipped_toy_model():
    """The shipped toy-world LCM: what distillation made (UNet, scheduler, configs), 10 MB or less, safetensors and
    JSON only; put together with the toy model's VAE, text encoder, tokenizer and probe it is, file by file, the
    folder its provenance describes, and its teacher is the shipped toy SD model (that model's provenance digest)."""
    from diffusers import UNet2DConditionModel

    from nullbooth.models.registry import TOY_LCM_SHARED_PARTS, resolve_model_location

    prov = json.loads((LCM_WEIGHTS_DIR / "provenance.json").read_text())
    files = [p for p in LCM_WEIGHTS_DIR.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} <= {".safetensors", ".json", ".txt"}
    assert sum(p.stat().st_size for p in files) <= 10 * 10**6
    assert {p.name for p in LCM_WEIGHTS_DIR.iterdir()} == {"unet", "scheduler", "model_index.json", "provenance.json"}
    assembled = Path(resolve_model_location("toy-lcm"))
    assert digest_tree(assembled) == prov["files"]
    for part in TOY_LCM_SHARED_PARTS:  # the toy model's own files, not copies made by the distillation
        shared = [name for name in prov["files"] if name.split("/")[0] == part]
        assert shared and all(prov["files"][n] == sha256_file(WEIGHTS_DIR / n) for n in shared), part
    assert prov["teacher"]["provenance_sha256"] == sha256_file(WEIGHTS_DIR / "provenance.json")
    config = json.loads((LCM_WEIGHTS_DIR / "model_index.json").read_text())
    assert config["_class_name"] == "LatentConsistencyModelPipeline" and config["scheduler"][1] == "LCMScheduler"
    unet = UNet2DConditionModel.from_pretrained(LCM_WEIGHTS_DIR, subfolder="unet")
    assert unet.config.time_cond_proj_dim == prov["settings"]["time_cond_proj_dim"]


def test_a_toy_lcm_whose_shared_parts_changed_is_refused(tmp_path, monkeypatch):
    """The LCM folder is put together from two folders; a toy model retrained after the distillation must not be
    paired with it silently."""
    from nullbooth.models.registry import ensure_toy_lcm

    monkeypatch.setenv("NULLBOOTH_CACHE", str(tmp_path / "cache"))
    toy = tmp_path / "toy"
    shutil.copytree(WEIGHTS_DIR, toy)
    probe_json = toy / "probe.json"
    probe_json.write_text(probe_json.read_text() + "\n")
    with pytest.raises(NullBoothError, match="do not match the LCM's provenance.json"):
        ensure_toy_lcm(LCM_WEIGHTS_DIR, toy)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").glob("toy-lcm-*"))
    lcm = tmp_path / "lcm"
    shutil.copytree(LCM_WEIGHTS_DIR, lcm)
    (lcm / "provenance.json").unlink()
    with pytest.raises(NullBoothError, match="provenance.json is missing or has no file digests"):
        ensure_toy_lcm(lcm, WEIGHTS_DIR)
