"""The agent side of one run, as the worker drives it: how it starts, how its output is read,
what it reported.

The worker owns a run's life (slots, the ledger, the host); this module owns what depends on
the agent's kind (:mod:`supervisor.agents`):

* **the start** (:func:`launch`): the prompt the next run gets (first, the milestone resume
  prompt, or the continue prompt of a resumed or interrupted session), the session it runs in
  (a pinned new id where the kind can pin one -- Claude Code's ``--session-id``, so the id is
  in the ledger's intent row before the start and a run killed before its first line can be
  resumed -- or the session it resumes), and the argv and environment the kind makes of the
  user's ``command``;
* **the reading** (:class:`AgentRun`): every block of whole lines the line path logs
  (``lines.pump_output``'s ``on_block``) goes to the kind's reader too.  For kind ``command``
  that is the reader's ``feed`` itself (a bounded tail: nothing per line, today's rules); for
  the stream kinds a session id the agent tells later (Codex and Gemini tell theirs in their
  first event, a resumed Claude session may come back under a new id) is handed to the
  worker at once, which commits it, so a crash right after still resumes the right session;
* **what it said** (:meth:`AgentRun.verdict`, :meth:`AgentRun.usage`): the honest outcome and
  the cost, tokens, turns, duration and last result text, for the ledger, the log and the
  report.

An adopted run (a dead supervisor's) gets its reader back from the ledger row alone
(:func:`adopted`): its kind, its session id; its output is then read from the offsets the
logs reached, and the verdict needs only what comes after (the final event).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from typing import Any

from supervisor import agents
from supervisor.agents import AgentKind, Launch, NextStep, PromptKind, RunReader, Session
from supervisor.config import FleetConfig, TaskConfig
from supervisor.hosts.base import Stream
from supervisor.ledger import RunRecord
from supervisor.limits import LimitDetector
from supervisor.runio import render

__all__ = ["AgentRun", "adopted", "launch", "prompt_template"]


def prompt_template(config: FleetConfig, task: TaskConfig, kind: PromptKind) -> str:
    """The prompt template of a run started with prompt ``kind`` (``auto`` resolved already)."""
    agent = config.agent
    if kind == "resume":
        return agent.resume_prompt
    if kind == "continue":
        return agent.continue_prompt
    return task.prompt or agent.first_prompt


def launch(
    kind: AgentKind,
    config: FleetConfig,
    step: NextStep,
    prompt: str,
    values: Mapping[str, str],
    *,
    git_dir: str | None,
) -> Launch:
    """How the next run starts: ``step`` says which session (a fresh one gets a pinned id
    where the kind can pin one), ``prompt`` is rendered; the user's ``command`` gets its
    placeholders filled (a kind that passes the prompt itself forbids ``{prompt}`` there)."""
    session = step.session
    if session.resume is None and kind.pins_session_ids:
        session = Session(new_id=str(uuid.uuid4()))
    command = [render(part, {**values, "prompt": prompt}) for part in config.agent_command]
    return kind.launch(command, prompt, session, git_dir=git_dir)


class AgentRun:
    """One run's reader, and the session id as the run tells it (see the module docstring).

    ``on_session`` is called with a session id the run reports that differs from the one it
    was started with (once per new id), before the next block is read.
    """

    def __init__(
        self,
        kind: AgentKind,
        launch: Launch,
        reader: RunReader,
        on_session: Callable[[str], object] | None = None,
    ) -> None:
        self.kind = kind
        self.launch = launch
        self.reader = reader
        self._known = launch.session_id
        self._on_session = on_session
        # Kind "command" tells no session: its blocks go straight to the reader's tail.
        self.on_block: Callable[[Stream, bytes], object] = (
            self._feed if kind.resumes else reader.feed
        )

    @classmethod
    def start(
        cls,
        kind: AgentKind,
        launch: Launch,
        detector: LimitDetector,
        on_session: Callable[[str], object] | None = None,
    ) -> AgentRun:
        return cls(kind, launch, kind.reader(launch, detector, detector.tz), on_session)

    def _feed(self, stream: Stream, block: bytes) -> None:
        self.reader.feed(stream, block)
        told = self.reader.facts.session_id
        if told is not None and told != self._known:
            self._known = told
            if self._on_session is not None:
                self._on_session(told)

    @property
    def session_id(self) -> str | None:
        """The agent session the run is in, as far as it is known."""
        return self.reader.facts.session_id

    def verdict(self, exit_code: int | None, now: float) -> agents.Verdict:
        return self.reader.verdict(exit_code, now)

    def usage(self) -> dict[str, Any]:
        """What the ledger keeps of the run (its ``runs`` agent columns)."""
        facts = self.reader.facts
        if not self.kind.resumes and facts.session_id is None:
            return {}  # kind "command" reports nothing
        tokens = facts.tokens
        return {
            "session_id": facts.session_id,
            "cost_usd": facts.cost_usd,
            "input_tokens": tokens.input,
            "output_tokens": tokens.output,
            "cache_read_tokens": tokens.cache_read,
            "cache_write_tokens": tokens.cache_creation,
            "turns": facts.turns,
            "agent_duration_ms": facts.duration_ms,
            "result_text": self.result_text(),
        }

    def result_text(self) -> str | None:
        """The run's last words: its final result's text, else the agent's last message."""
        facts = self.reader.facts
        text = facts.result.text if facts.result is not None else ""
        return text or facts.last_text or None

    def fields(self) -> dict[str, Any]:
        """The fields a run's end record carries (issue 13: session, cost, turns)."""
        facts = self.reader.facts
        if not self.kind.resumes:
            return {}
        found: dict[str, Any] = {
            "session_id": facts.session_id,
            "cost_usd": facts.cost_usd,
            "turns": facts.turns,
        }
        if facts.malformed:
            found["malformed_lines"] = facts.malformed
        return found


def adopted(
    run: RunRecord,
    default_kind: str,
    detector: LimitDetector,
    on_session: Callable[[str], object] | None = None,
) -> AgentRun:
    """The reader of a run an earlier shift started, rebuilt from its ledger row (its kind, its
    session): the argv is not needed to read it, and a resumed run stays one (a refusal of the
    resume is still recognised)."""
    kind = agents.KINDS.get(run.agent_kind or default_kind) or agents.get_kind(default_kind)
    launch = Launch(argv=[], session_id=run.session_id, resuming=run.resumed_from is not None)
    return AgentRun.start(kind, launch, detector, on_session)
