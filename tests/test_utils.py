import gc
import os
from pathlib import Path

import numpy as np

from defungi.utils import atomic_write_json, atomic_write_text, fewer_collections


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
