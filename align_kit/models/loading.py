"""Loading causal LMs and tokenizers: Hub ids, local folders, GPT-2 weight files, and the embedded default.

The embedded default ``tiny-gpt2`` is a small GPT-2 built from a config with a byte-level tokenizer
built from code, saved once under ``$ALIGN_KIT_HOME`` like any Hugging Face model, so that every
stage loads it through the same ``from_pretrained`` path as a real model.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from align_kit.configs import AdapterArgs, ConfigError, ModelArgs
from align_kit.models import adapters
from align_kit.resources import home

EMBEDDED_NAME = "tiny-gpt2"
EMBEDDED_VERSION = 2  # part of the cache folder name: bump whenever the built model changes
SCORE_HEAD_FILE = "score_head.safetensors"  # the new head of a reward model trained with an adapter
RANDOM_PREFIX = "random:"  # random:<shape>, an offline model of a named shape (models.shapes)
RANDOM_VERSION = 1  # part of its cache folder name: bump whenever a built model or tokenizer changes
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

    def build(folder: Path) -> None:
        save_on_this_rank(build_tiny_gpt2(), folder)
        build_byte_tokenizer().save_pretrained(folder)

    return build_once(Path(path) if path is not None else embedded_dir(), build)


def build_once(target: Path, build: Callable[[Path], object]) -> Path:
    """``target`` as ``build(folder)`` writes it, built once: under a file lock, into a temporary folder
    whose files are moved in with ``config.json`` last (a reader that finds it finds a whole model)."""
    from filelock import FileLock

    markers = (target / "tokenizer.json", target / "config.json")
    if all(marker.exists() for marker in markers):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if all(marker.exists() for marker in markers):
            return target
        target.mkdir(exist_ok=True)
        tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        build(tmp)
        for item in sorted(tmp.iterdir(), key=lambda item: item.name == "config.json"):
            os.replace(item, target / item.name)
        tmp.rmdir()
    return target


def save_on_this_rank(model: PreTrainedModel, folder: Path) -> None:
    """What ``model.save_pretrained(folder)`` writes (config, generation config, safetensors weights without
    the tied copies), written by this process whatever its rank: transformers 5 writes nothing on a rank
    other than 0 once torch.distributed is up, and the embedded default is built by whichever process takes
    the lock first."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items() if name not in tied}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)


