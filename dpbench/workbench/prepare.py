"""`dpbench prepare --profile P`: provision every data set and every pretrained weight file
that the profile's notebooks name, before a run (issue 18).

- What: `profile_items` reads each notebook's profile (over its parameters cell) and collects
  the file-backed data sets (`dataset`, `*_dataset`, `datasets`, `*_datasets`; torchvision
  sets and image folders) and the timm weights (`params.weight_names`). Bundled and synthetic
  sets need nothing.
- With network: each missing item is fetched by `fetch` (torchvision's and the Hugging Face
  hub's own download functions) into a staging folder, verified (torchvision's md5 of every
  file; for weights the sha256 that names the hub's blob and a safetensors read), then moved
  into place; a failed check deletes what was fetched, so nothing partial is left behind.
- Offline (`--offline`/`--check`, or a failed download): every missing item is listed with its
  URL, the exact path to copy it to and the command to run on a machine with network.

Exit code: 0 when every required item is present (and verified), 2 when one is missing.
Image folders (ImageNet, Places365, iNaturalist) are never downloaded (their licences ask for
a manual download) and are optional: the notebooks fall back to a stand-in, and say so.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from dpbench.atomic import write_json_atomic
from dpbench.errors import EXIT_USER_ERROR, UserError
from dpbench.workbench import params as P
from dpbench.workbench.provenance import sha256_file

LEDGER = ".dpbench-prepared.json"  # in data_root: what prepare fetched, with checksums and sizes
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm loads from the hub, in its order


@dataclass
class Item:
    """One thing a profile needs: a data set (in `root`) or a timm model's pretrained weights."""

    kind: str  # "dataset" | "weights"
    name: str
    notebooks: list[str] = field(default_factory=list)
    root: Path | None = None  # data_root for data sets, the hub cache for weights
    required: bool = True
    status: str = "?"  # present | missing | fetched | failed
    path: Path | None = None
    size: int = 0
    note: str = ""

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.kind, self.name, str(self.root))


@dataclass
class WeightsLocation:
    """Where timm's pretrained weights for a model name live (or would live)."""

    name: str
    source: str  # the hub repository, e.g. timm/resnet50.a1_in1k (or a URL)
    cache: Path
    path: Path | None  # the cached file, None when absent
    url: str


# --------------------------------------------------------------------------- what a profile needs


def profile_items(repo: str | os.PathLike, profile: str, notebooks: Iterable[str] | None = None,
                  data_root: str | os.PathLike | None = None) -> list[Item]:
    """Every data set and pretrained weight named by `profile`'s notebooks (deduplicated,
    each listing the notebooks that need it)."""
    from dpbench import data

    repo = Path(repo)
    P.check_profile(profile)
    names = list(notebooks) if notebooks else [nb for nb in P.list_notebooks(repo) if profile in P.list_profiles(repo, nb)]
    items: dict[tuple, Item] = {}
    for nb in names:
        nb = P.check_notebook(repo, nb).stem
        merged = P.parameters_cell(repo / "notebooks" / f"{nb}.ipynb")
        merged.update({k: v for k, v in P.load_yaml(repo / "params" / nb / f"{profile}.yaml").items() if k not in P.META_KEYS})
        root = Path(data_root or merged.get("data_root") or data.default_data_root()).expanduser()
        for name in P.dataset_names(merged):
            if name == "imagefolder":  # its folder: the `<prefix>_root` beside `<prefix>_dataset` (e.g. downstream_root)
                roots = [merged.get(k[: -len("dataset")] + "root") for k, v in merged.items()
                         if k.endswith("dataset") and v == "imagefolder"]
                name = f"imagefolder:{next((r for r in roots if r), 'imagefolder')}"
            base = name.split(":", 1)[0]
            spec = data.DATASETS.get(base)
            if spec is None or spec.required_files is None:
                continue  # bundled or synthetic (an unknown name is resolve's error, not ours)
            item = Item("dataset", name, [], root, required=base != "imagefolder")
            items.setdefault(item.key, item).notebooks.append(nb)
        for name in P.weight_names(merged):
            loc = weights_path(name)
            item = Item("weights", name, [], loc.cache)
            items.setdefault(item.key, item).notebooks.append(nb)
    return list(items.values())


# --------------------------------------------------------------------------- locations


