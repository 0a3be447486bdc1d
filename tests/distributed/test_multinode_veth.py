"""Two "nodes" on one machine: network namespaces joined by a veth pair, each with its own host name.

`launchers/torchrun.sh` runs on both (`NNODES=2`, c10d rendezvous on nodea), one rank per node, so
every collective crosses the veth link: a tiny ZeRO-2 distillation must run to the end on both nodes,
both must report the same final (all-reduced) training loss and validation loss, and that loss must
equal a single-node run of the same two ranks (`torchrun.sh` in standalone mode).
Needs root and iproute2 (`ip netns`), as CI has; deselect with -m 'not multinode' elsewhere.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.multinode

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "launchers" / "torchrun.sh"
SUBNET = "10.231.{}.{}"
SUMMARY = re.compile(r"rank (\d)/2 on (\S+): step (\d+), train loss ([-+0-9.eEna]+), val loss ([-+0-9.eEna]+)")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def two_nodes():
    """{"nodea": netns, "nodeb": netns}; namespaces, link and hosts files are removed afterwards."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.fail("the multi-node test needs root and iproute2 (ip netns); deselect it with -m 'not multinode'")
    tag = f"sap{os.getpid() % 100000}"
    net = os.getpid() % 200 + 20
    names = {"nodea": f"{tag}a", "nodeb": f"{tag}b"}
    hosts = "127.0.0.1 localhost\n" + "".join(f"{SUBNET.format(net, i + 1)} {h}\n" for i, h in enumerate(names))
    try:
        for ns in names.values():
            _ip("netns", "add", ns)
            Path(f"/etc/netns/{ns}").mkdir(parents=True, exist_ok=True)
            Path(f"/etc/netns/{ns}/hosts").write_text(hosts)  # `ip netns exec` mounts it over /etc/hosts
        _ip("link", "add", f"{tag}va", "type", "veth", "peer", "name", f"{tag}vb")
        for i, (ns, dev) in enumerate(((names["nodea"], f"{tag}va"), (names["nodeb"], f"{tag}vb"))):
            _ip("link", "set", dev, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{SUBNET.format(net, i + 1)}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield names
    finally:
        for ns in names.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # also removes the veth pair
            shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)


def _env(demo_cache: Path, **extra: str) -> dict:
    return {**os.environ, "SAPLING_PYTHON": sys.executable, "SAPLING_CACHE": str(demo_cache), "DS_ACCELERATOR": "cpu",
            "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **extra}


def _args(teacher_dir: Path, corpus_file: Path, run_dir: Path) -> list[str]:
    return ["distill", f"teacher.path={teacher_dir}", "student.config.num_hidden_layers=1",
            f"data.files=[{corpus_file}]", "data.seq_len=32", "trainer.max_steps=6", "trainer.micro_batch_size=2",
            "trainer.eval_batches=2", "deepspeed=zero2", "logger=none", "trainer.progress=false",
            f"hydra.run.dir={run_dir}"]


def test_two_nodes_over_veth_agree_and_match_one_node(two_nodes, tmp_path, teacher_dir, corpus_file, demo_cache):
    run_dir = tmp_path / "run"  # one shared file system, as on a cluster
    env = _env(demo_cache, NNODES="2", NPROC_PER_NODE="1", RDZV_ENDPOINT="nodea:29400", RDZV_ID="veth-test")
    procs = {}
    for host, ns in two_nodes.items():
        script = f'hostname {host} && exec "$@"'  # its own UTS namespace: the node's own host name
        procs[host] = subprocess.Popen(
            ["ip", "netns", "exec", ns, "unshare", "--uts", "sh", "-c", script, "sh", str(LAUNCHER),
             *_args(teacher_dir, corpus_file, run_dir)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    outs = {}
    try:
        for host, proc in procs.items():
            outs[host] = proc.communicate(timeout=600)[0]
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    for host, proc in procs.items():
        assert proc.returncode == 0, f"{host}: " + outs[host][-4000:]
    seen = {host: SUMMARY.findall(out) for host, out in outs.items()}
    assert [m[:3] for m in seen["nodea"]] == [("0", "nodea", "6")], outs["nodea"][-2000:]
    assert [m[:3] for m in seen["nodeb"]] == [("1", "nodeb", "6")], outs["nodeb"][-2000:]
    loss_a, val_a = seen["nodea"][0][3:]
    assert (loss_a, val_a) == seen["nodeb"][0][3:]
    assert (run_dir / "model" / "config.json").exists()

    single = subprocess.run([str(LAUNCHER), *_args(teacher_dir, corpus_file, tmp_path / "one_node")],
                            env=_env(demo_cache, NPROC_PER_NODE="2"), capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-4000:]
    one = SUMMARY.findall(single.stderr)
    assert sorted(m[0] for m in one) == ["0", "1"]
    assert float(one[0][3]) == pytest.approx(float(loss_a), rel=1e-6)
    assert float(one[0][4]) == pytest.approx(float(val_a), rel=1e-6)
