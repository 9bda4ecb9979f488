"""Fleet deployment, kernel-free: the metrics' names and labels, the health endpoints, and the
shipped artefacts under deploy/ checked by their own tools (promtool, systemd-analyze,
kubernetes-validate)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from closewait_trace.kernel.decode import Stat
from closewait_trace.pipeline.diagnose import Cause, Confidence, Verdict
from closewait_trace.pipeline.join import Accepted, Connection
from closewait_trace.outputs.metrics import (
    MAX_SERIES, CgroupContainers, Health, MetricsExporter, container_of_cgroup,
)
from closewait_trace.outputs.render import TickStats, View

from .events import S, connection

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
NOW = 1_000 * S
ID = "0123456789abcdef" * 4


def _conn(i: int, **kw: Any) -> Connection:
    kw.setdefault("owner_pid", 4000 + i)
    kw.setdefault("owner_comm", "app")
    kw.setdefault("accepted", Accepted.NO)
    return connection(key=(0xFFFF_0000 + i, NOW - 30 * S), **kw)


def _view(conns: list[Connection], **kw: Any) -> View:
    base: dict[str, Any] = dict(
        now_ns=NOW, started_ns=NOW - 60 * S, backend="tracepoint", threshold_ns=10 * S,
        open=conns, verdicts={}, stats={}, closed_total=0, flagged_total=0, lost_exits=0,
        listeners={})
    base.update(kw)
    return View(**base)


def _exposition(view: View, containers: dict[int, str] | None = None,
                listeners: list[Any] | None = None) -> str:
    exp = MetricsExporter("127.0.0.1", 0, health=Health(node="node-a"),
                          container_of=lambda pid: (containers or {}).get(pid, ""),
                          listeners=(lambda: listeners) if listeners is not None else None)
    exp.ready(view, {"backend": "tracepoint", "kernel": "6.18.0"})
    return generate_latest(exp.registry).decode()


def _samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        m = re.match(r"([a-zA-Z_:]+)(\{(.*)\})? (\S+)$", line)
        if m and m.group(1) == name:
            out.append((dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or "")),
                        float(m.group(4))))
    return out


# --- metrics ----------------------------------------------------------------------------------


def test_metric_names_follow_the_conventions() -> None:
    text = _exposition(_view([_conn(1)], stats={Stat.CW_ENTERED: 5}))
    names = {m.group(1) for m in re.finditer(r"^# TYPE (\S+) (\S+)$", text, re.M)}
    ours = {n for n in names if not n.startswith("process_")}
    assert ours and all(n.startswith("closewait_") for n in ours)
    counters = re.findall(r"^# TYPE (\S+) counter$", text, re.M)
    assert "closewait_leaks_flagged_total" in counters
    assert all(n.endswith("_total") for n in counters), counters
    assert "closewait_duration_seconds_bucket" in text
    assert "process_resident_memory_bytes" in text  # the tracer's own cost
    if shutil.which("promtool"):
        lint = subprocess.run(["promtool", "check", "metrics"], input=text, text=True,
                              capture_output=True)
        assert lint.returncode == 0, lint.stdout + lint.stderr


def test_sockets_by_process_container_port_without_per_socket_or_pid_labels() -> None:
    conns = [_conn(1), _conn(2), _conn(3, owner_pid=5000, owner_comm="web")]
    text = _exposition(_view(conns), containers={5000: ID[:12]})
    rows = _samples(text, "closewait_sockets")
    assert sorted((r["comm"], r["container"], r["port"], v) for r, v in rows) == [
        ("app", "", "8080", 2.0), ("web", ID[:12], "8080", 1.0)]
    for labels, _ in rows:
        assert set(labels) == {"comm", "container", "port", "direction", "accepted"}
    ours = "\n".join(x for x in text.splitlines() if x.startswith("closewait_"))
    # (the process collector's own values, e.g. CPU seconds 22.950000000000003, are not ours)
    assert "pid=" not in ours and "rport" not in ours and "50000" not in ours


def test_leaks_by_cause_and_labels_from_the_traced_system_are_made_visible() -> None:
    hostile = "x\x1b[2J\nLEAK"
    c = _conn(1, owner_comm=hostile, flagged_ns=NOW - S)
    verdict = Verdict(Cause.NEVER_ACCEPTED, Confidence.CERTAIN, "never accepted")
    text = _exposition(_view([c, _conn(2)], verdicts={c.key: verdict}, flagged_total=1),
                       containers={4001: "evil\x07"})
    leaks = _samples(text, "closewait_leaking_sockets")
    assert leaks == [({"comm": "x\\\\x1b[2J\\\\x0aLEAK", "container": "evil\\\\x07",
                       "port": "8080", "cause": "never-accepted"}, 1.0)]
    assert "\x1b" not in text and "\x07" not in text
    assert _samples(text, "closewait_leaks_flagged_total") == [({}, 1.0)]


def test_labels_are_read_once_per_owner_however_many_sockets_it_holds() -> None:
    """20,000 sockets of a few owners: each owner's container is read (and its labels
    escaped) once per update, not once per socket; two owners with the same labels are one
    series."""
    calls: list[int] = []

    def container_of(pid: int) -> str:
        calls.append(pid)
        return "c1" if pid == 4001 else ""

    conns = [_conn(1, owner_pid=4001 if i % 2 else 4002, flagged_ns=NOW - S if i < 10 else None)
             for i in range(2000)]
    conns.append(_conn(1, owner_pid=4003))  # same comm and (no) container as 4002
    exp = MetricsExporter("127.0.0.1", 0, health=Health(node="node-a"), container_of=container_of)
    exp.ready(_view(conns), {"backend": "tracepoint", "kernel": "6.18.0"})
    assert sorted(calls) == [4001, 4001, 4002, 4002, 4003]  # sockets, then leaks
    text = generate_latest(exp.registry).decode()
    rows = sorted((r["container"], v) for r, v in _samples(text, "closewait_sockets"))
    assert rows == [("", 1001.0), ("c1", 1000.0)]
    leaks = sorted((r["container"], v) for r, v in _samples(text, "closewait_leaking_sockets"))
    assert leaks == [("", 5.0), ("c1", 5.0)]


def test_stays_that_left_close_wait_by_how_every_way_listed_from_zero() -> None:
    view = _view([], closed_total=6, closed_by_how={"app-close": 3, "process-exit": 2, "lost": 1})
    left = {r["how"]: v for r, v in _samples(_exposition(view), "closewait_left_total")}
    assert left == {"app-close": 3, "app-abort": 0, "reset": 0, "listener-closed": 0,
                    "process-exit": 2, "unknown": 0, "lost": 1}


def test_series_are_capped_and_the_rest_summed_as_other() -> None:
    conns = [_conn(i, owner_comm=f"p{i}") for i in range(MAX_SERIES + 7)]
    rows = _samples(_exposition(_view(conns)), "closewait_sockets")
    assert len(rows) == MAX_SERIES + 1
    assert ({"comm": "other", "container": "", "port": "", "direction": "", "accepted": ""},
            7.0) in rows


def test_lost_events_by_source_accept_errors_listeners_and_health() -> None:
    tick = TickStats()
    tick.add(300_000_000)
    tick.add(1_500_000_000)
    view = _view([], stats={Stat.RINGBUF_LOST: 4, Stat.CW_FULL: 2, Stat.KERNEL_SKIPPED: 7},
                 lost_exits=1,
                 accept_errors={(10, 24): 3, (11, 24): 2, (11, 105): 1}, tick=tick)
    def row(port: int, queue: int, limit: int) -> object:
        return type("D", (), {"lport": port, "rqueue": queue, "wqueue": limit})()

    # 0.0.0.0:80 and [::]:80 are two listeners of one port: one series, summed
    text = _exposition(view, listeners=[row(80, 5, 4), row(80, 3, 4), row(443, 0, 16)])
    lost = {r["source"]: v for r, v in _samples(text, "closewait_events_lost_total")}
    assert lost == {"ringbuf": 4, "socks_map_full": 0, "cw_map_full": 2,
                    "listener_map_full": 0, "accept_map_full": 0, "pid_map_full": 0,
                    "owner_room_full": 0, "exit_events": 1}
    assert _samples(text, "closewait_kernel_skipped_runs_total") == [({}, 7.0)]
    errs = {r["errno"]: v for r, v in _samples(text, "closewait_accept_errors_total")}
    assert errs == {"EMFILE": 5, "ENOBUFS": 1}
    assert _samples(text, "closewait_listener_accept_queue") == [({"port": "80"}, 8.0),
                                                                  ({"port": "443"}, 0.0)]
    assert _samples(text, "closewait_listener_accept_queue_limit") == [({"port": "80"}, 8.0),
                                                                        ({"port": "443"}, 16.0)]
    info = _samples(text, "closewait_tracer_info")
    assert info[0][0]["node"] == "node-a" and info[0][0]["backend"] == "tracepoint"
    assert info[0][0]["kernel"] == "6.18.0"
    assert _samples(text, "closewait_tracer_up") == [({}, 1.0)]
    assert _samples(text, "closewait_tracer_tick_max_seconds") == [({}, 1.5)]
    assert _samples(text, "closewait_tracer_slow_ticks_total") == [({}, 1.0)]
    assert _samples(text, "closewait_leak_threshold_seconds") == [({}, 10.0)]
    assert _samples(text, "closewait_accept_watch_seconds_total") == []  # not asked: none


def test_time_the_accept_watch_was_attached_is_a_counter() -> None:
    view = _view([], accept_watch_s=42.5)
    assert _samples(_exposition(view), "closewait_accept_watch_seconds_total") == [({}, 42.5)]


@pytest.mark.parametrize("path, short", [
    (f"/libpod_parent/libpod-{ID}", ID[:12]),
    (f"/machine.slice/libpod-{ID}.scope", ID[:12]),
    (f"/docker/{ID}", ID[:12]),
    (f"/system.slice/docker-{ID}.scope", ID[:12]),
    (f"/kubepods/burstable/pod0a1b2c3d-1111-2222-3333-444455556666/{ID}", ID[:12]),
    (f"/kubepods/pod0a1b2c3d-1111-2222-3333-444455556666/{ID}", ID[:12]),
    (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0a1b_2c.slice/"
     f"cri-containerd-{ID}.scope", ID[:12]),
    (f"/kubepods.slice/x.slice/crio-{ID}.scope", ID[:12]),
    ("/user.slice/user-1000.slice/session-3.scope", ""),
    ("/", ""),
    (f"/system.slice/docker-{ID[:60]}.scope", ""),
])
def test_container_id_from_cgroup_paths(path: str, short: str) -> None:
    assert container_of_cgroup(path) == short


def test_container_of_a_pid_reads_its_cgroup_file(tmp_path: Path) -> None:
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "cgroup").write_text(
        f"12:pids:/libpod_parent/libpod-{ID}\n0::/libpod_parent/libpod-{ID}\n")
    containers = CgroupContainers(str(tmp_path))
    assert containers(7) == ID[:12]
    assert containers(8) == ""  # gone: the host's


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_health_endpoints_beside_metrics_bound_where_configured() -> None:
    health = Health(node="n", stale_s=0.5)
    exp = MetricsExporter("127.0.0.1", 0, health=health, container_of=lambda pid: "")
    exp.start()
    try:
        base = f"http://127.0.0.1:{exp.port}"
        assert exp.server is not None and exp.server.server_address[0] == "127.0.0.1"
        assert _get(base + "/healthz")[0] == 200  # compiling is alive
        code, body = _get(base + "/readyz")
        assert code == 503 and "compiling" in body
        assert "closewait_tracer_up 0.0" in _get(base + "/metrics")[1]
        exp.ready(_view([]), {"backend": "tracepoint", "kernel": "6.18"})
        assert _get(base + "/readyz")[0] == 200 and _get(base + "/healthz")[0] == 200
        assert "closewait_tracer_up 1.0" in _get(base + "/metrics")[1]
        import time
        time.sleep(0.7)  # no tick for longer than stale_s: stuck
        code, body = _get(base + "/healthz")
        assert code == 503 and "no tick" in body
        exp.refresh(_view([]))
        assert _get(base + "/healthz")[0] == 200
        assert _get(base + "/nope")[0] == 404
        exp.finish(_view([]))
        assert health.finished and exp.server is None
    finally:
        exp.stop()


# --- agent ------------------------------------------------------------------------------------


def test_rotating_log_keeps_whole_lines_under_the_bound(tmp_path: Path) -> None:
    from closewait_trace.agent import RotatingWriter

    path = tmp_path / "log" / "records.jsonl"
    w = RotatingWriter(path, 4096, 2)
    lines = [json.dumps({"n": i, "pad": "x" * 90}) + "\n" for i in range(200)]
    for line in lines:
        w.write(line)
    w.flush()
    w.close()
    files = sorted(tmp_path.joinpath("log").iterdir())
    assert [f.name for f in files] == ["records.jsonl", "records.jsonl.1", "records.jsonl.2"]
    assert all(f.stat().st_size <= 4096 for f in files)
    kept = "".join(f.read_text() for f in (files[2], files[1], files[0])).splitlines(True)
    assert kept == lines[-len(kept):]  # the newest lines, in order, none cut
    # Reopened (a restart): appends to the current file, within the same bound.
    w = RotatingWriter(path, 4096, 2)
    assert w.size == files[0].stat().st_size
    w.close()


def test_rotating_log_without_backups_and_bad_settings(tmp_path: Path) -> None:
    from closewait_trace.agent import RotatingWriter
    from closewait_trace.errors import UsageError

    w = RotatingWriter(tmp_path / "r.jsonl", 4096, 0)
    for i in range(100):
        w.write(f"{i:0100d}\n")
    w.close()
    assert [f.name for f in tmp_path.iterdir()] == ["r.jsonl"]
    assert (tmp_path / "r.jsonl").stat().st_size <= 4096
    with pytest.raises(UsageError, match="too small"):
        RotatingWriter(tmp_path / "x", 100, 1)
    (tmp_path / "ro").mkdir(mode=0o500)
    if os.geteuid() != 0:
        with pytest.raises(UsageError, match="cannot write the log"):
            RotatingWriter(tmp_path / "ro" / "x", 4096, 1)


def test_agent_options_from_the_environment() -> None:
    from click.testing import CliRunner

    from closewait_trace.cli import main

    runner = CliRunner()
    res = runner.invoke(main, ["agent"], env={"CLOSEWAIT_PLAIN": "1"})
    assert res.exit_code == 2 and "JSON records only" in res.output
    res = runner.invoke(main, ["agent"], env={"CLOSEWAIT_THRESHOLD": "soon"})
    assert res.exit_code == 2 and "--threshold" in res.output
    res = runner.invoke(main, ["agent"], env={"CLOSEWAIT_METRICS": "0.0.0.0:99999"})
    assert res.exit_code == 2 and "bad --metrics port" in res.output


# --- Prometheus rules -------------------------------------------------------------------------

RULES = DEPLOY / "prometheus" / "closewait.rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "closewait.rules.test.yml"
needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool missing (scripts/setup.sh --dev)")


def _yaml(path: Path) -> Any:
    import yaml

    return yaml.safe_load(path.read_text())


@needs_promtool
def test_rules_pass_promtool_check_and_their_unit_tests() -> None:
    check = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run(["promtool", "test", "rules", RULE_TESTS.name], capture_output=True,
                          text=True, cwd=RULE_TESTS.parent)
    assert test.returncode == 0, test.stdout + test.stderr
    assert "SUCCESS" in test.stdout


def test_every_alert_is_tested_firing_and_silent() -> None:
    alerts = {r["alert"] for g in _yaml(RULES)["groups"] for r in g["rules"] if "alert" in r}
    assert {"CloseWaitSocketsLeaking", "CloseWaitAcceptQueueFull", "CloseWaitAcceptFailing",
            "CloseWaitTracerEventsLost", "CloseWaitTracerDown",
            "CloseWaitTracerNotTicking"} <= alerts
    firing: set[str] = set()
    silent: set[str] = set()
    for t in _yaml(RULE_TESTS)["tests"]:
        for case in t.get("alert_rule_test", []):
            (firing if case["exp_alerts"] else silent).add(case["alertname"])
    assert firing == alerts and silent == alerts


def test_rules_use_only_metrics_the_tracer_exports() -> None:
    text = _exposition(_view([_conn(1, flagged_ns=NOW)], accept_errors={(1, 24): 1}),
                       listeners=[type("D", (), {"lport": 80, "rqueue": 1, "wqueue": 8})()])
    exported = set(re.findall(r"^([a-z_]+)[{ ]", text, re.M))
    exprs = " ".join(r["expr"] for g in _yaml(RULES)["groups"] for r in g["rules"])
    used = set(re.findall(r"\b(closewait_[a-z_]+)", exprs))
    assert used and used <= exported, used - exported


# --- systemd ----------------------------------------------------------------------------------

UNIT = DEPLOY / "systemd" / "closewait-trace.service"
needs_systemd_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                           reason="systemd-analyze missing")


def unit_capabilities(unit: Path = UNIT) -> list[str]:
    """The unit's CapabilityBoundingSet, e.g. ['CAP_BPF', 'CAP_PERFMON', 'CAP_SYS_PTRACE']."""
    for line in unit.read_text().splitlines():
        if line.startswith("CapabilityBoundingSet="):
            return line.split("=", 1)[1].split()
    raise AssertionError("no CapabilityBoundingSet")


