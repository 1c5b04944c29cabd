#!/usr/bin/env python3
"""Fleet server benchmark: the time to publish a 50 MB model release (hash, sign, store).

The release is a bundle (``.tar``) around an ONNX model whose ``Gather`` table holds
``--mb`` MB of random float32 (so nothing compresses), with one golden vector. In one
run, against the raw sha256 of the same bytes (``hashlib``, file in the page cache), it
times:

1. ``validate``: the agent's loader on the CPU (safe extraction, manifest, onnxruntime
   session, golden vector), as the server runs it (``isolation: inline``);
2. ``store``: ``LocalArtifactStore.put`` (sha256 while copying, fsync, rename);
3. ``sign``: ``ImageRepository.add_target`` (new targets, snapshot and timestamp, ed25519,
   each written with fsync);
4. ``publish``: ``ReleaseService.publish`` end to end (1-3 plus the database rows, SQLite);
5. ``upload``: ``POST /api/v1/models`` over HTTP to a real uvicorn on 127.0.0.1 (what
   ``edge-fleet model push`` does, its streaming client included).

    benchmarks/release_publish.py [--mb 50] [--rounds 3]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import statistics
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import uvicorn
import yaml
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.updater.targets import ImageTargetCustom
from fleet_server import keys
from fleet_server.api import create_app
from fleet_server.artifacts import LocalArtifactStore
from fleet_server.auth import mint
from fleet_server.cli_client import ApiClient
from fleet_server.config import ClientSettings, load_server_settings
from fleet_server.domain import Role
from fleet_server.releases import UploadRequest
from fleet_server.server import build_services
from fleet_server.store import migrate, tokens
from fleet_server.store.engine import Database
from fleet_server.tuf import LocalFolderStore

INDICES = np.array([0, 7, 12345], np.int64)


def make_bundle(folder: Path, version: str, table: np.ndarray) -> Path:
    """A ``.tar`` bundle: ``y = table[idx]`` with ``table`` as the initializer."""
    src = folder / f"big-{version}"
    (src / "g").mkdir(parents=True)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "idx"], ["y"])],
        "big",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
        [numpy_helper.from_array(table, "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, str(src / "model.onnx"))
    np.save(src / "g" / "idx.npy", INDICES)
    np.save(src / "g" / "y.npy", table[INDICES])
    manifest = {
        "name": "big",
        "version": version,
        "format": "onnx",
        "model": "model.onnx",
        "inputs": [{"name": "idx", "shape": [3], "dtype": "int64"}],
        "outputs": [{"name": "y", "shape": [3], "dtype": "float32"}],
        "golden": [{"name": "g", "inputs": {"idx": "g/idx.npy"}, "outputs": {"y": "g/y.npy"}}],
    }
    (src / "model.yaml").write_text(yaml.safe_dump(manifest))
    archive = folder / f"big-{version}.tar"
    with tarfile.open(archive, "w") as tf:
        for path in sorted(src.rglob("*")):
            tf.add(path, arcname=str(path.relative_to(src)), recursive=False)
    shutil.rmtree(src)
    return archive


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=50.0, help="size of the model (MB)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="release-publish-"))
    try:
        data = work / "data"
        tuf = data / "tuf"
        keys.init_keys(work / "offline", tuf / "keys", root_threshold=1, root_count=1)
        keys.init_repositories(
            work / "offline",
            tuf / "keys",
            LocalFolderStore(tuf / "image"),
            LocalFolderStore(tuf / "director"),
            root_threshold=1,
        )
        settings = load_server_settings(
            None, {"data_dir": data, "validation": {"isolation": "inline"}}
        )
        db = Database(settings.resolved_database_url())
        migrate.upgrade(db)
        svc = build_services(settings, db=db)
        assert svc.repositories is not None
        image = svc.repositories.image
        secret = mint()
        with db.write() as session:
            tokens.create_api_token(
                session,
                name="bench",
                role=Role.OPERATOR,
                token_hash=secret.hash,
                prefix=secret.prefix,
                actor="bench",
            )
        server = uvicorn.Server(
            uvicorn.Config(create_app(svc), host="127.0.0.1", port=0, log_level="warning")
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        api = ApiClient(
            ClientSettings(url=f"http://127.0.0.1:{port}", token=secret.token), timeout=600
        )

        rng = np.random.default_rng(7)
        table = rng.standard_normal(int(args.mb * 1e6 / 4), dtype=np.float32)
        scratch_store = LocalArtifactStore(work / "scratch-artifacts")
        results: dict[str, list[float]] = {
            k: [] for k in ("sha256", "validate", "store", "sign", "publish", "upload")
        }
        size = 0
        for r in range(args.rounds):
            local = make_bundle(work, f"1.0.{r}", table)
            remote = make_bundle(work, f"2.0.{r}", table)
            size = local.stat().st_size
            sha256_file(local)  # warm the page cache, like an upload that just landed
            results["sha256"].append(timed(partial(sha256_file, local)))
            results["validate"].append(timed(partial(svc.releases.validator.check, local)))

            def put(p: Path = local) -> None:
                with p.open("rb") as fh:
                    scratch_store.put(fh)

            results["store"].append(timed(put))
            custom = ImageTargetCustom(
                name="bench",
                version=f"1.0.{r}",
                format="onnx",
                compatible_profiles=("generic-x86_64",),
                manifest_digest="0" * 64,
            )
            path = f"models/bench/1.0.{r}/default/model.tar"
            results["sign"].append(
                timed(partial(image.add_target, path, size, {"sha256": sha256_file(local)}, custom))
            )
            request = UploadRequest(filename=local.name)
            results["publish"].append(
                timed(partial(svc.releases.publish, local, request, actor="bench"))
            )
            results["upload"].append(
                timed(partial(api.upload, "/api/v1/models", remote, {"variant": "default"}))
            )
            local.unlink()
            remote.unlink()
        server.should_exit = True
        thread.join(10)
        svc.releases.validator.close()
        db.dispose()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    mb = size / 1e6
    base = statistics.median(results["sha256"])
    print(f"release: a {mb:.1f} MB bundle (.tar), {args.rounds} rounds, medians")
    print(f"{'step':<10} {'seconds':>8} {'MB/s':>8} {'x sha256':>9}")
    for step, values in results.items():
        t = statistics.median(values)
        print(f"{step:<10} {t:8.3f} {mb / t:8.0f} {t / base:9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
