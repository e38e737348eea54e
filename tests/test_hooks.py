"""Hook registry (built-ins, import paths, entry points) and HookRunner (order, kwargs, on_error)."""

from __future__ import annotations

import errno
import logging
import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from pruning.config import HookConfig, PipelineConfig, load_config
from pruning.errors import UserError
from pruning.hooks import ENTRY_POINT_GROUP, Event, Hook, HookError, HookRunner, default_registry
from pruning.hooks import registry as registry_module
from pruning.hooks.analysis import AnalysisHook
from pruning.hooks.context import PipelineContext
from pruning.hooks.registry import instantiate
from pruning.hooks.runner import ActiveHook
from tests.tiny_pipeline import REPO

PLUGIN_SOURCE = """
LOADED = []


class Plugin:
    def __init__(self, greeting="hi"):
        self.greeting = greeting

    def after_save(self, context, **kwargs):
        LOADED.append(self.greeting)


class NoEvents:
    def run(self):
        pass
"""


@pytest.fixture
def isolated_imports(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """cwd = tmp_path; sys.path and sys.modules are restored afterwards."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    for name in [n for n in sys.modules if n.startswith("hooks_plugin_")]:
        del sys.modules[name]


def plugin_module(directory: Path, name: str) -> str:
    (directory / f"{name}.py").write_text(PLUGIN_SOURCE, encoding="utf-8")
    return name


class FakeEntryPoint:
    """An entry point that counts its loads (a real one would import the plugin)."""

    def __init__(self, name: str, target: type | None = None) -> None:
        self.name, self.group, self.target, self.loads = name, ENTRY_POINT_GROUP, target, 0

    def load(self) -> type:
        self.loads += 1
        if self.target is None:
            raise AssertionError(f"plugin {self.name} was loaded without being named")
        return self.target


@pytest.fixture
def fake_entry_points(monkeypatch: pytest.MonkeyPatch):
    """Install entry points; returns the list so a test can add to it. Records the groups asked for."""
    installed: list = []
    groups: list[str] = []

    def entry_points(*, group: str):
        groups.append(group)
        return [ep for ep in installed if ep.group == group]

    monkeypatch.setattr(registry_module, "entry_points", entry_points)
    installed.append(FakeEntryPoint("bomb"))  # must never be loaded
    return installed, groups


# ---------------------------------------------------------------------------------------------- registry


def test_event_values_and_order():
    assert [e.value for e in Event] == ["before_prune", "after_prune", "after_save"]
    assert Event("after_save") is Event.AFTER_SAVE
    assert ENTRY_POINT_GROUP == "pruning.hooks"


def test_resolve_builtin_analysis(fake_entry_points):
    installed, _ = fake_entry_points
    assert default_registry().resolve("analysis") is AnalysisHook
    assert installed[0].loads == 0


def test_resolve_import_path_from_working_directory(isolated_imports: Path, fake_entry_points):
    name = plugin_module(isolated_imports, "hooks_plugin_cwd")
    assert str(isolated_imports) not in sys.path
    cls = default_registry().resolve(f"{name}:Plugin")
    assert cls.__name__ == "Plugin" and cls.__module__ == name
    assert str(isolated_imports) in sys.path
    assert fake_entry_points[0][0].loads == 0


def test_import_path_errors(isolated_imports: Path):
    name = plugin_module(isolated_imports, "hooks_plugin_errors")
    registry = default_registry()
    with pytest.raises(
        UserError, match=r"cannot import 'hooks_plugin_missing' for hook 'hooks_plugin_missing:X'"
    ):
        registry.resolve("hooks_plugin_missing:X")
    with pytest.raises(UserError, match=rf"module '{name}' has no attribute 'Nope'"):
        registry.resolve(f"{name}:Nope")
    with pytest.raises(UserError, match=r"has none of the event methods \['before_prune', 'after_prune'"):
        registry.resolve(f"{name}:NoEvents")


def test_entry_point_resolves_by_name_and_others_stay_unloaded(isolated_imports: Path, fake_entry_points):
    installed, groups = fake_entry_points
    name = plugin_module(isolated_imports, "hooks_plugin_ep")
    sys.path.append(str(isolated_imports))
    real = EntryPoint(name="event-log", value=f"{name}:Plugin", group=ENTRY_POINT_GROUP)
    counted = FakeEntryPoint("counted", Hook)
    installed.extend([real, counted])

    registry = default_registry()
    assert registry.resolve("event-log").__module__ == name
    assert registry.resolve("counted") is Hook and counted.loads == 1
    assert installed[0].loads == 0  # "bomb" is installed but never named
    assert set(groups) == {ENTRY_POINT_GROUP}
    names = registry.names()  # listing loads nothing
    assert names == ["analysis", "bomb", "counted", "event-log", "gguf", "perplexity", "plot"]
    assert installed[0].loads == 0 and counted.loads == 1


def test_runner_with_only_builtins_loads_no_plugin(fake_entry_points):
    installed, _ = fake_entry_points
    runner = HookRunner.from_config((HookConfig("analysis", {"lang": "zh", "verbose": False}),))
    assert isinstance(runner.hooks[0].instance, AnalysisHook) and runner.hooks[0].instance.lang == "zh"
    assert installed[0].loads == 0


def test_unknown_name_lists_known_hooks(fake_entry_points):
    installed, _ = fake_entry_points
    installed.append(FakeEntryPoint("event-log"))
    with pytest.raises(UserError) as info:
        default_registry().resolve("analysys")
    known = "analysis, bomb, event-log, gguf, perplexity, plot"
    assert str(info.value) == f"hooks: unknown hook 'analysys'; known hooks: {known}"
    assert all(ep.loads == 0 for ep in installed)


def test_register_twice_is_refused():
    registry = default_registry()
    with pytest.raises(ValueError, match="already registered"):
        registry.register("analysis", lambda: Hook)


@pytest.mark.parametrize(
    ("params", "detail"),
    [({"lang": "fr"}, "lang must be one of"), ({"colour": "red"}, "unexpected keyword argument 'colour'")],
)
def test_bad_params_name_the_hook(params: dict, detail: str):
    configs = (HookConfig("analysis"), HookConfig("analysis", params))
    with pytest.raises(UserError) as info:
        HookRunner.from_config(configs)
    message = str(info.value)
    assert message.startswith("hooks: hooks[1] analysis: bad params ") and detail in message


def test_bad_params_of_an_import_path_hook(isolated_imports: Path):
    name = plugin_module(isolated_imports, "hooks_plugin_params")
    runner = HookRunner.from_config((HookConfig(f"{name}:Plugin", {"greeting": "hello"}),))
    assert runner.hooks[0].instance.greeting == "hello"
    with pytest.raises(UserError, match=rf"hooks\[0\] {name}:Plugin: bad params .*'farewell'"):
        HookRunner.from_config((HookConfig(f"{name}:Plugin", {"farewell": "bye"}),))


# ---------------------------------------------------------------------------------------------- runner


@pytest.fixture
def context(tmp_path: Path) -> PipelineContext:
    config: PipelineConfig = load_config(REPO / "configs" / "smollm2_0.2.yaml")
    return PipelineContext(config=config, output_dir=tmp_path)


class Recorder:
    """Records (hook label, event, context, kwargs) into a shared list."""

    def __init__(self, label: str, calls: list, events: tuple[str, ...] = tuple(e.value for e in Event)):
        self.label, self.calls = label, calls
        for event in events:
            setattr(self, event, self._make(event))

    def _make(self, event: str):
        def method(context, **kwargs):
            self.calls.append((self.label, event, context, kwargs))

        return method


class Failing:
    def after_prune(self, context, **kwargs):
        raise RuntimeError("disk full")


def test_emit_calls_hooks_in_config_order_with_kwargs(context: PipelineContext):
    calls: list = []
    runner = HookRunner(
        [
            ActiveHook("second", "raise", Recorder("b", calls)),
            ActiveHook("first", "raise", Recorder("a", calls)),
            ActiveHook("third", "raise", Recorder("c", calls)),
        ]
    )
    runner.emit(Event.BEFORE_PRUNE, context, step=1, extra="x")
    assert [(label, event) for label, event, _, _ in calls] == [
        ("b", "before_prune"),
        ("a", "before_prune"),
        ("c", "before_prune"),
    ]
    assert all(ctx is context and kwargs == {"step": 1, "extra": "x"} for _, _, ctx, kwargs in calls)


def test_emit_skips_hooks_without_the_method(context: PipelineContext):
    calls: list = []
    runner = HookRunner(
        [
            ActiveHook("only-save", "raise", Recorder("save", calls, ("after_save",))),
            ActiveHook("all", "raise", Recorder("all", calls)),
            ActiveHook("base", "raise", Hook()),  # the base class's methods do nothing
        ]
    )
    for event in Event:
        runner.emit(event, context)
    assert [(label, event) for label, event, _, _ in calls] == [
        ("all", "before_prune"),
        ("all", "after_prune"),
        ("save", "after_save"),
        ("all", "after_save"),
    ]


def test_failing_hook_with_raise_stops_the_run(context: PipelineContext):
    calls: list = []
    runner = HookRunner(
        [
            ActiveHook("my_hooks:Failing", "raise", Failing()),
            ActiveHook("later", "raise", Recorder("l", calls)),
        ]
    )
    runner.emit(Event.BEFORE_PRUNE, context)  # Failing has no before_prune: nothing happens
    with pytest.raises(HookError) as info:
        runner.emit(Event.AFTER_PRUNE, context)
    error = info.value
    assert str(error) == "hook 'my_hooks:Failing' failed at after_prune: RuntimeError: disk full"
    assert error.exit_code == 1 and isinstance(error, UserError)
    assert isinstance(error.__cause__, RuntimeError)
    assert [event for _, event, _, _ in calls] == ["before_prune"]  # the later hook did not run


def test_failing_hook_with_warn_logs_and_goes_on(context: PipelineContext, caplog: pytest.LogCaptureFixture):
    calls: list = []
    runner = HookRunner(
        [ActiveHook("flaky", "warn", Failing()), ActiveHook("later", "raise", Recorder("l", calls))]
    )
    with caplog.at_level(logging.WARNING, logger="pruning.hooks.runner"):
        runner.emit(Event.AFTER_PRUNE, context)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "hook 'flaky' failed at after_prune: RuntimeError: disk full" in warnings[0].getMessage()
    assert "on_error: warn" in warnings[0].getMessage()
    assert [(label, event) for label, event, _, _ in calls] == [("l", "after_prune")]


def test_from_config_keeps_order_and_on_error(isolated_imports: Path):
    name = plugin_module(isolated_imports, "hooks_plugin_order")
    runner = HookRunner.from_config(
        (HookConfig(f"{name}:Plugin", {"greeting": "one"}, "warn"), HookConfig("analysis"))
    )
    assert [(h.name, h.on_error) for h in runner.hooks] == [(f"{name}:Plugin", "warn"), ("analysis", "raise")]
    assert isinstance(runner.hooks[1].instance, AnalysisHook)


class Exiting:
    def after_prune(self, context, **kwargs):
        sys.exit(0)


class Interrupting:
    def after_prune(self, context, **kwargs):
        raise KeyboardInterrupt


class DiskFull:
    def after_prune(self, context, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("on_error", ["raise", "warn"])
def test_sys_exit_in_a_hook_is_a_failure_not_an_exit(context: PipelineContext, on_error: str, caplog):
    runner = HookRunner([ActiveHook("quitter", on_error, Exiting())])
    if on_error == "raise":
        with pytest.raises(HookError, match=r"'quitter' failed at after_prune: it called sys.exit\(0\)"):
            runner.emit(Event.AFTER_PRUNE, context)
    else:
        runner.emit(Event.AFTER_PRUNE, context)  # warned, and the run goes on to save
        assert "it called sys.exit(0)" in caplog.text


@pytest.mark.parametrize("on_error", ["raise", "warn"])
def test_interrupt_and_full_disk_stop_the_run_whatever_on_error(context: PipelineContext, on_error: str):
    with pytest.raises(KeyboardInterrupt):
        HookRunner([ActiveHook("ctrl-c", on_error, Interrupting())]).emit(Event.AFTER_PRUNE, context)
    with pytest.raises(OSError, match="No space left"):
        HookRunner([ActiveHook("full", on_error, DiskFull())]).emit(Event.AFTER_PRUNE, context)


class NearMiss:
    def before_prun(self, context, **kwargs):
        pass


class PrefixOnly:
    def on_error(self, context, **kwargs):
        pass


class Helpers(Hook):
    """Ordinary helper methods are fine."""

    def summarise(self):
        pass

    def after_save(self, context, **kwargs):
        pass


def test_methods_that_look_like_events_are_refused_when_built():
    with pytest.raises(UserError, match=r"'before_prun' looks like an event .*did you mean 'before_prune'"):
        instantiate(NearMiss, {}, "hooks[0] x")
    with pytest.raises(
        UserError, match=r"'on_error' looks like an event but is not one; events are before_prune"
    ):
        instantiate(PrefixOnly, {}, "hooks[0] x")
    assert isinstance(instantiate(Helpers, {}, "hooks[0] x"), Helpers)


def test_constructor_raising_anything_is_a_user_error():
    class Boom:
        def __init__(self):
            raise sys.exit(3)

    with pytest.raises(UserError, match=r"hooks\[2\] b: its constructor raised SystemExit: 3"):
        instantiate(Boom, {}, "hooks[2] b")
