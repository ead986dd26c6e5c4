# Reference cases for LyCORIS LoHa and LoKr adapters: builds PEFT LoHaConfig / LoKrConfig
# adapters with seeded random (non-zero) weights on Atelier's shipped starter model
# (models/starter, loaded with diffusers' StableDiffusionPipeline.from_pretrained as in
# make_cases.py), computes the UNet noise prediction and the text encoder's output with
# each adapter active, and writes
#   - the adapters in LyCORIS/kohya key naming (lora_unet_…/lora_te_… + .hada_w1_a, …,
#     .lokr_w1, …, .alpha), one file each: loha.safetensors, lokr.safetensors;
#   - cases in the sd-tiny fixture format (NAME.json + NAME.safetensors, like
#     tests/diffusers/cases/lora_unet_pastel.*) whose adapters have only `file_kohya`,
# into tests/diffusers/lycoris. server/engine/tests/lycoris.rs recomputes them with Atelier.
#
# The file's tensors are PEFT's own (PEFT's LoHa/LoKr parameters have LyCORIS' names and
# shapes); alpha is chosen so that LyCORIS' formula gives PEFT's ΔW, and the script checks
# that: ΔW is recomputed from the saved tensors with the LyCORIS rules below and compared
# with the difference PEFT's merge makes to each base weight.
#   LoHa (lycoris/modules/loha.py, functional/loha.py):
#     ΔW = (w1a @ w1b) * (w2a @ w2b) * alpha / r, r = hada_w1_b rows; alpha missing or 0 → r.
#   LoKr (lycoris/modules/lokr.py, functional/lokr.py):
#     ΔW = kron(w1, w2) * scale, w1 = lokr_w1 or lokr_w1_a @ lokr_w1_b, w2 likewise;
#     r = lokr_w1_b rows if w1 is factored, else lokr_w2_b rows if w2 is; scale = alpha / r
#     (alpha missing or 0 → r), and scale = 1 when neither is factored (LyCORIS sets
#     alpha = lora_dim then). PEFT scales by alpha / r in every case, so for a module with
#     two full matrices its scale is folded into lokr_w1 here.
# Regenerate:
#   python3 -m venv /tmp/venv && /tmp/venv/bin/pip install torch diffusers transformers peft safetensors
#   /tmp/venv/bin/python tests/diffusers/make_lycoris_cases.py tests/diffusers/lycoris
import json, sys, torch
from pathlib import Path
from safetensors.torch import save_file
from diffusers import StableDiffusionPipeline
from peft import LoHaConfig, LoKrConfig, inject_adapter_in_model
from peft.tuners.lycoris_utils import LycorisLayer

repo = Path(__file__).resolve().parents[2]; out = Path(sys.argv[1]).resolve(); out.mkdir(parents=True, exist_ok=True)
versions = {'torch': torch.__version__, 'diffusers': __import__('diffusers').__version__, 'peft': __import__('peft').__version__}


def load():
    return StableDiffusionPipeline.from_pretrained(repo / 'models/starter', safety_checker=None, requires_safety_checker=False, torch_dtype=torch.float32)


pipe = load()
g = torch.Generator().manual_seed(4321)
ids = pipe.tokenizer(['a red circle on a blue background', 'a cat'], padding='max_length', max_length=77, truncation=True, return_tensors='pt').input_ids
with torch.no_grad():
    ehs = pipe.text_encoder(ids).last_hidden_state.contiguous()
sample = torch.randn(2, 4, 8, 8, generator=g)
t = torch.tensor([601.0])
with torch.no_grad():
    base_pred = pipe.unet(sample, t, encoder_hidden_states=ehs).sample
    base_te = pipe.text_encoder(ids)

KOHYA = {'unet': 'lora_unet_', 'text_encoder': 'lora_te_'}
UNET_TARGETS = ['to_q', 'to_k', 'to_v', 'to_out.0', 'conv1']
TE_TARGETS = ['q_proj', 'v_proj']


def lycoris_delta(kind, w, shape):
    """ΔW from a module's saved tensors, by LyCORIS' rules (see the header)."""
    alpha = float(w['alpha']) if 'alpha' in w else None
    if kind == 'loha':
        r = w['hada_w1_b'].shape[0]
        scale = (alpha if alpha else r) / r
        d = (w['hada_w1_a'] @ w['hada_w1_b'].flatten(1)) * (w['hada_w2_a'] @ w['hada_w2_b'].flatten(1)) * scale
        return d.reshape(shape)
    w1 = w['lokr_w1'] if 'lokr_w1' in w else w['lokr_w1_a'] @ w['lokr_w1_b']
    w2 = w['lokr_w2'] if 'lokr_w2' in w else w['lokr_w2_a'] @ w['lokr_w2_b'].flatten(1)
    r = w['lokr_w1_b'].shape[0] if 'lokr_w1_b' in w else w['lokr_w2_b'].shape[0] if 'lokr_w2_b' in w else None
    scale = 1.0 if r is None else (alpha if alpha else r) / r
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return (torch.kron(w1, w2) * scale).reshape(shape)


