# Reference for TAESD live previews: a small AutoencoderTiny (diffusers' TAESD class) with seeded
# random weights, its decoder saved in both layouts people have -- diffusers' (`decoder.layers.N.…`,
# as in madebyollin/taesd's diffusion_pytorch_model.safetensors) and the original TAESD one
# (`taesd_decoder.safetensors`: an nn.Sequential whose index 0 is the Clamp, so `N+1.…`) -- and
# what diffusers' `AutoencoderTiny.decode` gives for a latent. server/engine/tests/taesd.rs
# recomputes it with Atelier. Regenerate with:
#   python3 -m venv /tmp/venv && /tmp/venv/bin/pip install torch diffusers safetensors
#   /tmp/venv/bin/python tests/diffusers/make_taesd_cases.py tests/diffusers/taesd
import json, sys, torch
from pathlib import Path
from safetensors.torch import save_file
import diffusers
from diffusers import AutoencoderTiny

out = Path(sys.argv[1]).resolve(); out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(300)
# The standard TAESD layout (levels of 3, 3, 3, 1 blocks, ReLU, nearest 2x upsampling), 16 channels
# instead of 64 to keep the files small.
vae = AutoencoderTiny(encoder_block_out_channels=(16, 16, 16, 16), decoder_block_out_channels=(16, 16, 16, 16)).eval()
g = torch.Generator().manual_seed(301)
with torch.no_grad():
    for name, p in vae.decoder.named_parameters():
        p.add_(0.05 * torch.randn(p.shape, generator=g))  # biases non-zero too
    latent = 2.0 * torch.randn(1, 4, 8, 12, generator=g)
    decoded = vae.decode(latent).sample  # [-1, 1] scale, as diffusers returns it
dec = {k: v.contiguous() for k, v in vae.state_dict().items() if k.startswith('decoder.')}
save_file(dec, out / 'diffusion_pytorch_model.safetensors')
original = {}
for k, v in dec.items():
    rest = k[len('decoder.layers.'):]
    i, tail = rest.split('.', 1)
    original[f'{int(i) + 1}.{tail}'] = v
save_file(original, out / 'taesd_decoder.safetensors')
save_file({'latent': latent.contiguous(), 'decoded': decoded.contiguous()}, out / 'taesd_decode.safetensors')
(out / 'taesd_decode.json').write_text(json.dumps({
    'what': "AutoencoderTiny.decode(latent).sample: tanh(x/3)*3, the decoder layers, then *2-1 (diffusers' [-1,1] scale); the original TAESD decoder gives (decoded+1)/2",
    'files': ['diffusion_pytorch_model.safetensors (diffusers keys)', 'taesd_decoder.safetensors (original Sequential keys, Clamp at index 0)'],
    'config': {'decoder_block_out_channels': [16, 16, 16, 16], 'num_decoder_blocks': [3, 3, 3, 1], 'act_fn': 'relu', 'upsample_fn': 'nearest'},
    'max_abs_decoded': float(decoded.abs().max()),
    'versions': {'torch': torch.__version__, 'diffusers': diffusers.__version__},
}, indent=1))
print('decoded', tuple(decoded.shape), float(decoded.abs().max()))
