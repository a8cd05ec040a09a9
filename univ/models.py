"""Model names, loading, and one small adapter per architecture family.

Convention, stated once: ``resid_post[l]`` is the residual stream leaving block ``l``
(0-based), before any final norm. It is read with forward hooks on the blocks, because the
families index ``hidden_states`` differently and its last entry is already normed.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import architectures, hub
from .errors import UnivError

PYTHIA_SIZES = ["14m", "31m", "70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b"]
MAMBA_SIZES = ["130m", "370m", "790m", "1.4b", "2.8b"]
RWKV_SIZES = ["169m", "430m", "1b5", "3b"]

ALIASES: dict[str, str] = {
    **{f"pythia-{s}": f"EleutherAI/pythia-{s}" for s in PYTHIA_SIZES},
    **{f"pythia-{s}-deduped": f"EleutherAI/pythia-{s}-deduped" for s in PYTHIA_SIZES},
    **{f"pythia-160m-seed{n}": f"EleutherAI/pythia-160m-seed{n}" for n in range(1, 10)},
    **{f"mamba-{s}": f"state-spaces/mamba-{s}-hf" for s in MAMBA_SIZES},
    **{f"rwkv-{s}": f"RWKV/rwkv-4-{s}-pile" for s in RWKV_SIZES},
}

# Original mamba-ssm checkpoints ship no tokenizer; the Mamba models were trained with this one.
MAMBA_SSM_TOKENIZER = "EleutherAI/gpt-neox-20b"
FAMILIES = ("gpt_neox", "mamba", "rwkv")


@dataclass(frozen=True)
class ModelSource:
    """Where a model lives, resolved without loading its weights."""

    name: str
    """The name as the user gave it (alias, Hub id or path)."""
    ref: str
    """Hub id, or the absolute path of a local directory."""
    path: Path | None
    """Local directory holding config.json (a Hub snapshot or the user's folder); None for an
    architecture univ ships (random:ALIAS)."""
    revision: str
    """Hub commit hash, or a content hash of the weights for a local directory."""
    layout: str
    """'hf' (transformers format) or 'mamba_ssm' (original mamba-ssm checkpoint)."""
    family: str
    """'gpt_neox' or 'mamba'."""
    config: dict
    """The checkpoint's config.json."""
    random_init: bool = False
    """Ignore the weights: the same architecture freshly initialised (seed RANDOM_SEED)."""

    @property
    def n_layers(self) -> int:
        c = self.config
        return int(c.get("num_hidden_layers") or c.get("n_layer"))

    @property
    def d_model(self) -> int:
        c = self.config
        return int(c.get("hidden_size") or c.get("d_model"))

    @property
    def max_ctx(self) -> int | None:
        """Longest context the model accepts (None: no positional limit, as in Mamba)."""
        if self.family == "gpt_neox":
            return int(self.config["max_position_embeddings"])
        return None

    @property
    def is_local(self) -> bool:
        return self.ref.startswith("/")

    @property
    def hub_revision(self) -> str | None:
        """The revision to pass to from_pretrained (None for a local directory)."""
        return None if self.is_local else self.revision

    @property
    def short_name(self) -> str:
        name = Path(self.ref).name if self.is_local else self.ref.split("/")[-1]
        return f"random-{name}" if self.random_init else name


def _hub_errors():
    from huggingface_hub import errors

    return (errors.HfHubHTTPError, errors.LocalEntryNotFoundError, errors.EntryNotFoundError,
            errors.HFValidationError, errors.OfflineModeIsEnabled, OSError, ValueError)


def _hub_file(repo_id: str, filename: str, revision: str | None, what: str) -> Path:
    from huggingface_hub import hf_hub_download

    hub.go_offline_unless_reachable()
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision))
    except _hub_errors() as e:
        reason = type(e).__name__
        if hub.unreachable():
            raise UnivError(f"{what} {repo_id!r} is not in the local Hugging Face cache and the Hub cannot be reached "
                            f"from this machine; {hub.OFFLINE_HINT}") from None
        if repo_id in ALIASES.values():  # a name univ knows: the Hub, not the name, is the problem
            raise UnivError(
                f"{what} {repo_id!r} is not in the local Hugging Face cache and the Hub could not be reached "
                f"({reason}); connect to the Hub once, or pass a local folder (HF_HUB_OFFLINE=1 skips the Hub)"
            ) from None
        raise UnivError(
            f"{what} {repo_id!r} is not a local directory and could not be fetched from the "
            f"Hugging Face Hub ({reason}); check the name, or download it and pass its folder"
        ) from None


