"""Parity with open_clip's CoCa: a small random-weight open_clip.CoCa (float32, eval mode), converted
by vlm_jax.convert.open_clip_coca, against our CoCa with its open_clip options: image and text
embeddings (normalised and not), the captioning tokens, the caption logits of right-padded token
rows (every position, padding included), the contrastive and captioning losses against open_clip's
CoCaLoss, and greedy captions.

Optional: skipped unless open_clip is installed, which needs its own environment (open_clip needs
torchvision, which does not import beside our venv's torch 2.13; see the README):

    python -m pytest -n 0 tests/models/test_coca_open_clip.py
"""

import copy

import numpy as np
import pytest

open_clip = pytest.importorskip("open_clip")
torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
from open_clip.loss import CoCaLoss  # noqa: E402

from vlm_jax import models, tasks  # noqa: E402
from vlm_jax.convert import open_clip_coca  # noqa: E402
from vlm_jax.convert.checks import ConversionError  # noqa: E402
from vlm_jax.sampling import decode  # noqa: E402

ATOL, RTOL = 1e-5, 1e-4
B, L, V, PAD = 4, 16, 100, 0
BOS, EOS = V - 2, V - 1
# A scaled-down open_clip coca_ViT-B-32.json. The vision width (48) differs from embed_dim (32), so
# the pooler's attention has separate q/k/v projections (kdim != d_model); the text towers' are fused.
OC_CONFIG = dict(
    embed_dim=32,
    vision_cfg=dict(
        image_size=32, patch_size=8, width=48, layers=2, head_width=16, mlp_ratio=2.0,
        attentional_pool=True, attn_pooler_queries=6, attn_pooler_heads=4, output_tokens=True,
    ),
    text_cfg=dict(
        context_length=L, vocab_size=V, width=32, heads=4, layers=2, mlp_ratio=4.0, embed_cls=True,
        output_tokens=True,
    ),
    # open_clip ignores multimodal_cfg.mlp_ratio: its multimodal layers' MLPs are 4x wide.
    multimodal_cfg=dict(context_length=L, vocab_size=V, width=32, heads=4, layers=2, mlp_ratio=2.0),
    custom_text=True,
)


def _randomize(model, seed=0):
    """Every weight random (open_clip leaves some, e.g. the decoder's projection, torch.empty)."""
    g = torch.Generator().manual_seed(seed)
    norms = set()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1 + 0.1 * torch.randn(module.weight.shape, generator=g))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=g))
                norms |= {id(module.weight), id(module.bias)}
        for name, p in model.named_parameters():
            if name == "logit_scale":
                p.fill_(float(np.log(1 / 0.07)))
            elif id(p) not in norms:
                std = float(np.prod(p.shape[1:])) ** -0.5 if p.ndim >= 2 else 0.5
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model


def _open_clip_model(config=OC_CONFIG, seed=0):
    cfg = copy.deepcopy(config)
    model = open_clip.CoCa(cfg["embed_dim"], cfg["multimodal_cfg"], cfg["text_cfg"], cfg["vision_cfg"], pad_id=PAD)
    return _randomize(model.float().eval(), seed)


