"""The PyTorch side of `atelier bench --against-torch`: the same workloads as Atelier's
`sd15-unet`, `sdxl-unet` and `sd15-vae` cases, on diffusers' own models with the same configs and random
weights, one JSON line per case on stdout.

    python bench_torch.py --case sd15-unet --steps 3 --threads 2

sd15-unet: UNet2DConditionModel with SD-1.5's config (runwayml/stable-diffusion-v1-5,
unet/config.json), batch 2 (CFG), 4×64×64 latents, 77×768 text states, timestep 500.
sdxl-unet: UNet2DConditionModel with SDXL base's config (stabilityai/stable-diffusion-xl-base-1.0,
unet/config.json), batch 2, 4×128×128 latents, 77×2048 text states, pooled text_embeds 1280 and
time_ids (1024, 1024, 0, 0, 1024, 1024), timestep 500.
sd15-vae: AutoencoderKL with SD-1.5's VAE config, decode of one 4×64×64 latent (512×512).
Both fp32 under torch.inference_mode() with diffusers' default attention processor
(F.scaled_dot_product_attention). One untimed warm-up, then the median of --steps runs;
peak_bytes is the process's peak RSS (ru_maxrss), weights included, as Atelier reports it;
resident_bytes is VmRSS once the model and inputs exist, so peak − resident is the step's own
working memory.
"""

import argparse
import json
import resource
import statistics
import sys
import time

UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=2048, attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
)


def resident_bytes():
    """VmRSS now (Linux), in bytes; 0 where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", choices=["sd15-unet", "sdxl-unet", "sd15-vae"], required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    import diffusers

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    if args.case == "sd15-unet":
        model = diffusers.UNet2DConditionModel(**UNET).eval()
        x = torch.randn(2, 4, 64, 64)
        ctx = torch.randn(2, 77, 768)
        t = torch.tensor(500.0)
        run = lambda: model(x, t, encoder_hidden_states=ctx).sample
        unit = "seconds_per_step"
    elif args.case == "sdxl-unet":
        model = diffusers.UNet2DConditionModel(**SDXL_UNET).eval()
        x = torch.randn(2, 4, 128, 128)
        ctx = torch.randn(2, 77, 2048)
        added = {"text_embeds": torch.randn(2, 1280), "time_ids": torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * 2)}
        t = torch.tensor(500.0)
        run = lambda: model(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
        unit = "seconds_per_step"
    else:
        model = diffusers.AutoencoderKL(**VAE).eval()
        z = torch.randn(1, 4, 64, 64)
        run = lambda: model.decode(z).sample
        unit = "seconds_per_decode"
    resident = resident_bytes()
    times = []
    with torch.inference_mode():
        run()  # warm-up
        for _ in range(max(1, args.steps)):
            start = time.perf_counter()
            out = run()
            float(out.sum())
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({
        "case": args.case, "engine": "pytorch", unit: statistics.median(times), "peak_bytes": peak,
        "resident_bytes": resident,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "diffusers": diffusers.__version__,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
