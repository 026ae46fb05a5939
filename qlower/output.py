"""Writing outputs (models, external data, JSON reports) safely for every kind of path.

Where the bytes go depends on what the path names when the write starts:

* ``-``: standard output (binary; refused when it is a terminal);
* a new path or a regular file: a temporary file in the same folder, fsync, rename over
  the path, fsync of the folder, so a reader sees the old file or the new one, never a
  part. A new file gets ``0o666`` minus the umask (as ``open``/``onnx.save`` give); a
  replaced file keeps its mode, and its owner where the process may set it. Missing
  folders are created (and removed again if the write fails). A file with other hard links
  is replaced under this name only (the rename gives it a new inode);
* a symlink: resolved, and its target replaced as above in the target's folder, so the
  link stays a link (``cp`` and ``onnx.save`` behave the same way);
* a character device, FIFO or other special file: opened and written directly, never
  replaced (``/dev/full`` gives "No space left on device", ``/dev/stdout`` the stream);
* a directory: refused here; :func:`output_file_for` turns a directory given by the user
  into ``<dir>/<model>.<target>.onnx`` first, as ``cp`` would.

Every failure raises :class:`OutputError` (exit 2, one line naming the path and the
reason) and leaves no temporary file, and the previous output as it was. SIGINT and
SIGTERM during a write remove the temporary files too, then take their usual effect.

A model whose protobuf would exceed 2 GB is written with its large initializers in one
data file beside it, ``<model file name>.data`` (relative ``location``, as
``onnx.save_model(save_as_external_data=True)`` does), staged and renamed before the model.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import signal
import stat
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import BinaryIO, Callable, Iterator, Literal, Sequence

import onnx
from google.protobuf.message import Message

from .errors import OutputError

STDOUT = "-"
MAX_PROTOBUF_BYTES = 2**31 - 1
EXTERNAL_DATA_SUFFIX = ".data"
EXTERNAL_MIN_BYTES = 1024  # onnx.save_model's default size_threshold
PAGE_ALIGN_FROM_BYTES = 1 << 20  # tensors of 1 MiB and more start on a 4 KiB page (mmap-friendly)
GRAPH_FIELD = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
INITIALIZER_FIELD = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
RAW_DATA_FIELD = onnx.TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number

Writer = Callable[[BinaryIO], None]

_stdout_reserved: BinaryIO | None = None


@dataclass(frozen=True)
class Destination:
    """Where one output goes: ``kind`` is ``stdout``, ``special``, ``replace`` or ``create``."""

    requested: str
    kind: Literal["stdout", "special", "replace", "create"]
    path: Path | None = None
    previous: os.stat_result | None = None

    @property
    def is_file(self) -> bool:
        return self.kind in ("replace", "create")


def point_to_external(
    tensor: onnx.TensorProto, location: str, offset: int, length: int, marks: tuple[tuple[str, str], ...] = ()
) -> None:
    """Make ``tensor``'s bytes the ``length`` bytes at ``offset`` of the file ``location``
    (onnx's external data entries, replacing any it had, then ``marks``)."""
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length)), *marks):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def output_file_for(path: str | os.PathLike[str], source_name: str | None, target: str) -> str:
    """``path``, or ``<path>/<source>.<target>.onnx`` when ``path`` is an existing directory."""
    text = os.fspath(path)
    if text == STDOUT or not os.path.isdir(text):
        return text
    if source_name is None:
        raise OutputError(f"{text}: is a directory; give a file name for the model (the input has no file name to derive one from)")
    return os.path.join(text, default_name(source_name, target))


def default_name(source_name: str, target: str) -> str:
    """The output file name the CLI uses when no ``-o`` is given: ``<model>.<target>.onnx``."""
    return f"{Path(source_name).name.removesuffix('.onnx')}.{target}.onnx"


