"""Over-optimisation curves measured during training (Gao, Schulman and Hilton 2022): at fixed points, one answer
sampled per held-out prompt, scored by the proxy the run optimises and by gold scorers it never sees, with the
sampled KL to the reference; an alarm when gold falls while the proxy rises; and the policy kept at the gold peak.

Each point is one line of ``curves.jsonl`` in the run folder, written as it is measured; a resumed run keeps its
points and measures only steps it has not. PPO, GRPO, DPO, KTO and SFT record through ``CurveCallback`` (every
``curve_steps`` optimiser steps, and at step 0); best-of-N fine-tuning calls ``CurveRecorder.record`` per round.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import broadcast_object_list
from torch import nn
from transformers import PreTrainedTokenizerBase, TrainerCallback

from align_kit import files
from align_kit.configs import ConfigError, as_list, check_at_least
from align_kit.console import is_main_process, log
from align_kit.data.task import OracleScorer
from align_kit.models import adapters
from align_kit.models.generation import generate, sample_with_log_ratios
from align_kit.models.loading import load_reward_model
from align_kit.models.rewards import RewardEnsemble, reward_scorer

CURVES = "curves.jsonl"
PEAK_DIR = "gold_peak"
KL_ESTIMATOR = "k1: mean over prompts of sum_t log pi(y_t|x,y_<t) - log pi_ref(y_t|x,y_<t), y ~ pi at T=1"
logger = logging.getLogger("align_kit")


@dataclass
class CurveArgs:
    """Over-optimisation curves: proxy score, gold score and KL to the reference, measured during training."""

    curve_steps: int = field(
        default=0,
        metadata={
            "help": "Every this many optimiser steps (best-of-N: rounds) sample one answer per held-out "
            "prompt and record proxy score, gold score(s) and sampled KL to the reference in curves.jsonl "
            "and the tracker. 0: off (every recipe's default, it costs generation time)."
        },
    )
    curve_prompts: int = field(default=64, metadata={"help": "Held-out prompts of every curve point."})
    curve_max_new_tokens: int = field(default=48, metadata={"help": "Answer length of the curve samples."})
    curve_batch_size: int = field(
        default=64,
        metadata={
            "help": "Prompts generated at once for a point: one batch of the demo's prompts costs half of two "
            "(a tiny model's generation is per-step overhead)."
        },
    )
    curve_gold: list[str] = field(
        default_factory=lambda: ["oracle"],
        metadata={
            "help": "Gold scorers: 'oracle' (the embedded task's exact checker) and/or reward-model folders "
            "the run does not optimise (held-out reward models). Empty: no gold; the alarm then watches "
            "the ensemble's disagreement."
        },
    )
    curve_greedy: bool = field(
        default=False,
        metadata={
            "help": "Also score greedy answers (gold_greedy, proxy_greedy in each point): what an evaluation "
            "scores; costs a second generation per point. The curves and the KL stay on sampled answers."
        },
    )
    curve_alarm_window: int = field(
        default=3,
        metadata={
            "help": "Points the alarm looks back over: it warns once when gold falls while the proxy rises "
            "over this many points (with no gold: when ensemble members' spread keeps growing)."
        },
    )
    stop_at_gold_peak: bool = field(
        default=False,
        metadata={
            "help": "Keep the policy at the best gold point (with no gold: the best ensemble minimum) in "
            "gold_peak/, stop training when the alarm fires, and make that policy the run's model "
            "(run_complete.json says which step)."
        },
    )

    def __post_init__(self) -> None:
        as_list(self, "curve_gold")
        check_at_least(self, 0, "curve_steps")
        check_at_least(self, 1, "curve_prompts", "curve_max_new_tokens", "curve_batch_size")
        check_at_least(self, 2, "curve_alarm_window")
        if self.stop_at_gold_peak and not self.curve_steps:
            raise ConfigError(
                "stop_at_gold_peak needs curve_steps (the gold peak is found on curve points)",
                field="stop_at_gold_peak",
            )


def slope(values: Sequence[float]) -> float:
    """Least-squares slope of ``values`` against 0, 1, 2, ..."""
    n = len(values)
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    num = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values))
    den = sum((i - mean_x) ** 2 for i in range(n))
    return num / den if den else 0.0


def alarm_reason(points: Sequence[dict[str, Any]], window: int) -> str | None:
    """Why the last ``window`` points look like over-optimisation, or None: the first gold score falls
    while the proxy rises; with no gold, the ensemble members' spread grows at every point."""
    if len(points) < window:
        return None
    last = points[-window:]
    proxy = [p["proxy"] for p in last]
    if last[-1].get("gold"):
        name = next(iter(last[-1]["gold"]))
        gold = [p["gold"][name] for p in last]
        if slope(gold) < 0 < slope(proxy) and gold[-1] < max(gold):
            return (
                f"gold ({name}) fell {gold[0]:.3f} -> {gold[-1]:.3f} while the proxy rose {proxy[0]:+.3f} -> "
                f"{proxy[-1]:+.3f} over steps {last[0]['step']}-{last[-1]['step']}: the policy is over-optimising "
                "the proxy"
            )
        return None
    spread = [p.get("member_spread") for p in last]
    if None not in spread and all(b > a for a, b in zip(spread, spread[1:], strict=False)):
        return (
            f"ensemble members disagree more at every point ({spread[0]:.3f} -> {spread[-1]:.3f}, steps "
            f"{last[0]['step']}-{last[-1]['step']}): the policy may be exploiting a reward model"
        )
    return None


