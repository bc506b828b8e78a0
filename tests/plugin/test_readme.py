"""Every code block of the README is checked, each by its kind.

- ``python``: a block with tests runs as a test file (it must pass); a block whose first line
  is ``# examples/FILE`` must be a verbatim part of that file; any other runs as a script.
- ``sh``, and the commands in ``yaml`` and ``console`` blocks: pytest's and nsbox's options
  must exist, ``pip install`` targets and extras must be this project's, paths in the
  repository must exist, and every other program must be one the README is known to name.
- ``console``: ``nsbox doctor``'s output names the capabilities this version checks, in order.
- ``ini``: used as an inner run's pytest.ini, every key reaches pytest with its value.
- ``text``: samples of output, compared with what the plugin prints.

A block of a kind this file does not know fails ``test_every_block_is_checked``.
"""

from __future__ import annotations

import configparser
import re
import shlex
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pytest_nsbox import probe

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
KINDS = ("python", "sh", "console", "yaml", "ini", "text")
# Programs a README command may name that these tests cannot run here (image builders, ...),
# and shell words: checked for shell syntax only.
OTHER_PROGRAMS = {"docker", "podman", "skopeo", "buildah", "mmdebstrap", "git", "cd", "."}


@dataclass(frozen=True)
class Block:
    kind: str
    text: str
    line: int

    @property
    def id(self) -> str:
        return f"{self.kind}-line-{self.line}"


def _blocks() -> list[Block]:
    text = README.read_text()
    found = []
    for match in re.finditer(r"^```(\w*)\n(.*?)^```$", text, flags=re.M | re.S):
        found.append(Block(match[1], match[2], text.count("\n", 0, match.start()) + 1))
    return found


BLOCKS = _blocks()


def _of(kind: str, where: object = None) -> list[object]:
    chosen = [b for b in BLOCKS if b.kind == kind and (where is None or where(b))]  # type: ignore[operator]
    return [pytest.param(b, id=b.id) for b in chosen]


def test_every_block_is_checked() -> None:
    unknown = [f"line {b.line}: ```{b.kind}" for b in BLOCKS if b.kind not in KINDS]
    assert not unknown, f"README blocks of a kind test_readme.py does not check: {unknown}"
    assert len([b for b in BLOCKS if b.kind == "python"]) >= 3


# ------------------------------------------------------------------------------- python


def _mirrors(block: Block) -> bool:
    return block.text.startswith("# examples/")


@pytest.mark.parametrize("block", _of("python", _mirrors))
def test_a_block_from_the_examples_is_verbatim_in_its_file(block: Block) -> None:
    first, _, body = block.text.partition("\n")
    source = ROOT / first.removeprefix("# ")
    assert body.strip() in source.read_text(), f"README line {block.line}: not a verbatim part of {source}"


@pytest.mark.requires("boxes")
@pytest.mark.parametrize("block", _of("python", lambda b: "def test_" in b.text and not _mirrors(b)))
def test_readme_test_block_passes(block: Block, pytester: pytest.Pytester) -> None:
    source = block.text
    prefix = "" if "import pytest" in source else "import pytest\n\n"
    pytester.makepyfile(test_readme_block=prefix + source)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--nsbox-strict", timeout=180)
    tests = len(re.findall(r"^def test_", source, flags=re.M))
    result.assert_outcomes(passed=tests)


@pytest.mark.requires("boxes")
@pytest.mark.parametrize("block", _of("python", lambda b: "def test_" not in b.text and not _mirrors(b)))
def test_readme_script_block_runs(block: Block, tmp_path: Path) -> None:
    script = tmp_path / "block.py"
    script.write_text(block.text)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------------ commands


@pytest.fixture(scope="module")
def pytest_help(tmp_path_factory: pytest.TempPathFactory) -> str:
    where = tmp_path_factory.mktemp("help")
    return subprocess.run(
        [sys.executable, "-m", "pytest", "--help"], cwd=where, capture_output=True, text=True, check=True
    ).stdout