def hub_cache() -> Path:
    """The Hugging Face hub cache that timm downloads into: $HF_HUB_CACHE, else $HF_HOME/hub,
    else ~/.cache/huggingface/hub (read from the environment now, not at import)."""
    env = os.environ.get("HF_HUB_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser() / "hub"


def weights_source(name: str) -> tuple[str, str]:
    """(hub repository, download URL) of timm's default pretrained weights for `name`."""
    import timm
    from timm.models import get_pretrained_cfg

    if not timm.is_model(name.split(".")[0]) and not timm.is_model(name):
        raise UserError(f"{name!r} is not a timm model name, so it has no pretrained weights to fetch; fix the profile")
    cfg = get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg else None
    if hub_id:
        return hub_id, f"https://huggingface.co/{hub_id}/resolve/main/{WEIGHT_FILES[0]}"
    url = getattr(cfg, "url", None) if cfg else None
    if not url:
        raise UserError(f"timm has no pretrained weights for {name!r}; choose a model with weights (timm.list_pretrained())")
    return url, url


def _repo_folder(hub_id: str) -> str:
    return "models--" + hub_id.replace("/", "--")


def weights_path(name: str, cache: Path | None = None) -> WeightsLocation:
    """Where `name`'s pretrained weights are in the hub cache (path None when absent)."""
    cache = Path(cache) if cache else hub_cache()
    source, url = weights_source(name)
    path = None
    if not source.startswith("http"):
        snap = _snapshot_dir(cache, source)
        for fname in WEIGHT_FILES:
            if snap is not None and (snap / fname).is_file():
                path = snap / fname
                break
    return WeightsLocation(name, source, cache, path, url)


def _snapshot_dir(cache: Path, hub_id: str) -> Path | None:
    """The snapshot folder `refs/main` points at (what huggingface_hub reads offline)."""
    folder = cache / _repo_folder(hub_id)
    try:
        rev = (folder / "refs" / "main").read_text().strip()
    except OSError:
        return None
    return folder / "snapshots" / rev


def dataset_files(item: Item) -> list[Path]:
    """Files a data set needs under its data root, for every split prepare provisions."""
    from dpbench import data

    base = item.name.split(":", 1)[0]
    spec = data.DATASETS[base]
    kw = {"root": item.name.split(":", 1)[1]} if ":" in item.name else {}
    splits = [s for s in spec.splits if s in ("train", "test")]
    return list(dict.fromkeys(p for s in splits for p in spec.required_files(item.root, s, **kw)))


def torchvision_class(name: str) -> str:
    """The torchvision.datasets class that downloads data set `name` (as dpbench.data registers
    it), "" for image folders, bundled and synthetic sets."""
    from dpbench import data

    spec = data.DATASETS.get(name.split(":", 1)[0])
    return spec.torchvision if spec else ""


def dataset_checksums(name: str) -> dict[str, str]:
    """md5 of each file of torchvision data set `name`, relative to its torchvision root, from
    torchvision's own tables (empty when torchvision keeps none for the extracted files)."""
    import torchvision.datasets as tvd

    cls = getattr(tvd, torchvision_class(name))
    if name in ("cifar10", "cifar100"):
        files = cls.train_list + cls.test_list + [[cls.meta["filename"], cls.meta["md5"]]]
        return {f"{cls.base_folder}/{f}": md5 for f, md5 in files}
    if name == "svhn":
        return {f"svhn/{fname}": md5 for s, (_, fname, md5) in cls.split_list.items() if s in ("train", "test")}
    return {}


def dataset_source(name: str) -> str:
    """The URL(s) torchvision downloads data set `name` from."""
    import torchvision.datasets as tvd

    base = name.split(":", 1)[0]
    if not torchvision_class(base):
        return ""
    cls = getattr(tvd, torchvision_class(base))
    if base == "svhn":
        return " ".join(u for s, (u, _, _) in cls.split_list.items() if s in ("train", "test"))
    if hasattr(cls, "mirrors"):
        return cls.mirrors[0] + " (" + ", ".join(f for f, _ in cls.resources) + ")"
    return cls.url


# --------------------------------------------------------------------------- checks


def _md5(path: Path) -> str:
    """Hex md5 of a file (torchvision's checksums are md5)."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_dataset(item: Item, root: Path | None = None) -> list[str]:
    """Problems with a data set's files under `root` (default its data root): missing files and
    md5 mismatches against torchvision's tables; [] when it is complete."""
    root = Path(root or item.root)
    staged = Item(item.kind, item.name, root=root)
    problems = [f"missing {p}" for p in dataset_files(staged) if not p.exists()]
    base = item.name.split(":", 1)[0]
    if torchvision_class(base) and not problems:
        for rel, md5 in dataset_checksums(base).items():
            path = root / rel
            if path.exists() and _md5(path) != md5:
                problems.append(f"md5 mismatch for {path} (expected {md5})")
    return problems


def verify_weights(path: Path) -> list[str]:
    """Problems with a weights file: its sha256 must equal the hub blob's name (the hub names
    large files by their sha256), and a safetensors file must open."""
    problems = []
    blob = Path(os.path.realpath(path))
    digest = sha256_file(blob)
    if re.fullmatch(r"[0-9a-f]{64}", blob.name) and blob.name != digest:
        problems.append(f"sha256 mismatch for {path} (hub says {blob.name}, file is {digest})")
    if path.suffix == ".safetensors":
        try:
            from safetensors import safe_open

            with safe_open(str(blob), framework="pt") as f:
                if not list(f.keys()):
                    problems.append(f"{path} holds no tensors")
        except Exception as exc:  # any parse error means a corrupt or truncated file
            problems.append(f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc})")
    return problems


