"""A loss sweep: one starting model trained with each listed loss and beta under one budget and seed, each
member evaluated the same way, and one ranked table (recipes/loss_sweep.py).

A member is a loss spec at one beta. Specs:

- TRL DPO loss types, alone or combined with weights: ``sigmoid``, ``ipo``, ``sigmoid+sft``, ``0.8*sigmoid+0.2*sft``;
- a user-defined loss (``align_kit.training.losses``): ``package.module:function`` or ``path/to/file.py:function``;
- KTO (TRL's KTOTrainer on the same pairs split into desirable and undesirable answers): ``kto``,
  ``apo_zero_unpaired``;
- any of them with member settings in brackets: ``exo_pair[label_smoothing=0.001]``, ``kto[learning_rate=1e-5]``.

Every member is its recipe (recipes/dpo.py or recipes/kto.py) run on a YAML written into its folder: the sweep's
YAML without the sweep's own keys, plus the member's loss, beta and settings; command-line overrides of the sweep
pass on to every member. A KTO member gets twice the DPO batch in rows, so both see the same answers per step.
A member whose folder holds ``run_complete.json`` is not trained again, and one whose row (``sweep_row.json``)
was computed with the same evaluation settings is not evaluated again.

Each member is measured on the same held-out prompts and pairs:

- win rate against the starting model and against the dataset's chosen answers, with bootstrap CIs, by
  ``align_kit.evaluation.pipeline.evaluate_systems`` (greedy answers; the first judge ranks);
- the oracle score of its answers (embedded task only);
- held-out reward accuracy: how often DPO's implicit reward beta * log(pi(y|x) / pi_ref(y|x)) ranks the chosen
  answer above the rejected one (any beta > 0 gives the same order);
- KL(pi || pi_ref) in nats per answer on sampled answers (``align_kit.models.generation.sampled_kl``);
- training and evaluation wall time.

``Sweep.evaluate(loss)`` trains and evaluates one loss (a spec, or the source code of one loss function) with the
sweep's budget and returns its row: the callable a loss-discovery loop needs.
"""

from __future__ import annotations

import ast
import dataclasses
import gc
import hashlib
import json
import math
import os
import re
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from align_kit.configs import AdapterArgs, DataArgs, ModelArgs
from align_kit.evaluation import plots
from align_kit.evaluation.settings import EvalArgs
from align_kit.parsing import parse
from align_kit.training import losses
from align_kit.training.losses import DPO_LOSS_TYPES, DPOConfig

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")
PER_MEMBER_KEYS = ("loss_type", "loss_weights", "loss_function", "beta")  # set by `losses` and `betas`
ROW_NAME = "sweep_row.json"


@dataclass
class SweepArgs:
    """Which losses and betas the sweep trains, and how every member is evaluated."""

    losses: list[str] = field(
        default_factory=lambda: ["sigmoid"],
        metadata={
            "help": "Loss specs (see align_kit/loss_lab/sweep.py): TRL DPO loss types ('ipo', '0.8*sigmoid+0.2*sft'), "
            "'module:function' or 'file.py:function' user losses, 'kto' or 'apo_zero_unpaired' (KTOTrainer); "
            "member settings in brackets, e.g. 'exo_pair[label_smoothing=0.001]'."
        },
    )
    betas: list[float] = field(
        default_factory=lambda: [0.1], metadata={"help": "Every loss runs at each beta."}
    )
    judges: list[str] = field(
        default_factory=lambda: ["oracle"],
        metadata={"help": "Judges as in eval/ configs; the first one ranks the members."},
    )
    base_name: str = field(default="base", metadata={"help": "System name of the starting model."})
    n_prompts: int = field(default=200, metadata={"help": "Held-out prompts every member answers (greedy)."})
    max_new_tokens: int = field(default=48, metadata={"help": "Longest answer, in tokens (answers and KL)."})
    generation_batch_size: int = field(default=64, metadata={"help": "Prompts per generation batch."})
    n_honeypots: int = field(
        default=0, metadata={"help": "Judge audits: honeypot prompts (0: none; the sweep compares losses)."}
    )
    n_human: int = field(default=0, metadata={"help": "Judge audits: labelled pairs judged (0: none)."})
    n_boot: int = field(default=2000, metadata={"help": "Bootstrap resamples of every win-rate interval."})
    reward_pairs: int = field(
        default=200, metadata={"help": "Held-out pairs for the implicit reward accuracy."}
    )
    kl_prompts: int = field(
        default=100, metadata={"help": "Held-out prompts with one sampled answer each for KL."}
    )


