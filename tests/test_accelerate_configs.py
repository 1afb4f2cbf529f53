"""Protects recipes/accelerate/*.yaml, which mostly run on GPU hosts this suite never sees.

Each file parses, is headed by the exact `accelerate launch` command it is for (valid flags, an
existing recipe and run config), loads in accelerate's own config class with no key that
accelerate would silently ignore, and turns into the launcher and the FSDP or DeepSpeed plugin it
promises. One slow test really starts cpu_2proc.yaml and checks that two ranks join one gloo group;
tests/test_sharding.py trains with fsdp_cpu.yaml.
"""

import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env
from transformers import GPT2Config, GPT2LMHeadModel

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "recipes" / "accelerate"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
REQUIRED = {"single_gpu", "ddp", "fsdp", "fsdp_cpu", "deepspeed_zero2", "deepspeed_zero3", "cpu_2proc"}


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def _header_command(path: Path) -> list[str]:
    """The first line of `path`, '# accelerate launch ...', split into shell words."""
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# accelerate launch "), f"{_rel(path)} must start with its launch command"
    return shlex.split(first.removeprefix("# "))


def _launch_args(name: str, *flags: str):
    """What `accelerate launch --config_file <name>.yaml *flags recipes/dpo.py` resolves before it
    starts anything: (launcher args, the file's ClusterConfig)."""
    argv = ["--config_file", str(CONFIG_DIR / f"{name}.yaml"), *flags, "recipes/dpo.py"]
    args = launch_command_parser().parse_args(argv)
    args, defaults, _ = _validate_launch_command(args)
    return args, defaults


@pytest.fixture
def restore_environ():
    """Launcher settings travel as environment variables; leave none behind."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def _apply_launcher_env(args, defaults) -> None:
    """Export what the launcher would pass to the training processes (the plugins read it)."""
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    os.environ.update(env)


def test_every_documented_config_exists():
    assert REQUIRED <= {path.stem for path in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_header_is_the_exact_launch_command(path):
    words = _header_command(path)
    assert words[:2] == ["accelerate", "launch"]
    args = launch_command_parser().parse_args(words[2:])
    assert args.config_file == _rel(path)
    assert (REPO / args.training_script).is_file(), f"{args.training_script} does not exist"
    assert args.training_script.startswith("recipes/")
    run_config = args.training_script_args[args.training_script_args.index("--config") + 1]
    assert (REPO / run_config).is_file(), f"{run_config} does not exist"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_accelerate_loads_the_file_without_ignored_keys(path):
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    config = load_config_from_file(str(path))  # unknown top-level keys raise here
    assert isinstance(config, ClusterConfig)
    assert config.mixed_precision == "no", "precision belongs to the run config (bf16)"
    # Nested keys become launcher options; accelerate keeps a misspelt one without a word.
    options = set(vars(launch_command_parser().parse_args(["x.py"])))
    nested = list(raw.get("fsdp_config", {})) + list(raw.get("deepspeed_config", {}))
    assert not [key for key in nested if key not in options]


@pytest.mark.parametrize(
    "name, launcher, num_processes, use_cpu",
    [
        ("single_gpu", "simple", 1, False),
        ("ddp", "multi_gpu", 8, False),
        ("fsdp", "fsdp", 8, False),
        ("deepspeed_zero2", "deepspeed", 8, False),
        ("deepspeed_zero3", "deepspeed", 8, False),
        ("cpu_2proc", "multi_gpu", 2, True),
        ("fsdp_cpu", "fsdp", 2, True),
    ],
)
def test_launcher_that_each_file_selects(name, launcher, num_processes, use_cpu):
    args, _ = _launch_args(name)
    chosen = {
        "multi_gpu": args.multi_gpu,
        "fsdp": args.use_fsdp,
        "deepspeed": args.use_deepspeed,
        "simple": not (args.multi_gpu or args.use_fsdp or args.use_deepspeed),
    }
    assert [key for key, on in chosen.items() if on] == [launcher]
    assert args.num_processes == num_processes
    assert args.use_cpu is use_cpu
    assert args.mixed_precision == "no"


def test_num_processes_flag_overrides_the_placeholder():
    args, _ = _launch_args("ddp", "--num_processes", "4")
    assert args.num_processes == 4


@pytest.mark.parametrize("name", ["fsdp", "fsdp_cpu"])
def test_fsdp_files_give_fsdp2_full_state_dict_wrapping_each_gpt2_block(restore_environ, name):
    _apply_launcher_env(*_launch_args(name))
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"  # save_model writes nothing otherwise
    assert plugin.cpu_ram_efficient_loading is False
    model = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=32, n_positions=16))
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    wrapped = [type(module).__name__ for module in model.modules() if policy(module)]
    assert wrapped == ["GPT2Block"] * 3


@pytest.mark.parametrize("name, stage", [("deepspeed_zero2", 2), ("deepspeed_zero3", 3)])
def test_deepspeed_files_give_the_zero_stage_and_leave_batch_settings_to_the_run(
    restore_environ, name, stage
):
    _apply_launcher_env(*_launch_args(name))
    plugin = DeepSpeedPlugin()
    ds = plugin.deepspeed_config
    assert ds["zero_optimization"]["stage"] == stage
    assert plugin.zero3_init_flag is (stage == 3)
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is (stage == 3)
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "none"
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert ds[key] == "auto", f"{key} must come from the run config"


PROBE = textwrap.dedent(
    """
    import torch
    import torch.distributed as dist
    from accelerate import PartialState

    state = PartialState(cpu=True)  # what use_cpu: true in a run config does
    total = torch.tensor([float(state.process_index + 1)])
    dist.all_reduce(total)
    # One file per rank: two processes printing to one pipe may interleave their lines.
    with open(f"rank{state.process_index}.txt", "w") as out:
        out.write(f"rank={state.process_index} world={state.num_processes} backend={state.backend} "
                  f"sum={total.item():.0f}")
    dist.destroy_process_group()
    """
)


@pytest.mark.slow
def test_cpu_2proc_starts_two_ranks_in_one_gloo_group(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE, encoding="utf-8")
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    result = subprocess.run(
        [*launch, "--config_file", str(CONFIG_DIR / "cpu_2proc.yaml"), str(probe)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = sorted(path.read_text() for path in tmp_path.glob("rank*.txt"))
    # 1 + 2 summed over both ranks proves they share one process group.
    assert lines == ["rank=0 world=2 backend=gloo sum=3", "rank=1 world=2 backend=gloo sum=3"]
