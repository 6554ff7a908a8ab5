"""convert.from_diffusers on a tiny random Stable-Diffusion-layout folder: the assembled pipeline
(text encoder -> guided DDIM over the UNet -> VAE decoder) draws what diffusers' own
StableDiffusionPipeline draws from the same latents, and broken folders are clear errors."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax import convert, models, tasks
from vlm_jax.convert import diffusers as diffusers_import
from vlm_jax.convert.checks import ConversionError

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

WIDTH, LENGTH = 32, 8


def _write_tokenizer(folder):
    """A CLIP BPE folder with no merges: the 256 byte symbols, each also with </w>, then bos, eos."""
    from vlm_jax.data.clip_bpe import bytes_to_unicode

    folder.mkdir()
    symbols = sorted(bytes_to_unicode().values(), key=ord)
    tokens = symbols + [c + "</w>" for c in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return len(tokens)


VOCAB = 2 * 256 + 2


def _perturb(model):
    with torch.no_grad():  # diffusers zero-initialises some projections: make every weight count
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    torch.manual_seed(0)
    unet = _perturb(diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        norm_num_groups=8, cross_attention_dim=WIDTH, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ))
    vae = _perturb(diffusers.AutoencoderKL(
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
    ))
    text = _perturb(transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=LENGTH, eos_token_id=VOCAB - 1, pad_token_id=0,
    )))
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    unet.save_pretrained(root / "unet", safe_serialization=True)
    vae.save_pretrained(root / "vae", safe_serialization=True)
    text.save_pretrained(root / "text_encoder", safe_serialization=True)
    scheduler.save_pretrained(root / "scheduler")
    assert _write_tokenizer(root / "tokenizer") == VOCAB
    (root / "model_index.json").write_text(json.dumps(dict(
        _class_name="StableDiffusionPipeline", unet=["diffusers", "UNet2DConditionModel"],
        vae=["diffusers", "AutoencoderKL"], text_encoder=["transformers", "CLIPTextModel"],
        scheduler=["diffusers", "DDIMScheduler"], tokenizer=["transformers", "CLIPTokenizer"],
    )))
    return root, dict(unet=unet, vae=vae, text=text, scheduler=scheduler)


def test_the_converted_pipeline_draws_what_diffusers_draws(folder):
    root, torch_parts = folder
    parts = convert.from_diffusers(str(root))
    assert set(parts) == {"unet", "vae", "text_encoder", "scheduler"}
    from transformers import CLIPTokenizer

    from vlm_jax.data.clip_bpe import ClipTokenizer

    config, params = convert.pipeline_config(parts, tokenizer=ClipTokenizer.load(str(root / "tokenizer")))
    model = models.build(config)
    with config.unlocked():
        config.task.update(dict(sample_steps=3, guidance=4.0))
    tokens = np.array([[VOCAB - 2, 5, 9, 17, VOCAB - 1, 0, 0, 0], [VOCAB - 2, 33, VOCAB - 1, 0, 0, 0, 0, 0]], np.int32)
    latents = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)

    with torch.no_grad():
        embeds = torch_parts["text"](torch.from_numpy(tokens).long())[0]
        pipe = diffusers.StableDiffusionPipeline(
            vae=torch_parts["vae"], text_encoder=torch_parts["text"], unet=torch_parts["unet"],
            tokenizer=CLIPTokenizer.from_pretrained(str(root / "tokenizer"), model_max_length=LENGTH),
            scheduler=torch_parts["scheduler"], safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
        # The unconditional half from diffusers' own encoding of the negative prompt "".
        theirs = pipe(prompt_embeds=embeds, latents=torch.from_numpy(latents).permute(0, 3, 1, 2),
                      num_inference_steps=3, guidance_scale=4.0, output_type="np", height=16, width=16).images
    assert config.task.null_tokens[:2] == [VOCAB - 2, VOCAB - 1]
    variables = {"params": params}
    x0 = tasks.get("diffusion").sample(model, variables, jnp.asarray(tokens), jax.random.key(0), config.task,
                                       data_config=config.data, x_init=jnp.asarray(latents))
    images = model.apply(variables, x0, method=model.decode)
    ours = np.clip(np.asarray(images) / 2 + 0.5, 0, 1)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_convert_then_sample_runs_the_whole_pipeline(folder, tmp_path):
    """vlm-jax convert --from-diffusers writes a run that vlm-jax sample draws from (the prompt through
    the folder's own CLIP tokenizer)."""
    from PIL import Image

    from vlm_jax import cli

    root, _ = folder
    out, grid = tmp_path / "converted", tmp_path / "grid.png"
    assert cli.main(["convert", "--from-diffusers", str(root), "--out", str(out)]) == 0
    assert (out / "tokenizer" / "vocab.json").exists() and (out / "params").is_dir()
    assert cli.main(["sample", "--workdir", str(out), "--prompt", "a cat", "-n", "2", "--out", str(grid),
                     "--config.task.sample_steps=2"]) == 0
    assert Image.open(grid).size[0] >= 2 * 16


def test_broken_folders_are_clear_errors(folder, tmp_path):
    root, _ = folder
    with pytest.raises(ConversionError, match="no .*model_index.json|model_index.json does not exist"):
        convert.from_diffusers(str(tmp_path))
    bad = tmp_path / "bad"
    shutil.copytree(root, bad)
    index = json.loads((bad / "model_index.json").read_text())
    (bad / "model_index.json").write_text(json.dumps({**index, "unet": ["diffusers", "UNet2DModel"]}))
    with pytest.raises(ConversionError, match="unet is a UNet2DModel"):
        convert.from_diffusers(str(bad))
    (bad / "model_index.json").write_text(json.dumps(index))
    (bad / "vae" / "config.json").unlink()
    with pytest.raises(ConversionError, match="vae: .*config.json does not exist"):
        convert.from_diffusers(str(bad))
    shutil.copy(root / "vae" / "config.json", bad / "vae" / "config.json")
    config = json.loads((bad / "text_encoder" / "config.json").read_text())
    (bad / "text_encoder" / "config.json").write_text(json.dumps({**config, "hidden_size": 48}))
    with pytest.raises(ConversionError, match="(?s)text_encoder: .*expects shape"):
        convert.from_diffusers(str(bad))
    shutil.rmtree(bad / "text_encoder")
    with pytest.raises(ConversionError, match="text_encoder: .*does not exist"):
        convert.from_diffusers(str(bad))
    (bad / "scheduler" / "scheduler_config.json").write_text(json.dumps({"beta_schedule": "sigmoid"}))
    with pytest.raises(ConversionError, match="beta_schedule 'sigmoid'"):
        diffusers_import.scheduler_task(json.loads((bad / "scheduler" / "scheduler_config.json").read_text()))