CONFIG = (SweepArgs, DataArgs, ModelArgs, AdapterArgs, DPOConfig)


# ---------------------------------------------------------------------------------------------------------
# Members


@dataclass(frozen=True)
class Member:
    """One loss at one beta: the recipe that trains it and the settings it adds to the sweep's YAML."""

    name: str
    spec: str
    beta: float
    recipe: str  # "dpo" or "kto"
    settings: dict[str, Any]


def parse_member(spec: str, beta: float) -> Member:
    """A loss spec at ``beta`` -> Member; a malformed spec is an error naming it."""
    match = re.fullmatch(r"\s*([^\[\]]+?)\s*(?:\[(.*)\])?\s*", spec)
    if not match:
        raise ValueError(f"loss spec {spec!r}: expected 'loss' or 'loss[key=value,...]'")
    body, bracket = match.groups()
    settings: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in (bracket or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep or key.strip() in PER_MEMBER_KEYS:
            raise ValueError(
                f"loss spec {spec!r}: bad member setting {item!r} (key=value, not {PER_MEMBER_KEYS})"
            )
        settings[key.strip()] = setting_value(value.strip())
    if body in KTO_LOSS_TYPES:
        return Member(f"{body}-b{beta:g}", spec, beta, "kto", {"loss_type": body, **settings, "beta": beta})
    if ":" in body:
        target, _, function = body.rpartition(":")
        name = f"{Path(target).stem if target.endswith('.py') else target}.{function}"
        return Member(
            f"{name}-b{beta:g}", spec, beta, "dpo", {"loss_function": body, **settings, "beta": beta}
        )
    types, weights = [], []
    for term in body.split("+"):
        weight, star, loss_type = term.strip().rpartition("*")
        if loss_type not in DPO_LOSS_TYPES:
            raise ValueError(
                f"loss spec {spec!r}: {loss_type!r} is not a TRL DPO loss type, 'kto' or 'x:function'"
            )
        types.append(loss_type)
        weights.append(float(weight) if star else 1.0)
    dpo = {"loss_type": types} | ({"loss_weights": weights} if any(w != 1.0 for w in weights) else {})
    slug = "+".join(t if w == 1.0 else f"{w:g}{t}" for t, w in zip(types, weights, strict=True))
    return Member(f"{slug}-b{beta:g}", spec, beta, "dpo", {**dpo, **settings, "beta": beta})


def setting_value(text: str) -> Any:
    """A member setting's value as YAML reads it, except that '1e-5' is a number (YAML 1.1 wants '1.0e-5')."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def override_groups(argv: list[str]) -> list[tuple[str, list[str]]]:
    """Command-line overrides after ``--config file`` as (key, values): '--a 1 --b x y --c=2 --flag'."""
    groups: list[tuple[str, list[str]]] = []
    tokens = list(argv)
    if "--config" in tokens:
        at = tokens.index("--config")
        del tokens[at : at + 2]
    for token in tokens:
        if token.startswith("--"):
            key, sep, value = token[2:].partition("=")
            groups.append((key, [value] if sep else []))
        elif groups:
            groups[-1][1].append(token)
        else:
            raise ValueError(f"unexpected argument {token!r} before any --key")
    return groups


def load_script_module(recipe: str):
    """recipes/<recipe>.py (the installed copy, or the checkout's) as a module."""
    from align_kit.resources import load_script, shipped

    return load_script(shipped("recipes") / f"{recipe}.py", f"loss_sweep_recipe_{recipe}")


# ---------------------------------------------------------------------------------------------------------
# Measurements


def comparison(results: dict, system: str, baseline: str) -> dict[str, Any]:
    """One comparison of a judge's results: win rate (ties half), its CI and the number of prompts."""
    for c in results["comparisons"]:
        if c["system"] == system and c["baseline"] == baseline:
            return {k: c[k] for k in ("win_rate", "ci_low", "ci_high", "n")}
    raise KeyError(f"no comparison {system} vs {baseline} in the judge's results")


# ---------------------------------------------------------------------------------------------------------
# The sweep


class Sweep:
    """The members of one sweep config, trained, evaluated and tabled (see the module docstring)."""

    def __init__(self, argv: list[str], extra: tuple[type, ...] = ()):
        """Parse ``--config file.yaml`` plus overrides; ``extra`` config dataclasses (a caller's own settings
        in the same YAML, such as DiscoveryArgs) are parsed first and kept in ``self.extra``."""
        self.argv = list(argv)
        *self.extra, self.sweep_args, self.data_args, self.model_args, self.adapter_args, self.args = parse(
            extra + CONFIG, self.argv
        )
        config_path = self.argv[self.argv.index("--config") + 1]
        raw = yaml.safe_load(Path(config_path).read_text()) or {}
        self.overrides = override_groups(self.argv)
        own_keys = {f.name for t in (SweepArgs, *extra) for f in dataclasses.fields(t)}
        per_member = sorted(set(PER_MEMBER_KEYS) & (set(raw) | {k for k, _ in self.overrides}))
        if per_member:
            raise ValueError(f"{config_path}: {per_member} are set per member, by `losses` and `betas`")
        self.config_path = config_path
        self.shared = {k: v for k, v in raw.items() if k not in own_keys}
        # the sweep's output_dir holds the members' folders; each member's is set in its own YAML
        self.overrides = [(k, v) for k, v in self.overrides if k not in own_keys | {"output_dir"}]
        self.root = Path(self.args.output_dir)
        self._measure: dict[str, Any] | None = None

    def members(self) -> list[Member]:
        return [parse_member(s, b) for s in self.sweep_args.losses for b in self.sweep_args.betas]

    def member_argv(self, member: Member) -> list[str]:
        """Write the member's YAML into its folder; return the argv of its recipe."""
        recipe = load_script_module(member.recipe)
        known = {f.name for t in recipe.CONFIG for f in dataclasses.fields(t)} | {"env"}
        values = {k: v for k, v in self.shared.items() if k in known}
        overrides = [(k, v) for k, v in self.overrides if k in known]
        if member.recipe == "kto":  # each pair is two KTO rows: the same answers per optimiser step
            values["per_device_train_batch_size"] = 2 * self.args.per_device_train_batch_size
            overrides = [(k, v) for k, v in overrides if k != "per_device_train_batch_size"]
        values |= {**member.settings, "output_dir": str(self.root / member.name)}
        folder = self.root / member.name
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "member.yaml"
        header = f"# accelerate launch recipes/{member.recipe}.py --config {path}\n"
        header += f"# member {member.spec!r} at beta {member.beta:g} of the loss sweep {self.config_path}\n"
        path.write_text(header + yaml.safe_dump(values, sort_keys=False))
        return ["--config", str(path)] + [item for k, v in overrides for item in (f"--{k}", *v)]

    def check(self, members: list[Member]) -> None:
        """Parse every member's config before any is trained: a bad spec fails in seconds, not in member 9."""
        for member in members:
            parse(load_script_module(member.recipe).CONFIG, self.member_argv(member))

    def train(self, member: Member) -> dict[str, float] | None:
        """Train the member unless its folder holds a finished run: its wall and CPU seconds, or None."""
        if (self.root / member.name / "run_complete.json").exists():
            return None
        start, cpu = time.time(), time.process_time()
        load_script_module(member.recipe).main(self.member_argv(member))
        gc.collect()
        return {"train_s": time.time() - start, "train_cpu_s": time.process_time() - cpu}

    def _measurements(self) -> dict[str, Any]:
        """The reference model, tokenizer and held-out pairs and prompts, loaded once."""
        if self._measure is None:
            from align_kit.evaluation.answers import held_out
            from align_kit.models.loading import load_model, load_tokenizer, tokenizer_source

            tokenizer = load_tokenizer(tokenizer_source(self.model_args), self.model_args.model_revision)
            held = held_out(EvalArgs(n_prompts=self.sweep_args.n_prompts), self.data_args, tokenizer)
            reference = load_model(self.model_args).eval().requires_grad_(False)
            self._measure = {"tokenizer": tokenizer, "held": held, "reference": reference}
        return self._measure

    def eval_settings(self) -> dict[str, Any]:
        """What a row depends on besides the member's weights: a change retires cached rows."""
        settings = dataclasses.asdict(self.sweep_args)
        for key in ("losses", "betas"):
            settings.pop(key)
        return {**settings, "base": self.model_args.model_name_or_path, "dataset": self.data_args.dataset}

    def evaluate_member(self, member: Member) -> dict[str, Any]:
        from align_kit.evaluation.answers import read_generations
        from align_kit.evaluation.pipeline import evaluate_systems
        from align_kit.models.generation import oracle_scores, sampled_kl
        from align_kit.models.loading import load_model

        sa, folder = self.sweep_args, self.root / member.name
        measure = self._measurements()
        summary = evaluate_systems(
            {sa.base_name: self.model_args.model_name_or_path, member.name: str(folder)},
            base=sa.base_name,
            judges=sa.judges,
            out_dir=self.root / "eval",
            all_pairs=False,
            n_prompts=sa.n_prompts,
            max_new_tokens=sa.max_new_tokens,
            batch_size=sa.generation_batch_size,
            n_honeypots=sa.n_honeypots,
            n_human=sa.n_human,
            n_boot=sa.n_boot,
            seed=self.args.seed,
            progress=False,
            **dataclasses.asdict(self.data_args),
        )
        judge = next(iter(summary["judges"]))
        row: dict[str, Any] = {"member": member.name, "loss": member.spec, "beta": member.beta}
        row |= {"trainer": member.recipe, "judge": judge}
        row |= comparison(summary["judges"][judge], member.name, sa.base_name)
        vs_chosen = comparison(summary["judges"][judge], member.name, "chosen")
        row |= {f"{k}_vs_chosen": v for k, v in vs_chosen.items() if k != "n"}
        if self.data_args.dataset == "embedded":
            held = measure["held"]
            answers = {
                r["prompt"]: r["answer"]
                for r in read_generations(self.root / "eval" / "generations" / f"{member.name}.jsonl")
            }
            row["oracle"] = oracle_scores(held.prompts, [answers[p] for p in held.prompts])["oracle"]
        policy = load_model(ModelArgs(model_name_or_path=str(folder))).eval()
        tokenizer, reference = measure["tokenizer"], measure["reference"]
        rows = measure["held"].rows[: sa.reward_pairs]
        row["reward_accuracy"] = losses.implicit_reward_accuracy(policy, reference, tokenizer, rows)
        prompts = measure["held"].prompts[: sa.kl_prompts]
        row["kl"] = sampled_kl(policy, reference, tokenizer, prompts, sa.max_new_tokens, seed=self.args.seed)
        return row

    def run_member(self, member: Member) -> dict[str, Any]:
        """Train (unless finished) and evaluate (unless its row is current) one member; return its row."""
        folder = self.root / member.name
        cached = folder / ROW_NAME
        settings = self.eval_settings()
        if cached.exists() and (folder / "run_complete.json").exists():
            saved = json.loads(cached.read_text())
            if saved.get("eval_settings") == settings:
                return saved["row"]
        load = os.getloadavg()[0]
        times = self.train(member)
        if times is None:  # trained earlier: keep the training times measured then (None if unknown)
            earlier = json.loads(cached.read_text())["row"] if cached.exists() else {}
            times = {k: earlier.get(k) for k in ("train_s", "train_cpu_s")}
        start, cpu = time.time(), time.process_time()
        row = self.evaluate_member(member)
        times |= {"eval_s": time.time() - start, "eval_cpu_s": time.process_time() - cpu}
        row |= {k: None if v is None else round(v, 1) for k, v in times.items()}
        row["wall_s"] = _total(row["train_s"], row["eval_s"])
        row["cpu_s"] = _total(row["train_cpu_s"], row["eval_cpu_s"])  # this process's CPU, all threads
        row["load_at_start"] = load
        cached.write_text(json.dumps({"eval_settings": settings, "row": row}, indent=2))
        gc.collect()
        return row

    def base_scores(self) -> dict[str, Any]:
        """The starting model's oracle score on the held-out prompts (embedded task only), for reference."""
        if self.data_args.dataset != "embedded":
            return {}
        from align_kit.evaluation.answers import read_generations
        from align_kit.models.generation import oracle_scores

        prompts = self._measurements()["held"].prompts
        path = self.root / "eval" / "generations" / f"{self.sweep_args.base_name}.jsonl"
        answers = {r["prompt"]: r["answer"] for r in read_generations(path)}
        if not all(p in answers for p in prompts):
            return {}
        return {"oracle": oracle_scores(prompts, [answers[p] for p in prompts])["oracle"]}

    def evaluate(self, loss: str, beta: float | None = None) -> dict[str, Any]:
        """Train and evaluate one loss with the sweep's budget: a spec, or the Python source of one loss
        function (written to ``<output_dir>/losses/<hash>.py``); beta defaults to the first of ``betas``."""
        if "def " in loss:
            tree = ast.parse(loss)
            names = [node.name for node in tree.body if isinstance(node, ast.FunctionDef)]
            if len(names) != 1:
                raise ValueError(f"loss code must define exactly one function, found {names}")
            path = self.root / "losses" / f"loss_{hashlib.sha256(loss.encode()).hexdigest()[:12]}.py"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(loss)
            loss = f"{path}:{names[0]}"
        member = parse_member(loss, self.sweep_args.betas[0] if beta is None else beta)
        self.check([member])
        return self.run_member(member)

    def run(self) -> dict[str, Any]:
        """Every member (checked first), the ranked table and the report files; returns the JSON payload."""
        members = self.members()
        names = [m.name for m in members]
        if len(set(names)) != len(names):
            raise ValueError(f"two members share a name: {names}")
        self.check(members)
        start, load_start = time.time(), os.getloadavg()
        rows = [self.run_member(member) for member in members]
        ranking = rank(rows)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        payload = {
            "ranking": ranking,
            "base": {"model": self.model_args.model_name_or_path, **self.base_scores()},
            "config": self.config_path,
            "overrides": self.overrides,
            "eval_settings": self.eval_settings(),
            "members_wall_s": _total(*(row.get("wall_s") for row in ranking)),  # as measured when each ran
            "members_cpu_s": _total(*(row.get("cpu_s") for row in ranking)),
            "this_run_wall_s": round(time.time() - start, 1),  # reused members cost nothing here
            "this_run_cpu_s": round(usage.ru_utime + usage.ru_stime, 1),  # this process, imports included
            "torch_threads": torch.get_num_threads(),
            "load_average_start": load_start,
            "load_average_end": os.getloadavg(),
        }
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "loss_sweep.json").write_text(json.dumps(payload, indent=2))
        (self.root / "loss_sweep.md").write_text(markdown_table(ranking, payload["base"]))
        plots.plot_frontier(ranking, self.root / "loss_sweep.png")
        return payload


# ---------------------------------------------------------------------------------------------------------
# The table


def _total(*seconds: float | None) -> float | None:
    """Sum of durations, None when any is unknown (a member trained by an earlier version)."""
    return None if any(s is None for s in seconds) else round(sum(seconds), 1)


def rank(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows best first: by win rate against the base, then oracle score, then reward accuracy."""

    def key(row: dict[str, Any]) -> tuple[float, float, float]:
        return (-row["win_rate"], -row.get("oracle", 0.0), -row["reward_accuracy"])

    return [{"rank": i, **row} for i, row in enumerate(sorted(rows, key=key), start=1)]


def markdown_table(ranking: list[dict[str, Any]], base: dict[str, Any] | None = None) -> str:
    has_oracle = any("oracle" in row for row in ranking)
    headers = ["rank", "loss", "beta", "win rate vs base [95% CI]", "vs chosen [95% CI]"]
    headers += ["oracle"] * has_oracle + ["reward acc.", "KL (nats)", "wall s", "CPU s"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in ranking:
        cells = [
            str(row["rank"]),
            f"`{row['loss']}` ({row['trainer']})",
            f"{row['beta']:g}",
            f"{row['win_rate']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]",
            f"{row['win_rate_vs_chosen']:.3f} [{row['ci_low_vs_chosen']:.3f}, {row['ci_high_vs_chosen']:.3f}]",
        ]
        cells += [f"{row.get('oracle', math.nan):.3f}"] * has_oracle
        cells += [
            f"{row['reward_accuracy']:.3f}",
            f"{row['kl']:.2f}",
            _seconds(row.get("wall_s")),
            _seconds(row.get("cpu_s")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    judge = ranking[0]["judge"] if ranking else "?"
    lines.append(
        f"\nWin rates by judge `{judge}` (ties count half), n = {ranking[0]['n'] if ranking else 0} prompts."
    )
    if base and "oracle" in base:
        lines.append(f"The starting model `{base['model']}` scores {base['oracle']:.3f} (oracle).")
    lines.append(
        "Wall and CPU seconds: training plus evaluation of each member when it ran (CPU of all threads)."
    )
    return "\n".join(lines) + "\n"


def _seconds(value: float | None) -> str:
    return "?" if value is None else f"{value:.0f}"
