"""Small helpers shared by every layer, without torch (reports import them): progress bars, atomic
writes, locks, processes forked for parts of a job, CPU flags. The torch ones (devices, seeds,
checkpoints) are in `defungi.train.runtime`."""

from __future__ import annotations

import fcntl
import gc
import json
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import pickle
import queue
import re
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import numpy as np
from tqdm import tqdm

from defungi.errors import DefungiError

T = TypeVar("T")

log = logging.getLogger("defungi")


class _LineProgress:
    """Progress as a log line at most every `every_s` seconds, when stderr is not a terminal."""

    def __init__(self, total: int | None, desc: str, every_s: float = 30.0) -> None:
        self.total, self.desc, self.n, self.every_s = total, desc, 0, every_s
        self.postfix = ""
        self.last = time.monotonic()

    def update(self, k: int = 1) -> None:
        self.n += k
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            log.info("%s: %d/%s %s", self.desc, self.n, self.total or "?", self.postfix)

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def close(self) -> None:
        return None


def fewer_collections() -> None:
    """Collect the youngest generation of Python's garbage every 10,000 allocations rather than 700, as
    a `defungi` command does: importing torch, timm and scikit-learn allocates a million objects and
    frees few (3.9-4.2 s against 4.9-5.0 s on a Xeon with AMX), and a full collection amid a `predict`
    cost 0.27 s."""
    gc.set_threshold(10_000, 10, 10)


_BARS = {"drawn": True}  # False in a process forked to do part of a job: its parent draws the job's bar


def no_progress_bars() -> None:
    """Draw no progress bar and log no progress line in this process from now on (a process forked to
    fit part of a job, beside others, whose parent meters the whole job)."""
    _BARS["drawn"] = False


def progress_bar(total: int | None, desc: str, unit: str = "it", enabled: bool = True) -> Any:
    """A tqdm bar on a terminal; periodic log lines otherwise; nothing when disabled (or on a
    torchrun rank other than 0, or after no_progress_bars)."""
    if not _BARS["drawn"]:  # not even a disabled tqdm: it takes a lock the parent's threads share
        return _LineProgress(total, desc, every_s=math.inf)
    if not enabled or os.environ.get("RANK", "0") != "0":
        return tqdm(total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False)
    return _LineProgress(total, desc)


def check_output(path: Path, option: str, want: str = "folder") -> None:
    """Refuse, in one line and before any work, an output path (want: 'folder' or 'file') that cannot
    be written: a file where a folder is wanted or the reverse, a path under a file, a folder that
    cannot take a new file (read-only, /proc; tried, as permissions do not stop root)."""
    for folder in (path, *path.parents):
        if not folder.exists():
            continue
        if folder == path and want == "file":
            if folder.is_dir():
                raise DefungiError(f"{option} {path} is a folder; give a file path")
            continue  # an existing file is replaced: its folder must take a new one
        if not folder.is_dir():
            raise DefungiError(f"{option} {path}: {folder} is a file; give a folder path")
        try:
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError:
            raise DefungiError(f"{option} {path}: {folder} is not writable; use another {option}") from None
        return


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file so that readers never see half of it."""

    def write(fh: BinaryIO) -> None:
        fh.write(text.encode("utf-8", "surrogateescape"))  # a file name that is not UTF-8 keeps its bytes
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fh.fileno(), 0o666 & ~umask)  # mkstemp makes it private; a report should read like any other file

    atomic_write_binary(path, write)


def atomic_write_json(path: Path, obj: Any) -> None:
    """JSON counterpart of atomic_write_text."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def atomic_write_binary(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """write(file) into a uniquely named temporary file, then rename it to path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:  # a failed or interrupted write leaves no temporary file behind
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """np.save, atomically."""
    atomic_write_binary(path, lambda fh: np.save(fh, array))


@contextmanager
def exclusive_lock(path: Path, busy: str | None = None) -> Iterator[None]:
    """Hold an exclusive lock on path (fcntl.flock; the file records the holder's pid). With busy, a
    lock held elsewhere is a DefungiError (busy, with {pid} filled in); without, wait for it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (fcntl.LOCK_NB if busy else 0))
        except BlockingIOError:
            fh.seek(0)
            raise DefungiError(busy.format(pid=fh.read().strip() or "?")) from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        try:
            yield
        finally:
            fh.truncate(0)
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextmanager
def shared_lock(path: Path) -> Iterator[None]:
    """Hold a shared lock on path (fcntl.flock): many readers at once, none while exclusive_lock is held."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def cpu_flags() -> str:
    """The CPU's AVX-512 and AMX flags (printed beside every timing: they change training speed 4-7x)."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return " ".join(sorted(set(re.findall(r"avx512[a-z_0-9]*|amx[a-z_0-9]*", text)))) or "no AVX-512 (AVX2 or less)"


def clock(seconds: float | None) -> str:
    """'1:02:03' (or '-')."""
    if seconds is None:
        return "-"
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class _Raised:
    """What the producer of prefetched raised."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def prefetched(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """items, produced up to depth ahead by a background thread (the next batch is decoded or
    gathered while this one computes: numpy, PIL and the engines release the GIL)."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        ready.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            ready.put(end)
        except BaseException as exc:  # raised again in the consumer
            ready.put(_Raised(exc))

    worker = threading.Thread(target=produce, daemon=True)
    worker.start()
    try:
        while (item := ready.get()) is not end:
            if isinstance(item, _Raised):
                raise item.exc
            yield item
    finally:
        stop.set()


