import gc
import os
import time
from pathlib import Path

import numpy as np
import pytest

from defungi.errors import DefungiError
from defungi.utils import atomic_write_json, atomic_write_text, fewer_collections, forked_map


def test_commands_collect_the_youngest_generation_less_often():
    before = gc.get_threshold()
    try:
        fewer_collections()
        assert gc.get_threshold()[0] >= 10_000 > before[0]
    finally:
        gc.set_threshold(*before)


def test_atomic_writes_replace_whole_files_with_the_usual_permissions(tmp_path: Path):
    path = tmp_path / "sub" / "report.md"
    atomic_write_text(path, "first")
    atomic_write_json(path, {"a": 1})
    assert path.read_text() == '{\n  "a": 1\n}\n'
    assert [p.name for p in path.parent.iterdir()] == ["report.md"]  # no temporary file left
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_session_of_fixed_batch_answers_any_number_of_images_as_one_of_free_batch(tmp_path: Path):
    import torch

    from defungi.utils import ort_session, run_fixed

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    x = torch.randn(2, 3, 8, 8)
    path = tmp_path / "m.onnx"
    torch.onnx.export(
        model, (x,), str(path), input_names=["images"], dynamic_axes={"images": {0: "batch"}}, dynamo=False
    )
    images = np.random.default_rng(0).standard_normal((11, 3, 8, 8)).astype(np.float32)
    (fixed,) = run_fixed(ort_session(path, 1, 4), images, 4)  # 4 + 4 + 3 (padded)
    with torch.no_grad():
        assert np.allclose(fixed, model(torch.from_numpy(images)).numpy(), atol=1e-5)
    assert run_fixed(ort_session(path, 1, 4), images[:0], 4) == []


def test_forked_calls_answer_in_order_from_processes_of_their_own():
    parent = os.getpid()
    answers = list(forked_map(lambda k: (k * k, os.getpid()), 5, 2))
    assert [a for a, _ in answers] == [0, 1, 4, 9, 16]
    assert len({pid for _, pid in answers} | {parent}) == 6


def test_a_forked_calls_error_stops_the_others_and_is_raised_here(tmp_path: Path):
    def call(k: int) -> int:
        if k == 0:
            time.sleep(0.2)
            raise DefungiError("fold 1 broke")
        (tmp_path / f"{os.getpid()}.pid").write_text("")
        time.sleep(60)
        return k

    start = time.monotonic()
    with pytest.raises(DefungiError, match="fold 1 broke"):
        list(forked_map(call, 3, 2))
    assert time.monotonic() - start < 30  # the sleeping call was stopped, and the third never began
    pids = [int(p.stem) for p in tmp_path.glob("*.pid")]
    assert len(pids) == 1
    with pytest.raises(ProcessLookupError):
        os.kill(pids[0], 0)


def test_a_forked_process_that_dies_is_a_one_line_error():
    with pytest.raises(DefungiError, match="exit code 9"):
        list(forked_map(lambda k: os._exit(9), 1, 1))