def peak_value(point: dict[str, Any]) -> float | None:
    """What ``stop_at_gold_peak`` maximises: the first gold score, else the ensemble's weakest member."""
    if point.get("gold"):
        return next(iter(point["gold"].values()))
    return point.get("member_min")


class CurveRecorder:
    """Measures and keeps curve points for one run (see the module docstring).

    ``proxy``: a scorer (``score(prompts, answers) -> list[float]``) of the reward the run optimises, or None
    with ``implicit_beta`` for DPO-family runs, whose proxy is the implicit reward beta * log(pi / pi_ref) of
    each sampled answer. ``golds``: name -> scorer. ``members``: the ensemble's member scorers, for their
    spread (the alarm without gold) and minimum. ``save``: writes the policy to a folder (the gold peak)."""

    def __init__(
        self,
        run_dir: str | Path,
        method: str,
        policy: nn.Module,
        reference: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        prompts: Sequence[str],
        proxy: Any = None,
        golds: dict[str, Any] | None = None,
        members: Sequence[Any] = (),
        implicit_beta: float | None = None,
        max_new_tokens: int = 48,
        window: int = 3,
        keep_peak: bool = False,
        save: Callable[[Path], None] | None = None,
        seed: int = 0,
        greedy: bool = False,
        batch_size: int = 64,
    ):
        if proxy is None and implicit_beta is None:
            raise ValueError("a curve needs a proxy scorer or implicit_beta (DPO's implicit reward)")
        self.path = Path(run_dir) / CURVES
        self.peak_dir = Path(run_dir) / PEAK_DIR
        self.method, self.policy, self.reference, self.tokenizer = method, policy, reference, tokenizer
        self.prompts, self.proxy, self.golds, self.members = list(prompts), proxy, golds or {}, list(members)
        self.implicit_beta, self.max_new_tokens, self.window = implicit_beta, max_new_tokens, window
        self.keep_peak, self.save, self.seed, self.greedy = keep_peak, save, seed, greedy
        self.batch_size = batch_size
        self.points: list[dict[str, Any]] = []
        if self.path.exists():  # a resumed run keeps the points it measured
            self.points = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        self.alarm = next((p["alarm"] for p in self.points if p.get("alarm")), None)
        self.peak = max(
            (p for p in self.points if peak_value(p) is not None), key=peak_value, default=None
        )  # first of tied peaks

    def measure(self, step: int) -> dict[str, Any]:
        """One point: sampled answers scored by proxy and golds, with the sampled KL (k1) to the reference."""
        answers, ratios = sample_with_log_ratios(
            self.policy,
            self.reference,
            self.tokenizer,
            self.prompts,
            self.max_new_tokens,
            self.batch_size,
            self.seed,
        )
        kl = sum(ratios) / len(ratios)
        if self.proxy is not None:
            proxy = _mean(self.proxy.score(self.prompts, answers))
        else:
            proxy = self.implicit_beta * kl  # mean implicit reward beta * log(pi/pi_ref) of the samples
        point = {
            "step": step,
            "method": self.method,
            "proxy": proxy,
            "proxy_kind": "reward" if self.proxy is not None else "implicit_reward",
            "gold": {name: _mean(scorer.score(self.prompts, answers)) for name, scorer in self.golds.items()},
            "kl": kl,
            "sqrt_kl": math.sqrt(max(kl, 0.0)),
            "kl_estimator": KL_ESTIMATOR,
            "n_prompts": len(self.prompts),
        }
        if self.members:
            means = [_mean(m.score(self.prompts, answers)) for m in self.members]
            center = sum(means) / len(means)
            point["member_means"] = means
            point["member_min"] = min(means)
            point["member_spread"] = math.sqrt(sum((m - center) ** 2 for m in means) / len(means))
        if (
            self.greedy
        ):  # what an evaluation scores: greedy answers (a small model's samples are mostly noise)
            greedy = [
                a[0]
                for a in generate(
                    self.policy,
                    self.tokenizer,
                    self.prompts,
                    self.max_new_tokens,
                    self.batch_size,
                    progress=False,
                )
            ]
            point["gold_greedy"] = {
                name: _mean(s.score(self.prompts, greedy)) for name, s in self.golds.items()
            }
            if self.proxy is not None:
                point["proxy_greedy"] = _mean(self.proxy.score(self.prompts, greedy))
        return point

    def record(self, step: int) -> dict[str, Any] | None:
        """Measure step ``step`` unless it is already in curves.jsonl, append it, check the alarm, keep the
        peak. Returns the point (None when skipped or on a process other than the main one)."""
        if not is_main_process() or any(p["step"] == step for p in self.points):
            return None
        start, cpu = time.perf_counter(), time.process_time()
        with torch.random.fork_rng():  # the point samples with its own seed; training's random stream goes on
            point = self.measure(step)
        point["seconds"] = time.perf_counter() - start  # the curve's cost, for the overhead benchmark
        point["cpu_seconds"] = time.process_time() - cpu  # the same on a machine shared with other jobs
        self.points.append(point)
        reason = alarm_reason(self.points, self.window)
        if reason and self.alarm is None:
            self.alarm = point["alarm"] = reason
            log(f"WARNING over-optimisation alarm at step {step}: {reason}")
            logger.warning("over-optimisation alarm: %s", reason)
        value = peak_value(point)
        if value is not None and (self.peak is None or value > peak_value(self.peak)):
            self.peak = point
            if self.keep_peak:
                self.keep(point)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:  # one whole line per point
            handle.write(files.dumps(point) + "\n")
        gold = " ".join(f"{k} {v:.3f}" for k, v in point["gold"].items())
        log(f"curve step {step}: proxy {point['proxy']:+.3f} {gold} KL {point['kl']:.3f}")
        return point

    def keep(self, point: dict[str, Any]) -> None:
        """Write the policy to gold_peak/ (whole: a new folder replaces the old one)."""
        tmp = self.peak_dir.with_name(f"{PEAK_DIR}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        (self.save or self.policy.save_pretrained)(tmp)
        files.write_json(tmp / "curve_point.json", point, indent=2)
        shutil.rmtree(self.peak_dir, ignore_errors=True)
        tmp.rename(self.peak_dir)

    def should_stop(self) -> bool:
        """Decided on the main process, the only one that measures, and broadcast from it, so that every
        rank stops at the same step (call it on every rank)."""
        if not self.keep_peak:
            return False
        return bool(broadcast_object_list([self.alarm is not None], from_process=0)[0])

    def summary(self) -> dict[str, Any]:
        """For run_complete.json and metrics.json: the points, the alarm and the peak kept."""
        out: dict[str, Any] = {"file": CURVES, "points": len(self.points), "alarm": self.alarm}
        if self.peak is not None:
            out["gold_peak"] = {
                "step": self.peak["step"],
                "value": peak_value(self.peak),
                "kl": self.peak["kl"],
                "kept": str(self.peak_dir) if self.keep_peak else None,
            }
        return out


def _mean(values: Sequence[float]) -> float:
    return sum(values) / max(len(values), 1)


class CurveCallback(TrainerCallback):
    """Records a curve point at step 0 and every ``every`` optimiser steps, sends it to the run's trackers
    (``report_to``) through ``trainer.log``, and stops training once the alarm fired when the recorder keeps
    the gold peak. ``attach(trainer)`` after building the trainer (a callback does not see its trainer)."""

    def __init__(self, recorder: CurveRecorder, every: int):
        self.recorder, self.every, self.trainer = recorder, every, None

    def attach(self, trainer: Any) -> CurveCallback:
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    def _point(self, step: int, control) -> None:
        point = self.recorder.record(step)
        if point is not None and self.trainer is not None:
            logs = {
                "curves/proxy": point["proxy"],
                "curves/kl": point["kl"],
                "curves/sqrt_kl": point["sqrt_kl"],
            }
            logs |= {f"curves/gold_{name}": value for name, value in point["gold"].items()}
            if "member_spread" in point:
                logs["curves/member_spread"] = point["member_spread"]
            self.trainer.log(logs)
        if self.recorder.should_stop():
            control.should_training_stop = True

    def on_train_begin(self, args, state, control, **kwargs):
        self._point(state.global_step, control)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            self._point(state.global_step, control)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self._point(state.global_step, control)  # the last point, whatever curve_steps


def gold_scorers(names: Sequence[str], tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """'oracle' -> the embedded task's checker; a folder -> that reward model as a gold scorer."""
    out: dict[str, Any] = {}
    for name in names:
        if name == "oracle":
            out["oracle"] = OracleScorer()
        else:
            model = load_reward_model(name, pad_token_id=tokenizer.pad_token_id).eval().requires_grad_(False)
            out[Path(name).name] = reward_scorer(model, tokenizer)
    return out


def recorder_for(
    args: CurveArgs,
    run_dir: str | Path,
    method: str,
    policy: nn.Module,
    reference: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    held_out: Sequence[str],
    reward_model: nn.Module | None = None,
    implicit_beta: float | None = None,
    save: Callable[[Path], None] | None = None,
    seed: int = 0,
    proxy: Any = None,
) -> CurveRecorder | None:
    """The recorder a recipe asks for with its CurveArgs (None when ``curve_steps`` is 0). The proxy is
    ``proxy`` (a scorer, e.g. GRPO's weighted reward functions), else ``reward_model``, else DPO's implicit
    reward with ``implicit_beta``; an ensemble's members are scored too."""
    if not args.curve_steps:
        return None
    if not held_out:
        raise ValueError("curve_steps needs held-out prompts, and the data has no test split")
    members = []
    if isinstance(reward_model, RewardEnsemble):
        members = [reward_scorer(m, tokenizer) for m in reward_model.members]
    log(f"curves: a point every {args.curve_steps} steps on {min(len(held_out), args.curve_prompts)} prompts")
    return CurveRecorder(
        run_dir, method, policy, reference, tokenizer, list(held_out)[: args.curve_prompts],
        proxy=proxy or (reward_scorer(reward_model, tokenizer) if reward_model is not None else None),
        golds=gold_scorers(args.curve_gold, tokenizer), members=members, implicit_beta=implicit_beta,
        max_new_tokens=args.curve_max_new_tokens, window=args.curve_alarm_window, keep_peak=args.stop_at_gold_peak,
        save=save, seed=seed, greedy=args.curve_greedy, batch_size=args.curve_batch_size,
    )  # fmt: skip


def adopt_peak(recorder: CurveRecorder | None, run_dir: str | Path) -> dict[str, Any]:
    """With ``stop_at_gold_peak``: copy the kept gold-peak policy over the run's saved model, so the run's
    model is the peak's. Returns what run_complete.json says about the curves ({} without curves)."""
    if recorder is None:
        return {}
    summary = recorder.summary()
    if recorder.keep_peak and recorder.peak is not None and is_main_process():
        for item in sorted(recorder.peak_dir.iterdir()):
            if item.is_file() and item.name != "curve_point.json":
                shutil.copyfile(item, Path(run_dir) / item.name)
        log(f"stop_at_gold_peak: the run's model is the policy of step {recorder.peak['step']} (gold peak)")
    return {"curves": summary}


def adapter_saver(policy: nn.Module, base_model: str, adapter_args: Any) -> Callable[[Path], None] | None:
    """How to write the policy at the gold peak: its adapter only when it has one, else the whole model."""
    if adapters.has_adapters(policy):
        return lambda folder: adapters.save_adapter(policy, folder, base_model=base_model, args=adapter_args)
    return None


def attach(
    args: CurveArgs, trainer: Any, run_dir: str | Path, method: str, policy: nn.Module, reference: nn.Module,
    tokenizer: PreTrainedTokenizerBase, held_out: Sequence[str], reward_model: nn.Module | None = None,
    implicit_beta: float | None = None, base_model: str = "", adapter_args: Any = None, seed: int = 0,
    proxy: Any = None,
) -> CurveRecorder | None:  # fmt: skip
    """A trainer-driven recipe's curves in one call: the recorder its CurveArgs ask for, attached to
    ``trainer`` as a CurveCallback (None and nothing attached when ``curve_steps`` is 0)."""
    recorder = recorder_for(
        args, run_dir, method, policy, reference, tokenizer, held_out, reward_model, implicit_beta,
        adapter_saver(policy, base_model, adapter_args), seed, proxy,
    )  # fmt: skip
    if recorder is not None:
        CurveCallback(recorder, args.curve_steps).attach(trainer)
    return recorder
