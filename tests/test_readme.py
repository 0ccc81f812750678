"""The README stays true: its Python blocks run, its commands parse, its serve walkthrough works.

Each ```python block runs as written in a fresh interpreter, in an empty
folder, so a block that uses a name it does not define fails here as it
would for a newcomer. The few blocks that need objects from the reader's own
program (a model built for a cluster, training data) get a prelude below,
keyed by their section; every other change to a block is listed in
`SUBSTITUTIONS` (a free port instead of 8501, so that tests can run side by
side). Every `tandem ...` command in a ```bash block must parse, and every
flag in an inline `tandem ...` must exist. The serve walkthrough (save a
model, `tandem serve`, the curl lines) runs against a real server that the
test starts and stops.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

from _http import cli_serve
from keras_tandem import cli

README = Path(__file__).resolve().parents[1] / "README.md"
CLUSTER = "## Train on a cluster while serving on the chief"
SERVE = "## Serve over HTTP (TensorFlow Serving's REST API)"

# Objects a block takes from the reader's own program: the smallest stand-ins.
PRELUDES = {
    CLUSTER: '''
import keras
import numpy as np

x = np.random.rand(256, 8).astype("float32")
y = np.random.randint(0, 2, size=256)


def build_and_compile_model():
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(2, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy")
    return model
''',
}
# (section, as written, as run): a free port, folders under the test's own.
SUBSTITUTIONS = [
    (SERVE, "port=8501", "port=0"),
    (CLUSTER, '"/shared/ckpt"', '"ckpt"'),
]


class Block(NamedTuple):
    section: str
    line: int
    lang: str
    code: str


def _blocks(lang: str) -> list[Block]:
    blocks, section, fence = [], "", None
    for number, line in enumerate(README.read_text().splitlines(), 1):
        if fence is None and line.startswith("## "):
            section = line.strip()
        if fence is None and line.startswith("```"):
            fence = Block(section, number + 1, line[3:].strip(), "")
        elif fence is not None and line.startswith("```"):
            if fence.lang == lang:
                blocks.append(fence)
            fence = None
        elif fence is not None:
            fence = fence._replace(code=fence.code + line + "\n")
    return blocks


def _as_run(block: Block) -> str:
    code = block.code
    for section, written, run in SUBSTITUTIONS:
        if section == block.section:
            code = code.replace(written, run)
    return PRELUDES.get(block.section, "") + code


def _run_python(code: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow")
    env.pop("TF_CONFIG", None)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


PYTHON_BLOCKS = _blocks("python")


def test_the_readme_has_the_blocks_this_file_knows_about():
    sections = {b.section for b in PYTHON_BLOCKS}
    assert len(PYTHON_BLOCKS) >= 5 and SERVE in sections
    assert any("port=8501" in b.code for b in PYTHON_BLOCKS if b.section == SERVE)


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=lambda b: f"README.md:{b.line}")
def test_python_block_runs_as_written(block, tmp_path):
    proc = _run_python(_as_run(block), tmp_path)
    assert proc.returncode == 0, (f"README.md line {block.line} ({block.section}) failed:\n"
                                  + proc.stdout[-2000:] + proc.stderr[-4000:])


def _tandem_commands(text: str) -> list[list[str]]:
    """Each `tandem ...` command of a shell text, split into words, comments dropped."""
    commands = []
    for line in text.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.commenters = "#"
        command: list[str] = []
        for word in [*lexer, ";"]:
            if word in {";", "&&", "||", "|", "&"}:
                if command[:1] == ["tandem"]:
                    commands.append(command[1:])
                command = []
            else:
                command.append(word)
    return commands


def test_every_tandem_command_of_the_bash_blocks_parses():
    commands = [c for b in _blocks("bash") for c in _tandem_commands(b.code)]
    assert commands  # the quick start has one at least
    parser = cli.build_parser()
    for argv in commands:
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"`tandem {shlex.join(argv)}` from README.md does not parse")


def _help(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        cli.build_parser().parse_args([*argv, "--help"])
    assert exit_.value.code == 0, f"`tandem {shlex.join(argv)} --help` failed"
    return out.getvalue()


def test_every_inline_tandem_command_names_flags_that_exist():
    spans = re.findall(r"`(tandem [^`]+)`", README.read_text())
    assert any("--" in span for span in spans)
    for span in spans:
        words = shlex.split(" ".join(span.split()))[1:]
        path = []
        for word in words:  # the subcommands: the words before the first option
            if word.startswith("-"):
                break
            if word not in _help(path):
                break  # an argument, not a subcommand
            path.append(word)
        usage = _help(path)
        for flag in (w.split("=", 1)[0] for w in words if w.startswith("--") and w != "--"):
            assert re.search(rf"{re.escape(flag)}\b", usage), f"`{span}`: {flag} does not exist"


def _serve_blocks() -> tuple[Block, Block, Block]:
    save = next(b for b in PYTHON_BLOCKS if b.section == SERVE and "model.save(" in b.code)
    bash = [b for b in _blocks("bash") if b.section == SERVE]
    start = next(b for b in bash if b.code.lstrip().startswith("tandem serve"))
    query = next(b for b in bash if "curl" in b.code)
    return save, start, query


_CURL_STAND_IN = """#!{python}
# What the README's curl lines use: curl -s URL [-d @FILE | -d BODY].
import sys, urllib.request
args = [a for a in sys.argv[1:] if a != "-s"]
url, data = args[0], None
if "-d" in args:
    body = args[args.index("-d") + 1]
    data = open(body[1:], "rb").read() if body.startswith("@") else body.encode()