def _nsbox_help(command: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "pytest_nsbox", command, "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"`nsbox {command}` is not a command: {result.stderr}"
    return result.stdout


def _commands(script: str) -> list[list[str]]:
    """The simple commands of a shell script: comments dropped, ``&&`` chains split."""
    commands = []
    for line in script.splitlines():
        words = shlex.split(line, comments=True)
        while words:
            if "&&" in words:
                cut = words.index("&&")
                commands.append(words[:cut])
                words = words[cut + 1 :]
            else:
                commands.append(words)
                words = []
    return commands


def _options(words: list[str]) -> list[str]:
    """The options ``words`` name: ``--long`` without its ``=value``; a short one without what
    follows its letter (``-rs`` is ``-r s``, ``-vv`` is ``-v`` twice)."""
    options = [word.split("=", 1)[0] for word in words if word.startswith("-") and word != "--"]
    return [option if option.startswith("--") else option[:2] for option in options]


def check_command(words: list[str], pytest_help: str) -> None:
    """Fail unless ``words`` is a command this project's README can stand behind."""
    if words[:2] == ["sudo", "-E"]:
        words = words[2:]
    words = [re.sub(r"^\$\(command -v (\w+)\)$", r"\1", word) for word in words]
    program = words[0]
    if program in ("python", "python3") and words[1:3] == ["-m", "pip"]:
        program, words = "pip", ["pip", *words[3:]]
    if program in ("python", "python3") and words[1:3] == ["-m", "pytest"]:
        program, words = "pytest", ["pytest", *words[3:]]
    if program == "pytest":
        for option in _options(words[1:]):
            assert re.search(rf"^\s+(-\w, )?{re.escape(option)}\b", pytest_help, flags=re.M), (
                f"{words}: pytest has no option {option}"
            )
        for path in (word for word in words[1:] if word.endswith("/")):
            assert (ROOT / path).is_dir(), f"{words}: no directory {path} in the repository"
    elif program == "pip":
        assert words[1] == "install", words
        extras = set(re.findall(r"^(\w+) = \[", (ROOT / "pyproject.toml").read_text(), flags=re.M))
        for target in words[2:]:
            match = re.fullmatch(r"\.(?:\[(\w+)\])?", target)
            if match:
                assert match[1] is None or match[1] in extras, f"{words}: no extra {match[1]!r}"
            else:
                assert target == "pytest-xdist", (
                    f"{words}: installs {target}, which the README never explains"
                )
    elif program == "nsbox":
        assert len(words) > 1, words
        help_text = _nsbox_help(words[1])
        for option in _options(words[2:]):
            assert option in help_text, f"{words}: nsbox {words[1]} has no option {option}"
    elif program in ("python3", "python") and words[1:3] == ["-m", "venv"]:
        pass
    else:
        assert program in OTHER_PROGRAMS, f"{words}: a program test_readme.py does not know"


def _syntax_ok(script: str) -> None:
    result = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("block", _of("sh"))
def test_sh_block_commands_are_real(block: Block, pytest_help: str) -> None:
    _syntax_ok(block.text)
    for words in _commands(block.text):
        check_command(words, pytest_help)


def _yaml_commands(text: str) -> list[str]:
    """The shell commands of a CI file: ``run:`` steps and ``script:`` list items."""
    commands = re.findall(r"^\s*- run: (.+)$", text, flags=re.M)
    for script in re.findall(r"^(\s*)script:\n((?:\1\s+- .+\n)+)", text, flags=re.M):
        commands += [line.strip().removeprefix("- ") for line in script[1].splitlines()]
    return commands


@pytest.mark.parametrize("block", _of("yaml"))
def test_ci_file_commands_are_real(block: Block, pytest_help: str) -> None:
    commands = _yaml_commands(block.text)
    assert any("pytest" in command and "--nsbox-strict" in command for command in commands), commands
    assert any(re.search(r"nsbox\)?\"? doctor", command) for command in commands), commands
    for command in commands:
        _syntax_ok(command)
        for words in _commands(command):
            check_command(words, pytest_help)


@pytest.mark.parametrize("block", _of("console"))
def test_console_block_shows_real_commands_and_output(block: Block, pytest_help: str) -> None:
    command, *output = block.text.splitlines()
    assert command.startswith("$ "), command
    check_command(shlex.split(command[2:]), pytest_help)
    if command == "$ nsbox doctor":
        names = [re.split(r"\s{2,}", line)[1] for line in output]  # a name may hold a space
        assert names == [c.name for c in probe.capabilities()] + ["box"]
        assert all(line.split()[0] in ("ok", "FAIL", "--") for line in output)


# ------------------------------------------------------------------------------------ ini


@pytest.mark.requires("boxes")
@pytest.mark.parametrize("block", _of("ini"))
def test_ini_block_configures_the_plugin(block: Block, pytester: pytest.Pytester) -> None:
    parser = configparser.ConfigParser()
    parser.read_string(block.text)
    settings = dict(parser["pytest"])
    pytester.makefile(".ini", pytest=block.text)
    if "nsbox_image" in settings:  # a small root filesystem tarball stands for the image
        image = pytester.path / settings["nsbox_image"]
        image.parent.mkdir(parents=True, exist_ok=True)
        (pytester.path / "rootfs" / "etc").mkdir(parents=True)
        (pytester.path / "rootfs" / "etc" / "os-release").write_text("ID=tiny\n")
        with tarfile.open(image, "w") as archive:
            archive.add(pytester.path / "rootfs", arcname=".")
    # With an image, the test asks for a box: the image is imported when the first box is
    # (a session without box tests leaves the cache alone), and the box shows it is that image.
    uses_box = "nsbox_image" in settings
    arguments = "request, nsbox" if uses_box else "request"
    check_box = 'assert nsbox.read_text("/etc/os-release") == "ID=tiny\\n"' if uses_box else "pass"
    pytester.makepyfile(
        f"""
        SETTINGS = {settings!r}

        def test_every_key_reaches_pytest({arguments}):
            for key, value in SETTINGS.items():
                got = request.config.getini(key)
                assert str(got).lower() == value.lower(), (key, got)
            {check_box}
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(passed=1)
    if "nsbox_cache" in settings:  # the image was imported there, relative to the ini file
        assert any((pytester.path / settings["nsbox_cache"]).iterdir())


# ----------------------------------------------------------------------------------- text


def _text_blocks(marker: str) -> list[object]:
    return _of("text", lambda b: marker in b.text)


def test_every_text_block_is_checked() -> None:
    markers = ("nsbox: kept boxes", "processes at the failure", "FAIL root", _ERROR_TREE, "would remove: ")
    unchecked = [b.line for b in BLOCKS if b.kind == "text" and not any(m in b.text for m in markers)]
    assert not unchecked, f"README text blocks no test checks, at lines {unchecked}"


_ERROR_TREE = "NsboxError\n├── "


@pytest.mark.parametrize("block", _text_blocks(_ERROR_TREE))
def test_the_error_tree_names_every_error_class(block: Block) -> None:
    import pytest_nsbox

    drawn = set(re.findall(r"\b(\w+Error)\b", block.text))
    ours = {
        name
        for name in pytest_nsbox.__all__
        if isinstance(getattr(pytest_nsbox, name), type)
        and issubclass(getattr(pytest_nsbox, name), pytest_nsbox.NsboxError)
    }
    assert ours <= drawn, f"missing from the README's error tree: {sorted(ours - drawn)}"


class _Reporter:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def section(self, title: str) -> None:
        self.lines.append(f"=== {title} ===")

    def write_line(self, line: str) -> None:
        self.lines.append(line)


@pytest.mark.parametrize("block", _text_blocks("nsbox: kept boxes"))
def test_the_kept_boxes_summary_is_what_pytest_prints(block: Block, pytestconfig: pytest.Config) -> None:
    from types import SimpleNamespace

    from pytest_nsbox import plugin

    shown = block.text.splitlines()
    box_id, hostname, address, test = shown[1].split()
    box: Any = SimpleNamespace(id=box_id, hostname=hostname, ip=address)  # what the summary reads
    reporter = _Reporter()
    pytestconfig.stash[plugin.KEPT] = [(test, box)]
    try:
        plugin.pytest_terminal_summary(reporter, pytestconfig)
    finally:
        del pytestconfig.stash[plugin.KEPT]
    assert re.sub(r"=+", "=", shown[0]) == re.sub(r"=+", "=", reporter.lines[0])
    assert shown[1:] == reporter.lines[1:]


@pytest.mark.parametrize("block", _text_blocks("would remove: "))
def test_the_gc_dry_run_sample_is_what_nsbox_gc_prints(
    block: Block, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The lines as ``nsbox gc`` prints them; each in the form its maker writes it (the real
    ones are compared in tests/integration/test_gc.py)."""
    from pytest_nsbox import cli, kept, reaper

    shown = block.text.splitlines()
    items = [line.removeprefix("would remove: ") for line in shown[:-1]]
    patterns = [
        r"kept box (\w+) \([\w-]+, init pid (\d+), from \S+\)",
        r"IP lease [\d.]+ of box (\w+) \(held by pid (\d+)\)",
        r"bridge nsb\w+ \(nobody uses it\)",
    ]
    matches = [re.fullmatch(pattern, item) for item, pattern in zip(items, patterns, strict=True)]
    assert all(matches), items
    assert matches[0] and matches[1] and matches[0].groups() == matches[1].groups()  # the box's lease
    monkeypatch.setattr(kept, "inits", list)
    monkeypatch.setattr(kept, "end_all", lambda dry_run: items[:1])
    monkeypatch.setattr(reaper, "sweep", lambda dry_run: items[1:])
    assert cli.gc_command(dry_run=True) == 0
    assert capsys.readouterr().out.splitlines() == shown


DOCTOR = [sys.executable, "-m", "pytest_nsbox", "doctor", "--no-box"]


@pytest.mark.requires("boxes")
@pytest.mark.parametrize("block", _text_blocks("FAIL root"))
def test_doctor_in_an_unprivileged_container_says_so(block: Block) -> None:
    # Root without CAP_SYS_ADMIN is what a container that is not privileged runs as.
    result = subprocess.run(
        ["setpriv", "--inh-caps=-sys_admin", "--bounding-set=-sys_admin", *DOCTOR],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    printed = (result.stdout + result.stderr).splitlines()
    for line in block.text.splitlines():
        assert line in printed, f"`nsbox doctor` did not print {line!r}:\n{result.stdout}{result.stderr}"


FAILING_TEST = """
import pytest


@pytest.mark.nsbox(hostname="web", limits={"pids": 20, "memory": "64M"})
def test_fails(nsbox):
    nsbox.run("mkdir -p /srv/app && echo 'port = 8080' > /srv/app/app.conf")
    nsbox.run("echo 'app: starting on port 8080' > /var/log/app.log")
    nsbox.run("echo 'app: bind: address already in use' >> /var/log/app.log")
    nsbox.run("echo 'maintenance tonight' >> /etc/motd && rm /etc/issue.net")
    nsbox.spawn("sleep 300")
    nsbox.spawn("sh -c 'sleep 200 & sleep 100'")
    nsbox.run("for i in $(seq 1 40); do echo line $i; done")
    nsbox.run("echo 'config loaded'; echo 'error: port 8080 already in use' >&2; exit 3")
    nsbox.run("test -e /run/app.pid || echo 'no pid file: app not running' >&2")
    assert False
"""


def _shape(line: str) -> str:
    """A report line with what changes from run to run (ids, pids, sizes, times) blanked."""
    line = re.sub(r"\b[0-9a-f]{8}\b", "ID", line)
    return re.sub(r"\d+(\.\d+)?", "N", line).rstrip()


@pytest.mark.requires("boxes")
@pytest.mark.parametrize("block", _text_blocks("processes at the failure"))
def test_the_failure_report_sample_is_what_a_failing_test_shows(
    block: Block, pytester: pytest.Pytester
) -> None:
    pytester.makepyfile(test_fails=FAILING_TEST)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(failed=1)
    printed = {_shape(line) for line in result.outlines}
    process_tree = re.compile(r"^\s+\d+ \[\d+\] ")
    for line in block.text.splitlines():
        if process_tree.match(line):
            continue  # how a shell forks differs between shells
        assert _shape(line) in printed, f"the failure report has no line like {line!r}:\n{result.stdout}"