def _tokens(seed=0):
    """Rows: full length, right-padded (11 real, 5 real: the [CLS] mask differs), 15 real + 1 pad."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, V - 2, (B, L)).astype(np.int64)
    tokens[:, 0] = BOS
    for row, n in enumerate((L, 11, 5, L - 1)):
        tokens[row, n - 1] = EOS
        tokens[row, n:] = PAD
    return tokens


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    oc = _open_clip_model()
    config, params = open_clip_coca.convert(oc.state_dict(), OC_CONFIG)
    ours = models.build(config)
    images = torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = _tokens()
    return oc, ours, config, params, images, tokens


def _max_err(ours, theirs):
    return float(np.max(np.abs(np.asarray(ours, np.float64) - np.asarray(theirs, np.float64))))


def _close(name, ours, theirs, errors):
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.shape == theirs.shape, (name, ours.shape, theirs.shape)
    errors[name] = _max_err(ours, theirs)
    np.testing.assert_allclose(ours, theirs, atol=ATOL, rtol=RTOL, err_msg=name)


def test_model_config_and_param_tree(pair):
    _, _, config, params, _, _ = pair
    assert (config.pooling, config.text.layout) == ("open_clip", "open_clip")
    assert config.caption_queries == 5 and config.pooler_heads == 4
    assert (config.image.heads, config.image.ln_eps, config.image.act) == (3, 1e-5, "gelu")
    assert (config.text.unimodal_depth, config.text.multimodal_depth, config.text.context_length) == (2, 2, L)
    assert params["pooler"]["queries"].shape == (6, 32)
    assert params["text_pos_embedding"].shape == (L + 1, 32)
    assert "bias" not in params["lm_head"] and "ln_final" not in params["image"]
    assert {"ln_context", "cross_mlp"} <= set(params["multimodal"]["layers_0"])


def test_embeddings_logits_and_losses_match_open_clip(pair):
    oc, ours, _, params, images, tokens = pair
    with torch.no_grad():
        text = torch.from_numpy(tokens)
        out = oc(images, text)
        img_raw = oc.encode_image(images, normalize=False).numpy()
        txt_raw = oc.encode_text(text, normalize=False).numpy()
        _, image_embs = oc._encode_image(images)
        loss_fn = CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0, pad_id=PAD)
        con_loss, cap_loss = loss_fn(
            out["image_features"], out["text_features"], out["logits"], out["labels"], out["logit_scale"]
        )
    images_nhwc = jnp.asarray(images.numpy().transpose(0, 2, 3, 1))
    tokens_j = jnp.asarray(tokens, jnp.int32)
    task = tasks.get("coca")
    task_config = ml_collections.ConfigDict(
        dict(task=dict(contrastive_weight=1.0, caption_weight=2.0), model=dict(text=dict(pad_id=PAD)))
    )

    @jax.jit
    def run(params, images, tokens):  # one compile for everything
        v = {"params": params}
        loss, aux = task.loss_fn(
            ours, params, {"image": images, "tokens": tokens}, jax.random.key(0, impl="rbg"), task_config, {}
        )
        return dict(
            call=ours.apply(v, images, tokens),
            image=ours.apply(v, images, method="encode_image"),
            text=ours.apply(v, tokens, method="encode_text"),
            context=ours.apply(v, images, method="caption_context"),
            loss=loss,
            metrics=aux["metrics"],
        )

    got = jax.device_get(run(params, images_nhwc, tokens_j))
    errors = {}
    _close("image embedding", got["image"], img_raw, errors)
    _close("image embedding, normalised", got["call"]["image_embeds"], out["image_features"].numpy(), errors)
    _close("text embedding", got["text"], txt_raw, errors)
    _close("text embedding, normalised", got["call"]["text_embeds"], out["text_features"].numpy(), errors)
    _close("captioning tokens", got["context"], image_embs.numpy(), errors)
    _close("logit scale", got["call"]["logit_scale"], out["logit_scale"].numpy(), errors)
    # open_clip's forward feeds tokens[:, :-1] (its labels are tokens[:, 1:]); ours feeds all of them.
    _close("caption logits", got["call"]["logits"][:, :-1], out["logits"].numpy(), errors)
    # Both losses: symmetric InfoNCE; mean cross-entropy of tokens[:, 1:] over the non-pad targets.
    m = got["metrics"]
    _close("contrastive loss", m["contrastive_loss"], con_loss.numpy(), errors)
    _close("caption loss (x2)", 2.0 * m["caption_loss"], cap_loss.numpy(), errors)
    _close("total loss", got["loss"], (con_loss + cap_loss).numpy(), errors)
    assert float(m["caption_tokens"]) == int((tokens[:, 1:] != PAD).sum())
    # The padded rows exercise open_clip's legacy [CLS] mask: its corrected one
    # (TextTransformer.correct_cls_mask, which open_clip's CoCa never sets) embeds them otherwise.
    oc.text.correct_cls_mask = True
    try:
        with torch.no_grad():
            corrected = oc.encode_text(torch.from_numpy(tokens), normalize=False).numpy()
    finally:
        oc.text.correct_cls_mask = False
    gap = np.abs(corrected - txt_raw).max(axis=1)
    assert gap[0] == 0 and gap[1:].min() > 1e-2, gap
    print("\nmax |ours - open_clip|:\n" + "\n".join(f"  {k}: {v:.2e}" for k, v in errors.items()))


def test_greedy_captions_match_open_clip(pair):
    oc, ours, _, params, images, _ = pair
    prompts, new = [[BOS], [BOS, 7, 31, 5]], 8
    want = []
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            # open_clip's generate loop (top_k=1, no length or eos rules): the whole prefix each step.
            seq = torch.tensor([prompt])
            for _ in range(new):
                logits = oc(images[row:row + 1], seq, output_labels=False)["logits"][:, -1]
                seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
            want.append(seq[0, len(prompt):].tolist())
    context = jnp.asarray(images[: len(prompts)].numpy().transpose(0, 2, 3, 1))
    got = decode.generate(
        ours.make_decoder(), params, prompts, max_new_tokens=new, context=context, stop_tokens=(), pad_id=PAD
    )
    assert got == want


def test_fused_pooler_projections_and_rejected_configs():
    # vision width == embed_dim: the pooler's q/k/v come fused (in_proj_weight), as in the text towers.
    config = copy.deepcopy(OC_CONFIG)
    config["vision_cfg"]["width"] = 32
    oc = _open_clip_model(config)
    assert "visual.attn_pool.attn.in_proj_weight" in oc.state_dict()
    _, params = open_clip_coca.convert(oc.state_dict(), config)
    q = params["pooler"]["attn"]["query"]["kernel"]
    np.testing.assert_array_equal(q.reshape(32, 32).T, oc.visual.attn_pool.attn.in_proj_weight[:32].detach().numpy())
    # Scanned layers: the stacked params fit the scanned model's tree (convert checks it).
    scanned_config, scanned = open_clip_coca.convert(oc.state_dict(), config, scan_layers=True)
    assert scanned_config.scan_layers and scanned["multimodal"]["layers"]["cross_mlp"]["fc1"]["kernel"].shape[0] == 2
    # What our CoCa cannot compute is refused, not silently converted.
    for section, key, value in (
        ("vision_cfg", "attentional_pool", "parallel"),
        ("vision_cfg", "ls_init_value", 0.1),
        ("text_cfg", "embed_cls", False),
        ("multimodal_cfg", "heads", 2),
        ("text_cfg", "mlp_ratio", 2.0),
    ):
        bad = copy.deepcopy(OC_CONFIG)
        bad[section][key] = value
        with pytest.raises(ConversionError, match=key):
            open_clip_coca.model_config(bad)
    with pytest.raises(ConversionError, match="no weight"):
        open_clip_coca.convert({k: v for k, v in oc.state_dict().items() if "ln_1_kv" not in k}, config)
