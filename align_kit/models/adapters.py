"""A hand-written MLP adapter for GPT-2: train a few parameters per block, keep the base frozen.

``inject_adapters`` swaps each ``GPT2MLP`` at ``transformer.h[i].mlp`` for an ``MLPAdapter`` that keeps the
original module as ``base_layer``. Two designs:

- ``residual`` (a parallel adapter, He et al. 2022, "Towards a Unified View of Parameter-Efficient
  Transfer Learning", Eq. 9):  y = MLP(x) + W_up · dropout(gelu(W_down · x + b_down)) + b_up,
  with W_up, b_up = 0 at init, so the adapted model equals the base at step 0.
- ``replace``: y = W_proj · dropout(gelu(W_fc · x + b_fc)) + b_proj, a new MLP of inner width ``rank``
  instead of the original; with ``adapter_init='pretrained'`` it starts from the original's most important
  hidden units (see ``_top_hidden_units``) and equals the base at full width.

Every adapter parameter name starts with ``ADAPTER_PREFIX``; ``adapters_disabled`` makes the model compute the
base exactly, and ``AdapterOffReference`` turns that into a DPO/PPO reference model that costs no weights.
"""

from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import NewGELUActivation
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

from align_kit import files
from align_kit.configs import AdapterArgs, ConfigError

ADAPTER_PREFIX = "adapter_"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
DESIGNS = ("residual", "replace")
INITS = ("pretrained", "random")


