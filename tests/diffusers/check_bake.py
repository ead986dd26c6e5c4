# Cross-check of blend baking with diffusers: the exact bake of inkline 0.6 + pastel 0.4 (made
# by `atelier blend bake`) must load with load_lora_weights and give the UNet output that
# diffusers itself computes with the two shipped adapters at those weights (set_adapters).
# Usage (venv as in make_cases.py):
#   target/debug/atelier blend link --style inkline:0.6 --style pastel:0.4 --prompt x --data-dir /tmp/b --save mix
#   target/debug/atelier blend bake mix --data-dir /tmp/b --out /tmp/b/exact.safetensors
#   target/debug/atelier blend bake mix --data-dir /tmp/b --rank 4 --out /tmp/b/rank4.safetensors
#   python tests/diffusers/check_bake.py /tmp/b/exact.safetensors /tmp/b/rank4.safetensors
import sys, torch
from pathlib import Path
from diffusers import StableDiffusionPipeline

repo = Path(__file__).resolve().parents[2]
pipe = StableDiffusionPipeline.from_pretrained(repo / 'models/starter', safety_checker=None, requires_safety_checker=False, torch_dtype=torch.float32)
g = torch.Generator().manual_seed(7)
ids = pipe.tokenizer(['a red circle on a blue background'], padding='max_length', max_length=77, truncation=True, return_tensors='pt').input_ids
sample, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500.0])

def unet():
    with torch.no_grad():
        return pipe.unet(sample, t, encoder_hidden_states=pipe.text_encoder(ids).last_hidden_state).sample

base = unet()
for n in ['inkline', 'pastel']:
    pipe.load_lora_weights(str(repo / f'models/styles/{n}'), weight_name=f'{n}.safetensors', adapter_name=n)
pipe.set_adapters(['inkline', 'pastel'], adapter_weights=[0.6, 0.4])
mix = unet()
pipe.delete_adapters(['inkline', 'pastel'])
worst = 0.0
for i, f in enumerate(sys.argv[1:]):
    p = Path(f)
    pipe.load_lora_weights(str(p.parent), weight_name=p.name, adapter_name=f'b{i}')
    pipe.set_adapters([f'b{i}'], adapter_weights=[1.0])
    out = unet()
    pipe.delete_adapters(f'b{i}')
    d = (out - mix).abs().max().item()
    print(f'{p.name}: max |baked - diffusers two-adapter mix| = {d:.2e} (the mix moves the output by {(mix - base).abs().max().item():.2e})')
    if i == 0:
        worst = d
sys.exit(0 if worst < 1e-4 else 1)