url = url if "://" in url else "http://" + url
sys.stdout.buffer.write(urllib.request.urlopen(url, data=data, timeout=30).read())
"""


def _curl_stand_in(folder: Path) -> Path:
    """A folder holding a `curl` that does what the README's curl lines need."""
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    curl = bin_dir / "curl"
    curl.write_text(_CURL_STAND_IN.format(python=sys.executable))
    curl.chmod(0o755)
    return bin_dir


def test_the_serve_walkthrough_answers_as_the_readme_says(tmp_path):
    env = dict(os.environ)
    if shutil.which("curl") is None:  # run the README's lines all the same
        env["PATH"] = f"{_curl_stand_in(tmp_path)}{os.pathsep}{env.get('PATH', '')}"
    save, start, query = _serve_blocks()
    proc = _run_python(save.code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    argv = shlex.split(start.code.split("#", 1)[0])
    assert argv[:2] == ["tandem", "serve"]
    # Port 0: a free port, which the server prints, rather than 8501.
    with cli_serve(argv[2], *argv[3:], port=0, cwd=tmp_path) as server:
        seen = server.lines
        found = re.search(r"serving model 'mnist' version 1 at http://127\.0\.0\.1:"
                          r"(\d+)/v1/models/mnist", seen[-1] if seen else "")
        if not found:
            pytest.fail("tandem serve never said it was serving:\n" + "".join(seen))
        assert "".join(seen).count("oneDNN custom operations") <= 1  # start-up lines once
        script = query.code.replace("localhost:8501", f"localhost:{found[1]}")
        out = subprocess.run(["bash", "-e", "-c", script], cwd=tmp_path, capture_output=True,
                             text=True, timeout=60, env=env)
        assert out.returncode == 0, out.stderr
        # The three answers, back to back: two JSON documents, then the metrics page.
        decoder = json.JSONDecoder()
        answer, end = decoder.raw_decode(out.stdout)
        status, end = decoder.raw_decode(out.stdout, end)
        predictions = answer["predictions"]
        assert len(predictions) == 1 and len(predictions[0]) == 10
        assert status["model_version_status"][0]["state"] == "AVAILABLE"
        assert "# HELP" in out.stdout[end:]  # Prometheus