class MLPAdapter(nn.Module):
    """One adapted GPT-2 MLP. Input and output (B, T, n_embd).

    ``base_layer`` is the original ``GPT2MLP``; it runs in ``residual`` and when disabled, and is only kept
    (for ``adapters_disabled`` and ``remove_adapters``) in ``replace``. Adapter weights are ``nn.Linear``
    (out, in), unlike GPT-2's ``Conv1D`` (in, out).
    """

    def __init__(
        self, base_layer: GPT2MLP, design: str, rank: int, init: str = "pretrained", dropout: float = 0.0
    ):
        super().__init__()
        n_embd, inner = base_layer.c_fc.weight.shape  # Conv1D weight: (in, out)
        factory = {"device": base_layer.c_fc.weight.device, "dtype": base_layer.c_fc.weight.dtype}
        self.base_layer = base_layer
        lean_activations(base_layer)  # the frozen MLP's backward keeps one (B, T, inner) tensor, not four
        self.design = design
        self.disabled = False
        self.adapter_dropout = nn.Dropout(dropout)
        if design == "residual":
            self.adapter_down = nn.Linear(n_embd, rank, **factory)
            self.adapter_up = nn.Linear(rank, n_embd, **factory)
            nn.init.zeros_(self.adapter_up.weight)  # identity at step 0
            nn.init.zeros_(self.adapter_up.bias)
        elif design == "replace":
            self.adapter_fc = nn.Linear(n_embd, rank, **factory)
            self.adapter_proj = nn.Linear(rank, n_embd, **factory)
            if init == "pretrained":
                self._copy_top_units(rank, inner)
            else:  # GPT-2's own initialisation: N(0, 0.02) weights, zero biases
                for linear in (self.adapter_fc, self.adapter_proj):
                    nn.init.normal_(linear.weight, std=0.02)
                    nn.init.zeros_(linear.bias)
        else:
            raise ValueError(f"adapter design must be one of {DESIGNS}, got {design!r}")

    @torch.no_grad()
    def _copy_top_units(self, rank: int, inner: int) -> None:
        if rank > inner:
            raise ValueError(
                f"adapter_init='pretrained' needs adapter_rank <= the MLP's inner width {inner}, got {rank}"
            )
        fc, proj = self.base_layer.c_fc, self.base_layer.c_proj
        units = _top_hidden_units(fc.weight, proj.weight, rank)
        self.adapter_fc.weight.copy_(fc.weight[:, units].T)  # (rank, n_embd)
        self.adapter_fc.bias.copy_(fc.bias[units])
        self.adapter_proj.weight.copy_(proj.weight[units, :].T)  # (n_embd, rank)
        self.adapter_proj.bias.copy_(proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self.base_layer(x)
        act = self.base_layer.act  # GPT-2's activation (gelu_new, in LeanGelu); it has no parameters
        if self.design == "residual":
            return self.base_layer(x) + self.adapter_up(self.adapter_dropout(act(self.adapter_down(x))))
        hidden = self.adapter_dropout(act(self.adapter_fc(x)))  # (B, T, rank)
        return self.base_layer.dropout(self.adapter_proj(hidden))  # GPT-2's residual dropout, as in GPT2MLP


class _LeanGeluNew(torch.autograd.Function):
    """gelu_new(h) = 0.5 h (1 + tanh(sqrt(2/pi) (h + 0.044715 h^3))) that saves only h for backward.

    Forward runs GPT-2's own op chain (same output bit for bit); backward is PyTorch's fused derivative of the
    tanh-approximate GELU, which is the same function. Autograd on the chain would store three more tensors of
    h's size (h^3, tanh, 0.5 h), the bulk of a frozen MLP's activation memory.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, act: nn.Module) -> torch.Tensor:
        ctx.save_for_backward(hidden)
        return act(hidden)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (hidden,) = ctx.saved_tensors
        grad_hidden = torch.ops.aten.gelu_backward(grad.float(), hidden.float(), approximate="tanh")
        return grad_hidden.to(hidden.dtype), None


class LeanGelu(nn.Module):
    """GPT-2's ``gelu_new`` module with the same forward bit for bit, whose backward keeps only its input
    (``_LeanGeluNew``): three fewer (B, T, 4 d) tensors per layer kept for backward, and one fused backward op."""

    def __init__(self, act: nn.Module):
        super().__init__()
        self.act = act

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.requires_grad:
            return _LeanGeluNew.apply(hidden, self.act)
        return self.act(hidden)


def lean_activations(model: nn.Module) -> int:
    """Wrap every ``gelu_new`` activation of ``model`` in ``LeanGelu``; returns how many. Weights, outputs and
    saved files are unchanged (the module has no state)."""
    count = 0
    for module in list(model.modules()):
        if not isinstance(module, LeanGelu) and isinstance(getattr(module, "act", None), NewGELUActivation):
            module.act = LeanGelu(module.act)
            count += 1
    return count


def _top_hidden_units(w_in: torch.Tensor, w_out: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (ascending) of the ``k`` hidden units with the largest ||W_in[:, j]||_2 · ||W_out[j, :]||_2.

    ``w_in`` is c_fc's (n_embd, inner) and ``w_out`` c_proj's (inner, n_embd). Since |gelu(z)| <= |z|, the
    score bounds unit j's output norm per unit of input norm (biases ignored). Ascending order keeps the
    original unit order, so at k = inner the new MLP is the original one, sum for sum.
    """
    score = w_in.norm(dim=0) * w_out.norm(dim=1)  # (inner,)
    return score.topk(k).indices.sort().values


def is_adapter_parameter(name: str) -> bool:
    """True for parameter names inside an adapter (any dotted component starting with ``ADAPTER_PREFIX``)."""
    return any(part.startswith(ADAPTER_PREFIX) for part in name.split("."))


def parse_layers(layers: str, n_layer: int) -> list[int]:
    """'all' -> every block; '0,1,5' -> those blocks (each checked against ``n_layer``)."""
    if layers.strip() == "all":
        return list(range(n_layer))
    chosen = sorted({int(part) for part in layers.split(",") if part.strip()})
    bad = [i for i in chosen if not 0 <= i < n_layer]
    if not chosen or bad:
        raise ConfigError(
            f"adapter_layers: {layers!r} needs 'all' or indices in [0, {n_layer}), bad {bad}",
            field="adapter_layers",
        )
    return chosen


def inject_adapters(model: nn.Module, args: AdapterArgs) -> list[str]:
    """Replace the ``GPT2MLP`` of the chosen blocks by ``MLPAdapter``s in place; return the replaced names.

    ``args.adapter == 'none'`` does nothing. Expects one GPT-2 per model (blocks are numbered by their order).
    Does not freeze anything (see ``freeze_non_adapter``) and does not
    read ``args.adapter_path`` (see ``load_adapter_weights``). ``remove_adapters`` undoes it.
    """
    if args.adapter == "none":
        return []
    if args.adapter not in DESIGNS or args.adapter_init not in INITS or args.adapter_rank < 1:
        raise ValueError(
            f"bad adapter settings: adapter={args.adapter!r} (one of none, {', '.join(DESIGNS)}), "
            f"adapter_init={args.adapter_init!r} (one of {', '.join(INITS)}), "
            f"adapter_rank={args.adapter_rank} (>= 1)"
        )
    if has_adapters(model):
        raise ValueError("model already has adapters; call remove_adapters first")
    mlps = {name: module for name, module in model.named_modules() if isinstance(module, GPT2MLP)}
    if not mlps:
        raise ValueError(
            f"no GPT2MLP found in {type(model).__name__}: the adapter supports GPT-2 models only"
        )
    blocks = set(parse_layers(args.adapter_layers, len(mlps)))
    replaced = []
    for name, mlp in mlps.items():
        parent_name, _, child = name.rpartition(".")  # 'transformer.h.3', 'mlp'
        if int(parent_name.rpartition(".")[2]) not in blocks:
            continue
        adapter = MLPAdapter(mlp, args.adapter, args.adapter_rank, args.adapter_init, args.adapter_dropout)
        setattr(model.get_submodule(parent_name), child, adapter)
        replaced.append(name)
    return replaced


def remove_adapters(model: nn.Module) -> list[str]:
    """Put every original ``GPT2MLP`` back (adapter weights are dropped); return the restored names.

    The restored modules are the very objects that were wrapped; their ``requires_grad`` flags stay as set.
    """
    adapters = [(name, module) for name, module in model.named_modules() if isinstance(module, MLPAdapter)]
    for name, adapter in adapters:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, adapter.base_layer)
    return [name for name, _ in adapters]