@needs_systemd_analyze
def test_systemd_unit_verifies_and_scores_as_hardened(tmp_path: Path) -> None:
    # systemd-analyze checks that ExecStart's program exists and is executable: point it at
    # one that does (the unit's own path exists only where the package is installed).
    exe = Path(shutil.which("closewait-trace") or sys.executable)
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/usr/bin/closewait-trace", str(exe)))
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, cwd=tmp_path)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    # Exposure score below 4.0 ("OK"); 3.4 when written.
    score = subprocess.run(["systemd-analyze", "security", "--offline=true",
                            "--threshold=40", str(unit)], capture_output=True, text=True)
    assert score.returncode == 0, score.stdout[-3000:] + score.stderr
    assert unit_capabilities() == ["CAP_BPF", "CAP_PERFMON", "CAP_SYS_PTRACE"]
    text = UNIT.read_text()
    for setting in ("ProtectSystem=strict", "PrivateTmp=yes", "NoNewPrivileges=yes",
                    "CacheDirectory=closewait-trace", "ExecStart=/usr/bin/closewait-trace agent"):
        assert setting in text.splitlines(), setting


# --- Kubernetes -------------------------------------------------------------------------------

KUBE = DEPLOY / "kubernetes"


def _kube_docs() -> dict[str, Any]:
    import yaml

    kust = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
    docs = {}
    for name in kust["resources"]:
        doc = yaml.safe_load((KUBE / name).read_text())
        docs[doc["kind"]] = doc
    return docs


