"""Served systems: a system under evaluation that is an OpenAI-compatible endpoint (vLLM, TGI, llama.cpp,
``transformers serve``), given as ``name=MODEL@BASE_URL``, e.g. ``mine=my-model@http://127.0.0.1:8000/v1``.

Each held-out prompt (an hh conversation) is sent as chat messages through the judge's client
(``judges.openai_client.OpenAIClient``: the same concurrency window, retries, budget, proxy handling and traffic
counters), and each answer is appended to ``generations/<system>.jsonl`` the moment it arrives. Answers
are reused while the model name, the decoding and the seed are the same (where the server listens is not
part of that, as for a judge's cache); a rerun asks only the missing prompts, so a complete one sends no
request. The traffic of every run is logged to ``served/<system>/traffic.jsonl`` and summed in one line.
What the server runs behind a model name is not seen: after changing it, use a new system name or delete
the generations file.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from align_kit import files
from align_kit.console import log
from align_kit.data.prompts import parse_hh
from align_kit.judges.openai_client import EndpointRefused, JudgeRequestError, OpenAIClient
from align_kit.judges.protocol import log_traffic, total_traffic

SERVED_SPEC = re.compile(r"(?P<model>.+)@(?P<url>https?://\S+)")
KIND = "served"


@dataclass(frozen=True)
class ServedEndpoint:
    """The endpoint fields ``OpenAIClient`` reads, for one served system."""

    model: str
    base_url: str
    api_key_env: str | None = None
    timeout: float = 120.0
    max_retries: int = 3
    max_concurrency: int = 4


class ServedSystemFailed(RuntimeError):
    """A served system that could not answer every prompt; the answers that arrived are kept."""


def served_endpoint(path: str, args: Any = None) -> ServedEndpoint | None:
    """The endpoint a system's ``MODEL@BASE_URL`` names (with the evaluation's ``served_*`` settings), or
    None when ``path`` is no such spec."""
    match = SERVED_SPEC.fullmatch(path.strip())
    if match is None:
        return None
    settings = {
        key: getattr(args, f"served_{key}")
        for key in ("api_key_env", "timeout", "max_retries", "max_concurrency")
        if hasattr(args, f"served_{key}")
    }
    return ServedEndpoint(match["model"], match["url"].rstrip("/"), **settings)


def request_fields(args: Any) -> dict[str, Any]:
    """The chat-completion fields that change an answer: greedy decoding is temperature 0."""
    fields: dict[str, Any] = {"max_tokens": args.max_new_tokens, "seed": args.seed}
    if args.do_sample:
        return fields | {"temperature": args.temperature, "top_p": args.top_p}
    return fields | {"temperature": 0.0}


def served_answers(
    name: str, path: str, prompts: list[str], args: Any, out_dir: Path
) -> tuple[list[str], int]:
    """Answers of served system ``name`` to every prompt and how many were asked now (see the module
    docstring); raises ServedSystemFailed, after caching every answer that arrived, when a request fails
    for good (a 401/403 is ``EndpointRefused``, one line for the user)."""
    endpoint = served_endpoint(path, args)
    if endpoint is None:
        raise ValueError(f"system {name}: {path!r} is not MODEL@BASE_URL")
    identity = {"model": f"{KIND}:{endpoint.model}", "generation": request_fields(args)}
    file = out_dir / "generations" / f"{name}.jsonl"
    done = {
        row["prompt"]: row["answer"]
        for row in files.read_jsonl(file, skip_bad=True)
        if all(row.get(k) == v for k, v in identity.items())
    }
    todo = [p for p in dict.fromkeys(prompts) if p not in done]
    if not todo:
        return [done[p] for p in prompts], 0
    client = OpenAIClient(name, endpoint, role="system")
    file.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(file, "a", encoding="utf-8") as handle:
            for index, answer in client.stream(todo, lambda prompt: ask(client, prompt, args)):
                done[todo[index]] = answer
                row = {"prompt": todo[index], "answer": answer, "system": name, **identity}
                handle.write(json.dumps(row | {"base_url": endpoint.base_url}, ensure_ascii=False) + "\n")
                handle.flush()  # one answer at a time: a crash loses only the requests in flight
    except EndpointRefused:  # the user's key: said as it is, one line
        raise
    except JudgeRequestError as error:
        asked = sum(p in done for p in todo)
        raise ServedSystemFailed(
            f"{error}; {asked} of {len(todo)} answers arrived and are kept in {file}, a rerun asks only the rest"
        ) from error
    finally:
        report_traffic(name, client, out_dir)
    return [done[p] for p in prompts], len(todo)


def ask(client: OpenAIClient, prompt: str, args: Any) -> str:
    """One prompt's answer: its hh conversation as chat messages, the reply's text ('' for none)."""
    response = client.complete(parse_hh(prompt), **request_fields(args))
    return response.choices[0].message.content or ""


def report_traffic(name: str, client: OpenAIClient, out_dir: Path) -> dict[str, Any]:
    """Log this run's counters beside the earlier runs' and say them in one line; returns all runs' sum."""
    counts = asdict(client.stats)
    earlier = log_traffic(out_dir / KIND / re.sub(r"[^\w.-]+", "_", name), counts)
    total = total_traffic([*earlier, counts])

    def said(run: dict[str, Any]) -> str:
        causes = ("timeouts", "rate_limited", "server_errors", "bad_bodies", "connection_errors")
        why = ", ".join(f"{run[key]} {key}" for key in causes if run.get(key))
        return f"{run['requests']} requests, {run['retries']} retried" + (f" ({why})" if why else "")

    runs = f"; all {len(earlier) + 1} runs: {said(total)}" if earlier else ""
    log(f"system {name} at {client.url}: {said(counts)}{runs}")
    return total