def has_adapters(model: nn.Module) -> bool:
    """True when ``model`` contains at least one ``MLPAdapter``."""
    return any(isinstance(module, MLPAdapter) for module in model.modules())


def freeze_non_adapter(model: nn.Module) -> None:
    """Train adapter parameters only: every other parameter (embeddings, attention, LayerNorms, base MLPs,
    including the unused ``base_layer`` of ``replace``) gets ``requires_grad=False``."""
    if not has_adapters(model):
        raise ValueError("model has no adapters: freezing would leave nothing to train")
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter_parameter(name))


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block every adapter is bypassed, so ``model`` computes exactly its base model."""
    adapters = [module for module in model.modules() if isinstance(module, MLPAdapter)]
    previous = [adapter.disabled for adapter in adapters]
    for adapter in adapters:
        adapter.disabled = True
    try:
        yield model
    finally:
        for adapter, was_disabled in zip(adapters, previous, strict=True):
            adapter.disabled = was_disabled


def _computed_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Unique parameters the (adapted) model computes with: tied weights count once, and the ``base_layer``
    a ``replace`` adapter keeps only for disabling and removal is left out."""
    kept = {
        id(param)
        for module in model.modules()
        if isinstance(module, MLPAdapter) and module.design == "replace"
        for param in module.base_layer.parameters()
    }
    for name, param in model.named_parameters():  # deduplicates tied parameters
        if id(param) not in kept:
            yield name, param


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) over the parameters the model computes with (see ``_computed_parameters``).

    For ``replace`` the total is the adapted model's size, not what is held in memory: the kept base MLPs
    are excluded (``describe_parameters`` reports them separately).
    """
    params = [param for _, param in _computed_parameters(model)]
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def describe_parameters(model: nn.Module) -> str:
    """One line for the start of a run, e.g.
    'trainable 1,484,736 of 125,924,544 parameters (1.18%); residual adapter in 12 block(s)'."""
    trainable, total = count_parameters(model)
    held = sum(param.numel() for param in model.parameters())
    adapters = [module for module in model.modules() if isinstance(module, MLPAdapter)]
    line = f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)"
    if adapters:
        line += f"; {adapters[0].design} adapter in {len(adapters)} block(s)"
        outside = sum(
            p.numel()
            for n, p in _computed_parameters(model)
            if p.requires_grad and not is_adapter_parameter(n)
        )
        if outside:  # e.g. freeze_non_adapter not called, or a reward head trained on purpose
            line += f"; {outside:,} of the trainable parameters are outside the adapters"
    if held != total:
        line += f"; plus {held - total:,} kept base-MLP parameters used only with the adapter off"
    return line


def adapter_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Adapter entries of ``state`` (default: ``model``'s own state dict) by name, detached, contiguous,
    on CPU."""
    source = model.state_dict() if state is None else state
    return {
        name: value.detach().cpu().contiguous()
        for name, value in source.items()
        if is_adapter_parameter(name)
    }