def forked_map(call: Callable[[int], T], n: int, workers: int) -> Iterator[T]:
    """call(0), ..., call(n - 1), each in a process forked from this one (Linux: call and what it
    reads are inherited, not copied; it must touch no lock that another thread of this process may
    hold), at most workers at a time; their results in order, as they come. A call's exception is
    raised here (a process that dies, as a DefungiError naming its exit code); on any exception here,
    Ctrl-C included (the processes ignore it), the processes still running are stopped (SIGTERM:
    they exit through their finally blocks)."""
    fork = multiprocessing.get_context("fork")
    running: dict[int, tuple[Any, Any]] = {}
    results: dict[int, T] = {}
    queued = iter(range(n))
    try:
        for k in range(n):
            while k not in results:
                while len(running) < workers and (j := next(queued, None)) is not None:
                    receive, send = fork.Pipe(duplex=False)
                    with warnings.catch_warnings():  # Python 3.12's, on forking a process with threads
                        warnings.filterwarnings("ignore", ".*fork\\(\\) may lead to deadlocks", DeprecationWarning)
                        process = fork.Process(target=_forked_call, args=(call, j, send), daemon=True)
                        process.start()
                    send.close()
                    running[j] = (process, receive)
                ready = multiprocessing.connection.wait([receive for _, receive in running.values()])
                for j, (process, receive) in list(running.items()):
                    if receive in ready:
                        results[j] = _forked_result(process, receive)
                        del running[j]
            yield results.pop(k)
    finally:
        for process, _ in running.values():
            process.terminate()
        for process, _ in running.values():
            process.join()


def _forked_call(call: Callable[[int], Any], k: int, send: Any) -> None:
    """In a process forked by forked_map: call(k), sending back (True, result) or (False, the exception)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        outcome = (True, call(k))
    except BaseException as exc:  # noqa: BLE001 (raised in the parent)
        outcome = (False, exc)
    try:
        send.send(outcome)
    except (pickle.PicklingError, TypeError, AttributeError):  # an exception that does not pickle
        send.send((False, RuntimeError(f"{type(outcome[1]).__name__}: {outcome[1]}")))


def _forked_result(process: Any, receive: Any) -> Any:
    """What a process of forked_map sent back (its exception raised here)."""
    try:
        ok, value = receive.recv()
    except EOFError:
        process.join()
        raise DefungiError(
            f"a process forked for part of this job ended (exit code {process.exitcode}) before its result, "
            "e.g. killed for memory; with DEFUNGI_THREADS=1 the parts run one after the other in one process"
        ) from None
    process.join()
    if not ok:
        raise value
    return value


def ort_session(path: Path, threads: int, batch: int, spin: bool = False) -> Any:
    """An onnxruntime CPU session of an exported model whose first axis is named 'batch', fixed there at
    batch (onnxruntime plans a graph of known shapes about twice as fast: Lite0 at 224 px, 2 cores,
    217 against 125 images/s); feed it with run_fixed. Its threads sleep between calls unless spin
    (onnxruntime's default, busy-waiting): as fast alone (213-218 against 212-216 images/s), and
    `predict`, whose decoding thread then gets its core, 0.82-0.83 of the model alone against 0.78-0.81."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_free_dimension_override_by_name("batch", batch)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_fixed(session: Any, images: np.ndarray, batch: int) -> list[np.ndarray]:
    """The session's outputs for images, fed batch at a time (the last one padded, its padding dropped)."""
    name, out = session.get_inputs()[0].name, []
    for start in range(0, len(images), batch):
        part = np.ascontiguousarray(images[start : start + batch])
        n = len(part)
        if n < batch:
            part = np.concatenate([part, np.zeros((batch - n, *part.shape[1:]), dtype=part.dtype)])
        out.append([o[:n] for o in session.run(None, {name: part})])
    return [np.concatenate(rows) for rows in zip(*out, strict=True)] if out else []
