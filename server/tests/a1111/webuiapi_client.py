"""Drives a running Atelier studio with the real `webuiapi` client (A1111's API), unmodified.

Usage: python webuiapi_client.py HOST PORT DEPLOYMENT
Checks image sizes and info fields; exits non-zero with the failed check on stderr.
Prints one JSON line with what it saw (the Rust test reads it).
"""

import json
import sys

import webuiapi
from PIL import Image


def check(cond, what):
    if not cond:
        sys.exit(f"check failed: {what}")


def main():
    host, port, deployment = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    api = webuiapi.WebUIApi(host=host, port=port, sampler="Euler a", steps=4)
    seen = {}

    models = api.get_sd_models()
    titles = [m["title"] for m in models]
    check(any(m["model_name"] == deployment for m in models), f"sd-models lists {deployment}: {titles}")
    seen["models"] = titles
    loras = api.get_loras()
    seen["loras"] = [l["name"] for l in loras]
    check("inkline" in seen["loras"], f"loras lists inkline: {seen['loras']}")
    samplers = [s["name"] for s in api.get_samplers()]
    check("Euler a" in samplers and "DPM++ 2M Karras" in samplers, f"samplers: {samplers}")
    seen["samplers"] = samplers

    # txt2img on the plain model, a <lora:...> tag in the prompt.
    r = api.txt2img(prompt="a red circle on a blue background <lora:inkline:0.6>", seed=3, width=64, height=64, batch_size=2, cfg_scale=7)
    check(len(r.images) == 2, f"two images, got {len(r.images)}")
    check(all(i.size == (64, 64) for i in r.images), f"64x64: {[i.size for i in r.images]}")
    check(r.info["all_seeds"] == [3, 4], f"all_seeds: {r.info.get('all_seeds')}")
    check(r.info["sampler_name"] == "Euler a" and r.info["steps"] == 4, f"sampler/steps: {r.info}")
    check("Lora hashes" in r.info["extra_generation_params"], f"lora used: {r.info['extra_generation_params']}")
    check(r.parameters["prompt"].endswith("<lora:inkline:0.6>"), f"parameters echo: {r.parameters.get('prompt')}")
    # The PNG carries A1111's infotext, as A1111's own images do.
    check("Seed: 3" in r.images[0].info.get("parameters", ""), f"png parameters: {r.images[0].info}")

    # Select the deployment through the options; its version is named in the info.
    check(api.set_options({"sd_model_checkpoint": deployment}) is None, "set_options answers null")
    check(api.get_options()["sd_model_checkpoint"] == deployment, "option kept")
    r = api.txt2img(prompt="a circle", seed=5, width=64, height=64)
    check(r.info["extra_generation_params"].get("Deployment") == deployment, f"deployment in info: {r.info}")
    seen["version"] = r.info["extra_generation_params"].get("Style version")

    # img2img with an init image of another size, resized to the request.
    init = Image.new("RGB", (48, 40), (200, 30, 30))
    r = api.img2img(images=[init], prompt="a circle", denoising_strength=0.5, width=64, height=64, seed=1)
    check(len(r.images) == 1 and r.images[0].size == (64, 64), f"img2img size: {[i.size for i in r.images]}")
    check(r.info["denoising_strength"] == 0.5, f"denoising_strength: {r.info.get('denoising_strength')}")

    progress = api.get_progress()
    check("progress" in progress and "state" in progress, f"progress: {progress}")
    print(json.dumps(seen))


if __name__ == "__main__":
    main()