def default_device(name: str | None = None) -> torch.device:
    """``name`` as a torch device; None picks CUDA when there is one."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def resolve(name_or_path: str) -> str:
    """Map the embedded default's name to its folder, and ``random:<shape>`` to the one folder built for it
    (``built_random``); anything else is returned unchanged."""
    if name_or_path.startswith(RANDOM_PREFIX):
        return str(built_random(name_or_path))
    return str(ensure_embedded_default()) if name_or_path == EMBEDDED_NAME else name_or_path


def random_dir(spec: str, fingerprint: str) -> Path:
    """Where ``models.shapes`` builds ``random:<shape>`` for data with this fingerprint."""
    return home() / f"random-{spec.removeprefix(RANDOM_PREFIX)}-v{RANDOM_VERSION}-{fingerprint[:16]}"


def built_random(spec: str) -> Path:
    """The folder of ``random:<shape>`` outside a training run (an evaluation): the one built so far, or a
    ConfigError when none or several were (a training run builds it on its data; name the folder then)."""
    found = sorted(p.parent for p in home().glob(f"{random_dir(spec, '*').name}/config.json"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise ConfigError(
            f"{spec} is built on a run's training data: give it as a recipe's model_name_or_path first"
        )
    raise ConfigError(
        f"{spec} was built on {len(found)} datasets; name its folder: {', '.join(map(str, found))}"
    )


# recipes whose run folders later stages load models from
RUN_STAGES = (
    "sft", "reward", "dpo", "ppo", "best_of_n", "grpo", "rloo", "kto", "online_dpo", "iterative_dpo",
)  # fmt: skip
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
RUN_COMPLETE = "run_complete.json"  # runs.COMPLETE (runs imports this module, not the reverse)


def source_problem(name_or_path: str) -> str | None:
    """Why ``name_or_path`` cannot be loaded, when that is known before asking the Hub: a local path that does
    not exist ("no such folder", with "run sft first" when it looks like an align-kit run folder), or an
    align-kit run that never finished. None for an existing path, the embedded default, or a Hub id."""
    state = source_state(name_or_path)
    if state == "unfinished":
        return (
            f"{name_or_path} is an unfinished align-kit run (no {RUN_COMPLETE}): run its command again "
            "to finish it"
        )
    if state == "weights file":
        return (
            f"{name_or_path} is a weights file, not a model folder: set weights_file and model_config instead"
        )
    if state == "missing":
        stage = run_stage(Path(name_or_path).expanduser().name)
        hint = f" (an align-kit run folder: run {stage} first)" if stage else ""
        return f"no such folder {name_or_path}{hint}"
    return None


def source_state(name_or_path: str) -> Literal["missing", "unfinished", "weights file"] | None:
    """The one rule for "is this model folder missing or an unfinished run?": 'missing' for a path meant to
    be local (``looks_local``) that is not there, 'unfinished' for an align-kit run folder (run_config.json)
    with neither run_complete.json nor a saved model, 'weights file' for a weights file given as a folder;
    None for anything loadable or left to the Hub (the embedded default, an existing path, a Hub id)."""
    if name_or_path == EMBEDDED_NAME or name_or_path.startswith(RANDOM_PREFIX):
        return None
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        has_model = any((path / name).exists() for name in ("config.json", adapters.CONFIG_NAME))
        if (path / "run_config.json").exists() and not (path / RUN_COMPLETE).exists() and not has_model:
            return "unfinished"
        return None
    if path.suffix in WEIGHT_SUFFIXES and path.is_file():
        return "weights file"
    if path.exists() or not looks_local(name_or_path):
        return None
    return "missing"


def looks_local(text: str) -> bool:
    """A filesystem path rather than a Hub id (``name`` or ``org/name``): it starts with . / or ~, has more than
    one slash, or its first part is a local folder (``runs/sft`` when ./runs exists)."""
    if text.startswith((".", "/", "~")) or "\\" in text or text.endswith("/"):
        return True
    parts = text.split("/")
    if len(parts) == 1:
        return run_stage(text) is not None
    return len(parts) > 2 or Path(parts[0]).is_dir() or parts[0] == "runs"


def run_stage(folder_name: str) -> str | None:
    """The recipe a run folder's name suggests (``sft``, ``dpo_adapter`` -> ``dpo``), or None."""
    return next(
        (s for s in RUN_STAGES if folder_name == s or folder_name.startswith((f"{s}_", f"{s}-"))), None
    )


def loadable(name_or_path: str) -> str:
    """``resolve(name_or_path)``, or a ConfigError saying why it cannot be loaded (``source_problem``)."""
    problem = source_problem(name_or_path)
    if problem:
        raise ConfigError(problem)
    return resolve(name_or_path)


def load_tokenizer(name_or_path: str, revision: str = "main") -> PreTrainedTokenizerFast:
    """Load a tokenizer and make padding explicit: right padding for training, and a pad token
    (EOS when the tokenizer has none, as for GPT-2) so that batches never pad with a real word."""
    tokenizer = AutoTokenizer.from_pretrained(loadable(name_or_path), revision=revision)
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
    config = AutoConfig.from_pretrained(loadable(model_config))
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
    adapters.lean_activations(model)
    return model.to(dtype)


def load_model(args: ModelArgs, name_or_path: str | None = None) -> PreTrainedModel:
    """Load the causal LM described by ``args`` (or ``name_or_path`` instead of its model).

    A folder written by an align-kit run with an adapter holds only adapter weights; it is rebuilt on
    its base model with the adapter's weights loaded and everything else frozen.
    """
    dtype = getattr(torch, args.torch_dtype)
    source = name_or_path or args.model_name_or_path
    if args.weights_file and name_or_path is None:
        config = args.model_config or source
        return load_weights_file(args.weights_file, config, dtype)
    folder = Path(loadable(source))
    if (folder / adapters.CONFIG_NAME).exists():
        return load_adapted(folder, dtype)
    model = AutoModelForCausalLM.from_pretrained(str(folder), revision=args.model_revision, dtype=dtype)
    adapters.lean_activations(model)  # same outputs; backward keeps one tensor per MLP activation, not four
    return model