def save_adapter(
    model: nn.Module,
    folder: str | Path,
    base_model: str,
    args: AdapterArgs,
    state: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write ``adapter_model.safetensors`` (adapter weights only) and ``adapter_config.json`` (the AdapterArgs
    fields plus ``base_model``, the name or path ``models.load_adapted`` loads the base from) into ``folder``.

    ``state``: the model's full state dict when a rank's own parameters are only a shard (FSDP, ZeRO-3),
    gathered by ``accelerator.get_state_dict``; its adapter entries are written instead of the model's.
    """
    from safetensors.torch import save_file

    state = adapter_state_dict(model, state)
    if not state:
        raise ValueError("model has no adapter parameters to save")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    if Path(base_model).is_dir():  # a local folder: recorded absolute, so the adapter loads from any folder
        base_model = str(Path(base_model).resolve())
    config = {**dataclasses.asdict(args), "adapter_path": None, "base_model": base_model}
    files.write_json(folder / CONFIG_NAME, config, indent=2, sort_keys=True)


def read_adapter_config(folder: str | Path) -> tuple[AdapterArgs, str]:
    """(AdapterArgs, base_model) from ``folder/adapter_config.json``."""
    config = json.loads((Path(folder) / CONFIG_NAME).read_text())
    base_model = config.pop("base_model")
    return AdapterArgs(**config), base_model


@torch.no_grad()
def load_adapter_weights(model: nn.Module, folder: str | Path) -> None:
    """Copy the adapter weights saved in ``folder`` into the already adapted ``model``.

    Strict: a missing or unexpected name, or a shape mismatch, raises an error naming the folder.
    """
    from safetensors.torch import load_file

    saved = load_file(str(Path(folder) / WEIGHTS_NAME))
    params = {name: param for name, param in model.named_parameters() if is_adapter_parameter(name)}
    missing, unexpected = sorted(params.keys() - saved.keys()), sorted(saved.keys() - params.keys())
    wrong_shape = [name for name in params.keys() & saved.keys() if params[name].shape != saved[name].shape]
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"{folder}: adapter weights do not match the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shape {sorted(wrong_shape)[:5]}"
        )
    for name, param in params.items():
        param.copy_(saved[name])


class AdapterOffReference(nn.Module):
    """The policy with its adapters switched off, as a reference model that holds no weights of its own.

    The policy is stored outside ``nn.Module``'s registry, so the reference has no parameters or submodules:
    a trainer's ``.to()``, ``.eval()``, ``accelerator.prepare_model`` and dropout disabling leave the policy
    alone, and no optimizer or DDP wrapper sees its weights twice. ``forward`` runs the policy in eval mode,
    under ``torch.no_grad()`` and ``adapters_disabled``, i.e. it computes the base model, and refuses to run
    while any base weight is trainable (the reference would then drift with the policy). That is the right
    reference when the run starts from the base (a ``residual`` adapter starts as the identity; a narrow
    ``replace`` adapter does not, and this reference is then the original model, not the policy at step 0).

    Works with TRL's DPOTrainer (not with ``use_liger_kernel``, which reads ``ref_model.base_model``) and
    PPOTrainer, without DeepSpeed or FSDP. ``state_dict`` returns the base weights it computes with, so
    DPO's ``precompute_ref_log_probs`` cache is keyed by them.
    """

    def __init__(self, policy: PreTrainedModel):
        super().__init__()
        if not has_adapters(policy):
            raise ValueError("AdapterOffReference needs a policy with adapters (see inject_adapters)")
        object.__setattr__(self, "policy", policy)  # not registered: no parameters of its own
        base = [param for name, param in policy.named_parameters() if not is_adapter_parameter(name)]
        object.__setattr__(self, "_base_parameters", base)

    @property
    def config(self):
        return self.policy.config

    @property
    def generation_config(self):
        return self.policy.generation_config

    @property
    def device(self) -> torch.device:
        return self.policy.device

    @property
    def dtype(self) -> torch.dtype:
        return self.policy.dtype

    def forward(self, *args, **kwargs):
        if any(param.requires_grad for param in self._base_parameters):
            raise RuntimeError(
                "AdapterOffReference: the policy's base weights are trainable, so the reference would move "
                "with the policy; call freeze_non_adapter(policy) before training"
            )
        was_training = self.policy.training
        self.policy.eval()  # no dropout in the reference, whatever the policy's mode
        try:
            with torch.no_grad(), adapters_disabled(self.policy):
                return self.policy(*args, **kwargs)
        finally:
            self.policy.train(was_training)

    def state_dict(self, *args, **kwargs) -> OrderedDict[str, torch.Tensor]:
        """The policy's non-adapter weights (those the reference computes with)."""
        state = self.policy.state_dict(*args, **kwargs)
        return OrderedDict((name, value) for name, value in state.items() if not is_adapter_parameter(name))
