"""run_as: which users a manifest may name, and what eventrun checks of them at start."""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from eventrun.app import serve_problems
from eventrun.engine.api import Status
from eventrun.engine.envelope import Envelope, new_id
from eventrun.engine import instances
from eventrun.engine.instances import InstancePool, Spec
from eventrun.engine import users
from eventrun.engine.errors import ManifestError
from eventrun.engine.manifest import load_manifest
from eventrun.engine.users import RunAs, UnknownUser, run_as, run_as_warnings, unreadable

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="only root can become another user")


def other_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("this machine has no user 'nobody'")


@pytest.fixture
def public() -> Iterator[Path]:
    """A folder any user may enter (the tests' own tmp_path is root's alone)."""
    folder = Path(tempfile.mkdtemp(prefix="eventrun-users-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


def manifest(tmp_path: Path, text: str) -> Path:
    (tmp_path / "f.py").write_text("def main_handler(event, context):\n    return None\n")
    path = tmp_path / "eventrun.toml"
    path.write_text(f'[functions.f]\nhandler = "f.py:main_handler"\n{text}')
    return path


def refusal(path: Path) -> str:
    """What `eventrun serve` says of the manifest at `path`, which it must refuse."""
    with pytest.raises(ManifestError) as caught:
        load_manifest(path, check=serve_problems)
    return str(caught.value)


def test_the_servers_own_user_and_none_need_no_change() -> None:
    assert run_as("") is None
    assert run_as(pwd.getpwuid(os.geteuid()).pw_name) is None


def test_another_user_comes_with_its_ids_groups_and_login_environment() -> None:
    entry = other_user()
    if entry.pw_uid == os.geteuid():
        pytest.skip("the tests run as nobody")
    user = run_as("nobody")
    assert user == RunAs("nobody", entry.pw_uid, entry.pw_gid, tuple(os.getgrouplist("nobody", entry.pw_gid)), entry.pw_dir)
    assert user.environment() == {"HOME": entry.pw_dir, "USER": "nobody", "LOGNAME": "nobody"}


def test_a_user_that_does_not_exist_is_refused_at_start_naming_its_line(tmp_path: Path) -> None:
    path = manifest(tmp_path, 'run_as = "no-such-user-here"\n')
    assert refusal(path) == f"{path}: functions.f.run_as: no user named 'no-such-user-here' on this machine"
    assert load_manifest(path).functions["f"].run_as == "no-such-user-here", "other commands read it"


def test_server_run_as_is_every_functions_unless_one_sets_its_own(tmp_path: Path) -> None:
    path = manifest(tmp_path, 'run_as = ""\n[functions.g]\nhandler = "f.py:main_handler"\n[server]\nrun_as = "nobody"\n')
    read = load_manifest(path)
    assert users.function_user(read, read.functions["f"]) == ""  # the server's own user
    assert users.function_user(read, read.functions["g"]) == "nobody"


def test_another_user_needs_a_server_started_as_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = other_user()
    path = manifest(tmp_path, '[server]\nrun_as = "nobody"\n')
    uid = 4242 if entry.pw_uid != 4242 else 4243
    monkeypatch.setattr(users.os, "geteuid", lambda: uid)
    refused = refusal(path)
    assert refused.startswith(f"{path}: server.run_as: running as 'nobody' needs a server started as root; it runs as ")
    assert refused.endswith(f"uid {uid}")


@needs_root
def test_a_handler_its_user_cannot_read_is_refused_at_start(public: Path) -> None:
    other_user()
    path = manifest(public, 'run_as = "nobody"\n')
    path.chmod(0o600)
    (public / "f.py").chmod(0o644)
    load_manifest(path, check=serve_problems)
    (public / "f.py").chmod(0o600)
    assert refusal(path) == (
        f"{path}: functions.f.handler: user 'nobody' (its run_as) cannot read {public / 'f.py'}: give that user read"
        " access to the file, and to the folders above it"
    )


@needs_root
def test_what_a_user_cannot_read_is_asked_of_the_kernel_as_that_user(public: Path) -> None:
    user = run_as(other_user().pw_name)
    assert user is not None
    tmp_path = public
    (tmp_path / "open.txt").write_text("x")
    (tmp_path / "open.txt").chmod(0o644)
    (tmp_path / "closed.txt").write_text("x")
    (tmp_path / "closed.txt").chmod(0o600)
    (tmp_path / "shut").mkdir(mode=0o700)
    (tmp_path / "shut" / "inside.txt").write_text("x")
    (tmp_path / "shut" / "inside.txt").chmod(0o644)
    paths = [str(tmp_path / name) for name in ("open.txt", "closed.txt", "shut", "shut/inside.txt", "missing")]
    assert unreadable(user, paths) == paths[1:]
    assert unreadable(user, [str(tmp_path)]) == []
    assert unreadable(user, [str(tmp_path / "open.txt")]) == []


INSTANCE_HANDLER = """\
import os

def main_handler(event, context):
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "env": [os.environ.get(name) for name in ("HOME", "USER", "LOGNAME", "GREETING")],
        "no_new_privileges": fields["NoNewPrivs"].strip(),
    }
"""


@needs_root
@pytest.mark.parametrize("spawner", [True, False], ids=["from the spawner", "by the server"])
async def test_an_instance_gets_its_users_login_environment_and_no_new_privileges(
    tmp_path: Path, spawner: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Root itself stands for the user: what changes with another one is the e2e tests' (test_run_as_e2e.py).
    (tmp_path / "f.py").write_text(INSTANCE_HANDLER)
    user = RunAs("someone", 0, 0, (0,), "/home/someone")
    monkeypatch.setattr(instances, "instance_user", lambda name: user if name == "someone" else None)
    pool = InstancePool(max_instances=2, idle_timeout=300, kill_grace=1, base_env=dict(os.environ, HOME="/root"))
    if spawner:
        await pool.start()
    try:
        spec = Spec(
            function="f", handler=f"{tmp_path}/f.py:main_handler", cwd=tmp_path, environment={"LOGNAME": "mine"}, run_as="someone"
        )
        instance = await pool.acquire(spec)
        envelope = orjson.dumps({"specversion": "1.0", "id": "e", "source": "/t", "type": "t", "data": {}})
        outcome = await instance.run("r1", envelope, 10, lambda lines: None, 1)
        assert outcome.status is Status.FINISHED, outcome
        assert (outcome.result["ppid"] == os.getpid()) is not spawner  # the fallback: started by the server
        assert outcome.result["env"] == ["/home/someone", "someone", "mine", None]  # the function's environment wins
        assert outcome.result["no_new_privileges"] == "1"
        pool.keep_warm(instance, keep=False)
    finally:
        await pool.stop()


async def test_a_user_deleted_since_the_start_is_looked_up_at_each_instance_start(tmp_path: Path) -> None:
    # It used to be looked up once, at the function's first run: instances went on starting with
    # its uid, which the next user made could be given.
    pool = InstancePool(max_instances=2, idle_timeout=300, kill_grace=1, base_env={})
    spec = Spec(function="f", handler=f"{tmp_path}/f.py:main_handler", cwd=tmp_path, environment={}, run_as="gone-user-here")
    with pytest.raises(UnknownUser, match="^no user named 'gone-user-here' on this machine$"):
        await pool.acquire(spec)
    await pool.stop()


async def test_a_run_whose_user_is_gone_fails_instance_start_failed_naming_it(start_engine) -> None:
    engine = await start_engine(
        '[server]\ndata_dir = "data"\n[functions.f]\nhandler = "f.py:main_handler"\nasync_execution = false\n'
        'run_as = "gone-user-here"\n',
        {"f.py": "def main_handler(event, context):\n    return 1\n"},
    )
    envelope = Envelope(id=new_id(), source="/http/f", type="t", function="f", trigger="http", data={})
    answer = await engine.call(envelope)
    assert (answer.status, answer.error_type, answer.error_message) == (
        Status.FAILED,
        "InstanceStartFailed",
        "no instance could be started: no user named 'gone-user-here' on this machine",
    ), answer


@needs_root
def test_a_manifest_a_functions_user_can_read_or_change_is_refused_at_start(public: Path) -> None:
    # It holds the ui_token and every function's environment; changed, it could set the
    # function's own run_as to the server's user for the next start.
    other_user()
    path = manifest(public, 'run_as = "nobody"\nenvironment = { DB_PASSWORD = "secret" }\n')
    (public / "f.py").chmod(0o644)
    path.chmod(0o644)
    assert refusal(path) == (
        f"{path}: functions.f.run_as: user 'nobody' can read the manifest {path}, which holds the server's secrets"
        f" (the ui_token, every function's environment): make it readable by the server's user alone (chmod 600 {path})"
    )
    path.chmod(0o600)
    public.chmod(0o777)
    assert refusal(path) == (
        f"{path}: functions.f.run_as: user 'nobody' (functions.f.run_as) can rename {path} (it can write to {public}),"
        f" and so change the manifest {path} (its own run_as among it) for the server's next start: keep it, and the"
        " folders above it, writable by the server's user alone"
    )
    public.chmod(0o755)
    assert load_manifest(path, check=serve_problems).functions["f"].run_as == "nobody"


@needs_root
def test_another_functions_code_a_functions_user_can_change_is_refused_at_start(public: Path) -> None:
    # Its folder is first on that function's sys.path: a module put there runs as its user (root).
    other_user()
    shared = public / "shared"
    shared.mkdir(mode=0o755)
    (shared / "g.py").write_text("import csv\ndef main_handler(event, context):\n    return None\n")
    path = manifest(public, f'run_as = "nobody"\n[functions.g]\nhandler = "shared/g.py:main_handler"\n')
    path.chmod(0o600)
    (public / "f.py").chmod(0o644)
    load_manifest(path, check=serve_problems)
    shared.chmod(0o1777)  # (as /tmp is: anyone may add a file)
    assert refusal(path) == (
        f"{path}: functions.g.handler: user 'nobody' (functions.f.run_as) can write to {shared}, in this function's"
        " code (its handler's folder is first on its sys.path): code put there would run as 'root'; let no user but"
        " 'root' and the server's write to that folder, to what it holds or to the folders above it"
    )


@needs_root
@pytest.mark.parametrize("way", ["grandparent", "sibling module", "pycache", "pythonpath", "data_dir's parent"])
def test_each_way_a_functions_user_could_change_what_another_runs_is_refused_at_start(public: Path, way: str) -> None:
    # Each was found to let a function run as nobody run code as root (or take over the store).
    entry = other_user()
    code = public / "code" / "g"
    code.mkdir(parents=True, mode=0o755)
    (code / "g.py").write_text("import helper\ndef main_handler(event, context):\n    return None\n")
    (code / "helper.py").write_text("")
    (code / "__pycache__").mkdir(mode=0o755)
    elsewhere = public / "elsewhere"
    elsewhere.mkdir(mode=0o755)
    data = public / "store" / "data"
    data.mkdir(parents=True, mode=0o700)
    g = f'[functions.g]\nhandler = "code/g/g.py:main_handler"\nenvironment = {{ PYTHONPATH = "{elsewhere}" }}\n'
    path = manifest(public, f'run_as = "nobody"\n{g}[server]\ndata_dir = "{data}"\n')
    path.chmod(0o600)
    (public / "f.py").chmod(0o644)
    load_manifest(path, check=serve_problems)
    at, how = {
        "grandparent": ("functions.g.handler", lambda: os.chown(public / "code", entry.pw_uid, -1)),
        "sibling module": ("functions.g.handler", lambda: (code / "helper.py").chmod(0o666)),
        "pycache": ("functions.g.handler", lambda: (code / "__pycache__").chmod(0o777)),
        "pythonpath": ("functions.g.environment", lambda: elsewhere.chmod(0o777)),
        "data_dir's parent": ("server.data_dir", lambda: os.chown(data.parent, entry.pw_uid, -1)),
    }[way]
    how()
    refused = refusal(path)
    assert refused.startswith(f"{path}: {at}: user 'nobody' (functions.f.run_as) can "), refused
    assert len(refused.splitlines()) == 1, refused


def test_functions_of_other_users_and_no_ui_token_are_warned_of(tmp_path: Path) -> None:
    entry = other_user()
    if entry.pw_uid == os.geteuid():
        pytest.skip("the tests run as nobody")
    path = manifest(tmp_path, 'run_as = "nobody"\n')
    warned = "functions run as 'nobody' can call this server's API, which takes no ui_token"
    assert any(warning.startswith(warned) for warning in run_as_warnings(load_manifest(path)))
    path.write_text(path.read_text() + '[server]\nui_token = "t0k3n"\n')
    assert not any(warning.startswith(warned) for warning in run_as_warnings(load_manifest(path)))
