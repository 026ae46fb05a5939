"""Writing outputs to every kind of path (issue 13), through ``qlower.output``, the API and the CLI.

Each row of the issue's table: a device (a real ENOSPC from a ``/dev/full`` node made with
``mknod``), ``-`` piped, a symlink, an existing 0640 file, a new file under umask 022, a
directory, a place that cannot be written (``/proc``), and the input under another name
(symlink, hard link). Failures the machine cannot produce on demand (no space on a
regular file system, a failure part-way through a write, a failed rename, a signal) are
injected through the writer seam or a small tmpfs where the test may mount one; each
leaves the previous output as it was and no temporary file behind.
"""

from __future__ import annotations

import contextlib
import os
import pty
import signal
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import qlower
from qlower import output
from qlower.errors import OutputError

DOMAIN = "qonnx.custom_op.general"
SENTINEL = b"a previous output that must survive\n"


def matmul_model() -> onnx.ModelProto:
    """x[1,64] -> Quant -> MatMul(Quant(W[64,64])) -> y: a 4 KiB int8 weight once lowered."""
    rng = np.random.default_rng(13)
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), n) for n, v in (
        ("w", rng.normal(0, 1, (64, 64))), ("s", 0.05), ("ws", 0.02), ("z", 0.0), ("b8", 8.0))]
    nodes = [
        helper.make_node("Quant", ["x", "s", "z", "b8"], ["xq"], name="act", domain=DOMAIN, signed=1),
        helper.make_node("Quant", ["w", "ws", "z", "b8"], ["wq"], name="weight", domain=DOMAIN, signed=1),
        helper.make_node("MatMul", ["xq", "wq"], ["y"], name="mm"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(DOMAIN, 1)])


@pytest.fixture(scope="module")
def lowered() -> onnx.ModelProto:
    return qlower.convert(matmul_model(), verify_result=False).model


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "m.onnx"
    onnx.save(matmul_model(), str(path))
    return path


def cli(*args: str, umask: int | None = None, **kwargs: object) -> subprocess.CompletedProcess[bytes]:
    preexec = (lambda: os.umask(umask)) if umask is not None else None
    return subprocess.run([sys.executable, "-m", "qlower", *args], capture_output=True, timeout=300,
                          preexec_fn=preexec, **kwargs)  # type: ignore[call-overload]


def assert_refused(proc: subprocess.CompletedProcess[bytes], *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qlower: error [OutputError]: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def leftovers(folder: Path, *expected: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in expected)


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def full_device(folder: Path) -> Path:
    """A character device with /dev/full's numbers, so writes to it fail with ENOSPC."""
    node = folder / "full"
    try:
        os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 7))
        with open(node, "wb") as probe:
            probe.write(b"x")
    except PermissionError:
        pytest.skip("creating a character device needs CAP_MKNOD (run as root, outside a user namespace)")
    except OSError as exc:
        if exc.errno == 28:
            return node
        pytest.skip(f"a /dev/full node cannot be used here ({exc.strerror}; the file system may be mounted nodev)")
    pytest.skip("the mknod'ed /dev/full node accepted a write")


@contextlib.contextmanager
def small_tmpfs(folder: Path, size: str = "16k") -> Iterator[Path]:
    """A tiny tmpfs at ``folder`` (real ENOSPC and read-only failures), or skip."""
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip() or 'mount failed'}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


# ---- the module: kinds of path ----------------------------------------------------------


