"""open_clip model creation: supported-config checks, attention backend swap, DeepSpeed-safe logit_scale."""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from open_clip.transformer import ResidualAttentionBlock
from torch import nn

from trainer.attention import FusedAttention, is_causal_mask, xformers_problem
from trainer.config import ModelConfig
from trainer.errors import UserError
from trainer.text_trim import TrimmedTokenizer, allow_short_text

log = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("auto", "xformers", "sdpa", "torch")
_SUPPORTED_HINT = "use an open_clip-native ViT CLIP config such as ViT-B-32"
_ZOO_DIR = Path(open_clip.__file__).parent / "model_configs"
# open_clip's TextTransformer options that build CustomResidualAttentionBlock (no nn.MultiheadAttention).
_CUSTOM_BLOCK_KEYS = ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc")


class ModelError(UserError, ValueError):
    """A user-facing model error; the CLI prints the one-line message and exits 2."""


def _is_json_path(name: str) -> bool:
    return name.endswith(".json")


def _open_clip_name(name: str) -> str:
    """The name open_clip knows the model by: the zoo name, or a JSON file's stem."""
    return Path(name).stem if _is_json_path(name) else name


def _read_json_config(path: Path) -> dict:
    if not path.is_file():
        raise ModelError(f"model.name: no such model config file {path}")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: not a readable JSON model config ({e})") from None
    if not isinstance(cfg, dict) or not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ModelError(f"{path}: a model config needs the keys embed_dim, vision_cfg and text_cfg")
    for section, dc in (("vision_cfg", CLIPVisionCfg), ("text_cfg", CLIPTextCfg)):
        if not isinstance(cfg[section], dict):
            raise ModelError(f"{path}: {section} must be a mapping of settings")
        valid = {f.name for f in dataclasses.fields(dc)}
        for key in cfg[section]:
            if key not in valid:
                raise ModelError(
                    f"{path}: {section}.{key} is not an open_clip setting (valid: {', '.join(sorted(valid))})"
                )
    return cfg


def model_config(name: str) -> dict:
    """The open_clip model config dict for a zoo name or a path to a user JSON config file."""
    if _is_json_path(name):
        return _read_json_config(Path(name))
    if ":" in name:  # hf-hub: / local-dir: would download or need weights next to the config
        raise ModelError(f"model.name: {name!r} is not supported; give an open_clip zoo name or a .json config file")
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        models = open_clip.list_models()
        close = difflib.get_close_matches(name, models, n=5, cutoff=0.5) or ["ViT-B-32", "ViT-B-16"]
        raise ModelError(
            f"model.name: {name!r} is neither an open_clip model nor a .json config file "
            f"(e.g. {', '.join(close)}; {len(models)} known, see open_clip.list_models())"
        )
    return cfg


def check_supported(name: str, cfg: dict) -> None:
    """Reject configs the trainer cannot train correctly yet (only open_clip-native ViT CLIP is supported)."""
    vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})

    def reject(what: str) -> None:
        raise ModelError(f"{name}: {what} are not supported yet; {_SUPPORTED_HINT}")

    if "multimodal_cfg" in cfg:
        reject("CoCa models (captioning decoder, multimodal_cfg)")
    # open_clip picks the SigLIP tokenizer by name, so the name alone makes it a SigLIP model.
    if "init_logit_bias" in cfg or "siglip" in _open_clip_name(name).lower():
        reject("SigLIP models (sigmoid loss, logit_bias)")
    if vision.get("timm_model_name"):
        reject(f"timm image towers (vision_cfg.timm_model_name={vision['timm_model_name']})")
    if isinstance(vision.get("layers"), (list, tuple)):
        reject("ResNet image towers (vision_cfg.layers is a list)")
    if text.get("hf_model_name"):
        reject(f"Hugging Face text towers (text_cfg.hf_model_name={text['hf_model_name']})")
    if cfg.get("custom_text"):
        reject("custom_text models (open_clip's CustomTextCLIP, text.* weights)")
    if text.get("embed_cls"):
        reject("text class-token embeddings (text_cfg.embed_cls, a CoCa feature)")
    for section, tower in (("vision_cfg", vision), ("text_cfg", text)):
        custom = [k for k in _CUSTOM_BLOCK_KEYS if tower.get(k)]
        if tower.get("block_type") == "custom" or custom:
            keys = ", ".join(f"{section}.{k}" for k in custom) or f"{section}.block_type=custom"
            reject(f"custom attention blocks ({keys})")