def build(kind, seed):
    """The pipeline with a `kind` adapter injected into the UNet and the text encoder."""
    p = load()
    torch.manual_seed(seed)
    if kind == 'loha':
        # rank 4 (16·(in+out) < in·out for the 64-wide layers: Atelier applies those as a
        # rank-16 LoRA, the 32-wide ones as a dense ΔW); the 3×3 convolutions at rank 8.
        unet_cfg = LoHaConfig(r=4, alpha=6, target_modules=UNET_TARGETS, rank_pattern={'conv1': 8}, alpha_pattern={'conv1': 4}, init_weights=False)
        te_cfg = LoHaConfig(r=4, alpha=2, target_modules=TE_TARGETS, init_weights=False)
    else:
        # rank 2 with decompose_both: 64-wide layers get w1 = w1_a @ w1_b (2 < 8/2) and a
        # factored w2, 32-wide ones a full w1; to_v at rank 8 gets two full matrices.
        unet_cfg = LoKrConfig(r=2, alpha=3, target_modules=UNET_TARGETS, decompose_both=True, rank_pattern={'to_v': 8}, init_weights=False)
        te_cfg = LoKrConfig(r=2, alpha=5, target_modules=TE_TARGETS, init_weights=False)
    inject_adapter_in_model(unet_cfg, p.unet, adapter_name='default')
    inject_adapter_in_model(te_cfg, p.text_encoder, adapter_name='default')
    # PEFT's random init makes a LoHa's ΔW (a product of four small matrices) tiny next to
    # the weights; enlarge its factors so the cases test something.
    boost = 2.5 if kind == 'loha' else 1.0
    with torch.no_grad():
        for m in [*p.unet.modules(), *p.text_encoder.modules()]:
            if isinstance(m, LycorisLayer):
                for attr in m.adapter_layer_names:
                    if 'default' in getattr(m, attr):
                        getattr(m, attr)['default'].mul_(boost)
    return p


def export(kind, p):
    """The adapter's tensors in LyCORIS/kohya naming, each module checked against PEFT's merge."""
    tensors = {}
    worst = 0.0
    for part in ['unet', 'text_encoder']:
        model = getattr(p, part)
        for name, m in model.named_modules():
            if not isinstance(m, LycorisLayer) or 'default' not in m._available_adapters:
                continue
            # kohya names text-encoder layers by their checkpoint names (text_model.encoder.…),
            # which transformers 5's CLIPTextModel no longer has as a module prefix.
            if part == 'text_encoder' and not name.startswith('text_model.'):
                name = 'text_model.' + name
            stem = KOHYA[part] + name.replace('.', '_')
            w = {}
            for attr in m.adapter_layer_names:
                d = getattr(m, attr)
                if 'default' in d:
                    w[attr] = d['default'].detach().clone().float()
            assert not any(k in w for k in ('hada_t1', 'hada_t2', 'lokr_t2')), name
            scaling = m.scaling['default']
            r = m.r['default']
            if kind == 'lokr' and 'lokr_w1' in w and 'lokr_w2' in w:
                w['lokr_w1'] = w['lokr_w1'] * scaling  # LyCORIS: scale 1 for two full matrices
                w['alpha'] = torch.tensor(float(r))
            else:
                w['alpha'] = torch.tensor(float(m.alpha['default']))
            base = m.get_base_layer().weight.detach().clone()
            m.merge(adapter_names=['default'])
            peft_delta = m.get_base_layer().weight.detach() - base
            m.unmerge()
            ours = lycoris_delta(kind, w, base.shape)
            err = (ours - peft_delta).abs().max().item()
            assert err <= 1e-6 * max(1.0, peft_delta.abs().max().item()), (name, err)
            assert peft_delta.abs().max().item() > 1e-2, (name, 'adapter too small to test anything')
            worst = max(worst, err)
            for k, v in w.items():
                tensors[f'{stem}.{k}'] = v.contiguous()
    return tensors, worst


def set_weight(p, weight):
    for part in [p.unet, p.text_encoder]:
        for m in part.modules():
            if isinstance(m, LycorisLayer):
                m.set_scale('default', weight)


def case(name, adapter, weight, tensors, checks):
    save_file(tensors, out / f'{name}.safetensors')
    (out / f'{name}.json').write_text(json.dumps({
        'adapters': {adapter: {'file_kohya': f'{adapter}.safetensors'}},
        'active_adapters': [adapter],
        'adapter_weights': [weight],
        'checks': checks,
        'versions': versions,
    }, indent=1))


summary = {}
for kind, seed, weights in [('loha', 11, [1.0, 0.6]), ('lokr', 12, [1.0, -0.7])]:
    p = build(kind, seed)
    tensors, worst = export(kind, p)
    save_file(tensors, out / f'{kind}.safetensors', metadata={'ss_network_module': 'lycoris.kohya', 'ss_network_args': json.dumps({'algo': kind})})
    kinds = {}
    for k in tensors:
        kinds.setdefault(k.split('.')[1], 0)
        kinds[k.split('.')[1]] += 1
    print(kind, len({k.split('.')[0] for k in tensors}), 'modules', kinds, 'max |ΔW_lycoris − ΔW_peft|', worst)
    for weight in weights:
        set_weight(p, weight)
        suffix = '' if weight == 1.0 else f'_w{abs(weight):g}'.replace('.', '') + ('neg' if weight < 0 else '')
        with torch.no_grad():
            pred = p.unet(sample, t, encoder_hidden_states=ehs).sample
            te = p.text_encoder(ids)
        change = (pred - base_pred).abs().max().item()
        te_change = (te.last_hidden_state - base_te.last_hidden_state).abs().max().item()
        checks = {'lycoris_formula_vs_peft_merge_max_abs_diff': worst}
        case(f'lora_unet_{kind}{suffix}', kind, weight,
             {'sample': sample, 'timestep': t, 'encoder_hidden_states': ehs, 'noise_pred': pred.contiguous()},
             {**checks, 'change_vs_no_adapter': change})
        case(f'lora_text_encoder_{kind}{suffix}', kind, weight,
             {'input_ids': ids.contiguous(), 'last_hidden_state': te.last_hidden_state.contiguous(), 'pooler_output': te.pooler_output.contiguous()},
             {**checks, 'change_vs_no_adapter': te_change})
        print(f'  weight {weight}: noise_pred change {change:.4f}, text encoder change {te_change:.4f}')
print('wrote', sorted(x.name for x in out.iterdir()))