def _size(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return os.path.getsize(os.path.realpath(path))
    return sum(os.path.getsize(os.path.realpath(p)) for p in path.rglob("*") if p.is_file())


def locate(item: Item) -> Item:
    """Fill in `item.status` (present/missing), `path` and `size` without any network."""
    if item.kind == "weights":
        loc = weights_path(item.name, item.root)
        item.path = loc.path
        item.status = "present" if loc.path else "missing"
        item.size = _size(loc.path) if loc.path else 0
        return item
    files = dataset_files(item)
    item.path = _top_folder(item.root, files)
    item.status = "present" if files and all(p.exists() for p in files) else "missing"
    item.size = sum(_size(p) for p in files if p.exists())
    return item


def _top_folder(root: Path, files: list[Path]) -> Path:
    """The folder (below root) that holds a data set's files, or root when they lie in it."""
    tops = {p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1}
    return root / tops.pop() if len(tops) == 1 else root


# --------------------------------------------------------------------------- fetching


def fetch(item: Item, dest: Path) -> None:
    """Download one item into `dest` with torchvision's / the hub's own functions: a data set's
    torchvision files into the staging root `dest`, weights into the hub cache `dest`. The one
    network entry point (tests replace it)."""
    if item.kind == "weights":
        source, _ = weights_source(item.name)
        if source.startswith("http"):
            raise OSError(f"{item.name}: weights only at {source}, not on the Hugging Face hub; fetch them with timm")
        from huggingface_hub import hf_hub_download

        _resolve_hub_host()
        hf_hub_download(source, WEIGHT_FILES[0], cache_dir=str(dest))
        return
    import torchvision.datasets as tvd

    base = item.name.split(":", 1)[0]
    cls = getattr(tvd, torchvision_class(base))
    for split in ("train", "test"):
        if base == "svhn":
            (dest / "svhn").mkdir(parents=True, exist_ok=True)
            cls(str(dest / "svhn"), split=split, download=True)
        else:
            cls(str(dest), train=split == "train", download=True)


def _resolve_hub_host() -> None:
    """Fail at once when the hub's host does not resolve (no network): the hub client would
    otherwise retry with back-off for about 10 s per item before giving up."""
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError as exc:
        raise OSError(f"cannot resolve {host}, no network ({exc})") from exc


def _fetch_dataset(item: Item) -> None:
    """Fetch into a staging folder beside the data root, verify, then rename into place."""
    item.root.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".prepare-{item.name}-", dir=item.root))
    try:
        fetch(item, stage)
        problems = verify_dataset(item, stage)
        if problems:
            raise UserError(f"{item.name}: checksum check failed: {'; '.join(problems[:3])}")
        staged = Item(item.kind, item.name, root=stage)
        for top in sorted({p.relative_to(stage).parts[0] for p in dataset_files(staged)}):
            src, dst = stage / top, item.root / top
            if dst.exists():  # an incomplete old copy: replace it whole
                shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
            os.rename(src, dst)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _fetch_weights(item: Item) -> None:
    """Fetch into the hub cache (the hub writes `.incomplete` files and renames them); a file
    that fails its check is deleted again, with its snapshot link."""
    fetch(item, item.root)
    loc = weights_path(item.name, item.root)
    if loc.path is None:
        raise UserError(f"{item.name}: the download left no weights in {item.root}")
    problems = verify_weights(loc.path)
    if problems:
        blob = Path(os.path.realpath(loc.path))
        loc.path.unlink(missing_ok=True)
        blob.unlink(missing_ok=True)
        raise UserError(f"{item.name}: checksum check failed: {'; '.join(problems)}")


def provision(item: Item) -> Item:
    """Make one item present: fetch it when missing, verify it either way (status fetched,
    present or failed, with the reason in `note`)."""
    locate(item)
    try:
        if item.status == "present":
            problems = verify_weights(item.path) if item.kind == "weights" else verify_dataset(item)
            if problems:
                item.status, item.note = "failed", "; ".join(problems[:3])
            return item
        if item.kind == "dataset" and not torchvision_class(item.name):
            item.note = "image folders are not downloaded; place them by hand"
            return item
        (_fetch_weights if item.kind == "weights" else _fetch_dataset)(item)
        locate(item)
        item.status = "fetched" if item.status == "present" else "failed"
    except UserError as exc:
        item.status, item.note = "failed", str(exc)
    except (OSError, RuntimeError) as exc:  # network errors; torchvision says "not found or corrupted"
        item.status, item.note = "missing", f"download failed ({type(exc).__name__}: {str(exc)[:200]})"
    except Exception as exc:  # the hub client's HTTP errors are their own classes
        item.status, item.note = "missing", f"download failed ({type(exc).__name__}: {str(exc)[:200]})"
    return item


