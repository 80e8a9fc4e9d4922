"""Real-architecture sweep: every surgery on the checkpoints of many real models, checked
against what torch itself reads back.

    python benchmarks/sweep.py                  # CUDA when there is one, else the CPU
    python benchmarks/sweep.py --device cpu --only llama,gpt2 --jobs 2 --json out.json

For each model that the installed libraries can build (timm, torchvision, torchaudio and
transformers from tiny configs; nothing is downloaded) it writes the files people have, from
tensors on the device: ``torch.save(model.state_dict())``; a DDP resume dict (``module.`` keys,
AdamW state after a step, GradScaler, epoch); ``torch.compile(model).state_dict()``
(``_orig_mod.``); safetensors ``save_model`` (tied weights dropped as it does); for
transformers models a sharded ``save_pretrained`` folder. Then through the Python API (and the
CLI for one strip-prefix per model) it checks, each against ``torch.load`` / ``safetensors``:

  load         ckptsurgeon.load of the device-saved file == the model's state dict, bit for bit
  strip-ddp    strip-prefix of the resume dict: state dict, optimizer state, epoch all kept;
               the result loads into a fresh model with strict=True (CLI and API)
  strip-compile  strip-prefix of the torch.compile file
  safetensors  convert to .safetensors and back to .pt; safetensors' save_model file read
  extract      the first child module's weights, exactly
  diff         identical across the compile prefix; one perturbed tensor found and nothing else
  cast         bfloat16 cast: floating tensors == tensor.to(bfloat16), the others untouched
  average      the resume dict and a perturbed copy: the float64 mean, integers kept
  lora         (transformers) extract-lora of rank-2 changes to four weights, merged back
  verify       the stripped checkpoint computes what the original does (forward on the device)
  program      the weights read out of a torch.jit.trace archive and a torch.export .pt2 of the
               model == torch.jit.load(...).state_dict() / torch.export.load(...).state_dict
  fold-bn      BN folded where the model has BN (a refusal with a reason counts as n/a)
  bn-to-gn     a plain swap runs and verify measures the divergence without an error
  hf-folder    sharded folder read; re-sharded by us, from_pretrained gives the same logits

Each check is ``ok``, ``n/a: reason`` (a refusal that names why, e.g. a model torch.fx cannot
trace), or ``FAIL``/``ERROR`` with the message. One line per model and a summary are printed;
the exit status is 1 when anything failed.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections import OrderedDict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- the models


def _tiny_lm(**kw):
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=128)
    base.update(kw)
    return base


def hf_cases():
    """(name, config class, model class, config kwargs, inputs) for transformers models."""
    ids = lambda m: None  # noqa: E731 - verify's own input_ids
    s2s = lambda m: {"input_ids": _randint(m.config.vocab_size, (2, 12)),  # noqa: E731
                     "decoder_input_ids": _randint(m.config.vocab_size, (2, 7))}
    return [
        ("Llama", "LlamaConfig", "LlamaForCausalLM", _tiny_lm(num_key_value_heads=2), ids),
        ("Mistral", "MistralConfig", "MistralForCausalLM", _tiny_lm(num_key_value_heads=2), ids),
        ("Mixtral(MoE)", "MixtralConfig", "MixtralForCausalLM",
         _tiny_lm(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
         ids),
        ("Qwen2", "Qwen2Config", "Qwen2ForCausalLM", _tiny_lm(num_key_value_heads=2), ids),
        ("Qwen3MoE", "Qwen3MoeConfig", "Qwen3MoeForCausalLM",
         _tiny_lm(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16), ids),
        ("Gemma(tied)", "GemmaConfig", "GemmaForCausalLM", _tiny_lm(num_key_value_heads=1, head_dim=16), ids),
        ("Phi3", "Phi3Config", "Phi3ForCausalLM", _tiny_lm(pad_token_id=0), ids),
        ("GPT2(Conv1D,tied)", "GPT2Config", "GPT2LMHeadModel",
         dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64), ids),
        ("GPTNeoX", "GPTNeoXConfig", "GPTNeoXForCausalLM", _tiny_lm(), ids),
        ("OPT", "OPTConfig", "OPTForCausalLM",
         dict(vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64, word_embed_proj_dim=64), ids),
        ("Bloom", "BloomConfig", "BloomForCausalLM", dict(vocab_size=256, hidden_size=64, n_layer=2, n_head=4), ids),
        ("Falcon", "FalconConfig", "FalconForCausalLM",
         dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4), ids),
        ("Mamba", "MambaConfig", "MambaForCausalLM",
         dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, state_size=8), ids),
        ("T5(shared x3)", "T5Config", "T5ForConditionalGeneration",
         dict(vocab_size=256, d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4), s2s),
        ("Bart", "BartConfig", "BartForConditionalGeneration",
         dict(vocab_size=256, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
              decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64), s2s),
        ("BertMLM", "BertConfig", "BertForMaskedLM",
         dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128), ids),
        ("Roberta", "RobertaConfig", "RobertaModel",
         dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128), ids),
        ("DistilBert", "DistilBertConfig", "DistilBertModel",
         dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, hidden_dim=128), ids),
        ("DebertaV2", "DebertaV2Config", "DebertaV2Model",
         dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128), ids),
        ("ViT", "ViTConfig", "ViTForImageClassification",
         dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=128, num_labels=5), lambda m: {"pixel_values": _randn((2, 3, 32, 32))}),
        ("CLIP", "CLIPConfig", "CLIPModel",
         dict(text_config=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=32),
              vision_config=dict(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4), projection_dim=32),
         lambda m: {"input_ids": _randint(256, (2, 8)), "pixel_values": _randn((2, 3, 32, 32))}),
        ("Whisper", "WhisperConfig", "WhisperForConditionalGeneration",
         dict(vocab_size=256, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
              decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16,
              max_source_positions=32, max_target_positions=32, pad_token_id=0, bos_token_id=1,
              eos_token_id=2, decoder_start_token_id=1),
         lambda m: {"input_features": _randn((2, 16, 64)), "decoder_input_ids": _randint(256, (2, 5))}),
        ("Wav2Vec2(weight_norm)", "Wav2Vec2Config", "Wav2Vec2Model",
         dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
              conv_dim=(32, 32), conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=16,
              num_conv_pos_embedding_groups=4), lambda m: {"input_values": _randn((2, 800))}),
        ("ConvNext(HF)", "ConvNextConfig", "ConvNextForImageClassification",
         dict(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, num_labels=5, image_size=32),
         lambda m: {"pixel_values": _randn((2, 3, 32, 32))}),
        ("Swin(HF)", "SwinConfig", "SwinModel",
         dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4),
         lambda m: {"pixel_values": _randn((2, 3, 32, 32))}),
        ("ResNet(HF,BN)", "ResNetConfig", "ResNetForImageClassification",
         dict(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=5),
         lambda m: {"pixel_values": _randn((2, 3, 32, 32))}),
        # BN in its decode head, and names transformers >= 5 converts on load
        ("Segformer(BN,renamed)", "SegformerConfig", "SegformerForSemanticSegmentation",
         dict(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32], num_attention_heads=[1, 2],
              decoder_hidden_size=16, num_labels=3),
         lambda m: {"pixel_values": _randn((2, 3, 32, 32))}),
    ]


TIMM = ["resnet18", "efficientnet_b0", "mobilenetv3_small_100", "convnext_atto", "regnety_002",
        "vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "swin_tiny_patch4_window7_224", "levit_128s",
        "mobilevit_xxs", "densenet121", "dla34", "ghostnet_100", "rexnet_100", "hrnet_w18_small", "nfnet_l0",
        "vgg11_bn", "inception_v3", "tf_efficientnet_b0", "repvgg_a0", "eva02_tiny_patch14_224", "beit_base_patch16_224",
        "convit_tiny", "pit_ti_224", "twins_svt_small", "poolformer_s12", "edgenext_xx_small", "fastvit_t8",
        "efficientformer_l1", "coat_lite_tiny", "maxvit_nano_rw_256", "cspdarknet53", "res2net50_14w_8s",
        "mixer_b16_224", "xcit_nano_12_p16_224", "hgnetv2_b0"]

# diffusers models from configs: verify builds them from config.json and makes up the timestep and
# text embeddings a UNet's forward requires
DIFFUSERS = {
    "UNet2DModel": dict(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
                        norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D")),
    "UNet2DConditionModel": dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                 block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=24,
                                 attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    "AutoencoderKL": dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                          layers_per_block=1, norm_num_groups=8, sample_size=16,
                          down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2),
}

TORCHVISION = [("resnet18", 224), ("mobilenet_v3_small", 224), ("shufflenet_v2_x0_5", 224), ("squeezenet1_0", 224),
               ("googlenet", 224), ("inception_v3", 299), ("densenet121", 224), ("efficientnet_b0", 224),
               ("regnet_y_400mf", 224), ("convnext_tiny", 224), ("swin_t", 224), ("mnasnet0_5", 224),
               ("vit_b_32", 224), ("maxvit_t", 224)]


def _randint(high, shape):
    import torch

    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(1))


def _randn(shape):
    import torch

    return torch.randn(shape, generator=torch.Generator().manual_seed(1))


def all_cases(only=None):
    cases = [("transformers", c[0]) for c in hf_cases()]
    cases += [("timm", n) for n in TIMM] + [("torchvision", n) for n, _ in TORCHVISION]
    cases += [("diffusers", n) for n in DIFFUSERS]
    cases += [("torchvision.detection", "fasterrcnn_mobilenet_v3_large_fpn"),
              ("torchaudio", "wav2vec2_base"), ("torchaudio", "conv_tasnet_base")]
    if only:
        keys = [k.lower() for k in only.split(",")]
        cases = [c for c in cases if any(k in f"{c[0]}.{c[1]}".lower() for k in keys)]
    return cases


def build_case(family: str, name: str):
    """-> (factory, inputs or None, input_shape or None, is_hf). Raises ImportError when the
    library is not installed here."""
    if family == "transformers":
        import transformers

        spec = next(c for c in hf_cases() if c[0] == name)
        _, cfg_cls, model_cls, kw, make_inputs = spec
        cfg = getattr(transformers, cfg_cls)(**kw)

        def factory():
            return getattr(transformers, model_cls)(cfg)

        return factory, make_inputs, None, True
    if family == "timm":
        import timm

        def factory():
            return timm.create_model(name, pretrained=False)

        m = factory()
        shape = (2, *m.pretrained_cfg.get("input_size", (3, 224, 224)))
        return factory, None, shape, False
    if family == "torchvision":
        import torchvision

        size = dict(TORCHVISION)[name]
        kw = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}

        def factory():
            return getattr(torchvision.models, name)(weights=None, **kw)

        return factory, None, (2, 3, size, size), False
    if family == "diffusers":
        import diffusers

        def factory():
            return getattr(diffusers, name)(**DIFFUSERS[name])

        cfg = DIFFUSERS[name]
        return factory, None, (2, cfg["in_channels"], cfg["sample_size"], cfg["sample_size"]), "diffusers"
    if family == "torchvision.detection":
        import torchvision

        def factory():
            return getattr(torchvision.models.detection, name)(weights=None, weights_backbone=None)

        return factory, "skip", None, False  # a list of images in, dicts out: no verify
    if family == "torchaudio":
        import torchaudio

        def factory():
            return getattr(torchaudio.models, name)()

        return factory, None, (2, 16000) if name.startswith("wav2vec2") else (2, 1, 8000), False
    raise KeyError(family)


# ---------------------------------------------------------------- comparing


def same(a, b) -> str | None:
    """None when a and b are the same value bit for bit (tensors: dtype, shape, bytes), else why."""
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return f"{type(a).__name__} vs {type(b).__name__}"
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"{a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
        a, b = a.detach().cpu(), b.detach().cpu()
        if a.is_quantized:
            return None if torch.equal(a.int_repr(), b.int_repr()) else "quantized values differ"
        if a.numel() and not torch.equal(a.contiguous().view(-1).view(torch.uint8),
                                         b.contiguous().view(-1).view(torch.uint8)):
            return "values differ"
        return None
    if isinstance(a, dict) and isinstance(b, dict):
        if list(a) != list(b):
            return f"keys {sorted(map(str, set(a) ^ set(b)))[:4]} / order differ"
        for k in a:
            why = same(a[k], b[k])
            if why:
                return f"[{k!r}]: {why}"
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            why = same(x, y)
            if why:
                return f"[{i}]: {why}"
        return None
    return None if a == b else f"{a!r} vs {b!r}"


def same_sd(got, want) -> str | None:
    if list(got) != list(want):
        missing, extra = [k for k in want if k not in got], [k for k in got if k not in want]
        return f"keys differ: missing {missing[:3]}, extra {extra[:3]}" if missing or extra else "key order differs"
    for k in want:
        why = same(got[k], want[k])
        if why:
            return f"{k}: {why}"
    return None


# ---------------------------------------------------------------- one model


class NA(Exception):
    """A check that does not apply, with the reason."""


def run_case(family: str, name: str, device: str, cli: list[str]) -> dict:
    import torch

    torch.set_num_threads(2)
    import ckptsurgeon as cs
    from ckptsurgeon.errors import CkptSurgeonError

    try:
        factory, inputs, shape, is_hf = build_case(family, name)
    except ImportError as e:
        return {"model": f"{family}.{name}", "skipped": f"not installed ({e.name or e})"}
    except Exception as e:  # noqa: BLE001 - a config this library version does not take
        return {"model": f"{family}.{name}", "skipped": f"cannot build here: {type(e).__name__}: {e}"[:200]}
    dev = torch.device(device)
    checks: dict[str, str] = {}
    t_start = time.perf_counter()

    def check(label, fn):
        try:
            detail = fn()
            checks[label] = f"ok ({detail})" if detail else "ok"
        except NA as e:
            checks[label] = f"n/a: {e}"
        except CkptSurgeonError as e:
            checks[label] = f"FAIL: {e.one_line()}"
        except AssertionError as e:
            checks[label] = f"FAIL: {e}"
        except Exception as e:  # noqa: BLE001
            checks[label] = f"ERROR: {type(e).__name__}: {e}"[:400]
            traceback.print_exc()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        model = factory()
        with torch.no_grad():  # random norm statistics, so BN folding and GN swaps are not trivial
            for m in model.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
        model = model.to(dev).eval()
        # a resume dict: DDP keys, AdamW state after one step (random grads), scaler, epoch
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3)
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        opt.step()
        opt.zero_grad(set_to_none=True)
        sd = model.state_dict()  # after the step
        want = OrderedDict((k, v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v) for k, v in sd.items())
        torch.save(sd, tmp / "cuda.pt")
        want_opt = opt.state_dict()
        scaler = torch.amp.GradScaler(dev.type, enabled=dev.type == "cuda")
        ddp_sd = OrderedDict(("module." + k, v) for k, v in sd.items())  # what DDP(model).state_dict() holds
        ddp_sd._metadata = OrderedDict([("", {"version": 1})] + [("module" + ("." + k if k else ""), dict(v))
                                                                 for k, v in sd._metadata.items()])
        torch.save({"epoch": 3, "model_state_dict": ddp_sd,
                    "optimizer_state_dict": want_opt, "scaler": scaler.state_dict()}, tmp / "ddp_resume.pt")
        torch.save(torch.compile(model).state_dict(), tmp / "compiled.pt")
        n_tensors = sum(isinstance(v, torch.Tensor) for v in want.values())

        def loads_into_fresh(state):
            fresh = factory()
            res = fresh.load_state_dict(state, strict=True)
            assert not res.missing_keys and not res.unexpected_keys, res

        def c_load():
            got = cs.load(tmp / "cuda.pt").torch_state_dict()
            why = same_sd(got, want)
            assert why is None, why

        def c_strip_ddp():
            new, rep = cs.strip_prefix(cs.load(tmp / "ddp_resume.pt"))
            cs.save(new, tmp / "stripped.pt")
            back = torch.load(tmp / "stripped.pt", weights_only=True)
            why = same_sd(back["model_state_dict"], want)
            assert why is None, f"model_state_dict: {why}"
            why = same(back["optimizer_state_dict"], torch.load(tmp / "ddp_resume.pt", weights_only=True)
                       ["optimizer_state_dict"])
            assert why is None, f"optimizer_state_dict: {why}"
            assert back["epoch"] == 3 and list(back) == ["epoch", "model_state_dict", "optimizer_state_dict",
                                                         "scaler"], list(back)
            loads_into_fresh(back["model_state_dict"])
            torch.load(tmp / "stripped.pt", weights_only=True, mmap=True)

        def c_strip_cli():
            r = subprocess.run(cli + ["-q", "strip-prefix", str(tmp / "ddp_resume.pt"), "-o", str(tmp / "cli.pt")],
                               capture_output=True, text=True)
            assert r.returncode == 0, (r.stderr.strip().splitlines() or ["?"])[-1]
            back = torch.load(tmp / "cli.pt", weights_only=True)
            why = same_sd(back["model_state_dict"], want)
            assert why is None, why

        def c_strip_compile():
            new, rep = cs.strip_prefix(cs.load(tmp / "compiled.pt"))
            cs.save(new, tmp / "uncompiled.pt")
            why = same_sd(torch.load(tmp / "uncompiled.pt", weights_only=True), want)
            assert why is None, why

        def c_safetensors():
            from safetensors.torch import load_file, save_model

            cs.save(cs.load(tmp / "cuda.pt"), tmp / "conv.safetensors")
            why = same_sd(load_file(tmp / "conv.safetensors"), want)
            assert why is None, f"to .safetensors: {why}"
            cs.save(cs.load(tmp / "conv.safetensors"), tmp / "back.pt")
            why = same_sd(torch.load(tmp / "back.pt", weights_only=True), want)
            assert why is None, f"back to .pt: {why}"
            save_model(model, str(tmp / "save_model.safetensors"))
            ref = load_file(tmp / "save_model.safetensors")
            got = cs.load(tmp / "save_model.safetensors").torch_state_dict()
            why = same_sd(got, ref)
            assert why is None, f"save_model file: {why}"

        def c_extract():
            first = next(k.split(".")[0] for k in want if "." in k)
            keep = [k for k in want if k.startswith(first + ".")]
            new, rep = cs.extract(cs.load(tmp / "cuda.pt"), [first])
            cs.save(new, tmp / "part.pt")
            why = same_sd(torch.load(tmp / "part.pt", weights_only=True), OrderedDict((k, want[k]) for k in keep))
            assert why is None, why

        def c_diff():
            rep = cs.diff(tmp / "cuda.pt", tmp / "compiled.pt")
            assert rep["identical"], f"same weights across the compile prefix: {rep['verdict']}"
            floats = [k for k, v in want.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
                      and v.numel() > 1]
            if not floats:
                raise NA("no floating tensors")
            k = max(floats, key=lambda k: want[k].numel())
            pert = OrderedDict(want)
            pert[k] = want[k].clone()
            pert[k].view(-1)[0] += 1.0
            torch.save(pert, tmp / "pert.pt")
            rep = cs.diff(tmp / "ddp_resume.pt", tmp / "pert.pt")
            changed = [c["name"] for c in rep["changed"]]
            assert changed == [k] or changed == ["module." + k], f"changed: {changed[:4]} (want {k})"
            assert not rep["only_in_a"] and not rep["only_in_b"], (rep["only_in_a"][:3], rep["only_in_b"][:3])

        def c_cast():
            new, rep = cs.cast(cs.load(tmp / "cuda.pt"), "bfloat16")
            cs.save(new, tmp / "bf16.safetensors")
            from safetensors.torch import load_file

            got = load_file(tmp / "bf16.safetensors")
            exp = OrderedDict((k, v.to(torch.bfloat16) if v.is_floating_point() else v)
                              for k, v in want.items() if isinstance(v, torch.Tensor))
            why = same_sd(got, exp)
            assert why is None, why

        def c_average():
            torch.save(pert_sd(), tmp / "other.pt")
            soup, rep = cs.average([cs.load(tmp / "ddp_resume.pt"), cs.load(tmp / "other.pt")])
            cs.save(soup, tmp / "soup.pt")
            got = torch.load(tmp / "soup.pt", weights_only=True)["model_state_dict"]
            other = torch.load(tmp / "other.pt", weights_only=True)
            for k, v in want.items():
                if not isinstance(v, torch.Tensor):
                    continue
                g = got["module." + k]
                if v.is_floating_point():
                    exp = ((v.double() + other[k].double()) / 2).to(v.dtype)
                    assert torch.equal(g, exp), f"{k}: not the float64 mean"
                else:
                    assert torch.equal(g, v), f"{k}: integer tensor changed"

        def pert_sd():
            """The state dict moved a little, tied tensors (one storage) moved alike and kept tied."""
            g = torch.Generator().manual_seed(3)
            out, by_ptr = OrderedDict(), {}
            for k, v in want.items():
                if isinstance(v, torch.Tensor) and v.is_floating_point():
                    tie = (sd[k].data_ptr(), tuple(v.shape))
                    if tie not in by_ptr:
                        by_ptr[tie] = v + torch.randn(v.shape, generator=g).to(v.dtype) * 1e-2
                    v = by_ptr[tie]
                out[k] = v
            return out

        def c_lora():
            if not is_hf:
                raise NA("not a transformers model")
            lin = [k for k, v in want.items() if k.endswith(".weight") and v.dim() == 2 and v.is_floating_point()
                   and min(v.shape) >= 8 and "embed" not in k and "wte" not in k and "shared" not in k
                   and "lm_head" not in k][:4]
            if not lin:
                raise NA("no 2-D weights")
            g = torch.Generator().manual_seed(4)
            tuned = OrderedDict(want)
            for k in lin:  # a rank-2 change per chosen weight
                o, i = want[k].shape
                tuned[k] = want[k] + (torch.randn(o, 2, generator=g) @ torch.randn(2, i, generator=g) * 1e-2
                                      ).to(want[k].dtype)
            torch.save(tuned, tmp / "tuned.pt")
            adapter, rep = cs.extract_lora(cs.load(tmp / "cuda.pt"), cs.load(tmp / "tuned.pt"), rank=4)
            cs.save_adapter(adapter, rep["adapter_config"], tmp / "lora")
            merged, _ = cs.merge_lora(cs.load(tmp / "cuda.pt"), str(tmp / "lora"))
            cs.save(merged, tmp / "merged.pt")
            got = torch.load(tmp / "merged.pt", weights_only=True)
            for k, v in tuned.items():
                if isinstance(v, torch.Tensor):
                    assert torch.allclose(got[k].double(), v.double(), atol=1e-5, rtol=1e-4), \
                        f"{k}: max err {(got[k].double() - v.double()).abs().max():.3g}"
            return f"{len(lin)} weights, rank 4, merged back"

        verify_kw = {}
        if inputs is not None and inputs != "skip":
            x = inputs(factory())
            if x is not None:
                verify_kw["inputs"] = x
        if shape is not None:
            verify_kw["input_shape"] = shape

        def c_verify():
            if inputs == "skip":
                raise NA("detection model: list of images in")
            rep = cs.verify(tmp / "ddp_resume.pt", tmp / "stripped.pt", model=factory, device=device, **verify_kw)
            assert rep["equivalent"], f"not equivalent: {rep['outputs'][0]}"

        has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())

        def example():
            if inputs == "skip":
                raise NA("detection model: list of images in")
            if shape is not None:
                from ckptsurgeon.inputs import with_required_arguments

                x = with_required_arguments(model, _randn(shape))  # a UNet's timestep, conditioning
                if isinstance(x, dict):
                    return (), {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in x.items()}
                return tuple(v.to(dev) for v in (x if isinstance(x, tuple) else (x,))), {}
            x = inputs(model) if inputs is not None else None
            x = x if x is not None else {"input_ids": _randint(model.config.vocab_size, (2, 10))}
            if getattr(model.config, "is_encoder_decoder", False) and "decoder_input_ids" not in x:
                x = dict(x, decoder_input_ids=x["input_ids"][:, :4])  # (T5: the decoder needs its own)
            return (), {k: v.to(dev) for k, v in x.items()}

        def c_program():
            """A TorchScript trace and a torch.export program of the model: the weights ckpt-surgeon
            reads out of each archive == what torch.jit.load / torch.export.load give."""
            args, kwargs = example()
            config = getattr(model, "config", None)
            saved = {k: getattr(config, k) for k in ("use_cache",) if hasattr(config, k)}
            for k in saved:  # a KV-cache object is no traceable output
                setattr(config, k, False)
            try:
                return _program_archives(args, kwargs)
            finally:
                for k, v in saved.items():
                    setattr(config, k, v)

        def _program_archives(args, kwargs):
            done = []
            try:
                traced = torch.jit.trace(model, args or None, example_kwarg_inputs=kwargs or None, strict=False,
                                         check_trace=False)
                traced.save(str(tmp / "traced.pt"))
            except Exception as e:  # noqa: BLE001 - a model this torch cannot trace (or save traced)
                traced = None
                why_jit = f"{type(e).__name__}: {' '.join(str(e).split())[:100]}"
            if traced is not None:
                why = same_sd(cs.load(tmp / "traced.pt").torch_state_dict(),
                              torch.jit.load(tmp / "traced.pt", map_location="cpu").state_dict())
                assert why is None, f"TorchScript: {why}"
                done.append("jit")
            try:
                program = torch.export.export(model, args, kwargs, strict=False)
            except Exception as e:  # noqa: BLE001 - a model this torch cannot export
                program = None
                why_export = f"{type(e).__name__}: {' '.join(str(e).split())[:100]}"
            if program is not None:
                torch.export.save(program, str(tmp / "program.pt2"))
                why = same_sd(cs.load(tmp / "program.pt2").torch_state_dict(),
                              {k: v.cpu() for k, v in torch.export.load(str(tmp / "program.pt2")).state_dict.items()})
                assert why is None, f".pt2: {why}"
                done.append("pt2")
            if not done:
                raise NA(f"neither traced ({why_jit}) nor exported ({why_export})")
            return " + ".join(done) + ("" if len(done) == 2 else
                                      f"; {'trace' if 'jit' not in done else 'export'} failed in torch")

        def c_fold():
            if not has_bn:
                raise NA("no BatchNorm")
            if inputs == "skip":
                raise NA("detection model")
            try:
                folded, rep = cs.fold_bn(cs.load(tmp / "cuda.pt"), factory(),
                                         input_shape=shape[1:] if shape is not None else None)
            except CkptSurgeonError as e:
                raise NA(e.one_line()[:160]) from None
            cs.save(folded, tmp / "folded.pt")
            rep2 = cs.verify(tmp / "cuda.pt", tmp / "folded.pt", model=factory, device=device, **verify_kw)
            assert rep2["equivalent"], (f"folded {len(rep['folded'])} BN, not equivalent: "
                                        f"first divergent {rep2['first_divergent']}, {rep2['outputs'][0]}")
            return f"{len(rep['folded'])} folded, {len(rep['skipped'])} left"

        def c_gn():
            if not has_bn:
                raise NA("no BatchNorm")
            if inputs == "skip":
                raise NA("detection model")
            n_bn = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
            calibrate = 4 if n_bn <= 40 and shape is not None else 0  # layer by layer on the CPU: small nets only
            new, rep = cs.bn_to_gn(cs.load(tmp / "cuda.pt"), groups=8, policy="nearest", model=factory(),
                                   calibrate=calibrate, input_shape=shape[1:] if calibrate else None)
            cs.save(new, tmp / "gn.pt")
            rep2 = cs.verify(tmp / "cuda.pt", tmp / "gn.pt", model=factory, device=device, **verify_kw)
            assert rep2["outputs"] and rep2["outputs"][0]["max_abs"] is not None
            if calibrate:
                return (f"{n_bn} BN, calibrated: relative error {rep['error_plain']:.3g} -> "
                        f"{rep['error_calibrated']:.3g}")
            return f"{n_bn} BN swapped"

        def c_hf():
            if not is_hf:
                raise NA("not a transformers model")
            folder = tmp / "hf"
            model.save_pretrained(folder, max_shard_size="200KB")
            ck = cs.load(folder)
            ref = OrderedDict()
            from safetensors.torch import load_file

            for f in sorted(folder.glob("*.safetensors")):
                ref.update(load_file(f))
            got = ck.torch_state_dict()
            assert set(got) == set(ref), f"keys: {sorted(set(got) ^ set(ref))[:4]}"
            for k in ref:
                why = same(got[k], ref[k])
                assert why is None, f"{k}: {why}"
            cs.save(ck, tmp / "hf2", max_shard_size="100KB")
            stem = "diffusion_pytorch_model" if is_hf == "diffusers" else "model"  # the names from_pretrained wants
            assert (tmp / "hf2" / f"{stem}.safetensors.index.json").exists() or (tmp / "hf2" / f"{stem}.safetensors").exists()
            cls = type(model)
            m1 = cls.from_pretrained(folder).to(dev).eval()
            m2 = cls.from_pretrained(tmp / "hf2").to(dev).eval()
            if is_hf == "diffusers":
                from ckptsurgeon.inputs import with_required_arguments

                x = with_required_arguments(m1, _randn(shape))
                x = x if isinstance(x, dict) else {"sample": x}
            else:
                x = inputs(m1) if inputs is not None else None
                x = x if x is not None else {"input_ids": _randint(m1.config.vocab_size, (2, 10))}
            x = {k: v.to(dev) for k, v in x.items()}
            with torch.no_grad():
                o1, o2 = m1(**x), m2(**x)
            t1 = next(v for v in o1.values() if isinstance(v, torch.Tensor))
            t2 = next(v for v in o2.values() if isinstance(v, torch.Tensor))
            assert torch.equal(t1, t2), "from_pretrained of our folder computes something else"
            rep = cs.verify(folder, tmp / "hf2", device=device, **verify_kw)
            assert rep["equivalent"], rep["outputs"][0]

        for label, fn in [("load", c_load), ("strip-ddp", c_strip_ddp), ("strip-cli", c_strip_cli),
                          ("strip-compile", c_strip_compile), ("safetensors", c_safetensors), ("extract", c_extract),
                          ("diff", c_diff), ("cast", c_cast), ("average", c_average), ("lora", c_lora),
                          ("verify", c_verify), ("program", c_program), ("fold-bn", c_fold),
                          ("bn-to-gn", c_gn), ("hf-folder", c_hf)]:
            check(label, fn)
    return {"model": f"{family}.{name}", "tensors": n_tensors, "checks": checks,
            "seconds": round(time.perf_counter() - t_start, 1)}


def _worker(args):
    family, name, device, cli = args
    try:
        return run_case(family, name, device, cli)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        return {"model": f"{family}.{name}", "checks": {"setup": f"ERROR: {type(e).__name__}: {e}"[:400]}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--only", default=None, help="comma-separated substrings of model names")
    ap.add_argument("--jobs", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)))
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("sweep: CUDA was asked for but is not available here (--device cpu runs on the CPU)", file=sys.stderr)
        return 2
    cli = [sys.executable, "-m", "ckptsurgeon"]
    cases = all_cases(args.only)
    t0 = time.perf_counter()
    results = []
    import multiprocessing as mp

    with cf.ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as pool:
        futs = {pool.submit(_worker, (f, n, device, cli)): (f, n) for f, n in cases}
        for fut in cf.as_completed(futs):
            r = fut.result()
            results.append(r)
            if "skipped" in r:
                print(f"{r['model']}: skipped, {r['skipped']}", flush=True)
                continue
            bad = {k: v for k, v in r["checks"].items() if not (v.startswith("ok") or v.startswith("n/a"))}
            print(f"{r['model']} ({r.get('tensors')} tensors, {r.get('seconds')} s): "
                  + ("all ok" if not bad else "; ".join(f"{k} {v}" for k, v in bad.items())), flush=True)
    ran = [r for r in results if "checks" in r]
    labels = sorted({k for r in ran for k in r["checks"]})
    print(f"\nsweep on {torch.cuda.get_device_name() if device.startswith('cuda') else 'cpu'}, torch "
          f"{torch.__version__}: {len(ran)} models ({len(results) - len(ran)} skipped), "
          f"{time.perf_counter() - t0:.0f} s")
    print("| check | ok | n/a | failed |")
    print("|---|---|---|---|")
    for lab in labels:
        vals = [r["checks"].get(lab) for r in ran if lab in r["checks"]]
        print(f"| {lab} | {sum(v.startswith('ok') for v in vals)} | {sum(v.startswith('n/a') for v in vals)} "
              f"| {sum(not (v.startswith('ok') or v.startswith('n/a')) for v in vals)} |")
    nas = sorted({f"{lab}: {v[5:]}" for r in ran for lab, v in r["checks"].items() if v.startswith("n/a")})
    for n in nas[:40]:
        print(f"  n/a {n}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "torch": torch.__version__, "results": results},
                                              indent=1))
    for lab in ("fold-bn", "bn-to-gn"):
        for r in ran:
            v = r["checks"].get(lab, "")
            if v.startswith("ok ("):
                print(f"  {lab} {r['model']}: {v[4:-1]}")
    failed = [r for r in ran if any(not (v.startswith("ok") or v.startswith("n/a")) for v in r["checks"].values())]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