def _fingerprint_dir(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.suffix in (".json", ".safetensors", ".bin") and f.is_file():
            h.update(f.name.encode())
            with f.open("rb") as fh:
                while block := fh.read(1 << 24):
                    h.update(block)
    return h.hexdigest()[:16]


def _layout_and_family(config: dict, where: str) -> tuple[str, str]:
    model_type = config.get("model_type")
    if model_type in FAMILIES:
        return "hf", model_type
    if model_type is None and "d_model" in config and "n_layer" in config:
        return "mamba_ssm", "mamba"
    raise UnivError(
        f"{where}: model type {model_type!r} is not supported (univ knows GPT-NeoX and Mamba)"
    )


RANDOM_PREFIX = "random:"
RANDOM_SEED = 1234


def resolve(name: str, revision: str | None = None) -> ModelSource:
    """Turn an alias, Hub id or local directory into a ModelSource (reads config.json only).

    ``random:NAME`` is NAME's architecture with freshly initialised weights (seed 0): the
    random-init baseline of `univ match`."""
    if name.startswith(RANDOM_PREFIX):
        base_name = name[len(RANDOM_PREFIX):]
        if base_name in architectures.CONFIGS and revision is None:  # shipped: no Hub needed for fresh weights
            config = architectures.CONFIGS[base_name]
            shipped = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
            return ModelSource(name, ALIASES[base_name], None, f"random-seed{RANDOM_SEED}-univ-{shipped}", "hf",
                               config["model_type"], config, random_init=True)
        base = resolve(base_name, revision)
        return ModelSource(name, base.ref, base.path, f"random-seed{RANDOM_SEED}-{base.revision}", base.layout,
                           base.family, base.config, random_init=True)
    ref = ALIASES.get(name, name)
    local = Path(ref).expanduser()
    if local.exists() or ref.startswith((".", "/", "~")):
        if not local.is_dir():
            raise UnivError(f"model path {name!r} does not exist or is not a directory")
        config_path = local / "config.json"
        if not config_path.is_file():
            raise UnivError(f"model directory {name!r} has no config.json")
        path = local.resolve()
        ref, rev = str(path), _fingerprint_dir(path)
    else:
        config_path = _hub_file(ref, "config.json", revision, "model")
        path = config_path.parent
        rev = path.name  # the snapshot folder is named by its commit hash
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UnivError(f"cannot read {config_path}: {e}") from None
    layout, family = _layout_and_family(config, name)
    src = ModelSource(name, ref, path, rev, layout, family, config)
    try:
        src.n_layers, src.d_model  # noqa: B018 - read now: a config without them fails here, in one line
    except (TypeError, ValueError, KeyError):
        raise UnivError(f"{config_path}: no number of layers (num_hidden_layers / n_layer) or width "
                        "(hidden_size / d_model)") from None
    return src


def load_tokenizer(src: ModelSource):
    from transformers import AutoTokenizer

    has_own = src.path is not None and any((src.path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    if src.is_local and src.layout == "hf" and not has_own:
        raise UnivError(f"model folder {src.name!r} has no tokenizer (tokenizer.json or tokenizer_config.json); "
                        "save the tokenizer beside the model (tokenizer.save_pretrained)")
    if has_own or src.layout == "hf":
        ref, revision = src.ref, src.hub_revision
    else:
        ref, revision = MAMBA_SSM_TOKENIZER, None
    if not Path(ref).is_absolute():
        hub.go_offline_unless_reachable()
    try:
        return AutoTokenizer.from_pretrained(ref, revision=revision)
    except _hub_errors() as e:
        why = f"it is not in the local Hugging Face cache and the Hub cannot be reached; {hub.OFFLINE_HINT}" \
            if hub.unreachable() else type(e).__name__
        raise UnivError(f"cannot load the tokenizer of {src.name!r} from {ref!r}: {why}") from None


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of what decides the token store: vocabulary, merges, normalisation, splitting, added
    tokens (and which are special), BOS and EOS. Not the PAD setting, which checkpoints sharing one
    tokenizer configure differently and which never reaches a kept position."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    added = sorted((t["id"], t["content"], bool(t.get("special"))) for t in spec.get("added_tokens") or [])
    keep = {k: spec.get(k) for k in ("model", "normalizer", "pre_tokenizer")}
    keep["added_tokens"] = added
    keep["bos"] = bos_id(tokenizer)
    keep["eos"] = tokenizer.eos_token_id
    blob = json.dumps(keep, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def bos_id(tokenizer) -> int:
    """The id prepended to every document: BOS, or EOS where a tokenizer has no BOS (as GPT-2)."""
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise UnivError("the tokenizer has neither a BOS nor an EOS token to start documents with")


def special_ids(tokenizer) -> list[int]:
    """Ids whose positions are dropped from every activation store: BOS, EOS and every added
    token marked special (PAD among them), so the set depends only on the fingerprint."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    ids = {bos_id(tokenizer), tokenizer.eos_token_id}
    ids |= {t["id"] for t in spec.get("added_tokens") or [] if t.get("special")}
    return sorted(int(i) for i in ids if i is not None)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UnivError(f"--device {device}: no CUDA device is available on this machine")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UnivError("--device mps: no Apple GPU (MPS) is available on this machine")
    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise UnivError(f"unknown device {device!r} (use auto, cpu, cuda, cuda:N or mps)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UnivError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' is bf16 on a GPU and fp32 on the CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise UnivError(f"unknown dtype {dtype!r} (use auto, {', '.join(DTYPES)})")
    return DTYPES[dtype]


class _Stop(Exception):
    """Raised from the hook on the deepest requested block to skip the rest of the forward."""


class LM:
    """A causal LM behind the interface univ's stages use. One subclass per family."""

    family: str

    def __init__(self, source: ModelSource, model: nn.Module, tokenizer):
        self.source = source
        self.model = model
        self.tokenizer = tokenizer
        self.n_layers = source.n_layers
        self.d_model = int(model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def body(self) -> nn.Module:
        """The model without its LM head."""
        raise NotImplementedError

    def blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    @torch.no_grad()
    def capture(self, modules: dict[int, nn.Module], tokens: torch.Tensor) -> torch.Tensor:
        """The outputs of one module per layer, [len(modules), batch, pos, ...]; the forward
        stops as soon as the deepest layer's module has run."""
        out: dict[int, torch.Tensor] = {}
        last = max(modules)

        def hook(layer: int):
            def fn(_module, _inputs, output):
                out[layer] = output[0] if isinstance(output, tuple) else output
                if layer == last:
                    raise _Stop

            return fn

        handles = [module.register_forward_hook(hook(layer)) for layer, module in modules.items()]
        try:
            self.body()(input_ids=tokens.to(self.device), use_cache=False)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        return torch.stack([out[layer].to(self.dtype) for layer in modules])

    def resid(self, tokens: torch.Tensor, layers: list[int]) -> torch.Tensor:
        """resid_post of the given layers: [len(layers), batch, pos, d_model], model dtype."""
        return self.capture({layer: self.blocks()[layer] for layer in layers}, tokens)

    def neurons(self, tokens: torch.Tensor, layers: list[int]) -> torch.Tensor:
        """The study's 'neurons' of the given layers: [len(layers), batch, pos, width]."""
        raise NotImplementedError

    centre_layernorm = False
    """Whether --centre layernorm centres this family's residual stream: GPT-NeoX's, which every
    block reads through LayerNorm, so that its per-token mean over d_model is invisible to the
    model and TransformerLens' default processing (the authors' Pythia caching) removes it. Not
    Mamba's (RMSNorm sees the mean), not RWKV's (it reads through LayerNorm too, but the authors
    cached transformers' hidden states as they are)."""

    def activations(self, hook: str, tokens: torch.Tensor, layers: list[int], centre: bool = False) -> torch.Tensor:
        """resid_post or neurons, by hook kind. ``centre``: resid_post minus its per-token mean over
        d_model, for a model that reads through LayerNorm (what TransformerLens caches)."""
        if hook == "resid_post":
            resid = self.resid(tokens, layers)
            if centre and self.centre_layernorm:
                resid = (resid.float() - resid.float().mean(-1, keepdim=True)).to(resid.dtype)
            return resid
        if hook == "neurons":
            return self.neurons(tokens, layers)
        raise UnivError(f"unknown hook {hook!r} (use resid_post or neurons)")

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor, replace: dict | None = None) -> torch.Tensor:
        """Logits [batch, pos, vocab]; ``replace`` maps a layer to a function applied to its
        resid_post (the stream leaving that block) before the rest of the model sees it."""
        handles = []
        for layer, fn in (replace or {}).items():
            def hook(_module, _inputs, output, fn=fn):
                if isinstance(output, tuple):
                    return (fn(output[0]), *output[1:])
                return fn(output)

            handles.append(self.blocks()[layer].register_forward_hook(hook))
        try:
            return self.model(input_ids=tokens.to(self.device), use_cache=False).logits
        finally:
            for h in handles:
                h.remove()


class GPTNeoXLM(LM):
    family = "gpt_neox"
    centre_layernorm = True

    def body(self):
        return self.model.gpt_neox

    def blocks(self):
        return self.model.gpt_neox.layers

    def neurons(self, tokens: torch.Tensor, layers: list[int]) -> torch.Tensor:
        """MLP post-activations (the output of the activation function), 4·d_model per layer."""
        return self.capture({layer: self.blocks()[layer].mlp.act for layer in layers}, tokens)


class MambaLM(LM):
    family = "mamba"

    def body(self):
        return self.model.backbone

    def blocks(self):
        return self.model.backbone.layers

    @torch.no_grad()
    def resid(self, tokens: torch.Tensor, layers: list[int]) -> torch.Tensor:
        # With mamba-ssm's kernels transformers is fast; without them univ's own scan is.
        if self.device.type == "cuda" and has_mamba_kernels():
            return super().resid(tokens, layers)
        from . import mamba

        return torch.stack([h.to(self.dtype) for h in mamba.resid(self.model, tokens.to(self.device), layers)])

    @torch.no_grad()
    def neurons(self, tokens: torch.Tensor, layers: list[int]) -> torch.Tensor:
        """concat(SiLU(conv output), SiLU(gate)): 2·d_inner per layer."""
        from . import mamba

        return torch.stack(mamba.neurons(self.model, tokens.to(self.device), layers))


class RwkvLM(LM):
    """RWKV-4 (transformers' RwkvForCausalLM), its WKV computed by univ (wkv.py): transformers'
    own is a Python loop over positions on the CPU and needs a Hub kernel on CUDA.

    resid_post.l is what transformers lists as hidden_states[l] (what the authors cached): block
    l's output, halved after every ``rescale_every``-th block, as transformers' inference mode
    rescales (its weights are divided by 2 every ``rescale_every`` blocks to keep fp16 in range,
    so the stream is scaled down by 2 there). The last block's output is taken before ``ln_out``,
    the final LayerNorm that feeds the head."""

    family = "rwkv"

    def body(self):
        return self.model.rwkv

    def blocks(self):
        return self.model.rwkv.blocks

    def _halved(self, layer: int) -> bool:
        """transformers halves the stream after this block (inference mode, weights rescaled)."""
        every = int(self.model.config.rescale_every or 0)
        return every > 0 and (layer + 1) % every == 0 and not self.model.training

    @torch.no_grad()
    def capture(self, modules: dict[int, nn.Module], tokens: torch.Tensor) -> torch.Tensor:
        from . import wkv

        with wkv.in_transformers():
            return super().capture(modules, tokens)

    def resid(self, tokens: torch.Tensor, layers: list[int]) -> torch.Tensor:
        out = super().resid(tokens, layers)
        halve = torch.tensor([0.5 if self._halved(layer) else 1.0 for layer in layers], dtype=out.dtype,
                             device=out.device)
        return out * halve[:, None, None, None]

    def neurons(self, tokens: torch.Tensor, layers: list[int]) -> torch.Tensor:
        """The channel mix's hidden activation, ReLU(key)², intermediate_size (4·d_model) per layer."""
        keys = self.capture({layer: self.blocks()[layer].feed_forward.key for layer in layers}, tokens)
        return torch.square(torch.relu(keys))

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor, replace: dict | None = None) -> torch.Tensor:
        from . import wkv

        # ``replace`` sees resid_post as defined above: undo the halving around it.
        replace = {layer: (lambda x, fn=fn: 2 * fn(x / 2)) if self._halved(layer) else fn
                   for layer, fn in (replace or {}).items()}
        with wkv.in_transformers():
            return super().logits(tokens, replace)


def has_mamba_kernels() -> bool:
    """mamba-ssm and causal-conv1d importable (the optional 'kernels' extra)."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("mamba_ssm", "causal_conv1d"))


ADAPTERS = {"gpt_neox": GPTNeoXLM, "mamba": MambaLM, "rwkv": RwkvLM}


def centred(src: ModelSource, centre: str) -> bool:
    """Whether `centre` ('layernorm' or 'none') centres this model's residual stream."""
    if centre not in CENTRES:
        raise UnivError(f"unknown --centre {centre!r} (use {' or '.join(CENTRES)})")
    return centre == "layernorm" and ADAPTERS[src.family].centre_layernorm


CENTRES = ("layernorm", "none")


def mamba_ssm_to_hf_config(cfg: dict):
    """transformers' MambaConfig for an original mamba-ssm config.json."""
    from transformers import MambaConfig

    ssm = cfg.get("ssm_cfg") or {}
    vocab = int(cfg["vocab_size"])
    multiple = int(cfg.get("pad_vocab_size_multiple", 8))
    vocab += (-vocab) % multiple  # mamba-ssm pads the embedding to this multiple
    d_model = int(cfg["d_model"])
    return MambaConfig(
        vocab_size=vocab,
        hidden_size=d_model,
        num_hidden_layers=int(cfg["n_layer"]),
        state_size=int(ssm.get("d_state", 16)),
        conv_kernel=int(ssm.get("d_conv", 4)),
        expand=int(ssm.get("expand", 2)),
        intermediate_size=int(ssm.get("expand", 2)) * d_model,
        time_step_rank=math.ceil(d_model / 16) if ssm.get("dt_rank", "auto") == "auto" else int(ssm["dt_rank"]),
        use_bias=bool(ssm.get("bias", False)),
        use_conv_bias=bool(ssm.get("conv_bias", True)),
        residual_in_fp32=bool(cfg.get("residual_in_fp32", True)),
        layer_norm_epsilon=1e-5,
        tie_word_embeddings=bool(cfg.get("tie_embeddings", True)),
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )


def _load_mamba_ssm(src: ModelSource, dtype: torch.dtype) -> nn.Module:
    from transformers import MambaForCausalLM

    if not cfg_is_pure_mamba(src.config):
        raise UnivError(f"{src.name!r}: hybrid mamba-ssm checkpoints (attention layers) are not supported")
    weights = src.path / "pytorch_model.bin"
    if not weights.is_file():
        weights = _hub_file(src.ref, "pytorch_model.bin", src.revision, "model")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a damaged (or unsafe) file
        raise UnivError(f"cannot read {weights}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    state = {k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in state.items()}
    model = MambaForCausalLM(mamba_ssm_to_hf_config(src.config))
    state.setdefault("lm_head.weight", state["backbone.embeddings.weight"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UnivError(f"{src.name!r}: unexpected mamba-ssm weights (missing {missing[:3]}, extra {unexpected[:3]})")
    model.tie_weights()
    return model.to(dtype)


def _random_init(src: ModelSource, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    if src.layout == "mamba_ssm":
        config = mamba_ssm_to_hf_config(src.config)
    elif src.path is None:  # an architecture univ ships
        config = AutoConfig.for_model(**src.config)
    else:
        config = AutoConfig.from_pretrained(src.path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        model = AutoModelForCausalLM.from_config(config)
    return model.to(dtype)


def cfg_is_pure_mamba(cfg: dict) -> bool:
    return not cfg.get("attn_layer_idx") and int(cfg.get("d_intermediate", 0) or 0) == 0


def load(name: str, device: str = "auto", dtype: str = "auto", revision: str | None = None) -> LM:
    """Load a model by alias, Hub id or local directory, in eval mode on the device."""
    src = resolve(name, revision)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    return load_source(src, dev, dt)


def load_source(src: ModelSource, device: torch.device, dtype: torch.dtype) -> LM:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # univ's own bars are the ones that matter on stderr

    if src.random_init:
        model = _random_init(src, dtype)
    elif src.layout == "mamba_ssm":
        model = _load_mamba_ssm(src, dtype)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                src.ref, revision=src.hub_revision, dtype=dtype
            )
        except Exception as e:  # hub errors, damaged or unsafe weight files, configs transformers rejects
            raise UnivError(f"cannot load model {src.name!r}: {type(e).__name__}: {e}".splitlines()[0]) from None
    model.to(device).eval().requires_grad_(False)
    return ADAPTERS[src.family](src, model, load_tokenizer(src))
