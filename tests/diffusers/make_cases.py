# Cross-check with diffusers: loads Atelier's shipped starter model (models/starter) and a
# shipped style adapter (models/styles/pastel, both file layouts) with diffusers' own
# StableDiffusionPipeline.from_pretrained and load_lora_weights, and writes reference cases
# in the sd-tiny fixture format to tests/diffusers/cases, which
# server/engine/tests/diffusers_cases.rs (and `atelier reference`) recompute with Atelier.
# Regenerate after retraining the starter model or the style:
#   python3 -m venv /tmp/venv && /tmp/venv/bin/pip install torch diffusers transformers peft safetensors
#   /tmp/venv/bin/python tests/diffusers/make_cases.py tests/diffusers/cases
import json, sys, torch
from pathlib import Path
from safetensors.torch import save_file
from diffusers import StableDiffusionPipeline, DDIMScheduler

repo = Path(__file__).resolve().parents[2]; out = Path(sys.argv[1]).resolve(); out.mkdir(parents=True, exist_ok=True)
pipe = StableDiffusionPipeline.from_pretrained(repo / 'models/starter', safety_checker=None, requires_safety_checker=False, torch_dtype=torch.float32)
print('loaded pipeline', type(pipe.unet).__name__, pipe.unet.config.block_out_channels, pipe.vae.config.scaling_factor)
g = torch.Generator().manual_seed(1234)
ids = pipe.tokenizer(['a red circle on a blue background', ''], padding='max_length', max_length=77, truncation=True, return_tensors='pt').input_ids
with torch.no_grad():
    te = pipe.text_encoder(ids)
    save_file({'input_ids': ids.contiguous(), 'last_hidden_state': te.last_hidden_state.contiguous(), 'pooler_output': te.pooler_output.contiguous()}, out / 'text_encoder.safetensors')
    (out / 'text_encoder.json').write_text('{}')
    sample = torch.randn(2, 4, 8, 8, generator=g)
    ehs = te.last_hidden_state
    t = torch.tensor([601.0])
    pred = pipe.unet(sample, t, encoder_hidden_states=ehs).sample
    save_file({'sample': sample, 'timestep': t, 'encoder_hidden_states': ehs.contiguous(), 'noise_pred': pred.contiguous()}, out / 'unet.safetensors')
    (out / 'unet.json').write_text('{}')
    lat = torch.randn(1, 4, 8, 8, generator=g)
    dec = pipe.vae.decode(lat).sample
    save_file({'latent': lat, 'decoded': dec.contiguous()}, out / 'vae_decode.safetensors')
    (out / 'vae_decode.json').write_text('{}')
    style = repo / 'models/styles/pastel'
    pipe.load_lora_weights(str(style), weight_name='pastel.safetensors', adapter_name='pastel_k')
    pipe.set_adapters(['pastel_k'], adapter_weights=[0.7])
    pred_k = pipe.unet(sample, t, encoder_hidden_states=ehs).sample
    pipe.delete_adapters('pastel_k')
    pipe.load_lora_weights(str(style), weight_name='pastel.diffusers.safetensors', adapter_name='pastel_d')
    pipe.set_adapters(['pastel_d'], adapter_weights=[0.7])
    pred_d = pipe.unet(sample, t, encoder_hidden_states=ehs).sample
    print('kohya vs diffusers file in diffusers:', (pred_k - pred_d).abs().max().item(), ' change vs no LoRA:', (pred_d - pred).abs().max().item())
    save_file({'sample': sample, 'timestep': t, 'encoder_hidden_states': ehs.contiguous(), 'noise_pred': pred_d.contiguous()}, out / 'lora_unet_pastel.safetensors')
    rel = lambda f: str(Path('../../../models/styles/pastel') / f)
    (out / 'lora_unet_pastel.json').write_text(json.dumps({'adapters': {'pastel': {'file_kohya': rel('pastel.safetensors'), 'file_diffusers': rel('pastel.diffusers.safetensors')}}, 'active_adapters': ['pastel'], 'adapter_weights': [0.7], 'checks': {'kohya_vs_diffusers_file_in_diffusers': (pred_k - pred_d).abs().max().item(), 'change_vs_no_lora': (pred_d - pred).abs().max().item()}, 'versions': {'torch': torch.__version__, 'diffusers': __import__('diffusers').__version__, 'peft': __import__('peft').__version__}}, indent=1))
print('wrote', sorted(p.name for p in out.iterdir()))
