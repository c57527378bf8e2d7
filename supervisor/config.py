"""The fleet config: one TOML file, overridable by environment variables and CLI flags.

This is the one place configuration is read and validated.  Precedence, highest first: CLI
flags (passed as keyword overrides), environment variables ``AGENTIZE_FLEET_<FIELD>`` (nested
with ``__``, e.g. ``AGENTIZE_FLEET_RESTART__MAX_CRASHES=5``), the TOML file.  Relative paths in
the file are resolved against the file's directory, so a config works the same from cron's
bare environment as from an interactive shell.

Any problem becomes a :class:`~supervisor.config_errors.ConfigError` whose message is one
paragraph naming the file, the field and the fix -- never a traceback; how that paragraph is
written (field paths, variable names, the nearest key) is :mod:`supervisor.config_errors`'.
"""

from __future__ import annotations

import contextvars
import os
import re
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from supervisor import agents
from supervisor.config_errors import ConfigError, FieldNames, FieldsError
from supervisor.policy import RestartPolicy

ENV_PREFIX = "AGENTIZE_FLEET_"
DEFAULT_CONFIG = Path("configs/fleet.toml")
DEFAULT_MILESTONE_GLOBS = (
    ".tmp/milestones/issue-{issue}-milestone-*.md",
    ".milestones/issue-{issue}-milestone-*.md",
)
PLACEHOLDERS = frozenset({"issue", "title", "prompt", "workspace"})

#: Set by the fleet in every run's environment (worker.py), so an agent that runs
#: ``agentize-fleet`` itself has them: they are not config, and not misspelt config either.
RUN_ENV = frozenset(
    {
        "AGENTIZE_FLEET_ISSUE",
        "AGENTIZE_FLEET_RUN",
        "AGENTIZE_FLEET_WORKSPACE",
        "AGENTIZE_FLEET_TITLE",
    }
)

#: The longest title a run can be given.  The title reaches the agent as one argument
#: (``{title}``) and as ``AGENTIZE_FLEET_TITLE=...`` in its environment, and Linux refuses any
#: single argument or environment string over MAX_ARG_STRLEN (32 pages: 131072 bytes with its
#: NUL) with E2BIG, "Argument list too long", at the start of every run.
MAX_TITLE_BYTES = 131072 - 1 - len("AGENTIZE_FLEET_TITLE=")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


AgentKindName = Literal["command", "claude", "codex", "gemini"]


class AgentConfig(_Strict):
    """How an agent run is started (and, per ``kind``, read: see ``supervisor/agents``)."""

    # Before `command`: its validators read the kind.
    kind: AgentKindName = "command"
    command: list[str] = Field(
        default_factory=lambda: list(agents.KINDS["command"].default_command),
        min_length=1,
        description="argument list, run without a shell; placeholders "
        "{issue} {title} {prompt} {workspace}",
    )
    first_prompt: str = "/issue-to-impl {issue}"
    resume_prompt: str = "Continue from the latest milestone"
    continue_prompt: str = (
        "Your previous session on issue #{issue} was interrupted. Check the worktree "
        "(git status, git log) and continue the work where it stopped."
    )
    env: dict[str, str] = Field(default_factory=dict)
    usage_limit_patterns: list[str] | None = None
    rate_limit_patterns: list[str] | None = None
    stall_timeout: Annotated[float, Field(ge=0)] = 1800.0

    @model_validator(mode="before")
    @classmethod
    def _kind_default_command(cls, data: Any) -> Any:
        # Each kind has its own default command (kind "claude": no -p, the kind adds it).
        if isinstance(data, dict) and "command" not in data:
            kind = agents.KINDS.get(str(data.get("kind", "command")))
            if kind is not None:
                data = {**data, "command": list(kind.default_command)}
        return data

    @field_validator("command")
    @classmethod
    def _no_managed_flags(cls, value: list[str], info: ValidationInfo) -> list[str]:
        kind = agents.KINDS.get(str(info.data.get("kind")))
        if kind is not None:
            kind.check_command(value)  # ManagedFlagError (a ValueError) names the flag
        return value

    @field_validator("command", "first_prompt", "resume_prompt", "continue_prompt")
    @classmethod
    def _known_placeholders(cls, value: str | list[str]) -> str | list[str]:
        for text in [value] if isinstance(value, str) else value:
            for name in re.findall(r"(?<!\{)\{([^{}]*)\}(?!\})", text):
                if name not in PLACEHOLDERS:
                    known = ", ".join("{" + p + "}" for p in sorted(PLACEHOLDERS))
                    raise ValueError(f"unknown placeholder {{{name}}}; known: {known}")
        return value

    @field_validator("usage_limit_patterns", "rate_limit_patterns")
    @classmethod
    def _regexes(cls, value: list[str] | None) -> list[str] | None:
        for pattern in value or []:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a valid regular expression: {exc}") from None
        return value