def resolve(path: str | os.PathLike[str], protect: Sequence[str | os.PathLike[str]] = ()) -> Destination:
    """Decide how ``path`` is written; refuse a ``protect``ed file (the input model, the model
    beside its report) under any name: the same inode, or for one not written yet the same path."""
    requested = os.fspath(path)
    if requested == STDOUT:
        return Destination(requested, "stdout")
    try:
        found = os.stat(requested)
    except FileNotFoundError:
        found = None
    except OSError as exc:
        raise OutputError(f"{requested}: cannot write here ({_reason(exc)})") from None
    for guarded in protect:
        try:
            other = os.stat(guarded)
            same = found is not None and (other.st_dev, other.st_ino) == (found.st_dev, found.st_ino)
        except OSError:  # not written yet (the model, when this is its report): compare the paths
            same = os.path.realpath(guarded) == os.path.realpath(requested)
        if same:
            raise OutputError(f"{requested}: is the same file as {os.fspath(guarded)}; writing would overwrite it")
    if found is None:
        return Destination(requested, "create", Path(os.path.realpath(requested)))
    if stat.S_ISDIR(found.st_mode):
        raise OutputError(f"{requested}: is a directory; give a file name")
    if stat.S_ISREG(found.st_mode):
        return Destination(requested, "replace", Path(os.path.realpath(requested)), found)
    return Destination(requested, "special", Path(requested), found)


def check(path: str | os.PathLike[str], protect: Sequence[str | os.PathLike[str]] = ()) -> Destination:
    """:func:`resolve`, and for a file, proof that its folder takes a new file (created and removed).

    Run before the work, so a path that cannot be written is refused before minutes of
    conversion and before any other output (the model, when this is the report) is written.
    """
    dest = resolve(path, protect)
    if dest.is_file and dest.path is not None:
        folder = next((p for p in (dest.path.parent, *dest.path.parent.parents) if p.exists()), None)
        if folder is not None and not folder.is_dir():
            raise OutputError(f"{dest.requested}: cannot write here ({folder} is not a folder)")
        probe = (folder or dest.path.parent) / f".{dest.path.name}.{secrets.token_hex(4)}.probe"
        try:
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        except OSError as exc:
            raise OutputError(f"{dest.requested}: cannot write in {probe.parent} ({_reason(exc)})") from None
        os.unlink(probe)
    return dest


# ---- signals ------------------------------------------------------------------------------


class _Signalled(BaseException):
    """Raised inside a write by SIGINT/SIGTERM so the cleanup runs before the signal acts."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_signalled(signum: int, _frame: FrameType | None) -> None:
    raise _Signalled(signum)


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back while cleaning up, so a second signal cannot cut it short."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def _cleanup_on_signals(requested: str) -> Iterator[None]:
    """Turn SIGINT/SIGTERM into an exception for the duration, then re-deliver it.

    The exception unwinds through the writers' cleanup; afterwards the previous handlers
    are back and the signal is raised again, so it has its usual effect (KeyboardInterrupt,
    or termination with the signal's status). Signal handlers exist only in the main thread.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.signal(signum, _raise_signalled) for signum in caught}
    pending: int | None = None
    try:
        yield
    except _Signalled as exc:
        pending = exc.signum
    finally:
        with _signals_blocked():  # a signal now waits for the restored handler
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    if pending is not None:
        signal.raise_signal(pending)
        # reached only when the restored disposition ignores the signal: the write still stopped
        raise OutputError(f"{requested}: interrupted by {signal.Signals(pending).name}; nothing was written")


# ---- staging files ------------------------------------------------------------------------


class _Staging:
    """Temporary files written beside their destinations, renamed into place together."""

    def __init__(self) -> None:
        self.staged: list[tuple[Path, Destination]] = []
        self.created_dirs: list[Path] = []

    def _make_parents(self, folder: Path, dest: Destination) -> None:
        missing: list[Path] = []
        for parent in (folder, *folder.parents):
            if parent.exists():
                break
            missing.append(parent)
        for parent in reversed(missing):
            try:
                parent.mkdir()
            except FileExistsError:
                continue
            except OSError as exc:
                raise OutputError(f"{dest.requested}: cannot create folder {parent} ({_reason(exc)})") from None
            self.created_dirs.append(parent)

    def stage(self, dest: Destination, writer: Writer) -> None:
        assert dest.path is not None and dest.is_file
        folder = dest.path.parent
        self._make_parents(folder, dest)
        while True:
            temp = folder / f".{dest.path.name}.{secrets.token_hex(4)}.tmp"
            try:
                # A new file: 0o666 and the kernel applies the umask. A replaced file: private
                # until it has the old owner and mode, so its data is never more readable.
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600 if dest.previous else 0o666)
                break
            except FileExistsError:
                continue
            except OSError as exc:
                raise OutputError(f"{dest.requested}: cannot write in {folder} ({_reason(exc)})") from None
        self.staged.append((temp, dest))
        try:
            with os.fdopen(fd, "wb") as stream:
                if dest.previous is not None:
                    _keep_owner_and_mode(stream.fileno(), dest.previous)
                writer(stream)
                stream.flush()
                os.fsync(stream.fileno())
        except OSError as exc:
            raise OutputError(f"{dest.requested}: cannot write ({_reason(exc)})") from None

    def commit(self) -> None:
        """Rename every staged file over its destination, in staging order, then sync folders."""
        backups = self._back_up_all_but_last()
        try:
            for temp, dest in self.staged:
                assert dest.path is not None
                try:
                    os.replace(temp, dest.path)
                except OSError as exc:
                    self._restore(backups)
                    raise OutputError(f"{dest.requested}: cannot replace it ({_reason(exc)})") from None
        finally:
            for backup in backups.values():
                backup.unlink(missing_ok=True)
        for folder in dict.fromkeys(dest.path.parent for _, dest in self.staged if dest.path is not None):
            _fsync_folder(folder, self.staged[-1][1].requested)
        self.staged.clear()
        self.created_dirs.clear()

    def _back_up_all_but_last(self) -> dict[Path, Path]:
        """Hard links to the files the earlier renames replace, to undo them if a later one fails."""
        backups: dict[Path, Path] = {}
        for _, dest in self.staged[:-1]:
            if dest.kind != "replace" or dest.path is None:
                continue
            backup = dest.path.with_name(f".{dest.path.name}.{secrets.token_hex(4)}.bak")
            with contextlib.suppress(OSError):  # no hard links here: proceed without the undo
                os.link(dest.path, backup)
                backups[dest.path] = backup
        return backups

    def _restore(self, backups: dict[Path, Path]) -> None:
        for target, backup in backups.items():
            with contextlib.suppress(OSError):
                os.replace(backup, target)

    def discard(self) -> None:
        with _signals_blocked():
            for temp, _ in self.staged:
                with contextlib.suppress(OSError):
                    temp.unlink(missing_ok=True)
            self.staged.clear()
            for folder in reversed(self.created_dirs):
                with contextlib.suppress(OSError):
                    folder.rmdir()
            self.created_dirs.clear()


