"""The command-line tools keep freed heap memory in the process (glibc mallopt); the user's own allocator
settings and the opt-out variable win. Run in child processes: the setting is process-wide."""

import os
import subprocess
import sys

import pytest

_PROBE = "from medmap_fast._memory import keep_freed_memory; print(keep_freed_memory())"


def _probe(**env_changes):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "LD_PRELOAD", "MEDMAP_FAST_KEEP_FREED_MEMORY")}
    env.update(env_changes)
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_applied_by_default_on_glibc():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert _probe() == "True"


@pytest.mark.parametrize("env", [{"MEDMAP_FAST_KEEP_FREED_MEMORY": "0"}, {"MALLOC_TRIM_THRESHOLD_": "1000000"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1000000"},
                                 {"LD_PRELOAD": "/nonexistent/libjemalloc.so.2"}])
def test_user_choices_win(env):
    assert _probe(**env) == "False"


def test_only_the_commands_that_train_and_infer_apply_it(monkeypatch):
    import medmap_fast._memory as memory
    from medmap_fast import cli

    calls = []
    monkeypatch.setattr(memory, "keep_freed_memory", lambda: calls.append(1) or True)
    with pytest.raises(SystemExit):
        cli.main(["evaluate", "--help"])
    assert calls == [1]
    cli.main(["--help"])
    assert calls == [1]
