"""Loading causal LMs and tokenizers: Hub ids, local folders, GPT-2 weight files, and the embedded default.

The embedded default ``tiny-gpt2`` is a small GPT-2 built from a config with a byte-level tokenizer
built from code, saved once under ``$ALIGN_KIT_HOME`` like any Hugging Face model, so that every
stage loads it through the same ``from_pretrained`` path as a real model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from align_kit.configs import ModelArgs

EMBEDDED_NAME = "tiny-gpt2"
EMBEDDED_VERSION = 2  # part of the cache folder name: bump whenever the built model changes
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


@dataclass(frozen=True)
class TinyGPT2Shape:
    """Size of the embedded default: about 0.9M parameters, learns the embedded task in minutes on 2 cores."""

    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    n_positions: int = 256
    dropout: float = 0.0
    seed: int = 0


def home() -> Path:
    """Folder for generated assets (embedded model, embedded task); ``$ALIGN_KIT_HOME`` overrides."""
    return Path(os.environ.get("ALIGN_KIT_HOME", Path.home() / ".cache" / "align_kit"))


def embedded_dir() -> Path:
    """Where ``tiny-gpt2`` is built under ``home()`` (versioned, so a changed model is never reused)."""
    return home() / f"{EMBEDDED_NAME}-v{EMBEDDED_VERSION}"


def _byte_to_symbol() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map: printable bytes stand for themselves,
    the others are shifted past 255 so that no symbol is whitespace or a control character."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level tokenizer with no merges: ids 0-255 are bytes, then EOS and PAD."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {symbol: byte for byte, symbol in _byte_to_symbol().items()}
    vocab[EOS_TOKEN] = 256
    vocab[PAD_TOKEN] = 257
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=TinyGPT2Shape.n_positions,
    )


def build_tiny_gpt2(shape: TinyGPT2Shape = TinyGPT2Shape(), vocab_size: int = 258) -> GPT2LMHeadModel:
    """A randomly initialised (seeded) small GPT-2 matching ``build_byte_tokenizer``."""
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=shape.n_positions,
        n_embd=shape.n_embd,
        n_layer=shape.n_layer,
        n_head=shape.n_head,
        bos_token_id=256,
        eos_token_id=256,
        pad_token_id=257,
        # No dropout: a 0.9M-parameter model trained for minutes underfits; dropout only slows it down.
        resid_pdrop=shape.dropout,
        embd_pdrop=shape.dropout,
        attn_pdrop=shape.dropout,
    )
    torch.manual_seed(shape.seed)
    return GPT2LMHeadModel(config)


def ensure_embedded_default(path: str | Path | None = None) -> Path:
    """Build and save ``tiny-gpt2`` once (model and tokenizer); later calls reuse the folder.

    Safe with several processes: one builds under a file lock while the others wait. Files are moved
    in one by one with ``config.json`` last, so a reader that finds it without the lock finds a
    whole model.
    """
    from filelock import FileLock

    target = Path(path) if path is not None else embedded_dir()
    markers = (target / "tokenizer.json", target / "config.json")
    if all(marker.exists() for marker in markers):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if all(marker.exists() for marker in markers):
            return target
        target.mkdir(exist_ok=True)
        tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
        build_tiny_gpt2().save_pretrained(tmp)
        build_byte_tokenizer().save_pretrained(tmp)
        for item in sorted(tmp.iterdir(), key=lambda item: item.name == "config.json"):
            os.replace(item, target / item.name)
        tmp.rmdir()
    return target


def resolve(name_or_path: str) -> str:
    """Map the embedded default's name to its folder; anything else is returned unchanged."""
    return str(ensure_embedded_default()) if name_or_path == EMBEDDED_NAME else name_or_path


def load_tokenizer(name_or_path: str, revision: str = "main") -> PreTrainedTokenizerFast:
    """Load a tokenizer and make padding explicit: right padding for training, and a pad token
    (EOS when the tokenizer has none, as for GPT-2) so that batches never pad with a real word."""
    tokenizer = AutoTokenizer.from_pretrained(resolve(name_or_path), revision=revision)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weights file without executing code: safetensors, or torch pickles with weights_only."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix in {".bin", ".pt", ".pth"}:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        return state.get("state_dict", state) if isinstance(state, dict) else state
    raise ValueError(f"{path}: unsupported weights file type {path.suffix!r} (use .safetensors, .bin or .pt)")