class RestartConfig(_Strict):
    """Crash backoff, restart intensity and milestone caps (see ``policy.py``)."""

    # The defaults are the policy's own (one owner): the config only bounds them.
    backoff_base: Annotated[float, Field(gt=0)] = RestartPolicy.backoff_base
    backoff_max: Annotated[float, Field(gt=0)] = RestartPolicy.backoff_max
    max_crashes: Annotated[int, Field(ge=0)] = RestartPolicy.max_crashes
    crash_window: Annotated[float, Field(gt=0)] = RestartPolicy.crash_window
    max_milestones: Annotated[int, Field(ge=0)] = RestartPolicy.max_milestones
    max_usage_pauses: Annotated[int, Field(ge=0)] = RestartPolicy.max_usage_pauses
    usage_pause_default: Annotated[float, Field(gt=0)] = RestartPolicy.usage_pause_default


class TaskConfig(_Strict):
    """One unit of work: a GitHub issue number with an optional title and prompt.

    Strict types: ``issue = true`` or ``issue = "7"`` or ``issue = 1e9`` is a mistake in the
    file, not issue 1, 7 or 1000000000.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    issue: Annotated[int, Field(gt=0)]
    title: str = ""
    prompt: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    machine: str | None = None

    @field_validator("title", "prompt")
    @classmethod
    def _passable(cls, value: str | None) -> str | None:
        # Refused here rather than at every start of a run: a NUL cannot be in an argument or
        # an environment string at all, and an over-long one fails execve with E2BIG.
        if value is None:
            return value
        if "\0" in value:
            raise ValueError(
                "contains a NUL character, which no program argument can carry; fix: remove it"
            )
        size = len(value.encode("utf-8", "surrogateescape"))
        if size > MAX_TITLE_BYTES:
            raise ValueError(
                f"is {size} bytes long; a program argument or environment string may be at "
                f"most {MAX_TITLE_BYTES} bytes here (Linux's MAX_ARG_STRLEN); fix: shorten it"
            )
        return value


class TasksConfig(_Strict):
    """Where tasks come from: a fixed list, or GitHub issues through the ``gh`` CLI."""

    source: Literal["list", "github"] = "list"
    items: list[TaskConfig] = Field(default_factory=list)
    repo: str | None = None
    labels: list[str] = Field(default_factory=list)
    assignee: str | None = None
    milestone: str | None = None
    skip_labels: list[str] = Field(default_factory=list)
    limit: Annotated[int, Field(gt=0)] = 100
    poll_interval: Annotated[float, Field(gt=0)] = 300.0
    gh: str = "gh"


class NotifyConfig(_Strict):
    """What to run when a fleet ends: a command (``{report}`` → the report JSON's path; appended
    when absent) and/or a webhook that receives the report JSON by POST."""

    command: list[str] | None = None
    webhook: str | None = None
    timeout: Annotated[float, Field(gt=0)] = 30.0

    @field_validator("webhook")
    @classmethod
    def _http(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value


class CostLimitsConfig(_Strict):
    """``max_cost_usd``: no new run starts once a task (``task``) or the whole fleet
    (``fleet``) has cost this much in USD, as the agents report it; unset: no limit."""

    task: Annotated[float, Field(gt=0)] | None = None
    fleet: Annotated[float, Field(gt=0)] | None = None


class LocalMachineConfig(_Strict):
    """The machine the supervisor runs on; ``max_agents = 0`` uses only remote machines."""

    max_agents: Annotated[int, Field(ge=0)] = 3


class SSHMachineConfig(_Strict):
    """An SSH-reachable machine of the pool."""

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")]
    host: Annotated[str, Field(min_length=1)]
    port: Annotated[int, Field(gt=0, lt=65536)] = 22
    user: str | None = None
    identity_file: str | None = None
    known_hosts: str | None = None
    ssh_config: str | None = None
    max_agents: Annotated[int, Field(ge=0)] = 2
    clones: Annotated[int, Field(ge=1)] | None = None
    workdir: str = "~/agentize-fleet"
    connect_timeout: Annotated[float, Field(gt=0)] = 10.0
    keepalive_interval: Annotated[float, Field(gt=0)] = 5.0
    keepalive_count_max: Annotated[int, Field(gt=0)] = 3
    unreachable_after: Annotated[float, Field(gt=0)] = 120.0
    #: How long a helper command (or a login) may take to answer before the machine counts as
    #: slow: no new runs there until it answers again; never a crash.
    command_timeout: Annotated[float, Field(gt=0)] = 60.0


def _first_repeat(values: list[Any]) -> tuple[int, int] | None:
    """The indexes of the first value seen twice (its first place, its second), or None."""
    seen: dict[Any, int] = {}
    for at, value in enumerate(values):
        if value in seen:
            return seen[value], at
        seen[value] = at
    return None


# The config file's parsed TOML while :func:`load_config` builds the config (parsed once: a
# thousand ``[[tasks]]`` take pure-Python tomllib a while).
_config_data: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "agentize_fleet_config_data", default=None
)


class FleetConfig(BaseSettings):
    """A whole fleet: repository, machines, tasks, agent command, policies."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")] = "fleet"
    repository: Annotated[str, Field(min_length=1)]
    default_branch: str | None = None
    workspace_root: str = "~/.local/share/agentize-fleet/workspaces"
    clone_name: str | None = None
    clones_per_machine: Annotated[int, Field(ge=1)] = 1
    worktree_name: str = "issue-{issue}"
    concurrency: Annotated[int, Field(ge=1)] = 3
    start_interval: Annotated[float, Field(ge=0)] = 2.0
    stop_timeout: Annotated[float, Field(gt=0)] = 10.0
    lease_timeout: Annotated[float, Field(ge=0)] = 300.0
    milestone_globs: list[str] = Field(default_factory=lambda: list(DEFAULT_MILESTONE_GLOBS))
    state_dir: str | None = None
    max_line_bytes: Annotated[int, Field(ge=1024)] = 65536
    log_rotate_bytes: Annotated[int, Field(ge=0)] = 256 * 1024 * 1024
    on_orphans: Literal["adopt", "stop"] = "adopt"
    usage_limit_scope: Literal["machine", "fleet"] = "machine"
    max_usage_wait: Annotated[float, Field(ge=0)] = 12 * 3600.0
    max_cost_usd: CostLimitsConfig = Field(default_factory=CostLimitsConfig)
    requeue_lost: bool = False
    agent: AgentConfig = Field(default_factory=AgentConfig)
    restart: RestartConfig = Field(default_factory=RestartConfig)
    local: LocalMachineConfig = Field(default_factory=LocalMachineConfig)
    machines: list[SSHMachineConfig] = Field(default_factory=list)
    tasks: TasksConfig = Field(default_factory=TasksConfig)
    notify: NotifyConfig = Field(default_factory=NotifyConfig)

    # Not a setting: the directory relative paths are resolved against.
    base_dir: Path = Field(default=Path("."), exclude=True)
    source_file: Path = Field(default=Path("fleet.toml"), exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _tasks_as_list(cls, data: Any) -> Any:
        # ``[[tasks]]`` in TOML is the common form: a plain list of tasks.
        if isinstance(data, dict) and isinstance(data.get("tasks"), list):
            data = {**data, "tasks": {"items": data["tasks"]}}
        return data

    @field_validator("worktree_name")
    @classmethod
    def _worktree_name(cls, value: str) -> str:
        if "{issue}" not in value or "/" in value:
            raise ValueError('must contain {issue} and no "/" (e.g. "issue-{issue}")')
        if not value.startswith("issue-{issue}"):
            raise ValueError(
                'must start with "issue-{issue}" so that Agentize\'s `wt pathto N` finds it'
            )
        unknown = set(re.findall(r"\{([^{}]*)\}", value)) - {"issue", "slug"}
        if unknown:
            first = sorted(unknown)[0]
            raise ValueError(f"unknown placeholder {{{first}}}; known: {{issue}} {{slug}}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> FleetConfig:
        names = [m.name for m in self.machines]
        if "local" in names:
            at = names.index("local")
            raise FieldsError(
                'the name "local" is reserved for this machine; fix: rename that machine',
                f"machines.{at}.name",
            )
        twice = _first_repeat(names)
        if twice is not None:
            first, at = twice
            raise FieldsError(
                f"two machines are named {names[at]!r}; fix: give each its own `name`",
                f"machines.{first}.name",
                f"machines.{at}.name",
            )
        if self.local.max_agents == 0 and not any(m.max_agents for m in self.machines):
            where = ("machines.*.max_agents",) if self.machines else ("machines",)
            raise FieldsError(
                "local.max_agents is 0 and no SSH machine has max_agents > 0: no agent could "
                "ever run; fix: set local.max_agents to 1 or more, or add a machine",
                "local.max_agents",
                *where,
            )
        issues = [t.issue for t in self.tasks.items]
        twice = _first_repeat(issues)
        if twice is not None:
            first, at = twice
            raise FieldsError(
                f"issue {issues[at]} is listed twice; fix: remove one of the two entries",
                f"tasks.{first}.issue",
                f"tasks.{at}.issue",
            )
        known = {"local", *names}
        for at, task in enumerate(self.tasks.items):
            if task.machine is not None and task.machine not in known:
                raise FieldsError(
                    f"issue {task.issue} names machine {task.machine!r}, which is not "
                    f"configured; fix: name one of {', '.join(sorted(known))}",
                    f"tasks.{at}.machine",
                )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        data = _config_data.get()
        if isinstance(env_settings, EnvSettingsSource):
            # Unknown AGENTIZE_FLEET_* variables were warned about (load_config): they must not
            # then fail a nested model's extra="forbid" either.
            env_settings.env_vars = {
                key: value
                for key, value in env_settings.env_vars.items()
                if FIELD_NAMES.env_field(key) is not None
            }
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if data is not None:
            sources.append(InitSettingsSource(settings_cls, init_kwargs=data))
        return tuple(sources)

    # -- resolved views -------------------------------------------------------------------

    def resolve(self, path: str) -> Path:
        """A config path made absolute: ``~`` expanded, relative to the config's directory."""
        expanded = Path(os.path.expanduser(path))
        return expanded if expanded.is_absolute() else (self.base_dir / expanded).resolve()

    @property
    def repository_url(self) -> str:
        """The repository as git should see it: URLs as given, local paths made absolute."""
        repo = self.repository
        if "://" in repo or re.match(r"^[\w.-]+@[\w.-]+:", repo):
            return repo
        return str(self.resolve(repo))

    @property
    def state_path(self) -> Path:
        """Where run logs, summaries and the state file live."""
        if self.state_dir:
            return self.resolve(self.state_dir)
        base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
        return Path(base) / "agentize-fleet" / self.name

    @property
    def clone_dir_name(self) -> str:
        """``NAME.git``, the worker clone's directory name."""
        tail = self.repository.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
        name = self.clone_name or tail
        return name if name.endswith(".git") else f"{name}.git"

    @property
    def agent_command(self) -> list[str]:
        """The command template with a relative program path made absolute against the
        config's directory -- without following symbolic links: a program may tell what it is
        by the name it is called by (``scripts/fake-claude`` is a link to ``fake-agent``)."""
        program, *rest = self.agent.command
        if "/" in program and not program.startswith(("/", "~", "{")):
            program = os.path.abspath(self.base_dir.absolute() / program)
        elif program.startswith("~"):
            program = os.path.expanduser(program)
        return [program, *rest]


#: The config's fields by their paths and variables, for the messages (and for the sources:
#: an unknown variable is dropped there after a warning).
FIELD_NAMES = FieldNames(FleetConfig, ENV_PREFIX, RUN_ENV)


def _stderr_warning(message: str) -> None:
    print(f"agentize-fleet: warning: {message}", file=sys.stderr)


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    warn: Callable[[str], None] = _stderr_warning,
    **overrides: Any,
) -> FleetConfig:
    """Read, merge and validate the fleet config; raise :class:`ConfigError` on any problem.

    ``overrides`` are the command-line flags' values by field name (None: not given); a bad
    one is blamed on its flag (``--concurrency``), a bad variable on the variable, the rest on
    the file.  ``warn`` receives the warnings (unknown ``AGENTIZE_FLEET_*`` variables).
    """
    file = Path(path) if path is not None else DEFAULT_CONFIG
    file = Path(os.path.expanduser(file))
    if not file.is_file():
        hint = (
            "pass --config FILE, or copy configs/fleet.example.toml to configs/fleet.toml"
            if path is None
            else "check the path passed to --config"
        )
        raise ConfigError(f"config file {file} does not exist; fix: {hint}.")
    try:
        with file.open("rb") as handle:
            data = tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: not valid TOML: {exc}; fix the syntax at that line.") from None
    except OSError as exc:
        raise ConfigError(f"{file}: cannot be read: {exc.strerror}.") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{file}: not UTF-8 text ({exc.reason}); fix: save it as UTF-8."
        ) from None
    environ = dict(os.environ)
    FIELD_NAMES.check_environment(environ, warn)
    clean = {k: v for k, v in overrides.items() if v is not None}
    flags = {k: "--" + k.replace("_", "-") for k in clean}
    token = _config_data.set(data)
    try:
        config = FleetConfig(**clean)
    except ValidationError as exc:
        problems = "; ".join(
            FIELD_NAMES.describe(e, file, data, flags, environ) for e in exc.errors()
        )
        raise ConfigError(problems if problems.endswith((".", "?")) else problems + ".") from None
    except (SettingsError, ValueError) as exc:  # a malformed env override lands here
        raise ConfigError(f"{file}: invalid config: {exc}.") from None
    finally:
        _config_data.reset(token)
    config.base_dir = file.resolve().parent
    config.source_file = file
    return config
