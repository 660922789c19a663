"""`dpbench prepare`: what a profile needs, the offline listing, downloads (a patched fetch and
a local HTTP server: never the network), checksum failures leaving nothing behind, and the
runner's pre-flight check for weights."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import pickle
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from dpbench import data
from dpbench.errors import UserError
from dpbench.workbench import cli, params, prepare

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """An empty hub cache and no download switch, whatever the machine has."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("DPBENCH_DOWNLOAD", raising=False)
    monkeypatch.delenv("DPBENCH_STANDIN_DATA", raising=False)


def _gpu_profile_needs() -> set[tuple[str, str]]:
    """Independently of prepare: file-backed data sets and hub weights named in every gpu yaml."""
    need = set()
    for path in sorted(REPO.glob("params/*/gpu.yaml")):
        p = params.load_yaml(path)
        for key, value in p.items():
            if key in ("dataset", "datasets") or key.endswith(("_dataset", "_datasets")):
                for v in value if isinstance(value, list) else [value]:
                    spec = data.DATASETS.get(str(v).split(":")[0])
                    if v and spec is not None and spec.required_files is not None:
                        need.add(("dataset", v))
        if p.get("backbone") == "hub":
            need.add(("weights", p["public_model"]))
        if (p.get("backbone_prefer") or [None])[0] == "timm":
            need.add(("weights", p["backbone"]))
    return need


def test_offline_listing_names_every_item_of_every_gpu_profile(tmp_path, capsys):
    need = _gpu_profile_needs()
    assert ("dataset", "cifar10") in need and any(k == "weights" for k, _ in need)
    items = prepare.profile_items(REPO, "gpu", data_root=tmp_path / "data")
    assert {(it.kind, it.name) for it in items} >= need
    rc = prepare.run("gpu", repo=REPO, data_root=tmp_path / "data", check=True)
    out = capsys.readouterr().out
    assert rc == 2
    how = out.split("how to provide each:")[1]
    for kind, name in need:
        line = next(l for l in how.splitlines() if l.startswith(f"- {kind} {name} "))
        if kind == "dataset" and not name.startswith("imagefolder"):
            assert str(tmp_path / "data") in line and "https://" in line  # the exact path and the source
        if kind == "weights":
            assert str(tmp_path / "hub" / "models--") in line and "huggingface.co" in line


def test_cli_prepare_check_exit_code(tmp_path, capsys):
    rc = cli.main(["prepare", "--profile", "gpu", "--check", "--data-root", str(tmp_path)])
    assert rc == 2 and "missing" in capsys.readouterr().out


# --------------------------------------------------------------------------- a fake CIFAR-10


def _cifar_files(rng) -> dict[str, bytes]:
    """A tiny CIFAR-10 in torchvision's on-disk format (pickled batches, meta)."""
    files = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, size=(4, 3072), dtype=np.uint8), "labels": list(range(4))}
        files[f"cifar-10-batches-py/{name}"] = pickle.dumps(batch, protocol=2)
    files["cifar-10-batches-py/batches.meta"] = pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}, protocol=2)
    return files


def _md5s(files: dict[str, bytes]) -> dict[str, str]:
    return {k: hashlib.md5(v).hexdigest() for k, v in files.items()}


def _fake_fetch(files: dict[str, bytes]):
    def fetch(item, dest):
        for rel, blob in files.items():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).write_bytes(blob)
    return fetch


def _cifar_item(root: Path) -> prepare.Item:
    return prepare.Item("dataset", "cifar10", ["02_groupwise_clipping"], root)