def _register(name: str, cfg: dict) -> str:
    """Make open_clip know a user JSON config; return the name to create it by."""
    stem = Path(name).stem
    zoo_file = _ZOO_DIR / f"{stem}.json"
    if zoo_file.is_file():
        if json.loads(zoo_file.read_text()) != cfg:
            raise ModelError(
                f"{name}: the file name {stem!r} is an open_clip zoo model with a different config; rename the file"
            )
        return stem
    # open_clip registers by stem and rescans in order, so the file added last wins its stem.
    open_clip.add_model_config(Path(name).resolve())  # absolute: open_clip rescans it on every add
    return stem


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The attention backend to use on `device`: auto = xformers on CUDA when its kernels run there, else sdpa."""
    device = torch.device(device)
    if backend not in ATTENTION_BACKENDS:
        raise ModelError(f"model.attention: {backend!r} is not one of {', '.join(ATTENTION_BACKENDS)}")
    if backend == "auto":
        if device.type != "cuda":
            return "sdpa"
        problem = xformers_problem(str(device))
        if problem:
            log.warning("model.attention=auto: %s; using sdpa", problem)
        return "sdpa" if problem else "xformers"
    if backend == "xformers":
        if device.type != "cuda":
            raise ModelError(f"model.attention: xformers has no kernels for {device.type}; use sdpa or auto")
        problem = xformers_problem(str(device))
        if problem:
            raise ModelError(f"model.attention: {problem}; use sdpa")
    return backend


def swap_attention(model: nn.Module, backend: str) -> int:
    """Route every ResidualAttentionBlock's attention in both towers to `backend`; return how many."""
    if backend == "torch":
        return 0
    if not isinstance(model, open_clip.CLIP):
        raise ModelError(f"attention swap needs an open_clip CLIP model, not {type(model).__name__}")
    causal_text = is_causal_mask(model.attn_mask)
    swapped = 0
    for tower, causal in ((model.visual, False), (model.transformer, causal_text)):
        for block in tower.modules():
            if isinstance(block, ResidualAttentionBlock) and isinstance(block.attn, nn.MultiheadAttention):
                block.attn = FusedAttention(block.attn, backend, causal=causal)
                swapped += 1
    if causal_text:
        # The blocks are causal by themselves now; dropping the dense mask lets the kernels skip it.
        model.attn_mask = None
    return swapped


def _logit_scale_out(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """state_dict post-hook: give logit_scale back in open_clip's 0-dim shape."""
    key = prefix + "logit_scale"
    value = state_dict.get(key)
    # keep_vars callers want the live Parameter; ZeRO-3 placeholders have numel 0: leave both alone.
    if value is not None and not isinstance(value, nn.Parameter) and value.numel() == 1:
        state_dict[key] = value.reshape(())


def _logit_scale_in(
    module: nn.Module,
    state_dict: dict,
    prefix: str,
    local_metadata: dict,
    strict: bool,
    missing_keys: list,
    unexpected_keys: list,
    error_msgs: list,
) -> None:
    """load_state_dict pre-hook: accept open_clip's 0-dim logit_scale for the shape-[1] parameter."""
    key = prefix + "logit_scale"
    value = state_dict.get(key)
    if value is not None and value.numel() == 1:
        state_dict[key] = value.reshape(1)


def _image_in_weight_dtype(visual: Any, args: tuple) -> tuple:
    """Forward pre-hook: cast the image batch to the tower's weight dtype."""
    return (args[0].to(visual.conv1.weight.dtype), *args[1:])


def accept_fp32_images(model: Any) -> None:
    """Let the image tower take fp32 batches after DeepSpeed casts it to bf16/fp16.

    open_clip casts the text embeddings to the weights' dtype but feeds images straight into
    conv1, and DeepSpeed casts no inputs in bf16 mode, so every caller (training loop,
    benchmarks, tests) would otherwise have to know the engine's dtype.
    """
    model.visual.register_forward_pre_hook(_image_in_weight_dtype)


def make_zero_safe(model: Any) -> None:
    """Make logit_scale shape [1] for DeepSpeed (0-dim params crash it) while state_dict stays open_clip's."""
    scale = model.logit_scale
    if scale.ndim != 0:
        return
    model.logit_scale = nn.Parameter(scale.detach().reshape(1).clone(), requires_grad=scale.requires_grad)
    model.register_state_dict_post_hook(_logit_scale_out)
    model.register_load_state_dict_pre_hook(_logit_scale_in)


def open_clip_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU state dict with vanilla open_clip's keys and shapes (pass engine.module)."""
    for name, param in model.named_parameters():
        if hasattr(param, "ds_numel") and param.numel() != param.ds_numel:
            raise ValueError(f"{name} is a ZeRO-3 partition; gather the parameters before exporting")
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def create_model(cfg: ModelConfig, device: torch.device | str = "cpu") -> tuple[Any, Callable, Callable, Callable]:
    """Build (model, preprocess_train, preprocess_val, tokenizer): fp32, random init, DeepSpeed-ready.

    The model is an open_clip CLIP, typed Any: its towers' attributes are dynamic to type checkers.
    """
    device = torch.device(device)
    backend = resolve_backend(cfg.attention, device)
    config = model_config(cfg.name)
    check_supported(cfg.name, config)
    name = _register(cfg.name, config) if _is_json_path(cfg.name) else cfg.name
    # Weights stay fp32: DeepSpeed's bf16/fp16 modes cast the module and keep fp32 masters.
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        name, pretrained=None, precision="fp32", device=device, force_quick_gelu=cfg.force_quick_gelu
    )
    try:
        tokenizer = open_clip.get_tokenizer(name)
    except (OSError, ImportError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(f"{cfg.name}: its tokenizer could not be loaded ({reason})") from None
    swap_attention(model, backend)
    if cfg.trim_text and allow_short_text(model):
        tokenizer = TrimmedTokenizer(tokenizer)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    make_zero_safe(model)
    accept_fp32_images(model)
    return model, preprocess_train, preprocess_val, tokenizer