@pytest.mark.parametrize("version", ["1.25.0", "1.37.0"])
def test_kubernetes_manifests_validate_offline(version: str) -> None:
    """Against the Kubernetes schemas (strict: no unknown fields), oldest and newest known."""
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError

    kust = _kube_docs()
    assert set(kust) == {"Namespace", "ConfigMap", "DaemonSet", "PodMonitor"}
    import yaml

    files = yaml.safe_load((KUBE / "kustomization.yaml").read_text())["resources"]
    assert sorted(files) == sorted(p.name for p in KUBE.glob("*.yaml")
                                   if p.name != "kustomization.yaml")
    for name in files:
        doc = yaml.safe_load((KUBE / name).read_text())
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except SchemaNotFoundError:
            assert doc["kind"] == "PodMonitor"  # a CRD: checked below


def test_daemonset_has_what_the_agent_needs_and_nothing_more() -> None:
    docs = _kube_docs()
    pod = docs["DaemonSet"]["spec"]["template"]["spec"]
    assert pod["hostPID"] and pod["hostNetwork"]
    assert pod["tolerations"] == [{"operator": "Exists"}]
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["privileged"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["BPF", "PERFMON", "SYS_PTRACE"]}
    assert sc["seccompProfile"] == {"type": "Unconfined"}  # as the podman run proved
    assert ["CAP_" + cap for cap in sc["capabilities"]["add"]] == unit_capabilities()
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert set(mounts) == {"/sys/kernel/debug", "/lib/modules", "/usr/src",
                           "/var/cache/closewait-trace", "/tmp"}
    assert mounts["/lib/modules"]["readOnly"] and mounts["/usr/src"]["readOnly"]
    env = {e["name"]: e for e in c["env"]}
    assert env["CLOSEWAIT_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["CLOSEWAIT_METRICS"]["value"] == "$(NODE_IP):9466"
    # Sized from the measured memory (160 MB at the compile's peak, up to 347 MB for a start's
    # cgroup with a cold page cache, 241-258 MB with 20,000 sockets in CLOSE_WAIT).
    res = c["resources"]
    assert res["requests"]["memory"] == "256Mi" and res["limits"]["memory"] == "512Mi"
    port = c["ports"][0]
    assert (port["name"], port["containerPort"]) == ("metrics", 9466)
    probes = {k: c[k]["httpGet"]["path"] for k in ("startupProbe", "readinessProbe",
                                                   "livenessProbe")}
    assert probes == {"startupProbe": "/readyz", "readinessProbe": "/readyz",
                      "livenessProbe": "/healthz"}
    # The PodMonitor scrapes these pods on that port, in a job the alerts recognise.
    pm = docs["PodMonitor"]
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    labels = docs["DaemonSet"]["spec"]["template"]["metadata"]["labels"]
    assert pm["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert "closewait" in pm["metadata"]["name"]
