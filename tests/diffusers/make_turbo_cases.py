# Few-step references: SD-Turbo / SDXL-Turbo sampling as their model cards run it -- Euler
# ancestral with "trailing" timestep spacing, guidance 0 (no classifier-free guidance, no
# negative prompt), 1 step -- on the SDXL fixture (../shared/fixtures/sdxl-tiny) and on Atelier's
# SD-architecture starter model (models/starter). One ancestral step ends at sigma 0, so it draws
# no noise and init_latents determine the result. Cases in the sd-tiny fixture format, which
# server/engine/tests/reference.rs recomputes.
#   python3 -m venv /tmp/venv && /tmp/venv/bin/pip install torch diffusers transformers safetensors
#   /tmp/venv/bin/python tests/diffusers/make_turbo_cases.py tests/diffusers/turbo
import json, sys, torch
from pathlib import Path
from safetensors.torch import save_file
import diffusers
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, EulerAncestralDiscreteScheduler

repo = Path(__file__).resolve().parents[2]
out = Path(sys.argv[1]).resolve(); out.mkdir(parents=True, exist_ok=True)

def run(name, pipe, prompt, h, w, latent_hw, vae_factor, sdxl):
    sched = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing='trailing')
    pipe.scheduler = sched
    init = torch.randn(1, 4, *latent_hw, generator=torch.Generator().manual_seed(77))
    kw = dict(num_inference_steps=1, guidance_scale=0.0, height=h, width=w, latents=init, output_type='latent')
    with torch.no_grad():
        lat = pipe(prompt, **kw).images
        dec = pipe.vae.decode(lat / pipe.vae.config.scaling_factor).sample
    img = (dec / 2 + 0.5).clamp(0, 1)
    save_file({'init_latents': init.contiguous(), 'final_latents': lat.contiguous(), 'decoded': dec.contiguous(), 'image': img.contiguous()}, out / f'{name}.safetensors')
    cfg = dict(sched.config)
    (out / f'{name}.json').write_text(json.dumps({
        'what': f'{type(pipe).__name__}.__call__ as SD-Turbo/SDXL-Turbo are run: Euler ancestral, trailing spacing, 1 step, guidance 0',
        'prompt': prompt, 'negative_prompt': None, 'num_inference_steps': 1, 'guidance_scale': 0.0,
        'height': h, 'width': w, 'scheduler_class': 'EulerAncestralDiscreteScheduler',
        'scheduler_config': {k: (v if v != float('-inf') else '-inf') for k, v in cfg.items() if not k.startswith('_')},
        'timesteps': [float(t) for t in sched.timesteps],
        'tensor_roles': {'init_latents': 'INPUT', 'final_latents': 'EXPECTED', 'decoded': 'EXPECTED', 'image': 'EXPECTED'},
        'versions': {'torch': torch.__version__, 'diffusers': diffusers.__version__},
    }, indent=1, default=str))
    print(name, [float(t) for t in sched.timesteps], float(lat.abs().max()))

xl = StableDiffusionXLPipeline.from_pretrained(repo.parent / 'shared/fixtures/sdxl-tiny/pipeline', add_watermarker=False, torch_dtype=torch.float32)
run('pipeline_turbo_sdxl', xl, 'a red fox in tall grass', 48, 80, (24, 40), 2, True)
sd = StableDiffusionPipeline.from_pretrained(repo / 'models/starter', safety_checker=None, requires_safety_checker=False, torch_dtype=torch.float32)
run('pipeline_turbo_sd', sd, 'a red circle on a blue background', 64, 64, (8, 8), 8, False)
