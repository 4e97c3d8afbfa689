"""extract and index at scale: headers-only scans (a broken body is skipped when it is used) and a killed run that
continues where it stopped, byte for byte the file an uninterrupted run writes."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cli
from tests.conftest import one_line_error
from transfer.apps.extract import extract, load_features
from transfer.apps.feature_parts import partial_path
from transfer.core.progress import Progress

LENET = {"backbone": "lenet5", "pretrained": False, "device": "cpu", "workers": 0, "pool": "avg"}


class Interrupting(Progress):
    """A progress display whose `extracting` step is interrupted (as by Ctrl-C) once `after` images are done;
    records the first count each such step reports (what a resumed run had already done)."""

    def __init__(self, after: int | None = None):
        super().__init__("off")
        self.after, self.first_counts = after, []

    @contextmanager
    def task(self, description, total=None, unit="items", min_seconds=1.0):
        done = [0]

        def advance(count=1):
            if description == "extracting" and done[0] == 0:
                self.first_counts.append(count)
            done[0] += count
            if description == "extracting" and self.after is not None and done[0] >= self.after:
                raise KeyboardInterrupt

        yield advance


def photo_folder(root: Path, photos, count: int = 11) -> Path:
    """`count` distinct crops of real photos as JPEGs (odd sizes), in a flat folder."""
    root.mkdir(parents=True)
    names = ("chelsea", "coffee", "astronaut", "rocket")
    for index in range(count):
        photo = Image.fromarray(photos[names[index % len(names)]]).convert("RGB")
        side = 60 + 7 * index
        photo.crop((index * 3, index * 2, index * 3 + side, index * 2 + side + index)).save(root / f"{index:02}.jpg")
    return root


def test_a_killed_extract_continues_and_writes_the_same_bytes(tmp_path, photos):
    images = photo_folder(tmp_path / "photos", photos)
    reference = extract(images, output=tmp_path / "ref" / "features.npy", batch_size=2, **LENET)
    output = tmp_path / "run" / "features.npy"
    with pytest.raises(KeyboardInterrupt):
        extract(images, output=output, batch_size=2, progress=Interrupting(after=6), **LENET)
    partial = partial_path(output)
    assert not output.exists() and json.loads((partial / "rank0.json").read_text())["images"] == 6
    part = next(partial.glob("*.part0.npy"))
    with open(part, "ab") as handle:  # half a batch a kill left after the last whole one
        handle.write(b"\x01" * 100)
    watched = Interrupting()
    resumed = extract(images, output=output, batch_size=2, progress=watched, **LENET)
    assert resumed.continued == 6 and watched.first_counts == [6] and resumed.not_continued is None
    assert output.read_bytes() == (tmp_path / "ref" / "features.npy").read_bytes()
    ours, theirs = json.loads(output.with_suffix(".json").read_text()), json.loads(
        (tmp_path / "ref" / "features.json").read_text())
    assert ours == theirs and len(ours["paths"]) == 11 == len(reference.paths)
    assert not partial.exists()
    arrays, _ = load_features(output)
    memory = extract(images, batch_size=3, **LENET).features
    assert np.allclose(next(iter(arrays.values())), next(iter(memory.values())), atol=1e-5)


def test_another_jobs_partial_work_is_never_continued(tmp_path, photos):
    images = photo_folder(tmp_path / "photos", photos, count=8)
    output = tmp_path / "features.npy"
    with pytest.raises(KeyboardInterrupt):
        extract(images, output=output, batch_size=2, progress=Interrupting(after=4), **LENET)
    other = extract(images, output=output, batch_size=4, **LENET)  # other batches: other numbers, other job
    assert other.continued == 0 and "another model, images or settings" in other.not_continued
    reference = extract(images, output=tmp_path / "ref.npy", batch_size=4, **LENET)
    assert np.array_equal(np.load(output), np.load(tmp_path / "ref.npy")) and len(reference.paths) == 8
    (partial_path(output)).mkdir()
    (partial_path(output) / "job.json").write_text("{ damaged")
    again = extract(images, output=output, batch_size=4, **LENET)
    assert again.continued == 0 and "unreadable" in again.not_continued and not partial_path(output).exists()


def test_headers_only_scan_skips_a_broken_body_when_it_is_used(tmp_path, photos, runner):
    """The scan reads headers only: a JPEG cut in half (its header intact) is found when it is decoded and skipped
    with the same reason a full scan gave, in the same report; an empty file and a text file never reach the
    model. The other images' features are those of a folder without the bad files."""
    images = photo_folder(tmp_path / "photos", photos, count=6)
    clean = tmp_path / "clean"
    clean.mkdir()
    for path in sorted(images.iterdir()):
        (clean / path.name).write_bytes(path.read_bytes())
    whole = (images / "03.jpg").read_bytes()
    (images / "03b_truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (images / "04b_empty.jpg").write_bytes(b"")
    (images / "05b_notes.png").write_text("not an image\n")
    from transfer.data.scan import check_image, scan_folder

    assert check_image(images / "03b_truncated.jpg", decode=False) is None  # its header is a JPEG's
    assert "truncated" in check_image(images / "03b_truncated.jpg")
    headers = scan_folder(images, decode=False)
    assert len(headers.samples) == 7 and {Path(s.path).name for s in headers.skipped} == {"04b_empty.jpg",
                                                                                          "05b_notes.png"}
    for kind, extra in (("torch", LENET), ("memory", LENET)):
        output = None if kind == "memory" else tmp_path / f"{kind}.npy"
        result = extract(images, output=output, batch_size=2, **extra)
        reasons = {Path(s.path).name: s.reason for s in result.skipped}
        assert set(reasons) == {"03b_truncated.jpg", "04b_empty.jpg", "05b_notes.png"}, reasons
        assert "truncated" in reasons["03b_truncated.jpg"] and "empty" in reasons["04b_empty.jpg"]
        assert [Path(p).name for p in result.paths] == [p.name for p in sorted(clean.iterdir())]
        got = np.load(output) if output else next(iter(result.features.values()))
        expected = next(iter(extract(clean, batch_size=2, **LENET).features.values()))
        assert got.shape == expected.shape == (6, expected.shape[1]) and np.allclose(got, expected, atol=1e-5)
    sidecar = json.loads((tmp_path / "torch.json").read_text())
    assert sidecar["shapes"][next(iter(sidecar["shapes"]))][0] == 6
    assert any("truncated" in s["reason"] for s in sidecar["skipped"])
    cut = runner.invoke(cli.app, ["extract", str(images), "-b", "lenet5", "--no-pretrained", "--pool", "avg",
                                  "--workers", "0", "-o", str(tmp_path / "cli.npy"), "-q"])
    assert cut.exit_code == 0 and "03b_truncated.jpg" in cut.output and "wrote" in cut.output
    every = tmp_path / "broken"
    every.mkdir()
    (every / "a.jpg").write_bytes(whole[: len(whole) // 2])
    refused = runner.invoke(cli.app, ["extract", str(every), "-b", "lenet5", "--no-pretrained", "--workers", "0",
                                      "-o", str(tmp_path / "none.npy"), "-q"])
    assert "every image failed to decode" in one_line_error(refused) and not (tmp_path / "none.npy").exists()


def test_a_killed_index_build_continues_without_embedding_again(tmp_path, photos):
    from transfer.apps.index import build_index, embedding_path

    images = photo_folder(tmp_path / "photos", photos, count=10)
    spec = {"backbone": "lenet5", "layer": None, "batch_size": 2, "device": "cpu", "workers": 0}
    with pytest.raises(KeyboardInterrupt):
        build_index(images, tmp_path / "a.idx", progress=Interrupting(after=4), **spec)
    assert (embedding_path(tmp_path / "a.idx") / ".features.npy.transfer-partial" / "rank0.json").is_file()
    watched = Interrupting()
    build_index(images, tmp_path / "a.idx", progress=watched, **spec)
    assert watched.first_counts == [4] and not embedding_path(tmp_path / "a.idx").exists()
    build_index(images, tmp_path / "b.idx", **spec)
    assert (tmp_path / "a.idx" / "vectors.npy").read_bytes() == (tmp_path / "b.idx" / "vectors.npy").read_bytes()