def test_download_verifies_and_moves_into_place(tmp_path, monkeypatch):
    files = _cifar_files(np.random.default_rng(0))
    monkeypatch.setattr(prepare, "fetch", _fake_fetch(files))
    monkeypatch.setattr(prepare, "dataset_checksums", lambda name: _md5s(files))
    item = prepare.provision(_cifar_item(tmp_path))
    assert item.status == "fetched", item.note
    assert item.path == tmp_path / "cifar-10-batches-py" and item.size == sum(map(len, files.values()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-batches-py"]  # no staging folder left
    prepare._record([item])
    assert "cifar10" in (tmp_path / prepare.LEDGER).read_text()
    assert prepare.provision(_cifar_item(tmp_path)).status == "present"  # verified again, not fetched


def test_checksum_failure_is_reported_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    files = _cifar_files(np.random.default_rng(0))
    good = _md5s(files)
    bad = dict(files, **{"cifar-10-batches-py/test_batch": files["cifar-10-batches-py/test_batch"][:-7]})  # truncated
    monkeypatch.setattr(prepare, "fetch", _fake_fetch(bad))
    monkeypatch.setattr(prepare, "dataset_checksums", lambda name: good)
    item = prepare.provision(_cifar_item(tmp_path))
    assert item.status == "failed" and "md5 mismatch" in item.note and "test_batch" in item.note
    assert list(tmp_path.iterdir()) == []  # neither the staging folder nor a partial data set
    monkeypatch.setattr(prepare, "profile_items", lambda *a, **k: [_cifar_item(tmp_path)])
    assert prepare.run("gpu", repo=REPO) == 2
    assert "md5 mismatch" in capsys.readouterr().out


def test_real_torchvision_download_from_a_local_server(tmp_path, monkeypatch):
    """The real fetch (torchvision's download and md5 checks) against http.server on localhost."""
    import torchvision.datasets as tvd

    files = _cifar_files(np.random.default_rng(1))
    serve = tmp_path / "serve"
    serve.mkdir()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for rel, blob in files.items():
            info = tarfile.TarInfo(rel)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    (serve / "cifar-10-python.tar.gz").write_bytes(buf.getvalue())
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # keep the test output clean
            pass

    handler = functools.partial(Quiet, directory=str(serve))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        md5 = _md5s(files)
        monkeypatch.setattr(tvd.CIFAR10, "url", f"http://127.0.0.1:{server.server_address[1]}/cifar-10-python.tar.gz")
        monkeypatch.setattr(tvd.CIFAR10, "tgz_md5", hashlib.md5(buf.getvalue()).hexdigest())
        monkeypatch.setattr(tvd.CIFAR10, "train_list", [[f"data_batch_{i}", md5[f"cifar-10-batches-py/data_batch_{i}"]] for i in range(1, 6)])
        monkeypatch.setattr(tvd.CIFAR10, "test_list", [["test_batch", md5["cifar-10-batches-py/test_batch"]]])
        monkeypatch.setattr(tvd.CIFAR10, "meta", dict(tvd.CIFAR10.meta, md5=md5["cifar-10-batches-py/batches.meta"]))
        root = tmp_path / "data"
        item = prepare.provision(_cifar_item(root))
        assert item.status == "fetched", item.note
        assert [p.name for p in root.iterdir()] == ["cifar-10-batches-py"]  # the archive stayed in staging
        ds = data.load_dataset("cifar10", "train", data_root=root)  # the real loader reads what prepare wrote
        assert ds.input_shape == (3, 32, 32) and len(ds) == 20
    finally:
        server.shutdown()


# --------------------------------------------------------------------------- weights


def _hub_file(cache: Path, hub_id: str, blob_bytes: bytes, name_by: str | None = None) -> Path:
    """A file in the hub cache's layout: blobs/<sha256>, snapshots/<rev>/model.safetensors -> blob."""
    folder = cache / ("models--" + hub_id.replace("/", "--"))
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    blob = folder / "blobs" / (name_by or hashlib.sha256(blob_bytes).hexdigest())
    blob.write_bytes(blob_bytes)
    snap = folder / "snapshots" / "abc123"
    snap.mkdir(parents=True, exist_ok=True)
    (snap / "model.safetensors").symlink_to(blob)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text("abc123")
    return snap / "model.safetensors"


def _safetensors_bytes() -> bytes:
    from safetensors.torch import save

    return save({"w": torch.zeros(2, 2)})


def test_weights_download_verified_by_sha256_and_safetensors(tmp_path, monkeypatch):
    hub_id, _ = prepare.weights_source("resnet18")
    cache = tmp_path / "hub"
    blob = _safetensors_bytes()
    monkeypatch.setattr(prepare, "fetch", lambda item, dest: _hub_file(dest, hub_id, blob))
    item = prepare.provision(prepare.Item("weights", "resnet18", ["05"], cache))
    assert item.status == "fetched" and item.size == len(blob) and item.path.name == "model.safetensors"
    assert params.weight_names({"backbone": "resnet18", "backbone_prefer": ["timm"]}) == ["resnet18"]


@pytest.mark.parametrize("corrupt", ["sha256", "not_safetensors"])
def test_weights_checksum_failure_deletes_the_file(tmp_path, monkeypatch, corrupt):
    hub_id, _ = prepare.weights_source("resnet18")
    cache = tmp_path / "hub"
    blob = _safetensors_bytes() if corrupt == "sha256" else b"\0" * 64
    name = "0" * 64 if corrupt == "sha256" else None
    monkeypatch.setattr(prepare, "fetch", lambda item, dest: _hub_file(dest, hub_id, blob, name))
    item = prepare.provision(prepare.Item("weights", "resnet18", ["05"], cache))
    assert item.status == "failed" and ("sha256 mismatch" in item.note or "safetensors" in item.note)
    assert not [p for p in cache.rglob("*") if p.is_file() and p.parent.name != "refs"]  # blob and link removed


def test_preflight_names_missing_weights_and_prepare(tmp_path):
    spec = params.resolve(REPO, "05_last_layer_features", "gpu")
    names = params.weight_names(spec.params)
    assert names, "the gpu profile of 05 asks for hub weights"
    with pytest.raises(UserError) as err:
        params.check_weights(spec)
    msg = str(err.value)
    assert "\n" not in msg and names[0] in msg and "dpbench prepare --profile gpu" in msg
    for name in names:  # once the weights are in the cache, the check passes
        _hub_file(tmp_path / "hub", prepare.weights_source(name)[0], _safetensors_bytes())
    params.check_weights(spec)


def test_check_exits_0_when_everything_is_present(tmp_path, monkeypatch, capsys):
    files = _cifar_files(np.random.default_rng(2))
    _fake_fetch(files)(None, tmp_path / "data")  # cifar10 in place, in its real layout
    monkeypatch.setenv("DPBENCH_DATA", str(tmp_path / "data"))
    only_cifar10 = [nb for nb in params.list_notebooks(REPO) if "gpu" in params.list_profiles(REPO, nb)
                    and [(it.kind, it.name) for it in prepare.profile_items(REPO, "gpu", [nb])] == [("dataset", "cifar10")]]
    assert only_cifar10, "a gpu profile that needs CIFAR-10 alone (02 at the time of writing)"
    nb = only_cifar10[0]
    assert prepare.run("gpu", repo=REPO, notebooks=[nb], check=True) == 0
    out = capsys.readouterr().out
    assert "present" in out and str(tmp_path / "data" / "cifar-10-batches-py") in out and "missing" not in out