def test_new_file_follows_umask(tmp_path: Path) -> None:
    with umask(0o022):
        output.write_bytes(tmp_path / "a.onnx", b"new")
    with umask(0o027):
        output.write_bytes(tmp_path / "b.onnx", b"new")
    assert stat.S_IMODE((tmp_path / "a.onnx").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b.onnx").stat().st_mode) == 0o640
    assert leftovers(tmp_path, "a.onnx", "b.onnx") == []


def test_replaced_file_keeps_mode_and_owner(tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    out.write_bytes(SENTINEL)
    out.chmod(0o640)
    owner_settable = os.geteuid() == 0
    if owner_settable:
        os.chown(out, 4321, 4322)
    output.write_bytes(out, b"new model")
    after = out.stat()
    assert out.read_bytes() == b"new model" and stat.S_IMODE(after.st_mode) == 0o640
    if owner_settable:
        assert (after.st_uid, after.st_gid) == (4321, 4322)
    assert leftovers(tmp_path, "out.onnx") == []


def test_symlink_is_kept_and_its_target_rewritten(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    target = tmp_path / "models" / "real.onnx"
    target.write_bytes(SENTINEL)
    target.chmod(0o640)
    link = tmp_path / "link.onnx"
    link.symlink_to(Path("models") / "real.onnx")
    output.write_bytes(link, b"new model")
    assert link.is_symlink() and os.readlink(link) == str(Path("models") / "real.onnx")
    assert target.read_bytes() == b"new model" and stat.S_IMODE(target.stat().st_mode) == 0o640
    assert leftovers(tmp_path / "models", "real.onnx") == [] and leftovers(tmp_path, "models", "link.onnx") == []


def test_dangling_symlink_creates_its_target(tmp_path: Path) -> None:
    link = tmp_path / "link.onnx"
    link.symlink_to("made.onnx")
    output.write_bytes(link, b"new model")
    assert link.is_symlink() and (tmp_path / "made.onnx").read_bytes() == b"new model"


def test_missing_folders_are_created_and_removed_again_on_failure(tmp_path: Path) -> None:
    output.write_bytes(tmp_path / "a" / "b" / "out.onnx", b"new")
    assert (tmp_path / "a" / "b" / "out.onnx").read_bytes() == b"new"

    def fail(stream: BinaryIO) -> None:
        stream.write(b"part")
        raise OSError(28, "No space left on device")

    with pytest.raises(OutputError, match="No space left on device"):
        output.write_with(tmp_path / "c" / "d" / "out.onnx", fail)
    assert not (tmp_path / "c").exists()


def test_directory_is_refused_and_output_file_for_names_a_file_inside(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="is a directory"):
        output.write_bytes(tmp_path, b"x")
    assert output.output_file_for(tmp_path, "/models/net.onnx", "qop") == str(tmp_path / "net.qop.onnx")
    assert output.output_file_for(tmp_path / "f.onnx", "/models/net.onnx", "qop") == str(tmp_path / "f.onnx")
    with pytest.raises(OutputError, match="is a directory"):
        output.output_file_for(tmp_path, None, "qcdq")


def test_unwritable_place_is_one_line_naming_the_path() -> None:
    with pytest.raises(OutputError) as info:
        output.write_bytes("/proc/x.onnx", b"x")
    assert str(info.value).startswith("/proc/x.onnx: ") and "\n" not in str(info.value)
    with pytest.raises(OutputError, match="/proc/version/x.onnx"):
        output.write_bytes("/proc/version/x.onnx", b"x")  # a file where a folder should be


@pytest.mark.parametrize("alias", ["symlink", "hard link"])
def test_the_input_under_another_name_is_refused(alias: str, tmp_path: Path) -> None:
    source = tmp_path / "in.onnx"
    source.write_bytes(SENTINEL)
    other = tmp_path / "other.onnx"
    if alias == "symlink":
        other.symlink_to(source)
    else:
        os.link(source, other)
    with pytest.raises(OutputError, match="overwrite"):
        output.write_bytes(other, b"x", protect=[source])
    assert source.read_bytes() == SENTINEL


def test_character_device_gets_real_enospc_and_stays_a_device(tmp_path: Path) -> None:
    device = full_device(tmp_path)
    with pytest.raises(OutputError, match="No space left on device") as info:
        output.write_bytes(device, b"model bytes" * 1000)
    assert str(info.value).startswith(f"{device}: ")
    assert stat.S_ISCHR(device.lstat().st_mode) and leftovers(tmp_path, "full") == []


def test_fifo_is_written_not_replaced(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
    reader.start()
    output.write_bytes(fifo, b"through the pipe")
    reader.join(timeout=30)
    assert received == [b"through the pipe"] and stat.S_ISFIFO(fifo.lstat().st_mode)


# ---- the module: failures leave the previous output -------------------------------------


@pytest.fixture
def previous(tmp_path: Path) -> Path:
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    out.write_bytes(SENTINEL)
    return out


def assert_untouched(out: Path) -> None:
    assert out.read_bytes() == SENTINEL
    assert leftovers(out.parent, out.name) == [], "a temporary file was left behind"


def test_failure_part_way_through_a_write(previous: Path) -> None:
    def half_then_fail(stream: BinaryIO) -> None:
        stream.write(b"the first half")
        stream.flush()
        assert len(leftovers(previous.parent, previous.name)) == 1  # the partial temporary file
        raise OSError(5, "Input/output error")

    with pytest.raises(OutputError, match=f"{previous}: cannot write \\(Input/output error\\)"):
        output.write_with(previous, half_then_fail)
    assert_untouched(previous)


def test_failed_rename(previous: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: object) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(output.os, "replace", refuse)
    with pytest.raises(OutputError, match="Read-only file system"):
        output.write_bytes(previous, b"new")
    assert_untouched(previous)


def test_real_no_space_and_read_only_file_system(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "small") as folder:
        out = folder / "model.onnx"
        out.write_bytes(SENTINEL)
        with pytest.raises(OutputError, match="No space left on device"):
            output.write_bytes(out, b"\1" * 64 * 1024)
        assert_untouched(out)
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        with pytest.raises(OutputError, match="Read-only file system"):
            output.write_bytes(out, b"new")
        assert_untouched(out)


def test_signal_handlers_are_restored(tmp_path: Path) -> None:
    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    output.write_bytes(tmp_path / "a.onnx", b"x")
    with pytest.raises(OutputError):
        output.write_bytes("/proc/x.onnx", b"x")
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


SLOW_WRITER = textwrap.dedent("""
    import signal, sys, time
    from qlower import output

    # A shell runs background jobs with SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler; give the child the interactive default the test is about.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def slow(stream):
        stream.write(b"part of a model")
        stream.flush()
        print("writing", flush=True)
        time.sleep(60)

    output.write_with(sys.argv[1], slow)
""")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_write_removes_the_temporary_file(signum: int, previous: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(previous)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"writing\n"
    assert len(leftovers(previous.parent, previous.name)) == 1  # the temporary file exists now
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    # the signal keeps its usual effect: SIGTERM terminates, SIGINT raises KeyboardInterrupt
    assert proc.returncode == -signum if signum == signal.SIGTERM else b"KeyboardInterrupt" in err, (proc.returncode, err)
    assert_untouched(previous)


# ---- external data ------------------------------------------------------------------------


def run_ort(path: Path | bytes) -> np.ndarray:
    session = ort.InferenceSession(str(path) if isinstance(path, Path) else path, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(0, 1, (1, 64)).astype(np.float32)
    return session.run(None, {"x": x})[0]


def test_external_data_loads_in_onnx_and_ort_and_is_reproducible(lowered: onnx.ModelProto, tmp_path: Path) -> None:
    before = lowered.SerializeToString()
    written = []
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        path = tmp_path / run / "m.qcdq.onnx"
        output.write_model(lowered, path, max_inline_bytes=1000)
        written.append(path)
        assert lowered.SerializeToString() == before, "write_model changed the caller's model"
        assert sorted(p.name for p in path.parent.iterdir()) == ["m.qcdq.onnx", "m.qcdq.onnx.data"]
    a, b = written
    assert a.read_bytes() == b.read_bytes() and Path(f"{a}.data").read_bytes() == Path(f"{b}.data").read_bytes()
    assert a.stat().st_size < 1000 and Path(f"{a}.data").stat().st_size >= 4096
    reloaded = onnx.load(str(a))
    for tensor in reloaded.graph.initializer:  # onnx.load spells out the DEFAULT location it read back
        tensor.ClearField("data_location")
    assert reloaded.SerializeToString() == before  # the same model once its data is read back
    onnx.checker.check_model(str(a), full_check=True)
    np.testing.assert_array_equal(run_ort(a), run_ort(before))
    assert qlower.verify(matmul_model(), qlower.ir.load_model(a), batches=2).passed


def test_size_without_serialising_is_exact() -> None:
    """The 2 GB decision is made without serialising; at the boundary it agrees with the bytes."""
    weights = numpy_helper.from_array(np.arange(5000, dtype=np.float32), "w")
    typed = helper.make_tensor("t", TensorProto.FLOAT, [300], np.ones(300, np.float32).tolist())  # float_data, not raw
    graph = helper.make_graph([helper.make_node("Add", ["w", "w"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5000])], [weights, typed])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    size = len(model.SerializeToString())
    assert output.fits_inline(model, size) and not output.fits_inline(model, size - 1)


def test_small_models_stay_one_file_byte_identical_to_onnx_save(lowered: onnx.ModelProto, tmp_path: Path) -> None:
    output.write_model(lowered, tmp_path / "ours.onnx")
    onnx.save(lowered, str(tmp_path / "theirs.onnx"))
    assert (tmp_path / "ours.onnx").read_bytes() == (tmp_path / "theirs.onnx").read_bytes()
    assert leftovers(tmp_path, "ours.onnx", "theirs.onnx") == []


def test_external_data_cannot_go_to_stdout_or_a_device(lowered: onnx.ModelProto, tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="2 GB.*external data"):
        output.write_model(lowered, "-", max_inline_bytes=1000)
    with pytest.raises(OutputError, match="external data"):
        output.write_model(lowered, "/dev/null", max_inline_bytes=1000)


def test_external_data_through_a_symlink_into_another_folder_is_refused(lowered: onnx.ModelProto, tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()
    link = tmp_path / "m.onnx"
    link.symlink_to(tmp_path / "store" / "m.onnx")
    with pytest.raises(OutputError, match="would not be found through the link"):
        output.write_model(lowered, link, max_inline_bytes=1000)
    assert leftovers(tmp_path / "store") == [] and leftovers(tmp_path, "m.onnx", "store") == []
    output.write_model(lowered, link)  # under the limit there is one file, and the link works
    assert onnx.load(str(link)).graph.node


def test_external_data_failures_leave_both_previous_files(lowered: onnx.ModelProto, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "m.onnx"
    output.write_model(lowered, out, max_inline_bytes=1000)
    old = (out.read_bytes(), Path(f"{out}.data").read_bytes())
    changed = qlower.convert(matmul_model(), to="qop", verify_result=False).model
    real_replace = os.replace
    calls: list[str] = []

    def fail_on_model(source: str | Path, target: str | Path) -> None:
        calls.append(str(target))
        if str(target) == str(out):  # the data file has been replaced by now: it must come back
            raise OSError(28, "No space left on device")
        real_replace(source, target)

    monkeypatch.setattr(output.os, "replace", fail_on_model)
    with pytest.raises(OutputError, match="No space left on device"):
        output.write_model(changed, out, max_inline_bytes=1000)
    assert calls[0] == f"{out}.data"
    assert (out.read_bytes(), Path(f"{out}.data").read_bytes()) == old
    assert leftovers(tmp_path, "m.onnx", "m.onnx.data") == []
    np.testing.assert_array_equal(run_ort(out), run_ort(lowered.SerializeToString()))


# ---- API and CLI: the table -----------------------------------------------------


def test_device_row(model_file: Path, tmp_path: Path) -> None:
    device = full_device(tmp_path)
    with pytest.raises(OutputError, match="No space left on device"):
        qlower.convert(model_file, output_path=device, verify_result=False)
    assert_refused(cli("convert", str(model_file), "-o", str(device), "--no-verify"), str(device), "No space left on device")
    assert stat.S_ISCHR(device.lstat().st_mode)


def test_stdout_row(model_file: Path, tmp_path: Path) -> None:
    expected = qlower.convert(model_file, batches=2).model.SerializeToString()
    proc = cli("convert", str(model_file), "-o", "-", "--batches", "2", "--report", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected  # nothing but the model: the tables went to stderr
    assert b"verified" in proc.stderr and b"wrote standard output" in proc.stderr
    assert not (tmp_path / "-").exists()
    report = cli("convert", str(model_file), "-o", str(tmp_path / "out.onnx"), "--report", "-", "--no-verify")
    assert report.returncode == 0 and report.stdout.decode().lstrip().startswith("{"), report.stderr
    assert_refused(cli("convert", str(model_file), "-o", "-", "--report", "-"), "both")


def test_api_stdout(model_file: Path, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    result = qlower.convert(model_file, output_path="-", verify_result=False)
    assert capsysbinary.readouterr().out == result.model.SerializeToString() and result.report.output_path == "-"


def test_stdout_closed_by_the_reader(model_file: Path) -> None:
    """`| true` exits before qlower writes: a broken pipe is exit 2 and one line, no traceback."""
    proc = subprocess.run(f"{sys.executable} -m qlower convert {model_file} -o - --no-verify -q | true; exit ${{PIPESTATUS[0]}}",
                          shell=True, capture_output=True, timeout=300, executable="/bin/bash")
    assert_refused(proc, "broken pipe")


def test_stdout_terminal_is_refused(model_file: Path) -> None:
    leader, follower = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "qlower", "convert", str(model_file), "-o", "-", "--no-verify"],
                              stdout=follower, stderr=subprocess.PIPE, timeout=300)
    finally:
        os.close(follower)
        os.close(leader)
    assert_refused(proc, "terminal")


def test_symlink_row(model_file: Path, tmp_path: Path) -> None:
    (tmp_path / "deploy").mkdir()
    target = tmp_path / "deploy" / "model.onnx"
    target.write_bytes(SENTINEL)
    link = tmp_path / "current.onnx"
    link.symlink_to(target)
    qlower.convert(model_file, output_path=link, verify_result=False)
    assert link.is_symlink() and onnx.load(str(target)).graph.node
    target.write_bytes(SENTINEL)
    assert cli("convert", str(model_file), "-o", str(link), "--no-verify", "-q").returncode == 0
    assert link.is_symlink() and onnx.load(str(target)).graph.node
    assert leftovers(tmp_path / "deploy", "model.onnx") == []


def test_mode_rows(model_file: Path, tmp_path: Path) -> None:
    kept = tmp_path / "kept.onnx"
    kept.write_bytes(SENTINEL)
    kept.chmod(0o640)
    assert cli("convert", str(model_file), "-o", str(kept), "--no-verify", "-q").returncode == 0
    assert stat.S_IMODE(kept.stat().st_mode) == 0o640 and onnx.load(str(kept)).graph.node
    assert cli("convert", str(model_file), "-o", str(tmp_path / "new.onnx"), "--no-verify", "-q", umask=0o022).returncode == 0
    assert stat.S_IMODE((tmp_path / "new.onnx").stat().st_mode) == 0o644
    with umask(0o022):
        qlower.convert(model_file, output_path=tmp_path / "api.onnx", verify_result=False)
    assert stat.S_IMODE((tmp_path / "api.onnx").stat().st_mode) == 0o644
    kept.write_bytes(SENTINEL)
    qlower.convert(model_file, output_path=kept, verify_result=False)
    assert stat.S_IMODE(kept.stat().st_mode) == 0o640 and onnx.load(str(kept)).graph.node


def test_directory_row(model_file: Path, tmp_path: Path) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    proc = cli("convert", str(model_file), "--to", "qop", "-o", str(folder), "--no-verify")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["m.qop.onnx"]
    assert f"wrote {folder / 'm.qop.onnx'}".encode() in proc.stdout
    result = qlower.convert(model_file, output_path=folder, verify_result=False)
    assert result.report.output_path == str(folder / "m.qcdq.onnx") and (folder / "m.qcdq.onnx").is_file()
    with pytest.raises(OutputError, match="is a directory"):
        qlower.convert(model_file.read_bytes(), output_path=folder, verify_result=False)
    assert_refused(cli("convert", str(model_file), "-o", str(tmp_path / "r.onnx"), "--report", str(folder)), "is a directory")
    assert not (tmp_path / "r.onnx").exists(), "the model was written although the report could not be"


def test_unwritable_place_row(model_file: Path) -> None:
    with pytest.raises(OutputError, match="/proc/x.onnx"):
        qlower.convert(model_file, output_path="/proc/x.onnx", verify_result=False)
    assert_refused(cli("convert", str(model_file), "-o", "/proc/x.onnx", "--no-verify"), "/proc/x.onnx")
    assert_refused(cli("convert", str(model_file), "-o", "-", "--report", "/proc/x.json", "--no-verify"), "/proc/x.json")


@pytest.mark.parametrize("alias", ["symlink", "hard link"])
def test_output_is_the_input_row(alias: str, model_file: Path, tmp_path: Path) -> None:
    original = model_file.read_bytes()
    other = tmp_path / "alias.onnx"
    other.symlink_to(model_file) if alias == "symlink" else os.link(model_file, other)
    with pytest.raises(OutputError, match="overwrite"):
        qlower.convert(model_file, output_path=other, verify_result=False)
    assert_refused(cli("convert", str(model_file), "-o", str(other), "--no-verify"), str(other), "overwrite")
    assert_refused(cli("convert", str(model_file), "-o", str(tmp_path / "o.onnx"), "--report", str(other)), "overwrite")
    assert model_file.read_bytes() == original


def test_report_on_the_model_it_reports_is_refused(model_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "new" / "out.onnx"
    assert_refused(cli("convert", str(model_file), "-o", str(out), "--report", str(tmp_path / "new" / ".." / "new" / "out.onnx")),
                   "overwrite")
    assert not (tmp_path / "new").exists()


def test_api_failure_mid_write_keeps_previous_output(model_file: Path, previous: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    real_fsync = os.fsync

    def no_space(fd: int) -> None:
        real_fsync(fd)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(output.os, "fsync", no_space)
    with pytest.raises(OutputError, match=f"{previous}: cannot write \\(No space left on device\\)"):
        qlower.convert(model_file, output_path=previous, verify_result=False)
    assert_untouched(previous)


def test_cli_real_no_space_keeps_previous_output(model_file: Path, tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "small", size="4k") as folder:  # one page, taken by the previous output
        out = folder / "model.onnx"
        out.write_bytes(SENTINEL)
        proc = cli("convert", str(model_file), "-o", str(out), "--no-verify")
        assert_refused(proc, str(out), "No space left on device")
        assert_untouched(out)


def test_verify_report_to_stdout(model_file: Path, tmp_path: Path) -> None:
    lowered_path = tmp_path / "l.onnx"
    qlower.convert(model_file, output_path=lowered_path, verify_result=False)
    proc = cli("verify", str(model_file), str(lowered_path), "--batches", "2", "--report", "-")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().lstrip().startswith("{") and b"verified" in proc.stderr
    assert_refused(cli("verify", str(model_file), str(lowered_path), "--report", str(lowered_path)), "overwrite")