def load_weights_file(
    weights_file: str, model_config: str, dtype: torch.dtype = torch.float32
) -> PreTrainedModel:
    """Build the architecture from ``model_config`` and fill it from ``weights_file``.

    Accepts both the Hugging Face key layout (``transformer.h.0...``) and the original GPT-2 release
    layout without the ``transformer.`` prefix. The tied LM head and attention-mask buffers may be
    absent; any other missing or unexpected key is an error naming the file.
    """
    config = AutoConfig.from_pretrained(resolve(model_config))
    model = AutoModelForCausalLM.from_config(config)
    state = load_state_dict_file(weights_file)
    expected = set(model.state_dict())
    prefix = model.base_model_prefix + "."
    if not any(key in expected for key in state) and any(prefix + key in expected for key in state):
        state = {prefix + key: value for key, value in state.items()}
    result = model.load_state_dict(state, strict=False)
    tolerated = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = [k for k in result.missing_keys if k not in tolerated and not k.endswith(".attn.bias")]
    unexpected = [k for k in result.unexpected_keys if not k.endswith((".attn.bias", ".attn.masked_bias"))]
    if missing or unexpected:
        raise ValueError(
            f"{weights_file}: weights do not match the config {model_config}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.to(dtype)


def load_model(args: ModelArgs, name_or_path: str | None = None) -> PreTrainedModel:
    """Load the causal LM described by ``args`` (or ``name_or_path`` instead of its model).

    A folder written by an align-kit run with an adapter holds only adapter weights; it is rebuilt
    on its base model (see ``align_kit.adapters.load_adapted``).
    """
    dtype = getattr(torch, args.torch_dtype)
    source = name_or_path or args.model_name_or_path
    if args.weights_file and name_or_path is None:
        config = args.model_config or source
        return load_weights_file(args.weights_file, config, dtype)
    folder = Path(resolve(source))
    if (folder / "adapter_config.json").exists():
        from align_kit.adapters import load_adapted

        return load_adapted(folder, dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(str(folder), revision=args.model_revision, dtype=dtype)


def tokenizer_source(args: ModelArgs) -> str:
    """Where the tokenizer lives: explicit, else the model folder, else the config used for a weights file."""
    if args.tokenizer_name_or_path:
        return args.tokenizer_name_or_path
    if args.weights_file and args.model_config:
        return args.model_config
    return args.model_name_or_path


def load_policy(model_args: ModelArgs, adapter_args) -> tuple[PreTrainedModel, bool]:
    """The model to train and whether it got a new adapter (injected here, base frozen).

    A folder saved with an adapter comes back with that adapter and a frozen base, and training
    continues on it; ``adapter_path`` loads saved adapter weights into the new adapter.
    """
    from align_kit import adapters

    model = load_model(model_args)
    if adapters.has_adapters(model):
        return model, False
    if not adapters.inject_adapters(model, adapter_args):
        return model, False
    adapters.freeze_non_adapter(model)
    if adapter_args.adapter_path:
        adapters.load_adapter_weights(model, adapter_args.adapter_path)
        return model, False  # the starting policy is no longer the base: its adapter-off view is wrong
    return model, True


def policy_and_reference(model_args: ModelArgs, adapter_args) -> tuple[PreTrainedModel, torch.nn.Module]:
    """The policy to train (with its adapter) and the frozen reference for DPO/PPO.

    - A new adapter on a plain model: the reference is the policy with the adapter switched off,
      which is exactly the starting model and costs no memory.
    - Otherwise (full fine-tuning, an adapter continued from a saved run, or an explicit
      ``ref_model_name_or_path``): the reference is loaded from disk again, never deep-copied
      (a model trained by SFTTrainer keeps a patched forward that a copy would share).
    """
    from align_kit import adapters

    policy, fresh_adapter = load_policy(model_args, adapter_args)
    if fresh_adapter and model_args.ref_model_name_or_path is None:
        return policy, adapters.AdapterOffReference(policy)
    reference = load_model(model_args, model_args.ref_model_name_or_path)
    reference.eval().requires_grad_(False)
    return policy, reference
