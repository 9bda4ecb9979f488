"""Kernel-free tests of closewait_trace.facts.containers: cgroup paths of every runtime (cgroup v1
and v2, cgroupfs and systemd drivers), names from the runtimes' on-disk files, and the
selection of a container by id or name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from closewait_trace.facts.containers import (
    CgroupLine,
    ContainerIdentity,
    NameResolver,
    Pod,
    Runtime,
    identity_from_lines,
    parse_cgroup_path,
    parse_proc_cgroup,
    select_containers,
)
from closewait_trace.errors import UsageError
from closewait_trace.facts.facts import container_from_dict

ID = "e1d22cd9729ee49f7f4d8c8dbb8638941342033adc0dba2f050b87cf3604bc6a"
ID2 = "0f3a" + "b" * 60
UID = "8a1b2c3d-4e5f-6789-abcd-ef0123456789"
UID_ = UID.replace("-", "_")

# (path, runtime, container id, container name, pod uid, qos)
SHAPES = [
    (f"/docker/{ID}", Runtime.DOCKER, ID, None, None, None),
    (f"/system.slice/docker-{ID}.scope", Runtime.DOCKER, ID, None, None, None),
    (f"/docker/{ID2}/docker/{ID}", Runtime.DOCKER, ID, None, None, None),
    (f"/libpod_parent/libpod-{ID}", Runtime.PODMAN, ID, None, None, None),
    (f"/libpod_parent/{ID2}/{ID}", Runtime.PODMAN, ID, None, None, None),
    (f"/machine.slice/libpod-{ID}.scope", Runtime.PODMAN, ID, None, None, None),
    (f"/machine.slice/libpod-{ID}.scope/container", Runtime.PODMAN, ID, None, None, None),
    (f"/machine.slice/machine-libpod_pod_{ID2}.slice/libpod-{ID}.scope", Runtime.PODMAN, ID,
     None, None, None),
    (f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope",
     Runtime.PODMAN, ID, None, None, None),
    (f"/kubepods/burstable/pod{UID}/{ID}", Runtime.CRI, ID, None, UID, "burstable"),
    (f"/kubepods/besteffort/pod{UID}/{ID}", Runtime.CRI, ID, None, UID, "besteffort"),
    (f"/kubepods/pod{UID}/{ID}", Runtime.CRI, ID, None, UID, "guaranteed"),
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/"
     f"cri-containerd-{ID}.scope", Runtime.CONTAINERD, ID, None, UID, "burstable"),
    (f"/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope",
     Runtime.CONTAINERD, ID, None, UID, "guaranteed"),
    (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/"
     f"crio-{ID}.scope", Runtime.CRIO, ID, None, UID, "besteffort"),
    (f"/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/"
     f"kubelet-kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope",
     Runtime.CONTAINERD, ID, None, UID, "burstable"),
    ("/machine.slice/systemd-nspawn@web1.service", Runtime.NSPAWN, None, "web1", None, None),
    ("/machine.slice/systemd-nspawn@web1.service/payload", Runtime.NSPAWN, None, "web1", None,
     None),
    ("/machine.slice/machine-db\\x2dprimary.scope", Runtime.NSPAWN, None, "db-primary", None,
     None),
    ("/machine.slice/machine-lxc\\x2d42\\x2dbox.scope", Runtime.LXC, None, "42-box", None,
     None),
    ("/lxc/box1", Runtime.LXC, None, "box1", None, None),
    ("/lxc/box1/init.scope", Runtime.LXC, None, "box1", None, None),
    ("/lxc.payload.box1", Runtime.LXC, None, "box1", None, None),
    ("/lxc.payload/box1", Runtime.LXC, None, "box1", None, None),
]

NOT_CONTAINERS = [
    "/",
    "/user.slice/user-1000.slice/session-3.scope",
    "/system.slice/nginx.service",
    "/libpod_parent/conmon",
    f"/machine.slice/libpod-conmon-{ID}.scope",
    f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/"
    f"crio-conmon-{ID}.scope",
    "/machine.slice/machine-qemu\\x2d1\\x2dvm.scope",
    "/lxc.monitor.box1",
    f"/system.slice/{ID}",  # a bare id with no runtime parent says nothing
]


@pytest.mark.parametrize(("path", "runtime", "cid", "name", "uid", "qos"), SHAPES)
def test_every_runtime_path_shape(path: str, runtime: Runtime, cid: str | None,
                                  name: str | None, uid: str | None, qos: str | None) -> None:
    assert parse_cgroup_path(path) == ContainerIdentity(
        cgroup=path, runtime=runtime, container_id=cid, container_name=name,
        pod=Pod(uid=uid, qos=qos) if uid else None)


@pytest.mark.parametrize("path", NOT_CONTAINERS)
def test_paths_that_are_not_containers(path: str) -> None:
    ident = parse_cgroup_path(path)
    assert not ident.in_container and ident.container_id is None and ident.cgroup == path


def test_pod_level_process_has_pod_but_no_container() -> None:
    ident = parse_cgroup_path(f"/kubepods/burstable/pod{UID}")
    assert (ident.runtime, ident.pod) == (None, Pod(uid=UID, qos="burstable"))


def test_static_pod_uid_is_a_config_hash() -> None:
    ident = parse_cgroup_path(f"/kubepods/pod{'6b4e8c7d' * 4}/{ID}")
    assert ident.pod is not None and ident.pod.uid == "6b4e8c7d" * 4
    assert ident.container_id == ID


# --------------------------------------------------------------------------- /proc/PID/cgroup

HYBRID_PODMAN = "\n".join(
    [f"{n}:{c}:/libpod_parent/libpod-{ID}" for n, c in
     [(9, "name=systemd"), (8, "pids"), (4, "memory"), (2, "cpuacct"), (1, "cpu")]]
    + [f"0::/libpod_parent/libpod-{ID}", ""])
V1_DOCKER = f"12:cpu,cpuacct:/docker/{ID}\n3:net_cls,net_prio:/docker/{ID}\n1:name=systemd:/docker/{ID}\n"
V2_CONTAINERD = (f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}"
                 f".slice/cri-containerd-{ID}.scope\n")
HYBRID_CONMON = "1:cpu:/libpod_parent/conmon\n0::/\n"
HYBRID_HOST_V2_ROOT = f"9:name=systemd:/system.slice/docker-{ID}.scope\n0::/\n"


def test_parse_proc_cgroup_hybrid_lines() -> None:
    lines = parse_proc_cgroup(HYBRID_PODMAN)
    assert lines[0] == CgroupLine(9, ("name=systemd",), f"/libpod_parent/libpod-{ID}")
    assert lines[-1] == CgroupLine(0, (), f"/libpod_parent/libpod-{ID}")
    assert lines[-1].is_v2 and not lines[0].is_v2
    assert len(lines) == 6


def test_parse_proc_cgroup_controller_list_and_colons_in_path() -> None:
    lines = parse_proc_cgroup("3:net_cls,net_prio:/a:b\n")
    assert lines == [CgroupLine(3, ("net_cls", "net_prio"), "/a:b")]


@pytest.mark.parametrize(("text", "runtime", "cgroup"), [
    (HYBRID_PODMAN, Runtime.PODMAN, f"/libpod_parent/libpod-{ID}"),
    (V1_DOCKER, Runtime.DOCKER, f"/docker/{ID}"),
    (V2_CONTAINERD, Runtime.CONTAINERD, V2_CONTAINERD.strip()[3:]),
    (HYBRID_HOST_V2_ROOT, Runtime.DOCKER, f"/system.slice/docker-{ID}.scope"),
])
def test_identity_from_proc_cgroup(text: str, runtime: Runtime, cgroup: str) -> None:
    ident = identity_from_lines(parse_proc_cgroup(text))
    assert (ident.runtime, ident.container_id, ident.cgroup) == (runtime, ID, cgroup)


def test_identity_of_host_process_keeps_its_most_specific_path() -> None:
    ident = identity_from_lines(parse_proc_cgroup(HYBRID_CONMON))
    assert ident == ContainerIdentity(cgroup="/libpod_parent/conmon")
    assert identity_from_lines([]) == ContainerIdentity(cgroup="/")


@given(st.text())
def test_parsers_never_raise_on_arbitrary_text(text: str) -> None:
    ident = identity_from_lines(parse_proc_cgroup(text))
    assert isinstance(ident.cgroup, str)
    assert parse_cgroup_path(text).cgroup == text


@given(st.lists(st.sampled_from(["docker", "libpod_parent", "kubepods", "burstable",
                                 f"pod{UID}", f"pod{UID_}", ID, f"libpod-{ID}", "lxc",
                                 "machine.slice", "a", "", ".scope", "lxc.payload"]),
                max_size=8))
def test_path_parser_never_raises_on_runtime_like_components(parts: list[str]) -> None:
    ident = parse_cgroup_path("/" + "/".join(parts))
    assert ident.container_id in (None, ID)
    assert ident.pod is None or ident.pod.uid == UID


def test_as_dict_and_labels() -> None:
    ident = ContainerIdentity(cgroup="/x", runtime=Runtime.CRIO, container_id=ID,
                              pod=Pod(uid=UID))
    assert ident.as_dict() == {"cgroup": "/x", "runtime": "cri-o", "container_id": ID,
                               "pod_uid": UID}
    assert ident.label == ID[:12] == ident.short_id
    assert ContainerIdentity(cgroup="/", container_name="web").label == "web"


def test_pod_fields_stay_flat_in_json_and_read_back() -> None:
    pod = Pod(uid=UID, qos="burstable", name="web-1", namespace="shop")
    ident = ContainerIdentity(cgroup="/k", runtime=Runtime.CRI, container_id=ID, pod=pod)
    assert list(ident.as_dict()) == ["cgroup", "runtime", "container_id", "pod_uid",
                                     "pod_qos", "pod_name", "pod_namespace"]
    assert container_from_dict(ident.as_dict()) == ident
    names_only = ContainerIdentity(cgroup="/d", pod=Pod(name="web-1"))
    assert names_only.as_dict() == {"cgroup": "/d", "pod_name": "web-1"}
    assert container_from_dict(names_only.as_dict()) == names_only
    assert container_from_dict({"cgroup": "/"}) == ContainerIdentity(cgroup="/")


# --------------------------------------------------------------------------- names on disk


def _write(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _resolver(root: Path) -> NameResolver:
    return NameResolver(
        podman_storage=root / "var/lib/containers/storage",
        podman_runroot=root / "run/containers/storage",
        docker_root=root / "var/lib/docker",
        containerd_tasks=root / "run/containerd/io.containerd.runtime.v2.task",
        kubelet_pod_logs=root / "var/log/pods",
        kubelet_container_logs=root / "var/log/containers",
        home_of_uid=lambda uid: str(root / f"home/u{uid}"),
    )


def test_podman_name_from_containers_json(tmp_path: Path) -> None:
    _write(tmp_path / "var/lib/containers/storage/overlay-containers/containers.json",
           [{"id": ID2, "names": ["other"]}, {"id": ID, "names": ["web"], "layer": "x"}])
    ident = _resolver(tmp_path).resolve(parse_cgroup_path(f"/libpod_parent/libpod-{ID}"))
    assert (ident.runtime, ident.container_name) == (Runtime.PODMAN, "web")


def test_rootless_podman_name_from_the_users_storage(tmp_path: Path) -> None:
    _write(tmp_path / "home/u1000/.local/share/containers/storage/overlay-containers/"
           "containers.json", [{"id": ID, "names": ["mine"]}])
    path = f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope"
    assert _resolver(tmp_path).resolve(parse_cgroup_path(path)).container_name == "mine"


def test_docker_name_from_config_v2(tmp_path: Path) -> None:
    _write(tmp_path / f"var/lib/docker/containers/{ID}/config.v2.json",
           {"Name": "/api", "Config": {"Labels": {}}})
    ident = _resolver(tmp_path).resolve(parse_cgroup_path(f"/system.slice/docker-{ID}.scope"))
    assert (ident.runtime, ident.container_name) == (Runtime.DOCKER, "api")


def test_containerd_kubernetes_names_from_task_annotations(tmp_path: Path) -> None:
    _write(tmp_path / f"run/containerd/io.containerd.runtime.v2.task/k8s.io/{ID}/config.json",
           {"annotations": {"io.kubernetes.cri.container-name": "app",
                            "io.kubernetes.cri.sandbox-name": "web-7d9f",
                            "io.kubernetes.cri.sandbox-namespace": "shop",
                            "io.kubernetes.cri.sandbox-uid": UID}})
    ident = _resolver(tmp_path).resolve(parse_cgroup_path(f"/kubepods/burstable/pod{UID}/{ID}"))
    assert ident == ContainerIdentity(
        cgroup=f"/kubepods/burstable/pod{UID}/{ID}", runtime=Runtime.CONTAINERD,
        container_id=ID, container_name="app",
        pod=Pod(uid=UID, qos="burstable", name="web-7d9f", namespace="shop"))


def test_crio_kubernetes_names_from_config_json(tmp_path: Path) -> None:
    _write(tmp_path / f"run/containers/storage/overlay-containers/{ID}/userdata/config.json",
           {"annotations": {"io.kubernetes.container.name": "app",
                            "io.kubernetes.pod.name": "web-1", "io.kubernetes.pod.namespace":
                            "shop", "io.kubernetes.pod.uid": UID}})
    ident = _resolver(tmp_path).resolve(parse_cgroup_path(f"/kubepods/pod{UID}/{ID}"))
    assert (ident.runtime, ident.container_name, ident.pod) == (
        Runtime.CRIO, "app", Pod(uid=UID, qos="guaranteed", name="web-1", namespace="shop"))


def test_kubelet_log_layout_names_pod_and_container(tmp_path: Path) -> None:
    (tmp_path / f"var/log/pods/shop_web-1_{UID}/app").mkdir(parents=True)
    (tmp_path / "var/log/containers").mkdir(parents=True)
    (tmp_path / f"var/log/containers/web-1_shop_app-{ID}.log").touch()
    (tmp_path / f"var/log/containers/web-1_shop_side-{ID2}.log").touch()
    ident = _resolver(tmp_path).resolve(parse_cgroup_path(f"/kubepods/besteffort/pod{UID}/{ID}"))
    pod = Pod(uid=UID, qos="besteffort", name="web-1", namespace="shop")
    assert (ident.runtime, ident.container_name, ident.pod) == (Runtime.CRI, "app", pod)
    pod_only = _resolver(tmp_path).resolve(parse_cgroup_path(f"/kubepods/besteffort/pod{UID}"))
    assert pod_only.pod == pod


def test_names_are_cached_until_forgotten(tmp_path: Path) -> None:
    store = tmp_path / "var/lib/containers/storage/overlay-containers/containers.json"
    _write(store, [{"id": ID, "names": ["old"]}])
    resolver = _resolver(tmp_path)
    ident = parse_cgroup_path(f"/libpod_parent/libpod-{ID}")
    assert resolver.resolve(ident).container_name == "old"
    _write(store, [{"id": ID, "names": ["new"]}])
    assert resolver.resolve(ident).container_name == "old"
    resolver.forget(ID)
    assert resolver.resolve(ident).container_name == "new"


def test_ids_only_when_no_file_names_them(tmp_path: Path) -> None:
    _write(tmp_path / "var/lib/containers/storage/overlay-containers/containers.json", "junk")
    (tmp_path / f"var/lib/docker/containers/{ID}").mkdir(parents=True)
    (tmp_path / f"var/lib/docker/containers/{ID}/config.v2.json").write_text("{not json")
    resolver = _resolver(tmp_path)
    for path in (f"/libpod_parent/libpod-{ID}", f"/docker/{ID}", f"/kubepods/pod{UID}/{ID}"):
        ident = parse_cgroup_path(path)
        assert resolver.resolve(ident) == ident


# --------------------------------------------------------------------------- selection


def _fake_proc(root: Path, cgroups: dict[int, str]) -> Path:
    for pid, path in cgroups.items():
        (root / "proc" / str(pid)).mkdir(parents=True)
        (root / "proc" / str(pid) / "cgroup").write_text(f"1:cpu:{path}\n0::{path}\n")
    (root / "proc/self").mkdir()
    return root / "proc"


def test_select_by_name_id_prefix_and_pod(tmp_path: Path) -> None:
    _write(tmp_path / "var/lib/containers/storage/overlay-containers/containers.json",
           [{"id": ID, "names": ["web"]}, {"id": ID2, "names": ["db"]}])
    _write(tmp_path / f"run/containerd/io.containerd.runtime.v2.task/k8s.io/{'c' * 64}/"
           "config.json", {"annotations": {"io.kubernetes.cri.sandbox-name": "shop-0",
                                           "io.kubernetes.cri.sandbox-namespace": "prod"}})
    proc = _fake_proc(tmp_path, {
        10: f"/libpod_parent/libpod-{ID}", 11: f"/libpod_parent/libpod-{ID}",
        20: f"/libpod_parent/libpod-{ID2}", 30: "/system.slice/ssh.service",
        40: f"/kubepods/pod{UID}/{'c' * 64}", 41: f"/kubepods/pod{UID}/{'d' * 64}"})
    resolver = _resolver(tmp_path)
    web = select_containers("web", proc_root=proc, resolver=resolver)
    assert web.pids == {10, 11} and web.cgroups == {f"/libpod_parent/libpod-{ID}"}
    assert [c.container_name for c in web.containers] == ["web"]
    assert select_containers(ID2[:6], proc_root=proc, resolver=resolver).pids == {20}
    assert select_containers("prod/shop-0", proc_root=proc, resolver=resolver).pids == {40}
    assert select_containers(UID, proc_root=proc, resolver=resolver).pids == {40, 41}


def test_select_refuses_unknown_and_ambiguous(tmp_path: Path) -> None:
    proc = _fake_proc(tmp_path, {10: f"/docker/{'abc1' * 16}", 20: f"/docker/{'abc2' * 16}"})
    resolver = _resolver(tmp_path)
    with pytest.raises(UsageError, match="no running container"):
        select_containers("nope", proc_root=proc, resolver=resolver)
    with pytest.raises(UsageError, match="several container ids"):
        select_containers("abc", proc_root=proc, resolver=resolver)
    with pytest.raises(UsageError, match="no running container"):
        select_containers("ab", proc_root=proc, resolver=resolver)  # too short for a prefix
    assert select_containers("ABC2", proc_root=proc, resolver=resolver).pids == {20}