def _keep_owner_and_mode(fd: int, previous: os.stat_result) -> None:
    if hasattr(os, "fchown"):
        with contextlib.suppress(PermissionError):  # only where the process may set it
            os.fchown(fd, previous.st_uid, previous.st_gid)
    os.fchmod(fd, stat.S_IMODE(previous.st_mode))  # after chown, which clears set-id bits


def _fsync_folder(folder: Path, requested: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # folders that cannot be opened (e.g. some network file systems) cannot be synced
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise OutputError(f"{requested}: written, but syncing its folder failed ({_reason(exc)})") from None
    finally:
        os.close(fd)


# ---- stdout and special files -------------------------------------------------------------


@contextlib.contextmanager
def reserve_stdout() -> Iterator[None]:
    """Keep file descriptor 1 for the output alone: anything else printed goes to stderr.

    The CLI wraps a command whose output is ``-`` in this, so progress, summaries and
    messages from libraries (also C code writing to fd 1) cannot corrupt the piped model.
    """
    global _stdout_reserved
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    _stdout_reserved = os.fdopen(saved, "wb")
    try:
        yield
    finally:
        sys.stdout.flush()
        stream, _stdout_reserved = _stdout_reserved, None
        with contextlib.suppress(OSError):
            stream.flush()
        os.dup2(saved, 1)
        with contextlib.suppress(OSError):
            stream.close()


def _stdout_stream(requested: str) -> BinaryIO:
    if _stdout_reserved is not None:
        return _stdout_reserved
    stream = getattr(sys.stdout, "buffer", None)
    if stream is None:
        raise OutputError(f"{requested}: standard output is not a binary stream here; give a file path")
    return stream


def _write_stdout(dest: Destination, writer: Writer) -> None:
    stream = _stdout_stream(dest.requested)
    with contextlib.suppress(AttributeError, ValueError, OSError):
        if stream.isatty():
            raise OutputError("-: standard output is a terminal; redirect or pipe it to write a binary model there")
    try:
        writer(stream)
        stream.flush()
    except BrokenPipeError:
        # the reader went away: keep the interpreter from failing again on its final flush
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
        raise OutputError("-: standard output was closed by the reading side (broken pipe)") from None
    except OSError as exc:
        raise OutputError(f"-: cannot write to standard output ({_reason(exc)})") from None


def _write_special(dest: Destination, writer: Writer) -> None:
    """Devices and FIFOs are written in place: replacing them would destroy the node."""
    try:
        fd = os.open(dest.requested, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise OutputError(f"{dest.requested}: cannot open for writing ({_reason(exc)})") from None
    try:
        with os.fdopen(fd, "wb") as stream:
            writer(stream)
            stream.flush()
    except OSError as exc:
        raise OutputError(f"{dest.requested}: cannot write ({_reason(exc)})") from None


# ---- public writers -----------------------------------------------------------------------


def write_with(
    path: str | os.PathLike[str], writer: Writer, *, protect: Sequence[str | os.PathLike[str]] = ()
) -> str:
    """Write what ``writer`` puts into the stream it is given to ``path``; return the path written.

    ``writer`` may be called once and must write everything; it is the seam tests use to
    slow a write down or fail it part-way.
    """
    dest = resolve(path, protect)
    with _cleanup_on_signals(dest.requested):
        if dest.kind == "stdout":
            _write_stdout(dest, writer)
        elif dest.kind == "special":
            _write_special(dest, writer)
        else:
            staging = _Staging()
            try:
                staging.stage(dest, writer)
                staging.commit()
            except BaseException:
                staging.discard()
                raise
    return dest.requested


def write_bytes(path: str | os.PathLike[str], data: bytes, *, protect: Sequence[str | os.PathLike[str]] = ()) -> str:
    return write_with(path, lambda stream: stream.write(data), protect=protect)


def write_text(path: str | os.PathLike[str], text: str, *, protect: Sequence[str | os.PathLike[str]] = ()) -> str:
    return write_bytes(path, text.encode("utf-8"), protect=protect)


def write_model(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    protect: Sequence[str | os.PathLike[str]] = (),
    max_inline_bytes: int | None = None,
) -> str:
    """Write ``model`` to ``path``, its large initializers to ``<file>.data`` when it exceeds
    ``max_inline_bytes`` (default ``MAX_PROTOBUF_BYTES``, protobuf's 2 GB limit; tests lower
    either). ``model`` is left as given.

    Below the limit the file is ``model.SerializeToString()``, byte for byte what
    ``onnx.save`` writes. Above it, the graph's initializers of 1 KiB or more (raw data,
    onnx's default threshold) go to the data file, 64-byte aligned (4 KiB from 1 MiB up),
    and the model file points at them; neither file is ever held whole in memory.
    """
    if max_inline_bytes is None:
        max_inline_bytes = MAX_PROTOBUF_BYTES
    if fits_inline(model, max_inline_bytes):
        try:
            data = model.SerializeToString()
        except (ValueError, RuntimeError) as exc:  # e.g. huge tensors stored outside raw_data
            raise OutputError(f"{os.fspath(path)}: cannot serialise the model ({exc})") from None
        return write_with(path, lambda stream: stream.write(data), protect=protect)
    dest = resolve(path, protect)
    if not dest.is_file:
        where = "standard output" if dest.kind == "stdout" else "a special file"
        raise OutputError(
            f"{dest.requested}: the model exceeds protobuf's 2 GB limit and needs an external data file beside it, "
            f"which {where} cannot have; give a file path"
        )
    assert dest.path is not None
    if Path(os.path.realpath(os.path.dirname(os.path.abspath(dest.requested)))) != dest.path.parent:
        raise OutputError(
            f"{dest.requested}: is a symlink into another folder; the external data file written beside its target "
            f"would not be found through the link; write to {dest.path} instead"
        )
    data_name = dest.path.name + EXTERNAL_DATA_SUFFIX
    data_dest = resolve(dest.path.with_name(data_name), [*protect, dest.path])
    if not data_dest.is_file or data_dest.path is None or data_dest.path.parent != dest.path.parent:
        raise OutputError(f"{data_dest.requested}: the external data file must be a regular file beside the model")
    with _cleanup_on_signals(dest.requested):
        staging = _Staging()
        try:
            externals = _ExternalInitializers(model, data_name)
            staging.stage(data_dest, externals.write_data)
            if externals.model_size > max_inline_bytes:
                raise OutputError(
                    f"{dest.requested}: the model is still {externals.model_size} bytes with its initializers moved out "
                    f"(over the {max_inline_bytes}-byte protobuf limit); its large tensors are not raw data"
                )
            staging.stage(dest, externals.write_model)
            staging.commit()
        except BaseException:
            staging.discard()
            raise
    return dest.requested


def fits_inline(model: onnx.ModelProto, limit: int | None = None) -> bool:
    """Whether ``model`` serialises to at most ``limit`` bytes (default ``MAX_PROTOBUF_BYTES``,
    read when called so tests can lower it), found without serialising it.

    (``ByteSize()`` is no help: protobuf's upb backend serialises the whole message to
    answer it, which for a 2 GB model costs seconds and twice the weights in memory.)
    """
    if limit is None:
        limit = MAX_PROTOBUF_BYTES
    raw_bytes = sum(len(tensor.raw_data) for tensor in model.graph.initializer)
    if raw_bytes < limit // 2:
        return True  # the rest of a model is never as large as its weights; SerializeToString checks
    graph_size = copy_without(model.graph, "initializer").ByteSize() + sum(
        _field_size(INITIALIZER_FIELD, _tensor_size(tensor)) for tensor in model.graph.initializer
    )
    return copy_without(model, "graph").ByteSize() + _field_size(GRAPH_FIELD, graph_size) <= limit


def _tensor_size(tensor: onnx.TensorProto) -> int:
    if not tensor.HasField("raw_data"):
        return tensor.ByteSize()
    return copy_without(tensor, "raw_data").ByteSize() + _field_size(RAW_DATA_FIELD, len(tensor.raw_data))


def _field_size(field_number: int, payload_size: int) -> int:
    return len(_length_delimited(field_number, payload_size)) + payload_size


def _aligned(offset: int, size: int) -> int:
    align = 4096 if size >= PAGE_ALIGN_FROM_BYTES else 64
    return -(-offset // align) * align


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _length_delimited(field_number: int, payload_size: int) -> bytes:
    """The tag and length that precede an embedded message (wire type 2)."""
    return _varint(field_number << 3 | 2) + _varint(payload_size)


def copy_without(message: Message, skipped: str) -> Message:
    """A copy of ``message`` without the field ``skipped`` (which is never copied at all)."""
    copy = type(message)()
    for field, value in message.ListFields():
        if field.name == skipped:
            continue
        repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
        if repeated:
            getattr(copy, field.name).extend(value)
        elif field.message_type is not None:
            getattr(copy, field.name).CopyFrom(value)
        else:
            setattr(copy, field.name, value)
    return copy


class _ExternalInitializers:
    """The two files of a model with external data, written without touching ``model``.

    ``write_data`` streams each large raw initializer into the data file (one tensor's bytes
    in Python at a time), recording where it went. ``write_model`` then writes the model
    field by field: everything but the graph, then the graph without its initializers, then
    each initializer with its bytes replaced by its place in the data file. Protobuf accepts
    fields in any order, so this parses as the model onnx would write; no copy of the
    weights, and no serialised copy of the model, is ever made.
    """

    def __init__(self, model: onnx.ModelProto, location: str) -> None:
        self.model, self.location = model, location
        self.placed: dict[int, tuple[int, int]] = {}  # initializer index -> (offset, length)
        self._model_bytes: list[bytes] | None = None

    def write_data(self, stream: BinaryIO) -> None:
        offset = 0
        for index, tensor in enumerate(self.model.graph.initializer):
            if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.external_data or not tensor.HasField("raw_data"):
                continue
            raw = tensor.raw_data
            if len(raw) < EXTERNAL_MIN_BYTES:
                continue
            start = _aligned(offset, len(raw))
            stream.write(b"\0" * (start - offset))
            stream.write(raw)
            self.placed[index] = (start, len(raw))
            offset = start + len(raw)
            del raw

    def _pieces(self) -> list[bytes]:
        if self._model_bytes is None:
            initializers = []
            for index, tensor in enumerate(self.model.graph.initializer):
                if index in self.placed:
                    stub = copy_without(tensor, "raw_data")
                    assert isinstance(stub, onnx.TensorProto)
                    offset, length = self.placed[index]
                    point_to_external(stub, self.location, offset, length)
                    body = stub.SerializeToString()
                else:
                    body = tensor.SerializeToString()
                initializers.append(_length_delimited(INITIALIZER_FIELD, len(body)) + body)
            graph = copy_without(self.model.graph, "initializer").SerializeToString()
            graph_size = len(graph) + sum(len(piece) for piece in initializers)
            head = copy_without(self.model, "graph").SerializeToString() + _length_delimited(GRAPH_FIELD, graph_size)
            self._model_bytes = [head, graph, *initializers]
        return self._model_bytes

    @property
    def model_size(self) -> int:
        return sum(len(piece) for piece in self._pieces())

    def write_model(self, stream: BinaryIO) -> None:
        for piece in self._pieces():
            stream.write(piece)