# --------------------------------------------------------------------------- reporting


def how_to_provide(item: Item, profile: str = "gpu") -> str:
    """One line: where the item comes from, the exact path to copy it to, the command to run."""
    if item.kind == "weights":
        loc = weights_path(item.name, item.root)
        if loc.source.startswith("http"):
            return f"download {loc.url} and load it with checkpoint=PATH"
        return (f"from {loc.url}: on a machine with network run `hf download {loc.source} {WEIGHT_FILES[0]} "
                f"--cache-dir CACHE` (or `dpbench prepare --profile {profile}`) and copy CACHE/{_repo_folder(loc.source)} "
                f"to {loc.cache / _repo_folder(loc.source)}")
    base = item.name.split(":", 1)[0]
    files = dataset_files(item)
    if not torchvision_class(base):
        return f"place the image folder by hand at {files[0].parent} (<root>/<split>/<class>/<image>); optional"
    return (f"from {dataset_source(item.name)}: run `dpbench prepare --profile {profile} --data-root DIR` on a machine "
            f"with network and copy DIR/{_top_folder(item.root, files).name} to {_top_folder(item.root, files)}")


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def table(items: list[Item]) -> str:
    """What is where and how large, one line per item."""
    rows = [("kind", "name", "status", "size", "path", "notebooks")]
    for it in items:
        rows.append((it.kind, it.name, it.status + ("" if it.required else " (optional)"), _human(it.size) if it.size else "-",
                     str(it.path or "-"), ", ".join(n[:2] for n in it.notebooks)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _record(items: list[Item]) -> None:
    """Append what was fetched, with sha256/md5 and size, to each data root's ledger."""
    for it in items:
        if it.status != "fetched" or it.path is None:
            continue
        ledger = it.root / LEDGER
        try:
            entries = json.loads(ledger.read_text())
        except (OSError, ValueError):
            entries = {}
        entry = {"kind": it.kind, "path": str(it.path), "size": it.size}
        if it.kind == "weights":
            entry["sha256"] = sha256_file(Path(os.path.realpath(it.path)))
        else:
            entry["md5"] = {str(p): _md5(p) for p in dataset_files(it) if p.is_file()}
        entries[it.name] = entry
        write_json_atomic(ledger, entries)


def run(profile: str, *, repo=None, notebooks=None, data_root=None, check: bool = False, out=None) -> int:
    """`dpbench prepare`: provision (or with `check`, only list) every item; print the table and,
    for each missing item, how to provide it. Returns 0 when every required item is there, else 2."""
    from dpbench.workbench.runner import find_repo

    out = out or sys.stdout
    items = profile_items(repo or find_repo(), profile, notebooks, data_root)
    for it in items:
        locate(it) if check else provision(it)
    if not check:
        _record(items)
    print(table(items), file=out)
    missing = [it for it in items if it.status not in ("present", "fetched")]
    if missing:
        print(f"\n{len(missing)} item(s) missing or failed; how to provide each:", file=out)
        for it in missing:
            print(f"- {it.kind} {it.name} ({', '.join(it.notebooks)}): {it.note + '; ' if it.note else ''}"
                  f"{how_to_provide(it, profile)}", file=out)
    bad = [it for it in missing if it.required]
    if not items:
        print(f"profile {profile} names no data sets or pretrained weights to provision", file=out)
    return EXIT_USER_ERROR if bad else 0


def add_cli_arguments(parser) -> None:
    """`dpbench prepare` options (stdlib only: the CLI builds its parser without torch)."""
    parser.add_argument("--profile", required=True, help="smoke, cpu or gpu")
    parser.add_argument("--notebook", action="append", default=None, metavar="NB",
                        help="only this notebook's items (repeatable; default every notebook with the profile)")
    parser.add_argument("--data-root", default=None, metavar="DIR",
                        help="where data sets go (default: the profile's data_root, $DPBENCH_DATA or ~/.cache/dpbench/data)")
    parser.add_argument("--offline", "--check", dest="check", action="store_true",
                        help="download nothing: list what is present and how to provide what is missing")


def cli(args) -> int:
    """Entry point for the parsed `dpbench prepare` arguments."""
    return run(args.profile, notebooks=args.notebook, data_root=args.data_root, check=args.check)
