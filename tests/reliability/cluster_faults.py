"""Worker and node faults on a real multi-node Ray cluster, run as a script (it needs its own Ray).

    python -m tests.reliability.cluster_faults WORKDIR MODEL_DIR [SCENARIO ...]

`ray.cluster_utils.Cluster` starts a head and two worker nodes of one CPU each on this machine. Each
scenario labels the same small set of images with `textseg.api.run_job` (the Ray runner) while a fault
thread kills real processes at a moment it can see, never at a moment it guesses. SOURCE and DEST are on
S3 (moto) behind tests/reliability/faulty_s3.py, which can park one request until the test releases it, so
a process can be killed while it is provably in the middle of its work (the parked connection's TCP port
names the process).

- `processes`: the GPU plan's shape (decode tasks -> model actors -> write tasks, the model on the CPU
  here): the model actor is SIGKILLed while it is constructed (its process title ends in `.__init__`),
  a decode task is SIGKILLed while its GET of one image is parked, and a write task (`write_stage`) is
  SIGKILLed while its PUT of one mask is parked.
- `fused`: the CPU plan, whose actors decode, label and write their own images: an actor is SIGKILLed
  while it is constructed, then one while its GET of an image is parked, then one while its PUT of a
  mask is parked.
- `node`: a worker node is removed (`cluster.remove_node`) while one of its tasks is parked the same way
  (the GPU plan's shape).

Each scenario prints one line `RESULT {json}` (images, rows, lost, duplicated, errors, the faults made)
and copies the masks it wrote to WORKDIR/<scenario>-masks/ for the test to compare with its reference.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import signal
import sys
import threading
import traceback
from typing import Any

import fsspec

from tests.reliability import procs
from tests.reliability.dataset import PROMPTS, Runs, lost_and_duplicated, mask_bytes, tiny_images, write_tree
from tests.reliability.faulty_s3 import FaultyS3Proxy, Rule

IMAGES = 10
ACTOR_TITLE = "ray::MapWorker(MapBatches(Labeler))"
FUSED_TITLE = "ray::MapWorker(MapBatches(DecodeLabelWrite))"
DECODE_TITLE = "ray::MapBatches(decode_stage)"
WRITE_TITLE = "ray::MapBatches(write_stage)"


def config(source: str, dest: str, model_dir: str, storage_options: dict | None = None) -> Any:
    from textseg.config import JobConfig

    return JobConfig(
        source=source,
        dest=dest,
        model=model_dir,
        prompts=PROMPTS,
        threshold=0.5,
        device="cpu",
        batch_size=2,
        storage_options=storage_options or {},
    )


class FaultThread(threading.Thread):
    """Runs `inject` beside the job; keeps what it did (or the error it hit) for the result line."""

    def __init__(self, inject: Any) -> None:
        super().__init__(daemon=True)
        self.inject = inject
        self.done: list[str] = []
        self.error: str | None = None

    def run(self) -> None:
        try:
            self.inject(self.done)
        except Exception:  # noqa: BLE001 - reported in the result line, which the test asserts on
            self.error = traceback.format_exc()


def kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    procs.wait_for(lambda: procs.process(pid) is None, attempts=200)


def split_pool() -> Any:
    """The GPU plan's shape with its one model actor on the CPU (`run_ray`'s `pool`)."""
    from textseg.plan.resources import ModelPool

    return ModelPool(True, "cpu", 1, 1, 1, {"num_cpus": 0.5})


def scenario_processes(
    workdir: pathlib.Path, model_dir: str, images: dict[str, bytes], s3: dict, fused: bool = False
) -> dict:
    """The model actor killed while loading the model, a decode task killed mid-read (its GET of one image
    parked), then a write task killed mid-write (its PUT of one mask parked); in the fused CPU plan all
    three are the actor that decodes, labels and writes."""
    read_rule = Rule("GET", "^src/" + re.escape(sorted(images)[1]) + "$", "hold", times=1)
    write_rule = Rule("PUT", "/masks/" + re.escape(_mask_name(sorted(images)[3])) + "$", "hold", times=1)
    actor = FUSED_TITLE if fused else ACTOR_TITLE

    def inject(done: list[str]) -> None:
        # 1. The actor killed while constructing (importing torch, loading weights).
        assert procs.wait_for(lambda: _titled(actor + ".__init__"), attempts=2400), "no actor init seen"
        pid = _titled(actor + ".__init__")[0]
        kill(pid)
        done.append(f"actor pid {pid} killed in __init__")
        # 2. The process reading an image killed in the middle of the read.
        _kill_parked(read_rule, actor if fused else DECODE_TITLE, "decode worker", done)
        # 3. The process writing a mask killed in the middle of the write.
        _kill_parked(write_rule, actor if fused else WRITE_TITLE, "CPU worker", done)

    name = "fused" if fused else "processes"
    pool = None if fused else split_pool()
    return _s3_scenario(workdir, model_dir, images, s3, name, [read_rule, write_rule], inject, pool)


def _kill_parked(rule: Rule, title_prefix: str, what: str, done: list[str]) -> None:
    assert rule.arrived.wait(timeout=300), f"the parked request ({rule.method} {rule.key}) never came"
    pid = procs.pid_of_tcp_client(rule.held_client_ports[0])
    assert pid is not None, "no process owns the parked connection"
    title = procs.process(pid).cmdline  # type: ignore[union-attr]
    assert title.startswith(title_prefix), title
    kill(pid)
    done.append(f"{what} pid {pid} killed mid-request ({title}: {rule.method} {rule.key})")
    rule.release()  # the dead process's request still reaches S3, as one already on the wire would


def scenario_node(
    workdir: pathlib.Path,
    model_dir: str,
    images: dict[str, bytes],
    s3: dict,
    cluster: Any,
    workers: list[Any],
) -> dict:
    """A worker node removed while one of its tasks is writing a mask."""
    target = sorted(images)[5]
    rule = Rule("PUT", "/masks/" + re.escape(_mask_name(target)) + "$", "hold", times=1)

    def inject(done: list[str]) -> None:
        assert rule.arrived.wait(timeout=300), "the mask PUT never came"
        pid = procs.pid_of_tcp_client(rule.held_client_ports[0])
        assert pid is not None
        node = _node_of(pid, workers)
        where = "the parked task's node"
        if node is None:  # the parked task runs on the head, which cannot be removed: take a worker node
            node, where = workers[0], "a worker node (the parked task ran on the head)"
        cluster.remove_node(node)
        workers.remove(node)
        done.append(f"removed {where} {node.node_id[:8]} (writer pid {pid})")
        rule.release()

    return _s3_scenario(workdir, model_dir, images, s3, "node", [rule], inject, split_pool())


def _s3_scenario(
    workdir: pathlib.Path,
    model_dir: str,
    images: dict[str, bytes],
    s3: dict,
    name: str,
    rules: list[Rule],
    inject: Any,
    pool: Any,
) -> dict:
    proxy = FaultyS3Proxy(s3["endpoint_url"], rules=rules).start()
    try:
        options = {
            **s3["options"],
            "client_kwargs": {**s3["options"]["client_kwargs"], "endpoint_url": proxy.endpoint_url},
        }
        dest = f"s3://{s3['bucket']}/{name}-dest"
        source = f"s3://{s3['bucket']}/src/"
        result = _run(
            workdir,
            name,
            config(source, dest, model_dir, options),
            inject,
            list(images),
            s3["fs"],
            f"{s3['bucket']}/{name}-dest",
            pool,
        )
        mask_puts = proxy.requests(lambda r: r.method == "PUT" and "/masks/" in r.key)
        multipart = proxy.requests(lambda r: "uploads" in r.query or "uploadId" in r.query)
        result["mask_puts"] = len(mask_puts)
        result["multipart_requests"] = len(multipart)
        return result
    finally:
        proxy.stop()


def _run(
    workdir: pathlib.Path,
    name: str,
    job: Any,
    inject: Any,
    expected: list[str],
    fs: fsspec.AbstractFileSystem,
    dest: str,
    pool: Any,
) -> dict:
    from textseg.plan.prepare import prepare
    from textseg.plan.runner_ray import run_ray

    fault = FaultThread(inject)
    fault.start()
    summary = run_ray(prepare(job), pool)
    fault.join(timeout=5)  # the job is over: the faults happened, or never will
    runs = Runs.read(fs, dest)
    lost, duplicated = lost_and_duplicated(runs.rows, expected)
    for relpath, data in mask_bytes(fs, dest).items():
        write_tree(workdir / f"{name}-masks", {relpath: data})  # for the test to compare with its reference
    return {
        "scenario": name,
        "images": len(expected),
        "rows": len(runs.rows),
        "ok": len(runs.ok_rows()),
        "errors": [row["error"] for row in runs.rows if row["status"] != "ok"],
        "lost": lost,
        "duplicated": duplicated,
        "summary": {k: summary.__dict__[k] for k in ("listed", "skipped", "ok", "error", "status")},
        "faults": fault.done,
        "fault_error": fault.error
        if not fault.is_alive()
        else "the fault thread was still waiting at the end",
    }


def _titled(prefix: str) -> list[int]:
    return [p.pid for p in procs.processes() if p.cmdline == prefix or p.cmdline.startswith(prefix + " ")]


def _node_of(pid: int, workers: list[Any]) -> Any:
    raylets = {node.all_processes["raylet"][0].process.pid: node for node in workers}
    proc = procs.process(pid)
    while proc is not None and proc.pid > 1:
        if proc.pid in raylets:
            return raylets[proc.pid]
        proc = procs.process(proc.ppid)
    return None


def _mask_name(relpath: str) -> str:
    return relpath.rsplit(".", 1)[0] + ".png"


def main(argv: list[str]) -> int:
    workdir, model_dir = pathlib.Path(argv[0]), argv[1]
    scenarios = argv[2:] or ["processes", "fused", "node"]
    logging.basicConfig(level=logging.WARNING)
    import ray
    from moto.server import ThreadedMotoServer
    from ray.cluster_utils import Cluster

    images = tiny_images(IMAGES, seed=7)

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    host, port = moto.get_host_and_port()
    options = {
        "key": "cluster-key",
        "secret": "cluster-secret",
        "client_kwargs": {"endpoint_url": f"http://{host}:{port}", "region_name": "us-east-1"},
    }
    s3_fs = fsspec.filesystem("s3", skip_instance_cache=True, **options)
    import boto3

    boto3.client(
        "s3",
        endpoint_url=f"http://{host}:{port}",
        region_name="us-east-1",
        aws_access_key_id="k",
        aws_secret_access_key="s",
    ).create_bucket(Bucket="cluster-faults")
    for relpath, data in images.items():
        s3_fs.pipe_file(f"cluster-faults/src/{relpath}", data)
    s3 = {
        "endpoint_url": f"http://{host}:{port}",
        "options": options,
        "bucket": "cluster-faults",
        "fs": s3_fs,
    }

    cluster = Cluster(
        initialize_head=True, connect=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )
    workers = [cluster.add_node(num_cpus=1), cluster.add_node(num_cpus=1)]
    cluster.wait_for_nodes()
    print("PHASE cluster up", flush=True)
    status = 0
    try:
        for name in scenarios:
            try:
                if name in ("processes", "fused"):
                    result = scenario_processes(workdir, model_dir, images, s3, fused=name == "fused")
                elif name == "node":
                    result = scenario_node(workdir, model_dir, images, s3, cluster, workers)
                else:
                    raise ValueError(f"unknown scenario {name!r}")
            except Exception:  # noqa: BLE001 - the test asserts on the result line
                result = {"scenario": name, "crash": traceback.format_exc()}
                status = 1
            print("RESULT " + json.dumps(result, default=str), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
        moto.stop()
        print("PHASE shut down", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