def load_adapted(folder: str | Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A causal LM saved by ``adapters.save_adapter``: its base, the adapter, the adapter's weights; the
    non-adapter parameters frozen, ready to continue training the adapter."""
    dtype_name = str(dtype).removeprefix("torch.")
    model = rebuild_adapter(folder, lambda base: load_model(ModelArgs(base, torch_dtype=dtype_name)))
    adapters.freeze_non_adapter(model)
    return model


def rebuild_adapter(folder: str | Path, load_base: Callable[[str], PreTrainedModel]) -> PreTrainedModel:
    """The one place a saved adapter is put back: ``load_base(base_model)`` from ``adapter_config.json``,
    the adapter injected (unless the base already brought its own) and its weights loaded strictly."""
    adapter_args, base_model = adapters.read_adapter_config(folder)
    model = load_base(base_model)
    if not adapters.has_adapters(model):
        adapters.inject_adapters(model, adapter_args)
    adapters.load_adapter_weights(model, folder)
    return model


def load_reward_model(
    name_or_path: str, torch_dtype: str = "float32", pad_token_id: int | None = None
) -> PreTrainedModel:
    """A sequence classifier with one output from a causal-LM folder (its ``score`` head is new) or from a
    reward-model folder. A folder saved with an adapter is rebuilt on its base model with its trained
    head (``SCORE_HEAD_FILE``); nothing is frozen, since PPO trains its value model from one."""
    from safetensors.torch import load_file

    folder = Path(loadable(name_or_path))
    if (folder / adapters.CONFIG_NAME).exists():
        model = rebuild_adapter(folder, lambda base: load_reward_model(base, torch_dtype, pad_token_id))
        if (folder / SCORE_HEAD_FILE).exists():
            model.score.load_state_dict(load_file(str(folder / SCORE_HEAD_FILE)))
        return model
    model = AutoModelForSequenceClassification.from_pretrained(
        str(folder), num_labels=1, dtype=getattr(torch, torch_dtype)
    )
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id  # the classifier reads r at the last non-pad token
    adapters.lean_activations(model)
    return model


def save_score_head(state: dict[str, torch.Tensor], folder: str | Path) -> None:
    """Next to adapter weights, save the reward head too (it is trained but is no adapter parameter);
    ``state`` is the full state dict ``runs.save_model`` returns."""
    from safetensors.torch import save_file

    head = {
        k.removeprefix("score."): v.detach().cpu().contiguous()
        for k, v in state.items()
        if k.startswith("score.")
    }
    if not head:
        raise ValueError("the state dict has no score.* entries: not a sequence-classification reward model")
    save_file(head, str(Path(folder) / SCORE_HEAD_FILE))


def tokenizer_source(args: ModelArgs) -> str:
    """Where the tokenizer lives: explicit, else the model folder, else the config used for a weights file."""
    if args.tokenizer_name_or_path:
        return args.tokenizer_name_or_path
    if args.weights_file and args.model_config:
        return args.model_config
    return args.model_name_or_path


def load_policy(model_args: ModelArgs, adapter_args: AdapterArgs) -> tuple[PreTrainedModel, bool]:
    """The model to train and whether it got a new adapter (injected here, base frozen).

    A folder saved with an adapter comes back with that adapter and a frozen base, and training
    continues on it; ``adapter_path`` loads saved adapter weights into the new adapter.
    """
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


def policy_and_reference(
    model_args: ModelArgs, adapter_args: AdapterArgs
) -> tuple[PreTrainedModel, torch.nn.Module]:
    """The policy to train (with its adapter) and the frozen reference for DPO/PPO.

    - A new adapter on a plain model: the reference is the policy with the adapter switched off,
      which is exactly the starting model and costs no memory.
    - Otherwise (full fine-tuning, an adapter continued from a saved run, or an explicit
      ``ref_model_name_or_path``): the reference is loaded from disk again, never deep-copied
      (a model trained by SFTTrainer keeps a patched forward that a copy would share).
    """
    policy, fresh_adapter = load_policy(model_args, adapter_args)
    if fresh_adapter and model_args.ref_model_name_or_path is None:
        return policy, adapters.AdapterOffReference(policy)
    reference = load_model(model_args, model_args.ref_model_name_or_path)
    reference.eval().requires_grad_(False)
    return policy, reference


def load_trainable_reward_model(
    model_args: ModelArgs, adapter_args: AdapterArgs, pad_token_id: int | None
) -> PreTrainedModel:
    """The reward model to train, as ``load_policy`` gives a policy: a new adapter is injected with the
    base frozen (and ``adapter_path`` weights loaded into it), a saved adapter is continued; the score
    head always trains (it is new, and no adapter parameter)."""
    model = load_reward_model(model_args.model_name_or_path, model_args.torch_dtype, pad_token_id)
    if not adapters.has_adapters(model) and adapters.inject_adapters(model, adapter_args):
        if adapter_args.adapter_path:
            adapters.load_adapter_weights(model, adapter_args.adapter_path)
    if adapters.has_adapters(model):
        adapters.freeze_non_adapter(model)
        model.score.requires_grad_(True)
    return model
